//! UNETR++ (Shaker et al.) exactly as the upstream Synapse model builds it
//! (`Amshaker/unetr_plus_plus` @ dcba1c6, `network_architecture/synapse/`), with its parameter names:
//! a (2, 4, 4) stem and three ×2 downsamplings, each stage a stack of TransformerBlocks with
//! efficient paired attention (EPA), decoders that add their skips, and deep-supervision heads
//! `out1..3`. Token counts come from `img_size` (upstream hard-codes those of 64×128×128). The LWI
//! stage-1 variant adds the order heads `temp_head1..4` (`ShahinaKK/LWI-VMS` @ 7f21654).
//! Facts and evidence: `shared/design/unetrpp.md`; parity: `plugin/tests/unetr_pp_parity.rs`.

use super::blocks::{Conv, ConvBlock, GroupNorm, LayerNorm, Linear, NormKind, trunc_normal};
use super::limits::{self, Witness};
use crate::error::{Error, Result};
use crate::pretext::Grouping;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor, nn};

/// `UNETR_PP` keyword arguments, by their upstream names. Defaults are the Synapse model
/// (42,952,850 trainable parameters).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UnetrPpConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    /// Input size along the network's three axes (upstream D, H, W: 64, 128, 128).
    pub img_size: [i64; 3],
    pub feature_size: i64,
    pub hidden_size: i64,
    /// Heads of the encoder stages' EPAs; the decoders have [`DECODER_HEADS`] whatever this is.
    pub num_heads: i64,
    pub depths: [i64; 4],
    pub dims: [i64; 4],
    /// EPA projection sizes of the four encoder stages (upstream `proj_size`); decoders use 64.
    pub proj_size: [i64; 4],
    /// Deep supervision: `out2`, `out3` besides `out1`.
    pub do_ds: bool,
}

impl Default for UnetrPpConfig {
    fn default() -> Self {
        UnetrPpConfig {
            in_channels: 1,
            out_channels: 14,
            img_size: [64, 128, 128],
            feature_size: 16,
            hidden_size: 256,
            num_heads: 4,
            depths: [3, 3, 3, 3],
            dims: [32, 64, 128, 256],
            proj_size: [64, 64, 64, 32],
            do_ds: true,
        }
    }
}

/// The stem's kernel and stride: tokens are D/2 × H/4 × W/4 in the first stage.
const STEM: [i64; 3] = [2, 4, 4];
/// EPA projection size of every decoder stage (upstream never passes it to the decoders).
const DECODER_PROJ: i64 = 64;
/// Upstream's dropout on both EPA attention maps and (`Dropout3d`) before `conv8`.
const ATTENTION_DROPOUT: f64 = 0.15;
const TAIL_DROPOUT: f64 = 0.1;
/// Depth of every decoder stage (upstream never passes it either).
const DECODER_DEPTH: usize = 3;
/// Heads of every decoder EPA: upstream passes `num_heads` to the encoder alone
/// (`unetr_pp_synapse.py:76`), so its decoders keep `UnetrUpBlock`'s default of 4
/// (`model_components.py:83`) whatever the constructor is given.
pub const DECODER_HEADS: i64 = 4;

