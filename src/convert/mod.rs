//! `drape convert`: a PyTorch checkpoint (`.pth`/`.pt`, as `torch.save` writes it) to the
//! safetensors file drape loads, in pure Rust, without Python at hand (a Jetson, say).
//!
//! ```text
//! drape convert model_final.pth weights/garments.safetensors --labels classes.txt
//! ```
//!
//! The checkpoint's object pickle is replayed by a reader that never runs code
//! ([`pickle`]); the state_dict is found in it (bare, or under a training checkpoint's `model` /
//! `state_dict` / `model_state_dict`, `module.` prefix or not), checked to be a torchvision
//! Mask R-CNN by its key names, converted to f16 (or `--dtype`), written to a temporary file
//! beside the output and loaded with [`MaskRcnn::load`] as the final check; only then is it
//! renamed into place, so a failed conversion never leaves a file behind.

pub mod checkpoint;
pub mod pickle;

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::Device;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use memmap2::Mmap;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::labels::IMATERIALIST_2019;
use crate::model::{Architecture, DEFAULT_BN_EPS};
use crate::weights::sha256_hex;
use crate::MaskRcnn;
use checkpoint::{Checkpoint, Format};
use pickle::{Pickle, PickleError, StorageType, TensorRef, Value};

/// Keys a training checkpoint keeps its weights under, tried in this order.
const STATE_DICT_KEYS: &[&str] = &["model", "state_dict", "model_state_dict"];
/// What `nn.DataParallel` / `DistributedDataParallel` put in front of every key.
const DATA_PARALLEL_PREFIX: &str = "module.";
/// Buffers training keeps that inference never reads.
const DROPPED_SUFFIXES: &[&str] = &[".num_batches_tracked"];
/// Key prefixes that give away another library's checkpoint, one line each.
const FOREIGN: &[(&str, &str)] = &[
    ("backbone.bottom_up.", "a detectron2 checkpoint"),
    ("proposal_generator.", "a detectron2 checkpoint"),
    ("rpn_head.", "an mmdetection checkpoint"),
    ("roi_head.", "an mmdetection checkpoint"),
    ("neck.", "an mmdetection checkpoint"),
];
/// Every stage of a torchvision Mask R-CNN's state_dict (`models/detection/mask_rcnn.py`).
const MASK_RCNN_PREFIXES: &[&str] = &[
    "backbone.body.",
    "backbone.fpn.",
    "rpn.head.",
    "roi_heads.box_head.",
    "roi_heads.box_predictor.",
    "roi_heads.mask_head.",
    "roi_heads.mask_predictor.",
];
/// The tensor whose first dimension is the number of classes, background included.
const CLASS_LOGITS: &str = "roi_heads.box_predictor.cls_score.weight";
/// Names a label file may give class 0, which drape's `labels` leaves out.
const BACKGROUND_NAMES: &[&str] = &["__background__", "background", "__background", "bg"];
/// Inputs at least this large get a progress bar.
const PROGRESS_MIN_BYTES: u64 = 32 << 20;
/// How many tensors a precision warning names.
const WARN_TOP: usize = 5;
/// How many keys an error message lists.
const LIST_KEYS: usize = 8;

const BN_EPS_HELP: &str = "\
BatchNorm epsilon the model was trained with, stored in the file's metadata.

