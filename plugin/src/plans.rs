//! nnU-Net v1 plans: the pickle beside a checkpoint (`model_final_checkpoint.model.pkl`, whose
//! `plans` entry it is, or `plans.pkl` itself). It holds dicts, lists, numbers, strings and numpy
//! arrays and scalars, so a minimal pickle machine reads it here: it builds values and never calls
//! anything; numpy scalars and arrays are decoded from their bytes, `OrderedDict` is a dict, and
//! any other callable stays an opaque value. What lwi takes from the plans: the target spacing
//! and patch of the full-resolution stage, and the CT normalisation of the first modality.

use crate::bundle::CtNormalization;
use crate::error::{Error, Result};
use std::path::Path;

/// A pickled Python value, as far as plans need one. Containers live in the machine's arena and
/// are referred to, so an object the pickle shares (its memo) is one object, changed in place by
/// SETITEMS, APPENDS and BUILD as Python changes it.
#[derive(Debug, Clone, PartialEq)]
enum Py {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Global(String),
    Ref(usize),
    Mark,
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    List(Vec<Py>),
    Dict(Vec<(Py, Py)>),
    /// A callable applied to its arguments, then (BUILD) given a state; never run.
    Call(String, Vec<Py>, Option<Py>),
    /// A decoded numpy array or scalar.
    Numbers(Vec<f64>),
}

/// What the plans say about the model lwi imports.
#[derive(Debug, Clone, PartialEq)]
pub struct Plans {
    /// Target spacing per stored voxel axis (x, y, z), mm: the plans' (z, y, x) reversed.
    pub spacing: [f64; 3],
    /// The patch in the network's axes (z, y, x).
    pub patch: [i64; 3],
    pub ct_normalization: CtNormalization,
}

/// The most values a plans pickle may build: plans hold a few thousand (a list per case).
const MAX_VALUES: usize = 10_000_000;

