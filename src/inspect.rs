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
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::Device;
use memmap2::Mmap;
use safetensors::SafeTensors;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::Architecture;
use crate::weights::sha256_hex;
use crate::MaskRcnn;

/// Tensors only one head variant has, to name it (torchvision's `maskrcnn_resnet50_fpn` is v1
/// with `TwoMLPHead`; `maskrcnn_resnet50_fpn_v2` has a `FastRCNNConvFCHead` of conv blocks).
const HEAD_MARKERS: &[(&str, &str)] = &[
    ("roi_heads.box_head.fc6.weight", "v1"),
    ("roi_heads.box_head.0.0.weight", "v2"),
];

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
}

/// Inspects `path`. Errors only when the file cannot be read as safetensors at all; a file
/// that is safetensors but not a model drape can run is a report with a failed check.
pub fn inspect(path: &Path) -> Result<Report> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    // SAFETY: read-only mapping, as in `weights.rs`.
    let bytes = unsafe { Mmap::map(&file) }.map_err(io)?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| Error::NotSafetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let tensors = header.tensors();
    let dtypes: BTreeSet<String> = tensors
        .values()
        .map(|info| format!("{:?}", info.dtype))
        .collect();
    let parameters = tensors
        .values()
        .map(|info| info.shape.iter().product::<usize>() as u64)
        .sum();
    let head = HEAD_MARKERS
        .iter()
        .find(|(name, _)| tensors.contains_key(*name))
        .map_or("unknown", |(_, v)| v);

    let mut report = Report {
        path: path.to_path_buf(),
        file_bytes: bytes.len() as u64,
        sha256: sha256_hex(&bytes),
        dtypes: dtypes.into_iter().collect(),
        tensors: tensors.len(),
        parameters,
        head,
        metadata: header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        architecture: None,
        labels: None,
        min_size: None,
        max_size: None,
        check: Check {
            ok: true,
            error: None,
        },
    };
    match MaskRcnn::load(path, |_| {}, &Device::Cpu) {
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

/// `drape inspect`'s flags.
#[derive(clap::Args)]
pub struct InspectArgs {
    /// Safetensors weights file.
    weights: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Prints the report; fails (exit code 1) when the check fails.
pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let report = inspect(&args.weights)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    match &report.check.error {
        None => Ok(()),
        Some(e) => anyhow::bail!("check failed: {e}"),
    }
}

fn print_report(r: &Report) {
    println!("{}", r.path.display());
    println!(
        "  file          {:.1} MB, sha256 {}",
        r.file_bytes as f64 / 1e6,
        r.sha256
    );
    println!(
        "  tensors       {}, {} parameters, {}",
        r.tensors,
        r.parameters,
        r.dtypes.join(" + ")
    );
    if let Some(a) = &r.architecture {
        println!("  backbone      {}", a.backbone);
        println!(
            "  blocks        {} {:?}, stage channels {:?}",
            a.block, a.blocks_per_stage, a.stage_channels
        );
        println!(
            "  heads         FPN {}, head variant {} (box head {}, mask head {:?}), bn_eps {}",
            a.fpn_channels, r.head, a.representation_size, a.mask_layers, a.bn_eps
        );
        println!("  classes       {} incl. background", a.num_classes);
    }
    if let Some(labels) = &r.labels {
        let source = if r.metadata.contains_key("labels") {
            "from the file"
        } else {
            "default"
        };
        let numbered: Vec<String> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| format!("{}: {l}", i + 1))
            .collect();
        println!("  labels        ({source}) {}", numbered.join(" | "));
    }
    if let (Some(min), Some(max)) = (r.min_size, r.max_size) {
        println!("  input size    shorter side {min}, longer side at most {max}");
    }
    for (k, v) in &r.metadata {
        // Labels were shown above, one per class.
        if k != "labels" {
            println!("  metadata      {k} = {v}");
        }
    }
    match &r.check.error {
        None => println!(
            "  check         ok: every tensor the model needs is present with the right shape"
        ),
        Some(e) => println!("  check         FAILED: {e}"),
    }
}
