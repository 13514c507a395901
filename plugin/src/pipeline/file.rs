//! A file in, a label file out: the DICOM SEG choice, the manifest and its stage timings.

use super::options::SegmentOptions;
use super::segment;
use crate::error::{Error, Result};
use crate::events::{Event, Progress};
use crate::model_file::Model;

/// Passes events on and notes when each stage boundary of `run` was reached, for the manifest's
/// timings: preprocessing ends at "preprocess 1/1", inference at "resample 0/1", resampling back
/// at "resample 1/1"; what follows (connected components, the label tensor) is postprocessing.
struct StageClock<'a> {
    inner: &'a mut dyn Progress,
    start: std::time::Instant,
    marks: Vec<(&'static str, f64)>,
}

impl Progress for StageClock<'_> {
    fn report(&mut self, e: &Event) -> bool {
        let name = match (e.stage, e.done, e.total) {
            ("preprocess", 1, 1) => Some("preprocess"),
            ("resample", 0, 1) => Some("infer"),
            ("resample", 1, 1) => Some("resample"),
            _ => None,
        };
        if let Some(name) = name {
            self.marks.push((name, self.start.elapsed().as_secs_f64()));
        }
        self.inner.report(e)
    }
}

impl StageClock<'_> {
    /// Seconds spent in each stage, given the total.
    fn stages(&self, total: f64) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        let mut last = 0.0;
        for &(name, t) in &self.marks {
            out.insert(name.into(), (t - last).into());
            last = t;
        }
        out.insert("postprocess".into(), (total - last).into());
        serde_json::Value::Object(out)
    }
}

/// Reads `input`, segments it, writes the label map to `output` (format by extension) and, unless
/// `opts.manifest` is false, `OUTPUT.json` beside it: lwi version, model hash, device, precision,
/// options and timings. Returns the manifest. Every file it writes (the preprocessed volume
/// included) appears at the end together, or, when it fails or is cancelled, none does.
pub fn segment_file(
    model: &Model,
    input: &std::path::Path,
    output: &std::path::Path,
    opts: &SegmentOptions,
    progress: &mut dyn Progress,
) -> Result<serde_json::Value> {
    crate::io::all_or_nothing(|| segment_file_staged(model, input, output, opts, progress))
}

fn segment_file_staged(
    model: &Model,
    input: &std::path::Path,
    output: &std::path::Path,
    opts: &SegmentOptions,
    progress: &mut dyn Progress,
) -> Result<serde_json::Value> {
    let t0 = std::time::Instant::now();
    let dicom_seg = crate::io::dicom_seg::is_seg_path(output);
    let (volume, source) = if dicom_seg {
        if !crate::io::dicom::is_dicom(input) {
            return Err(Error::invalid(format!(
                "{}: a DICOM SEG output needs DICOM input (it references the source images); {} is not DICOM",
                output.display(),
                input.display()
            )));
        }
        let series = crate::io::dicom::read(input, opts.series.as_deref())?;
        (series.volume, Some(series.source))
    } else {
        (
            crate::io::read_volume_series(input, opts.series.as_deref())?,
            None,
        )
    };
    let t1 = std::time::Instant::now();
    let mut clock = StageClock {
        inner: progress,
        start: t1,
        marks: Vec::new(),
    };
    let labels = segment(model, &volume, opts, &mut clock)?;
    let t2 = std::time::Instant::now();
    match &source {
        Some(source) => crate::io::dicom_seg::write(&labels, source, &model.meta.labels, output)?,
        None => crate::io::write_labels(&labels, &model.meta.labels, output)?,
    }
    let t3 = std::time::Instant::now();
    let doc = serde_json::json!({
        "lwi_version": env!("CARGO_PKG_VERSION"),
        "input": input.display().to_string(),
        "output": output.display().to_string(),
        "model_sha256": model.file_sha256,
        "model_stage": model.meta.stage,
        "arch": model.meta.arch.name(),
        "pipeline": model.meta.preprocessing.pipeline(),
        "labels": model.meta.labels,
        "device": crate::engine::device_name(model.vs.device()),
        "precision": opts.precision.on(model.vs.device()),
        "options": opts,
        "timings_s": {"read": (t1 - t0).as_secs_f64(), "segment": (t2 - t1).as_secs_f64(), "write": (t3 - t2).as_secs_f64(),
            "segment_stages": clock.stages((t2 - t1).as_secs_f64())},
    });
    if opts.manifest {
        let mut name = output.as_os_str().to_owned();
        name.push(".json");
        let text =
            serde_json::to_string_pretty(&doc).map_err(|e| Error::internal(e.to_string()))?;
        crate::io::write_atomically(std::path::Path::new(&name), text.as_bytes())?;
    }
    Ok(doc)
}
