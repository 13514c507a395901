//! `lwi render`: PNGs of a volume with its label maps, or of a model's training curves.

use crate::files::write_whole;
use crate::numbers;
use crate::plugin::Plugin;
use crate::{Failure, render};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct RenderArgs {
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
}

pub fn run(plugin: &Plugin, a: RenderArgs) -> Result<(), Failure> {
    match (a.curves, a.image) {
        (Some(m), _) => {
            let info: serde_json::Value =
                serde_json::from_str(&plugin.model_info(&m)?).unwrap_or_default();
            let png = render::curves(&history_of(&info)).map_err(Failure::Usage)?;
            write_whole(&a.out, &png)?;
        }
        (None, Some(image)) => overlays(
            plugin,
            &image,
            a.labels,
            a.reference,
            a.model,
            a.window,
            &a.out,
        )?,
        (None, None) => return Err(Failure::Usage("--image or --curves is needed".into())),
    }
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

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
fn overlays(
    plugin: &Plugin,
    image: &Path,
    labels: Option<PathBuf>,
    reference: Option<PathBuf>,
    model: Option<PathBuf>,
    window: [f32; 2],
    out: &Path,
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
    write_whole(out, &render::overlays(&grid, &rows, &names, window))
}
