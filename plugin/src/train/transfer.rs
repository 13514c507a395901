//! From stage 1 to stage 2: the learned initialization carried into a fine-tune model.

use crate::error::{Error, ErrorKind, Result};
use crate::model::load_state_dict;
use crate::model_file::{Model, Pipeline, Stage};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Tensor};

/// Stage 2 starts from every stage-1 tensor except the output heads (the network names them),
/// fresh for the dataset's classes; the order heads are not carried (they get no gradient in
/// stage 2). Returns stage 1's training history.
pub(super) fn transfer_from_init(
    model: &Model,
    init: &Path,
    device: Device,
) -> Result<Vec<crate::model_file::EpochRecord>> {
    let stage1 = Model::load(init, device)?;
    if stage1.meta.stage != Stage::Init {
        return Err(Error::new(
            ErrorKind::ModelIncompatible,
            format!(
                "{}: not an init-train model (stage {:?})",
                init.display(),
                stage1.meta.stage
            ),
        ));
    }
    let mut want = stage1.meta.arch.clone();
    want.set_out_channels(model.meta.arch.out_channels());
    if want != model.meta.arch {
        return Err(Error::new(
            ErrorKind::ModelIncompatible,
            format!(
                "{}: its architecture {} differs from the one asked for {}",
                init.display(),
                serde_json::to_string(&stage1.meta.arch).unwrap_or_default(),
                serde_json::to_string(&model.meta.arch).unwrap_or_default()
            ),
        ));
    }
    // nnU-Net's preprocessing comes from the dataset's fingerprint: another dataset's would
    // prepare the cases differently from how stage 1 saw them.
    let (had, has) = (&stage1.meta.preprocessing, &model.meta.preprocessing);
    if has.pipeline() == Pipeline::NnUnet && had != has {
        return Err(Error::new(
            ErrorKind::ModelIncompatible,
            format!(
                "{}: its dataset fingerprint's preprocessing {} does not match this dataset's {}: \
                 fine-tune on the cases it was init-trained on, with their labels",
                init.display(),
                had.to_document(),
                has.to_document()
            ),
        ));
    }
    let arch = &model.meta.arch;
    let mut tensors: HashMap<String, Tensor> = stage1
        .vs
        .variables()
        .into_iter()
        .filter(|(k, _)| !k.starts_with(arch.order_head_prefix()))
        .collect();
    for (k, v) in model
        .vs
        .variables()
        .into_iter()
        .filter(|(k, _)| arch.output_heads().iter().any(|h| k.starts_with(h)))
    {
        tensors.insert(k, v.detach().copy());
    }
    load_state_dict(&model.vs, &tensors)?;
    Ok(stage1.meta.provenance.history.init.clone())
}
