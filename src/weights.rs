//! Memory-mapped safetensors weights with torchvision `state_dict` key names.
//!
//! The file is mapped, never read into a second heap copy: each tensor is converted straight
//! from the mapping into the f32 buffer the model keeps. Every way a file can be wrong ends in a
//! named [`Error`]: the path, and where it applies the tensor, the expected and found shape.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Older torchvision releases spelled some keys differently. Each row maps an old prefix to
/// today's; `{}` stands for a block index, shifted by the row's offset, and a row applies only
/// when what follows the prefix is a leaf name (`weight`, `bias`).
const KEY_REMAP: &[(&str, &str, i64)] = &[
    // torchvision < 0.13: FPN blocks were bare convs, now Conv2dNormActivation wrappers.
    (
        "backbone.fpn.inner_blocks.{}.",
        "backbone.fpn.inner_blocks.{}.0.",
        0,
    ),
    (
        "backbone.fpn.layer_blocks.{}.",
        "backbone.fpn.layer_blocks.{}.0.",
        0,
    ),
    // torchvision < 0.13: the RPN head's shared conv was a bare conv.
    ("rpn.head.conv.", "rpn.head.conv.0.0.", 0),
    // torchvision < 0.13: mask head convs were named mask_fcn1..mask_fcnN (1-based).
    (
        "roi_heads.mask_head.mask_fcn{}.",
        "roi_heads.mask_head.{}.0.",
        -1,
    ),
];

/// torchvision's two Mask R-CNN layouts, which differ in every head (see
/// [`crate::model::Architecture::variant`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadVariant {
    /// `maskrcnn_resnet50_fpn`: the box head is `TwoMLPHead` (fc6, fc7).
    V1,
    /// `maskrcnn_resnet50_fpn_v2`: the box head is `FastRCNNConvFCHead`, conv blocks first.
    V2,
}

impl HeadVariant {
    /// The tensor only this variant's box head has.
    fn marker(self) -> &'static str {
        match self {
            Self::V1 => "roi_heads.box_head.fc6.weight",
            Self::V2 => "roi_heads.box_head.0.0.weight",
        }
    }

    /// `v1` or `v2`, as torchvision's builder names end.
    pub fn name(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
        }
    }
}

/// Keys that training checkpoints carry but inference never reads.
const IGNORED_SUFFIXES: &[&str] = &[".num_batches_tracked"];

fn remap_key(name: &str) -> String {
    for &(old, new, shift) in KEY_REMAP {
        let (old_head, old_tail) = old.split_once("{}").unwrap_or((old, ""));
        let Some(rest) = name.strip_prefix(old_head) else {
            continue;
        };
        let (index, rest) = if old.contains("{}") {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            let Ok(index) = rest[..digits].parse::<i64>() else {
                continue;
            };
            (Some(index + shift), &rest[digits..])
        } else {
            (None, rest)
        };
        let Some(leaf) = rest.strip_prefix(old_tail) else {
            continue;
        };
        if leaf.is_empty() || leaf.contains('.') {
            continue;
        }
        let new = match index {
            Some(i) => new.replacen("{}", &i.to_string(), 1),
            None => new.to_string(),
        };
        return format!("{new}{leaf}");
    }
    name.to_string()
}

struct Entry {
    file_name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range of the tensor's data inside the mapping.
    start: usize,
    end: usize,
}

/// An opened weights file: the mapping, its tensors under their canonical (today's torchvision)
/// names, and its `__metadata__`.
pub struct Weights {
    path: PathBuf,
    mmap: Mmap,
    tensors: HashMap<String, Entry>,
    metadata: HashMap<String, String>,
    used: RefCell<HashSet<String>>,
    /// Layers whose folded values lie beyond f16's range (see `layers::layer_dtype`).
    beyond_f16: RefCell<Vec<String>>,
}

