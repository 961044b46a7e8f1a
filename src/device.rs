//! Where the model runs and in what precision: `--device` parsing, the `auto` choice, the
//! per-device compute dtype, the CUDA allocator settings for a one-stream, frame-after-frame
//! workload, and the start-up check that the CUDA kernels in this binary load on the driver and
//! GPU they meet.
//!
//! Precision: the CPU path is the f32 reference. On CUDA and Metal the weights and every
//! activation stay f16 (convs, matmuls, RoIAlign's output); what needs f32 is done in f32:
//! RoIAlign accumulates its bilinear samples in f32, cuBLAS accumulates f16 GEMMs in f32 (candle's
//! default; convs are GEMMs, see `model::gpu_conv`), and with the `cudnn` feature convs run in
//! cuDNN's pseudo-half configuration (f16 data, f32 accumulation); the RPN's top-n ranks the f16
//! logits widened to f32 on the device, the mask logits are widened before their bias, sigmoid
//! and paste, and the class and box logits leave the device as f32 for softmax, box decoding and
//! NMS, which run on the host as on CPU (their inputs are a few thousand boxes). Boxes stay f32
//! throughout. A layer whose folded weights exceed f16's range stays f32
//! (`model::layers::layer_dtype`).

use std::cell::Cell;
use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, DeviceLocation, Tensor, WithDType};

use crate::error::{Error, Result};

/// Device→host reads and device synchronisations: the round trips that stall a GPU's queue
/// and its host thread. Every read and every synchronisation of a frame goes through
/// [`read_vec1`], [`to_host`], [`count_read`] or [`synchronize`], on every backend, so the CPU
/// counts exactly what a GPU would wait for and a test can pin the figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RoundTrips {
    pub reads: u64,
    pub syncs: u64,
}

impl RoundTrips {
    /// What happened between `self` (taken earlier) and `later`.
    pub fn since(self, later: RoundTrips) -> RoundTrips {
        RoundTrips {
            reads: later.reads - self.reads,
            syncs: later.syncs - self.syncs,
        }
    }
}

thread_local! {
    /// Per thread, so models running on other threads (tests run in parallel) never mix
    /// their counts: a frame's device work, and so each of its reads, is issued from the one
    /// thread that calls `detect`.
    static ROUND_TRIPS: Cell<RoundTrips> = const { Cell::new(RoundTrips { reads: 0, syncs: 0 }) };
}

/// This thread's round trips so far; subtract two snapshots ([`RoundTrips::since`]) for a
/// frame's.
pub fn round_trips() -> RoundTrips {
    ROUND_TRIPS.with(Cell::get)
}

/// Counts one device→host read made outside candle's tensor API (a kernel's output copied
/// with the driver's own memcpy), or a result the host consumes in place on the CPU where a
/// GPU would copy it.
pub fn count_read() {
    ROUND_TRIPS.with(|c| {
        let mut v = c.get();
        v.reads += 1;
        c.set(v);
    });
}

/// `t.to_vec1()`, counted as one read.
pub fn read_vec1<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    count_read();
    Ok(t.to_vec1()?)
}

/// `t` copied to the CPU, counted as one read.
pub fn to_host(t: &Tensor) -> Result<Tensor> {
    count_read();
    Ok(t.to_device(&Device::Cpu)?)
}

/// `device.synchronize()`, counted.
pub fn synchronize(device: &Device) -> Result<()> {
    ROUND_TRIPS.with(|c| {
        let mut v = c.get();
        v.syncs += 1;
        c.set(v);
    });
    Ok(device.synchronize()?)
}

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
    /// the CPU when neither opens (no GPU, no driver, kernels this driver cannot load).
    pub fn open(self, gpu: GpuOptions) -> Result<Device> {
        self.open_with(Built::THIS, |backend| open_backend(backend, gpu))
    }

    /// [`Self::open`] over any opener, so the choice is testable without a GPU.
    fn open_with<D>(self, built: Built, mut open: impl FnMut(Backend) -> Result<D>) -> Result<D> {
        match self {
            DeviceSpec::Only(backend) => {
                if let (false, Some((feature, name))) = (built.has(backend), backend.feature()) {
                    return Err(Error::BackendNotBuilt {
                        device: backend.to_string(),
                        name,
                        feature,
                    });
                }
                open(backend)
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
                open(Backend::Cpu)
            }
        }
    }
}

