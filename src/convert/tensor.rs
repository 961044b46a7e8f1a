//! Converting a checkpoint's tensors to the output dtype: each gathered from its (possibly
//! strided, possibly shared) storage into C order, with overflow refused and precision loss
//! counted per tensor.

use std::collections::HashMap;
use std::path::Path;

use safetensors::Dtype;

use super::checkpoint::Checkpoint;
use super::pickle::{StorageType, TensorRef};
use super::ConvertError;

/// Output element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutDtype {
    F16,
    Bf16,
    F32,
}

impl OutDtype {
    pub(super) fn safetensors(self) -> Dtype {
        match self {
            Self::F16 => Dtype::F16,
            Self::Bf16 => Dtype::BF16,
            Self::F32 => Dtype::F32,
        }
    }

    /// Smallest positive normal value, for messages.
    pub fn min_normal(self) -> f64 {
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

/// Values of one tensor that lost their precision in the output dtype.
#[derive(Debug, Clone)]
pub struct TinyValues {
    pub name: String,
    pub count: usize,
    pub numel: usize,
}

/// A converted tensor: name, shape, little-endian bytes.
type Converted = (String, Vec<usize>, Vec<u8>);

/// The output may be at most this many times the input's size: f16 to f32 doubles it, and
/// tensors sharing a storage (tied weights) are written once each; anything beyond is a file
/// whose views repeat a small storage to describe something enormous.
const MAX_OUTPUT_FACTOR: u64 = 4;

/// Refuses, before anything is converted, a checkpoint whose tensors would write more than
/// [`MAX_OUTPUT_FACTOR`] times its own size.
pub(super) fn check_output_size(
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
pub(super) fn convert_tensors(
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
