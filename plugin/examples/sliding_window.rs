//! Times sliding-window inference alone (no file, no preprocessing) for the benchmarks in bench/:
//! the full UNETR over a volume already on the device, roi 96³, overlap 0.5, Gaussian blending,
//! `BATCH` windows per forward pass, as MONAI's `sliding_window_inference` does it
//! (bench/monai_sliding_window.py). Usage: sliding_window DEVICE BATCH PRECISION REPS [SIZE [FEATURE
//! HIDDEN MLP HEADS]]; the volume is 273×273×250 (the CT-sized phantom on the 1.5×1.5×2 mm grid)
//! unless `LWI_BENCH_VOLUME=X,Y,Z` says otherwise.
//! Prints one JSON line: {"median_ms", "min_ms", "windows", ...}.

mod common;

use lwi::model::fused::with_fused;
use lwi::model::{Unetr, with_precision};
use lwi::pipeline::window::{Blend, Rules, WindowOptions, infer};
use tch::{Kind, Tensor, nn};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = common::args()?;
    let size: Vec<i64> = std::env::var("LWI_BENCH_VOLUME")
        .unwrap_or_else(|_| "273,273,250".into())
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    tch::manual_seed(0);
    let vs = nn::VarStore::new(a.device);
    let cfg = &a.cfg;
    let net = Unetr::new(&vs.root(), cfg)?;
    let image = Tensor::rand([1, size[0], size[1], size[2]], (Kind::Float, a.device));
    let opts = WindowOptions {
        roi: cfg.img_size,
        rules: Rules::Monai,
        overlap: 0.5,
        blend: Blend::Gaussian,
        batch: a.batch,
        fill_last_batch: a.device.is_cuda(),
    };
    let windows = std::cell::Cell::new(0);
    let times = common::time(&a, || {
        windows.set(0);
        let predict = |batch: &Tensor| {
            windows.set(windows.get() + batch.size()[0]);
            with_precision(a.precision, a.device, || {
                with_fused(a.fused, || tch::no_grad(|| net.forward_t(batch, false)))
            })
        };
        let classes = cfg.out_channels;
        let _out = infer(
            &image,
            &opts,
            classes,
            None,
            &predict,
            &mut lwi::events::Silent,
        )?;
        Ok(())
    })?;
    common::report(
        &a,
        &times,
        serde_json::json!({"windows": windows.get(), "size": size}),
    );
    Ok(())
}
