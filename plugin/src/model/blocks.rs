//! The building blocks of MONAI's UNETR, one struct each, with MONAI's parameter names and
//! initialisation (PyTorch defaults, plus truncated normals where MONAI asks for them).

use super::fused::Skip;
use tch::{Tensor, nn};

/// PyTorch's default init for Linear/Conv weights and biases: U(±1/√fan_in)
/// (kaiming_uniform with a = √5 gives exactly this bound).
pub(crate) fn default_uniform(p: &nn::Path, name: &str, dims: &[i64], fan_in: i64) -> Tensor {
    let bound = 1.0 / (fan_in as f64).sqrt();
    p.var(
        name,
        dims,
        nn::Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )
}

/// `trunc_normal_(mean 0, std, a = -2, b = 2)` as PyTorch draws it: uniform on the normal's CDF
/// between the bounds, mapped back through erfinv, then clamped.
pub(crate) fn trunc_normal(p: &nn::Path, name: &str, dims: &[i64], std: f64) -> Tensor {
    let t = p.zeros(name, dims);
    let cdf = |x: f64| (1.0 + erf(x / std::f64::consts::SQRT_2)) / 2.0;
    let (l, u) = (cdf(-2.0 / std), cdf(2.0 / std));
    tch::no_grad(|| {
        let draw = Tensor::empty(dims, (tch::Kind::Float, t.device()))
            .uniform_(2.0 * l - 1.0, 2.0 * u - 1.0)
            .erfinv_()
            .g_mul_scalar_(std * std::f64::consts::SQRT_2)
            .clamp_(-2.0, 2.0);
        let mut t = t.shallow_clone();
        t.copy_(&draw);
    });
    t
}

/// The error function (Rust's std has none; libtorch's is exact to double precision).
fn erf(x: f64) -> f64 {
    Tensor::from(x).erf().double_value(&[])
}

/// `nn.Linear` with PyTorch's default init, or MONAI's truncated normal (bias 0).
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(p: &nn::Path, inp: i64, out: i64, bias: bool) -> Self {
        Linear {
            weight: default_uniform(p, "weight", &[out, inp], inp),
            bias: bias.then(|| default_uniform(p, "bias", &[out], inp)),
        }
    }
    /// MONAI's `PatchEmbeddingBlock._init_weights`: trunc_normal(std 0.02) weights, zero bias.
    pub fn new_trunc_normal(p: &nn::Path, inp: i64, out: i64) -> Self {
        Linear {
            weight: trunc_normal(p, "weight", &[out, inp], 0.02),
            bias: Some(p.zeros("bias", &[out])),
        }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// `nn.LayerNorm(hidden)`, eps 1e-5, weight 1 and bias 0 at init.
#[derive(Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    pub fn new(p: &nn::Path, size: i64) -> Self {
        LayerNorm {
            weight: p.ones("weight", &[size]),
            bias: p.zeros("bias", &[size]),
        }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let n = self.weight.size()[0];
        x.layer_norm([n], Some(&self.weight), Some(&self.bias), 1e-5, true)
    }
}

/// A 3-D convolution (MONAI's `Convolution`, whose parameters live under `.conv`), plain or
/// transposed. Bias-free except the output block, as MONAI builds them.
#[derive(Debug)]
pub struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: [i64; 3],
    padding: [i64; 3],
    transposed: bool,
}

impl Conv {
    /// Conv3d(k, stride, padding = (k - stride + 1) / 2) as MONAI's `get_padding`.
    pub fn new(p: &nn::Path, inp: i64, out: i64, k: i64, stride: i64, bias: bool) -> Self {
        Self::bare(&(p / "conv"), inp, out, [k; 3], [stride; 3], bias)
    }
    /// A Conv3d whose weight and bias sit at `p` itself (`nn.Conv3d` inside a `Sequential`), with a
    /// kernel and stride per axis.
    pub fn bare(
        p: &nn::Path,
        inp: i64,
        out: i64,
        k: [i64; 3],
        stride: [i64; 3],
        bias: bool,
    ) -> Self {
        let fan_in = inp * k.iter().product::<i64>();
        Conv {
            weight: default_uniform(p, "weight", &[out, inp, k[0], k[1], k[2]], fan_in),
            bias: bias.then(|| default_uniform(p, "bias", &[out], fan_in)),
            stride,
            padding: std::array::from_fn(|d| (k[d] - stride[d] + 1) / 2),
            transposed: false,
        }
    }
    /// ConvTranspose3d(k = stride, padding 0): doubles (for k = 2) each spatial size.
    pub fn transposed(p: &nn::Path, inp: i64, out: i64, k: i64) -> Self {
        Self::transposed_by(p, inp, out, [k; 3])
    }
    /// ConvTranspose3d with kernel = stride `k` per axis (UNETR++'s (2, 4, 4) last upsampling).
    /// PyTorch computes a transposed conv's fan-in from weight dim 1, i.e. `out · k³`.
    pub fn transposed_by(p: &nn::Path, inp: i64, out: i64, k: [i64; 3]) -> Self {
        let p = p / "conv";
        let fan_in = out * k.iter().product::<i64>();
        Conv {
            weight: default_uniform(&p, "weight", &[inp, out, k[0], k[1], k[2]], fan_in),
            bias: None,
            stride: k,
            padding: [0; 3],
            transposed: true,
        }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (s, pad) = (self.stride, self.padding);
        if self.transposed {
            x.conv_transpose3d(&self.weight, self.bias.as_ref(), s, pad, [0; 3], 1, [1; 3])
        } else {
            x.conv3d(&self.weight, self.bias.as_ref(), s, pad, [1; 3], 1)
        }
    }
}

