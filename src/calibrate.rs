//! `drape calibrate`: measures this device's costs at every ladder size, picks the settings
//! that meet a latency budget at p99, and keeps them in a human-readable profile
//! (`calibration/<device>.toml`) that `drape run` loads.

use std::path::{Path, PathBuf};

use candle_core::{Device, DeviceLocation};
use serde::{Deserialize, Serialize};

use crate::bench::percentile;
use crate::error::{Error, Result};
use crate::model::transform::Transform;
use crate::model::{FrameSettings, MaskRcnn};
use crate::pipeline::{ladder, CostModel};
use crate::postprocess::{Detections, Detector};

/// Share of the budget the chosen settings may use at p99 (as the pipeline plans).
const PROFILE_HEADROOM: f64 = 0.9;

/// A name for the device the model runs on, used as the profile's file name: the CPU model and
/// thread count on the CPU, the GPU's name on a GPU (where the CPU hardly matters).
pub fn device_name(device: &Device, threads: usize) -> String {
    match crate::device::gpu_name(device) {
        Some(gpu) => {
            let backend = if device.is_cuda() { "cuda" } else { "metal" };
            format!("{backend}-{}", slug(&gpu))
        }
        None if device.is_cpu() => {
            let cpu = std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("model name"))
                        .and_then(|l| l.split(':').nth(1))
                        .map(str::to_string)
                })
                .unwrap_or_else(|| std::env::consts::ARCH.to_string());
            format!("cpu-{}-{threads}t", slug(&cpu))
        }
        // A GPU whose driver gives no name.
        None => match device.location() {
            DeviceLocation::Cuda { gpu_id } => format!("cuda{gpu_id}"),
            _ => "metal".to_string(),
        },
    }
}

/// Lower-case ASCII words joined by single dashes.
fn slug(name: &str) -> String {
    let dashed: String = name
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    dashed
        .split('-')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

/// Costs measured at one ladder size.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Measured {
    pub min_size: usize,
    pub max_size: usize,
    /// [w, h] of the model input for the calibration frames.
    pub input: [usize; 2],
    /// Everything but the mask branch.
    pub fixed_median_ms: f64,
    pub fixed_p99_ms: f64,
    /// Mask head + paste + RLE, per masked detection.
    pub mask_ms_per_detection: f64,
}

/// Camera transforms recorded with the profile (the installation's, as given to calibrate).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ProfileTransforms {
    pub rotate: u32,
    pub flip: bool,
    pub crop: Option<String>,
}

/// What `drape calibrate` found, and what `drape run` checks before trusting it (see
/// [`Profile::seed`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Profile {
    /// [`device_name`] of the device measured: costs are facts about it alone.
    pub device: String,
    pub threads: usize,
    pub model_sha256: String,
    pub budget_ms: f64,
    /// The chosen ladder position and the input size it stood for.
    pub level: usize,
    pub min_size: usize,
    pub max_size: usize,
    pub costs: CostModel,
    pub transforms: ProfileTransforms,
    pub measured: Vec<Measured>,
}

/// What a run is, for deciding how much of a profile applies to it.
#[derive(Debug, Clone)]
pub struct RunSetup<'a> {
    /// [`device_name`] of the device the run uses.
    pub device: &'a str,
    pub threads: usize,
    pub model_sha256: &'a str,
    pub budget_ms: f64,
    /// The model's own (min_size, max_size), the top of the run's ladder.
    pub base: (usize, usize),
    pub transforms: &'a ProfileTransforms,
}

/// How a run uses a profile.
#[derive(Debug, Clone, PartialEq)]
pub enum Seed {
    /// Made for another model or device: nothing in it applies. Says why.
    Ignore(String),
    /// Costs to start the cost model from, and the ladder level to start at: the profile's
    /// choice where it was made for this very run (budget, threads, input sizes and camera
    /// transforms alike), else the top, from which the budget steps down as it learns.
    Costs { costs: CostModel, level: usize },
}