/// GPU settings that come from flags.
#[derive(Debug, Clone, Copy, Default)]
pub struct GpuOptions {
    pub pool_keep: PoolKeep,
}

/// How much freed memory the CUDA pool keeps mapped between frames (its release threshold).
/// Keeping a frame's working set saves unmapping and remapping it every frame; keeping
/// everything would hold the peak of the largest frame ever seen for good, which on a Jetson
/// is taken from the CPU's memory (the GPU shares it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PoolKeep {
    /// A fraction of the device's memory ([`POOL_KEEP_AUTO_DIVISOR`]).
    #[default]
    Auto,
    Mib(u64),
}

/// `auto` keeps up to a quarter of the device's memory: 2 GiB on an 8 GB Orin, above the
/// working set of ResNet-50-FPN in f16 at 800/1333, yet leaving most of the board's shared
/// memory to the CPU side.
pub const POOL_KEEP_AUTO_DIVISOR: u64 = 4;

impl PoolKeep {
    /// The release threshold in bytes on a device with `total` bytes.
    pub fn bytes(self, total: u64) -> u64 {
        match self {
            PoolKeep::Auto => total / POOL_KEEP_AUTO_DIVISOR,
            PoolKeep::Mib(mib) => mib.saturating_mul(1024 * 1024),
        }
    }
}

impl FromStr for PoolKeep {
    type Err = Error;

    /// `auto` or a size in MiB.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "auto" => Ok(PoolKeep::Auto),
            mib => mib.parse().map(PoolKeep::Mib).map_err(|_| {
                Error::Config(format!(
                    "GPU pool size {s:?}: expected `auto` or a whole number of MiB"
                ))
            }),
        }
    }
}

impl fmt::Display for PoolKeep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolKeep::Auto => f.write_str("auto"),
            PoolKeep::Mib(mib) => write!(f, "{mib}"),
        }
    }
}

fn open_backend(backend: Backend, gpu: GpuOptions) -> Result<Device> {
    let opened = |result: candle_core::Result<Device>| {
        result.map_err(|source| Error::DeviceOpen {
            device: backend.to_string(),
            source,
        })
    };
    match backend {
        Backend::Cpu => Ok(Device::Cpu),
        Backend::Cuda { ordinal } => {
            // One explicit stream that every thread launches on (not candle's default per-thread
            // stream): weights are uploaded on the loading thread and used on the inference
            // thread, and that is only ordered without per-buffer events on a shared stream.
            let device = opened(Device::new_cuda_with_stream(ordinal))?;
            #[cfg(feature = "cuda")]
            cuda::configure(&device, backend, gpu)?;
            #[cfg(not(feature = "cuda"))]
            let _ = gpu;
            Ok(device)
        }
        Backend::Metal => opened(Device::new_metal(0)),
    }
}

/// A CUDA version as the driver API spells it: 12060 is 12.6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CudaVersion {
    pub major: u32,
    pub minor: u32,
}

impl CudaVersion {
    pub fn from_api(v: u32) -> Self {
        CudaVersion {
            major: v / 1000,
            minor: v % 1000 / 10,
        }
    }
}

