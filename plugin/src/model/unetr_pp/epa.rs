//! UNETR++'s transformer stage: efficient paired attention (EPA) inside TransformerBlocks.

use super::config::{ATTENTION_DROPOUT, TAIL_DROPOUT};
use crate::model::blocks::{Conv, ConvBlock, LayerNorm, Linear, NormKind, trunc_normal};
use crate::model::dropout::{dropout, feature_dropout};
use tch::{Kind, Tensor, nn};

/// Efficient paired attention: one shared Q/K, a channel branch and a spatial branch whose keys
/// and values are projected over the token axis by the tied `E = F` Linear(N → P).
#[derive(Debug)]
struct Epa {
    heads: i64,
    temperature: Tensor,
    temperature2: Tensor,
    qkvv: Linear,
    e: Linear,
    out_proj: Linear,
    out_proj2: Linear,
}

impl Epa {
    fn new(p: &nn::Path, n: i64, c: i64, proj: i64, heads: i64, encoder: bool) -> Self {
        // Upstream re-initialises the encoder's Linear layers (trunc normal 0.02, bias 0); the
        // decoder's keep PyTorch's default.
        let linear = |name: &str, inp: i64, out: i64, bias: bool| {
            let q = p / name;
            if encoder {
                Linear {
                    weight: trunc_normal(&q, "weight", &[out, inp], 0.02),
                    bias: bias.then(|| q.zeros("bias", &[out])),
                }
            } else {
                Linear::new(&q, inp, out, bias)
            }
        };
        Epa {
            heads,
            temperature: p.ones("temperature", &[heads, 1, 1]),
            temperature2: p.ones("temperature2", &[heads, 1, 1]),
            qkvv: linear("qkvv", c, 4 * c, false),
            e: linear("E", n, proj, true),
            out_proj: linear("out_proj", c, c / 2, true),
            out_proj2: linear("out_proj2", c, c / 2, true),
        }
    }

    /// `[B, N, C]` → `[B, N, C]` (spatial half first, then channel half); in training, both
    /// attention maps get upstream's dropout.
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let [b, n, c] = x.size()[..] else {
            unreachable!("EPA input is [B, N, C]")
        };
        let (h, d) = (self.heads, c / self.heads);
        let qkvv = self
            .qkvv
            .forward(x)
            .reshape([b, n, 4, h, d])
            .permute([2, 0, 3, 1, 4]);
        let part = |i: i64| qkvv.get(i).transpose(-2, -1); // [B, h, d, N]
        let (q, k, v_ca, v_sa) = (part(0), part(1), part(2), part(3));
        // The token-axis projections come before k is normalised.
        let k_proj = self.e.forward(&k);
        let v_proj = self.e.forward(&v_sa);
        let normalize = |t: &Tensor| {
            let norm = t
                .norm_scalaropt_dim(2, [-1i64].as_slice(), true)
                .clamp_min(1e-12);
            t / norm
        };
        let (q, k) = (normalize(&q), normalize(&k));
        let attn_ca = (q.matmul(&k.transpose(-2, -1)) * &self.temperature).softmax(-1, Kind::Float);
        let attn_ca = dropout(&attn_ca, ATTENTION_DROPOUT, train);
        let x_ca = attn_ca
            .matmul(&v_ca)
            .permute([0, 3, 1, 2])
            .reshape([b, n, c]);
        let attn_sa =
            (q.transpose(-2, -1).matmul(&k_proj) * &self.temperature2).softmax(-1, Kind::Float);
        let attn_sa = dropout(&attn_sa, ATTENTION_DROPOUT, train);
        // [B, h, N, d] → [B, d, h, N], then reinterpreted as [B, N, C]: upstream's raw reshape.
        let x_sa = attn_sa
            .matmul(&v_proj.transpose(-2, -1))
            .permute([0, 3, 1, 2])
            .reshape([b, n, c]);
        Tensor::cat(
            &[self.out_proj.forward(&x_sa), self.out_proj2.forward(&x_ca)],
            -1,
        )
    }
}

/// `TransformerBlock`: layer-scaled EPA on position-embedded tokens, then a residual conv tail
/// (`conv51`: UnetResBlock with batch norms; `conv8`: Dropout3d + 1³ conv).
#[derive(Debug)]
struct TransformerBlock {
    norm: LayerNorm,
    gamma: Tensor,
    epa: Epa,
    conv51: ConvBlock,
    conv8: Conv,
    pos_embed: Tensor,
}

impl TransformerBlock {
    fn new(p: &nn::Path, n: i64, c: i64, proj: i64, heads: i64, encoder: bool) -> Self {
        TransformerBlock {
            norm: LayerNorm::new(&(p / "norm"), c),
            gamma: p.var("gamma", &[c], nn::Init::Const(1e-6)),
            epa: Epa::new(&(p / "epa_block"), n, c, proj, heads, encoder),
            conv51: ConvBlock::new(&(p / "conv51"), c, c, NormKind::Batch, true),
            conv8: Conv::bare(&(p / "conv8" / "1"), c, c, [1; 3], [1; 3], true),
            pos_embed: p.zeros("pos_embed", &[1, n, c]),
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let s = x.size();
        let (b, c) = (s[0], s[1]);
        let tokens = x.reshape([b, c, -1]).permute([0, 2, 1]) + &self.pos_embed;
        let attended =
            &tokens + &self.gamma * self.epa.forward_t(&self.norm.forward(&tokens), train);
        let map = attended
            .reshape([b, s[2], s[3], s[4], c])
            .permute([0, 4, 1, 2, 3]);
        let tail = self.conv51.forward_t(&map, train);
        // nn.Dropout3d: whole channels dropped
        let tail = self
            .conv8
            .forward(&feature_dropout(&tail, TAIL_DROPOUT, train));
        map + tail
    }
}

/// A stack of TransformerBlocks (`nn.Sequential`).
#[derive(Debug)]
pub(super) struct Stage(Vec<TransformerBlock>);

impl Stage {
    pub(super) fn new(
        p: &nn::Path,
        depth: usize,
        n: i64,
        c: i64,
        proj: i64,
        heads: i64,
        enc: bool,
    ) -> Self {
        Stage(
            (0..depth)
                .map(|i| TransformerBlock::new(&(p / i), n, c, proj, heads, enc))
                .collect(),
        )
    }
    pub(super) fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.0
            .iter()
            .fold(x.shallow_clone(), |x, b| b.forward_t(&x, train))
    }
}
