//! A pickle reader for what `torch.save` writes, and nothing more.
//!
//! Python's unpickler runs whatever a file names (`os.system` included), so this one never calls
//! anything: it replays the opcodes (CPython's `Lib/pickletools.py` documents each) into a tree
//! of plain values. The only callables it knows are the handful `torch.save` emits for a
//! state_dict (the same spirit as torch's own `weights_only` unpickler); a reference to any other
//! global is refused by name before anything else happens, except for a few classes training
//! scripts store beside the weights, which become opaque placeholders that are never looked into.
//!
//! Memory stays proportional to the pickle's length whatever the bytes say: objects live in an
//! arena and the memo and stack hold indices into it, so `BINGET` copies a number, never a
//! subtree (a "billion laughs" pickle costs what its bytes cost), lengths are checked against
//! the bytes left before anything is allocated, and the memo and nesting are capped.

use std::collections::HashMap;

/// Most memo entries a pickle may define. A ResNet-101 Mask R-CNN's state_dict uses ~4,000,
/// a training checkpoint with optimizer state a few times that.
pub const MAX_MEMO: usize = 1 << 20;
/// Most objects (strings, containers, globals) a pickle may build: a ResNet-101 Mask R-CNN's
/// state_dict builds ~10,000. Each costs ~100 bytes, so 8 MB of `]` opcodes cannot take GBs.
pub const MAX_NODES: usize = 1 << 18;
/// Deepest the value stack may grow: torch.save batches dict items 1,000 at a time.
pub const MAX_STACK: usize = 1 << 16;
/// Most containers open at once (nested `MARK`s). torch.save's own nesting is under 10.
pub const MAX_NESTING: usize = 256;
/// Widest integer (`LONG1`/`LONG4`) accepted; the legacy format's magic number needs 10 bytes.
const MAX_INT_BYTES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    #[error("ends at byte {0} before the pickle's STOP")]
    Truncated(usize),
    #[error("opcode 0x{op:02x} at byte {at} is not one torch.save writes")]
    Opcode { op: u8, at: usize },
    #[error(
        "references `{0}`, which a checkpoint has no reason to contain; drape never runs code \
         from a checkpoint and refuses it"
    )]
    Refused(String),
    #[error(
        "holds a pickled `{0}` object (`torch.save(model)`), not a state_dict; in Python, \
         `torch.save(torch.load(path, weights_only=False).state_dict(), \"weights.pth\")` makes one"
    )]
    WholeModel(String),
    #[error("malformed at byte {at}: {reason}")]
    Malformed { at: usize, reason: String },
    #[error("exceeds a safety limit at byte {at}: {what}")]
    Limit { at: usize, what: String },
}

/// A value on the stack or inside a container. Anything bigger than a number is an index into
/// `Pickle::nodes`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i128),
    Float(f64),
    Ref(usize),
}

/// Element types of torch's typed storages (`torch.FloatStorage` …), as the pickle names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageType {
    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F64 => "float64",
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
            Self::I64 => "int64",
            Self::I32 => "int32",
            Self::I16 => "int16",
            Self::I8 => "int8",
            Self::U8 => "uint8",
            Self::Bool => "bool",
        }
    }
}

/// The callables a torch.save pickle may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    Storage(StorageType),
    /// A class that only builds plain data; its instances become [`Node::Opaque`].
    Data(&'static str),
}

