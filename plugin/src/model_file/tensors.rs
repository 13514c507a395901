//! The safetensors container of model files and checkpoints: named float tensors out (sorted, as
//! float32, through a temporary name) and in (any float dtype, as float32).

use super::bounds;
use crate::error::{Error, ErrorKind, Result};
use crate::io::write_atomically;
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Writes named tensors as float32 safetensors, sorted by name, with `metadata`, through a
/// temporary name: the same tensors give the same bytes.
pub(crate) fn write_safetensors(
    path: &Path,
    mut named: Vec<(String, Tensor)>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut blobs = Vec::with_capacity(named.len());
    for (name, t) in &named {
        let t = t
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Float)?
            .f_contiguous()?;
        let mut data = vec![0u8; t.numel() * 4];
        t.f_copy_data_u8(&mut data, t.numel())?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        blobs.push((name.clone(), shape, data));
    }
    let views = blobs
        .iter()
        .map(|(name, shape, data)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::internal(format!("tensor {name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, Some(metadata.clone()))
        .map_err(|e| Error::internal(e.to_string()))?;
    check_header_size(path, &bytes, &metadata)?;
    write_atomically(path, &bytes)
}

/// Whatever is written must read back: a header beyond the reader's ceiling is refused, naming
/// the largest metadata field.
fn check_header_size(path: &Path, bytes: &[u8], metadata: &HashMap<String, String>) -> Result<()> {
    let header = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes);
    if header <= bounds::MAX_HEADER_BYTES {
        return Ok(());
    }
    let (field, size) = metadata
        .iter()
        .map(|(k, v)| match serde_json::from_str(v) {
            Ok(doc) => largest_field(k.clone(), &doc),
            Err(_) => (k.clone(), v.len()),
        })
        .max_by_key(|(_, size)| *size)
        .unwrap_or_default();
    Err(Error::invalid(format!(
        "{}: not written: its header would be {header} bytes, more than the {} a reader accepts \
         (the largest field, {field}, is {size} bytes)",
        path.display(),
        bounds::MAX_HEADER_BYTES
    )))
}

/// The dotted path and JSON size of the largest field under `doc`, through nested objects.
fn largest_field(path: String, doc: &serde_json::Value) -> (String, usize) {
    let size = |v: &serde_json::Value| serde_json::to_string(v).map_or(0, |t| t.len());
    match doc {
        serde_json::Value::Object(fields) => fields
            .iter()
            .max_by_key(|(_, v)| size(v))
            .map(|(k, v)| largest_field(format!("{path}.{k}"), v))
            .unwrap_or((path, 2)),
        other => (path, size(other)),
    }
}

/// A float tensor of a safetensors file, as float32.
pub(crate) fn tensor_from_view(
    path: &Path,
    view: &safetensors::tensor::TensorView<'_>,
) -> Result<Tensor> {
    use safetensors::Dtype;
    let kind = match view.dtype() {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        other => {
            return Err(Error::new(
                ErrorKind::ModelIncompatible,
                format!(
                    "{}: tensor dtype {other:?} is not a float type",
                    path.display()
                ),
            ));
        }
    };
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    Ok(Tensor::f_from_data_size(view.data(), &shape, kind)?.f_to_kind(Kind::Float)?)
}
