//! The learning-rate schedules: warmup-cosine (the monai recipe) and poly (nnU-Net's).

use super::{ScheduleKind, TrainConfig};
use crate::model_file::Stage;

/// The learning rate of (0-based) `epoch` of `stage`, as the config's schedule gives it.
pub fn rate(cfg: &TrainConfig, stage: Stage, epoch: u64) -> f64 {
    let base = cfg.learning_rate(stage);
    match cfg.schedule {
        ScheduleKind::WarmupCosine => learning_rate(
            base,
            cfg.warmup_epochs,
            cfg.epochs,
            epoch / cfg.sched_step_every,
        ),
        ScheduleKind::Poly => poly(base, epoch, cfg.epochs, cfg.poly_exponent),
    }
}

/// Linear warmup then cosine annealing to 0 (LinearWarmupCosineAnnealingLR, warmup from 0),
/// after `steps` scheduler steps.
pub fn learning_rate(base: f64, warmup: u64, max: u64, steps: u64) -> f64 {
    if steps < warmup {
        if warmup <= 1 {
            base
        } else {
            base * steps as f64 / (warmup - 1) as f64
        }
    } else if max <= warmup {
        base
    } else {
        0.5 * base
            * (1.0 + (std::f64::consts::PI * (steps - warmup) as f64 / (max - warmup) as f64).cos())
    }
}

/// nnU-Net's `poly_lr`: the rate of (0-based) `epoch` out of `max`, base · (1 − epoch/max)^exponent.
pub fn poly(base: f64, epoch: u64, max: u64, exponent: f64) -> f64 {
    base * (1.0 - epoch as f64 / max as f64).powf(exponent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_matches_linear_warmup_cosine_annealing() {
        // warmup 50 over max 800 as LinearWarmupCosineAnnealingLR(warmup_start_lr=0, eta_min=0)
        assert_eq!(learning_rate(1e-4, 50, 800, 0), 0.0);
        assert!((learning_rate(1e-4, 50, 800, 49) - 1e-4).abs() < 1e-18);
        assert!((learning_rate(1e-4, 50, 800, 10) - 1e-4 * 10.0 / 49.0).abs() < 1e-18);
        assert!((learning_rate(1e-4, 50, 800, 50) - 1e-4).abs() < 1e-18);
        assert!((learning_rate(1e-4, 50, 800, 425) - 0.5e-4).abs() < 1e-12);
        // the released code's step-every-100 in stage 1: epoch 150 has seen one step
        assert!((learning_rate(1e-4, 50, 800, 150 / 100) - 1e-4 / 49.0).abs() < 1e-18);
    }
}