impl UnetrPpConfig {
    /// Refuses what the upstream model cannot build or run, or what exceeds a ceiling of
    /// [`limits`], naming the value.
    pub fn validate(&self) -> Result<()> {
        const WHAT: &str = "UNETR++";
        let f = self.feature_size;
        for (name, v, hi) in [
            ("in_channels", self.in_channels, limits::MAX_IN_CHANNELS),
            ("out_channels", self.out_channels, limits::MAX_CLASSES),
            ("feature_size", f, limits::MAX_FEATURE_SIZE),
            ("num_heads", self.num_heads, limits::MAX_HEADS),
        ] {
            limits::within(WHAT, name, v, 1, hi)?;
        }
        for (i, (depth, proj)) in self.depths.iter().zip(&self.proj_size).enumerate() {
            let at = |name| format!("{name}[{i}]");
            limits::within(WHAT, &at("depths"), *depth, 1, limits::MAX_STAGE_DEPTH)?;
            limits::within(WHAT, &at("proj_size"), *proj, 1, limits::MAX_PROJ_SIZE)?;
        }
        if self.dims != [2 * f, 4 * f, 8 * f, 16 * f] {
            return Err(Error::invalid(format!(
                "UNETR++ dims {:?} must be [2f, 4f, 8f, 16f] = {:?} for feature_size {f} (the decoders add the skips)",
                self.dims,
                [2 * f, 4 * f, 8 * f, 16 * f]
            )));
        }
        if self.hidden_size != 16 * f {
            return Err(Error::invalid(format!(
                "UNETR++ hidden_size {} must be 16 · feature_size = {}",
                self.hidden_size,
                16 * f
            )));
        }
        if let Some(d) = self.dims.iter().find(|d| *d % self.num_heads != 0) {
            return Err(Error::invalid(format!(
                "UNETR++ dims {:?}: {d} is not divisible by num_heads {}",
                self.dims, self.num_heads
            )));
        }
        if let Some(d) = self.dims[..3].iter().find(|d| *d % DECODER_HEADS != 0) {
            return Err(Error::invalid(format!(
                "UNETR++ dims {:?}: {d} is not divisible by the decoders' {DECODER_HEADS} heads \
                 (upstream's decoders always have {DECODER_HEADS}; feature_size must be even)",
                self.dims
            )));
        }
        limits::roi(WHAT, "img_size", self.img_size)?;
        let [d, h, w] = self.img_size;
        if d % 16 != 0 || h % 32 != 0 || w % 32 != 0 {
            return Err(Error::invalid(format!(
                "UNETR++ img_size {:?}: D must be a positive multiple of 16, H and W of 32",
                self.img_size
            )));
        }
        limits::values(WHAT, self.values())
    }

    /// The values of every variable the network holds (what its model file stores, order heads
    /// aside), from the configuration alone.
    pub fn values(&self) -> i128 {
        let wide = |v: i64| i128::from(v);
        let (inp, out, f) = (
            wide(self.in_channels),
            wide(self.out_channels),
            wide(self.feature_size),
        );
        let d = self.dims.map(wide);
        // LayerNorm, gamma, EPA (temperatures, qkvv, E, out_proj, out_proj2), conv51, conv8, pos_embed
        let block = |n: i128, c: i128, proj: i128, heads: i128| {
            3 * c
                + 2 * heads
                + 4 * c * c
                + n * proj
                + proj
                + c * c
                + c
                + limits::conv_block_values(c, c, true, true)
                + c * c
                + c
                + n * c
        };
        let stem = inp * d[0] * STEM.iter().product::<i64>() as i128 + 2 * d[0];
        let down: i128 = (1..4).map(|i| 8 * d[i - 1] * d[i] + 2 * d[i]).sum();
        let stages: i128 = (0..4)
            .map(|i| {
                let n = wide(self.tokens(i));
                let (proj, heads) = (wide(self.proj_size[i]), wide(self.num_heads));
                wide(self.depths[i]) * block(n, d[i], proj, heads)
            })
            .sum();
        let decoders: i128 = (0..3)
            .map(|s| {
                let tail = block(
                    wide(self.tokens(s)),
                    d[s],
                    wide(DECODER_PROJ),
                    wide(DECODER_HEADS),
                );
                8 * d[s + 1] * d[s] + DECODER_DEPTH as i128 * tail
            })
            .sum();
        let last = d[0] * f * STEM.iter().product::<i64>() as i128
            + limits::conv_block_values(f, f, false, true);
        let widths = if self.do_ds {
            vec![f, d[0], d[1]]
        } else {
            vec![f]
        };
        let outs: i128 = widths.iter().map(|w| w * out + out).sum();
        stem + down
            + stages
            + limits::conv_block_values(inp, f, false, true)
            + decoders
            + last
            + outs
    }

