//! Segmentation architectures as `tch::nn` modules, named like their reference state dicts: one
//! folder per architecture (`unetr/`, `unetr_pp/`: its config, network, order heads and
//! checkpoint renaming), the [`Architecture`] trait they answer through, and the registry
//! (`network.rs`) that names them. Shared blocks, precision and limits sit beside them.

pub mod architecture;
pub mod blocks;
pub mod dropout;
pub mod fused;
pub mod limits;
pub mod network;
pub mod precision;
pub mod slab_order;
pub mod unetr;
pub mod unetr_pp;

pub use architecture::Architecture;
pub use network::{ArchConfig, NAMES, Network, PretextHeads};
pub use precision::{Precision, with_precision};
pub use slab_order::{Grouping, SlabPooling};
pub use unetr::{OrderHeads, ProjType, Unetr, UnetrConfig};

use crate::error::{Error, ErrorKind, Result};
use std::collections::{BTreeSet, HashMap};
use tch::{Tensor, nn};

/// Copies named tensors into the variables of `vs`, strictly: every variable must be given, with
/// its exact shape and finite values, and nothing else. On any mismatch nothing is copied and the
/// error (`MODEL_INCOMPATIBLE`) names the missing, unexpected and misshapen tensors, or the first
/// (by name) holding a NaN or an infinity.
pub fn load_state_dict(vs: &nn::VarStore, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let vars = vs.variables();
    let missing: BTreeSet<&String> = vars.keys().filter(|k| !tensors.contains_key(*k)).collect();
    let unexpected: BTreeSet<&String> = tensors.keys().filter(|k| !vars.contains_key(*k)).collect();
    let misshapen: Vec<String> = vars
        .iter()
        .filter_map(|(k, v)| {
            let t = tensors.get(k)?;
            (t.size() != v.size()).then(|| {
                format!(
                    "{k} is {:?}, the architecture needs {:?}",
                    t.size(),
                    v.size()
                )
            })
        })
        .collect();
    if !missing.is_empty() || !unexpected.is_empty() || !misshapen.is_empty() {
        let list = |items: Vec<String>| {
            let n = items.len();
            let mut shown: Vec<String> = items.into_iter().take(6).collect();
            if n > 6 {
                shown.push(format!("… {} more", n - 6));
            }
            shown.join(", ")
        };
        let mut parts = Vec::new();
        if !missing.is_empty() {
            parts.push(format!(
                "missing tensors: {}",
                list(missing.into_iter().cloned().collect())
            ));
        }
        if !unexpected.is_empty() {
            parts.push(format!(
                "unexpected tensors: {}",
                list(unexpected.into_iter().cloned().collect())
            ));
        }
        if !misshapen.is_empty() {
            parts.push(format!("wrong shapes: {}", list(misshapen)));
        }
        return Err(Error::new(ErrorKind::ModelIncompatible, parts.join("; ")));
    }
    refuse_non_finite(vars.keys().map(|k| (k, &tensors[k])))?;
    tch::no_grad(|| -> Result<()> {
        for (k, v) in &vars {
            let mut v = v.shallow_clone();
            v.f_copy_(&tensors[k])?;
        }
        Ok(())
    })
}

/// Weights with a NaN or an infinity would compute NaN logits (every voxel background): refused,
/// naming the first such tensor by name.
fn refuse_non_finite<'a>(tensors: impl Iterator<Item = (&'a String, &'a Tensor)>) -> Result<()> {
    let mut named: Vec<_> = tensors.collect();
    named.sort_by_key(|(k, _)| *k);
    for (name, t) in named {
        if !t.is_floating_point() {
            continue;
        }
        if t.f_isfinite()?.f_all()?.f_int64_value(&[])? == 0 {
            return Err(Error::new(
                ErrorKind::ModelIncompatible,
                format!("tensor {name} holds NaN or infinite values; the weights are unusable"),
            ));
        }
    }
    Ok(())
}
