//! UNETR's hyperparameters: MONAI `UNETR`'s keyword arguments, their checks, and the sizes they
//! give (the values stored, the tensors that pin each field).

use crate::error::{Error, Result};
use crate::model::architecture::Architecture;
use crate::model::blocks::NormKind;
use crate::model::limits::{self, Witness};
use serde::{Deserialize, Serialize};

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

impl Architecture for UnetrConfig {
    fn name(&self) -> &'static str {
        "unetr"
    }
    fn validate(&self) -> Result<()> {
        UnetrConfig::validate(self)
    }
    fn values(&self) -> i128 {
        UnetrConfig::values(self)
    }
    fn witnesses(&self, order_classes: Option<i64>) -> Vec<Witness> {
        UnetrConfig::witnesses(self, order_classes)
    }
    fn keyword_arguments(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
    fn in_channels(&self) -> i64 {
        self.in_channels
    }
    fn out_channels(&self) -> i64 {
        self.out_channels
    }
    fn set_out_channels(&mut self, n: i64) {
        self.out_channels = n;
    }
    fn img_size(&self) -> [i64; 3] {
        self.img_size
    }
    fn output_heads(&self) -> &'static [&'static str] {
        &["out.conv."]
    }
    fn order_head_prefix(&self) -> &'static str {
        "vit.temp_head"
    }
    fn slab_tokens(&self) -> [i64; 3] {
        self.feat_size()
    }
}
