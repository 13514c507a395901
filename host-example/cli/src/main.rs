//! `lwi`: the batch command line of the lwi engine. All work happens in liblwi.so, which this
//! program loads at run time (`--plugin`, `LWI_PLUGIN`, or beside the executable).
//!
//! Exit codes: 0 success · 1 the work failed (the engine reported an error, or an output the
//! command writes itself could not be made) · 2 bad command line · 3 the plugin could not be
//! loaded or speaks another ABI version.

mod evaluate;
mod figures;
mod files;
mod info;
mod plugin;
mod progress;
mod render;
mod segment;
mod tools;
mod train;

use clap::{Parser, Subcommand};
use plugin::{Plugin, PluginError};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "lwi",
    version,
    about = "3-D medical image segmentation with learnable weight initialization"
)]
struct Cli {
    /// Path of liblwi.so (default: $LWI_PLUGIN, else beside this executable).
    #[arg(long, global = true, value_name = "PATH")]
    plugin: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the engine's versions and devices, or describe a model or volume file.
    Info {
        /// A model file (.safetensors) or a volume (.nii, .nii.gz, .nrrd, .nhdr) to describe.
        path: Option<PathBuf>,
    },
    /// Convert a PyTorch checkpoint (UNETR .pt; UNETR++ nnU-Net v1 .model or state dict) into an
    /// lwi model file (never executes the pickle).
    Import(tools::ImportArgs),
    /// Convert a volume between formats (by extension), keeping its world geometry exactly.
    Convert {
        /// INPUT OUTPUT: the input volume (.nii, .nii.gz, .nrrd, .nhdr) or DICOM (a folder, DICOMDIR or
        /// .dcm file), or several DICOM files making one series; the output's extension picks its format.
        #[arg(num_args = 2.., required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// The DICOM series to convert (Series Instance UID; default: the largest CT/MR series).
        #[arg(long, value_name = "UID")]
        series: Option<String>,
    },
    /// Stage 1: learn the initial weights from the training volumes (self-supervised pretext task).
    InitTrain {
        #[command(flatten)]
        common: train::TrainArgs,
    },
    /// Stage 2: fine-tune for segmentation, from an init-train model or from scratch.
    FineTune {
        #[command(flatten)]
        common: train::TrainArgs,
        /// The init-train model to start from.
        #[arg(
            long,
            required_unless_present = "from_scratch",
            conflicts_with = "from_scratch"
        )]
        init: Option<PathBuf>,
        /// Start from random weights instead (for comparison).
        #[arg(long)]
        from_scratch: bool,
    },
    /// Segment volumes with a model; each label map lands on its input's own grid.
    Segment(segment::SegmentArgs),
    /// Dice and HD95 (mm) of predictions against references, per case and label.
    Evaluate(evaluate::EvaluateArgs),
    /// Write a PNG: axial, coronal and sagittal planes of a volume with its label maps over them
    /// (prediction, and reference side by side) and a legend; or, with --curves, a model's
    /// training loss and validation Dice per epoch.
    Render(figures::RenderArgs),
    /// Run the raw network on a tensor (no preprocessing): `x` [B, C, D, H, W] of a safetensors
    /// file in, every output (logits; out1..3; recon, t1..t4) by name out.
    Forward(tools::ForwardArgs),
    /// Write a synthetic abdominal CT dataset (MSD layout: imagesTr/, labelsTr/, dataset.json).
    Phantom(tools::PhantomArgs),
    /// Print the folder of the 3D Slicer CLI modules installed with this lwi (the wheel's), to add
    /// to Slicer's module paths.
    SlicerPath,
}

fn run(cli: Cli) -> Result<(), Failure> {
    if let Command::SlicerPath = cli.command {
        return info::slicer_path();
    }
    let path = plugin::locate(cli.plugin.as_deref());
    let plugin = Plugin::load(&path).map_err(Failure::Plugin)?;
    match cli.command {
        Command::Info { path } => info::show(&plugin, path.as_deref()),
        Command::Import(a) => tools::import(&plugin, a),
        Command::Convert { paths, series } => tools::convert(&plugin, paths, series),
        Command::InitTrain { common } => train::run(&plugin, false, &common, None),
        Command::FineTune { common, init, .. } => train::run(&plugin, true, &common, init.as_ref()),
        Command::Segment(a) => segment::run(&plugin, a),
        Command::Evaluate(a) => evaluate::run(&plugin, a),
        Command::Render(a) => figures::run(&plugin, a),
        Command::Forward(a) => tools::forward(&plugin, a),
        Command::Phantom(a) => tools::phantom(&plugin, a),
        Command::SlicerPath => info::slicer_path(),
    }
}

/// Parses N comma-separated numbers, "a,b,c".
pub fn numbers<T: std::str::FromStr, const N: usize>(s: &str) -> Result<[T; N], String> {
    let parts: Vec<T> = s
        .split(',')
        .map(|p| {
            p.trim()
                .parse::<T>()
                .map_err(|_| format!("'{p}' is not a number"))
        })
        .collect::<Result<_, _>>()?;
    <[T; N]>::try_from(parts).map_err(|_| format!("expected {N} comma-separated values, got '{s}'"))
}

/// Why the command failed; each has its exit code.
enum Failure {
    /// 3: liblwi.so could not be loaded, or speaks another ABI version.
    Plugin(String),
    /// 2: a bad command line, or a file it names that is not what it should be.
    Usage(String),
    /// 1: the engine reported an error.
    Engine(PluginError),
    /// 1: a file or folder the command itself writes could not be made.
    Io(String),
}

impl From<PluginError> for Failure {
    fn from(e: PluginError) -> Self {
        Failure::Engine(e)
    }
}

/// Keeps freed memory in this process's heap instead of handing it back to the kernel. glibc maps
/// every block above its mmap threshold (at most 32 MiB by default) afresh and unmaps it on free, so
/// each sliding window's activations (tens of MiB) were page-faulted and zeroed again: on 2 CPU cores
/// that was a third of `lwi segment`'s wall time, as kernel time (docs/performance.md). The `lwi`
/// process is ours to tune; a host embedding liblwi.so decides for its own process (the same effect
/// comes from MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ in its environment).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    const ONE_GIB: libc::c_int = 1 << 30;
    // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, ONE_GIB);
        libc::mallopt(libc::M_TRIM_THRESHOLD, ONE_GIB);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn main() -> ExitCode {
    keep_freed_memory();
    // `lwi info M | head` closes the pipe early: end quietly, as a Unix tool does, instead of the
    // panic Rust's ignored SIGPIPE turns the failed write into.
    // SAFETY: resetting a signal's disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Engine(e)) => {
            eprintln!("lwi: error: {}", e.message);
            ExitCode::from(1)
        }
        Err(Failure::Io(msg)) => {
            eprintln!("lwi: error: {msg}");
            ExitCode::from(1)
        }
        Err(Failure::Usage(msg)) => {
            eprintln!("lwi: error: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Plugin(msg)) => {
            eprintln!("lwi: error: {msg}");
            ExitCode::from(3)
        }
    }
}
