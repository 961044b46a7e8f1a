//! Where the model runs and in what precision: `--device` parsing, the `auto` choice, the
//! per-device compute dtype, and the CUDA allocator settings for a one-stream, frame-after-frame
//! workload.
//!
//! Precision: the CPU path is the f32 reference. On CUDA and Metal the weights and every
//! activation stay f16 (convs, matmuls, RoIAlign's output); what needs f32 is done in f32:
//! RoIAlign accumulates its bilinear samples in f32, cuBLAS accumulates f16 GEMMs in f32 (candle's
//! default; convs are im2col + GEMM), the RPN's top-n ranks the f16 logits widened to f32 on the
//! device, the mask logits are widened before their bias, sigmoid and paste, and the class and
//! box logits leave the device as f32 for softmax, box decoding and NMS, which run on the host as
//! on CPU (their inputs are a few thousand boxes). Boxes stay f32 throughout. One exception: with
//! the `cudnn` feature candle asks cuDNN for f16 accumulation in convs.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, DeviceLocation};

use crate::error::{Error, Result};

/// One concrete device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Cpu,
    Cuda { ordinal: usize },
    Metal,
}

impl Backend {
    /// The Cargo feature that compiles this backend in, and the name errors use for it.
    fn feature(self) -> Option<(&'static str, &'static str)> {
        match self {
            Backend::Cpu => None,
            Backend::Cuda { .. } => Some(("cuda", "CUDA")),
            Backend::Metal => Some(("metal", "Metal")),
        }
    }
}

/// The `--device` setting: one backend, or the best one this build and machine offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Auto,
    Only(Backend),
}

impl FromStr for DeviceSpec {
    type Err = Error;

    /// `auto`, `cpu`, `cuda` (ordinal 0), `cuda:N` or `metal`.
    fn from_str(s: &str) -> Result<Self> {
        let only = |b| Ok(DeviceSpec::Only(b));
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => only(Backend::Cpu),
            "cuda" => only(Backend::Cuda { ordinal: 0 }),
            "metal" => only(Backend::Metal),
            other => match other.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(ordinal)) => only(Backend::Cuda { ordinal }),
                _ => Err(Error::DeviceSpec(s.to_string())),
            },
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Cpu => f.write_str("cpu"),
            Backend::Cuda { ordinal } => write!(f, "cuda:{ordinal}"),
            Backend::Metal => f.write_str("metal"),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Only(backend) => backend.fmt(f),
        }
    }
}

/// The GPU backends compiled into this build.
#[derive(Debug, Clone, Copy)]
pub struct Built {
    pub cuda: bool,
    pub metal: bool,
}

impl Built {
    pub const THIS: Built = Built {
        cuda: cfg!(feature = "cuda"),
        metal: cfg!(feature = "metal"),
    };

    fn has(self, backend: Backend) -> bool {
        match backend {
            Backend::Cpu => true,
            Backend::Cuda { .. } => self.cuda,
            Backend::Metal => self.metal,
        }
    }
}

impl DeviceSpec {
    /// Opens the device. `auto` tries CUDA device 0, then Metal, where built, and falls back to
    /// the CPU when neither opens (no GPU, no driver).
    pub fn open(self) -> Result<Device> {
        self.open_with(Built::THIS, open_backend)
    }

    /// [`Self::open`] over any opener, so the choice is testable without a GPU.
    fn open_with<D>(
        self,
        built: Built,
        mut open: impl FnMut(Backend) -> candle_core::Result<D>,
    ) -> Result<D> {
        let opened = |backend: Backend, result: candle_core::Result<D>| {
            result.map_err(|source| Error::DeviceOpen {
                device: backend.to_string(),
                source,
            })
        };
        match self {
            DeviceSpec::Only(backend) => {
                if let (false, Some((feature, name))) = (built.has(backend), backend.feature()) {
                    return Err(Error::BackendNotBuilt {
                        device: backend.to_string(),
                        name,
                        feature,
                    });
                }
                opened(backend, open(backend))
            }
            DeviceSpec::Auto => {
                for backend in [Backend::Cuda { ordinal: 0 }, Backend::Metal] {
                    if !built.has(backend) {
                        continue;
                    }
                    match open(backend) {
                        Ok(device) => return Ok(device),
                        // Built in but not usable (no GPU, no driver): say so, since the CPU is
                        // far slower than whoever built with the feature expected.
                        Err(e) => tracing::warn!(%backend, error = %e, "auto: device unavailable"),
                    }
                }
                opened(Backend::Cpu, open(Backend::Cpu))
            }
        }
    }
}

