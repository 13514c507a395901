//! UNETR++'s hyperparameters: upstream `UNETR_PP`'s keyword arguments, their checks, the fixed
//! sizes upstream hard-codes, and the sizes they give (token grids, values stored, witnesses).

use crate::error::{Error, Result};
use crate::model::architecture::Architecture;
use crate::model::limits::{self, Witness};
use serde::{Deserialize, Serialize};

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
pub(super) const STEM: [i64; 3] = [2, 4, 4];
/// EPA projection size of every decoder stage (upstream never passes it to the decoders).
pub(super) const DECODER_PROJ: i64 = 64;
/// Upstream's dropout on both EPA attention maps and (`Dropout3d`) before `conv8`.
pub(super) const ATTENTION_DROPOUT: f64 = 0.15;
pub(super) const TAIL_DROPOUT: f64 = 0.1;
/// Depth of every decoder stage (upstream never passes it either).
pub(super) const DECODER_DEPTH: usize = 3;
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

impl Architecture for UnetrPpConfig {
    fn name(&self) -> &'static str {
        "unetr_pp"
    }
    fn validate(&self) -> Result<()> {
        UnetrPpConfig::validate(self)
    }
    fn values(&self) -> i128 {
        UnetrPpConfig::values(self)
    }
    fn witnesses(&self, order_classes: Option<i64>) -> Vec<Witness> {
        UnetrPpConfig::witnesses(self, order_classes)
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
        &["out1.", "out2.", "out3."]
    }
    fn order_head_prefix(&self) -> &'static str {
        "temp_head"
    }
    fn slab_tokens(&self) -> [i64; 3] {
        self.grid(3)
    }
}