/// Every global a pickle may reference, one line each; anything else is refused.
const GLOBALS: &[(&str, &str, Global)] = &[
    // Each state_dict is an OrderedDict.
    ("collections", "OrderedDict", Global::OrderedDict),
    // Tensor.__reduce_ex__: (storage, offset, size, stride, requires_grad, hooks[, metadata]).
    (
        "torch._utils",
        "_rebuild_tensor_v2",
        Global::RebuildTensorV2,
    ),
    // nn.Parameter wrappers around a tensor (a pickled module's or optimizer's parameters).
    (
        "torch._utils",
        "_rebuild_parameter",
        Global::RebuildParameter,
    ),
    (
        "torch._utils",
        "_rebuild_parameter_with_state",
        Global::RebuildParameterWithState,
    ),
    // Tensor subclasses: (rebuild function, type, its args, state).
    (
        "torch._tensor",
        "_rebuild_from_type_v2",
        Global::RebuildFromTypeV2,
    ),
    ("torch", "DoubleStorage", Global::Storage(StorageType::F64)),
    ("torch", "FloatStorage", Global::Storage(StorageType::F32)),
    ("torch", "HalfStorage", Global::Storage(StorageType::F16)),
    (
        "torch",
        "BFloat16Storage",
        Global::Storage(StorageType::BF16),
    ),
    ("torch", "LongStorage", Global::Storage(StorageType::I64)),
    ("torch", "IntStorage", Global::Storage(StorageType::I32)),
    ("torch", "ShortStorage", Global::Storage(StorageType::I16)),
    ("torch", "CharStorage", Global::Storage(StorageType::I8)),
    ("torch", "ByteStorage", Global::Storage(StorageType::U8)),
    ("torch", "BoolStorage", Global::Storage(StorageType::Bool)),
    // The `type` argument of _rebuild_from_type_v2.
    ("torch", "Tensor", Global::Data("torch.Tensor")),
    (
        "torch.nn.parameter",
        "Parameter",
        Global::Data("torch.nn.parameter.Parameter"),
    ),
    // Training scripts save these beside the weights (parsed arguments, metrics, shapes).
    ("argparse", "Namespace", Global::Data("argparse.Namespace")),
    ("builtins", "set", Global::Data("set")),
    ("torch", "Size", Global::Data("torch.Size")),
    ("torch", "device", Global::Data("torch.device")),
    // numpy scalars and arrays (a best metric as np.float64); bytes inside them come through
    // _codecs.encode under protocol 2.
    (
        "numpy.core.multiarray",
        "scalar",
        Global::Data("numpy scalar"),
    ),
    (
        "numpy._core.multiarray",
        "scalar",
        Global::Data("numpy scalar"),
    ),
    (
        "numpy.core.multiarray",
        "_reconstruct",
        Global::Data("numpy array"),
    ),
    (
        "numpy._core.multiarray",
        "_reconstruct",
        Global::Data("numpy array"),
    ),
    ("numpy", "ndarray", Global::Data("numpy array")),
    ("numpy", "dtype", Global::Data("numpy dtype")),
    ("_codecs", "encode", Global::Data("bytes")),
];

/// Modules whose classes are network layers: naming one means the whole model was pickled.
const MODEL_MODULES: &[&str] = &["torchvision.models.", "torch.nn.modules.", "__main__"];

fn lookup_global(module: &str, name: &str) -> Result<Global, PickleError> {
    if let Some(&(_, _, g)) = GLOBALS.iter().find(|(m, n, _)| *m == module && *n == name) {
        return Ok(g);
    }
    let full = format!("{module}.{name}");
    if MODEL_MODULES.iter().any(|m| full.starts_with(m)) {
        Err(PickleError::WholeModel(full))
    } else {
        Err(PickleError::Refused(full))
    }
}

/// What a persistent id names: one storage of the checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    pub key: String,
    pub dtype: StorageType,
    /// Elements, as the pickle declares them; checked against the bytes when read.
    pub numel: u64,
}

/// A tensor as `_rebuild_tensor_v2` describes it: a strided view into a storage. The view is
/// checked to lie inside the storage's declared length when it is built.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub offset: u64,
    pub shape: Vec<usize>,
    pub strides: Vec<u64>,
}