struct Machine<'a> {
    data: &'a [u8],
    at: usize,
    stack: Vec<Py>,
    memo: std::collections::HashMap<u32, Py>,
    arena: Vec<Node>,
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or_else(|| Error::invalid("the pickle ends early"))?;
        let s = &self.data[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn uint(&mut self, n: usize) -> Result<u64> {
        let b = self.take(n)?;
        Ok(b.iter().rev().fold(0u64, |v, &x| (v << 8) | u64::from(x)))
    }
    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.at..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| Error::invalid("the pickle ends inside a GLOBAL"))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.at += n + 1;
        Ok(s)
    }
    fn text(&mut self, n: usize) -> Result<Py> {
        Ok(Py::Str(String::from_utf8_lossy(self.take(n)?).into_owned()))
    }
    fn pop(&mut self) -> Result<Py> {
        self.stack
            .pop()
            .ok_or_else(|| Error::invalid("the pickle pops an empty stack"))
    }
    /// The values above the topmost MARK, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<Py>> {
        let m = self
            .stack
            .iter()
            .rposition(|v| *v == Py::Mark)
            .ok_or_else(|| Error::invalid("the pickle has no MARK"))?;
        let items = self.stack.split_off(m + 1);
        self.stack.pop();
        Ok(items)
    }
    fn push(&mut self, v: Py) -> Result<()> {
        if self.stack.len() + self.arena.len() > MAX_VALUES {
            return Err(Error::invalid(
                "the pickle builds more values than plans hold",
            ));
        }
        self.stack.push(v);
        Ok(())
    }
    /// A new container, pushed as a reference.
    fn push_node(&mut self, n: Node) -> Result<()> {
        self.arena.push(n);
        self.push(Py::Ref(self.arena.len() - 1))
    }
    fn top(&self) -> Result<Py> {
        self.stack
            .last()
            .cloned()
            .ok_or_else(|| Error::invalid("the pickle's stack is empty"))
    }
    /// The container the top of the stack refers to.
    fn top_node(&mut self) -> Result<&mut Node> {
        match self.top()? {
            Py::Ref(i) => Ok(&mut self.arena[i]),
            other => Err(Error::invalid(format!(
                "the pickle adds items to {other:?}, not a container"
            ))),
        }
    }

    fn run(mut self) -> Result<(Py, Vec<Node>)> {
        loop {
            let op = self.take(1)?[0];
            match op {
                0x80 => drop(self.take(1)?),                  // PROTO
                0x95 => drop(self.take(8)?),                  // FRAME
                b'.' => return Ok((self.pop()?, self.arena)), // STOP
                b'(' => self.stack.push(Py::Mark),
                b'}' => self.push_node(Node::Dict(Vec::new()))?,
                b']' | b')' | 0x8f => self.push_node(Node::List(Vec::new()))?,
                b'N' => self.push(Py::None)?,
                0x88 => self.push(Py::Bool(true))?,
                0x89 => self.push(Py::Bool(false))?,
                b'J' => {
                    let v = self.uint(4)? as u32 as i32;
                    self.push(Py::Int(i64::from(v)))?
                }
                b'K' => {
                    let v = self.uint(1)?;
                    self.push(Py::Int(v as i64))?
                }
                b'M' => {
                    let v = self.uint(2)?;
                    self.push(Py::Int(v as i64))?
                }
                0x8a => {
                    let n = self.uint(1)? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(Py::Int(long1(&b)))?
                }
                b'G' => {
                    let b: [u8; 8] = self.take(8)?.try_into().unwrap_or([0; 8]);
                    self.push(Py::Float(f64::from_be_bytes(b)))?
                }
                0x8c | b'X' | 0x8d => {
                    let width = match op {
                        0x8c => 1,
                        b'X' => 4,
                        _ => 8,
                    };
                    let n = self.uint(width)? as usize;
                    let v = self.text(n)?;
                    self.push(v)?
                }
                b'C' | b'B' | 0x8e => {
                    let width = match op {
                        b'C' => 1,
                        b'B' => 4,
                        _ => 8,
                    };
                    let n = self.uint(width)? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(Py::Bytes(b))?
                }
                0x94 => {
                    let v = self.top()?;
                    self.memo.insert(self.memo.len() as u32, v);
                }
                b'q' | b'r' => {
                    let id = self.uint(if op == b'q' { 1 } else { 4 })? as u32;
                    let v = self.top()?;
                    self.memo.insert(id, v);
                }
                b'h' | b'j' => {
                    let id = self.uint(if op == b'h' { 1 } else { 4 })? as u32;
                    let v = self.memo.get(&id).cloned();
                    self.push(v.ok_or_else(|| Error::invalid("the pickle reads an unset memo"))?)?
                }
                b't' | 0x91 => {
                    let items = self.pop_mark()?;
                    self.push_node(Node::List(items))?
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let at = self.stack.len().checked_sub(n);
                    let at = at.ok_or_else(|| Error::invalid("the pickle's tuple is short"))?;
                    let items = self.stack.split_off(at);
                    self.push_node(Node::List(items))?
                }
                b'a' => {
                    let v = self.pop()?;
                    if let Node::List(l) = self.top_node()? {
                        l.push(v);
                    }
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    if let Node::List(l) = self.top_node()? {
                        l.extend(items);
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    if let Node::Dict(d) = self.top_node()? {
                        d.push((k, v));
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if let Node::Dict(d) = self.top_node()? {
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            d.push((k, v));
                        }
                    }
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Py::Global(format!("{module}.{name}")))?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Py::Str(m), Py::Str(n)) = (module, name) else {
                        return Err(Error::invalid("the pickle's STACK_GLOBAL has no names"));
                    };
                    self.push(Py::Global(format!("{m}.{n}")))?
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let node = self.call(callable, args)?;
                    self.push_node(node)?
                }
                b'b' => {
                    let state = self.pop()?;
                    let Py::Ref(i) = self.top()? else {
                        continue; // BUILD on a scalar: nothing plans need
                    };
                    self.arena[i] = self.build(i, state)?;
                }
                other => {
                    return Err(Error::invalid(format!(
                        "pickle opcode 0x{other:02x} at byte {} is not one plans use",
                        self.at - 1
                    )));
                }
            }
        }
    }

    fn items(&self, v: &Py) -> Vec<Py> {
        match v {
            Py::Ref(i) => match &self.arena[*i] {
                Node::List(l) => l.clone(),
                _ => vec![v.clone()],
            },
            other => vec![other.clone()],
        }
    }

    /// A callable applied to its arguments, never run: the dicts and numpy scalars plans hold
    /// are rebuilt, anything else stays a description.
    fn call(&self, callable: Py, args: Py) -> Result<Node> {
        let Py::Global(name) = callable else {
            return Ok(Node::Call("?".into(), Vec::new(), None));
        };
        let args = self.items(&args);
        Ok(match name.as_str() {
            "collections.OrderedDict" => Node::Dict(Vec::new()),
            "numpy.core.multiarray.scalar" | "numpy._core.multiarray.scalar" => match &args[..] {
                [dtype, Py::Bytes(b)] => Node::Numbers(decode(&self.dtype_code(dtype), b)?),
                _ => Node::Call(name, args, None),
            },
            _ => Node::Call(name, args, None),
        })
    }

    /// BUILD on arena node `i`: a numpy array gets its dtype and bytes; anything else keeps its state.
    fn build(&self, i: usize, state: Py) -> Result<Node> {
        let node = self.arena[i].clone();
        let Node::Call(name, args, _) = node else {
            return Ok(node);
        };
        let parts = self.items(&state);
        if name.ends_with("multiarray._reconstruct") && parts.len() == 5 {
            if let Py::Bytes(b) = &parts[4] {
                return Ok(Node::Numbers(decode(&self.dtype_code(&parts[2]), b)?));
            }
            return Ok(Node::List(self.items(&parts[4])));
        }
        Ok(Node::Call(name, args, Some(state)))
    }

    /// The type code of a pickled `numpy.dtype("f8", …)`.
    fn dtype_code(&self, dtype: &Py) -> String {
        match dtype {
            Py::Ref(i) => match &self.arena[*i] {
                Node::Call(_, args, _) => match args.first() {
                    Some(Py::Str(c)) => c.clone(),
                    _ => String::new(),
                },
                _ => String::new(),
            },
            _ => String::new(),
        }
    }
}

