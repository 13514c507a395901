//! Python pickles read without running them: a stack machine that builds values and calls nothing.
//! A callable applied to arguments stays a description of the call (`OrderedDict()` excepted, which
//! is a dict). Every global the pickle names (GLOBAL, STACK_GLOBAL, INST, or the extension registry)
//! is checked against the allow-list of the file's kind when it is named, wherever it sits and
//! whether or not its value is used: Python would import it, and may call it, while loading.
//!
//! Bounded whatever the input: a pickle is at most [`MAX_BYTES`], builds at most [`MAX_VALUES`]
//! values (a memo fetch shares the value, as Python does, instead of copying it), and a container
//! built more than [`MAX_DEPTH`] deep is refused. Nothing here or in a reader of the values
//! recurses, so neither deep nesting nor a container that holds itself can overflow the stack.

use crate::error::{Error, ErrorKind, Result};
use crate::io::files::open_regular;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::rc::Rc;

/// The largest pickle read (a plans file, a checkpoint's `data.pkl`); real ones hold well under 1 MB.
pub const MAX_BYTES: u64 = 64 << 20;
/// The most values one pickle may build (a state dict takes about 20 per tensor).
pub const MAX_VALUES: usize = 1_000_000;
/// The deepest nesting of containers and calls (plans nest about 5 deep, state dicts fewer).
pub const MAX_DEPTH: u32 = 100;

/// What a kind of file may hold.
pub struct Rules {
    /// Ends the refusal "the pickle names the Python global X, which …".
    pub not_held: &'static str,
    /// The globals (module, name) it may name, in groups: each is a data type or constructor.
    pub globals: &'static [&'static [(&'static str, &'static str)]],
    /// Whether it may refer to persistent ids (a PyTorch checkpoint's storages).
    pub persistent_ids: bool,
}

/// `OrderedDict`, and numpy's dtypes, arrays and scalars (numpy 1 and 2 spellings): the plain
/// data of a trainer's bookkeeping and of nnU-Net's plans.
pub const PLAIN_DATA: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
];

/// A pickled value. Containers and calls live in the [`Tree`]'s arena and are referred to, so a
/// value the pickle shares (its memo) is one value, changed in place as Python changes it.
#[derive(Debug, Clone, PartialEq)]
pub enum Py {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    /// An allowed global, `module.name`.
    Global(Rc<str>),
    Ref(usize),
    /// A value lwi does not represent: an int beyond 64 bits, a persistent id.
    Opaque,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// A list, tuple, set or frozenset.
    List(Vec<Py>),
    Dict(Vec<(Py, Py)>),
    /// `callable(*args)`, then given `state` by BUILD; never run.
    Call {
        callable: Py,
        args: Py,
        state: Option<Py>,
    },
}

/// A read pickle: its root value and the containers values refer to.
#[derive(Debug)]
pub struct Tree {
    pub root: Py,
    arena: Vec<Node>,
}

