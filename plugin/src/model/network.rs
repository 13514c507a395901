//! Architectures as data: one enum of configurations, one enum of networks, the registry of
//! their names. Everything outside `model/` asks an [`ArchConfig`] (through the [`Architecture`]
//! trait) or a [`Network`] for what it needs and never matches tensor names itself. Adding an
//! architecture is a folder under `model/`, its name in [`NAMES`] and one arm in each `match`
//! here, plus one in the checkpoint import's dispatch (`model_file::import`) and one naming the
//! recipe it was published with (`train::Recipe::for_arch`).

use super::architecture::Architecture;
use super::slab_order::{Grouping, SlabPooling};
use super::unetr::{self, OrderHeads, Unetr, UnetrConfig};
use super::unetr_pp::{self, PpOrderHeads, UnetrPp, UnetrPpConfig};
use crate::error::{Error, Result};
use tch::{Tensor, nn};

/// The architectures lwi builds, by the name files, configs and the command use.
pub const NAMES: &[&str] = &["unetr", "unetr_pp"];

/// An architecture and its hyperparameters: the upstream constructor's keyword arguments.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "arch", content = "config", rename_all = "snake_case")]
pub enum ArchConfig {
    /// MONAI's UNETR (keyword names of `monai.networks.nets.UNETR`).
    Unetr(UnetrConfig),
    /// UNETR++ (keyword names of upstream's `UNETR_PP`).
    UnetrPp(UnetrPpConfig),
}

impl Default for ArchConfig {
    fn default() -> Self {
        ArchConfig::Unetr(UnetrConfig::default())
    }
}

impl ArchConfig {
    /// From an architecture config document: the keyword arguments, plus `"arch"` (absent means
    /// "unetr", so files written before UNETR++ keep working).
    pub fn from_document(doc: &serde_json::Value, what: &str) -> Result<ArchConfig> {
        let mut doc = doc.clone();
        let arch = match doc.as_object_mut().and_then(|o| o.remove("arch")) {
            None => ArchConfig::default().name().to_string(),
            Some(serde_json::Value::String(s)) => s,
            Some(other) => {
                return Err(Error::invalid(format!(
                    "{what}: \"arch\" must be one of {}, got {}",
                    NAMES.join(", "),
                    crate::options::describe(&other)
                )));
            }
        };
        Self::from_parts(&arch, &doc.to_string(), what)
    }

    /// From an architecture name and its keyword arguments (JSON text).
    pub fn from_parts(arch: &str, config: &str, what: &str) -> Result<ArchConfig> {
        let cfg = match arch {
            "unetr" => ArchConfig::Unetr(crate::options::parse(config, what)?),
            "unetr_pp" => ArchConfig::UnetrPp(crate::options::parse(config, what)?),
            other => {
                return Err(Error::unsupported(format!(
                    "{what}: architecture '{other}' is not one lwi builds ({})",
                    NAMES.join(", ")
                )));
            }
        };
        cfg.validate()
            .map_err(|e| Error::invalid(format!("{what}: {}", e.message)))?;
        Ok(cfg)
    }

    /// Before anything is built: the tensors named `shapes` (a file's) must have the shapes this
    /// configuration (with `order_classes` order heads) gives the tensors that pin its sizes.
    pub fn check_shapes(
        &self,
        order_classes: Option<i64>,
        shapes: &std::collections::HashMap<String, Vec<i64>>,
    ) -> Result<()> {
        super::limits::check_witnesses(&self.witnesses(order_classes), shapes)
    }
}

/// One `match` hands out the configuration behind the [`Architecture`] trait: every fact the
/// engine asks of an architecture (`arch.img_size()`, `arch.output_heads()`, …) goes through it.
impl std::ops::Deref for ArchConfig {
    type Target = dyn Architecture;
    fn deref(&self) -> &(dyn Architecture + 'static) {
        match self {
            ArchConfig::Unetr(c) => c,
            ArchConfig::UnetrPp(c) => c,
        }
    }
}

impl std::ops::DerefMut for ArchConfig {
    fn deref_mut(&mut self) -> &mut (dyn Architecture + 'static) {
        match self {
            ArchConfig::Unetr(c) => c,
            ArchConfig::UnetrPp(c) => c,
        }
    }
}

/// A built network of one of the architectures.
#[derive(Debug)]
pub enum Network {
    Unetr(Box<Unetr>),
    UnetrPp(Box<UnetrPp>),
}

/// The pretext task's order heads of either architecture.
#[derive(Debug)]
pub enum PretextHeads {
    Unetr(OrderHeads),
    UnetrPp(PpOrderHeads),
}