impl Profile {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| Error::Profile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = toml::to_string_pretty(self).map_err(|e| Error::Profile {
            path: path.to_path_buf(),
            reason: format!("serialising: {e}"),
        })?;
        let header =
            "# drape calibration profile: written by `drape calibrate`, read by `drape run`.\n\
                      # Costs in milliseconds on this device; edit with care.\n";
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        std::fs::write(path, format!("{header}{text}")).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// How much of this profile `run` may use; see [`Seed`].
    pub fn seed(&self, run: &RunSetup<'_>) -> Seed {
        if self.model_sha256 != run.model_sha256 {
            return Seed::Ignore("calibrated for another model".into());
        }
        if self.device != run.device {
            return Seed::Ignore(format!("calibrated on {}", self.device));
        }
        let same_size = ladder(run.base).get(self.level) == Some(&(self.min_size, self.max_size));
        let same_run = self.budget_ms == run.budget_ms
            && self.threads == run.threads
            && &self.transforms == run.transforms
            && same_size;
        Seed::Costs {
            costs: self.costs,
            level: if same_run { self.level } else { 0 },
        }
    }

    /// The profile `run` loads: `explicit` if given, else the default one for `device` if it
    /// exists.
    pub fn for_run(explicit: Option<&Path>, device: &Device, threads: usize) -> Option<PathBuf> {
        match explicit {
            Some(path) => Some(path.to_path_buf()),
            None => Some(Self::default_path(device, threads)).filter(|p| p.exists()),
        }
    }

    /// The default profile location for `device`: the bundled `calibration/` folder, so
    /// `calibrate` and `run` agree on it from any working directory (relative to the working
    /// directory only when drape runs without its bundled files).
    pub fn default_path(device: &Device, threads: usize) -> PathBuf {
        let dir = crate::assets::find(crate::assets::PROFILES)
            .unwrap_or_else(|_| PathBuf::from(crate::assets::PROFILES));
        dir.join(format!("{}.toml", device_name(device, threads)))
    }
}