impl TensorRef {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Storage indices of the elements in C order.
    pub fn indices(&self) -> impl Iterator<Item = u64> + '_ {
        let mut pos = vec![0usize; self.shape.len()];
        let mut index = self.offset;
        let mut left = self.numel();
        std::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            left -= 1;
            let current = index;
            // Odometer over the dimensions, last fastest. Cannot overflow: the largest index
            // was checked against the storage when the view was built.
            for d in (0..pos.len()).rev() {
                pos[d] += 1;
                index += self.strides[d];
                if pos[d] < self.shape[d] {
                    break;
                }
                index -= self.strides[d] * pos[d] as u64;
                pos[d] = 0;
            }
            Some(current)
        })
    }
}

#[derive(Debug)]
pub enum Node {
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(Global),
    Storage(StorageRef),
    Tensor(TensorRef),
    /// An instance of a [`Global::Data`] class, known by name only.
    Opaque(&'static str),
}

/// A decoded pickle: the arena and the value `STOP` returned.
#[derive(Debug)]
pub struct Pickle {
    nodes: Vec<Node>,
    pub root: Value,
    /// Bytes the pickle occupied, up to and including STOP.
    pub len: usize,
}

impl Pickle {
    fn node(&self, v: Value) -> Option<&Node> {
        match v {
            Value::Ref(i) => self.nodes.get(i),
            _ => None,
        }
    }

    pub fn dict(&self, v: Value) -> Option<&[(Value, Value)]> {
        match self.node(v)? {
            Node::Dict(items) => Some(items),
            _ => None,
        }
    }

    pub fn list(&self, v: Value) -> Option<&[Value]> {
        match self.node(v)? {
            Node::List(items) | Node::Tuple(items) => Some(items),
            _ => None,
        }
    }

    pub fn str(&self, v: Value) -> Option<&str> {
        match self.node(v)? {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn tensor(&self, v: Value) -> Option<&TensorRef> {
        match self.node(v)? {
            Node::Tensor(t) => Some(t),
            _ => None,
        }
    }

    /// Every storage the pickle references (the legacy format needs their sizes to find them).
    pub fn storages(&self) -> impl Iterator<Item = &StorageRef> {
        self.nodes.iter().filter_map(|n| match n {
            Node::Storage(s) => Some(s),
            _ => None,
        })
    }

    /// A short description for messages: "int 3", "dict of 2 entries", "argparse.Namespace".
    pub fn describe(&self, v: Value) -> String {
        match v {
            Value::None => "None".into(),
            Value::Bool(b) => format!("bool {b}"),
            Value::Int(i) => format!("int {i}"),
            Value::Float(f) => format!("float {f}"),
            Value::Ref(_) => match self.node(v) {
                Some(Node::Str(s)) if s.len() <= 40 => format!("string {s:?}"),
                Some(Node::Str(s)) => format!("string of {} bytes", s.len()),
                Some(Node::Bytes(b)) => format!("{} bytes", b.len()),
                Some(Node::List(l)) => format!("list of {}", l.len()),
                Some(Node::Tuple(l)) => format!("tuple of {}", l.len()),
                Some(Node::Dict(d)) => format!("dict of {} entries", d.len()),
                Some(Node::Global(_)) => "class or function".into(),
                Some(Node::Storage(_)) => "storage".into(),
                Some(Node::Tensor(t)) => format!("tensor {:?}", t.shape),
                Some(Node::Opaque(name)) => (*name).into(),
                None => "dangling reference".into(),
            },
        }
    }
}

/// Replays one pickle from the start of `bytes`; trailing bytes are left for the caller (the
/// legacy format concatenates several pickles).
pub fn parse(bytes: &[u8]) -> Result<Pickle, PickleError> {
    Machine::new(bytes).run()
}

struct Machine<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Where the current opcode started, for messages.
    at: usize,
    nodes: Vec<Node>,
    stack: Vec<Value>,
    /// Stack heights at each open MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

impl<'a> Machine<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self {
            bytes,
            pos: 0,
            at: 0,
            nodes: Vec::new(),
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
        }
    }