impl Network {
    pub fn new(p: &nn::Path, cfg: &ArchConfig) -> Result<Network> {
        Ok(match cfg {
            ArchConfig::Unetr(c) => Network::Unetr(Box::new(Unetr::new(p, c)?)),
            ArchConfig::UnetrPp(c) => Network::UnetrPp(Box::new(UnetrPp::new(p, c)?)),
        })
    }

    /// The order heads for `classes` slabs, named as the architecture's reference names them.
    pub fn order_heads(&self, p: &nn::Path, classes: i64) -> PretextHeads {
        match self {
            Network::Unetr(n) => {
                PretextHeads::Unetr(OrderHeads::new(p, n.config.hidden_size, classes))
            }
            Network::UnetrPp(n) => {
                PretextHeads::UnetrPp(PpOrderHeads::new(p, n.config.dims, classes))
            }
        }
    }

    /// Full-resolution logits `[B, out, roi]`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        match self {
            Network::Unetr(n) => n.forward_t(x, train),
            Network::UnetrPp(n) => n.forward_t(x, train),
        }
    }

    /// Training outputs, finest first: UNETR's logits; UNETR++'s `out1..3` (deep supervision).
    pub fn deep_outputs(&self, x: &Tensor, train: bool) -> Vec<Tensor> {
        match self {
            Network::Unetr(n) => vec![n.forward_t(x, train)],
            Network::UnetrPp(n) => {
                let all = n.forward_all(x, train);
                std::iter::once(all.out1).chain(all.deep).collect()
            }
        }
    }

    /// The pretext forward pass: the reconstruction and the order logits `[B, m, m]` of each head,
    /// the tokens pooled per slab as `pooling` says (a `PretextConfig` gives its own).
    pub fn pretext(
        &self,
        x: &Tensor,
        heads: &PretextHeads,
        pooling: impl Into<SlabPooling>,
        train: bool,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let SlabPooling { grouping, axis } = pooling.into();
        match (self, heads) {
            (Network::Unetr(n), PretextHeads::Unetr(h)) => {
                let (recon, features) = n.forward_features(x, train);
                let axis = axis.unwrap_or(unetr::HOME_AXIS);
                Ok((
                    recon,
                    h.logits(&features, grouping, axis, n.config.feat_size()),
                ))
            }
            (Network::UnetrPp(n), PretextHeads::UnetrPp(h)) => {
                let all = n.forward_all(x, train);
                let axis = axis.unwrap_or(unetr_pp::HOME_AXIS);
                let grids = std::array::from_fn(|i| n.config.grid(i));
                let logits = h.forward_along(&all.hidden, grouping, axis, grids);
                Ok((all.out1, logits.into()))
            }
            _ => Err(Error::internal("order heads of another architecture")),
        }
    }

    /// Every output of the raw network, by name: `logits` (UNETR); `out1`, `out2`, `out3`
    /// (UNETR++, deep supervision included); with order heads, `recon` for the full-resolution
    /// output and `t1..t4`, pooled as each architecture's reference pools them (UNETR's heads by
    /// depth slab, UNETR++'s as upstream) along its own recipe's depth axis.
    pub fn outputs(&self, x: &Tensor, heads: Option<&PretextHeads>) -> Vec<(String, Tensor)> {
        self.outputs_along(x, heads, None)
    }

    /// [`Network::outputs`] with UNETR's slabs along token-grid axis `depth` (`None`: its own), the
    /// axis a model trained with another recipe shuffled them along.
    pub fn outputs_along(
        &self,
        x: &Tensor,
        heads: Option<&PretextHeads>,
        depth: Option<usize>,
    ) -> Vec<(String, Tensor)> {
        let named = |first: &str, finest_first: Vec<Tensor>, logits: Vec<Tensor>| {
            let outs = finest_first.into_iter().enumerate().map(|(i, t)| match i {
                0 => (first.to_string(), t),
                i => (format!("out{}", i + 1), t),
            });
            let orders = logits
                .into_iter()
                .enumerate()
                .map(|(i, t)| (format!("t{}", i + 1), t));
            outs.chain(orders).collect()
        };
        match (self, heads) {
            (Network::Unetr(n), Some(PretextHeads::Unetr(h))) => {
                let (recon, features) = n.forward_features(x, false);
                let axis = depth.unwrap_or(unetr::HOME_AXIS);
                let t = h.logits(&features, Grouping::Slab, axis, n.config.feat_size());
                named("recon", vec![recon], t)
            }
            (Network::Unetr(n), _) => named("logits", vec![n.forward_t(x, false)], Vec::new()),
            (Network::UnetrPp(n), heads) => {
                let all = n.forward_all(x, false);
                let outs = std::iter::once(all.out1).chain(all.deep).collect();
                match heads {
                    Some(PretextHeads::UnetrPp(h)) => {
                        named("recon", outs, h.forward(&all.hidden).into())
                    }
                    _ => named("out1", outs, Vec::new()),
                }
            }
        }
    }
}