impl Tree {
    /// The container or call a value refers to.
    pub fn node(&self, v: &Py) -> Option<&Node> {
        match v {
            Py::Ref(i) => self.arena.get(*i),
            _ => None,
        }
    }
    /// A list's (tuple's) items.
    pub fn items(&self, v: &Py) -> Option<&[Py]> {
        match self.node(v)? {
            Node::List(items) => Some(items),
            _ => None,
        }
    }
    /// The value of a dict's string key.
    pub fn get(&self, v: &Py, key: &str) -> Option<&Py> {
        match self.node(v)? {
            Node::Dict(items) => items
                .iter()
                .find(|(k, _)| matches!(k, Py::Str(s) if &**s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }
    /// The value of a dict's first or last entry.
    pub fn entry(&self, v: &Py, last: bool) -> Option<&Py> {
        match self.node(v)? {
            Node::Dict(items) => (if last { items.last() } else { items.first() }).map(|(_, v)| v),
            _ => None,
        }
    }
}

/// Reads the pickle that starts at `at`; returns it and where it ends (after STOP).
pub fn read(data: &[u8], at: usize, rules: &Rules) -> Result<(Tree, usize)> {
    if at > data.len() {
        return Err(invalid("the pickle starts beyond the data"));
    }
    let mut m = Machine {
        data,
        at,
        rules,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        arena: Vec::new(),
        depth: Vec::new(),
        built: 0,
    };
    let root = m.run()?;
    Ok((
        Tree {
            root,
            arena: m.arena,
        },
        m.at,
    ))
}

/// A pickle file's bytes, refused beyond [`MAX_BYTES`] before any is read.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    let (file, len) = open_regular(path)?;
    if len > MAX_BYTES {
        return Err(Error::format(
            path,
            format!("{len} bytes; a pickle lwi reads is at most {MAX_BYTES} bytes"),
        ));
    }
    read_up_to(path, file, len)
}

/// The first [`MAX_BYTES`] of a file (all of it when shorter): where a legacy checkpoint's
/// pickles are.
pub fn read_head(path: &Path) -> Result<Vec<u8>> {
    let (file, len) = open_regular(path)?;
    read_up_to(path, file, len.min(MAX_BYTES))
}

/// At most `len` bytes from `reader`, into memory reserved first (refused as OUT_OF_MEMORY when it
/// cannot be); `path` names the file in messages.
pub fn read_up_to(path: &Path, reader: impl Read, len: u64) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(len as usize).map_err(|_| {
        Error::new(
            ErrorKind::OutOfMemory,
            format!("{}: cannot allocate {len} bytes to read it", path.display()),
        )
    })?;
    reader
        .take(len)
        .read_to_end(&mut bytes)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => Error::format(path, e),
            _ => Error::io(path, e),
        })?;
    Ok(bytes)
}

/// At most a short, escaped prefix of a string from the file, for messages.
pub fn quoted(s: &str) -> String {
    const MAX_CHARS: usize = 80;
    let mut q: String = s
        .chars()
        .take(MAX_CHARS)
        .flat_map(char::escape_debug)
        .collect();
    if s.chars().nth(MAX_CHARS).is_some() {
        q.push('…');
    }
    q
}

/// A value for messages: a number, a short escaped prefix of a string, or its kind.
pub fn describe(v: &Py) -> String {
    match v {
        Py::Str(s) => format!("'{}'", quoted(s)),
        Py::Int(i) => i.to_string(),
        Py::Float(f) => f.to_string(),
        Py::Bool(b) => b.to_string(),
        Py::None => "None".into(),
        Py::Bytes(b) => format!("{} bytes", b.len()),
        Py::Global(g) => g.to_string(),
        Py::Ref(_) => "a container".into(),
        Py::Opaque => "an object".into(),
    }
}

struct Machine<'a> {
    data: &'a [u8],
    at: usize,
    rules: &'a Rules,
    stack: Vec<Py>,
    /// Stack heights at each open MARK, innermost last.
    marks: Vec<usize>,
    memo: HashMap<u32, Py>,
    arena: Vec<Node>,
    /// How deeply each arena node nests containers (1 for one holding only scalars).
    depth: Vec<u32>,
    /// Values built so far, against [`MAX_VALUES`].
    built: usize,
}

