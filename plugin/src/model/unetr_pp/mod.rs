//! UNETR++ (Shaker et al.) exactly as the upstream Synapse model builds it
//! (`Amshaker/unetr_plus_plus` @ dcba1c6, `network_architecture/synapse/`), with its parameter names:
//! a (2, 4, 4) stem and three ×2 downsamplings, each stage a stack of TransformerBlocks with
//! efficient paired attention (EPA), decoders that add their skips, and deep-supervision heads
//! `out1..3`. Token counts come from `img_size` (upstream hard-codes those of 64×128×128). The LWI
//! stage-1 variant adds the order heads `temp_head1..4` (`ShahinaKK/LWI-VMS` @ 7f21654).
//! Facts and evidence: `shared/design/unetrpp.md`; parity: `plugin/tests/unetr_pp_parity.rs`.

mod config;
mod epa;
pub mod import;
mod order_heads;

pub use config::{DECODER_HEADS, UnetrPpConfig};
pub use order_heads::{HOME_AXIS, PpOrderHeads};

use super::blocks::{Conv, ConvBlock, GroupNorm, NormKind};
use crate::error::Result;
use config::{DECODER_DEPTH, DECODER_PROJ, STEM};
use epa::Stage;
use tch::{Tensor, nn};

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