1e-5 (the default) is nn.BatchNorm2d's and FrozenBatchNorm2d's default. Models fine-tuned from \
torchvision's COCO weights use 0.0: maskrcnn_resnet50_fpn(weights=\"COCO_V1\") (or \
pretrained=True before torchvision 0.13) calls overwrite_eps(model, 0.0), and the frozen \
backbone keeps it through fine-tuning; the checkpoint does not record it. So: if the training \
script built the model with COCO detection weights, pass --bn-eps 0; if it started from \
scratch or from ImageNet backbone weights only (weights_backbone=...), keep 1e-5. In Python, \
{m.eps for m in model.modules() if hasattr(m, \"eps\")} on the training model tells for sure.";

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    // Errors are shown in full in the message and not chained as `source`, so the binary's
    // `{:#}` does not print them twice.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} already exists; pass --force to replace it")]
    Exists { path: PathBuf },
    #[error("{path}: not a PyTorch checkpoint: {reason}")]
    NotCheckpoint { path: PathBuf, reason: String },
    #[error("{path}: truncated or damaged zip archive: {reason}")]
    Zip { path: PathBuf, reason: String },
    #[error(
        "{path}: a TorchScript archive (torch.jit.save; it has `{entry}`), not a torch.save \
         checkpoint; in Python, `torch.save(torch.jit.load(path).state_dict(), \"weights.pth\")` \
         makes one drape converts"
    )]
    TorchScript { path: PathBuf, entry: String },
    #[error("{path}: {entry}: {error}")]
    Pickle {
        path: PathBuf,
        entry: String,
        error: PickleError,
    },
    #[error("{path}: storage `{key}`: {reason}")]
    Storage {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("{path}: no state_dict found: {reason}")]
    NoStateDict { path: PathBuf, reason: String },
    #[error(
        "{path}: {found}, not a torchvision Mask R-CNN ({evidence}); drape expects the \
         state_dict of torchvision's maskrcnn_resnet50_fpn and its kin, with keys under \
         backbone.body, backbone.fpn, rpn.head and roi_heads"
    )]
    Foreign {
        path: PathBuf,
        found: String,
        evidence: String,
    },
    #[error("{path}: tensor `{name}`: {reason}")]
    Tensor {
        path: PathBuf,
        name: String,
        reason: String,
    },
    #[error(
        "{path}: tensor `{name}`: {count} values overflow {dtype} (largest |x| = {max_abs:.3e}); \
         convert with --dtype bf16 or f32"
    )]
    Overflow {
        path: PathBuf,
        name: String,
        count: usize,
        max_abs: f64,
        dtype: &'static str,
    },
    #[error("{path}: cannot serialise the converted tensors: {reason}")]
    Serialize { path: PathBuf, reason: String },
    #[error("{path}: labels: {reason}")]
    Labels { path: PathBuf, reason: String },
    #[error("{path}: the converted weights do not load: {reason}")]
    NotLoadable { path: PathBuf, reason: String },
}

/// Output element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutDtype {
    F16,
    Bf16,
    F32,
}

impl OutDtype {
    fn safetensors(self) -> Dtype {
        match self {
            Self::F16 => Dtype::F16,
            Self::Bf16 => Dtype::BF16,
            Self::F32 => Dtype::F32,
        }
    }

    /// Smallest positive normal value, for messages.
    fn min_normal(self) -> f64 {
        match self {
            Self::F16 => half::f16::MIN_POSITIVE.to_f64(),
            Self::Bf16 => half::bf16::MIN_POSITIVE.to_f64(),
            Self::F32 => f32::MIN_POSITIVE.into(),
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            OutDtype::F32 => 4,
            OutDtype::F16 | OutDtype::Bf16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::F32 => "f32",
        }
    }

    /// Appends `v` rounded to this type, little-endian, and says what the rounding did.
    fn push(self, v: f64, out: &mut Vec<u8>) -> Rounding {
        let (rounded, normal) = match self {
            Self::F16 => {
                let h = half::f16::from_f64(v);
                out.extend_from_slice(&h.to_le_bytes());
                (h.to_f64(), h.is_normal())
            }
            Self::Bf16 => {
                let h = half::bf16::from_f64(v);
                out.extend_from_slice(&h.to_le_bytes());
                (h.to_f64(), h.is_normal())
            }
            Self::F32 => {
                let f = v as f32;
                out.extend_from_slice(&f.to_le_bytes());
                (f.into(), f.is_normal())
            }
        };
        if rounded.is_infinite() {
            Rounding::Overflow
        } else if !normal && rounded != v {
            // Below the normal range, and not a value the type holds exactly (a checkpoint
            // already in f16 loses nothing converting to f16).
            Rounding::Tiny
        } else {
            Rounding::Kept
        }
    }
}

enum Rounding {
    Kept,
    /// A finite value became infinite.
    Overflow,
    /// A value below the type's normal range became zero or subnormal, losing precision.
    Tiny,
}