fn invalid(message: impl Into<String>) -> Error {
    Error::invalid(message)
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or_else(|| invalid("the pickle ends early"))?;
        let s = &self.data[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn uint(&mut self, n: usize) -> Result<u64> {
        let b = self.take(n)?;
        Ok(b.iter().rev().fold(0u64, |v, &x| (v << 8) | u64::from(x)))
    }
    /// A length prefix of `width` bytes; the bytes it counts must follow in the pickle.
    fn len(&mut self, width: usize) -> Result<usize> {
        let n = self.uint(width)?;
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.data.len() - self.at)
            .ok_or_else(|| invalid(format!("the pickle claims {n} bytes beyond its end")))
    }
    /// A protocol 0 argument: the text up to the next newline.
    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.at..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| invalid("the pickle ends inside a line"))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.at += n + 1;
        Ok(s)
    }
    fn count(&mut self) -> Result<()> {
        self.built += 1;
        if self.built > MAX_VALUES {
            return Err(invalid(format!(
                "the pickle builds more than {MAX_VALUES} values"
            )));
        }
        Ok(())
    }
    fn push(&mut self, v: Py) -> Result<()> {
        self.count()?;
        self.stack.push(v);
        Ok(())
    }
    fn pop(&mut self) -> Result<Py> {
        if self.marks.last() == Some(&self.stack.len()) {
            return Err(invalid("the pickle pops a MARK as a value"));
        }
        self.stack
            .pop()
            .ok_or_else(|| invalid("the pickle pops an empty stack"))
    }
    /// The values above the innermost MARK, which is closed.
    fn pop_mark(&mut self) -> Result<Vec<Py>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| invalid("the pickle has no MARK"))?;
        Ok(self.stack.split_off(m))
    }
    fn top(&self) -> Result<Py> {
        match self.stack.last() {
            Some(v) if self.marks.last() != Some(&self.stack.len()) => Ok(v.clone()),
            _ => Err(invalid("the pickle's stack is empty")),
        }
    }
    fn depth_of(&self, v: &Py) -> u32 {
        match v {
            Py::Ref(i) => self.depth[*i],
            _ => 0,
        }
    }
    /// Node `i` now holds values nesting `inner` deep: its depth grows to cover them.
    fn deepen(&mut self, i: usize, inner: u32) -> Result<()> {
        let depth = self.depth[i].max(inner + 1);
        if depth > MAX_DEPTH {
            return Err(invalid(format!(
                "the pickle nests containers more than {MAX_DEPTH} deep"
            )));
        }
        self.depth[i] = depth;
        Ok(())
    }
    fn deepest(&self, items: &[Py]) -> u32 {
        items.iter().map(|v| self.depth_of(v)).max().unwrap_or(0)
    }
    /// A new container or call, pushed as a reference.
    fn push_node(&mut self, n: Node) -> Result<()> {
        let inner = match &n {
            Node::List(items) => self.deepest(items),
            Node::Dict(items) => items
                .iter()
                .map(|(k, v)| self.depth_of(k).max(self.depth_of(v)))
                .max()
                .unwrap_or(0),
            Node::Call { callable, args, .. } => self.depth_of(callable).max(self.depth_of(args)),
        };
        self.arena.push(n);
        self.depth.push(0);
        let i = self.arena.len() - 1;
        self.deepen(i, inner)?;
        self.push(Py::Ref(i))
    }
    fn list(&mut self, items: Vec<Py>) -> Result<()> {
        self.push_node(Node::List(items))
    }
    /// The container on top of the stack, for APPEND(S), SETITEM(S), ADDITEMS and BUILD.
    fn top_index(&self) -> Result<usize> {
        match self.top()? {
            Py::Ref(i) => Ok(i),
            _ => Err(invalid("the pickle adds items to a scalar")),
        }
    }
    fn append(&mut self, items: Vec<Py>) -> Result<()> {
        let i = self.top_index()?;
        self.deepen(i, self.deepest(&items))?;
        match &mut self.arena[i] {
            Node::List(l) => l.extend(items),
            _ => return Err(invalid("the pickle appends to something not a list")),
        }
        Ok(())
    }
    fn set_items(&mut self, items: Vec<Py>) -> Result<()> {
        if items.len() % 2 != 0 {
            return Err(invalid("the pickle sets a key without a value"));
        }
        let i = self.top_index()?;
        self.deepen(i, self.deepest(&items))?;
        let Node::Dict(d) = &mut self.arena[i] else {
            return Err(invalid("the pickle sets items of something not a dict"));
        };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }
    /// `module.name`, if the file's kind may name it; else the refusal naming it.
    fn global(&self, module: &str, name: &str) -> Result<Py> {
        if self
            .rules
            .globals
            .iter()
            .any(|g| g.contains(&(module, name)))
        {
            return Ok(Py::Global(format!("{module}.{name}").into()));
        }
        Err(invalid(format!(
            "the pickle names the Python global {}.{}, which {} (byte {}); refused: lwi never runs code from a file (docs/formats.md lists what a pickle may name)",
            quoted(module),
            quoted(name),
            self.rules.not_held,
            self.at
        )))
    }
    /// `callable(*args)`: a description, or a dict for `OrderedDict()`.
    fn call(&mut self, callable: Py, args: Py) -> Result<()> {
        if matches!(&callable, Py::Global(g) if &**g == "collections.OrderedDict") {
            return self.push_node(Node::Dict(Vec::new()));
        }
        self.push_node(Node::Call {
            callable,
            args,
            state: None,
        })
    }
    fn build(&mut self, state: Py) -> Result<()> {
        let i = self.top_index()?;
        self.deepen(i, self.depth_of(&state))?;
        if let Node::Call { state: s, .. } = &mut self.arena[i] {
            *s = Some(state);
        }
        Ok(())
    }
    fn memo_put(&mut self, id: u32) -> Result<()> {
        self.count()?;
        let v = self.top()?;
        self.memo.insert(id, v);
        Ok(())
    }
    fn memo_get(&mut self, id: u32) -> Result<()> {
        let v = self.memo.get(&id).cloned();
        self.push(v.ok_or_else(|| invalid(format!("the pickle reads memo {id}, never set")))?)
    }
    fn text(&mut self, width: usize) -> Result<()> {
        let n = self.len(width)?;
        let s: Rc<str> = String::from_utf8_lossy(self.take(n)?).into();
        self.push(Py::Str(s))
    }
    fn bytes(&mut self, width: usize) -> Result<()> {
        let n = self.len(width)?;
        let b: Rc<[u8]> = self.take(n)?.into();
        self.push(Py::Bytes(b))
    }
    fn long(&mut self, width: usize) -> Result<()> {
        let n = self.len(width)?;
        let v = long(self.take(n)?);
        self.push(v)
    }
    fn persistent_id(&mut self) -> Result<()> {
        if !self.rules.persistent_ids {
            return Err(invalid(format!(
                "the pickle refers to a persistent id, which {}",
                self.rules.not_held
            )));
        }
        self.push(Py::Opaque)
    }

    fn run(&mut self) -> Result<Py> {
        loop {
            let op = self.take(1)?[0];
            if op == b'.' {
                return self.pop();
            }
            self.step(op)?;
        }
    }

    /// One opcode (pickletools names them).
    fn step(&mut self, op: u8) -> Result<()> {
        match op {
            0x80 => drop(self.take(1)?), // PROTO
            0x95 => drop(self.take(8)?), // FRAME: advisory
            b'(' => {
                self.count()?;
                self.marks.push(self.stack.len());
            }
            b'0' => drop(self.pop()?),
            b'1' => drop(self.pop_mark()?),
            b'2' => self.push(self.top()?)?,
            b'N' => self.push(Py::None)?,
            0x88 | 0x89 => self.push(Py::Bool(op == 0x88))?,
            b'J' => {
                let v = self.uint(4)? as u32 as i32;
                self.push(Py::Int(i64::from(v)))?
            }
            b'K' | b'M' => {
                let v = self.uint(if op == b'K' { 1 } else { 2 })?;
                self.push(Py::Int(v as i64))?
            }
            0x8a => self.long(1)?,
            0x8b => self.long(4)?,
            b'I' | b'L' => {
                let line = self.line()?;
                let v = text_int(&line)?;
                self.push(v)?
            }
            b'G' => {
                let b: [u8; 8] = self.take(8)?.try_into().unwrap_or([0; 8]);
                self.push(Py::Float(f64::from_be_bytes(b)))?
            }
            b'F' => {
                let line = self.line()?;
                let v = line.trim().parse::<f64>();
                self.push(Py::Float(
                    v.map_err(|_| invalid("the pickle's FLOAT is not a number"))?,
                ))?
            }
            0x8c => self.text(1)?,
            b'X' => self.text(4)?,
            0x8d => self.text(8)?,
            b'U' | b'C' => self.bytes(1)?,
            b'T' | b'B' => self.bytes(4)?,
            0x8e | 0x96 => self.bytes(8)?,
            b'}' => self.push_node(Node::Dict(Vec::new()))?,
            b']' | b')' | 0x8f => self.list(Vec::new())?,
            b'd' => {
                let items = self.pop_mark()?;
                self.push_node(Node::Dict(Vec::new()))?;
                self.set_items(items)?
            }
            b'l' | b't' | 0x91 => {
                let items = self.pop_mark()?;
                self.list(items)?
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                let floor = self.marks.last().copied().unwrap_or(0);
                let at = self.stack.len().checked_sub(n).filter(|&a| a >= floor);
                let at = at.ok_or_else(|| invalid("the pickle's tuple is short"))?;
                let items = self.stack.split_off(at);
                self.list(items)?
            }
            b'a' => {
                let v = self.pop()?;
                self.append(vec![v])?
            }
            b'e' | 0x90 => {
                let items = self.pop_mark()?;
                self.append(items)?
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.set_items(vec![k, v])?
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.set_items(items)?
            }
            0x94 => {
                let id = u32::try_from(self.memo.len()).unwrap_or(u32::MAX);
                self.memo_put(id)?
            }
            b'q' | b'r' => {
                let id = self.uint(if op == b'q' { 1 } else { 4 })? as u32;
                self.memo_put(id)?
            }
            b'p' => {
                let id = memo_index(&self.line()?)?;
                self.memo_put(id)?
            }
            b'h' | b'j' => {
                let id = self.uint(if op == b'h' { 1 } else { 4 })? as u32;
                self.memo_get(id)?
            }
            b'g' => {
                let id = memo_index(&self.line()?)?;
                self.memo_get(id)?
            }
            _ => self.step_objects(op)?,
        }
        Ok(())
    }

    /// The opcodes that name globals, call and build objects, or refer outside the pickle.
    fn step_objects(&mut self, op: u8) -> Result<()> {
        match op {
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                let g = self.global(&module, &name)?;
                self.push(g)?
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Py::Str(m), Py::Str(n)) = (module, name) else {
                    return Err(invalid("the pickle's STACK_GLOBAL has no names"));
                };
                let g = self.global(&m, &n)?;
                self.push(g)?
            }
            b'i' => {
                let module = self.line()?;
                let name = self.line()?;
                let g = self.global(&module, &name)?;
                let args = self.pop_mark()?;
                self.list(args)?;
                let args = self.pop()?;
                self.call(g, args)?
            }
            0x82..=0x84 => {
                let code = self.uint(1 << (op - 0x82))?;
                return Err(invalid(format!(
                    "the pickle names a global by its extension code {code}, which {}",
                    self.rules.not_held
                )));
            }
            b'R' | 0x81 => {
                let args = self.pop()?;
                let callable = self.pop()?;
                self.call(callable, args)?
            }
            0x92 => {
                let _kwargs = self.pop()?;
                let args = self.pop()?;
                let callable = self.pop()?;
                self.call(callable, args)?
            }
            b'o' => {
                let mut items = self.pop_mark()?.into_iter();
                let callable = items
                    .next()
                    .ok_or_else(|| invalid("the pickle's OBJ has no class"))?;
                self.list(items.collect())?;
                let args = self.pop()?;
                self.call(callable, args)?
            }
            b'b' => {
                let state = self.pop()?;
                self.build(state)?
            }
            b'Q' => {
                self.pop()?;
                self.persistent_id()?
            }
            b'P' => {
                self.line()?;
                self.persistent_id()?
            }
            other => {
                return Err(invalid(format!(
                    "pickle opcode 0x{other:02x} at byte {} is not read (text strings of protocol 0, out-of-band buffers)",
                    self.at - 1
                )));
            }
        }
        Ok(())
    }
}