    /// Tensors whose shapes pin every size field (`order_classes`: the order heads'). The first
    /// decoder's temperature tells a file whose decoders have `num_heads` heads (written by lwi
    /// before they had upstream's 4).
    pub fn witnesses(&self, order_classes: Option<i64>) -> Vec<Witness> {
        let enc = "unetr_pp_encoder";
        let (dims, heads) = (self.dims, self.num_heads);
        let mut w = vec![Witness::new(
            format!("{enc}.downsample_layers.0.0.conv.weight"),
            &[dims[0], self.in_channels, STEM[0], STEM[1], STEM[2]],
            format!("dims {dims:?} and in_channels {}", self.in_channels),
        )];
        for i in 0..4 {
            let (n, last) = (self.tokens(i), self.depths[i] - 1);
            w.push(Witness::new(
                format!("{enc}.stages.{i}.0.pos_embed"),
                &[1, n, dims[i]],
                format!("img_size {:?} and dims {dims:?}", self.img_size),
            ));
            w.push(Witness::new(
                format!("{enc}.stages.{i}.{last}.epa_block.E.weight"),
                &[self.proj_size[i], n],
                format!(
                    "depths {:?}, proj_size {:?} and img_size {:?}",
                    self.depths, self.proj_size, self.img_size
                ),
            ));
            w.push(Witness::new(
                format!("{enc}.stages.{i}.0.epa_block.temperature"),
                &[heads, 1, 1],
                format!("num_heads {heads}"),
            ));
        }
        w.push(Witness::fixed(
            "decoder5.decoder_block.0.0.epa_block.temperature",
            &[DECODER_HEADS, 1, 1],
            format!(
                "UNETR++ decoders have {DECODER_HEADS} heads whatever num_heads is, as upstream's; \
                 a file whose decoders have num_heads {heads} heads was written by an lwi that \
                 gave them so and describes another network: re-import or re-train it"
            ),
        ));
        w.push(Witness::new(
            "out1.conv.conv.weight",
            &[self.out_channels, self.feature_size, 1, 1, 1],
            format!(
                "out_channels {} and feature_size {}",
                self.out_channels, self.feature_size
            ),
        ));
        if let Some(m) = order_classes {
            w.push(Witness::new(
                "temp_head1.weight",
                &[m, dims[0]],
                format!("order_classes {m} and dims {dims:?}"),
            ));
        }
        w
    }

    /// The token grid of encoder stage `i` (0..4): the stem's, halved `i` times.
    pub fn grid(&self, i: usize) -> [i64; 3] {
        std::array::from_fn(|a| (self.img_size[a] / STEM[a]) >> i)
    }
    pub fn tokens(&self, i: usize) -> i64 {
        self.grid(i).iter().product()
    }
}

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
        let attn_ca = super::dropout::dropout(&attn_ca, ATTENTION_DROPOUT, train);
        let x_ca = attn_ca
            .matmul(&v_ca)
            .permute([0, 3, 1, 2])
            .reshape([b, n, c]);
        let attn_sa =
            (q.transpose(-2, -1).matmul(&k_proj) * &self.temperature2).softmax(-1, Kind::Float);
        let attn_sa = super::dropout::dropout(&attn_sa, ATTENTION_DROPOUT, train);
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
            .forward(&super::dropout::feature_dropout(&tail, TAIL_DROPOUT, train));
        map + tail
    }
}

/// A stack of TransformerBlocks (`nn.Sequential`).
#[derive(Debug)]
struct Stage(Vec<TransformerBlock>);

impl Stage {
    fn new(p: &nn::Path, depth: usize, n: i64, c: i64, proj: i64, heads: i64, enc: bool) -> Self {
        Stage(
            (0..depth)
                .map(|i| TransformerBlock::new(&(p / i), n, c, proj, heads, enc))
                .collect(),
        )
    }
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.0
            .iter()
            .fold(x.shallow_clone(), |x, b| b.forward_t(&x, train))
    }
}

/// `UnetrUpBlock`: transposed conv, + skip, then TransformerBlocks (or, for the last decoder, a
/// UnetResBlock).
#[derive(Debug)]
struct UpBlock {
    transp_conv: Conv,
    block: UpTail,
}

#[derive(Debug)]
enum UpTail {
    Transformer(Stage),
    Conv(Box<ConvBlock>),
}

