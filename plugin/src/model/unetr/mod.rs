//! UNETR (Hatamizadeh et al.) exactly as MONAI 1.6.1 builds it: same blocks, same parameter names,
//! same initialisation. A state dict saved from MONAI's `UNETR` loads here unchanged.

mod config;
pub mod import;
mod order_heads;
mod vit;

pub use config::{ProjType, UnetrConfig};
pub use order_heads::{HOME_AXIS, OrderHeads};

use super::blocks::{Conv, ConvBlock};
use crate::error::Result;
use tch::{Tensor, nn};
use vit::Vit;

/// `UnetrPrUpBlock`: a transposed conv from tokens, then `num_layer` × (transposed conv [+ conv block]).
#[derive(Debug)]
struct PrUpBlock {
    transp_conv_init: Conv,
    blocks: Vec<(Conv, Option<ConvBlock>)>,
}

impl PrUpBlock {
    fn new(p: &nn::Path, cfg: &UnetrConfig, out: i64, num_layer: i64) -> Self {
        let blocks = p / "blocks";
        PrUpBlock {
            transp_conv_init: Conv::transposed(&(p / "transp_conv_init"), cfg.hidden_size, out, 2),
            blocks: (0..num_layer)
                .map(|i| {
                    let b = &blocks / i;
                    if cfg.conv_block {
                        (
                            Conv::transposed(&(&b / "0"), out, out, 2),
                            Some(ConvBlock::new(
                                &(&b / "1"),
                                out,
                                out,
                                cfg.norm_name,
                                cfg.res_block,
                            )),
                        )
                    } else {
                        (Conv::transposed(&b, out, out, 2), None)
                    }
                })
                .collect(),
        }
    }
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut x = self.transp_conv_init.forward(x);
        for (up, block) in &self.blocks {
            x = up.forward(&x);
            if let Some(b) = block {
                x = b.forward_t(&x, train);
            }
        }
        x
    }
}

/// `UnetrUpBlock`: transposed conv, concatenate [upsampled, skip], conv block.
#[derive(Debug)]
struct UpBlock {
    transp_conv: Conv,
    conv_block: ConvBlock,
}

impl UpBlock {
    fn new(p: &nn::Path, cfg: &UnetrConfig, inp: i64, out: i64) -> Self {
        UpBlock {
            transp_conv: Conv::transposed(&(p / "transp_conv"), inp, out, 2),
            conv_block: ConvBlock::new(
                &(p / "conv_block"),
                2 * out,
                out,
                cfg.norm_name,
                cfg.res_block,
            ),
        }
    }
    fn forward_t(&self, x: &Tensor, skip: &Tensor, train: bool) -> Tensor {
        let up = self.transp_conv.forward(x);
        self.conv_block
            .forward_t(&Tensor::cat(&[&up, skip], 1), train)
    }
}

/// UNETR. `forward_t` gives logits `[B, out, X, Y, Z]`; `forward_features` also gives the four
/// token features `[B, N, hidden]` the order heads read.
#[derive(Debug)]
pub struct Unetr {
    pub config: UnetrConfig,
    vit: Vit,
    encoder1: ConvBlock,
    encoder2: PrUpBlock,
    encoder3: PrUpBlock,
    encoder4: PrUpBlock,
    decoder5: UpBlock,
    decoder4: UpBlock,
    decoder3: UpBlock,
    decoder2: UpBlock,
    out: Conv,
}

impl Unetr {
    pub fn new(p: &nn::Path, cfg: &UnetrConfig) -> Result<Self> {
        cfg.validate()?;
        let f = cfg.feature_size;
        Ok(Unetr {
            config: cfg.clone(),
            vit: Vit::new(&(p / "vit"), cfg),
            // UnetrBasicBlock holds its block under `.layer`.
            encoder1: ConvBlock::new(
                &(p / "encoder1" / "layer"),
                cfg.in_channels,
                f,
                cfg.norm_name,
                cfg.res_block,
            ),
            encoder2: PrUpBlock::new(&(p / "encoder2"), cfg, 2 * f, 2),
            encoder3: PrUpBlock::new(&(p / "encoder3"), cfg, 4 * f, 1),
            encoder4: PrUpBlock::new(&(p / "encoder4"), cfg, 8 * f, 0),
            decoder5: UpBlock::new(&(p / "decoder5"), cfg, cfg.hidden_size, 8 * f),
            decoder4: UpBlock::new(&(p / "decoder4"), cfg, 8 * f, 4 * f),
            decoder3: UpBlock::new(&(p / "decoder3"), cfg, 4 * f, 2 * f),
            decoder2: UpBlock::new(&(p / "decoder2"), cfg, 2 * f, f),
            out: Conv::new(&(p / "out" / "conv"), f, cfg.out_channels, 1, 1, true),
        })
    }

    /// Tokens `[B, N, hidden]` → feature map `[B, hidden, h, w, d]`.
    fn proj_feat(&self, x: &Tensor) -> Tensor {
        let [h, w, d] = self.config.feat_size();
        let b = x.size()[0];
        x.view([b, h, w, d, self.config.hidden_size])
            .permute([0, 4, 1, 2, 3])
            .contiguous()
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_features(x, train).0
    }

    /// Logits plus `[hs[L/4], hs[L/2], hs[3L/4], norm(hs[L-1])]`.
    pub fn forward_features(&self, x: &Tensor, train: bool) -> (Tensor, [Tensor; 4]) {
        let (tokens, hidden) = self.vit.forward_t(x, train);
        let [t2, t3, t4] = self.config.taps();
        let enc1 = self.encoder1.forward_t(x, train);
        let enc2 = self.encoder2.forward_t(&self.proj_feat(&hidden[t2]), train);
        let enc3 = self.encoder3.forward_t(&self.proj_feat(&hidden[t3]), train);
        let enc4 = self.encoder4.forward_t(&self.proj_feat(&hidden[t4]), train);
        let dec3 = self
            .decoder5
            .forward_t(&self.proj_feat(&tokens), &enc4, train);
        let dec2 = self.decoder4.forward_t(&dec3, &enc3, train);
        let dec1 = self.decoder3.forward_t(&dec2, &enc2, train);
        let out = self.decoder2.forward_t(&dec1, &enc1, train);
        let logits = self.out.forward(&out);
        let features = [
            hidden[t2].shallow_clone(),
            hidden[t3].shallow_clone(),
            hidden[t4].shallow_clone(),
            tokens,
        ];
        (logits, features)
    }
}
