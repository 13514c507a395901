//! UNETR++ checkpoints (upstream's and LWI-VMS's, nnU-Net v1 trainers) renamed to lwi's variables.

use crate::error::{Error, Result};
use std::collections::HashMap;
use tch::Tensor;

/// The checkpoint's tensors under lwi's names (upstream's, without `module.`), without
/// `num_batches_tracked` (eval and momentum 0.1 never read it) and without EPA's `F`, which
/// upstream ties to `E`: accepted only when equal to it.
pub fn renamed(raw: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let mut tensors: HashMap<String, Tensor> = raw
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("module.").unwrap_or(&k).to_string(), v))
        .filter(|(k, _)| !k.ends_with(".num_batches_tracked"))
        .collect();
    let tied: Vec<String> = tensors
        .keys()
        .filter(|k| k.contains(".epa_block.F."))
        .cloned()
        .collect();
    for f in tied {
        let e = f.replace(".epa_block.F.", ".epa_block.E.");
        let same = tensors
            .get(&e)
            .is_some_and(|t| t.size() == tensors[&f].size() && t.equal(&tensors[&f]));
        if !same {
            return Err(Error::invalid(format!(
                "{f} differs from {e}: upstream's EPA ties F to E"
            )));
        }
        tensors.remove(&f);
    }
    Ok(tensors)
}