impl fmt::Display for CudaVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Whether PTX written by `toolkit` for compute capability `built_cap` (87 is 8.7) loads on a
/// driver of version `driver` and a GPU of capability `device_cap`. A driver JIT-compiles PTX of
/// its own CUDA version or older only (else `CUDA_ERROR_UNSUPPORTED_PTX_VERSION`), and PTX runs
/// on its target generation or newer. All of the binary's kernels, candle's and drape's, are PTX
/// from the same nvcc, so this one check covers them all.
pub fn check_kernels(
    device: &str,
    toolkit: CudaVersion,
    built_cap: u32,
    driver: CudaVersion,
    device_cap: u32,
) -> Result<()> {
    if driver < toolkit {
        return Err(Error::CudaDriverTooOld {
            device: device.to_string(),
            toolkit,
            driver,
        });
    }
    if device_cap < built_cap {
        return Err(Error::CudaKernelsForNewerGpu {
            device: device.to_string(),
            built_cap,
            device_cap,
        });
    }
    Ok(())
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

/// Restarts the CUDA pool's high-water mark ([`DeviceMemory::pool_peak_mb`]) from what is in
/// use now, so a measurement covers one frame rather than everything since start-up; nothing to
/// do elsewhere.
pub fn reset_memory_peak(device: &Device) -> Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => Ok(cuda::reset_peak(d)?),
        _ => Ok(()),
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaDevice, Device};

    use super::{check_kernels, Backend, CudaVersion, DeviceMemory, GpuOptions};
    use crate::error::{Error, Result};
    use crate::model::ptx;

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

    /// What build.rs compiled the kernels with: `TOOLKIT` and `COMPUTE_CAP`.
    mod built {
        include!(concat!(env!("OUT_DIR"), "/cuda_build.rs"));
    }

    pub(super) fn configure(device: &Device, backend: Backend, gpu: GpuOptions) -> Result<()> {
        let name = backend.to_string();
        let wrap = |source: candle_core::Error| Error::DeviceOpen {
            device: name.clone(),
            source,
        };
        let cuda = device.as_cuda_device().map_err(wrap)?;
        let ctx = cuda.cuda_stream().context().clone();
        let driver = driver_version().w().map_err(wrap)?;
        let (major, minor) = ctx.compute_capability().w().map_err(wrap)?;
        let device_cap = (major * 10 + minor) as u32;
        let toolkit = CudaVersion {
            major: built::TOOLKIT.0,
            minor: built::TOOLKIT.1,
        };
        tracing::info!(
            device = %name,
            gpu = ctx.name().unwrap_or_default(),
            %driver,
            compute_cap = device_cap,
            built_with = %toolkit,
            built_for = built::COMPUTE_CAP,
            "CUDA device"
        );
        check_kernels(&name, toolkit, built::COMPUTE_CAP, driver, device_cap)?;
        // Load drape's kernels now rather than at the first frame, so whatever else keeps them
        // from loading stops start-up with the driver's reason.
        for (module, ptx) in [
            ("drape_topk", ptx::TOPK),
            ("drape_roi_align", ptx::ROI_ALIGN),
            ("drape_paste", ptx::PASTE),
        ] {
            ctx.load_module(Ptx::from_src(ptx))
                .map_err(|e| Error::CudaKernelLoad {
                    device: name.clone(),
                    module,
                    reason: e.to_string(),
                    toolkit,
                    driver,
                })?;
        }
        // SAFETY: the device was created with one explicit stream that all of drape's work is
        // queued on (see `open_backend`), so stream order alone keeps every buffer's uses apart;
        // the per-buffer events only cost two event creations per allocation.
        unsafe { cuda.disable_event_tracking() };
        match pool(cuda).map_err(wrap)? {
            Some(pool) => {
                let (_, total) = ctx.mem_get_info().w().map_err(wrap)?;
                // The pool's default threshold (0) hands freed memory back to the driver at
                // every synchronisation, i.e. every frame, and the next frame maps it again.
                let mut threshold = gpu.pool_keep.bytes(total as u64);
                tracing::info!(
                    keep_mb = threshold / (1024 * 1024),
                    total_mb = total / (1024 * 1024),
                    "CUDA memory pool release threshold"
                );
                // SAFETY: a valid pool; the attribute takes a cuuint64_t.
                unsafe {
                    result::mem_pool::set_attribute(
                        pool,
                        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                        (&mut threshold as *mut u64).cast(),
                    )
                }
                .w()
                .map_err(wrap)?;
            }
            None => tracing::warn!(
                device = %name,
                "no stream-ordered memory pool on this device: every freed buffer is returned \
                 with a synchronising cuMemFree, which stalls the stream once per tensor dropped"
            ),
        }
        Ok(())
    }

    /// The newest CUDA version the installed driver supports.
    fn driver_version() -> std::result::Result<CudaVersion, result::DriverError> {
        let mut v = 0;
        // SAFETY: cuDriverGetVersion writes one int; it needs no context.
        unsafe { sys::cuDriverGetVersion(&mut v) }.result()?;
        Ok(CudaVersion::from_api(v.max(0) as u32))
    }

    pub(super) fn reset_peak(device: &CudaDevice) -> candle_core::Result<()> {
        if let Some(pool) = pool(device)? {
            // The driver only accepts 0: the mark restarts from the next allocation.
            let mut zero = 0u64;
            // SAFETY: a valid pool; the attribute is a cuuint64_t.
            unsafe {
                result::mem_pool::set_attribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    (&mut zero as *mut u64).cast(),
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

    fn fail(backend: Backend) -> Error {
        Error::DeviceOpen {
            device: backend.to_string(),
            source: candle_core::Error::Msg("no device".into()),
        }
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
                    _ => Err(fail(b)),
                })
                .unwrap();
            assert_eq!(got, want, "{built:?} {available:?}");
        }
    }

    #[test]
    fn auto_falls_back_to_the_cpu_in_this_build_without_a_gpu() {
        // Without the features nothing but the CPU is tried; with them (GPU CI) a machine
        // without a GPU must still end on the CPU rather than fail.
        let device = DeviceSpec::Auto.open(GpuOptions::default()).unwrap();
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
            .open_with(BOTH, |b| Err::<(), _>(fail(b)))
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
    fn kernels_load_only_on_a_driver_and_gpu_as_new_as_their_build() {
        let v = |major, minor| CudaVersion { major, minor };
        // (toolkit, built for, driver, GPU) -> the error's telling words, or None when it loads.
        let cases = [
            // JetPack 6.2 built natively for Orin.
            (v(12, 6), 87, v(12, 6), 87, None),
            // A newer driver JIT-compiles older PTX; newer GPUs run older PTX.
            (v(12, 2), 87, v(13, 0), 87, None),
            (v(12, 6), 80, v(12, 6), 87, None),
            // A 12.6 toolkit on JetPack 6.0's 12.2 driver.
            (
                v(12, 6),
                87,
                v(12, 2),
                87,
                Some(["CUDA 12.6", "12.2", "UNSUPPORTED_PTX"]),
            ),
            // PTX from CUDA 13.0 on any JetPack 6 driver.
            (
                v(13, 0),
                87,
                v(12, 6),
                87,
                Some(["CUDA 13.0", "12.6", "no newer than"]),
            ),
            // Built for a desktop Ada GPU, run on an Orin.
            (
                v(12, 6),
                89,
                v(12, 6),
                87,
                Some(["89", "87", "CUDA_COMPUTE_CAP=87"]),
            ),
        ];
        let wrong: Vec<_> = cases
            .iter()
            .filter(|&&(toolkit, built, driver, gpu, want)| {
                let got = check_kernels("cuda:0", toolkit, built, driver, gpu);
                match (got, want) {
                    (Ok(()), None) => false,
                    (Err(e), Some(words)) => {
                        let e = e.to_string();
                        !(e.contains("cuda:0") && words.iter().all(|w| e.contains(w)))
                    }
                    _ => true,
                }
            })
            .collect();
        assert!(wrong.is_empty(), "{wrong:?}");
    }

    #[test]
    fn driver_versions_read_as_the_api_spells_them() {
        assert_eq!(CudaVersion::from_api(12060).to_string(), "12.6");
        assert_eq!(CudaVersion::from_api(12020).to_string(), "12.2");
        assert_eq!(CudaVersion::from_api(13000).to_string(), "13.0");
    }

    #[test]
    fn pool_keep_is_a_quarter_of_the_device_by_default_or_the_given_mib() {
        const GIB: u64 = 1 << 30;
        assert_eq!("auto".parse::<PoolKeep>().unwrap().bytes(8 * GIB), 2 * GIB);
        assert_eq!(PoolKeep::default(), PoolKeep::Auto);
        assert_eq!("512".parse::<PoolKeep>().unwrap().bytes(8 * GIB), 512 << 20);
        // 0 hands every freed byte back at each synchronisation: allowed, if slow.
        assert_eq!("0".parse::<PoolKeep>().unwrap().bytes(8 * GIB), 0);
        for bad in ["", "-1", "1.5", "2G", "max"] {
            let e = bad.parse::<PoolKeep>().unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")) && e.contains("MiB"), "{e}");
        }
        for keep in [PoolKeep::Auto, PoolKeep::Mib(64)] {
            assert_eq!(keep.to_string().parse::<PoolKeep>().unwrap(), keep);
        }
    }

    #[test]
    fn no_memory_report_on_the_cpu() {
        assert!(memory(&Device::Cpu).is_none());
    }
}
