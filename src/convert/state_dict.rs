//! Finding the state_dict in a replayed checkpoint pickle: bare, or under a training
//! checkpoint's `model` / `state_dict` / `model_state_dict`, with or without the `module.`
//! prefix `nn.DataParallel` adds, and checked by its key names to be a torchvision Mask R-CNN.

use std::path::Path;

use super::pickle::{Pickle, TensorRef, Value};
use super::ConvertError;

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
/// How many keys an error message lists.
const LIST_KEYS: usize = 8;

/// The state_dict's tensors under the names the output uses.
pub(super) struct StateDict {
    /// (name, tensor) in checkpoint order, owned so that storages can be read while they live.
    pub(super) entries: Vec<(String, TensorRef)>,
    /// Top-level key it was under, `None` for a bare one.
    pub(super) key: Option<String>,
    pub(super) stripped_prefix: bool,
    pub(super) dropped: usize,
}

impl StateDict {
    /// Finds the state_dict, strips a DataParallel prefix, drops training-only buffers and
    /// checks by the key names that it is a torchvision Mask R-CNN.
    pub(super) fn find(path: &Path, p: &Pickle, key: Option<&str>) -> Result<Self, ConvertError> {
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
