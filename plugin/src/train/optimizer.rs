//! The optimizers: AdamW (the monai recipe) and SGD with Nesterov momentum (nnU-Net's), and
//! gradient-norm clipping.

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
        let (names, params) = trainable(vs);
        let m = params.iter().map(Tensor::zeros_like).collect();
        let v = params.iter().map(Tensor::zeros_like).collect();
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

/// `torch.optim.SGD(momentum, nesterov, weight_decay)` with dampening 0: g ← g + wd·p;
/// b ← μ·b + g; p ← p − lr·(g + μ·b) with Nesterov, p − lr·b without. The momentum buffers start
/// at zero, which equals torch's first-step copy of g.
pub struct Sgd {
    names: Vec<String>,
    params: Vec<Tensor>,
    momentum_buffers: Vec<Tensor>,
    momentum: f64,
    nesterov: bool,
    weight_decay: f64,
}

impl Sgd {
    pub fn new(vs: &tch::nn::VarStore, momentum: f64, nesterov: bool, weight_decay: f64) -> Sgd {
        let (names, params) = trainable(vs);
        let momentum_buffers = params.iter().map(Tensor::zeros_like).collect();
        Sgd {
            names,
            params,
            momentum_buffers,
            momentum,
            nesterov,
            weight_decay,
        }
    }

    pub fn step(&mut self, lr: f64) {
        tch::no_grad(|| {
            for (p, b) in self.params.iter_mut().zip(&mut self.momentum_buffers) {
                let g = p.grad();
                if !g.defined() {
                    continue; // torch skips a parameter without a gradient, decay included
                }
                let g = &g + &*p * self.weight_decay;
                let _ = b.g_mul_scalar_(self.momentum).g_add_(&g);
                let update = if self.nesterov {
                    g + &*b * self.momentum
                } else {
                    b.shallow_clone()
                };
                let _ = p.g_sub_(&(update * lr));
            }
        });
    }
}

/// The trainable variables in name order.
fn trainable(vs: &tch::nn::VarStore) -> (Vec<String>, Vec<Tensor>) {
    let mut vars: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars.into_iter().unzip()
}

/// The optimizer a recipe names, with its state as named tensors for checkpoints.
pub enum Optimizer {
    AdamW(AdamW),
    Sgd(Sgd),
}

impl Optimizer {
    pub fn params(&self) -> &[Tensor] {
        match self {
            Optimizer::AdamW(o) => &o.params,
            Optimizer::Sgd(o) => &o.params,
        }
    }

    pub fn zero_grad(&mut self) {
        for p in self.params() {
            p.shallow_clone().zero_grad();
        }
    }

    pub fn step(&mut self, lr: f64) {
        match self {
            Optimizer::AdamW(o) => o.step(lr),
            Optimizer::Sgd(o) => o.step(lr),
        }
    }

    /// Steps taken (AdamW's bias correction needs it).
    pub fn steps(&self) -> u64 {
        match self {
            Optimizer::AdamW(o) => o.step,
            Optimizer::Sgd(_) => 0,
        }
    }

    /// The state tensors by checkpoint name.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        match self {
            Optimizer::AdamW(o) => {
                for (i, name) in o.names.iter().enumerate() {
                    out.push((format!("adam_m.{name}"), o.m[i].shallow_clone()));
                    out.push((format!("adam_v.{name}"), o.v[i].shallow_clone()));
                }
            }
            Optimizer::Sgd(o) => {
                for (name, b) in o.names.iter().zip(&o.momentum_buffers) {
                    out.push((format!("sgd_momentum.{name}"), b.shallow_clone()));
                }
            }
        }
        out
    }

    /// Restores [`Optimizer::state`] and the step count; a tensor the checkpoint lacks stays zero.
    pub fn load_state(&mut self, tensors: &std::collections::HashMap<String, Tensor>, steps: u64) {
        let state = self.state();
        tch::no_grad(|| {
            for (name, mut t) in state {
                if let Some(saved) = tensors.get(&name) {
                    t.copy_(saved);
                }
            }
        });
        if let Optimizer::AdamW(o) = self {
            o.step = steps;
        }
    }
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)`: every gradient scaled by
/// min(1, max_norm / (‖g‖₂ + 1e-6)), ‖g‖₂ over all of them together. Returns ‖g‖₂.
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> f64 {
    let grads: Vec<Tensor> = params
        .iter()
        .map(Tensor::grad)
        .filter(Tensor::defined)
        .collect();
    if grads.is_empty() {
        return 0.0;
    }
    tch::no_grad(|| {
        let norms: Vec<Tensor> = grads
            .iter()
            .map(|g| g.norm_scalaropt_dim(2, [0i64; 0].as_slice(), false))
            .collect();
        let total = Tensor::stack(&norms, 0).norm();
        let coef = (max_norm / (total.shallow_clone() + 1e-6)).clamp_max(1.0);
        for g in &grads {
            let _ = g.shallow_clone().g_mul_(&coef);
        }
        total.double_value(&[])
    })
}