impl UpBlock {
    fn forward_t(&self, x: &Tensor, skip: &Tensor, train: bool) -> Tensor {
        let out = self.transp_conv.forward(x) + skip;
        match &self.block {
            UpTail::Transformer(s) => s.forward_t(&out, train),
            UpTail::Conv(c) => c.forward_t(&out, train),
        }
    }
}

/// The pretext task's order heads: `temp_head{1..4}` = Linear(dims[i] → slabs) on each encoder
/// stage's tokens pooled by upstream's rule.
#[derive(Debug)]
pub struct PpOrderHeads {
    heads: Vec<Linear>,
    slabs: i64,
}

impl PpOrderHeads {
    pub fn new(p: &nn::Path, dims: [i64; 4], slabs: i64) -> Self {
        PpOrderHeads {
            heads: (0..4)
                .map(|i| Linear::new(&(p / format!("temp_head{}", i + 1)), dims[i], slabs, true))
                .collect(),
            slabs,
        }
    }

    /// Upstream's pooling (LWI-VMS `unetr_pp_synapse.py:153-179`): group g holds the tokens whose
    /// index n ≡ g (mod slabs), that is the last-axis index mod slabs, so the groups never follow
    /// the shuffled slabs (method §7.1). `[B, N, C]` → `[B, slabs, C]`.
    pub fn pool_released(&self, tokens: &Tensor) -> Tensor {
        let [b, n, c] = tokens.size()[..] else {
            unreachable!("tokens are [B, N, C]")
        };
        tokens
            .reshape([b, n / self.slabs, self.slabs, c])
            .mean_dim(1, false, Kind::Float)
    }

    /// The pooling over the shuffled slabs: tokens are ordered `d·(H·W) + h·W + w` with the slabs
    /// along d, so slab g is the g-th run of N/slabs tokens. `[B, N, C]` → `[B, slabs, C]`.
    pub fn pool_slabs(&self, tokens: &Tensor) -> Tensor {
        let [b, n, c] = tokens.size()[..] else {
            unreachable!("tokens are [B, N, C]")
        };
        tokens
            .reshape([b, self.slabs, n / self.slabs, c])
            .mean_dim(2, false, Kind::Float)
    }

    /// Order logits `[B, slabs, slabs]` per stage from each stage's tokens, pooled as upstream.
    pub fn forward(&self, tokens: &[Tensor; 4]) -> [Tensor; 4] {
        self.forward_grouped(tokens, Grouping::Released)
    }

    /// Order logits with the tokens pooled by `grouping`.
    pub fn forward_grouped(&self, tokens: &[Tensor; 4], grouping: Grouping) -> [Tensor; 4] {
        std::array::from_fn(|i| {
            let pooled = match grouping {
                Grouping::Slab => self.pool_slabs(&tokens[i]),
                Grouping::Released => self.pool_released(&tokens[i]),
            };
            self.heads[i].forward(&pooled)
        })
    }
}

/// What one forward pass gives: the logits at full resolution, the deep-supervision outputs and,
/// for the pretext, each encoder stage's tokens `[B, N, C]`.
pub struct PpOutputs {
    pub out1: Tensor,
    /// `out2` (decoder3's resolution) and `out3` (decoder4's), when `do_ds`.
    pub deep: Vec<Tensor>,
    pub hidden: [Tensor; 4],
    pub decoded: [Tensor; 3],
}

#[derive(Debug)]
pub struct UnetrPp {
    pub config: UnetrPpConfig,
    stem: (Conv, GroupNorm),
    downsample: Vec<(Conv, GroupNorm)>,
    stages: Vec<Stage>,
    encoder1: ConvBlock,
    decoders: [UpBlock; 4],
    out: Vec<Conv>,
}

