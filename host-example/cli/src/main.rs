//! `lwi`: the batch command line of the lwi engine. All work happens in liblwi.so, which this
//! program loads at run time (`--plugin`, `LWI_PLUGIN`, or beside the executable).
//!
//! Exit codes: 0 success · 1 the engine reported an error · 2 bad command line · 3 the plugin could
//! not be loaded or speaks another ABI version.

mod plugin;
mod progress;
mod render;

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
    Import {
        /// The checkpoint: a state dict, or a dict holding one under "state_dict"
        /// (MONAI 1.6.1 or LWI-VMS key names; nnU-Net v1's model_final_checkpoint.model).
        #[arg(long = "from", value_name = "CKPT.pt")]
        from: PathBuf,
        /// Architecture of the checkpoint (default: the "arch" of ARCH.json, else unetr).
        #[arg(long, value_parser = ["unetr", "unetr_pp"])]
        arch: Option<String>,
        /// JSON file of the upstream constructor's keyword arguments (MONAI `UNETR`, or `UNETR_PP`
        /// with "arch": "unetr_pp").
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
        /// UNETR++: nnU-Net's CT normalisation from the plans' intensity properties
        /// (percentile_00_5, percentile_99_5, mean, sd).
        #[arg(long, value_parser = numbers::<f64, 4>, value_name = "P0.5,P99.5,MEAN,SD", allow_hyphen_values = true)]
        ct_norm: Option<[f64; 4]>,
        /// UNETR++: the checkpoint's nnU-Net plans (CKPT.model.pkl or plans.pkl); the spacing, patch and
        /// CT normalisation then come from it.
        #[arg(long, value_name = "PLANS.pkl")]
        plans: Option<PathBuf>,
        /// The model file to write (.safetensors).
        #[arg(long)]
        out: PathBuf,
    },
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
        common: TrainArgs,
    },
    /// Stage 2: fine-tune for segmentation, from an init-train model or from scratch.
    FineTune {
        #[command(flatten)]
        common: TrainArgs,
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
    Segment {
        /// The model file (.safetensors, stage segmentation).
        #[arg(long)]
        model: PathBuf,
        /// Input volumes (.nii, .nii.gz, .nrrd, .nhdr).
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Output folder (outputs take their input's file name), or a file for a single input.
        #[arg(long)]
        out: PathBuf,
        /// Fraction of each window shared with its neighbours.
        #[arg(long, default_value_t = 0.5)]
        overlap: f64,
        /// How overlapping windows are blended.
        #[arg(long, default_value = "gaussian", value_parser = ["gaussian", "constant"])]
        blend: String,
        /// Windows per forward pass (default: 1 on the CPU, 4 on CUDA).
        #[arg(long)]
        sw_batch: Option<i64>,
        /// Mirror test-time augmentation over x, y and z (4 forward passes per window).
        #[arg(long)]
        tta: bool,
        /// nnU-Net models (UNETR++): one pass per window instead of nnU-Net's 8 mirrorings.
        #[arg(long)]
        no_mirror: bool,
        /// Resampling back to the input grid: class probabilities (keeps thin structures) or nearest labels.
        #[arg(long, default_value = "scores", value_parser = ["scores", "nearest"])]
        resample: String,
        /// fp32, or bf16/fp16 autocast (CUDA only).
        #[arg(long, default_value = "fp32", value_parser = ["fp32", "bf16", "fp16"])]
        precision: String,
        /// auto (the first GPU if any), cpu or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        /// CPU threads.
        #[arg(long)]
        threads: Option<i32>,
        /// Process only part i of n of the inputs (0-based, i/n): spread a batch over array jobs.
        #[arg(long, value_name = "I/N")]
        shard: Option<String>,
        /// Replace outputs that already exist (by default they are skipped, so a rerun resumes).
        #[arg(long)]
        overwrite: bool,
        /// Do not write the OUTPUT.json manifest beside each output.
        #[arg(long)]
        no_manifest: bool,
        /// Print progress as JSON lines on stdout (for scripts) instead of bars.
        #[arg(long)]
        json: bool,
        /// Keep only the largest connected component of each label.
        #[arg(long)]
        largest_component: bool,
        /// On CUDA, keep the sliding-window sums on the CPU when they would need more GPU memory than this (MiB).
        #[arg(long, value_name = "MIB")]
        max_gpu_accumulator_mb: Option<u64>,
        /// Also write the network's input (reoriented, resampled, windowed, cropped) to this volume
        /// file on its own grid, to check the preprocessing (one input only).
        #[arg(long, value_name = "FILE")]
        save_preprocessed: Option<PathBuf>,
        /// On CUDA, run ATen's separate normalisation, add and activation kernels instead of lwi's
        /// fused one (for comparisons).
        #[arg(long)]
        no_fused_norm: bool,
        /// For DICOM inputs: the series to segment (Series Instance UID; default: the largest CT/MR series).
        #[arg(long, value_name = "UID")]
        series: Option<String>,
        /// Output format in an output folder: auto (the input's own; NIfTI for DICOM input), nifti, nrrd,
        /// or dicom-seg (a DICOM Segmentation referencing the DICOM input). A single output file's
        /// extension decides by itself (.dcm for DICOM SEG).
        #[arg(long, default_value = "auto", value_parser = ["auto", "nifti", "nrrd", "dicom-seg"])]
        output_type: String,
    },
    /// Dice and HD95 (mm) of predictions against references, per case and label.
    Evaluate {
        /// Predicted label map, or a folder of them.
        #[arg(long)]
        pred: PathBuf,
        /// Reference label map, or a folder (files matched by name).
        #[arg(long = "ref")]
        reference: PathBuf,
        /// Label values to score (default: every non-zero label present).
        #[arg(long, value_delimiter = ',')]
        labels: Option<Vec<u32>>,
        /// Also write the full report as JSON here.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// Write a PNG: axial, coronal and sagittal planes of a volume with its label maps over them
    /// (prediction, and reference side by side) and a legend; or, with --curves, a model's
    /// training loss and validation Dice per epoch.
    Render {
        /// The image volume.
        #[arg(long, required_unless_present = "curves")]
        image: Option<PathBuf>,
        /// A label map on the same grid (e.g. the output of `lwi segment`).
        #[arg(long)]
        labels: Option<PathBuf>,
        /// The reference label map, drawn beside the prediction.
        #[arg(long)]
        reference: Option<PathBuf>,
        /// A model file whose label names (and colours) make the legend.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Draw the training curves kept in this model file instead.
        #[arg(long, conflicts_with = "image")]
        curves: Option<PathBuf>,
        /// Grey-level window, HU.
        #[arg(long, value_parser = numbers::<f32, 2>, default_value = "-175,250", allow_hyphen_values = true)]
        window: [f32; 2],
        #[arg(long)]
        out: PathBuf,
    },
    /// Run the raw network on a tensor (no preprocessing): `x` [B, C, D, H, W] of a safetensors
    /// file in, every output (logits; out1..3; recon, t1..t4) by name out.
    Forward {
        /// The model file.
        #[arg(long)]
        model: PathBuf,
        /// A safetensors file holding `x`.
        #[arg(long)]
        input: PathBuf,
        /// The safetensors file to write.
        #[arg(long)]
        out: PathBuf,
        /// "auto", "cpu" or "cuda:N".
        #[arg(long, default_value = "cpu")]
        device: String,
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

/// The evaluation as a table: one row per case and label, then the means.
fn print_evaluation(report: &serde_json::Value) {
    let fmt = |v: &serde_json::Value, digits: usize| {
        v.as_f64()
            .map_or("-".to_string(), |x| format!("{x:.digits$}"))
    };
    println!(
        "{:<32} {:>6} {:>8} {:>10}",
        "case", "label", "dice", "hd95 mm"
    );
    // Label keys are numbers written as JSON strings: order them as numbers.
    let by_label = |v: &serde_json::Value| {
        let mut rows: Vec<(u64, serde_json::Value)> = v
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, s)| (k.parse().unwrap_or(u64::MAX), s.clone()))
            .collect();
        rows.sort_by_key(|r| r.0);
        rows
    };
    for case in report["cases"].as_array().into_iter().flatten() {
        for (label, s) in by_label(&case["labels"]) {
            println!(
                "{:<32} {label:>6} {:>8} {:>10}",
                case["case"].as_str().unwrap_or(""),
                fmt(&s["dice"], 4),
                fmt(&s["hd95"], 2)
            );
        }
    }
    for (label, s) in by_label(&report["mean"]) {
        println!(
            "{:<32} {label:>6} {:>8} {:>10}",
            "mean",
            fmt(&s["dice"], 4),
            fmt(&s["hd95"], 2)
        );
    }
    if report["synapse_8_mean"].is_object() {
        let s = &report["synapse_8_mean"];
        println!(
            "{:<32} {:>6} {:>8} {:>10}",
            "Synapse 8-organ mean",
            "",
            fmt(&s["dice"], 4),
            fmt(&s["hd95"], 2)
        );
    }
}

/// File endings of the volumes `lwi segment` writes (`.dcm`: a DICOM SEG).
const VOLUME_ENDINGS: [&str; 5] = [".nii.gz", ".nii", ".nrrd", ".nhdr", ".dcm"];

/// DICOM input: a folder, a DICOMDIR or a `.dcm` file.
fn is_dicom_path(p: &std::path::Path) -> bool {
    let name = p
        .file_name()
        .map(|n| n.as_encoded_bytes().to_ascii_lowercase())
        .unwrap_or_default();
    p.is_dir() || name == b"dicomdir" || name.ends_with(b".dcm")
}

/// The output name for `input` in an output folder: its file name with the extension of
/// `output_type` (a DICOM folder's name gets one; `auto` keeps a volume file's own).
fn output_name(input: &std::path::Path, output_type: &str) -> std::path::PathBuf {
    use std::os::unix::ffi::OsStrExt;
    // Bytes, not UTF-8: a file name need not be valid Unicode.
    let name = input
        .file_name()
        .map(|n| n.as_bytes().to_vec())
        .unwrap_or_else(|| b"output".to_vec());
    let lower = name.to_ascii_lowercase();
    let stem = VOLUME_ENDINGS
        .iter()
        .find(|e| lower.ends_with(e.as_bytes()))
        .map_or(&name[..], |e| &name[..name.len() - e.len()]);
    let ext = match output_type {
        "dicom-seg" => ".dcm",
        "nifti" => ".nii.gz",
        "nrrd" => ".nrrd",
        _ if is_dicom_path(input) => ".nii.gz",
        _ => return std::ffi::OsStr::from_bytes(&name).into(),
    };
    std::ffi::OsStr::from_bytes(&[stem, ext.as_bytes()].concat()).into()
}

/// Parses "I/N" with 0 ≤ I < N.
fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let bad = || format!("--shard {s}: expected I/N with 0 <= I < N, e.g. 0/4");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n) = (
        i.trim().parse::<usize>().map_err(|_| bad())?,
        n.trim().parse::<usize>().map_err(|_| bad())?,
    );
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

/// An output that exists is skipped (so a rerun resumes a half-done batch), and said so.
fn report_skip(json: bool, input: &std::path::Path, output: &std::path::Path) {
    if json {
        println!(
            "{}",
            serde_json::json!({"event": "skipped", "input": input, "output": output, "reason": "exists"})
        );
    } else {
        eprintln!(
            "{}: skipped, {} exists (--overwrite replaces it)",
            input.display(),
            output.display()
        );
    }
}

/// Parses N comma-separated numbers, "a,b,c".
fn numbers<T: std::str::FromStr, const N: usize>(s: &str) -> Result<[T; N], String> {
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

/// Flags shared by init-train and fine-tune; anything else goes in `--config C.json`
/// (docs/training.md), which the flags override.
#[derive(clap::Args)]
struct TrainArgs {
    /// dataset.json (MSD / nnU-Net) or a MONAI datalist.
    #[arg(long)]
    dataset: PathBuf,
    /// Architecture config: the upstream keyword arguments plus "arch" ("unetr", the default, or "unetr_pp"; out_channels is decided by the stage).
    #[arg(long, value_name = "ARCH.json")]
    arch_config: Option<PathBuf>,
    #[arg(long)]
    epochs: Option<u64>,
    #[arg(long)]
    seed: Option<u64>,
    /// auto (the first GPU if any), cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// CPU threads.
    #[arg(long)]
    threads: Option<i32>,
    /// The model file to write (.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// JSON training configuration (every field optional; unknown fields are errors).
    #[arg(long, value_name = "C.json")]
    config: Option<PathBuf>,
    /// Continue from OUT.ckpt (written every checkpoint_every epochs).
    #[arg(long)]
    resume: bool,
    /// Print progress as JSON lines on stdout.
    #[arg(long)]
    json: bool,
}

/// A JSON file named on the command line. Only a regular file is read: a FIFO would block the
/// command, a device would be read without end. The open is non-blocking, the type checked on it.
fn read_json(p: &std::path::Path) -> Result<serde_json::Value, Failure> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |e: String| Failure::Usage(format!("{}: {e}", p.display()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(p)
        .map_err(|e| fail(e.to_string()))?;
    let meta = file.metadata().map_err(|e| fail(e.to_string()))?;
    if !meta.is_file() {
        return Err(fail("not a regular file; a JSON file is needed".into()));
    }
    let mut text = String::new();
    file.take(meta.len())
        .read_to_string(&mut text)
        .map_err(|e| fail(e.to_string()))?;
    serde_json::from_str(&text)
        .map_err(|e| Failure::Usage(format!("{}: not JSON ({e})", p.display())))
}

/// Runs a training stage with a progress display.
fn train(
    plugin: &Plugin,
    fine_tune: bool,
    a: &TrainArgs,
    init: Option<&PathBuf>,
) -> Result<(), Failure> {
    let mut config = match &a.config {
        Some(p) => read_json(p)?,
        None => serde_json::json!({}),
    };
    let obj = config
        .as_object_mut()
        .ok_or_else(|| Failure::Usage("--config must hold a JSON object".into()))?;
    obj.insert("dataset".into(), serde_json::json!(a.dataset));
    obj.insert("out".into(), serde_json::json!(a.out));
    if let Some(p) = &a.arch_config {
        obj.insert("arch".into(), read_json(p)?);
    }
    for (key, value) in [
        ("epochs", a.epochs.map(serde_json::Value::from)),
        ("seed", a.seed.map(serde_json::Value::from)),
        ("threads", a.threads.map(serde_json::Value::from)),
    ] {
        if let Some(v) = value {
            obj.insert(key.into(), v);
        }
    }
    if a.resume {
        obj.insert("resume".into(), true.into());
    }
    if let Some(p) = init {
        obj.insert("init".into(), serde_json::json!(p));
    }
    let stage = if fine_tune { "fine-tune" } else { "init-train" };
    let bar = progress::Bar::new(a.json, format!("{stage} → {}", a.out.display()));
    plugin.train(fine_tune, &a.device, &config.to_string(), &mut |e| {
        bar.update(e)
    })?;
    bar.finish(&a.out);
    Ok(())
}

const DTYPES: [&str; 10] = [
    "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float32", "float64",
];

/// Both stages' per-epoch history from `lwi_model_info_json`'s provenance.
fn history_of(info: &serde_json::Value) -> Vec<(&'static str, render::History)> {
    let stage = |key: &str| -> render::History {
        info["provenance"]["history"][key]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                (
                    e["epoch"].as_u64().unwrap_or(0),
                    e["loss"].as_f64().unwrap_or(f64::NAN),
                    e["metric"].as_f64(),
                )
            })
            .collect()
    };
    vec![
        ("init-train", stage("init")),
        ("fine-tune", stage("fine_tune")),
    ]
    .into_iter()
    .filter(|s| !s.1.is_empty())
    .collect()
}

/// `lwi render --image`: the three planes of the image with each label map, and a legend named by
/// the model's labels when a model is given.
fn render_overlays(
    plugin: &Plugin,
    image: &std::path::Path,
    labels: Option<std::path::PathBuf>,
    reference: Option<std::path::PathBuf>,
    model: Option<std::path::PathBuf>,
    window: [f32; 2],
    out: &std::path::Path,
) -> Result<(), Failure> {
    let (dims, affine, voxels) = plugin.volume_f32(image)?;
    let mut maps = Vec::new();
    for (name, path) in [("prediction", labels), ("reference", reference)] {
        let Some(p) = path else { continue };
        let (ldims, _, l) = plugin.volume_f32(&p)?;
        if ldims != dims {
            return Err(Failure::Usage(format!(
                "{} has dims {ldims:?}, the image {dims:?}",
                p.display()
            )));
        }
        maps.push((name, l));
    }
    let mut names = std::collections::BTreeMap::new();
    if let Some(m) = model {
        let info: serde_json::Value =
            serde_json::from_str(&plugin.model_info(&m)?).unwrap_or_default();
        for (k, v) in info["labels"].as_object().into_iter().flatten() {
            if let (Ok(k), Some(v)) = (k.parse::<u32>(), v.as_str()) {
                names.insert(k, v.to_string());
            }
        }
    }
    let spacing: [f64; 3] = std::array::from_fn(|c| {
        (0..3)
            .map(|r| affine[4 * r + c].powi(2))
            .sum::<f64>()
            .sqrt()
    });
    let grid = render::Grid {
        dims: dims.map(|d| d as usize),
        spacing,
        values: &voxels,
    };
    let rows: Vec<(&str, &[f32])> = maps.iter().map(|(n, l)| (*n, &l[..])).collect();
    render::overlays(&grid, &rows, &names, window, out).map_err(Failure::Usage)
}

fn run(cli: Cli) -> Result<(), Failure> {
    let path = plugin::locate(cli.plugin.as_deref());
    let plugin = Plugin::load(&path).map_err(Failure::Plugin)?;
    match cli.command {
        Command::Info { path: None } => {
            let json: serde_json::Value =
                serde_json::from_str(&plugin.version_json()?).unwrap_or_default();
            let mut out = json;
            out["plugin"] = plugin.path.display().to_string().into();
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        }
        Command::Info { path: Some(p) } if p.extension().is_some_and(|e| e == "safetensors") => {
            let info: serde_json::Value =
                serde_json::from_str(&plugin.model_info(&p)?).unwrap_or_default();
            println!(
                "{}",
                serde_json::to_string_pretty(&info).unwrap_or_default()
            );
        }
        Command::Info { path: Some(p) } if is_dicom_path(&p) => {
            let doc: serde_json::Value =
                serde_json::from_str(&plugin.dicom_series(&p)?).unwrap_or_default();
            for s in doc["series"].as_array().into_iter().flatten() {
                println!(
                    "{}  {}  {}x{}  {} slices  ({} files)  {}",
                    s["series_uid"]
                        .as_str()
                        .filter(|u| !u.is_empty())
                        .unwrap_or("(no series UID)"),
                    s["modality"].as_str().unwrap_or("?"),
                    s["columns"],
                    s["rows"],
                    s["slices"],
                    s["files"],
                    s["description"]
                );
                if let Some(dev) = s["max_slice_deviation_mm"].as_f64().filter(|&d| d > 0.01) {
                    println!(
                        "  warning: slice positions scatter up to {dev:.3} mm around the fitted {:.4} mm grid (rounded positions)",
                        s["slice_spacing_mm"].as_f64().unwrap_or_default()
                    );
                }
                if let Some(why) = s["problem"].as_str() {
                    println!("  not readable as a volume: {why}");
                }
            }
            for f in doc["skipped"].as_array().into_iter().flatten() {
                println!(
                    "skipped {}: {}",
                    f["file"].as_str().unwrap_or("?"),
                    f["reason"].as_str().unwrap_or("?")
                );
            }
        }
        Command::Info { path: Some(p) } => {
            let (dims, dtype, a) = plugin.volume_info(&p)?;
            let spacing: Vec<f64> = (0..3)
                .map(|c| (0..3).map(|r| a[4 * r + c].powi(2)).sum::<f64>().sqrt())
                .collect();
            let info = serde_json::json!({
                "path": p.display().to_string(),
                "dims": dims,
                "dtype": DTYPES.get(dtype as usize).copied().unwrap_or("?"),
                "spacing_mm": spacing,
                "affine_ras": [&a[0..4], &a[4..8], &a[8..12], &a[12..16]],
            });
            println!(
                "{}",
                serde_json::to_string_pretty(&info).unwrap_or_default()
            );
        }
        Command::Convert { mut paths, series } => {
            let output = paths.pop().unwrap_or_default();
            match (paths.as_slice(), series) {
                ([input], None) => plugin.convert(input, &output)?,
                (inputs, uid) => {
                    plugin.convert_dicom(inputs, uid.as_deref().unwrap_or(""), &output)?
                }
            }
        }
        Command::Import {
            from,
            arch,
            arch_config,
            labels,
            spacing,
            window,
            ct_norm,
            plans,
            out,
        } => {
            let mut config = read_json(&arch_config)?;
            let named = config.as_object_mut().and_then(|o| o.remove("arch"));
            let arch = match (arch, named) {
                (Some(a), _) => a.into(),
                (None, Some(a)) => a,
                (None, None) => "unetr".into(),
            };
            let options = serde_json::json!({
                "arch": arch,
                "arch_config": config,
                "labels": read_json(&labels)?,
                "spacing": spacing,
                "window": window,
                "ct_normalization": ct_norm,
                "plans": plans,
            });
            plugin.import(&from, &options.to_string(), &out)?;
            eprintln!("wrote {}", out.display());
        }
        Command::Segment {
            model,
            inputs,
            out,
            overlap,
            blend,
            sw_batch,
            tta,
            no_mirror,
            resample,
            precision,
            device,
            threads,
            shard,
            overwrite,
            no_manifest,
            json,
            largest_component,
            max_gpu_accumulator_mb,
            save_preprocessed,
            no_fused_norm,
            series,
            output_type,
        } => {
            if save_preprocessed.is_some() && inputs.len() != 1 {
                return Err(Failure::Usage(
                    "--save-preprocessed takes a single input".into(),
                ));
            }
            let (index, count) = match shard.as_deref() {
                None => (0, 1),
                Some(s) => parse_shard(s).map_err(Failure::Usage)?,
            };
            let volume_ext = |p: &std::path::Path| {
                let n = p.to_string_lossy().to_lowercase();
                VOLUME_ENDINGS.iter().any(|e| n.ends_with(e))
            };
            let single_file = inputs.len() == 1 && volume_ext(&out) && !out.is_dir();
            if !single_file {
                std::fs::create_dir_all(&out)
                    .map_err(|e| Failure::Usage(format!("{}: {e}", out.display())))?;
            }
            let mut engine = serde_json::json!({ "device": device });
            if let Some(t) = threads {
                engine["threads"] = t.into();
            }
            let loaded = plugin.load_model(&model, &engine.to_string())?;
            let mut options = serde_json::json!({
                "overlap": overlap, "blend": blend, "sw_batch": sw_batch, "resample": resample,
                "precision": precision, "manifest": !no_manifest, "largest_component": largest_component,
                "max_gpu_accumulator_mb": max_gpu_accumulator_mb, "fused_norm": !no_fused_norm,
            });
            if tta {
                options["tta_axes"] = serde_json::json!([0, 1, 2]);
            }
            if no_mirror {
                options["mirror"] = false.into();
            }
            if let Some(p) = &save_preprocessed {
                options["save_preprocessed"] = serde_json::json!(p);
            }
            if let Some(uid) = &series {
                options["series"] = serde_json::json!(uid);
            }
            let mine: Vec<&PathBuf> = inputs
                .iter()
                .enumerate()
                .filter(|(i, _)| i % count == index)
                .map(|(_, p)| p)
                .collect();
            let total = mine.len();
            for (n, input) in mine.into_iter().enumerate() {
                let target = if single_file {
                    out.clone()
                } else {
                    out.join(output_name(input, &output_type))
                };
                if target.exists() && !overwrite {
                    report_skip(json, input, &target);
                    continue;
                }
                let bar =
                    progress::Bar::new(json, format!("[{}/{total}] {}", n + 1, input.display()));
                loaded
                    .segment_file(input, &target, &options.to_string(), &mut |e| bar.update(e))?;
                bar.finish(&target);
            }
        }
        Command::Render {
            image,
            labels,
            reference,
            model,
            curves,
            window,
            out,
        } => {
            match (curves, image) {
                (Some(m), _) => {
                    let info: serde_json::Value =
                        serde_json::from_str(&plugin.model_info(&m)?).unwrap_or_default();
                    render::curves(&history_of(&info), &out).map_err(Failure::Usage)?;
                }
                (None, Some(image)) => {
                    render_overlays(&plugin, &image, labels, reference, model, window, &out)?
                }
                (None, None) => return Err(Failure::Usage("--image or --curves is needed".into())),
            }
            eprintln!("wrote {}", out.display());
        }
        Command::InitTrain { common } => train(&plugin, false, &common, None)?,
        Command::FineTune { common, init, .. } => train(&plugin, true, &common, init.as_ref())?,
        Command::Evaluate {
            pred,
            reference,
            labels,
            json,
        } => {
            let options = serde_json::json!({ "labels": labels });
            let text = plugin.evaluate(&pred, &reference, &options.to_string())?;
            let report: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            print_evaluation(&report);
            if let Some(path) = json {
                std::fs::write(
                    &path,
                    serde_json::to_string_pretty(&report).unwrap_or_default(),
                )
                .map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))?;
            }
        }
        Command::Forward {
            model,
            input,
            out,
            device,
        } => {
            let engine = serde_json::json!({ "device": device }).to_string();
            plugin.load_model(&model, &engine)?.forward(&input, &out)?;
            eprintln!("wrote {}", out.display());
        }
        Command::Phantom {
            out,
            cases,
            seed,
            size,
            spacing,
        } => {
            let mut opts = serde_json::json!({ "cases": cases, "seed": seed });
            if let Some(s) = size {
                opts["size"] = serde_json::json!(s);
            }
            if let Some(s) = spacing {
                opts["spacing"] = serde_json::json!(s);
            }
            plugin.phantom(&out, &opts.to_string())?;
            eprintln!(
                "wrote {cases} phantom cases and {}",
                out.join("dataset.json").display()
            );
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