/// LONG1/LONG4's little-endian two's-complement bytes: an int, or opaque beyond 64 bits.
fn long(b: &[u8]) -> Py {
    let n = b.len();
    if n == 0 {
        return Py::Int(0);
    }
    if n > 8 {
        return Py::Opaque;
    }
    let mut x = b.iter().rev().fold(0i64, |v, &c| (v << 8) | i64::from(c));
    if n < 8 && b[n - 1] & 0x80 != 0 {
        x -= 1i64 << (8 * n);
    }
    Py::Int(x)
}

/// INT/LONG's decimal text (`01`/`00` are protocol 0's True/False).
fn text_int(line: &str) -> Result<Py> {
    let t = line.trim().trim_end_matches('L');
    match t {
        "01" => return Ok(Py::Bool(true)),
        "00" => return Ok(Py::Bool(false)),
        _ => {}
    }
    if !t.is_empty()
        && t.trim_start_matches('-')
            .bytes()
            .all(|c| c.is_ascii_digit())
    {
        return Ok(t.parse().map(Py::Int).unwrap_or(Py::Opaque));
    }
    Err(invalid(format!(
        "the pickle's INT '{}' is not a number",
        quoted(t)
    )))
}

fn memo_index(line: &str) -> Result<u32> {
    line.trim().parse().map_err(|_| {
        invalid(format!(
            "the pickle's memo index '{}' is not a number",
            quoted(line)
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: Rules = Rules {
        not_held: "a test file does not hold",
        globals: &[&[("torch", "device"), ("collections", "OrderedDict")]],
        persistent_ids: false,
    };

    fn refusal(bytes: &[u8]) -> String {
        read(bytes, 0, &RULES).expect_err("refused").message
    }

    fn binunicode(s: &str) -> Vec<u8> {
        let mut b = vec![b'X'];
        b.extend((s.len() as u32).to_le_bytes());
        b.extend(s.as_bytes());
        b
    }

    #[test]
    fn a_foreign_global_inside_an_allowed_call_is_refused_by_name() {
        // torch.device(posix.system("echo")), as GLOBAL and as STACK_GLOBAL with memoised names.
        let mut p = b"\x80\x02ctorch\ndevice\ncposix\nsystem\n".to_vec();
        p.extend(binunicode("echo"));
        p.extend(b"\x85R\x85R.");
        assert!(refusal(&p).contains("global posix.system, which a test file does not hold"));
        let mut p = b"\x80\x04".to_vec();
        p.extend(binunicode("posix"));
        p.extend(b"\x94");
        p.extend(binunicode("system"));
        p.extend(b"\x94h\x00h\x01\x93.");
        assert!(
            refusal(&p).contains("global posix.system,"),
            "{}",
            refusal(&p)
        );
    }

    #[test]
    fn inst_and_the_extension_registry_name_globals_too() {
        let mut p = b"(".to_vec();
        p.extend(binunicode("echo"));
        p.extend(b"iposix\nsystem\n.");
        assert!(refusal(&p).contains("global posix.system,"));
        assert!(refusal(b"\x80\x02\x82\x07)R.").contains("extension code 7"));
        assert!(refusal(b"\x80\x02\x83\x07\x01)R.").contains("extension code 263"));
    }

    #[test]
    fn a_global_name_is_quoted_short_and_escaped() {
        let long = format!("c{}\x1b\nsystem\n.", "m".repeat(10_000));
        let m = refusal(long.as_bytes());
        assert!(m.len() < 400 && m.contains("mmm…"), "{m}");
        let m = refusal(b"cposix\x1b[2J\nsystem\n.");
        assert!(m.contains(r"posix\u{1b}[2J.system"), "{m}");
    }

    #[test]
    fn allowed_globals_and_ordered_dicts_read() {
        let mut p = b"\x80\x02ccollections\nOrderedDict\n)R".to_vec();
        p.extend(binunicode("device"));
        p.extend(b"ctorch\ndevice\n");
        p.extend(binunicode("cpu"));
        p.extend(b"\x85Rs.");
        let (t, end) = read(&p, 0, &RULES).unwrap();
        assert_eq!(end, p.len());
        let Some(Node::Call { callable, args, .. }) =
            t.get(&t.root, "device").and_then(|d| t.node(d))
        else {
            panic!("device is a call");
        };
        assert_eq!(*callable, Py::Global("torch.device".into()));
        assert_eq!(t.items(args), Some(&[Py::Str("cpu".into())][..]));
    }

    #[test]
    fn nesting_is_bounded_without_recursion() {
        let depth = 100_000;
        let mut p = b"]".repeat(depth);
        p.extend(b"a".repeat(depth - 1));
        p.push(b'.');
        assert!(refusal(&p).contains("more than 100 deep"));
        let mut p = b"]".repeat(MAX_DEPTH as usize);
        p.extend(b"a".repeat(MAX_DEPTH as usize - 1));
        p.push(b'.');
        assert!(read(&p, 0, &RULES).is_ok());
    }

    #[test]
    fn a_memo_fetch_shares_the_value_instead_of_copying_it() {
        // An 8 MB bytes memoised once and fetched 2,000 times: 16 GB if each fetch copied it.
        let mut p = b"\x80\x04]\x94(B".to_vec();
        p.extend(8_000_000u32.to_le_bytes());
        p.extend(vec![0u8; 8_000_000]);
        p.push(0x94);
        p.extend(b"h\x01".repeat(1999));
        p.extend(b"e.");
        let (t, _) = read(&p, 0, &RULES).unwrap();
        let items = t.items(&t.root).unwrap();
        assert_eq!(items.len(), 2000);
        let Py::Bytes(b) = &items[0] else {
            panic!("bytes")
        };
        assert_eq!(Rc::strong_count(b), 2000); // the 2,000 items hold one buffer
    }

    #[test]
    fn the_values_a_pickle_builds_are_bounded() {
        let mut p = b"]".to_vec();
        p.extend(b"Na".repeat(MAX_VALUES));
        p.push(b'.');
        assert!(refusal(&p).contains("more than 1000000 values"));
    }

    #[test]
    fn lengths_beyond_the_pickle_are_refused_before_allocating() {
        let mut p = vec![0x8e];
        p.extend((1u64 << 62).to_le_bytes());
        assert!(refusal(&p).contains("claims 4611686018427387904 bytes beyond its end"));
        assert!(refusal(b"\x8c\xff").contains("beyond its end"));
    }

    #[test]
    fn persistent_ids_only_where_the_kind_has_them() {
        assert!(refusal(b"NQ.").contains("persistent id, which a test file does not hold"));
        let rules = Rules {
            persistent_ids: true,
            ..RULES
        };
        assert_eq!(read(b"NQ.", 0, &rules).unwrap().0.root, Py::Opaque);
    }

    #[test]
    fn consecutive_pickles_read_in_turn() {
        let p = b"\x80\x02K\x07.\x80\x02}.";
        let (first, end) = read(p, 0, &RULES).unwrap();
        assert_eq!((first.root, end), (Py::Int(7), 5));
        let (second, end) = read(p, end, &RULES).unwrap();
        assert!(matches!(second.node(&second.root), Some(Node::Dict(d)) if d.is_empty()));
        assert_eq!(end, p.len());
    }
}
