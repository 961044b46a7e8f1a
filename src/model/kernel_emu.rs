//! Test support: the GPU kernels compiled unchanged by the host C++ compiler against small
//! stand-ins for CUDA and for the Metal Shading Language (`tests/kernel_emu/`), and launched
//! one emulated thread at a time in a shuffled order. The unit tests of each op run its GPU
//! kernels this way against its Rust twin, so the kernels' logic is checked on every machine,
//! GPU or not. What this cannot show: scheduling, real atomics, the GPU compilers' code and
//! launch limits (`tests/gpu.rs` does, on a CUDA GPU).

use std::ffi::c_void;
use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};

use half::f16;
use libloading::{Library, Symbol};

/// The values a kernel reads, in either dtype the kernels are built for.
pub enum Values<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl Values<'_> {
    fn raw(&self) -> (i32, *const c_void) {
        match self {
            Values::F32(v) => (0, v.as_ptr().cast()),
            Values::F16(v) => (1, v.as_ptr().cast()),
        }
    }
}

/// Compiles `sources` (relative to the crate root) into a shared library and loads it.
fn compile(what: &str, args: &[&str], sources: &[&str]) -> Library {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::temp_dir().join(format!("drape-{what}-emu-{}.so", std::process::id()));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    // No contraction into fused multiply-adds: the GPU builds forbid it too (build.rs passes
    // --fmad=false to nvcc; the Metal library is compiled without fast math).
    let status = Command::new(&cxx)
        .current_dir(root)
        .args(["-std=c++17", "-O2", "-ffp-contract=off", "-fPIC", "-shared"])
        .args([
            "-Itests/kernel_emu",
            "-Wno-attributes",
            "-Wno-unknown-pragmas",
        ])
        .args(args)
        .args(sources)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("running {cxx} for the {what} emulation: {e}"));
    assert!(
        status.success(),
        "{cxx} could not compile {sources:?} as C++"
    );
    // SAFETY: a library just built from our own sources, with no initialisers that matter.
    let lib = unsafe { Library::new(&out) }.unwrap_or_else(|e| panic!("loading {what}: {e}"));
    // Loaded; the file is no longer needed.
    let _ = std::fs::remove_file(&out);
    lib
}

/// `kernels/*.cu` with `tests/kernel_emu/cuda_launch.cpp`, compiled once per test binary.
fn cuda() -> &'static Library {
    static LIB: OnceLock<Library> = OnceLock::new();
    LIB.get_or_init(|| {
        let sources = [
            "kernels/topk.cu",
            "kernels/paste.cu",
            "kernels/roi_align.cu",
            "tests/kernel_emu/cuda_launch.cpp",
        ];
        compile("cuda", &["-include", "cuda_shim.h", "-x", "c++"], &sources)
    })
}

/// `kernels/roi_align.metal` through `tests/kernel_emu/metal_launch.cpp`.
fn metal() -> &'static Library {
    static LIB: OnceLock<Library> = OnceLock::new();
    LIB.get_or_init(|| {
        compile(
            "metal",
            &["-Ikernels"],
            &["tests/kernel_emu/metal_launch.cpp"],
        )
    })
}

