//! nnU-Net v1 plans: the pickle beside a checkpoint (`model_final_checkpoint.model.pkl`, whose
//! `plans` entry it is, or `plans.pkl` itself). It holds dicts, lists, numbers, strings and numpy
//! arrays and scalars; [`crate::model_file::pickle`] reads it without running anything, refusing any other
//! global ([`RULES`]), and the numpy values are decoded here from their bytes. What lwi takes from
//! the plans: the target spacing and patch of the full-resolution stage, and the CT normalisation
//! of the first modality.

use super::CtNormalization;
use super::pickle::{Node, PLAIN_DATA, Py, Rules, Tree};
use crate::error::{Error, Result};
use std::path::Path;

/// What plans may name: `OrderedDict` and numpy's dtypes, arrays and scalars.
pub const RULES: Rules = Rules {
    not_held: "nnU-Net plans do not hold",
    globals: &[PLAIN_DATA],
    persistent_ids: false,
};

/// What the plans say about the model lwi imports.
#[derive(Debug, Clone, PartialEq)]
pub struct Plans {
    /// Target spacing per stored voxel axis (x, y, z), mm: the plans' (z, y, x) reversed.
    pub spacing: [f64; 3],
    /// The patch in the network's axes (z, y, x).
    pub patch: [i64; 3],
    pub ct_normalization: CtNormalization,
}

/// The most numbers an array lwi reads from the plans may hold (it reads triples and scalars).
const MAX_NUMBERS: usize = 16;

/// A numpy dtype's type code (`f8`, `i8`, …), if it is little-endian or native.
fn dtype_code(t: &Tree, dtype: &Py) -> Option<String> {
    let Some(Node::Call { args, state, .. }) = t.node(dtype) else {
        return None;
    };
    let order = state
        .as_ref()
        .and_then(|s| t.items(s))
        .and_then(|s| s.get(1));
    if matches!(order, Some(Py::Str(o)) if &**o == ">") {
        return None;
    }
    match t.items(args)?.first()? {
        Py::Str(code) => Some(code.to_string()),
        _ => None,
    }
}

/// A number: a Python int or float, or a numpy scalar.
fn scalar(t: &Tree, v: &Py) -> Option<f64> {
    match v {
        Py::Float(f) => Some(*f),
        Py::Int(i) => Some(*i as f64),
        Py::Ref(_) => match numpy(t, v)?[..] {
            [x] => Some(x),
            _ => None,
        },
        _ => None,
    }
}

/// The numbers of a numpy scalar (`scalar(dtype, bytes)`) or array (`_reconstruct(…)` built with
/// `(version, shape, dtype, fortran, bytes or items)`).
fn numpy(t: &Tree, v: &Py) -> Option<Vec<f64>> {
    let Some(Node::Call {
        callable: Py::Global(name),
        args,
        state,
    }) = t.node(v)
    else {
        return None;
    };
    if name.ends_with("multiarray.scalar") {
        return match t.items(args)? {
            [dtype, Py::Bytes(b)] => decode(&dtype_code(t, dtype)?, b),
            _ => None,
        };
    }
    if !name.ends_with("multiarray._reconstruct") {
        return None;
    }
    match t.items(state.as_ref()?)? {
        [_, _, dtype, _, Py::Bytes(b)] => decode(&dtype_code(t, dtype)?, b),
        [_, _, _, _, items @ Py::Ref(_)] => list(t, items),
        _ => None,
    }
}

/// Each item of a list or tuple as a number.
fn list(t: &Tree, v: &Py) -> Option<Vec<f64>> {
    let items = t.items(v)?;
    if items.len() > MAX_NUMBERS {
        return None;
    }
    items.iter().map(|i| scalar(t, i)).collect()
}

/// A number, or a list, tuple or numpy array of numbers (never more than [`MAX_NUMBERS`]).
fn numbers(t: &Tree, v: Option<&Py>) -> Option<Vec<f64>> {
    let v = v?;
    if let Some(x) = scalar(t, v) {
        return Some(vec![x]);
    }
    numpy(t, v).or_else(|| list(t, v))
}

/// Little-endian numbers of a numpy type code.
fn decode(code: &str, bytes: &[u8]) -> Option<Vec<f64>> {
    let width = match code {
        "f8" | "i8" => 8,
        "f4" | "i4" => 4,
        _ => return None,
    };
    if bytes.len() % width != 0 || bytes.len() / width > MAX_NUMBERS {
        return None;
    }
    let values = bytes.chunks_exact(width).map(|c| {
        let mut b = [0u8; 8];
        b[..width].copy_from_slice(c);
        match code {
            "f8" => f64::from_le_bytes(b),
            "f4" => f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            "i8" => i64::from_le_bytes(b) as f64,
            _ => f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        }
    });
    Some(values.collect())
}