fn open_backend(backend: Backend) -> candle_core::Result<Device> {
    match backend {
        Backend::Cpu => Ok(Device::Cpu),
        Backend::Cuda { ordinal } => {
            // One explicit stream that every thread launches on (not candle's default per-thread
            // stream): weights are uploaded on the loading thread and used on the inference
            // thread, and that is only ordered without per-buffer events on a shared stream.
            let device = Device::new_cuda_with_stream(ordinal)?;
            #[cfg(feature = "cuda")]
            cuda::configure(device.as_cuda_device()?)?;
            Ok(device)
        }
        Backend::Metal => Device::new_metal(0),
    }
}

/// The dtype weights and activations are kept in on `location`: f32 on the CPU (the reference
/// path, and what its kernels are written for), f16 on GPUs (half the memory traffic, and tensor
/// cores on CUDA).
pub fn compute_dtype(location: DeviceLocation) -> DType {
    match location {
        DeviceLocation::Cpu => DType::F32,
        DeviceLocation::Cuda { .. } | DeviceLocation::Metal { .. } => DType::F16,
    }
}

/// The GPU's own name (e.g. "Orin", "NVIDIA GeForce RTX 4090", "Apple M3"); `None` on the CPU
/// or where the driver does not say.
pub fn gpu_name(device: &Device) -> Option<String> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => d.cuda_stream().context().name().ok(),
        #[cfg(feature = "metal")]
        Device::Metal(d) => {
            use objc2_metal::MTLDevice;
            Some(d.metal_device().as_ref().name().to_string())
        }
        _ => None,
    }
}

/// Device memory in MiB, where the backend can say.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct DeviceMemory {
    /// In use on the whole device (all processes), from the driver's free/total.
    pub used_mb: f64,
    pub total_mb: f64,
    /// High-water mark of this process's stream-ordered pool since it was created.
    pub pool_peak_mb: Option<f64>,
}

