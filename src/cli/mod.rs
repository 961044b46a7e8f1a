//! The command line's own half: flags, progress bars and printing. The library takes typed
//! options and reports progress through callbacks; everything a person sees is made here.
//!
//! This module holds the flags every model-loading command shares and how they become a loaded
//! model; each subcommand that lives outside `main.rs` has its own submodule.

pub mod choice;
pub mod convert;
pub mod eval;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;

use drape::device::{DeviceSpec, GpuOptions, PoolKeep};
use drape::MaskRcnn;

#[derive(clap::Args)]
pub struct ModelArgs {
    /// Safetensors weights with torchvision key names [default: the bundled demo model,
    /// weights/drape-tiny-r50.safetensors, found beside the executable or under $DRAPE_HOME].
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Shorter side the image is resized to (default: the file's metadata, else 800).
    #[arg(long)]
    pub min_size: Option<usize>,
    /// Cap on the longer side (default: the file's metadata, else 1333).
    #[arg(long)]
    pub max_size: Option<usize>,
    /// Keep detections scoring above this, in [0, 1] (torchvision's default 0.05).
    #[arg(long)]
    pub score_thresh: Option<f32>,
    /// auto (CUDA, then Metal, where built and present, else CPU), cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// Freed CUDA memory kept for the next frame, in MiB, or auto (a quarter of the device's
    /// memory; on a Jetson the GPU's memory is the CPU's too).
    #[arg(long, default_value = "auto")]
    pub gpu_pool_keep_mb: PoolKeep,
    /// Worker threads for the CPU kernels (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl ModelArgs {
    /// The weights file: `--weights`, else the bundled demo model.
    pub fn weights_path(&self) -> Result<PathBuf> {
        match &self.weights {
            Some(path) => Ok(path.clone()),
            None => Ok(drape::assets::find(drape::assets::DEMO_WEIGHTS)?),
        }
    }

    /// Validates the flags, sizes the thread pool, opens the device and loads the model.
    pub fn load(&self) -> Result<MaskRcnn> {
        self.validate()?;
        set_threads(self.threads)?;
        let gpu = GpuOptions {
            pool_keep: self.gpu_pool_keep_mb,
        };
        self.load_on(&self.device.open(gpu)?)
    }

    /// Checks each flag on its own, so a bad value is reported by its flag's name rather than
    /// as a setting of the loaded model.
    fn validate(&self) -> Result<()> {
        let max = drape::config::MAX_INPUT_SIDE;
        for (flag, value) in [("--min-size", self.min_size), ("--max-size", self.max_size)] {
            if value == Some(0) {
                bail!("{flag} must be at least 1");
            }
            if let Some(v) = value.filter(|&v| v > max) {
                bail!("{flag} {v} must be at most {max}");
            }
        }
        if let Some(t) = self.score_thresh {
            if !(0.0..=1.0).contains(&t) {
                bail!("--score-thresh {t} must lie in [0, 1]");
            }
        }
        Ok(())
    }

    /// Loads the model on `device` (a CPU reference beside a GPU run, say).
    pub fn load_on(&self, device: &Device) -> Result<MaskRcnn> {
        self.validate()?;
        let weights = self.weights_path()?;
        MaskRcnn::load(
            &weights,
            |cfg| {
                if let Some(v) = self.min_size {
                    cfg.min_size = v;
                }
                if let Some(v) = self.max_size {
                    cfg.max_size = v;
                }
                if let Some(v) = self.score_thresh {
                    cfg.box_score_thresh = v;
                }
            },
            device,
        )
        .with_context(|| format!("loading weights {}", weights.display()))
    }
}

/// Sizes rayon's global pool (and candle's kernels) once, before any work.
fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        // candle sizes its CPU kernels from this variable; gemm and our kernels use rayon's pool.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("configuring the thread pool")?;
    }
    Ok(())
}
