//! `drape inspect`: what a weights file holds and whether drape can run it.
//!
//! ```text
//! drape inspect weights/drape-tiny-r50.safetensors [--json]
//! ```
//!
//! The file's own facts (size, sha256, dtypes, metadata) come from its header; the architecture,
//! labels and the check that every tensor the model needs is there with the right shape come
//! from [`MaskRcnn::load`] itself, so `inspect` passes exactly when `detect` would load the file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::Serialize;

use crate::error::Result;
use crate::model::plan::{plan, DevicePlan, PlanTarget};
use crate::model::Architecture;
use crate::weights::{sha256_hex, HeadVariant, Weights};
use crate::MaskRcnn;

/// Whether drape can run the file, and if not, the loader's error.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub ok: bool,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub path: PathBuf,
    pub file_bytes: u64,
    pub sha256: String,
    /// The tensors' dtypes, e.g. `["F16"]`.
    pub dtypes: Vec<String>,
    pub tensors: usize,
    pub parameters: u64,
    /// `v1`, `v2`, or `unknown`, from the box head's tensor names.
    pub head: &'static str,
    pub metadata: BTreeMap<String, String>,
    /// The rest is what the loader found; absent when the check failed.
    pub architecture: Option<Architecture>,
    /// Names of classes 1..num_classes-1.
    pub labels: Option<Vec<String>>,
    pub min_size: Option<usize>,
    pub max_size: Option<usize>,
    pub check: Check,
    /// The device-memory plan, when asked for (`--plan`) and the check passed.
    pub plan: Option<DevicePlan>,
}

/// `--plan TARGET [--min-size N] [--max-size N]`: sizes default to the file's (or drape's).
#[derive(Debug, Clone, Copy)]
pub struct PlanRequest {
    pub target: PlanTarget,
    pub min_size: Option<usize>,
    pub max_size: Option<usize>,
}

/// Inspects `path`. Errors only when the file cannot be read as safetensors at all; a file
/// that is safetensors but not a model drape can run is a report with a failed check.
pub fn inspect(path: &Path, plan_request: Option<PlanRequest>) -> Result<Report> {
    // The loader's own reading of the file, so a bad file gets the same message here as in
    // `detect` (truncation, a directory, a header that is not JSON, ...).
    let weights = Weights::open(path)?;
    let dtypes: BTreeSet<String> = weights.entries().map(|(_, dtype)| dtype).collect();
    let parameters = weights
        .entries()
        .map(|(shape, _)| shape.iter().product::<usize>() as u64)
        .sum();
    let tensors = weights.entries().count();
    let head = weights.head_variant().map_or("unknown", HeadVariant::name);

    let mut report = Report {
        path: path.to_path_buf(),
        file_bytes: weights.bytes().len() as u64,
        sha256: sha256_hex(weights.bytes()),
        dtypes: dtypes.into_iter().collect(),
        tensors,
        parameters,
        head,
        metadata: weights
            .all_metadata()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        architecture: None,
        labels: None,
        min_size: None,
        max_size: None,
        check: Check {
            ok: true,
            error: None,
        },
        plan: None,
    };
    let sizes = |c: &mut crate::Config| {
        if let Some(r) = plan_request {
            c.min_size = r.min_size.unwrap_or(c.min_size);
            c.max_size = r.max_size.unwrap_or(c.max_size);
        }
    };
    match MaskRcnn::load(path, sizes, &Device::Cpu) {
        Ok(model) => {
            let a = model.architecture();
            report.labels = Some(
                (1..a.num_classes)
                    .map(|k| model.label(k).to_owned())
                    .collect(),
            );
            report.architecture = Some(a.clone());
            report.min_size = Some(model.config().min_size);
            report.max_size = Some(model.config().max_size);
            if let Some(r) = plan_request {
                let c = model.config();
                report.plan = Some(plan(&weights, &model, r.target, c.min_size, c.max_size)?);
            }
        }
        Err(e) => {
            report.check = Check {
                ok: false,
                error: Some(e.to_string()),
            };
        }
    }
    Ok(report)
}