/// LONG1's little-endian two's-complement bytes (up to 8).
fn long1(b: &[u8]) -> i64 {
    let n = b.len();
    if n == 0 || n > 8 {
        return 0;
    }
    let mut x = b.iter().rev().fold(0i64, |v, &c| (v << 8) | i64::from(c));
    if n < 8 && b[n - 1] & 0x80 != 0 {
        x -= 1i64 << (8 * n);
    }
    x
}

/// Little-endian numbers of a numpy type code.
fn decode(code: &str, bytes: &[u8]) -> Result<Vec<f64>> {
    let values = match code {
        "f8" => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect(),
        "f4" => bytes
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap_or([0; 4]))))
            .collect(),
        "i8" => bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f64)
            .collect(),
        "i4" => bytes
            .chunks_exact(4)
            .map(|c| f64::from(i32::from_le_bytes(c.try_into().unwrap_or([0; 4]))))
            .collect(),
        other => {
            return Err(Error::invalid(format!(
                "numpy dtype '{other}' in the plans: float64/32 and int64/32 are read"
            )));
        }
    };
    Ok(values)
}

/// The read pickle: its root and the containers it refers to.
struct Tree {
    root: Py,
    arena: Vec<Node>,
}

impl Tree {
    fn node(&self, v: &Py) -> Option<&Node> {
        match v {
            Py::Ref(i) => self.arena.get(*i),
            _ => None,
        }
    }
    fn get(&self, v: &Py, key: &str) -> Option<&Py> {
        match self.node(v)? {
            Node::Dict(items) => items
                .iter()
                .find(|(k, _)| matches!(k, Py::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }
    /// The value of a dict's first or last entry.
    fn entry(&self, v: &Py, last: bool) -> Option<&Py> {
        match self.node(v)? {
            Node::Dict(items) => (if last { items.last() } else { items.first() }).map(|(_, v)| v),
            _ => None,
        }
    }
    fn numbers(&self, v: Option<&Py>) -> Option<Vec<f64>> {
        match v? {
            Py::Float(f) => Some(vec![*f]),
            Py::Int(i) => Some(vec![*i as f64]),
            r @ Py::Ref(_) => match self.node(r)? {
                Node::Numbers(n) => Some(n.clone()),
                Node::List(items) => items
                    .iter()
                    .map(|i| self.numbers(Some(i)).and_then(|n| n.first().copied()))
                    .collect(),
                _ => None,
            },
            _ => None,
        }
    }
}

/// Reads the plans of an nnU-Net v1 checkpoint (`CKPT.model.pkl`) or a `plans.pkl`.
pub fn read(path: &Path) -> Result<Plans> {
    let bytes = crate::io::read_regular(path)?;
    let (root, arena) = Machine {
        data: &bytes,
        at: 0,
        stack: Vec::new(),
        memo: Default::default(),
        arena: Vec::new(),
    }
    .run()
    .map_err(|e| Error::format(path, e.message))?;
    let t = Tree { root, arena };
    let plans = t.get(&t.root, "plans").unwrap_or(&t.root);
    let missing = |what: &str| Error::format(path, format!("the plans have no {what}"));
    let transpose = t
        .numbers(t.get(plans, "transpose_forward"))
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
    if scheme != Some(&Py::Str("CT".into())) {
        return Err(Error::unsupported(format!(
            "{}: normalization scheme {scheme:?}: lwi imports CT models",
            path.display()
        )));
    }
    // The full-resolution stage: the last one.
    let stage = t
        .get(plans, "plans_per_stage")
        .and_then(|s| t.entry(s, true))
        .ok_or_else(|| missing("plans_per_stage"))?;
    let three = |key: &str| -> Result<[f64; 3]> {
        t.numbers(t.get(stage, key))
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
        t.numbers(t.get(intensity, key))
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
