//! The two containers `torch.save` writes (`torch/serialization.py`):
//!
//! - zip (torch >= 1.6): `NAME/data.pkl` holds the object, each storage is an uncompressed entry
//!   `NAME/data/KEY`, `NAME/byteorder` says `little`.
//! - legacy (`_use_new_zipfile_serialization=False`, torch < 1.6): five pickles back to back
//!   (magic number, protocol version, sys info, the object, the sorted storage keys), then each
//!   storage in key order as an int64 element count and its raw bytes.
//!
//! Either way the object pickle names storages by key through persistent ids; [`Checkpoint`]
//! hands out a storage's bytes after checking they are exactly as long as the pickle declared.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use zip::{CompressionMethod, ZipArchive};

use super::pickle::{self, Pickle, StorageRef, Value};
use super::ConvertError;

/// `torch.serialization.MAGIC_NUMBER`, the legacy format's first pickle.
const LEGACY_MAGIC: i128 = 0x1950a86a20f9469cfc6c;
/// `torch.serialization.PROTOCOL_VERSION`, its second.
const LEGACY_PROTOCOL: i128 = 1001;
const ZIP_MAGIC: &[u8] = b"PK\x03\x04";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Zip,
    Legacy,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Zip => "zip archive (torch >= 1.6)",
            Self::Legacy => "legacy stream (torch < 1.6)",
        })
    }
}

enum Storages<'a> {
    Zip {
        archive: ZipArchive<Cursor<&'a [u8]>>,
        prefix: String,
    },
    Legacy(HashMap<String, &'a [u8]>),
}

/// An opened checkpoint: its object pickle and access to its storages.
pub struct Checkpoint<'a> {
    path: PathBuf,
    pub format: Format,
    pub pickle: Pickle,
    storages: Storages<'a>,
}

impl<'a> Checkpoint<'a> {
    pub fn open(path: &Path, bytes: &'a [u8]) -> Result<Self, ConvertError> {
        if bytes.starts_with(ZIP_MAGIC) {
            Self::open_zip(path, bytes)
        } else {
            Self::open_legacy(path, bytes)
        }
    }

    fn open_zip(path: &Path, bytes: &'a [u8]) -> Result<Self, ConvertError> {
        let zip_err = |reason: String| ConvertError::Zip {
            path: path.to_path_buf(),
            reason,
        };
        let mut archive =
            ZipArchive::new(Cursor::new(bytes)).map_err(|e| zip_err(e.to_string()))?;
        let names: Vec<String> = archive
            .file_names()
            .map(|n| n.map(Cow::into_owned))
            .collect::<Result<_, _>>()
            .map_err(|e| zip_err(e.to_string()))?;
        if let Some(entry) = names.iter().find(|n| {
            let inner = n.split_once('/').map_or("", |(_, rest)| rest);
            inner == "constants.pkl" || inner.starts_with("code/")
        }) {
            return Err(ConvertError::TorchScript {
                path: path.to_path_buf(),
                entry: entry.clone(),
            });
        }
        let Some(prefix) = names.iter().find_map(|n| {
            n.strip_suffix("/data.pkl")
                .filter(|p| !p.contains('/'))
                .map(str::to_owned)
        }) else {
            return Err(ConvertError::NotCheckpoint {
                path: path.to_path_buf(),
                reason: "a zip archive without a `data.pkl`, so not one torch.save wrote".into(),
            });
        };
        let byteorder = format!("{prefix}/byteorder");
        if names.contains(&byteorder) {
            let order = read_entry(path, &mut archive, &byteorder, bytes.len())?;
            if order != b"little" {
                return Err(ConvertError::NotCheckpoint {
                    path: path.to_path_buf(),
                    reason: format!(
                        "its storages are {} endian; drape reads little-endian checkpoints",
                        String::from_utf8_lossy(&order)
                    ),
                });
            }
        }
        let data_pkl = format!("{prefix}/data.pkl");
        let pkl = read_entry(path, &mut archive, &data_pkl, bytes.len())?;
        let pickle = pickle::parse(&pkl).map_err(|error| ConvertError::Pickle {
            path: path.to_path_buf(),
            entry: data_pkl,
            error,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            format: Format::Zip,
            pickle,
            storages: Storages::Zip { archive, prefix },
        })
    }

