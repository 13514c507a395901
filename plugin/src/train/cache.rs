//! The preprocessed cache on disk, as nnU-Net keeps its preprocessed folder: each case prepared once
//! and stored as one safetensors file (image `[1, z, y, x]` float32, labels uint8, the class
//! locations int64), named by the sha256 of the case's files and of the settings that shaped it, so
//! that a changed file or setting is prepared afresh. Entries are read memory-mapped: the image and
//! labels stay in the page cache, not in the process's own memory. An entry that does not read back
//! (truncated, foreign, damaged) is rebuilt with a warning; entries are written to a temporary
//! name and renamed, so concurrent runs never see half a file.

use crate::dataset::Entry as DatasetEntry;
use crate::error::{Error, Result};
use crate::pipeline::nnunet::fingerprint::Fingerprint;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Bumped whenever what an entry holds or how it is prepared changes.
const FORMAT: &str = "lwi-cache-1";

pub(super) struct Cache {
    dir: PathBuf,
}

/// A case's tensors as stored: `image`, optional `label`, and `loc.N` per foreground class N.
pub(super) struct Entry {
    pub tensors: HashMap<String, Tensor>,
    /// The mapping the `image` and `label` tensors point into (declared last: dropped after them).
    pub map: memmap2::Mmap,
}

impl Cache {
    pub fn open(dir: &Path) -> Result<Cache> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        Ok(Cache {
            dir: dir.to_path_buf(),
        })
    }

    /// The fingerprint of the cases whose files hash to `hashes`, computed once.
    pub fn fingerprint(
        &self,
        hashes: &[String],
        compute: impl FnOnce() -> Result<Fingerprint>,
    ) -> Result<Fingerprint> {
        let path = self
            .dir
            .join(format!("{}.fingerprint.json", key(hashes, "fingerprint")));
        if let Some(print) = std::fs::read(&path)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|text| crate::options::from_document(&text, "fingerprint cache").ok())
        {
            return Ok(print);
        }
        let print = compute()?;
        let text = serde_json::to_vec(&print).map_err(|e| Error::internal(e.to_string()))?;
        crate::io::write_atomically(&path, &text)?;
        Ok(print)
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.safetensors"))
    }

    /// The entry under `key`, if one reads back whole; `Err` carries why it does not.
    pub fn get(&self, key: &str) -> Option<std::result::Result<Entry, String>> {
        let path = self.path(key);
        let file = std::fs::File::open(&path).ok()?;
        // SAFETY: entries are only ever replaced by rename, never written in place, so the mapped
        // file does not change under the mapping.
        let map = match unsafe { memmap2::Mmap::map(&file) } {
            Ok(m) => m,
            Err(e) => return Some(Err(e.to_string())),
        };
        Some(read_entry(map, key))
    }

    /// Stores `tensors` under `key` (atomically).
    pub fn put(&self, key: &str, tensors: &[(String, Tensor)]) -> Result<()> {
        let mut blobs = Vec::new();
        for (name, t) in tensors {
            let t = t.f_to_device(Device::Cpu)?.f_contiguous()?;
            let dtype = match t.kind() {
                Kind::Float => Dtype::F32,
                Kind::Uint8 => Dtype::U8,
                Kind::Int64 => Dtype::I64,
                other => return Err(Error::internal(format!("cache: {name} is {other:?}"))),
            };
            let mut data = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
            t.f_copy_data_u8(&mut data, t.numel())?;
            let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
            blobs.push((name.clone(), dtype, shape, data));
        }
        let views = blobs
            .iter()
            .map(|(name, dtype, shape, data)| {
                TensorView::new(*dtype, shape.clone(), data)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| Error::internal(format!("cache tensor {name}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let metadata = HashMap::from([("lwi_cache".to_string(), key.to_string())]);
        let bytes = safetensors::serialize(views, Some(metadata))
            .map_err(|e| Error::internal(e.to_string()))?;
        crate::io::write_atomically(&self.path(key), &bytes)
    }
}

/// The sha256 of a case's files (image, then label when `with_label`), hex.
pub(super) fn case_hash(entry: &DatasetEntry, with_label: bool) -> Result<String> {
    let mut h = Sha256::new();
    h.update(crate::io::read_regular(&entry.image)?);
    if let (true, Some(label)) = (with_label, &entry.label) {
        h.update(crate::io::read_regular(label)?);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// A cache key: the format, what is being made and the inputs' hashes.
pub(super) fn key(hashes: &[String], settings: &str) -> String {
    let mut h = Sha256::new();
    h.update(FORMAT);
    h.update(settings);
    for s in hashes {
        h.update(s);
    }
    format!("{:x}", h.finalize())
}

/// The tensors of a mapped entry: `image` and `label` point into the mapping when aligned.
fn read_entry(map: memmap2::Mmap, key: &str) -> std::result::Result<Entry, String> {
    let (_, header) = SafeTensors::read_metadata(&map).map_err(|e| e.to_string())?;
    let stamp = header.metadata().as_ref().and_then(|m| m.get("lwi_cache"));
    if stamp.map(String::as_str) != Some(key) {
        return Err("not this case's entry".into());
    }
    let file = SafeTensors::deserialize(&map).map_err(|e| e.to_string())?;
    let mut tensors = HashMap::new();
    for (name, view) in file.tensors() {
        let kind = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::U8 => Kind::Uint8,
            Dtype::I64 => Kind::Int64,
            other => return Err(format!("{name} is {other:?}")),
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let data = view.data();
        let aligned = (data.as_ptr() as usize) % kind.elt_size_in_bytes() == 0;
        let t = if aligned && !name.starts_with("loc.") {
            let strides = contiguous_strides(&shape);
            // SAFETY: the pointer and length come from the mapping, which `Entry` keeps alive for
            // as long as the tensors; the tensors are only read (patches are copies).
            unsafe { Tensor::from_blob(data.as_ptr(), &shape, &strides, kind, Device::Cpu) }
        } else {
            Tensor::f_from_data_size(data, &shape, kind).map_err(|e| e.to_string())?
        };
        tensors.insert(name, t);
    }
    if !tensors.contains_key("image") {
        return Err("no image".into());
    }
    Ok(Entry { tensors, map })
}

fn contiguous_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}
