//! UNETR checkpoints (MONAI 1.x, MONAI 0.7 as LWI-VMS trained them) renamed to lwi's variables.

use std::collections::HashMap;
use tch::Tensor;

/// The checkpoint's tensors under lwi's names, without those that carry nothing lwi uses.
pub fn renamed(raw: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    raw.into_iter()
        .filter_map(|(k, v)| native_name(&k).map(|n| (n, v)))
        .collect()
}

/// The lwi name of a checkpoint tensor, or None for tensors that carry nothing lwi uses.
fn native_name(name: &str) -> Option<String> {
    let name = name.strip_prefix("module.").unwrap_or(name);
    if name.ends_with(".num_batches_tracked") || name == "vit.patch_embedding.cls_token" {
        return None;
    }
    Some(match name {
        "out.conv.weight" => "out.conv.conv.weight".into(),
        "out.conv.bias" => "out.conv.conv.bias".into(),
        other => other.into(),
    })
}

/// A MONAI 0.7 checkpoint fitted to the network's variables `vars`: MONAI 0.7 always created a
/// ResBlock's residual conv3 (and norm3), unused when the channel count does not change, which
/// lwi, like MONAI 1.x, does not have; and it had no (unused) norm_cross_attn, which gets
/// LayerNorm's initial values.
pub fn fit_monai_0_7(tensors: &mut HashMap<String, Tensor>, vars: &HashMap<String, Tensor>) {
    tensors
        .retain(|k, _| vars.contains_key(k) || !(k.contains(".conv3.") || k.contains(".norm3.")));
    if !tensors.keys().any(|k| k.contains(".norm_cross_attn.")) {
        for (k, v) in vars.iter().filter(|(k, _)| k.contains(".norm_cross_attn.")) {
            let fill = if k.ends_with("weight") {
                v.ones_like()
            } else {
                v.zeros_like()
            };
            tensors.insert(k.clone(), fill.detach());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::native_name;

    #[test]
    fn lwi_vms_names_map_to_monai_1x_names() {
        assert_eq!(
            native_name("out.conv.weight").as_deref(),
            Some("out.conv.conv.weight")
        );
        assert_eq!(
            native_name("module.vit.norm.bias").as_deref(),
            Some("vit.norm.bias")
        );
        assert_eq!(native_name("vit.patch_embedding.cls_token"), None);
        assert_eq!(
            native_name("encoder1.layer.norm1.num_batches_tracked"),
            None
        );
        assert_eq!(
            native_name("vit.temp_head2.weight").as_deref(),
            Some("vit.temp_head2.weight")
        );
    }
}