    fn open_legacy(path: &Path, bytes: &'a [u8]) -> Result<Self, ConvertError> {
        let not_checkpoint = |reason: String| ConvertError::NotCheckpoint {
            path: path.to_path_buf(),
            reason,
        };
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        let unrecognised = || {
            not_checkpoint(format!(
                "neither a zip archive (torch >= 1.6) nor a legacy torch.save stream \
                 (torch < 1.6); it starts with bytes {}",
                head.join(" ")
            ))
        };
        let mut pos = 0;
        let mut next = |what: &str| -> Result<Pickle, ConvertError> {
            let p = pickle::parse(&bytes[pos..]).map_err(|error| ConvertError::Pickle {
                path: path.to_path_buf(),
                entry: format!("{what} pickle at byte {pos}"),
                error,
            })?;
            pos += p.len;
            Ok(p)
        };
        let magic = next("magic number").map_err(|_| unrecognised())?;
        if magic.root != Value::Int(LEGACY_MAGIC) {
            return Err(unrecognised());
        }
        let protocol = next("protocol version")?;
        if protocol.root != Value::Int(LEGACY_PROTOCOL) {
            return Err(not_checkpoint(format!(
                "legacy protocol version {}, drape reads {LEGACY_PROTOCOL}",
                protocol.describe(protocol.root)
            )));
        }
        let sys_info = next("sys info")?;
        let little = sys_info.dict(sys_info.root).and_then(|items| {
            items
                .iter()
                .find(|(k, _)| sys_info.str(*k) == Some("little_endian"))
                .map(|(_, v)| *v)
        });
        if little == Some(Value::Bool(false)) {
            return Err(not_checkpoint(
                "written on a big-endian machine; drape reads little-endian checkpoints".into(),
            ));
        }
        let object = next("object")?;
        let keys_pickle = next("storage keys")?;
        let keys = keys_pickle
            .list(keys_pickle.root)
            .ok_or_else(|| not_checkpoint("the storage key list is not a list".into()))?;
        let declared: HashMap<&str, &StorageRef> =
            object.storages().map(|s| (s.key.as_str(), s)).collect();
        let mut storages = HashMap::new();
        for &k in keys {
            let key = keys_pickle
                .str(k)
                .ok_or_else(|| not_checkpoint("a storage key is not a string".into()))?;
            let storage_err = |reason: String| ConvertError::Storage {
                path: path.to_path_buf(),
                key: key.to_owned(),
                reason,
            };
            let s = declared
                .get(key)
                .ok_or_else(|| storage_err("listed but no tensor uses it".into()))?;
            let count = bytes.get(pos..pos + 8).ok_or_else(|| {
                storage_err(format!(
                    "the file ends at byte {} before its size (truncated?)",
                    bytes.len()
                ))
            })?;
            let count = u64::from_le_bytes(count.try_into().expect("8 bytes"));
            if count != s.numel {
                return Err(storage_err(format!(
                    "{count} elements stored, {} declared",
                    s.numel
                )));
            }
            let start = pos + 8;
            let len = storage_len(s).ok_or_else(|| storage_err("size overflows".into()))?;
            let end = start.checked_add(len).filter(|&e| e <= bytes.len());
            let Some(end) = end else {
                return Err(storage_err(format!(
                    "needs {len} bytes from byte {start} but the file ends at byte {} \
                     (truncated?)",
                    bytes.len()
                )));
            };
            storages.insert(key.to_owned(), &bytes[start..end]);
            pos = end;
        }
        Ok(Self {
            path: path.to_path_buf(),
            format: Format::Legacy,
            pickle: object,
            storages: Storages::Legacy(storages),
        })
    }

    /// The bytes of storage `s`, exactly as long as the pickle declared.
    pub fn storage(&mut self, s: &StorageRef) -> Result<Cow<'a, [u8]>, ConvertError> {
        let storage_err = |reason: String| ConvertError::Storage {
            path: self.path.clone(),
            key: s.key.clone(),
            reason,
        };
        let expected = storage_len(s).ok_or_else(|| storage_err("size overflows".into()))?;
        match &mut self.storages {
            Storages::Legacy(map) => map
                .get(s.key.as_str())
                .map(|b| Cow::Borrowed(*b))
                .ok_or_else(|| storage_err("missing from the file".into())),
            Storages::Zip { archive, prefix } => {
                let name = format!("{prefix}/data/{}", s.key);
                let entry = archive
                    .by_name(&name)
                    .map_err(|e| storage_err(format!("entry `{name}`: {e}")))?;
                if entry.size() != expected as u64 {
                    return Err(storage_err(format!(
                        "entry `{name}` has {} bytes; {} {} elements need {expected}",
                        entry.size(),
                        s.numel,
                        s.dtype.name()
                    )));
                }
                drop(entry);
                let data = read_entry(&self.path, archive, &name, expected)?;
                if data.len() != expected {
                    return Err(storage_err(format!(
                        "entry `{name}` holds {} bytes, {expected} expected",
                        data.len()
                    )));
                }
                Ok(Cow::Owned(data))
            }
        }
    }
}

fn storage_len(s: &StorageRef) -> Option<usize> {
    usize::try_from(s.numel).ok()?.checked_mul(s.dtype.size())
}

/// Reads a whole stored (uncompressed) entry of at most `cap` bytes; the zip reader checks its
/// CRC at the end.
fn read_entry(
    path: &Path,
    archive: &mut ZipArchive<Cursor<&[u8]>>,
    name: &str,
    cap: usize,
) -> Result<Vec<u8>, ConvertError> {
    let zip_err = |reason: String| ConvertError::Zip {
        path: path.to_path_buf(),
        reason: format!("entry `{name}`: {reason}"),
    };
    let mut entry = archive.by_name(name).map_err(|e| zip_err(e.to_string()))?;
    if entry.compression() != CompressionMethod::Stored {
        return Err(zip_err(format!(
            "compressed with {:?}; torch.save stores entries uncompressed (was the archive \
             re-zipped?)",
            entry.compression()
        )));
    }
    let size = usize::try_from(entry.size()).unwrap_or(usize::MAX);
    if size > cap {
        return Err(zip_err(format!(
            "claims {size} bytes, more than the {cap} expected"
        )));
    }
    let mut data = Vec::with_capacity(size);
    entry
        .read_to_end(&mut data)
        .map_err(|e| zip_err(e.to_string()))?;
    Ok(data)
}
