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
    /// Show the engine's versions and devices, or describe a volume file.
    Info {
        /// A volume (.nii, .nii.gz, .nrrd, .nhdr) to describe.
        path: Option<PathBuf>,
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
        #[arg(long, value_parser = triple::<i64>, value_name = "X,Y,Z")]
        size: Option<[i64; 3]>,
        /// Spacing in mm along x,y,z (default: drawn per case around 3.8,3.8,4.5).
        #[arg(long, value_parser = triple::<f64>, value_name = "X,Y,Z")]
        spacing: Option<[f64; 3]>,
    },
}

/// Parses "a,b,c".
fn triple<T: std::str::FromStr>(s: &str) -> Result<[T; 3], String> {
    let parts: Vec<T> = s.split(',').map(|p| p.trim().parse::<T>().map_err(|_| format!("'{p}' is not a number"))).collect::<Result<_, _>>()?;
    <[T; 3]>::try_from(parts).map_err(|_| format!("expected three comma-separated values, got '{s}'"))
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
        Err(Failure::Plugin(msg)) => {
            eprintln!("lwi: error: {msg}");
            ExitCode::from(3)
        }
    }
}
