//! What the engine asks of an architecture's configuration, whichever it is (candle's pattern: one
//! trait, one folder per implementation, a config that builds it). The configurations implement
//! it in their folders; [`super::ArchConfig`] hands out the one it holds.

use super::limits::Witness;
use crate::error::Result;

pub trait Architecture: std::fmt::Debug {
    /// The name the model file and `"arch"` use.
    fn name(&self) -> &'static str;
    /// Refuses what the upstream constructor would refuse, or what exceeds a ceiling of
    /// [`super::limits`].
    fn validate(&self) -> Result<()>;
    /// The values of every variable of the network (order heads aside), from the config alone.
    fn values(&self) -> i128;
    /// Tensors whose shapes pin every size field (`order_classes`: the order heads').
    fn witnesses(&self, order_classes: Option<i64>) -> Vec<Witness>;
    /// The keyword arguments, as the model file's `"config"` holds them.
    fn keyword_arguments(&self) -> serde_json::Value;
    fn in_channels(&self) -> i64;
    fn out_channels(&self) -> i64;
    fn set_out_channels(&mut self, n: i64);
    /// The network's input size along its three axes (the sliding window, the training patch).
    fn img_size(&self) -> [i64; 3];
    /// The tensors a stage-2 transfer makes fresh (the output heads), by name prefix.
    fn output_heads(&self) -> &'static [&'static str];
    /// The pretext order heads' name prefix (not carried into stage 2).
    fn order_head_prefix(&self) -> &'static str;
    /// The coarsest token grid an order head pools: every finer grid splits where it does, so
    /// slabs that split it split all of them.
    fn slab_tokens(&self) -> [i64; 3];
}