/// Runs `frames` frames at every size of the model's [`ladder`] (first without masks, then with
/// every detection masked) and derives a profile for `budget_ms`. `progress` ticks per run.
pub fn calibrate(
    model: &MaskRcnn,
    frames: &[(Vec<u8>, (usize, usize))],
    budget_ms: f64,
    runs_per_size: usize,
    mut progress: impl FnMut(),
) -> Result<(Vec<Measured>, usize, usize, CostModel)> {
    if runs_per_size == 0 {
        return Err(Error::Config("calibration needs at least one run".into()));
    }
    if frames.is_empty() {
        return Err(Error::Capture(
            "the source gave no frames to calibrate on".into(),
        ));
    }
    let base = (model.config().min_size, model.config().max_size);
    let full = model.config().detections_per_img;
    let mut detector = Detector::default();
    let mut out = Detections::default();
    // One untimed run first: the first frame pays for page faults and lazy set-up.
    let (rgb, size) = &frames[0];
    detector.run(model, rgb, *size, model.default_settings(), &mut out)?;
    let mut measured = Vec::new();
    for (min_size, max_size) in ladder(base) {
        let mut fixed = Vec::new();
        let mut per_mask = Vec::new();
        let mut input = [0, 0];
        for run in 0..runs_per_size {
            let (rgb, size) = &frames[run % frames.len()];
            for max_masks in [0, full] {
                let settings = FrameSettings {
                    min_size,
                    max_size,
                    max_masks,
                };
                detector.run(model, rgb, *size, settings, &mut out)?;
                let t = &out.timings;
                let mask = t.mask_head + t.paste + t.rle;
                if max_masks == 0 {
                    fixed.push(t.total - mask);
                } else if out.masked > 0 {
                    per_mask.push(mask / out.masked as f64);
                }
                input = [out.input_size.0, out.input_size.1];
                progress();
            }
        }
        fixed.sort_by(f64::total_cmp);
        per_mask.sort_by(f64::total_cmp);
        measured.push(Measured {
            min_size,
            max_size,
            input,
            fixed_median_ms: percentile(&fixed, 50.0),
            fixed_p99_ms: percentile(&fixed, 99.0),
            mask_ms_per_detection: if per_mask.is_empty() {
                0.0
            } else {
                percentile(&per_mask, 99.0)
            },
        });
    }
    // The largest size whose p99 fixed cost leaves room in the budget; then as many masks as
    // fit beside it at their p99 cost.
    let target = budget_ms * PROFILE_HEADROOM;
    let level = measured
        .iter()
        .position(|m| m.fixed_p99_ms <= target)
        .unwrap_or(measured.len() - 1);
    let m = &measured[level];
    let max_masks = if m.mask_ms_per_detection > 0.0 {
        (((target - m.fixed_p99_ms) / m.mask_ms_per_detection).max(0.0) as usize).min(full)
    } else {
        full
    };
    let mpx = |m: &Measured| {
        let (h, w) = Transform::padded_size((m.input[1], m.input[0]));
        (h * w) as f64 / 1e6
    };
    let costs = CostModel {
        fixed_ms_per_mpx: m.fixed_median_ms / mpx(m),
        mask_ms: measured
            .iter()
            .map(|m| m.mask_ms_per_detection)
            .fold(0.0, f64::max),
        safety: (m.fixed_p99_ms / m.fixed_median_ms).max(1.0),
    };
    Ok((measured, level, max_masks, costs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_file_name_safe_slugs() {
        assert_eq!(
            slug("  NVIDIA GeForce RTX 4090 "),
            "nvidia-geforce-rtx-4090"
        );
        assert_eq!(
            slug("AMD EPYC 7B13 64-Core Processor"),
            "amd-epyc-7b13-64-core-processor"
        );
        assert_eq!(slug("Apple M3 (Pro)"), "apple-m3-pro");
    }

    #[test]
    fn cpu_profiles_name_the_cpu_and_thread_count() {
        let name = device_name(&Device::Cpu, 2);
        assert!(name.starts_with("cpu-") && name.ends_with("-2t"), "{name}");
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "{name}"
        );
        let path = Profile::default_path(&Device::Cpu, 2);
        assert!(
            path.ends_with(Path::new("calibration").join(format!("{name}.toml"))),
            "{}",
            path.display()
        );
    }

    #[test]
    fn a_profile_applies_as_far_as_the_run_matches_it() {
        let costs = CostModel {
            fixed_ms_per_mpx: 50.0,
            mask_ms: 1.0,
            safety: 1.2,
        };
        let base = (800, 1333);
        let (min_size, max_size) = ladder(base)[2];
        let profile = Profile {
            device: "cpu-x-2t".into(),
            threads: 2,
            model_sha256: "abc".into(),
            budget_ms: 100.0,
            level: 2,
            min_size,
            max_size,
            costs,
            transforms: ProfileTransforms::default(),
            measured: Vec::new(),
        };
        let transforms = ProfileTransforms::default();
        let run = RunSetup {
            device: "cpu-x-2t",
            threads: 2,
            model_sha256: "abc",
            budget_ms: 100.0,
            base,
            transforms: &transforms,
        };
        assert_eq!(profile.seed(&run), Seed::Costs { costs, level: 2 });
        let flipped = ProfileTransforms {
            flip: true,
            ..ProfileTransforms::default()
        };
        let top = Seed::Costs { costs, level: 0 };
        for other in [
            RunSetup {
                budget_ms: 50.0,
                ..run.clone()
            },
            RunSetup {
                threads: 4,
                ..run.clone()
            },
            RunSetup {
                base: (640, 1066),
                ..run.clone()
            },
            RunSetup {
                transforms: &flipped,
                ..run.clone()
            },
        ] {
            assert_eq!(profile.seed(&other), top, "{other:?}");
        }
        for other in [
            RunSetup {
                model_sha256: "def",
                ..run.clone()
            },
            RunSetup {
                device: "cuda-a100",
                ..run.clone()
            },
        ] {
            assert!(matches!(profile.seed(&other), Seed::Ignore(_)), "{other:?}");
        }
    }
}