impl Weights {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        // Mapping a directory fails with ENODEV ("No such device"), which names the wrong thing.
        if file.metadata().map_err(io)?.is_dir() {
            return Err(Error::NotSafetensors {
                path,
                reason: "this is a directory; give the .safetensors file inside it".into(),
            });
        }
        let mmap = crate::mmap::map_readonly(&file).map_err(io)?;
        let (tensors, metadata) = parse_header(&path, &mmap)?;
        Ok(Self {
            path,
            mmap,
            tensors,
            metadata,
            used: RefCell::new(HashSet::new()),
            beyond_f16: RefCell::new(Vec::new()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records that `layer`'s folded weights do not fit f16 (whatever the device: the CPU
    /// computes in f32 anyway, but `inspect --plan` reports what a GPU would do).
    pub fn note_beyond_f16(&self, layer: &str) {
        self.beyond_f16.borrow_mut().push(layer.to_string());
    }

    /// The layers [`Self::note_beyond_f16`] recorded, in load order.
    pub fn beyond_f16(&self) -> Vec<String> {
        self.beyond_f16.borrow().clone()
    }

    /// The whole file, as mapped.
    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }

    /// `__metadata__`, every key.
    pub fn all_metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// Every tensor drape reads, as (shape, dtype name).
    pub fn entries(&self) -> impl Iterator<Item = (&[usize], String)> {
        self.tensors
            .values()
            .map(|e| (e.shape.as_slice(), format!("{:?}", e.dtype)))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Which layout the file's box head has, by its tensor names; `None` when it has neither.
    pub fn head_variant(&self) -> Option<HeadVariant> {
        [HeadVariant::V1, HeadVariant::V2]
            .into_iter()
            .find(|v| self.contains(v.marker()))
    }

    /// Canonical tensor names, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        self.entry(name).map(|e| e.shape.as_slice())
    }

    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    /// Dtype of the stored weights (that of the first tensor: files are written in one dtype).
    pub fn dtype(&self) -> Option<String> {
        self.tensors
            .values()
            .next()
            .map(|e| format!("{:?}", e.dtype))
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        })
    }

