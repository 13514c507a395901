//! `lwi segment`: volumes through one model, each label map on its input's own grid; a batch
//! can be split over array jobs (`--shard`), and a rerun skips what exists.

use crate::files::{VOLUME_ENDINGS, is_dicom_path};
use crate::plugin::Plugin;
use crate::{Failure, progress};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct SegmentArgs {
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
    /// Mirroring (test-time augmentation): each window averaged over the 8 flips of x, y and z
    /// (the default of nnU-Net's pipeline, UNETR++ models; `--tta` is its former name).
    #[arg(long, visible_alias = "tta", conflicts_with = "no_mirror")]
    mirror: bool,
    /// One pass per window, no mirroring (the default of MONAI's pipeline, UNETR models).
    #[arg(long)]
    no_mirror: bool,
    /// Resampling back to the input grid: class probabilities (keeps thin structures) or nearest labels.
    #[arg(long, default_value = "scores", value_parser = ["scores", "nearest"])]
    resample: String,
    /// fp32; bf16 autocast on CUDA, or on a CPU with AVX512-BF16 or AMX-BF16 (refused on one
    /// without: `lwi info` says what it has); fp16 (CUDA only); auto: bf16 where the device has it
    /// natively, else fp32.
    #[arg(long, default_value = "fp32", value_parser = ["fp32", "bf16", "fp16", "auto"])]
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
}

pub fn run(plugin: &Plugin, a: SegmentArgs) -> Result<(), Failure> {
    if a.save_preprocessed.is_some() && a.inputs.len() != 1 {
        return Err(Failure::Usage(
            "--save-preprocessed takes a single input".into(),
        ));
    }
    let (index, count) = match a.shard.as_deref() {
        None => (0, 1),
        Some(s) => parse_shard(s).map_err(Failure::Usage)?,
    };
    let volume_ext = |p: &Path| {
        let n = p.to_string_lossy().to_lowercase();
        VOLUME_ENDINGS.iter().any(|e| n.ends_with(e))
    };
    let single_file = a.inputs.len() == 1 && volume_ext(&a.out) && !a.out.is_dir();
    if !single_file {
        std::fs::create_dir_all(&a.out)
            .map_err(|e| Failure::Io(format!("{}: {e}", a.out.display())))?;
    }
    let mut engine = serde_json::json!({ "device": a.device });
    if let Some(t) = a.threads {
        engine["threads"] = t.into();
    }
    let loaded = plugin.load_model(&a.model, &engine.to_string())?;
    let options = options_json(&a).to_string();
    let mine: Vec<&PathBuf> = a
        .inputs
        .iter()
        .enumerate()
        .filter(|(i, _)| i % count == index)
        .map(|(_, p)| p)
        .collect();
    let total = mine.len();
    for (n, input) in mine.into_iter().enumerate() {
        let target = if single_file {
            a.out.clone()
        } else {
            a.out.join(output_name(input, &a.output_type))
        };
        if target.exists() && !a.overwrite {
            report_skip(a.json, input, &target);
            continue;
        }
        let bar = progress::Bar::new(a.json, format!("[{}/{total}] {}", n + 1, input.display()));
        loaded.segment_file(input, &target, &options, &mut |e| bar.update(e))?;
        bar.finish(&target);
    }
    Ok(())
}

/// The options of `lwi_segment_file` the flags ask for.
fn options_json(a: &SegmentArgs) -> serde_json::Value {
    let mut options = serde_json::json!({
        "overlap": a.overlap, "blend": a.blend, "sw_batch": a.sw_batch, "resample": a.resample,
        "precision": a.precision, "manifest": !a.no_manifest, "largest_component": a.largest_component,
        "max_gpu_accumulator_mb": a.max_gpu_accumulator_mb, "fused_norm": !a.no_fused_norm,
    });
    // Absent unless asked for: each pipeline has its own default.
    if a.mirror || a.no_mirror {
        options["mirror"] = a.mirror.into();
    }
    if let Some(p) = &a.save_preprocessed {
        options["save_preprocessed"] = serde_json::json!(p);
    }
    if let Some(uid) = &a.series {
        options["series"] = serde_json::json!(uid);
    }
    options
}

/// The output name for `input` in an output folder: its file name with the extension of
/// `output_type` (a DICOM folder's name gets one; `auto` keeps a volume file's own).
fn output_name(input: &Path, output_type: &str) -> PathBuf {
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
fn report_skip(json: bool, input: &Path, output: &Path) {
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