    fn malformed(&self, reason: impl Into<String>) -> PickleError {
        PickleError::Malformed {
            at: self.at,
            reason: reason.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or(PickleError::Truncated(self.bytes.len()))?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, PickleError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// A length prefix, refused before any allocation when it exceeds the bytes left.
    fn sized(&mut self, len: u64) -> Result<&'a [u8], PickleError> {
        let left = (self.bytes.len() - self.pos) as u64;
        if len > left {
            return Err(PickleError::Limit {
                at: self.at,
                what: format!("an object of {len} bytes with {left} bytes left in the pickle"),
            });
        }
        self.take(len as usize)
    }

    fn line(&mut self) -> Result<&'a str, PickleError> {
        let rest = &self.bytes[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(PickleError::Truncated(self.bytes.len()))?;
        let line = self.take(n + 1)?;
        std::str::from_utf8(&line[..n]).map_err(|_| self.malformed("a global name is not UTF-8"))
    }

    fn push_node(&mut self, node: Node) -> Result<(), PickleError> {
        if self.nodes.len() >= MAX_NODES {
            return Err(PickleError::Limit {
                at: self.at,
                what: format!("more than {MAX_NODES} objects"),
            });
        }
        self.nodes.push(node);
        self.stack.push(Value::Ref(self.nodes.len() - 1));
        Ok(())
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.malformed("pops from an empty stack"));
        }
        self.stack
            .pop()
            .ok_or_else(|| self.malformed("empty stack"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| self.malformed("no MARK to pop to"))?;
        Ok(self.stack.split_off(mark))
    }

    fn top_index(&self) -> Result<usize, PickleError> {
        match self.stack.last() {
            Some(Value::Ref(i)) => Ok(*i),
            _ => Err(self.malformed("expected a container on the stack")),
        }
    }

    fn string(&mut self, bytes: &[u8]) -> Result<(), PickleError> {
        let s = std::str::from_utf8(bytes).map_err(|_| self.malformed("a string is not UTF-8"))?;
        self.push_node(Node::Str(s.to_owned()))?;
        Ok(())
    }

    fn int(&mut self, le: &[u8]) -> Result<(), PickleError> {
        if le.len() > MAX_INT_BYTES {
            return Err(PickleError::Limit {
                at: self.at,
                what: format!("an integer of {} bytes", le.len()),
            });
        }
        let mut v: i128 = 0;
        for (i, &b) in le.iter().enumerate() {
            v |= (b as i128) << (8 * i);
        }
        // Sign-extend from the top byte's high bit.
        if let Some(&last) = le.last() {
            if last & 0x80 != 0 && le.len() < MAX_INT_BYTES {
                v -= 1i128 << (8 * le.len());
            }
        }
        self.stack.push(Value::Int(v));
        Ok(())
    }

