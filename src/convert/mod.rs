//! `drape convert`: a PyTorch checkpoint (`.pth`/`.pt`, as `torch.save` writes it) to the
//! safetensors file drape loads, in pure Rust, without Python at hand (a Jetson, say).
//!
//! ```text
//! drape convert model_final.pth weights/garments.safetensors --labels classes.txt
//! ```
//!
//! The checkpoint's archive is opened by [`checkpoint`] and its object pickle replayed by a
//! reader that never runs code ([`pickle`]); the state_dict is found in it and checked to be a
//! torchvision Mask R-CNN by its key names ([`state_dict`]), its tensors converted to f16 (or
//! another [`OutDtype`]) ([`tensor`]), written to a temporary file beside the output and loaded
//! with [`MaskRcnn::load`] as the final check; only then is it renamed into place, so a failed
//! conversion never leaves a file behind. The command's flags, progress bar and summary are the
//! binary's.

pub mod checkpoint;
pub mod pickle;
pub mod state_dict;
pub mod tensor;

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Device;
use safetensors::tensor::TensorView;

use crate::labels::IMATERIALIST_2019;
use crate::model::Architecture;
use crate::weights::sha256_hex;
use crate::MaskRcnn;
use checkpoint::{Checkpoint, Format};
use pickle::PickleError;
use state_dict::StateDict;
use tensor::{check_output_size, convert_tensors};
pub use tensor::{OutDtype, TinyValues};

/// The tensor whose first dimension is the number of classes, background included.
const CLASS_LOGITS: &str = "roi_heads.box_predictor.cls_score.weight";
/// Names a label file may give class 0, which drape's `labels` leaves out.
const BACKGROUND_NAMES: &[&str] = &["__background__", "background", "__background", "bg"];

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
    let bytes = crate::mmap::map_readonly(&file).map_err(io_error(input))?;
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