    /// The tensor `name` as f32, after checking its shape, dtype and that every value is finite.
    pub fn tensor(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let entry = self.entry(name)?;
        if entry.shape != expected {
            return Err(Error::Shape {
                path: self.path.clone(),
                name: entry.file_name.clone(),
                expected: format!("{expected:?}"),
                found: entry.shape.clone(),
            });
        }
        let bytes = &self.mmap[entry.start..entry.end];
        let (width, convert): (usize, fn(&[u8]) -> f32) = match entry.dtype {
            Dtype::F32 => (4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            Dtype::F16 => (2, |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
            Dtype::BF16 => (2, |b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            other => {
                return Err(Error::Dtype {
                    path: self.path.clone(),
                    name: entry.file_name.clone(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        let (values, non_finite) = convert_values(bytes, width, convert);
        if let Some(index) = non_finite {
            return Err(Error::NonFinite {
                path: self.path.clone(),
                name: entry.file_name.clone(),
                index,
                value: values[index],
            });
        }
        self.used.borrow_mut().insert(name.to_string());
        Ok(values)
    }

    /// Fails on the first tensor that no part of the model read: a file for another
    /// architecture must not load with parts of it silently ignored.
    pub fn check_all_used(&self) -> Result<()> {
        let used = self.used.borrow();
        let mut unused: Vec<&Entry> = self
            .tensors
            .iter()
            .filter(|(name, _)| !used.contains(*name))
            .map(|(_, e)| e)
            .collect();
        unused.sort_by(|a, b| a.file_name.cmp(&b.file_name));
        match unused.first() {
            Some(e) => Err(Error::UnexpectedTensor {
                path: self.path.clone(),
                name: e.file_name.clone(),
            }),
            None => Ok(()),
        }
    }

    pub fn architecture_error(&self, reason: impl Into<String>) -> Error {
        Error::Architecture {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    pub fn metadata_error(&self, key: &str, reason: impl Into<String>) -> Error {
        Error::Metadata {
            path: self.path.clone(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    /// Parses metadata `key` with `parse`, naming the key and the raw value when it fails.
    pub fn parse_metadata<T>(
        &self,
        key: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(raw) => parse(raw)
                .map(Some)
                .ok_or_else(|| self.metadata_error(key, format!("cannot parse {raw:?}"))),
        }
    }
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lower-case hex sha256 of a file, streamed rather than read into memory.
pub fn sha256_file(path: &Path) -> Result<String> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(io)?;
    Ok(hex(&hasher.finalize()))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

type Header = (HashMap<String, Entry>, HashMap<String, String>);

fn parse_header(path: &Path, bytes: &[u8]) -> Result<Header> {
    let not_st = |reason: String| Error::NotSafetensors {
        path: path.to_path_buf(),
        reason,
    };
    let file_len = bytes.len() as u64;
    let Some(len_bytes) = bytes.get(..8) else {
        return Err(not_st(format!(
            "{file_len} bytes is shorter than the 8-byte header length"
        )));
    };
    let header_len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
    if header_len.saturating_add(8) > file_len {
        // A header longer than the file is either truncation or not a safetensors file at
        // all; a JSON-looking start tells the two apart.
        if bytes.get(8) == Some(&b'{') {
            return Err(Error::Truncated {
                path: path.to_path_buf(),
                expected: header_len.saturating_add(8),
                found: file_len,
            });
        }
        return Err(not_st(format!(
            "header length {header_len} exceeds the file size {file_len}"
        )));
    }
    let data_start = 8 + header_len as usize;
    // The header is parsed once, by the library, which also checks every offset against the
    // file; only when that fails is it read again, to tell a file cut short (reported with the
    // size its header promises) from a generic inconsistency.
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| {
        match promised_end(&bytes[8..data_start]).map(|end| data_start as u64 + end) {
            Some(expected) if expected > file_len => Error::Truncated {
                path: path.to_path_buf(),
                expected,
                found: file_len,
            },
            _ => not_st(e.to_string()),
        }
    })?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let mut tensors = HashMap::new();
    for (file_name, info) in meta.tensors() {
        if IGNORED_SUFFIXES.iter().any(|s| file_name.ends_with(s)) {
            continue;
        }
        let canonical = remap_key(&file_name);
        let entry = Entry {
            file_name: file_name.clone(),
            dtype: info.dtype,
            shape: info.shape.clone(),
            start: data_start + info.data_offsets.0,
            end: data_start + info.data_offsets.1,
        };
        if let Some(previous) = tensors.insert(canonical.clone(), entry) {
            return Err(not_st(format!(
                "`{}` and `{file_name}` are two spellings of the same tensor `{canonical}`",
                previous.file_name
            )));
        }
    }
    Ok((tensors, metadata))
}

/// The largest data offset a safetensors JSON header names, if it is JSON at all.
fn promised_end(header: &[u8]) -> Option<u64> {
    let header: serde_json::Value = serde_json::from_slice(header).ok()?;
    Some(
        header
            .as_object()?
            .values()
            .filter_map(|v| v.get("data_offsets")?.get(1)?.as_u64())
            .max()
            .unwrap_or(0),
    )
}

/// Values per job of [`convert_values`]: 2 MiB of f32, a huge page's worth, so two threads
/// seldom fault (and wait on) the same one.
const CHUNK: usize = 1 << 19;

/// Values converted per chunk on every thread, so the cold pages of the model's f32 buffers (it
/// keeps every one) are faulted in, and zeroed by the kernel, in parallel: at load that zeroing,
/// not the arithmetic, is most of the time. Also the first non-finite value's index, checked in
/// the same pass.
fn convert_values(
    bytes: &[u8],
    width: usize,
    convert: fn(&[u8]) -> f32,
) -> (Vec<f32>, Option<usize>) {
    let len = bytes.len() / width;
    let mut values = Vec::<f32>::with_capacity(len);
    let non_finite = values.spare_capacity_mut()[..len]
        .par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * width))
        .enumerate()
        .filter_map(|(job, (dst, src))| {
            let mut first = None;
            for (i, (d, b)) in dst.iter_mut().zip(src.chunks_exact(width)).enumerate() {
                let v = convert(b);
                if !v.is_finite() && first.is_none() {
                    first = Some(job * CHUNK + i);
                }
                d.write(v);
            }
            first
        })
        .min();
    // SAFETY: the jobs above wrote each of the `len` values: the chunks of `len` slots pair up
    // with the chunks of `len * width` bytes, one value per `width` bytes.
    unsafe { values.set_len(len) };
    (values, non_finite)
}

#[cfg(test)]
mod tests {
    use super::{convert_values, remap_key, CHUNK};

    /// Every value as the element-wise conversion gives it, in every chunk, for each dtype; the
    /// first non-finite value, whichever chunk's job finishes first.
    #[test]
    fn converts_in_chunks_and_finds_the_first_non_finite_value() {
        type Case = (fn(f32) -> Vec<u8>, usize, fn(&[u8]) -> f32);
        let cases: [Case; 3] = [
            (
                |v| half::f16::from_f32(v).to_le_bytes().to_vec(),
                2,
                |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            ),
            (
                |v| half::bf16::from_f32(v).to_le_bytes().to_vec(),
                2,
                |b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            ),
            (
                |v| v.to_le_bytes().to_vec(),
                4,
                |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            ),
        ];
        // Integers of at most 8 significant bits: exact in all three dtypes.
        let len = 3 * CHUNK + 5;
        let want: Vec<f32> = (0..len).map(|i| (i % 511) as f32 - 255.0).collect();
        for (encode, width, convert) in cases {
            let mut bytes: Vec<u8> = want.iter().flat_map(|&v| encode(v)).collect();
            assert_eq!(convert_values(&bytes, width, convert), (want.clone(), None));
            // A NaN in the third chunk, an infinity earlier in the second: the infinity's
            // index comes back.
            let first = CHUNK + 7;
            for (at, v) in [(2 * CHUNK + 1, f32::NAN), (first, f32::NEG_INFINITY)] {
                bytes[at * width..][..width].copy_from_slice(&encode(v));
            }
            assert_eq!(convert_values(&bytes, width, convert).1, Some(first));
            assert_eq!(convert_values(&[], width, convert), (Vec::new(), None));
        }
    }

    #[test]
    fn remaps_old_torchvision_spellings() {
        let cases = [
            (
                "backbone.fpn.inner_blocks.2.weight",
                "backbone.fpn.inner_blocks.2.0.weight",
            ),
            (
                "backbone.fpn.layer_blocks.0.bias",
                "backbone.fpn.layer_blocks.0.0.bias",
            ),
            ("rpn.head.conv.weight", "rpn.head.conv.0.0.weight"),
            (
                "roi_heads.mask_head.mask_fcn1.weight",
                "roi_heads.mask_head.0.0.weight",
            ),
            (
                "roi_heads.mask_head.mask_fcn4.bias",
                "roi_heads.mask_head.3.0.bias",
            ),
            // Already current: untouched.
            (
                "backbone.fpn.inner_blocks.2.0.weight",
                "backbone.fpn.inner_blocks.2.0.weight",
            ),
            ("rpn.head.conv.0.0.weight", "rpn.head.conv.0.0.weight"),
            (
                "roi_heads.mask_head.0.0.weight",
                "roi_heads.mask_head.0.0.weight",
            ),
            ("backbone.body.conv1.weight", "backbone.body.conv1.weight"),
        ];
        for (old, new) in cases {
            assert_eq!(remap_key(old), new, "{old}");
        }
    }
}