    fn run(mut self) -> Result<Pickle, PickleError> {
        loop {
            self.at = self.pos;
            if self.stack.len() > MAX_STACK {
                return Err(PickleError::Limit {
                    at: self.at,
                    what: format!("a stack deeper than {MAX_STACK} values"),
                });
            }
            let op = self.u8()?;
            match op {
                // PROTO
                0x80 => {
                    self.u8()?;
                }
                // FRAME: a length hint (protocol 4); the opcodes follow inline.
                0x95 => {
                    self.array::<8>()?;
                }
                b'.' => {
                    let root = self.pop()?;
                    return Ok(Pickle {
                        nodes: self.nodes,
                        root,
                        len: self.pos,
                    });
                }
                b'(' => {
                    if self.marks.len() >= MAX_NESTING {
                        return Err(PickleError::Limit {
                            at: self.at,
                            what: format!("more than {MAX_NESTING} nested containers"),
                        });
                    }
                    self.marks.push(self.stack.len());
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = *self
                        .stack
                        .last()
                        .ok_or_else(|| self.malformed("DUP on an empty stack"))?;
                    self.stack.push(v);
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.stack.push(Value::Int(v.into()));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v.into()));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.stack.push(Value::Int(v.into()));
                }
                0x8a => {
                    let n = self.u8()?;
                    let le = self.sized(n.into())?;
                    self.int(le)?;
                }
                0x8b => {
                    let n = self.u32()?;
                    let le = self.sized(n.into())?;
                    self.int(le)?;
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.array()?);
                    self.stack.push(Value::Float(v));
                }
                // BINUNICODE, SHORT_BINUNICODE, BINUNICODE8
                b'X' => {
                    let n = self.u32()?;
                    let s = self.sized(n.into())?;
                    self.string(s)?;
                }
                0x8c => {
                    let n = self.u8()?;
                    let s = self.sized(n.into())?;
                    self.string(s)?;
                }
                0x8d => {
                    let n = u64::from_le_bytes(self.array()?);
                    let s = self.sized(n)?;
                    self.string(s)?;
                }
                // BINSTRING, SHORT_BINSTRING: Python 2 str, kept as text when it is.
                b'T' => {
                    let n = self.u32()?;
                    let s = self.sized(n.into())?;
                    self.string(s)?;
                }
                b'U' => {
                    let n = self.u8()?;
                    let s = self.sized(n.into())?;
                    self.string(s)?;
                }
                // BINBYTES, SHORT_BINBYTES, BINBYTES8
                b'B' => {
                    let n = self.u32()?;
                    let b = self.sized(n.into())?.to_vec();
                    self.push_node(Node::Bytes(b))?;
                }
                b'C' => {
                    let n = self.u8()?;
                    let b = self.sized(n.into())?.to_vec();
                    self.push_node(Node::Bytes(b))?;
                }
                0x8e => {
                    let n = u64::from_le_bytes(self.array()?);
                    let b = self.sized(n)?.to_vec();
                    self.push_node(Node::Bytes(b))?;
                }
                b']' => self.push_node(Node::List(Vec::new()))?,
                b')' => self.push_node(Node::Tuple(Vec::new()))?,
                b'}' => self.push_node(Node::Dict(Vec::new()))?,
                // EMPTY_SET, FROZENSET: never part of a state_dict.
                0x8f => self.push_node(Node::Opaque("set"))?,
                0x91 => {
                    self.pop_mark()?;
                    self.push_node(Node::Opaque("frozenset"))?;
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push_node(Node::List(items))?;
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_node(Node::Tuple(items))?;
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push_node(Node::Tuple(items))?;
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.push_node(Node::Dict(pairs))?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.extend(vec![v])?;
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    self.extend(items)?;
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.set_items(vec![key, value])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = lookup_global(module, name)?;
                    self.push_node(Node::Global(g))?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Some(Node::Str(module)), Some(Node::Str(name))) =
                        (self.node(module), self.node(name))
                    else {
                        return Err(self.malformed("STACK_GLOBAL names are not strings"));
                    };
                    let g = lookup_global(module, name)?;
                    self.push_node(Node::Global(g))?;
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.call(callable, args)?;
                    self.stack.push(v);
                }
                // NEWOBJ_EX: keyword arguments are only ever passed to data classes.
                0x92 => {
                    self.pop()?;
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.call(callable, args)?;
                    self.stack.push(v);
                }
                // BUILD sets attributes (a state_dict's `_metadata`, a Namespace's fields):
                // nothing drape reads, so the state is dropped and the object kept.
                b'b' => {
                    self.pop()?;
                    if self.stack.is_empty() {
                        return Err(self.malformed("BUILD without an object"));
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = self.storage(pid)?;
                    self.push_node(Node::Storage(storage))?;
                }
                b'h' => {
                    let i = self.u8()?;
                    self.memo_get(i.into())?;
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?;
                }
                b'q' => {
                    let i = self.u8()?;
                    self.memo_put(i.into())?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = u32::try_from(self.memo.len())
                        .map_err(|_| self.malformed("memo index overflow"))?;
                    self.memo_put(i)?;
                }
                op => return Err(PickleError::Opcode { op, at: self.at }),
            }
        }
    }

    fn node(&self, v: Value) -> Option<&Node> {
        match v {
            Value::Ref(i) => self.nodes.get(i),
            _ => None,
        }
    }

    fn memo_get(&mut self, i: u32) -> Result<(), PickleError> {
        let v = *self
            .memo
            .get(&i)
            .ok_or_else(|| self.malformed(format!("memo entry {i} was never set")))?;
        self.stack.push(v);
        Ok(())
    }

    fn memo_put(&mut self, i: u32) -> Result<(), PickleError> {
        let v = *self
            .stack
            .last()
            .ok_or_else(|| self.malformed("memoizes an empty stack"))?;
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&i) {
            return Err(PickleError::Limit {
                at: self.at,
                what: format!("more than {MAX_MEMO} memo entries"),
            });
        }
        self.memo.insert(i, v);
        Ok(())
    }

    fn pairs(&self, items: Vec<Value>) -> Result<Vec<(Value, Value)>, PickleError> {
        if !items.len().is_multiple_of(2) {
            return Err(self.malformed("a dict with a key but no value"));
        }
        Ok(items.chunks_exact(2).map(|kv| (kv[0], kv[1])).collect())
    }

    /// APPEND(S)/ADDITEMS onto the list (or opaque set) on top of the stack.
    fn extend(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        let i = self.top_index()?;
        match &mut self.nodes[i] {
            Node::List(list) => list.extend(items),
            Node::Opaque(_) => {}
            _ => return Err(self.malformed("APPEND to something that is not a list")),
        }
        Ok(())
    }

    /// SETITEM(S) onto the dict (or opaque object) on top of the stack.
    fn set_items(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        let pairs = self.pairs(items)?;
        let i = self.top_index()?;
        match &mut self.nodes[i] {
            Node::Dict(dict) => dict.extend(pairs),
            Node::Opaque(_) => {}
            _ => return Err(self.malformed("SETITEM on something that is not a dict")),
        }
        Ok(())
    }

    fn args(&self, args: Value, what: &str) -> Result<Vec<Value>, PickleError> {
        match self.node(args) {
            Some(Node::Tuple(items)) => Ok(items.clone()),
            _ => Err(self.malformed(format!("{what} called without an argument tuple"))),
        }
    }

    fn call(&mut self, callable: Value, args: Value) -> Result<Value, PickleError> {
        let Some(Node::Global(g)) = self.node(callable) else {
            return Err(self.malformed("REDUCE on something that is not a class or function"));
        };
        let v = match *g {
            Global::OrderedDict => {
                if !self.args(args, "OrderedDict")?.is_empty() {
                    return Err(self.malformed("OrderedDict built from arguments"));
                }
                self.nodes.push(Node::Dict(Vec::new()));
                Value::Ref(self.nodes.len() - 1)
            }
            Global::RebuildTensorV2 => {
                let t = self.tensor(&self.args(args, "_rebuild_tensor_v2")?)?;
                self.nodes.push(Node::Tensor(t));
                Value::Ref(self.nodes.len() - 1)
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => {
                let a = self.args(args, "_rebuild_parameter")?;
                let data = *a
                    .first()
                    .ok_or_else(|| self.malformed("_rebuild_parameter without data"))?;
                if !matches!(self.node(data), Some(Node::Tensor(_))) {
                    return Err(self.malformed("a parameter whose data is not a tensor"));
                }
                data
            }
            Global::RebuildFromTypeV2 => {
                let a = self.args(args, "_rebuild_from_type_v2")?;
                let [func, _type, inner, ..] = a[..] else {
                    return Err(self.malformed("_rebuild_from_type_v2 with too few arguments"));
                };
                if matches!(
                    self.node(func),
                    Some(Node::Global(Global::RebuildFromTypeV2))
                ) {
                    return Err(self.malformed("_rebuild_from_type_v2 rebuilding itself"));
                }
                self.call(func, inner)?
            }
            Global::Storage(_) => {
                return Err(self.malformed("a storage class called directly"));
            }
            Global::Data(name) => {
                self.nodes.push(Node::Opaque(name));
                Value::Ref(self.nodes.len() - 1)
            }
        };
        Ok(v)
    }

    fn int_arg(&self, v: Value, what: &str) -> Result<u64, PickleError> {
        match v {
            Value::Int(i) => {
                u64::try_from(i).map_err(|_| self.malformed(format!("{what} {i} is out of range")))
            }
            _ => Err(self.malformed(format!("{what} is not an integer"))),
        }
    }

    fn ints(&self, v: Value, what: &str) -> Result<Vec<u64>, PickleError> {
        match self.node(v) {
            Some(Node::Tuple(items)) | Some(Node::List(items)) => {
                items.iter().map(|&i| self.int_arg(i, what)).collect()
            }
            _ => Err(self.malformed(format!("{what}s are not a tuple"))),
        }
    }

    /// The persistent id torch.save writes for a storage:
    /// `('storage', torch.FloatStorage, key, location, numel[, None])`.
    fn storage(&self, pid: Value) -> Result<StorageRef, PickleError> {
        let Some(Node::Tuple(items)) = self.node(pid) else {
            return Err(self.malformed("a persistent id that is not a tuple"));
        };
        let (tag, class, key, numel) = match items[..] {
            [tag, class, key, _location, numel] => (tag, class, key, numel),
            [tag, class, key, _location, numel, view] => {
                if view != Value::None {
                    return Err(self.malformed("a storage view (torch < 0.4), not supported"));
                }
                (tag, class, key, numel)
            }
            _ => return Err(self.malformed("a persistent id of unexpected length")),
        };
        if !matches!(self.node(tag), Some(Node::Str(s)) if s == "storage") {
            return Err(self.malformed("a persistent id that is not a storage"));
        }
        let Some(Node::Global(Global::Storage(dtype))) = self.node(class) else {
            return Err(self.malformed("a storage without a storage type"));
        };
        let Some(Node::Str(key)) = self.node(key) else {
            return Err(self.malformed("a storage key that is not a string"));
        };
        Ok(StorageRef {
            key: key.clone(),
            dtype: *dtype,
            numel: self.int_arg(numel, "storage size")?,
        })
    }

    fn tensor(&self, args: &[Value]) -> Result<TensorRef, PickleError> {
        let [storage, offset, size, stride, ..] = args[..] else {
            return Err(self.malformed("_rebuild_tensor_v2 with too few arguments"));
        };
        let Some(Node::Storage(storage)) = self.node(storage) else {
            return Err(self.malformed("a tensor whose storage is not a persistent id"));
        };
        let offset = self.int_arg(offset, "storage offset")?;
        let shape = self.ints(size, "size")?;
        let strides = self.ints(stride, "stride")?;
        if shape.len() != strides.len() {
            return Err(self.malformed(format!(
                "a tensor with {} dimensions but {} strides",
                shape.len(),
                strides.len()
            )));
        }
        // A broadcast (stride 0 over more than one element) or overlapping strides would let
        // a 1 KB file describe terabytes: a tensor may hold no more elements than its storage,
        // and repeats only along dimensions of size 1.
        if let Some(d) = shape
            .iter()
            .zip(&strides)
            .position(|(&n, &s)| s == 0 && n > 1)
        {
            return Err(self.malformed(format!(
                "a tensor of shape {shape:?} with stride 0 along dimension {d} (a broadcast; \
                 save it with .contiguous())"
            )));
        }
        let numel = shape
            .iter()
            .try_fold(1u64, |acc, &n| acc.checked_mul(n))
            .ok_or_else(|| self.malformed(format!("a tensor of shape {shape:?} overflows")))?;
        if numel > storage.numel {
            return Err(self.malformed(format!(
                "a tensor of shape {shape:?} has {numel} elements but its storage {}",
                storage.numel
            )));
        }
        // The last element's storage index must lie inside the storage; an empty tensor needs
        // nothing.
        let mut last = offset;
        for (&n, &s) in shape.iter().zip(&strides) {
            last = n
                .saturating_sub(1)
                .checked_mul(s)
                .and_then(|x| x.checked_add(last))
                .unwrap_or(u64::MAX);
        }
        if numel > 0 && last >= storage.numel {
            return Err(self.malformed(format!(
                "a tensor of shape {shape:?} (strides {strides:?}, offset {offset}) reaches \
                 element {last} of a {}-element storage",
                storage.numel
            )));
        }
        let shape = shape
            .into_iter()
            .map(|n| usize::try_from(n).map_err(|_| self.malformed("a dimension beyond usize")))
            .collect::<Result<_, _>>()?;
        Ok(TensorRef {
            storage: storage.clone(),
            offset,
            shape,
            strides,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(bytes: &[u8]) -> String {
        parse(bytes).unwrap_err().to_string()
    }

    #[test]
    fn hostile_bytes_are_refused_without_allocating() {
        let cases: &[(&str, &[u8], &str)] = &[
            ("empty", b"", "ends at byte 0"),
            ("os.system", b"\x80\x02cos\nsystem\n.", "`os.system`"),
            (
                "whole model",
                b"\x80\x02ctorchvision.models.detection.mask_rcnn\nMaskRCNN\n.",
                "torch.save(model)",
            ),
            (
                "4 GiB string",
                b"\x80\x02X\xff\xff\xff\xff.",
                "an object of 4294967295 bytes",
            ),
            ("huge LONG4", b"\x8b\xff\xff\xff\x00abc", "bytes left"),
            ("unknown opcode", b"\x80\x02i", "opcode 0x69"),
            ("BINGET unset", b"h\x05.", "memo entry 5"),
            ("pop past MARK", b"N(0.", "empty stack"),
            ("REDUCE on int", b"K\x01)R.", "not a class or function"),
        ];
        for (name, bytes, expected) in cases {
            let e = err(bytes);
            assert!(e.contains(expected), "{name}: {e}");
        }
        let deep = [b'('; MAX_NESTING + 1];
        assert!(err(&deep).contains("nested containers"));
    }

    #[test]
    fn shared_references_cost_their_bytes_only() {
        // t0 = []; t(k+1) = (t(k), t(k)), 200 times: 2^200 leaves if memo gets copied.
        let mut p = b"\x80\x02]q\x00".to_vec();
        for _ in 0..200 {
            p.extend_from_slice(b"h\x00h\x00\x86q\x00");
        }
        p.push(b'.');
        let pickle = parse(&p).unwrap();
        assert!(pickle.nodes.len() <= 201);
        assert_eq!(pickle.describe(pickle.root), "tuple of 2");
    }

    #[test]
    fn ints_decode_twos_complement() {
        for (bytes, v) in [
            (&b"\x8a\x01\xff."[..], -1i128),
            (b"\x8a\x02\xff\x00.", 255),
            (b"J\xfe\xff\xff\xff.", -2),
            (b"M\xe9\x03.", 1001),
            (
                b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.",
                0x1950a86a20f9469cfc6c,
            ),
        ] {
            assert_eq!(parse(bytes).unwrap().root, Value::Int(v));
        }
    }

    #[test]
    fn strided_views_walk_their_storage() {
        let t = TensorRef {
            storage: StorageRef {
                key: "0".into(),
                dtype: StorageType::F32,
                numel: 7,
            },
            offset: 1,
            shape: vec![2, 3],
            strides: vec![1, 2],
        };
        assert_eq!(t.indices().collect::<Vec<_>>(), [1, 3, 5, 2, 4, 6]);
    }
}