/// Reads the plans of an nnU-Net v1 checkpoint (`CKPT.model.pkl`) or a `plans.pkl`.
pub fn read(path: &Path) -> Result<Plans> {
    from_bytes(path, &crate::model_file::pickle::read_file(path)?)
}

/// The plans in a pickle's bytes; `path` names the file in messages.
pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Plans> {
    let (t, _) = crate::model_file::pickle::read(bytes, 0, &RULES)
        .map_err(|e| Error::format(path, e.message))?;
    let plans = t.get(&t.root, "plans").unwrap_or(&t.root);
    let missing = |what: &str| Error::format(path, format!("the plans have no readable {what}"));
    let transpose = numbers(&t, t.get(plans, "transpose_forward"))
        .ok_or_else(|| missing("transpose_forward"))?;
    if transpose != [0.0, 1.0, 2.0] {
        return Err(Error::unsupported(format!(
            "{}: transpose_forward {transpose:?}: lwi reads plans that keep the axis order ([0, 1, 2])",
            path.display()
        )));
    }
    let scheme = t
        .get(plans, "normalization_schemes")
        .and_then(|s| t.entry(s, false));
    if !matches!(scheme, Some(Py::Str(s)) if &**s == "CT") {
        return Err(Error::unsupported(format!(
            "{}: normalization scheme {}: lwi imports CT models",
            path.display(),
            scheme.map_or("none".into(), crate::model_file::pickle::describe)
        )));
    }
    // The full-resolution stage: the last one.
    let stage = t
        .get(plans, "plans_per_stage")
        .and_then(|s| t.entry(s, true))
        .ok_or_else(|| missing("plans_per_stage"))?;
    let three = |key: &str| -> Result<[f64; 3]> {
        numbers(&t, t.get(stage, key))
            .and_then(|v| <[f64; 3]>::try_from(v).ok())
            .ok_or_else(|| missing(key))
    };
    let [sz, sy, sx] = three("current_spacing")?;
    let patch = three("patch_size")?.map(|p| p as i64);
    let intensity = t
        .get(plans, "dataset_properties")
        .and_then(|d| t.get(d, "intensityproperties"))
        .and_then(|i| t.entry(i, false))
        .ok_or_else(|| missing("intensityproperties"))?;
    let value = |key: &str| -> Result<f64> {
        numbers(&t, t.get(intensity, key))
            .and_then(|v| v.first().copied())
            .ok_or_else(|| missing(key))
    };
    Ok(Plans {
        spacing: [sx, sy, sz],
        patch,
        ct_normalization: CtNormalization {
            lower: value("percentile_00_5")?,
            upper: value("percentile_99_5")?,
            mean: value("mean")?,
            sd: value("sd")?,
        },
    })
}

#[cfg(test)]
mod tests {
    fn read(bytes: &[u8]) -> crate::error::Result<super::Plans> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plans.pkl");
        std::fs::write(&path, bytes).unwrap();
        super::read(&path)
    }

    /// `{"transpose_forward": VALUE}` at protocol 4.
    fn plans_with(value: &[u8]) -> Vec<u8> {
        let mut p = b"\x80\x04}\x8c\x11transpose_forward".to_vec();
        p.extend(value);
        p.extend(b"s.");
        p
    }

    #[test]
    fn a_foreign_global_is_refused_where_its_value_is_never_read() {
        let mut p = b"\x80\x04}\x8c\x04hookcposix\nsystem\nX\x04\x00\x00\x00echo\x85Rs".to_vec();
        p.extend(&plans_with(b"]")[3..]);
        let e = read(&p).unwrap_err();
        assert!(e.message.contains("plans.pkl"), "{}", e.message);
        assert!(
            e.message
                .contains("global posix.system, which nnU-Net plans do not hold")
        );
    }

    #[test]
    fn plans_nested_100000_deep_are_refused() {
        let depth = 100_000;
        let mut nested = b"]".repeat(depth);
        nested.extend(b"a".repeat(depth - 1));
        let e = read(&plans_with(&nested)).unwrap_err();
        assert!(e.message.contains("nests containers more than 100 deep"));
    }

    #[test]
    fn a_list_that_holds_itself_is_not_a_triple() {
        // l = []; l.append(l): a loop, which no reader of the values may follow for ever.
        let e = read(&plans_with(b"]\x94h\x00a")).unwrap_err();
        assert!(
            e.message.contains("no readable transpose_forward"),
            "{}",
            e.message
        );
    }
}