/// The emulated thread registers are process globals, and the tests run in parallel: one
/// launch at a time.
fn serialised() -> MutexGuard<'static, ()> {
    static LAUNCH: Mutex<()> = Mutex::new(());
    LAUNCH
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn symbol<T>(lib: &'static Library, name: &[u8]) -> Symbol<'static, T> {
    // SAFETY: each caller names its function with the signature tests/kernel_emu declares.
    unsafe { lib.get(name) }.expect("symbol of tests/kernel_emu")
}

/// `topk_histogram_*` over `gx` blocks of one thread (the emulation has no barriers).
pub fn topk_histogram(
    values: &Values,
    n: u32,
    [prefix, prefix_shift, shift, bits]: [u32; 4],
    hist: &mut [u32],
    gx: u32,
    seed: u64,
) {
    // SAFETY: only a type, the C signature tests/kernel_emu declares; the call below is
    // the unsafe part and states its contract.
    type F = unsafe extern "C" fn(i32, *const c_void, u32, u32, u32, u32, u32, *mut u32, u32, u64);
    let _one_launch = serialised();
    let f = symbol::<F>(cuda(), b"emu_topk_histogram");
    let (f16, ptr) = values.raw();
    assert_eq!(hist.len(), 1 << bits);
    // SAFETY: `values` holds `n` elements and `hist` its 2^bits bins.
    unsafe {
        f(
            f16,
            ptr,
            n,
            prefix,
            prefix_shift,
            shift,
            bits,
            hist.as_mut_ptr(),
            gx,
            seed,
        )
    }
}

/// `topk_collect_*` into `out`, `[2 + 2 * cap_above + cap_equal]` zeroed words.
pub fn topk_collect(
    values: &Values,
    n: u32,
    [threshold, cap_above, cap_equal]: [u32; 3],
    out: &mut [u32],
    (gx, bx): (u32, u32),
    seed: u64,
) {
    // SAFETY: only a type, the C signature tests/kernel_emu declares; the call below is
    // the unsafe part and states its contract.
    type F = unsafe extern "C" fn(i32, *const c_void, u32, u32, u32, u32, *mut u32, u32, u32, u64);
    let _one_launch = serialised();
    let f = symbol::<F>(cuda(), b"emu_topk_collect");
    let (f16, ptr) = values.raw();
    assert_eq!(out.len(), 2 + 2 * cap_above as usize + cap_equal as usize);
    // SAFETY: `values` holds `n` elements and `out` the words the kernel may write.
    unsafe {
        f(
            f16,
            ptr,
            n,
            threshold,
            cap_above,
            cap_equal,
            out.as_mut_ptr(),
            gx,
            bx,
            seed,
        )
    }
}

/// `paste_masks` with the region `table` the CUDA path builds.
pub fn paste_masks(
    probs: &[f32],
    table: &[u32],
    thresh: f32,
    out: &mut [u8],
    (gx, gy, bx): (u32, u32, u32),
    seed: u64,
) {
    // SAFETY: only a type, the C signature tests/kernel_emu declares; the call below is
    // the unsafe part and states its contract.
    type F = unsafe extern "C" fn(*const f32, *const u32, f32, *mut u8, u32, u32, u32, u64);
    let _one_launch = serialised();
    let f = symbol::<F>(cuda(), b"emu_paste_masks");
    assert_eq!(table.len(), 9 * gy as usize);
    // SAFETY: `probs` holds 784 values per region, and the table's offsets and sizes lie
    // inside `out` (the caller's Postprocessor built both).
    unsafe {
        f(
            probs.as_ptr(),
            table.as_ptr(),
            thresh,
            out.as_mut_ptr(),
            gx,
            gy,
            bx,
            seed,
        )
    }
}

/// `roi_align_*` with the 10 parameter words of `KernelParams`, into `output` (f32 or f16 as
/// `input` is).
pub fn roi_align(
    input: &Values,
    rois: &[f32],
    output: *mut c_void,
    params: &[u32; 10],
    (gx, bx): (u32, u32),
    seed: u64,
) {
    // SAFETY: only a type, the C signature tests/kernel_emu declares; the call below is
    // the unsafe part and states its contract.
    type F = unsafe extern "C" fn(
        i32,
        *const c_void,
        *const f32,
        *mut c_void,
        *const u32,
        u32,
        u32,
        u64,
    );
    let _one_launch = serialised();
    let f = symbol::<F>(cuda(), b"emu_roi_align");
    let (f16, ptr) = input.raw();
    // SAFETY: the caller sized `output` for the params' roi × channel × bin count and `input`
    // and `rois` for theirs.
    unsafe {
        f(
            f16,
            ptr,
            rois.as_ptr(),
            output,
            params.as_ptr(),
            gx,
            bx,
            seed,
        )
    }
}

/// `roi_align_*` of `kernels/roi_align.metal` over `threads` emulated threads.
pub fn metal_roi_align(
    input: &Values,
    rois: &[f32],
    output: *mut c_void,
    params: &[u32; 10],
    threads: u32,
    seed: u64,
) {
    // SAFETY: only a type, the C signature tests/kernel_emu declares; the call below is
    // the unsafe part and states its contract.
    type F =
        unsafe extern "C" fn(i32, *const c_void, *const f32, *mut c_void, *const u32, u32, u64);
    let f = symbol::<F>(metal(), b"emu_metal_roi_align");
    let (f16, ptr) = input.raw();
    // SAFETY: as for `roi_align`; threads past the output count must return without writing.
    unsafe {
        f(
            f16,
            ptr,
            rois.as_ptr(),
            output,
            params.as_ptr(),
            threads,
            seed,
        )
    }
}
