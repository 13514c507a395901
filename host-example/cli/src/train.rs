//! `lwi init-train` and `lwi fine-tune`: the flags merged into the training configuration, and
//! a progress display.

use crate::files::read_json;
use crate::plugin::Plugin;
use crate::{Failure, progress};
use std::path::PathBuf;

/// Flags shared by init-train and fine-tune; anything else goes in `--config C.json`
/// (docs/training.md), which the flags override.
#[derive(clap::Args)]
pub struct TrainArgs {
    /// dataset.json (MSD / nnU-Net) or a MONAI datalist.
    #[arg(long)]
    dataset: PathBuf,
    /// Architecture config: the upstream keyword arguments plus "arch" ("unetr", the default, or "unetr_pp"; out_channels is decided by the stage). fine-tune --init: absent means the init model's architecture; given, it must be that one.
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

/// Runs a training stage with a progress display.
pub fn run(
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
