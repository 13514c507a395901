//! UNETR (Hatamizadeh et al.) exactly as MONAI 1.6.1 builds it: same blocks, same parameter names,
//! same initialisation. A state dict saved from MONAI's `UNETR` loads here unchanged.

use super::blocks::{Conv, ConvBlock, Linear, NormKind};
use super::limits::{self, Witness};
use super::vit::Vit;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::{Tensor, nn};

/// `proj_type` of MONAI's patch embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProjType {
    Perceptron,
    Conv,
}

/// MONAI `UNETR` keyword arguments, by their MONAI names. Defaults are the method's full-size model
/// (`in 1, out 14, img 96³, perceptron, instance norm`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UnetrConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    /// Input size along x, y, z; each a multiple of the 16-voxel patch.
    pub img_size: [i64; 3],
    pub feature_size: i64,
    pub hidden_size: i64,
    pub mlp_dim: i64,
    /// Transformer blocks; the decoder taps blocks L/4, L/2 and 3L/4 (3, 6, 9 of MONAI's 12).
    pub num_layers: i64,
    pub num_heads: i64,
    pub proj_type: ProjType,
    pub norm_name: NormKind,
    pub conv_block: bool,
    pub res_block: bool,
    pub dropout_rate: f64,
    pub qkv_bias: bool,
}

impl Default for UnetrConfig {
    fn default() -> Self {
        UnetrConfig {
            in_channels: 1,
            out_channels: 14,
            img_size: [96, 96, 96],
            feature_size: 16,
            hidden_size: 768,
            mlp_dim: 3072,
            num_layers: 12,
            num_heads: 12,
            proj_type: ProjType::Perceptron,
            norm_name: NormKind::Instance,
            conv_block: true,
            res_block: true,
            dropout_rate: 0.0,
            qkv_bias: false,
        }
    }
}

impl UnetrConfig {
    /// UNETR's patch edge: the decoder upsamples the token grid 16× (four 2× stages), so MONAI fixes it.
    pub const PATCH: i64 = 16;

    pub fn feat_size(&self) -> [i64; 3] {
        self.img_size.map(|s| s / Self::PATCH)
    }
    pub fn n_patches(&self) -> i64 {
        self.feat_size().iter().product()
    }
    /// Indices of the transformer blocks whose outputs feed encoders 2, 3 and 4.
    pub fn taps(&self) -> [usize; 3] {
        let l = self.num_layers as usize;
        [l / 4, l / 2, 3 * l / 4]
    }

    /// Refuses configurations MONAI would refuse, that cannot produce an output of the input's
    /// size, or that exceed a ceiling of [`limits`].
    pub fn validate(&self) -> Result<()> {
        const WHAT: &str = "UNETR";
        for (name, v, hi) in [
            ("in_channels", self.in_channels, limits::MAX_IN_CHANNELS),
            ("out_channels", self.out_channels, limits::MAX_CLASSES),
            ("feature_size", self.feature_size, limits::MAX_FEATURE_SIZE),
            ("hidden_size", self.hidden_size, limits::MAX_HIDDEN_SIZE),
            ("mlp_dim", self.mlp_dim, limits::MAX_MLP_DIM),
            ("num_heads", self.num_heads, limits::MAX_HEADS),
        ] {
            limits::within(WHAT, name, v, 1, hi)?;
        }
        limits::within(WHAT, "num_layers", self.num_layers, 4, limits::MAX_LAYERS)?;
        if self.hidden_size % self.num_heads != 0 {
            return Err(Error::invalid(format!(
                "hidden_size {} should be divisible by num_heads {}",
                self.hidden_size, self.num_heads
            )));
        }
        limits::roi(WHAT, "img_size", self.img_size)?;
        if self.img_size.iter().any(|&s| s % Self::PATCH != 0) {
            return Err(Error::invalid(format!(
                "img_size {:?}: each size must be a positive multiple of 16",
                self.img_size
            )));
        }
        if !(0.0..=1.0).contains(&self.dropout_rate) {
            return Err(Error::invalid(format!(
                "dropout_rate should be between 0 and 1, got {}",
                self.dropout_rate
            )));
        }
        limits::values(WHAT, self.values())
    }