impl UnetrPp {
    pub fn new(p: &nn::Path, cfg: &UnetrPpConfig) -> Result<Self> {
        cfg.validate()?;
        let (dims, heads, f) = (cfg.dims, cfg.num_heads, cfg.feature_size);
        let enc = p / "unetr_pp_encoder";
        let down = &enc / "downsample_layers";
        let layer = |i: usize, inp: i64, k: [i64; 3], groups: i64| {
            let q = &down / i;
            (
                Conv::bare(&(&q / "0" / "conv"), inp, dims[i], k, k, false),
                GroupNorm::new(&(&q / "1"), groups, dims[i]),
            )
        };
        let stem = layer(0, cfg.in_channels, STEM, 1);
        let downsample = (1..4)
            .map(|i| layer(i, dims[i - 1], [2; 3], dims[i - 1]))
            .collect();
        let stages = (0..4)
            .map(|i| {
                let q = &enc / "stages" / i;
                let depth = cfg.depths[i] as usize;
                Stage::new(
                    &q,
                    depth,
                    cfg.tokens(i),
                    dims[i],
                    cfg.proj_size[i],
                    heads,
                    true,
                )
            })
            .collect();
        let up = |name: &str, stage: usize| {
            let q = p / name;
            UpBlock {
                transp_conv: Conv::transposed(
                    &(&q / "transp_conv"),
                    dims[stage + 1],
                    dims[stage],
                    2,
                ),
                block: UpTail::Transformer(Stage::new(
                    &(&q / "decoder_block" / "0"),
                    DECODER_DEPTH,
                    cfg.tokens(stage),
                    dims[stage],
                    DECODER_PROJ,
                    DECODER_HEADS,
                    false,
                )),
            }
        };
        let last = p / "decoder2";
        let decoders = [
            up("decoder5", 2),
            up("decoder4", 1),
            up("decoder3", 0),
            UpBlock {
                transp_conv: Conv::transposed_by(&(&last / "transp_conv"), dims[0], f, STEM),
                block: UpTail::Conv(Box::new(ConvBlock::new(
                    &(&last / "decoder_block" / "0"),
                    f,
                    f,
                    NormKind::Instance,
                    true,
                ))),
            },
        ];
        let widths = if cfg.do_ds {
            vec![f, dims[0], dims[1]]
        } else {
            vec![f]
        };
        let out = widths
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                Conv::new(
                    &(p / format!("out{}", i + 1) / "conv"),
                    w,
                    cfg.out_channels,
                    1,
                    1,
                    true,
                )
            })
            .collect();
        Ok(UnetrPp {
            config: cfg.clone(),
            stem,
            downsample,
            stages,
            encoder1: ConvBlock::new(
                &(p / "encoder1"),
                cfg.in_channels,
                f,
                NormKind::Instance,
                true,
            ),
            decoders,
            out,
        })
    }

    /// Every output of one pass over `x` `[B, C, D, H, W]`.
    pub fn forward_all(&self, x: &Tensor, train: bool) -> PpOutputs {
        let mut h = self.stem.1.forward(&self.stem.0.forward(x));
        let mut hidden = Vec::with_capacity(4);
        for i in 0..4 {
            if i > 0 {
                let (conv, norm) = &self.downsample[i - 1];
                h = norm.forward(&conv.forward(&h));
            }
            h = self.stages[i].forward_t(&h, train);
            hidden.push(h.shallow_clone());
        }
        let conv_block = self.encoder1.forward_t(x, train);
        let [d5, d4, d3, d2] = &self.decoders;
        let dec3 = d5.forward_t(&hidden[3], &hidden[2], train);
        let dec2 = d4.forward_t(&dec3, &hidden[1], train);
        let dec1 = d3.forward_t(&dec2, &hidden[0], train);
        let out = d2.forward_t(&dec1, &conv_block, train);
        let out1 = self.out[0].forward(&out);
        let deep = match &self.out[..] {
            [_, o2, o3] => vec![o2.forward(&dec1), o3.forward(&dec2)],
            _ => Vec::new(),
        };
        let tokens = |t: &Tensor| {
            let s = t.size();
            t.reshape([s[0], s[1], -1]).permute([0, 2, 1])
        };
        PpOutputs {
            out1,
            deep,
            hidden: std::array::from_fn(|i| tokens(&hidden[i])),
            decoded: [dec3, dec2, dec1],
        }
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_all(x, train).out1
    }
}