/// What to convert and how.
#[derive(Debug, Clone)]
pub struct Options {
    pub input: PathBuf,
    pub output: PathBuf,
    /// Top-level key holding the state_dict; found automatically when `None`.
    pub key: Option<String>,
    pub dtype: OutDtype,
    /// Names of classes 1..; `None` leaves the default (iMaterialist for 47 classes).
    pub labels: Option<Vec<String>>,
    pub bn_eps: f32,
    pub min_size: Option<usize>,
    pub max_size: Option<usize>,
    /// Replace an existing output.
    pub force: bool,
}

/// Values of one tensor that lost their precision in the output dtype.
#[derive(Debug, Clone)]
pub struct TinyValues {
    pub name: String,
    pub count: usize,
    pub numel: usize,
}

/// What a conversion did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub format: Format,
    /// Top-level key the state_dict was found under, `None` for a bare one.
    pub key: Option<String>,
    pub stripped_prefix: bool,
    pub architecture: Architecture,
    /// Written to `labels` metadata, if any.
    pub labels: Option<Vec<String>>,
    pub tensors: usize,
    pub dropped: usize,
    pub dtype: OutDtype,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub source_sha256: String,
    /// Tensors with values that became zero or subnormal, most affected first.
    pub tiny: Vec<TinyValues>,
}

/// Reads class names: a JSON list of strings, or any other file as one name per line.
pub fn read_labels(path: &Path) -> Result<Vec<String>, ConvertError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConvertError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
    {
        serde_json::from_str(&text).map_err(|e| ConvertError::Labels {
            path: path.to_path_buf(),
            reason: format!("not a JSON list of strings: {e}"),
        })
    } else {
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }
}

