//! Library errors. Every variant names what went wrong and where (file, tensor, key), so the
//! binary can print it as is.

use std::path::PathBuf;

use crate::device::CudaVersion;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The cause is the source, not part of the message, so `{:#}` chains print it once.
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a usable safetensors file: {reason}")]
    NotSafetensors { path: PathBuf, reason: String },
    #[error("{path}: truncated: the header promises {expected} bytes but the file has {found}")]
    Truncated {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: unexpected tensor `{name}`: not part of a torchvision Mask R-CNN of this architecture")]
    UnexpectedTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected}")]
    Shape {
        path: PathBuf,
        name: String,
        expected: String,
        found: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` has dtype {dtype}; supported are F16, BF16 and F32")]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("{path}: tensor `{name}` holds a non-finite value ({value}) at flat index {index}")]
    NonFinite {
        path: PathBuf,
        name: String,
        index: usize,
        value: f32,
    },
    #[error("{path}: metadata `{key}`: {reason}")]
    Metadata {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Architecture { path: PathBuf, reason: String },
    #[error("image {path}: {reason}")]
    Image { path: PathBuf, reason: String },
    #[error(
        "bundled file {name} not found; looked in {}; give its path with a flag, or set \
         DRAPE_HOME to the folder that holds it (a clone of the repository)",
        looked_in.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    AssetNotFound {
        name: String,
        looked_in: Vec<PathBuf>,
    },
    #[error("invalid setting: {0}")]
    Config(String),
    /// The frame source failed while running (a camera gone for good, a recording unreadable).
    #[error("capture failed: {0}")]
    Capture(String),
    /// An output could not be written or flushed; the path or sink is named in the message.
    #[error("output failed: {0}")]
    Output(String),
    /// A calibration profile could not be read or written.
    #[error("calibration profile {path}: {reason}")]
    Profile { path: PathBuf, reason: String },
    /// A pipeline thread panicked; the run ends rather than limping on without it.
    #[error("{thread} thread panicked: {message}")]
    Panicked {
        thread: &'static str,
        message: String,
    },
    #[error("unknown device {0:?}: expected auto, cpu, cuda, cuda:N or metal")]
    DeviceSpec(String),
    #[error(
        "device {device}: this drape was built without {name} support; rebuild with \
         `cargo build --release --features {feature}`"
    )]
    BackendNotBuilt {
        device: String,
        name: &'static str,
        feature: &'static str,
    },
    #[error("device {device}: {source}")]
    DeviceOpen {
        device: String,
        #[source]
        source: candle_core::Error,
    },
    #[error(
        "device {device}: the CUDA kernels in this binary (candle's and drape's) are PTX written \
         by CUDA {toolkit}, and this driver supports CUDA {driver} at most, so it cannot load \
         them (CUDA_ERROR_UNSUPPORTED_PTX_VERSION). Rebuild with a CUDA toolkit no newer than \
         {driver} (on a Jetson, JetPack's own /usr/local/cuda), or update the driver"
    )]
    CudaDriverTooOld {
        device: String,
        toolkit: CudaVersion,
        driver: CudaVersion,
    },
    #[error(
        "device {device}: the CUDA kernels were built for compute capability {built_cap} but \
         this GPU has {device_cap}; rebuild with CUDA_COMPUTE_CAP={device_cap}"
    )]
    CudaKernelsForNewerGpu {
        device: String,
        built_cap: u32,
        device_cap: u32,
    },
    #[error(
        "device {device}: loading drape's kernels ({module}, PTX from CUDA {toolkit}, driver \
         CUDA {driver}): {reason}; rebuild with the CUDA toolkit that came with the driver and \
         CUDA_COMPUTE_CAP set to this GPU's capability"
    )]
    CudaKernelLoad {
        device: String,
        module: &'static str,
        toolkit: CudaVersion,
        driver: CudaVersion,
        reason: String,
    },
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}
