//! Architectures as data: one enum of configurations, one enum of networks. Everything outside
//! `model/` asks a [`Network`] for what it needs (its outputs by name, its channels, its input
//! size, its fresh heads for transfer) and never matches tensor names itself. Adding an
//! architecture is a module under `model/` and one line in each enum.

use super::unetr::{OrderHeads, Unetr, UnetrConfig};
use super::unetr_pp::{PpOrderHeads, UnetrPp, UnetrPpConfig};
use crate::error::{Error, Result};
use crate::pretext::PretextConfig;
use tch::{Tensor, nn};

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
    /// The name the model file and `"arch"` use.
    pub fn name(&self) -> &'static str {
        match self {
            ArchConfig::Unetr(_) => "unetr",
            ArchConfig::UnetrPp(_) => "unetr_pp",
        }
    }

    /// From an architecture config document: the keyword arguments, plus `"arch"` (absent means
    /// "unetr", so files written before UNETR++ keep working).
    pub fn from_document(doc: &serde_json::Value, what: &str) -> Result<ArchConfig> {
        let mut doc = doc.clone();
        let arch = match doc.as_object_mut().and_then(|o| o.remove("arch")) {
            None => "unetr".to_string(),
            Some(serde_json::Value::String(s)) => s,
            Some(other) => {
                return Err(Error::invalid(format!(
                    "{what}: \"arch\" must be \"unetr\" or \"unetr_pp\", got {}",
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
                    "{what}: architecture '{other}' is not one lwi builds (unetr, unetr_pp)"
                )));
            }
        };
        cfg.validate()
            .map_err(|e| Error::invalid(format!("{what}: {}", e.message)))?;
        Ok(cfg)
    }

    /// The keyword arguments alone, as the model file's `"config"` holds them.
    pub fn keyword_arguments(&self) -> serde_json::Value {
        match self {
            ArchConfig::Unetr(c) => serde_json::to_value(c),
            ArchConfig::UnetrPp(c) => serde_json::to_value(c),
        }
        .unwrap_or_default()
    }

    pub fn validate(&self) -> Result<()> {
        match self {
            ArchConfig::Unetr(c) => c.validate(),
            ArchConfig::UnetrPp(c) => c.validate(),
        }
    }
    /// The values of every variable of the network (order heads aside), from the config alone.
    pub fn values(&self) -> i128 {
        match self {
            ArchConfig::Unetr(c) => c.values(),
            ArchConfig::UnetrPp(c) => c.values(),
        }
    }
    /// Before anything is built: the tensors named `shapes` (a file's) must have the shapes this
    /// configuration (with `order_classes` order heads) gives the tensors that pin its sizes.
    pub fn check_shapes(
        &self,
        order_classes: Option<i64>,
        shapes: &std::collections::HashMap<String, Vec<i64>>,
    ) -> Result<()> {
        let witnesses = match self {
            ArchConfig::Unetr(c) => c.witnesses(order_classes),
            ArchConfig::UnetrPp(c) => c.witnesses(order_classes),
        };
        super::limits::check_witnesses(&witnesses, shapes)
    }
    pub fn in_channels(&self) -> i64 {
        match self {
            ArchConfig::Unetr(c) => c.in_channels,
            ArchConfig::UnetrPp(c) => c.in_channels,
        }
    }
    pub fn out_channels(&self) -> i64 {
        match self {
            ArchConfig::Unetr(c) => c.out_channels,
            ArchConfig::UnetrPp(c) => c.out_channels,
        }
    }
    pub fn set_out_channels(&mut self, n: i64) {
        match self {
            ArchConfig::Unetr(c) => c.out_channels = n,
            ArchConfig::UnetrPp(c) => c.out_channels = n,
        }
    }
    /// The network's input size along its three axes (the sliding-window roi).
    pub fn img_size(&self) -> [i64; 3] {
        match self {
            ArchConfig::Unetr(c) => c.img_size,
            ArchConfig::UnetrPp(c) => c.img_size,
        }
    }
    /// The tensors a stage-2 transfer makes fresh (the output heads), by name prefix.
    pub fn output_heads(&self) -> &'static [&'static str] {
        match self {
            ArchConfig::Unetr(_) => &["out.conv."],
            ArchConfig::UnetrPp(_) => &["out1.", "out2.", "out3."],
        }
    }
    /// Where the pretext shuffles slabs: the roi axis (UNETR's z is its last, UNETR++'s first) and
    /// the coarsest token grid every order head pools (all finer grids split where it does).
    pub fn pretext_geometry(&self) -> (usize, [i64; 3]) {
        match self {
            ArchConfig::Unetr(c) => (2, c.feat_size()),
            ArchConfig::UnetrPp(c) => (0, c.grid(3)),
        }
    }
    /// The pretext order heads' name prefix (not carried into stage 2).
    pub fn order_head_prefix(&self) -> &'static str {
        match self {
            ArchConfig::Unetr(_) => "vit.temp_head",
            ArchConfig::UnetrPp(_) => "temp_head",
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
    /// the tokens pooled by `cfg.grouping`.
    pub fn pretext(
        &self,
        x: &Tensor,
        heads: &PretextHeads,
        cfg: &PretextConfig,
        train: bool,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        match (self, heads) {
            (Network::Unetr(n), PretextHeads::Unetr(h)) => {
                let (recon, features) = n.forward_features(x, train);
                let logits = crate::pretext::order_logits(&features, h, cfg, n.config.feat_size());
                Ok((recon, logits))
            }
            (Network::UnetrPp(n), PretextHeads::UnetrPp(h)) => {
                let all = n.forward_all(x, train);
                let logits = h.forward_grouped(&all.hidden, cfg.grouping);
                Ok((all.out1, logits.into()))
            }
            _ => Err(Error::internal("order heads of another architecture")),
        }
    }

    /// Every output of the raw network, by name: `logits` (UNETR); `out1`, `out2`, `out3`
    /// (UNETR++, deep supervision included); with order heads, `recon` for the full-resolution
    /// output and `t1..t4` (UNETR's heads pool by depth slab, UNETR++'s as upstream).
    pub fn outputs(&self, x: &Tensor, heads: Option<&PretextHeads>) -> Vec<(String, Tensor)> {
        match (self, heads) {
            (Network::Unetr(n), None) => vec![("logits".into(), n.forward_t(x, false))],
            (Network::Unetr(n), Some(PretextHeads::Unetr(h))) => {
                let (recon, features) = n.forward_features(x, false);
                let cfg = crate::pretext::PretextConfig {
                    slabs: h.heads[0].weight.size()[0],
                    ..Default::default()
                };
                let logits = crate::pretext::order_logits(&features, h, &cfg, n.config.feat_size());
                let mut out = vec![("recon".to_string(), recon)];
                out.extend(
                    logits
                        .into_iter()
                        .enumerate()
                        .map(|(i, t)| (format!("t{}", i + 1), t)),
                );
                out
            }
            (Network::UnetrPp(n), heads) => {
                let all = n.forward_all(x, false);
                let first = if heads.is_some() { "recon" } else { "out1" };
                let mut out = vec![(first.to_string(), all.out1.shallow_clone())];
                out.extend(
                    all.deep
                        .iter()
                        .enumerate()
                        .map(|(i, t)| (format!("out{}", i + 2), t.shallow_clone())),
                );
                if let Some(PretextHeads::UnetrPp(h)) = heads {
                    let t = h.forward(&all.hidden);
                    out.extend(
                        t.into_iter()
                            .enumerate()
                            .map(|(i, t)| (format!("t{}", i + 1), t)),
                    );
                }
                out
            }
            (Network::Unetr(_), Some(PretextHeads::UnetrPp(_))) => Vec::new(),
        }
    }
}