/// Converts `opts.input` to `opts.output`; `progress(done, total)` follows the tensor bytes.
pub fn convert(
    opts: &Options,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Summary, ConvertError> {
    let input = opts.input.as_path();
    if !opts.force && opts.output.exists() {
        return Err(ConvertError::Exists {
            path: opts.output.clone(),
        });
    }
    let file = File::open(input).map_err(io_error(input))?;
    // SAFETY: read-only mapping; a checkpoint rewritten underneath us while converting is
    // outside what any mmap-based reader can defend against.
    let bytes = unsafe { Mmap::map(&file) }.map_err(io_error(input))?;
    let source_sha256 = sha256_hex(&bytes);

    let mut ckpt = Checkpoint::open(input, &bytes)?;
    let sd = StateDict::find(input, &ckpt.pickle, opts.key.as_deref())?;
    let num_classes = sd
        .entries
        .iter()
        .find(|(n, _)| n == CLASS_LOGITS)
        .and_then(|(_, t)| t.shape.first().copied());
    let labels = labels_for(input, opts.labels.as_deref(), num_classes)?;
    check_output_size(input, bytes.len() as u64, &sd.entries, opts.dtype)?;
    let (converted, tiny) = convert_tensors(input, &mut ckpt, &sd.entries, opts.dtype, progress)?;

    let metadata = metadata(opts, labels.as_deref(), &source_sha256);
    let serialized = converted
        .iter()
        .map(|(name, shape, data)| {
            TensorView::new(opts.dtype.safetensors(), shape.clone(), data).map(|v| (name, v))
        })
        .collect::<Result<Vec<_>, _>>()
        .and_then(|views| safetensors::serialize(views, Some(metadata)))
        .map_err(|e| ConvertError::Serialize {
            path: input.to_path_buf(),
            reason: e.to_string(),
        })?;
    drop(converted);
    let output_bytes = serialized.len() as u64;
    let architecture = write_checked(input, &opts.output, opts.force, serialized)?;

    Ok(Summary {
        format: ckpt.format,
        key: sd.key,
        stripped_prefix: sd.stripped_prefix,
        architecture,
        labels,
        tensors: sd.entries.len(),
        dropped: sd.dropped,
        dtype: opts.dtype,
        input_bytes: bytes.len() as u64,
        output_bytes,
        source_sha256,
        tiny,
    })
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ConvertError {
    let path = path.to_path_buf();
    move |error| ConvertError::Io { path, error }
}

/// A converted tensor: name, shape, little-endian bytes.
type Converted = (String, Vec<usize>, Vec<u8>);

/// The output may be at most this many times the input's size: f16 to f32 doubles it, and
/// tensors sharing a storage (tied weights) are written once each; anything beyond is a file
/// whose views repeat a small storage to describe something enormous.
const MAX_OUTPUT_FACTOR: u64 = 4;

/// Refuses, before anything is converted, a checkpoint whose tensors would write more than
/// [`MAX_OUTPUT_FACTOR`] times its own size.
fn check_output_size(
    path: &Path,
    input_len: u64,
    entries: &[(String, TensorRef)],
    dtype: OutDtype,
) -> Result<(), ConvertError> {
    let out_size = dtype.size() as u64;
    let total = entries.iter().try_fold(0u64, |acc, (_, t)| {
        (t.numel() as u64)
            .checked_mul(out_size)
            .and_then(|b| acc.checked_add(b))
    });
    let limit = input_len.saturating_mul(MAX_OUTPUT_FACTOR);
    match total {
        Some(total) if total <= limit => Ok(()),
        _ => Err(ConvertError::NotCheckpoint {
            path: path.to_path_buf(),
            reason: format!(
                "its tensors would write {} bytes, more than {MAX_OUTPUT_FACTOR} times the \
                 file's {input_len}",
                total.map_or("over 2^64".into(), |t| t.to_string())
            ),
        }),
    }
}

/// Every entry in the output dtype, and the tensors that lost precision, most affected first.
fn convert_tensors(
    path: &Path,
    ckpt: &mut Checkpoint,
    entries: &[(String, TensorRef)],
    dtype: OutDtype,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(Vec<Converted>, Vec<TinyValues>), ConvertError> {
    let source_bytes = |t: &TensorRef| (t.numel() * t.storage.dtype.size()) as u64;
    let total = entries.iter().map(|(_, t)| source_bytes(t)).sum();
    let mut done = 0;
    // Tensors may share a storage (views, tied weights): each is read once.
    let mut storages = HashMap::new();
    let mut converted = Vec::with_capacity(entries.len());
    let mut tiny = Vec::new();
    for (name, t) in entries {
        if !storages.contains_key(&t.storage.key) {
            let data = ckpt.storage(&t.storage)?;
            storages.insert(t.storage.key.clone(), data);
        }
        let (data, count) = convert_tensor(path, name, t, &storages[&t.storage.key], dtype)?;
        if count > 0 {
            tiny.push(TinyValues {
                name: name.clone(),
                count,
                numel: t.numel(),
            });
        }
        converted.push((name.clone(), t.shape.clone(), data));
        done += source_bytes(t);
        progress(done, total);
    }
    tiny.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.name.cmp(&b.name)));
    Ok((converted, tiny))
}

/// Writes `serialized` to a temporary file beside `output`, loads it as the final check, and
/// only then renames it into place. Returns the loaded architecture.
fn write_checked(
    input: &Path,
    output: &Path,
    force: bool,
    serialized: Vec<u8>,
) -> Result<Architecture, ConvertError> {
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // Dropping `tmp` on any early return deletes it: no half-written output survives.
    let mut tmp = tempfile::Builder::new()
        .prefix(".drape-convert-")
        .suffix(".partial")
        .tempfile_in(dir)
        .map_err(io_error(dir))?;
    tmp.write_all(&serialized).map_err(io_error(tmp.path()))?;
    drop(serialized);
    tmp.as_file().sync_all().map_err(io_error(tmp.path()))?;

    let model = MaskRcnn::load(tmp.path(), |_| {}, &Device::Cpu).map_err(|e| {
        // The loader names the temporary file; the user knows the input.
        let text = e.to_string();
        let prefix = format!("{}: ", tmp.path().display());
        ConvertError::NotLoadable {
            path: input.to_path_buf(),
            reason: text.strip_prefix(&prefix).unwrap_or(&text).to_owned(),
        }
    })?;
    let architecture = model.architecture().clone();
    drop(model);

    let persisted = if force {
        tmp.persist(output)
    } else {
        // Also refuses a file that appeared since the check at the start.
        tmp.persist_noclobber(output)
    };
    persisted.map_err(|e| {
        if e.error.kind() == std::io::ErrorKind::AlreadyExists {
            ConvertError::Exists {
                path: output.to_path_buf(),
            }
        } else {
            ConvertError::Io {
                path: output.to_path_buf(),
                error: e.error,
            }
        }
    })?;
    Ok(architecture)
}

/// The state_dict's tensors under the names the output uses.
struct StateDict {
    /// (name, tensor) in checkpoint order, owned so that storages can be read while they live.
    entries: Vec<(String, TensorRef)>,
    /// Top-level key it was under, `None` for a bare one.
    key: Option<String>,
    stripped_prefix: bool,
    dropped: usize,
}

impl StateDict {
    /// Finds the state_dict, strips a DataParallel prefix, drops training-only buffers and
    /// checks by the key names that it is a torchvision Mask R-CNN.
    fn find(path: &Path, p: &Pickle, key: Option<&str>) -> Result<Self, ConvertError> {
        let (dict, key) = locate_state_dict(path, p, key)?;
        let mut entries = state_dict_entries(path, p, dict)?;
        let stripped_prefix = entries
            .iter()
            .all(|(n, _)| n.starts_with(DATA_PARALLEL_PREFIX));
        if stripped_prefix {
            for (n, _) in &mut entries {
                n.drain(..DATA_PARALLEL_PREFIX.len());
            }
        }
        let before = entries.len();
        entries.retain(|(n, _)| !DROPPED_SUFFIXES.iter().any(|s| n.ends_with(s)));
        let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
        check_family(path, &names)?;
        Ok(Self {
            dropped: before - entries.len(),
            entries,
            key,
            stripped_prefix,
        })
    }
}

fn is_state_dict(p: &Pickle, v: Value) -> bool {
    p.dict(v).is_some_and(|items| {
        !items.is_empty()
            && items
                .iter()
                .all(|(k, v)| p.str(*k).is_some() && p.tensor(*v).is_some())
    })
}

/// The state_dict inside the checkpoint, and the top-level key it was under.
fn locate_state_dict(
    path: &Path,
    p: &Pickle,
    key: Option<&str>,
) -> Result<(Value, Option<String>), ConvertError> {
    let none = |reason: String| ConvertError::NoStateDict {
        path: path.to_path_buf(),
        reason,
    };
    if key.is_none() && is_state_dict(p, p.root) {
        return Ok((p.root, None));
    }
    let Some(items) = p.dict(p.root) else {
        return Err(none(format!(
            "the checkpoint holds a {}, not a dict",
            p.describe(p.root)
        )));
    };
    let get = |k: &str| {
        items
            .iter()
            .find(|(name, _)| p.str(*name) == Some(k))
            .map(|(_, v)| *v)
    };
    let listing = || {
        let mut shown: Vec<String> = items
            .iter()
            .take(LIST_KEYS)
            .map(|(k, v)| match p.str(*k) {
                Some(k) => format!("`{k}` ({})", p.describe(*v)),
                None => p.describe(*k),
            })
            .collect();
        if items.len() > LIST_KEYS {
            shown.push(format!("and {} more", items.len() - LIST_KEYS));
        }
        shown.join(", ")
    };
    if let Some(k) = key {
        return match get(k) {
            Some(v) if is_state_dict(p, v) => Ok((v, Some(k.to_owned()))),
            Some(v) => Err(none(format!(
                "`{k}` holds a {}, not a dict of tensors",
                p.describe(v)
            ))),
            None => Err(none(format!(
                "no top-level key `{k}`; the checkpoint has {}",
                listing()
            ))),
        };
    }
    for k in STATE_DICT_KEYS {
        if let Some(v) = get(k).filter(|v| is_state_dict(p, *v)) {
            return Ok((v, Some((*k).to_owned())));
        }
    }
    let elsewhere: Vec<String> = items
        .iter()
        .filter(|(_, v)| is_state_dict(p, *v))
        .filter_map(|(k, _)| p.str(*k).map(|k| format!("--key {k}")))
        .collect();
    let hint = if elsewhere.is_empty() {
        String::new()
    } else {
        format!("; a dict of tensors is under {}", elsewhere.join(", "))
    };
    Err(none(format!(
        "neither the checkpoint itself nor its {} is a dict of tensors; it has {}{hint}",
        STATE_DICT_KEYS
            .iter()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(" / "),
        listing()
    )))
}

/// The state_dict's (name, tensor) pairs, owned so that storages can be read while they live.
fn state_dict_entries(
    path: &Path,
    p: &Pickle,
    dict: Value,
) -> Result<Vec<(String, TensorRef)>, ConvertError> {
    let items = p.dict(dict).unwrap_or_default();
    let mut seen = std::collections::HashSet::new();
    let mut entries = Vec::with_capacity(items.len());
    for (k, v) in items {
        // `is_state_dict` vouched for both.
        let (Some(name), Some(t)) = (p.str(*k), p.tensor(*v)) else {
            continue;
        };
        if !seen.insert(name) {
            return Err(ConvertError::Tensor {
                path: path.to_path_buf(),
                name: name.to_owned(),
                reason: "appears twice in the state_dict".into(),
            });
        }
        entries.push((name.to_owned(), t.clone()));
    }
    Ok(entries)
}

/// Refuses, by its key names, anything that is not a torchvision Mask R-CNN, naming what it is.
fn check_family(path: &Path, names: &[&str]) -> Result<(), ConvertError> {
    let foreign = |found: &str, evidence: String| ConvertError::Foreign {
        path: path.to_path_buf(),
        found: found.to_owned(),
        evidence,
    };
    for (prefix, library) in FOREIGN {
        if let Some(n) = names.iter().find(|n| n.starts_with(prefix)) {
            return Err(foreign(library, format!("it has `{n}`")));
        }
    }
    let has = |prefix: &str| names.iter().any(|n| n.starts_with(prefix));
    let Some(missing) = MASK_RCNN_PREFIXES.iter().find(|p| !has(p)) else {
        return Ok(());
    };
    let found = if has("roi_heads.keypoint_predictor.") {
        "a torchvision Keypoint R-CNN"
    } else if has("backbone.body.") && has("roi_heads.box_predictor.") {
        "a torchvision Faster R-CNN (no mask head)"
    } else if names.contains(&"fc.weight") {
        "an image classifier"
    } else {
        "an unrecognised model"
    };
    let example = names
        .first()
        .map_or("no tensors".into(), |n| format!("`{n}`"));
    Err(foreign(
        found,
        format!("no tensor under `{missing}`; its first is {example}"),
    ))
}

/// The `labels` metadata to write: the given names (a leading background entry dropped), or
/// iMaterialist's for a 47-class model, or none.
fn labels_for(
    path: &Path,
    given: Option<&[String]>,
    num_classes: Option<usize>,
) -> Result<Option<Vec<String>>, ConvertError> {
    let Some(given) = given else {
        let imaterialist = num_classes == Some(IMATERIALIST_2019.len() + 1);
        return Ok(imaterialist.then(|| IMATERIALIST_2019.map(str::to_owned).to_vec()));
    };
    let Some(n) = num_classes else {
        return Ok(Some(given.to_vec()));
    };
    match given {
        g if g.len() + 1 == n => Ok(Some(g.to_vec())),
        [first, rest @ ..]
            if rest.len() + 1 == n
                && BACKGROUND_NAMES
                    .iter()
                    .any(|b| first.eq_ignore_ascii_case(b)) =>
        {
            Ok(Some(rest.to_vec()))
        }
        g => Err(ConvertError::Labels {
            path: path.to_path_buf(),
            reason: format!(
                "{} names for a model with {n} classes: give one name per foreground class \
                 ({}), class 0 being background",
                g.len(),
                n - 1
            ),
        }),
    }
}

fn metadata(opts: &Options, labels: Option<&[String]>, sha256: &str) -> HashMap<String, String> {
    let mut m = HashMap::from([
        ("bn_eps".to_owned(), opts.bn_eps.to_string()),
        ("source_sha256".to_owned(), sha256.to_owned()),
        (
            "converter".to_owned(),
            format!("drape {}", env!("CARGO_PKG_VERSION")),
        ),
    ]);
    if let Some(l) = labels {
        m.insert("labels".into(), serde_json::json!(l).to_string());
    }
    if let Some(v) = opts.min_size {
        m.insert("min_size".into(), v.to_string());
    }
    if let Some(v) = opts.max_size {
        m.insert("max_size".into(), v.to_string());
    }
    m
}

/// One tensor gathered from its (possibly strided) storage into C order in `dtype`; returns
/// the bytes and how many values became zero or subnormal.
fn convert_tensor(
    path: &Path,
    name: &str,
    t: &TensorRef,
    storage: &[u8],
    dtype: OutDtype,
) -> Result<(Vec<u8>, usize), ConvertError> {
    let tensor_err = |reason: String| ConvertError::Tensor {
        path: path.to_path_buf(),
        name: name.to_owned(),
        reason,
    };
    let read: fn(&[u8]) -> f64 = match t.storage.dtype {
        StorageType::F64 => |b| f64::from_le_bytes(b.try_into().expect("8 bytes")),
        StorageType::F32 => |b| f32::from_le_bytes(b.try_into().expect("4 bytes")).into(),
        StorageType::F16 => |b| half::f16::from_le_bytes([b[0], b[1]]).to_f64(),
        StorageType::BF16 => |b| half::bf16::from_le_bytes([b[0], b[1]]).to_f64(),
        other => {
            return Err(tensor_err(format!(
                "has dtype {}; a Mask R-CNN's weights are floating point",
                other.name()
            )))
        }
    };
    let size = t.storage.dtype.size();
    let out_size = dtype.size();
    let mut out = Vec::with_capacity(t.numel() * out_size);
    let (mut overflow, mut max_abs, mut tiny) = (0usize, 0f64, 0usize);
    for (flat, index) in t.indices().enumerate() {
        // In bounds: the pickle reader checked every index against the storage's declared
        // length, and the checkpoint reader checked the storage's bytes against that length.
        let at = index as usize * size;
        let v = read(&storage[at..at + size]);
        if !v.is_finite() {
            return Err(tensor_err(format!(
                "holds a non-finite value ({v}) at flat index {flat}"
            )));
        }
        match dtype.push(v, &mut out) {
            Rounding::Kept => {}
            Rounding::Overflow => {
                overflow += 1;
                max_abs = max_abs.max(v.abs());
            }
            Rounding::Tiny => tiny += 1,
        }
    }
    if overflow > 0 {
        return Err(ConvertError::Overflow {
            path: path.to_path_buf(),
            name: name.to_owned(),
            count: overflow,
            max_abs,
            dtype: dtype.name(),
        });
    }
    Ok((out, tiny))
}

/// `drape convert`'s flags.
#[derive(clap::Args)]
pub struct ConvertArgs {
    /// PyTorch checkpoint (.pth/.pt) as torch.save writes it, zip or legacy format.
    input: PathBuf,
    /// Safetensors file to write.
    output: PathBuf,
    /// Top-level key holding the state_dict [default: the checkpoint itself when it is one,
    /// else `model`, `state_dict` or `model_state_dict`].
    #[arg(long)]
    key: Option<String>,
    /// Element type of the written weights.
    #[arg(long, value_enum, default_value = "f16")]
    dtype: OutDtype,
    /// Names of classes 1, 2, ... (0 is background): a JSON list, or a text file with one name
    /// per line [default: iMaterialist 2019's 46 for a 47-class model, else none].
    #[arg(long)]
    labels: Option<PathBuf>,
    /// BatchNorm epsilon the model was trained with: 0 for models fine-tuned from torchvision's
    /// COCO weights (see --help).
    #[arg(long, default_value_t = DEFAULT_BN_EPS, long_help = BN_EPS_HELP)]
    bn_eps: f32,
    /// Shorter side the model resizes images to, stored for `drape detect` [default: 800].
    #[arg(long)]
    min_size: Option<usize>,
    /// Cap on the longer side, stored for `drape detect` [default: 1333].
    #[arg(long)]
    max_size: Option<usize>,
    /// Replace OUTPUT if it exists.
    #[arg(long)]
    force: bool,
}

/// Validates the flags, converts with a progress bar for large inputs, prints a summary.
pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    if !args.bn_eps.is_finite() || args.bn_eps < 0.0 {
        anyhow::bail!("--bn-eps {} must be a finite value >= 0", args.bn_eps);
    }
    if args.min_size == Some(0) || args.max_size == Some(0) {
        anyhow::bail!("--min-size and --max-size must be at least 1");
    }
    let labels = args.labels.as_deref().map(read_labels).transpose()?;
    let opts = Options {
        input: args.input,
        output: args.output,
        key: args.key,
        dtype: args.dtype,
        labels,
        bn_eps: args.bn_eps,
        min_size: args.min_size,
        max_size: args.max_size,
        force: args.force,
    };
    let input_len = std::fs::metadata(&opts.input)
        .with_context(|| format!("reading {}", opts.input.display()))?
        .len();
    let bar = if input_len >= PROGRESS_MIN_BYTES {
        ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr()).with_style(
            ProgressStyle::with_template("converting {wide_bar} {bytes}/{total_bytes}, eta {eta}")
                .expect("static template"),
        )
    } else {
        ProgressBar::hidden()
    };
    let summary = convert(&opts, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let s = summary?;
    print_summary(&opts, &s);
    Ok(())
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn print_summary(opts: &Options, s: &Summary) {
    let a = &s.architecture;
    let place = match &s.key {
        Some(k) => format!("state_dict under `{k}`"),
        None => "bare state_dict".into(),
    };
    let prefix = if s.stripped_prefix {
        ", `module.` prefix stripped"
    } else {
        ""
    };
    println!("{} -> {}", opts.input.display(), opts.output.display());
    println!("  checkpoint    {}, {place}{prefix}", s.format);
    println!(
        "  architecture  {}, FPN {}, box head {}, mask head {:?}",
        a.backbone, a.fpn_channels, a.representation_size, a.mask_layers
    );
    let labels = match &s.labels {
        Some(l) => format!("labels {}", preview(l)),
        None => "no labels (shown as `class k`)".into(),
    };
    println!(
        "  classes       {} incl. background, {labels}",
        a.num_classes
    );
    println!(
        "  tensors       {} written as {}, {} num_batches_tracked dropped, bn_eps {}",
        s.tensors,
        s.dtype.name(),
        s.dropped,
        a.bn_eps
    );
    println!(
        "  size          {} -> {}",
        megabytes(s.input_bytes),
        megabytes(s.output_bytes)
    );
    println!("  source sha256 {}", s.source_sha256);
    if !s.tiny.is_empty() {
        let total: usize = s.tiny.iter().map(|t| t.count).sum();
        let top: Vec<String> = s
            .tiny
            .iter()
            .take(WARN_TOP)
            .map(|t| format!("`{}` {} of {}", t.name, t.count, t.numel))
            .collect();
        eprintln!(
            "warning: {total} values in {} tensors are below {}'s normal range (|x| < {}) and \
             lost precision, becoming subnormal or zero: {}{}",
            s.tiny.len(),
            s.dtype.name(),
            s.dtype.min_normal(),
            top.join(", "),
            if s.tiny.len() > WARN_TOP { ", ..." } else { "" }
        );
    }
}

/// The first few names, for a one-line summary.
fn preview(labels: &[String]) -> String {
    const SHOWN: usize = 3;
    let head: Vec<String> = labels
        .iter()
        .take(SHOWN)
        .map(|l| format!("{l:?}"))
        .collect();
    if labels.len() > SHOWN {
        format!("[{}, ... {} in all]", head.join(", "), labels.len())
    } else {
        format!("[{}]", head.join(", "))
    }
}
