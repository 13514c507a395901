//! `lwi forward`: the raw network on a tensor, no preprocessing. The input file holds `x`
//! `[B, C, D, H, W]` (float, in the network's axis order and size); the output file gets every
//! output under its name (`logits`; `out1..3`; `recon`, `t1..t4` for an init-train model). The tool
//! a researcher proves parity with, and the one the parity tests call.

use crate::error::{Error, ErrorKind, Result, catch_panic};
use crate::model_file::Model;
use std::collections::HashMap;
use std::path::Path;
use tch::{Kind, Tensor};

/// Options of `lwi_forward` (none yet: the document must be an empty object).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardOptions {}

/// Runs `model` on `x` of the safetensors file `input` and writes its outputs to `output`
/// (through a temporary name). Returns the output names.
pub fn forward_file(model: &Model, input: &Path, output: &Path) -> Result<Vec<String>> {
    let bytes = crate::io::read_regular(input)?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::format(input, format!("not a safetensors file ({e})")))?;
    let view = file
        .tensor("x")
        .map_err(|_| Error::invalid(format!("{}: no tensor named \"x\"", input.display())))?;
    let x = crate::model_file::tensor_from_view(input, &view)
        .map_err(|e| Error::invalid(e.message))?
        .f_to_device(model.vs.device())?;
    let arch = &model.meta.arch;
    let want = arch.img_size();
    let size = x.size();
    if size.len() != 5 || size[1] != arch.in_channels() || size[2..] != want {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "{}: x is {size:?}; this {} model takes [B, {}, {}, {}, {}]",
                input.display(),
                arch.name(),
                arch.in_channels(),
                want[0],
                want[1],
                want[2]
            ),
        ));
    }
    let outputs = catch_panic(|| {
        Ok(tch::no_grad(|| {
            let depth = model.meta.preprocessing.pipeline().depth_axis();
            model
                .net
                .outputs_along(&x, model.order_heads.as_ref(), Some(depth))
        }))
    })?;
    let names = outputs.iter().map(|(n, _)| n.clone()).collect();
    let named = outputs
        .into_iter()
        .map(|(n, t)| Ok((n, t.f_to_kind(Kind::Float)?.f_to_device(tch::Device::Cpu)?)))
        .collect::<Result<Vec<(String, Tensor)>>>()?;
    let meta = HashMap::from([("lwi_forward".to_string(), arch.name().to_string())]);
    crate::model_file::write_safetensors(output, named, meta)?;
    Ok(names)
}
