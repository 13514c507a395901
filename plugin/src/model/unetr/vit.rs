//! MONAI's `ViT` as UNETR uses it: patch embedding, pre-norm transformer blocks, final norm.

use super::config::{ProjType, UnetrConfig};
use crate::model::blocks::{LayerNorm, Linear, trunc_normal};
use tch::{Tensor, nn};

/// `PatchEmbeddingBlock`: voxels → tokens, plus a learned position embedding.
#[derive(Debug)]
struct PatchEmbedding {
    proj: PatchProjection,
    position_embeddings: Tensor,
    patch: i64,
    dropout: f64,
}

#[derive(Debug)]
enum PatchProjection {
    /// Rearrange "b c (h p1) (w p2) (d p3) -> b (h w d) (p1 p2 p3 c)" then Linear.
    Perceptron(Linear),
    /// Conv3d(k = stride = patch), flattened to tokens.
    Conv { weight: Tensor, bias: Tensor },
}

impl PatchEmbedding {
    fn new(p: &nn::Path, cfg: &UnetrConfig) -> Self {
        let patch = UnetrConfig::PATCH;
        let patch_dim = cfg.in_channels * patch * patch * patch;
        let pe = p / "patch_embeddings";
        let proj = match cfg.proj_type {
            ProjType::Perceptron => PatchProjection::Perceptron(Linear::new_trunc_normal(
                &(&pe / "1"),
                patch_dim,
                cfg.hidden_size,
            )),
            ProjType::Conv => PatchProjection::Conv {
                weight: crate::model::blocks::default_uniform(
                    &pe,
                    "weight",
                    &[cfg.hidden_size, cfg.in_channels, patch, patch, patch],
                    patch_dim,
                ),
                bias: crate::model::blocks::default_uniform(
                    &pe,
                    "bias",
                    &[cfg.hidden_size],
                    patch_dim,
                ),
            },
        };
        PatchEmbedding {
            proj,
            position_embeddings: trunc_normal(
                p,
                "position_embeddings",
                &[1, cfg.n_patches(), cfg.hidden_size],
                0.02,
            ),
            patch,
            dropout: cfg.dropout_rate,
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let tokens = match &self.proj {
            PatchProjection::Perceptron(linear) => {
                let s = x.size();
                let (b, c, p) = (s[0], s[1], self.patch);
                let (h, w, d) = (s[2] / p, s[3] / p, s[4] / p);
                let patches = x
                    .reshape([b, c, h, p, w, p, d, p])
                    .permute([0, 2, 4, 6, 3, 5, 7, 1])
                    .reshape([b, h * w * d, p * p * p * c]);
                linear.forward(&patches)
            }
            PatchProjection::Conv { weight, bias } => {
                let s = [self.patch; 3];
                x.conv3d(weight, Some(bias), s, [0; 3], [1; 3], 1)
                    .flatten(2, -1)
                    .transpose(-1, -2)
            }
        };
        crate::model::dropout::dropout(&(tokens + &self.position_embeddings), self.dropout, train)
    }
}

/// `SABlock`: multi-head self-attention; qkv features laid out (qkv, head, dim), q first.
#[derive(Debug)]
struct SelfAttention {
    qkv: Linear,
    out_proj: Linear,
    heads: i64,
    dropout: f64,
}

impl SelfAttention {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let s = x.size();
        let (b, n, hidden) = (s[0], s[1], s[2]);
        let dh = hidden / self.heads;
        let qkv = self
            .qkv
            .forward(x)
            .reshape([b, n, 3, self.heads, dh])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let p = if crate::model::dropout::active(train) {
            self.dropout
        } else {
            0.0
        };
        let att = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            p,
            false,
            (dh as f64).powf(-0.5),
            false,
        );
        let merged = att.permute([0, 2, 1, 3]).reshape([b, n, hidden]);
        crate::model::dropout::dropout(&self.out_proj.forward(&merged), self.dropout, train)
    }
}

/// `TransformerBlock`: x + SA(LN(x)), then x + MLP(LN(x)); MLP = Linear → exact GELU → Linear.
/// `norm_cross_attn` exists in MONAI's block (unused without cross-attention) and is kept so the
/// parameter set is MONAI's.
#[derive(Debug)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn: SelfAttention,
    norm2: LayerNorm,
    linear1: Linear,
    linear2: Linear,
    _norm_cross_attn: LayerNorm,
    dropout: f64,
}

impl TransformerBlock {
    fn new(p: &nn::Path, cfg: &UnetrConfig) -> Self {
        let h = cfg.hidden_size;
        let a = p / "attn";
        let m = p / "mlp";
        TransformerBlock {
            norm1: LayerNorm::new(&(p / "norm1"), h),
            attn: SelfAttention {
                qkv: Linear::new(&(&a / "qkv"), h, 3 * h, cfg.qkv_bias),
                out_proj: Linear::new(&(&a / "out_proj"), h, h, true),
                heads: cfg.num_heads,
                dropout: cfg.dropout_rate,
            },
            norm2: LayerNorm::new(&(p / "norm2"), h),
            linear1: Linear::new(&(&m / "linear1"), h, cfg.mlp_dim, true),
            linear2: Linear::new(&(&m / "linear2"), cfg.mlp_dim, h, true),
            _norm_cross_attn: LayerNorm::new(&(p / "norm_cross_attn"), h),
            dropout: cfg.dropout_rate,
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let x = x + self.attn.forward_t(&self.norm1.forward(x), train);
        let mlp = self.linear1.forward(&self.norm2.forward(&x)).gelu("none");
        let mlp = crate::model::dropout::dropout(&mlp, self.dropout, train);
        &x + crate::model::dropout::dropout(&self.linear2.forward(&mlp), self.dropout, train)
    }
}

/// The ViT encoder. `forward_t` returns the final normed tokens and every block's output.
#[derive(Debug)]
pub struct Vit {
    patch_embedding: PatchEmbedding,
    blocks: Vec<TransformerBlock>,
    norm: LayerNorm,
}

impl Vit {
    pub fn new(p: &nn::Path, cfg: &UnetrConfig) -> Self {
        let blocks = p / "blocks";
        Vit {
            patch_embedding: PatchEmbedding::new(&(p / "patch_embedding"), cfg),
            blocks: (0..cfg.num_layers)
                .map(|i| TransformerBlock::new(&(&blocks / i), cfg))
                .collect(),
            norm: LayerNorm::new(&(p / "norm"), cfg.hidden_size),
        }
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> (Tensor, Vec<Tensor>) {
        let mut x = self.patch_embedding.forward_t(x, train);
        let mut hidden = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            x = block.forward_t(&x, train);
            hidden.push(x.shallow_clone());
        }
        (self.norm.forward(&x), hidden)
    }
}