/// `None` on the CPU and on Metal (candle exposes no allocation counters there).
pub fn memory(device: &Device) -> Option<DeviceMemory> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => cuda::memory(d).ok(),
        _ => None,
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::CudaDevice;

    use super::DeviceMemory;

    const MIB: f64 = 1024.0 * 1024.0;

    /// The device's current stream-ordered pool (what `cuMemAllocAsync` draws from), if the
    /// device has one.
    fn pool(device: &CudaDevice) -> candle_core::Result<Option<sys::CUmemoryPool>> {
        let stream = device.cuda_stream();
        let ctx = stream.context();
        if !ctx.has_async_alloc() {
            return Ok(None);
        }
        // SAFETY: `cu_device` comes from a live context.
        Ok(Some(
            unsafe { result::device::get_mem_pool(ctx.cu_device()) }.w()?,
        ))
    }

    pub(super) fn configure(device: &CudaDevice) -> candle_core::Result<()> {
        // SAFETY: the device was created with one explicit stream that all of drape's work is
        // queued on (see `open_backend`), so stream order alone keeps every buffer's uses apart;
        // the per-buffer events only cost two event creations per allocation.
        unsafe { device.disable_event_tracking() };
        if let Some(pool) = pool(device)? {
            // The pool's default threshold (0) hands freed memory back to the driver at every
            // synchronisation, i.e. every frame, and the next frame maps it again. Keep it.
            let mut threshold = u64::MAX;
            // SAFETY: a valid pool; the attribute takes a cuuint64_t.
            unsafe {
                result::mem_pool::set_attribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut threshold as *mut u64).cast(),
                )
            }
            .w()?;
        }
        Ok(())
    }

    pub(super) fn memory(device: &CudaDevice) -> candle_core::Result<DeviceMemory> {
        let stream = device.cuda_stream();
        let (free, total) = stream.context().mem_get_info().w()?;
        let pool_peak_mb = match pool(device)? {
            Some(pool) => {
                let mut high = 0u64;
                // SAFETY: a valid pool; the attribute is a cuuint64_t.
                unsafe {
                    result::mem_pool::get_attribute(
                        pool,
                        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                        (&mut high as *mut u64).cast(),
                    )
                }
                .w()?;
                Some(high as f64 / MIB)
            }
            None => None,
        };
        Ok(DeviceMemory {
            used_mb: (total - free) as f64 / MIB,
            total_mb: total as f64 / MIB,
            pool_peak_mb,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling() {
        let cases = [
            ("auto", Some(DeviceSpec::Auto)),
            ("cpu", Some(DeviceSpec::Only(Backend::Cpu))),
            ("CPU", Some(DeviceSpec::Only(Backend::Cpu))),
            ("cuda", Some(DeviceSpec::Only(Backend::Cuda { ordinal: 0 }))),
            (
                "cuda:1",
                Some(DeviceSpec::Only(Backend::Cuda { ordinal: 1 })),
            ),
            ("metal", Some(DeviceSpec::Only(Backend::Metal))),
            ("cuda:", None),
            ("cuda:-1", None),
            ("cuda:x", None),
            ("gpu", None),
            ("", None),
        ];
        let wrong: Vec<_> = cases
            .iter()
            .filter(|(s, want)| s.parse::<DeviceSpec>().ok() != *want)
            .collect();
        assert!(wrong.is_empty(), "{wrong:?}");
        // Round trip through the spelling errors and logs use.
        for (s, want) in cases.iter().filter_map(|(s, w)| Some((s, (*w)?))) {
            assert_eq!(want.to_string().parse::<DeviceSpec>().unwrap(), want, "{s}");
        }
    }

    #[test]
    fn unknown_device_error_lists_the_choices() {
        let e = "gpu".parse::<DeviceSpec>().unwrap_err().to_string();
        assert!(e.contains("\"gpu\"") && e.contains("cuda:N"), "{e}");
    }

    const NONE: Built = Built {
        cuda: false,
        metal: false,
    };
    const BOTH: Built = Built {
        cuda: true,
        metal: true,
    };

    fn fail(what: &str) -> candle_core::Error {
        candle_core::Error::Msg(format!("{what}: no device"))
    }

    #[test]
    fn auto_takes_the_first_backend_that_opens() {
        // (built, which backends open) -> what auto picks.
        let cases = [
            (NONE, vec![], Backend::Cpu),
            (BOTH, vec![], Backend::Cpu),
            (BOTH, vec![Backend::Metal], Backend::Metal),
            (
                BOTH,
                vec![Backend::Cuda { ordinal: 0 }, Backend::Metal],
                Backend::Cuda { ordinal: 0 },
            ),
            // Compiled out: never tried, even where it would open.
            (NONE, vec![Backend::Cuda { ordinal: 0 }], Backend::Cpu),
        ];
        for (built, available, want) in cases {
            let got = DeviceSpec::Auto
                .open_with(built, |b| match b {
                    Backend::Cpu => Ok(b),
                    _ if available.contains(&b) => Ok(b),
                    _ => Err(fail("gpu")),
                })
                .unwrap();
            assert_eq!(got, want, "{built:?} {available:?}");
        }
    }

    #[test]
    fn auto_falls_back_to_the_cpu_in_this_build_without_a_gpu() {
        // Without the features nothing but the CPU is tried; with them (GPU CI) a machine
        // without a GPU must still end on the CPU rather than fail.
        let device = DeviceSpec::Auto.open().unwrap();
        if !Built::THIS.cuda && !Built::THIS.metal {
            assert!(device.is_cpu());
        }
    }

    #[test]
    fn explicit_backends_name_the_missing_feature_or_the_failure() {
        let cuda1 = DeviceSpec::Only(Backend::Cuda { ordinal: 1 });
        let e = cuda1.open_with(NONE, |_| Ok(())).unwrap_err().to_string();
        assert!(
            e.contains("cuda:1") && e.contains("CUDA") && e.contains("--features cuda"),
            "{e}"
        );
        let e = DeviceSpec::Only(Backend::Metal)
            .open_with(NONE, |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("Metal") && e.contains("--features metal"), "{e}");
        // Built but not openable: the driver's error, not a silent CPU fallback.
        let e = cuda1
            .open_with(BOTH, |_| Err::<(), _>(fail("cuda")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cuda:1") && e.contains("no device"), "{e}");
    }

    #[test]
    fn gpus_compute_in_f16_and_the_cpu_in_f32() {
        assert_eq!(compute_dtype(DeviceLocation::Cpu), DType::F32);
        assert_eq!(
            compute_dtype(DeviceLocation::Cuda { gpu_id: 1 }),
            DType::F16
        );
        assert_eq!(
            compute_dtype(DeviceLocation::Metal { gpu_id: 0 }),
            DType::F16
        );
    }

    #[test]
    fn no_memory_report_on_the_cpu() {
        assert!(memory(&Device::Cpu).is_none());
    }
}
