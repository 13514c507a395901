//! `lwi`: the batch command line of the lwi engine. All work happens in liblwi.so, which this
//! program loads at run time (`--plugin`, `LWI_PLUGIN`, or beside the executable).
//!
//! Exit codes: 0 success · 1 the engine reported an error · 2 bad command line · 3 the plugin could
//! not be loaded or speaks another ABI version.

mod plugin;

use clap::{Parser, Subcommand};
use plugin::{Plugin, PluginError};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "lwi", version, about = "3-D medical image segmentation with learnable weight initialization")]
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
    /// Convert a PyTorch UNETR checkpoint (.pt) into an lwi model file (never executes the pickle).
    Import {
        /// The checkpoint: a state dict, or a dict holding one under "state_dict"
        /// (MONAI 1.6.1 or LWI-VMS key names).
        #[arg(long = "from", value_name = "CKPT.pt")]
        from: PathBuf,
        /// Architecture of the checkpoint.
        #[arg(long, default_value = "unetr", value_parser = ["unetr"])]
        arch: String,
        /// JSON file of MONAI `UNETR` keyword arguments (in_channels, out_channels, img_size, ...).
        #[arg(long, value_name = "ARCH.json")]
        arch_config: PathBuf,
        /// JSON file mapping label values to names: {"0": "background", "1": "spleen", ...}.
        #[arg(long, value_name = "LABELS.json")]
        labels: PathBuf,
        /// Target spacing in mm the model was trained at.
        #[arg(long, value_parser = numbers::<f64, 3>, default_value = "1.5,1.5,2.0", value_name = "X,Y,Z")]
        spacing: [f64; 3],
        /// HU window mapped to [0, 1].
        #[arg(long, value_parser = numbers::<f64, 2>, default_value = "-175,250", value_name = "LOW,HIGH", allow_hyphen_values = true)]
        window: [f64; 2],
        /// The model file to write (.safetensors).
        #[arg(long)]
        out: PathBuf,
    },
    /// Convert a volume between formats (by extension), keeping its world geometry exactly.
    Convert {
        /// Input volume (.nii, .nii.gz, .nrrd, .nhdr).
        input: PathBuf,
        /// Output volume; the extension picks the format.
        output: PathBuf,
    },
    /// Write a synthetic abdominal CT dataset (MSD layout: imagesTr/, labelsTr/, dataset.json).
    Phantom {
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Number of cases.
        #[arg(long, default_value_t = 4)]
        cases: usize,
        /// Random seed; the same seed writes the same bytes.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Voxels along x,y,z.
        #[arg(long, value_parser = numbers::<i64, 3>, value_name = "X,Y,Z")]
        size: Option<[i64; 3]>,
        /// Spacing in mm along x,y,z (default: drawn per case around 3.8,3.8,4.5).
        #[arg(long, value_parser = numbers::<f64, 3>, value_name = "X,Y,Z")]
        spacing: Option<[f64; 3]>,
    },
}

/// Parses N comma-separated numbers, "a,b,c".
fn numbers<T: std::str::FromStr, const N: usize>(s: &str) -> Result<[T; N], String> {
    let parts: Vec<T> = s.split(',').map(|p| p.trim().parse::<T>().map_err(|_| format!("'{p}' is not a number"))).collect::<Result<_, _>>()?;
    <[T; N]>::try_from(parts).map_err(|_| format!("expected {N} comma-separated values, got '{s}'"))
}

const DTYPES: [&str; 10] = ["uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float32", "float64"];

fn run(cli: Cli) -> Result<(), Failure> {
    let path = plugin::locate(cli.plugin.as_deref());
    let plugin = Plugin::load(&path).map_err(Failure::Plugin)?;
    match cli.command {
        Command::Info { path: None } => {
            let json: serde_json::Value = serde_json::from_str(&plugin.version_json()?).unwrap_or_default();
            let mut out = json;
            out["plugin"] = plugin.path.display().to_string().into();
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        }
        Command::Info { path: Some(p) } if p.extension().is_some_and(|e| e == "safetensors") => {
            let info: serde_json::Value = serde_json::from_str(&plugin.model_info(&p)?).unwrap_or_default();
            println!("{}", serde_json::to_string_pretty(&info).unwrap_or_default());
        }
        Command::Info { path: Some(p) } => {
            let (dims, dtype, a) = plugin.volume_info(&p)?;
            let spacing: Vec<f64> = (0..3).map(|c| (0..3).map(|r| a[4 * r + c].powi(2)).sum::<f64>().sqrt()).collect();
            let info = serde_json::json!({
                "path": p.display().to_string(),
                "dims": dims,
                "dtype": DTYPES.get(dtype as usize).copied().unwrap_or("?"),
                "spacing_mm": spacing,
                "affine_ras": [&a[0..4], &a[4..8], &a[8..12], &a[12..16]],
            });
            println!("{}", serde_json::to_string_pretty(&info).unwrap_or_default());
        }
        Command::Convert { input, output } => plugin.convert(&input, &output)?,
        Command::Import { from, arch, arch_config, labels, spacing, window, out } => {
            let read = |p: &PathBuf| -> Result<serde_json::Value, Failure> {
                let text = std::fs::read_to_string(p).map_err(|e| Failure::Usage(format!("{}: {e}", p.display())))?;
                serde_json::from_str(&text).map_err(|e| Failure::Usage(format!("{}: not JSON ({e})", p.display())))
            };
            let options = serde_json::json!({
                "arch": arch,
                "arch_config": read(&arch_config)?,
                "labels": read(&labels)?,
                "spacing": spacing,
                "window": window,
            });
            plugin.import(&from, &options.to_string(), &out)?;
            eprintln!("wrote {}", out.display());
        }
        Command::Phantom { out, cases, seed, size, spacing } => {
            let mut opts = serde_json::json!({ "cases": cases, "seed": seed });
            if let Some(s) = size {
                opts["size"] = serde_json::json!(s);
            }
            if let Some(s) = spacing {
                opts["spacing"] = serde_json::json!(s);
            }
            plugin.phantom(&out, &opts.to_string())?;
            eprintln!("wrote {cases} phantom cases and {}", out.join("dataset.json").display());
        }
    }
    Ok(())
}

enum Failure {
    Plugin(String),
    Usage(String),
    Engine(PluginError),
}

impl From<PluginError> for Failure {
    fn from(e: PluginError) -> Self {
        Failure::Engine(e)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Engine(e)) => {
            eprintln!("lwi: error: {}", e.message);
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