/// `nn.GroupNorm(groups, channels)`, eps 1e-5, affine (weight 1, bias 0 at init).
#[derive(Debug)]
pub struct GroupNorm {
    groups: i64,
    weight: Tensor,
    bias: Tensor,
}

impl GroupNorm {
    pub fn new(p: &nn::Path, groups: i64, channels: i64) -> Self {
        GroupNorm {
            groups,
            weight: p.ones("weight", &[channels]),
            bias: p.zeros("bias", &[channels]),
        }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.group_norm(
            self.groups,
            Some(&self.weight),
            Some(&self.bias),
            1e-5,
            true,
        )
    }
}

/// MONAI `norm_name`: "instance" (InstanceNorm3d, affine=False, no running stats) or "batch"
/// (BatchNorm3d, affine, running stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormKind {
    Instance,
    Batch,
}

#[derive(Debug)]
pub enum Norm {
    Instance,
    Batch {
        weight: Tensor,
        bias: Tensor,
        running_mean: Tensor,
        running_var: Tensor,
    },
}

impl Norm {
    pub fn new(p: &nn::Path, kind: NormKind, channels: i64) -> Self {
        match kind {
            NormKind::Instance => Norm::Instance,
            NormKind::Batch => Norm::Batch {
                weight: p.ones("weight", &[channels]),
                bias: p.zeros("bias", &[channels]),
                running_mean: p.zeros_no_train("running_mean", &[channels]),
                running_var: p.ones_no_train("running_var", &[channels]),
            },
        }
    }
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        match self {
            Norm::Instance => x.instance_norm(
                None::<Tensor>,
                None::<Tensor>,
                None::<Tensor>,
                None::<Tensor>,
                true,
                0.1,
                1e-5,
                true,
            ),
            Norm::Batch {
                weight,
                bias,
                running_mean,
                running_var,
            } if train
                && let Some(synced) = crate::distributed::group::sync_batch_norm(
                    x,
                    [weight, bias, running_mean, running_var],
                    0.1,
                    1e-5,
                ) =>
            {
                // inside a forward pass there is no error path: the training call's panic guard
                // turns this into its error
                synced.unwrap_or_else(|e| panic!("{}", e.message))
            }
            Norm::Batch {
                weight,
                bias,
                running_mean,
                running_var,
            } => x.batch_norm(
                Some(weight),
                Some(bias),
                Some(running_mean),
                Some(running_var),
                train,
                0.1,
                1e-5,
                true,
            ),
        }
    }
}

/// MONAI's `UnetResBlock` (residual) or `UnetBasicBlock`: two k³ convs with norm and LeakyReLU
/// (slope 0.01); the residual path gets a 1³ conv + norm when the channel count changes.
#[derive(Debug)]
pub struct ConvBlock {
    conv1: Conv,
    norm1: Norm,
    conv2: Conv,
    norm2: Norm,
    residual: bool,
    shortcut: Option<(Conv, Norm)>,
}

impl ConvBlock {
    pub fn new(p: &nn::Path, inp: i64, out: i64, norm: NormKind, residual: bool) -> Self {
        ConvBlock {
            conv1: Conv::new(&(p / "conv1"), inp, out, 3, 1, false),
            norm1: Norm::new(&(p / "norm1"), norm, out),
            conv2: Conv::new(&(p / "conv2"), out, out, 3, 1, false),
            norm2: Norm::new(&(p / "norm2"), norm, out),
            residual,
            shortcut: (residual && inp != out).then(|| {
                (
                    Conv::new(&(p / "conv3"), inp, out, 1, 1, false),
                    Norm::new(&(p / "norm3"), norm, out),
                )
            }),
        }
    }
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let out = activate(&self.norm1, &self.conv1.forward(x), None, train);
        let out = self.conv2.forward(&out);
        if !self.residual {
            return activate(&self.norm2, &out, None, train);
        }
        let skip = match &self.shortcut {
            Some((conv, norm)) => Some((Some(norm), conv.forward(x))),
            None => Some((None, x.shallow_clone())),
        };
        activate(&self.norm2, &out, skip, train)
    }
}

/// MONAI's LeakyReLU slope in UNETR's blocks.
const SLOPE: f64 = 0.01;

/// `leaky_relu(norm(a) + skip)`, the skip taken as it is or through its own norm: in inference on
/// CUDA with instance norms, one fused kernel ([`super::fused`]); otherwise (or inside
/// `with_fused(false, ..)`, which makes this the reference the kernel is tested against) ATen's
/// operations.
pub fn activate(
    norm: &Norm,
    a: &Tensor,
    skip: Option<(Option<&Norm>, Tensor)>,
    train: bool,
) -> Tensor {
    let instance = |n: &Norm| matches!(n, Norm::Instance);
    if !train && instance(norm) && skip.as_ref().is_none_or(|(n, _)| n.is_none_or(instance)) {
        let how = match &skip {
            None => Skip::None,
            Some((None, t)) => Skip::Raw(t),
            Some((Some(_), t)) => Skip::Normed(t),
        };
        if let Some(y) = super::fused::norm_act(a, &how, 1e-5, SLOPE) {
            return y;
        }
    }
    let out = norm.forward_t(a, train);
    let out = match skip {
        None => out,
        Some((None, t)) => out + t,
        Some((Some(n), t)) => out + n.forward_t(&t, train),
    };
    out.leaky_relu()
}
