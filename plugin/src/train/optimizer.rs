//! The optimizer.

use tch::Tensor;

/// AdamW exactly as `torch.optim.AdamW` (betas 0.9/0.999, eps 1e-8, decoupled weight decay), with
/// its state in plain tensors so checkpoints hold it. Public for the training-step benchmark.
pub struct AdamW {
    pub(super) names: Vec<String>,
    pub(super) params: Vec<Tensor>,
    pub(super) m: Vec<Tensor>,
    pub(super) v: Vec<Tensor>,
    pub(super) step: u64,
    weight_decay: f64,
}

impl AdamW {
    pub fn new(vs: &tch::nn::VarStore, weight_decay: f64) -> AdamW {
        let mut vars: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let m = vars.iter().map(|(_, t)| t.zeros_like()).collect();
        let v = vars.iter().map(|(_, t)| t.zeros_like()).collect();
        let (names, params) = vars.into_iter().unzip();
        AdamW {
            names,
            params,
            m,
            v,
            step: 0,
            weight_decay,
        }
    }

    /// The parameters it updates, in its (name) order: what a gradient reduction works on.
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.zero_grad();
        }
    }

    pub fn step(&mut self, lr: f64) {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
        self.step += 1;
        let t = self.step as i32;
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        tch::no_grad(|| {
            for ((p, m), v) in self.params.iter_mut().zip(&mut self.m).zip(&mut self.v) {
                let g = p.grad();
                if !g.defined() {
                    continue; // a parameter the loss does not reach
                }
                let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
                let _ = m.g_mul_scalar_(b1).g_add_(&(&g * (1.0 - b1)));
                let _ = v.g_mul_scalar_(b2).g_add_(&(g.square() * (1.0 - b2)));
                let denom = v.sqrt() / c2.sqrt() + eps;
                let _ = p.g_sub_(&(m.shallow_clone() / denom * (lr / c1)));
            }
        });
    }
}
