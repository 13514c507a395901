//! What the benchmark programs share: their command line, CUDA synchronisation around the timed
//! work, warm-up, and the JSON line bench/run.py reads.
// Each benchmark program uses part of it.
#![allow(dead_code)]

use lwi::model::unetr_pp::UnetrPpConfig;
use lwi::model::{Precision, UnetrConfig};
use tch::Device;

/// `DEVICE BATCH PRECISION REPS [SIZE [FEATURE HIDDEN MLP HEADS]]`; the model shape defaults to the
/// full UNETR at 96³. `LWI_BENCH_FUSED=0` in the environment turns the fused CUDA normalisation
/// kernel off (inference), to time ATen's kernels instead.
pub struct Args {
    pub device: Device,
    pub batch: i64,
    pub precision: Precision,
    pub precision_name: String,
    pub reps: usize,
    pub cfg: UnetrConfig,
    pub fused: bool,
}

pub fn args() -> Result<Args, Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, default: String| args.get(i).cloned().unwrap_or(default);
    let default = UnetrConfig::default();
    let num = |i: usize, d: i64| arg(i, d.to_string()).parse::<i64>();
    let device = lwi::engine::parse_device(&arg(1, "cpu".into()))?;
    let precision_name = arg(3, "fp32".into());
    let size = num(5, 96)?;
    let cfg = UnetrConfig {
        img_size: [size; 3],
        feature_size: num(6, default.feature_size)?,
        hidden_size: num(7, default.hidden_size)?,
        mlp_dim: num(8, default.mlp_dim)?,
        num_heads: num(9, default.num_heads)?,
        ..default
    };
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(true);
    }
    Ok(Args {
        device,
        batch: num(2, 1)?,
        precision: serde_json::from_str(&format!("\"{precision_name}\""))?,
        precision_name,
        reps: arg(4, "5".into()).parse()?,
        cfg,
        fused: std::env::var("LWI_BENCH_FUSED").map_or(true, |v| v != "0"),
    })
}

/// The UNETR++ of the arguments after REPS, `FEATURE D1 D2 D3 D4` (the Synapse model, feature 16
/// and depths 3 3 3 3, unless given), on patches of `LWI_BENCH_PATCH=D,H,W` (64,128,128 unless set).
pub fn unetr_pp_config() -> Result<UnetrPpConfig, Box<dyn std::error::Error>> {
    let args: Vec<i64> = std::env::args()
        .skip(5)
        .map(|v| v.parse())
        .collect::<Result<_, _>>()?;
    let f = args.first().copied().unwrap_or(16);
    let mut cfg = UnetrPpConfig {
        feature_size: f,
        hidden_size: 16 * f,
        dims: [2 * f, 4 * f, 8 * f, 16 * f],
        depths: args.get(1..5).map_or([3; 4], |d| [d[0], d[1], d[2], d[3]]),
        ..Default::default()
    };
    if let Ok(patch) = std::env::var("LWI_BENCH_PATCH") {
        let p: Vec<i64> = patch.split(',').map(str::parse).collect::<Result<_, _>>()?;
        cfg.img_size = p
            .try_into()
            .map_err(|p| format!("LWI_BENCH_PATCH: three sizes, not {p:?}"))?;
    }
    Ok(cfg)
}

/// Runs `work` twice to warm up, then `reps` times, each timed between CUDA synchronisations;
/// returns the times in ms, sorted.
pub fn time(
    a: &Args,
    mut work: impl FnMut() -> Result<(), Box<dyn std::error::Error>>,
) -> Result<Vec<f64>, Box<dyn std::error::Error>> {
    let sync = || {
        if let Device::Cuda(i) = a.device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let mut times = Vec::new();
    for i in 0..a.reps + 2 {
        sync();
        let t = std::time::Instant::now();
        work()?;
        sync();
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

/// Prints the JSON line: median and minimum, the run's settings, and `extra` fields.
pub fn report(a: &Args, times: &[f64], extra: serde_json::Value) {
    let mut doc = serde_json::json!({"median_ms": times[times.len() / 2], "min_ms": times[0],
        "batch": a.batch, "device": format!("{:?}", a.device), "precision": a.precision_name,
        "fused": a.fused, "fused_calls": lwi::model::fused::calls(),
        "fused_failure": lwi::model::fused::last_failure()});
    if let (Some(d), serde_json::Value::Object(e)) = (doc.as_object_mut(), extra) {
        d.extend(e);
    }
    println!("{doc}");
}

/// What a UNETR training-step benchmark trains: the seeded network, AdamW, a random batch and its
/// labels.
pub struct TrainingStep {
    pub vs: tch::nn::VarStore,
    pub net: lwi::model::Unetr,
    pub opt: lwi::train::AdamW,
    pub input: tch::Tensor,
    pub labels: tch::Tensor,
}

pub fn training_step(a: &Args) -> Result<TrainingStep, Box<dyn std::error::Error>> {
    use tch::{Kind, Tensor};
    tch::manual_seed(0);
    let vs = tch::nn::VarStore::new(a.device);
    let net = lwi::model::Unetr::new(&vs.root(), &a.cfg)?;
    let opt = lwi::train::AdamW::new(&vs, 1e-5);
    let [x, y, z] = a.cfg.img_size;
    let input = Tensor::randn([a.batch, 1, x, y, z], (Kind::Float, a.device));
    let labels = Tensor::randint(
        a.cfg.out_channels,
        [a.batch, 1, x, y, z],
        (Kind::Int64, a.device),
    );
    Ok(TrainingStep {
        vs,
        net,
        opt,
        input,
        labels,
    })
}