    /// The values of every variable the network holds (what its model file stores, order heads
    /// aside), from the configuration alone.
    pub fn values(&self) -> i128 {
        let [inp, out, f, h, m, layers] = [
            self.in_channels,
            self.out_channels,
            self.feature_size,
            self.hidden_size,
            self.mlp_dim,
            self.num_layers,
        ]
        .map(i128::from);
        let batch = self.norm_name == NormKind::Batch;
        let block = |i: i128, o: i128| limits::conv_block_values(i, o, batch, self.res_block);
        let patch_dim = inp * i128::from(Self::PATCH.pow(3));
        let qkv_bias = if self.qkv_bias { 3 * h } else { 0 };
        // three LayerNorms (norm_cross_attn included), qkv, out_proj, the MLP
        let layer = 6 * h + 3 * h * h + qkv_bias + h * h + h + 2 * h * m + m + h;
        let vit = patch_dim * h + h + i128::from(self.n_patches()) * h + layers * layer + 2 * h;
        let pr_up = |o: i128, n: i128| {
            let tail = if self.conv_block { block(o, o) } else { 0 };
            8 * h * o + n * (8 * o * o + tail)
        };
        let up = |i: i128, o: i128| 8 * i * o + block(2 * o, o);
        vit + block(inp, f)
            + pr_up(2 * f, 2)
            + pr_up(4 * f, 1)
            + pr_up(8 * f, 0)
            + up(h, 8 * f)
            + up(8 * f, 4 * f)
            + up(4 * f, 2 * f)
            + up(2 * f, f)
            + f * out
            + out
    }

    /// Tensors whose shapes pin every size field (`order_classes`: the order heads').
    pub fn witnesses(&self, order_classes: Option<i64>) -> Vec<Witness> {
        let (inp, h, f) = (self.in_channels, self.hidden_size, self.feature_size);
        let patch = match self.proj_type {
            ProjType::Perceptron => Witness::new(
                "vit.patch_embedding.patch_embeddings.1.weight",
                &[h, inp * Self::PATCH.pow(3)],
                format!("proj_type perceptron, in_channels {inp} and hidden_size {h}"),
            ),
            ProjType::Conv => Witness::new(
                "vit.patch_embedding.patch_embeddings.weight",
                &[h, inp, Self::PATCH, Self::PATCH, Self::PATCH],
                format!("proj_type conv, in_channels {inp} and hidden_size {h}"),
            ),
        };
        let mut w = vec![
            patch,
            Witness::new(
                "vit.patch_embedding.position_embeddings",
                &[1, self.n_patches(), h],
                format!("img_size {:?} and hidden_size {h}", self.img_size),
            ),
            Witness::new(
                format!("vit.blocks.{}.mlp.linear1.weight", self.num_layers - 1),
                &[self.mlp_dim, h],
                format!(
                    "num_layers {} and mlp_dim {}",
                    self.num_layers, self.mlp_dim
                ),
            ),
            Witness::new(
                "encoder1.layer.conv1.conv.weight",
                &[f, inp, 3, 3, 3],
                format!("feature_size {f} and in_channels {inp}"),
            ),
            Witness::new(
                "out.conv.conv.weight",
                &[self.out_channels, f, 1, 1, 1],
                format!("out_channels {} and feature_size {f}", self.out_channels),
            ),
        ];
        if let Some(m) = order_classes {
            w.push(Witness::new(
                "vit.temp_head1.weight",
                &[m, h],
                format!("order_classes {m} and hidden_size {h}"),
            ));
        }
        w
    }
}

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

/// The pretext task's order-prediction heads: `Linear(hidden → m)` on the features after blocks
/// L/4, L/2, 3L/4 and on the final normed tokens, named `vit.temp_head{1..4}` as LWI-VMS names them.
#[derive(Debug)]
pub struct OrderHeads {
    pub heads: [Linear; 4],
}

impl OrderHeads {
    /// `p` is the model root; the heads live under `vit.`.
    pub fn new(p: &nn::Path, hidden: i64, classes: i64) -> Self {
        let vit = p / "vit";
        OrderHeads {
            heads: std::array::from_fn(|i| {
                Linear::new(
                    &(&vit / format!("temp_head{}", i + 1)),
                    hidden,
                    classes,
                    true,
                )
            }),
        }
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
