//! The short commands: `lwi import`, `convert`, `forward` and `phantom`.

use crate::Failure;
use crate::files::read_json;
use crate::numbers;
use crate::plugin::Plugin;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ImportArgs {
    /// The checkpoint: a state dict, or a dict holding one under "state_dict"
    /// (MONAI 1.6.1 or LWI-VMS key names; nnU-Net v1's model_final_checkpoint.model).
    #[arg(long = "from", value_name = "CKPT.pt")]
    from: PathBuf,
    /// Architecture of the checkpoint, by the name the engine knows it (unetr, unetr_pp;
    /// default: the "arch" of ARCH.json, else the engine's default, unetr).
    #[arg(long)]
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
}

/// A PyTorch checkpoint into a model file; the architecture from `--arch`, else ARCH.json's "arch".
pub fn import(plugin: &Plugin, a: ImportArgs) -> Result<(), Failure> {
    let mut config = read_json(&a.arch_config)?;
    let named = config.as_object_mut().and_then(|o| o.remove("arch"));
    let mut options = serde_json::json!({
        "arch_config": config,
        "labels": read_json(&a.labels)?,
        "spacing": a.spacing,
        "window": a.window,
        "ct_normalization": a.ct_norm,
        "plans": a.plans,
    });
    if let Some(arch) = a.arch.map(serde_json::Value::from).or(named) {
        options["arch"] = arch;
    }
    plugin.import(&a.from, &options.to_string(), &a.out)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

/// INPUT OUTPUT, or several DICOM files then OUTPUT.
pub fn convert(
    plugin: &Plugin,
    mut paths: Vec<PathBuf>,
    series: Option<String>,
) -> Result<(), Failure> {
    let output = paths.pop().unwrap_or_default();
    match (paths.as_slice(), series) {
        ([input], None) => plugin.convert(input, &output)?,
        (inputs, uid) => plugin.convert_dicom(inputs, uid.as_deref().unwrap_or(""), &output)?,
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct ForwardArgs {
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
}

pub fn forward(plugin: &Plugin, a: ForwardArgs) -> Result<(), Failure> {
    let engine = serde_json::json!({ "device": a.device }).to_string();
    plugin
        .load_model(&a.model, &engine)?
        .forward(&a.input, &a.out)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

#[derive(clap::Args)]
pub struct PhantomArgs {
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
}

pub fn phantom(plugin: &Plugin, a: PhantomArgs) -> Result<(), Failure> {
    let mut opts = serde_json::json!({ "cases": a.cases, "seed": a.seed });
    if let Some(s) = a.size {
        opts["size"] = serde_json::json!(s);
    }
    if let Some(s) = a.spacing {
        opts["spacing"] = serde_json::json!(s);
    }
    plugin.phantom(&a.out, &opts.to_string())?;
    eprintln!(
        "wrote {} phantom cases and {}",
        a.cases,
        a.out.join("dataset.json").display()
    );
    Ok(())
}
