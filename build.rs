//! With the `cuda` feature, compiles `kernels/*.cu` to PTX (as candle's own kernels are built)
//! and writes `$OUT_DIR/ptx.rs` with one `&str` constant per file, which
//! `src/model/mod.rs` includes and the ops load at run time. Needs nvcc (found through
//! `CUDA_HOME`/`PATH`) and, where no GPU can be probed, `CUDA_COMPUTE_CAP` (e.g. 87 for Orin).
//! Without the feature there is nothing to do.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    if let Err(e) = build_ptx() {
        // A build script reports failure by panicking; say what to fix.
        panic!("compiling kernels/*.cu with nvcc: {e}");
    }
}

#[cfg(feature = "cuda")]
fn build_ptx() -> cudaforge::Result<()> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    cudaforge::KernelBuilder::new()
        .source_dir("kernels")
        .arg("-std=c++17")
        .arg("-O3")
        // No fused multiply-adds: the kernels then round as the CPU reference does, so a mask
        // pixel or a RoIAlign sample sitting on a threshold is decided alike on both paths.
        .arg("--fmad=false")
        .build_ptx()?
        .write(out_dir.join("ptx.rs"))
}
