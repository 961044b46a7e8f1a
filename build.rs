//! With the `cuda` feature, compiles `kernels/*.cu` to PTX (as candle's own kernels are built)
//! and writes `$OUT_DIR/ptx.rs` with one `&str` constant per file, which
//! `src/model/mod.rs` includes and the ops load at run time, and `$OUT_DIR/cuda_build.rs` with
//! the toolkit version and compute capability they were built for, which `src/device.rs`
//! checks against the driver and GPU at start-up. Needs nvcc (found through `CUDA_HOME`/`PATH`)
//! and, where no GPU can be probed (Jetson has no `nvidia-smi`), `CUDA_COMPUTE_CAP` (e.g. 87 for
//! Orin). Without the feature there is nothing to do.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    if let Err(e) = cuda::build() {
        // A build script reports failure by panicking; say what to fix.
        panic!("compiling kernels/*.cu with nvcc: {e}");
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::path::PathBuf;

    pub fn build() -> Result<(), String> {
        let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        let cap = compute_cap()?;
        let toolkit = cudaforge::CudaToolkit::detect().map_err(|e| e.to_string())?;
        let (major, minor) = toolkit
            .version
            .as_deref()
            .and_then(parse_version)
            .ok_or_else(|| {
                format!(
                    "could not read the CUDA version from `{} --version`",
                    toolkit.nvcc_path.display()
                )
            })?;
        cudaforge::KernelBuilder::new()
            .source_dir("kernels")
            .arg("-std=c++17")
            .arg("-O3")
            // No fused multiply-adds: the kernels then round as the CPU reference does, so a
            // mask pixel or a RoIAlign sample sitting on a threshold is decided alike on both
            // paths.
            .arg("--fmad=false")
            .build_ptx()
            .and_then(|ptx| ptx.write(out_dir.join("ptx.rs")))
            .map_err(|e| e.to_string())?;
        // PTX only loads on a driver at least as new as the nvcc that wrote it, and only on a
        // GPU at least as new as its target: the start-up check compares these.
        std::fs::write(
            out_dir.join("cuda_build.rs"),
            format!(
                "pub const TOOLKIT: (u32, u32) = ({major}, {minor});\n\
                 pub const COMPUTE_CAP: u32 = {cap};\n"
            ),
        )
        .map_err(|e| format!("writing cuda_build.rs: {e}"))
    }

    /// `CUDA_COMPUTE_CAP`, else what `nvidia-smi` reports; a named error where neither answers.
    fn compute_cap() -> Result<usize, String> {
        println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
        match (
            cudaforge::detect_compute_cap(),
            std::env::var("CUDA_COMPUTE_CAP"),
        ) {
            (Ok(arch), _) => Ok(arch.base()),
            (Err(e), Ok(set)) => Err(format!("CUDA_COMPUTE_CAP={set}: {e}")),
            (Err(e), Err(_)) => Err(format!(
                "CUDA_COMPUTE_CAP is not set and nvidia-smi could not report the GPU's compute \
                 capability ({e}). Jetson has no nvidia-smi: set CUDA_COMPUTE_CAP=87 for Orin \
                 (72 for Xavier); elsewhere the GPU's capability without the dot, e.g. 89"
            )),
        }
    }

    /// "12.6" → (12, 6).
    fn parse_version(v: &str) -> Option<(u32, u32)> {
        let (major, minor) = v.trim().split_once('.')?;
        Some((major.parse().ok()?, minor.parse().ok()?))
    }
}
