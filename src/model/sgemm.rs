//! The Winograd convs' matrix products `M[ξ] = U[ξ] · V[ξ]`, with `U` (the transformed
//! weights) packed once at load in the layout the microkernel reads; also the mask predictor's
//! transposed conv (`mask_predictor.rs`), one RoI at a time.
//!
//! The `gemm` crate as published allocates on every call (its `did_pack_lhs` flags, and its
//! packing buffers when a width is not a whole number of vectors), and Winograd makes 36 calls
//! per job, thousands a frame: the full R50 at 512 made about 6,500 allocations a frame, 4,600
//! of them there. Here a call allocates nothing: `V` is read in place and the only scratch is
//! on the stack. (The build's patched `gemm-common` now reuses those flags, see
//! `third_party/gemm-common/PATCHES.md`.) The im2col convs (1×1, strided, the stem) keep
//! `gemm`: on their shapes, one thread,
//! this kernel ran 3–59% slower than `gemm`'s (94–152 against 130–180 GFLOP/s here), and the
//! backbone 10–15% slower with it, even with their far-apart rows packed into a per-thread
//! `KC × 512` block first; a 6 × 64 block like `gemm`'s and adding `C` after the `K` loop
//! instead of before did not close that.
//!
//! One generic microkernel keeps an `MR × NR` block of `C` in vector registers and walks `K`;
//! it is instantiated per instruction set (AVX-512, AVX2 + FMA, NEON, plain scalars) with a
//! block that fills that set's registers. The set is picked once, at run time, so one x86
//! binary runs at full width on AVX-512 and on AVX2 machines.

use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// `K` per pass: a `KC × NR` panel of `B` (32 KB) stays in L1 while the row blocks of `A` go
/// by.
const KC: usize = 256;
/// Rows of `A` per pass: an `MC × KC` block of the packed weights (256 KB) stays in L2 while
/// the panels of `B` go by.
const MC: usize = 256;
/// Row stride of `B` (in values) up to which a panel is read where it lies.
const NEAR_ROWS: usize = 1024;
/// The widest `NR` of any kernel, for the stack panel a ragged or far-apart panel is copied
/// into.
const NR_MAX: usize = 32;
/// The largest `MR × NR` of any kernel, for the stack copy of a ragged block of `C`.
const EDGE_MAX: usize = 8 * NR_MAX;

/// One microkernel: `C[mv × nv] (+)= A_panel[kc × MR] · B_panel[kc × NR]` (valid part only).
type Micro = unsafe fn(
    kc: usize,
    a: *const f32,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    load: bool,
    valid: (usize, usize),
);

#[derive(Debug, Clone, Copy)]
struct Kernel {
    mr: usize,
    nr: usize,
    run: Micro,
    name: &'static str,
}

/// The vector operations a kernel needs, per instruction set. Each is `#[inline(always)]` so it
/// lands in the `#[target_feature]` kernel function that calls it, where the intrinsics it uses
/// are enabled.
trait Simd {
    type V: Copy;
    const LANES: usize;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    unsafe fn splat(x: f32) -> Self::V;
    /// `a * b + c`.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
}

/// A [`Simd`] for one vector instruction set on `$arch`, from its intrinsics.
macro_rules! simd {
    ($name:ident, $arch:literal, $v:ty, $lanes:literal, $load:path, $store:path, $splat:path,
     |$a:ident, $b:ident, $c:ident| $fma:expr) => {
        #[cfg(target_arch = $arch)]
        struct $name;
        #[cfg(target_arch = $arch)]
        impl Simd for $name {
            type V = $v;
            const LANES: usize = $lanes;
            #[inline(always)]
            unsafe fn load(p: *const f32) -> Self::V {
                $load(p)
            }
            #[inline(always)]
            unsafe fn store(p: *mut f32, v: Self::V) {
                $store(p, v)
            }
            #[inline(always)]
            unsafe fn splat(x: f32) -> Self::V {
                $splat(x)
            }
            #[inline(always)]
            unsafe fn fma($a: Self::V, $b: Self::V, $c: Self::V) -> Self::V {
                $fma
            }
        }
    };
}

simd!(
    Avx512,
    "x86_64",
    std::arch::x86_64::__m512,
    16,
    std::arch::x86_64::_mm512_loadu_ps,
    std::arch::x86_64::_mm512_storeu_ps,
    std::arch::x86_64::_mm512_set1_ps,
    |a, b, c| std::arch::x86_64::_mm512_fmadd_ps(a, b, c)
);
simd!(
    Avx2,
    "x86_64",
    std::arch::x86_64::__m256,
    8,
    std::arch::x86_64::_mm256_loadu_ps,
    std::arch::x86_64::_mm256_storeu_ps,
    std::arch::x86_64::_mm256_set1_ps,
    |a, b, c| std::arch::x86_64::_mm256_fmadd_ps(a, b, c)
);
simd!(
    Neon,
    "aarch64",
    std::arch::aarch64::float32x4_t,
    4,
    std::arch::aarch64::vld1q_f32,
    std::arch::aarch64::vst1q_f32,
    std::arch::aarch64::vdupq_n_f32,
    |a, b, c| std::arch::aarch64::vfmaq_f32(c, a, b)
);

/// Scalars, for x86 CPUs without AVX2 + FMA.
#[cfg(not(target_arch = "aarch64"))]
struct Plain;
#[cfg(not(target_arch = "aarch64"))]
impl Simd for Plain {
    type V = f32;
    const LANES: usize = 1;
    #[inline(always)]
    unsafe fn load(p: *const f32) -> f32 {
        *p
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: f32) {
        *p = v
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    unsafe fn fma(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// The block of `C` one kernel call keeps in registers: `MR` rows of `NV` vectors.
///
/// # Safety
/// `a` holds `kc × MR` values, `b` `kc` rows of `NV · LANES` values `ldb` apart, and `c` the
/// `mv × nv` block (`mv ≤ MR`, `nv ≤ NV · LANES`) with rows `ldc` apart, which no other thread
/// touches; the CPU has `S`'s instructions.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn block<S: Simd, const MR: usize, const NV: usize>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    load: bool,
    (mv, nv): (usize, usize),
) {
    let nr = NV * S::LANES;
    let full = mv == MR && nv == nr;
    // A ragged block of C goes through this stack copy, so the kernel always works on whole
    // vectors. Uninitialised: zeroing it on every call would cost more than most edges do; what
    // the kernel reads from it is written first.
    let mut edge = MaybeUninit::<[f32; EDGE_MAX]>::uninit();
    debug_assert!(MR * nr <= EDGE_MAX);
    let (cp, ldcp) = if full {
        (c, ldc)
    } else {
        (edge.as_mut_ptr().cast::<f32>(), nr)
    };
    if !full && load {
        for i in 0..MR {
            // Past the edge, zeros: they are loaded into `acc` like the rest.
            std::ptr::write_bytes(cp.add(i * nr), 0, nr);
            if i < mv {
                std::ptr::copy_nonoverlapping(c.add(i * ldc), cp.add(i * nr), nv);
            }
        }
    }
    let mut acc = [[S::splat(0.0); NV]; MR];
    if load {
        for (i, row) in acc.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = S::load(cp.add(i * ldcp + j * S::LANES));
            }
        }
    }
    for p in 0..kc {
        let bp = b.add(p * ldb);
        let bv: [S::V; NV] = std::array::from_fn(|j| S::load(bp.add(j * S::LANES)));
        let ap = a.add(p * MR);
        for (i, row) in acc.iter_mut().enumerate() {
            let av = S::splat(*ap.add(i));
            for (v, bj) in row.iter_mut().zip(&bv) {
                *v = S::fma(av, *bj, *v);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            S::store(cp.add(i * ldcp + j * S::LANES), *v);
        }
    }
    if !full {
        for i in 0..mv {
            std::ptr::copy_nonoverlapping(cp.add(i * nr), c.add(i * ldc), nv);
        }
    }
}

/// A kernel function for one instruction set: `block` compiled with `$features` enabled.
macro_rules! kernel {
    ($name:ident, $simd:ty, $mr:literal, $nv:literal $(, $features:literal)?) => {
        $(#[target_feature(enable = $features)])?
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name(
            kc: usize,
            a: *const f32,
            b: *const f32,
            ldb: usize,
            c: *mut f32,
            ldc: usize,
            load: bool,
            valid: (usize, usize),
        ) {
            // SAFETY: the caller's contract is `block`'s, and `kernel()` only hands out this
            // function where the CPU has the features it is compiled for.
            unsafe { block::<$simd, $mr, $nv>(kc, a, b, ldb, c, ldc, load, valid) }
        }
    };
}

// 8 × 32: 16 of AVX-512's 32 registers accumulate, two hold a row of B. On the Winograd
// GEMMs (64–512 channels by 160 tiles) it runs at 96–102% of the gemm crate's speed here; 12 × 32
// and 16 × 32 were slower, and 8 divides every channel count of the model.
#[cfg(target_arch = "x86_64")]
kernel!(avx512, Avx512, 8, 2, "avx512f,fma");
// 6 × 16: 12 of AVX2's 16 registers accumulate, two hold a row of B.
#[cfg(target_arch = "x86_64")]
kernel!(avx2, Avx2, 6, 2, "avx2,fma");
// 6 × 16: 24 of NEON's 32 registers accumulate, four hold a row of B.
#[cfg(target_arch = "aarch64")]
kernel!(neon, Neon, 6, 4);
#[cfg(not(target_arch = "aarch64"))]
kernel!(plain, Plain, 4, 8);

/// Every kernel this CPU can run, fastest first: on aarch64 NEON, which every such CPU has.
#[cfg(target_arch = "aarch64")]
fn supported() -> Vec<Kernel> {
    vec![Kernel {
        mr: 6,
        nr: 16,
        run: neon,
        name: "neon",
    }]
}

/// Every kernel this CPU can run, fastest first: the vector ones it has, then plain scalars.
#[cfg(not(target_arch = "aarch64"))]
fn supported() -> Vec<Kernel> {
    let mut kernels = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        let fma = std::arch::is_x86_feature_detected!("fma");
        // Built without the `avx512` feature, AVX2 is the widest (see Cargo.toml).
        if cfg!(feature = "avx512") && fma && std::arch::is_x86_feature_detected!("avx512f") {
            kernels.push(Kernel {
                mr: 8,
                nr: 32,
                run: avx512,
                name: "avx512",
            });
        }
        if fma && std::arch::is_x86_feature_detected!("avx2") {
            kernels.push(Kernel {
                mr: 6,
                nr: 16,
                run: avx2,
                name: "avx2",
            });
        }
    }
    kernels.push(Kernel {
        mr: 4,
        nr: 8,
        run: plain,
        name: "plain",
    });
    kernels
}

/// The kernel this process uses: the fastest the CPU runs.
fn kernel() -> Kernel {
    static KERNEL: OnceLock<Kernel> = OnceLock::new();
    *KERNEL.get_or_init(|| supported()[0])
}

/// The instruction set the kernel runs on here (`avx512`, `avx2`, `neon` or `plain`).
pub fn kernel_name() -> &'static str {
    kernel().name
}

/// Columns of `C` per kernel call here: widths that are a multiple of it run without edges.
pub fn panel_width() -> usize {
    kernel().nr
}

/// `count` row-major `[m, k]` matrices (a conv's weights; Winograd's 36 transformed ones) packed
/// for the kernel in one buffer: row blocks of `MR` (the last one padded with zeros), each
/// stored `[k][MR]`, so a kernel call reads its panel of `A` front to back. One buffer rather
/// than one per matrix, since the allocator rounds each large allocation up (36 buffers a conv
/// raised the full R50's peak RSS by about 70 MB).
#[derive(Debug)]
pub struct PackedA {
    data: Vec<f32>,
    m: usize,
    k: usize,
    /// The kernel it is packed for.
    kernel: Kernel,
}

/// Where each element of a [`PackedA`] lives, for writing one in place.
#[derive(Debug, Clone, Copy)]
pub struct Packing {
    m: usize,
    k: usize,
    mr: usize,
}

impl Packing {
    /// The values one packed matrix takes.
    fn stride(self) -> usize {
        self.m.div_ceil(self.mr) * self.mr * self.k
    }

    /// The index of element `(i, p)` (row `i`, column `p`) of matrix `which`.
    pub fn offset(self, which: usize, i: usize, p: usize) -> usize {
        which * self.stride() + (i / self.mr) * self.mr * self.k + p * self.mr + i % self.mr
    }
}

impl PackedA {
    /// `count` all-zero `[m, k]` matrices, to be written in place through [`Self::packing`].
    pub fn zeroed(count: usize, m: usize, k: usize) -> Self {
        Self::zeroed_for(kernel(), count, m, k)
    }

    fn zeroed_for(kernel: Kernel, count: usize, m: usize, k: usize) -> Self {
        let at = Packing {
            m,
            k,
            mr: kernel.mr,
        };
        Self {
            data: vec![0f32; count * at.stride()],
            m,
            k,
            kernel,
        }
    }

    pub fn packing(&self) -> Packing {
        Packing {
            m: self.m,
            k: self.k,
            mr: self.kernel.mr,
        }
    }

    /// The packed buffer, for writes at [`Packing::offset`].
    pub fn as_mut_ptr(&mut self) -> *mut f32 {
        self.data.as_mut_ptr()
    }

    /// `C[m × n] = A · B` for matrix `which` as `A`, or `C += A · B` with `accumulate`. `B` is
    /// `[k, n]` with rows `ldb` apart, `C` `[m, n]` with rows `ldc` apart.
    ///
    /// # Safety
    /// `b` must be valid for reads of `k` rows of `n` values `ldb` apart, `c` for reads and
    /// writes of `m` rows of `n` values `ldc` apart, and no other thread may write them.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn mul(
        &self,
        which: usize,
        b: *const f32,
        ldb: usize,
        n: usize,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let kern = self.kernel;
        let at = self.packing();
        assert!(
            which * at.stride() < self.data.len().max(1),
            "no packed matrix {which}"
        );
        let (mr, nr) = (kern.mr, kern.nr);
        // Uninitialised for the same reason as `block`'s edge: every value the kernel reads is
        // copied or zeroed in first.
        let mut panel = MaybeUninit::<[f32; KC * NR_MAX]>::uninit();
        let pp = panel.as_mut_ptr().cast::<f32>();
        let mc = MC / mr * mr;
        for (kb, ib0) in (0..self.k)
            .step_by(KC)
            .flat_map(|kb| (0..self.m).step_by(mc).map(move |ib0| (kb, ib0)))
        {
            let kc = KC.min(self.k - kb);
            let load = accumulate || kb > 0;
            for jb in (0..n).step_by(nr) {
                let nv = nr.min(n - jb);
                // A ragged panel is copied, zero-padded, so the kernel reads whole vectors; so is
                // one whose rows lie pages apart, which every row block of A reads: contiguous,
                // it stays in L1 and its lines come in order. Rows close together (Winograd's V,
                // a few hundred values) are read in place: copying them measured no faster.
                let (bp, ldp) = if nv == nr && ldb <= NEAR_ROWS {
                    (b.add(kb * ldb + jb), ldb)
                } else {
                    for p in 0..kc {
                        let dst = pp.add(p * nr);
                        std::ptr::copy_nonoverlapping(b.add((kb + p) * ldb + jb), dst, nv);
                        std::ptr::write_bytes(dst.add(nv), 0, nr - nv);
                    }
                    (pp.cast_const(), nr)
                };
                for ib in (ib0..self.m.min(ib0 + mc)).step_by(mr) {
                    let mv = mr.min(self.m - ib);
                    let a = self.data.as_ptr().add(at.offset(which, ib, kb));
                    (kern.run)(kc, a, bp, ldp, c.add(ib * ldc + jb), ldc, load, (mv, nv));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], (m, n, k): (usize, usize, usize)) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for p in 0..k {
                for j in 0..n {
                    c[i * n + j] += f64::from(a[i * k + p]) * f64::from(b[p * n + j]);
                }
            }
        }
        c
    }

    fn noise(n: usize, seed: u32) -> Vec<f32> {
        let mut rng = crate::test_rng::TestRng::new(seed);
        (0..n).map(|_| rng.unit() - 0.5).collect()
    }

    #[test]
    fn every_kernel_this_cpu_runs_matches_a_plain_product_on_ragged_shapes() {
        let kernels = supported();
        println!(
            "kernels: {:?}",
            kernels.iter().map(|k| k.name).collect::<Vec<_>>()
        );
        for kern in kernels {
            // Edges in every direction: m and n not multiples of any MR/NR, k across KC.
            for &(m, n, k) in &[
                (1, 1, 1),
                (7, 5, 3),
                (8, 32, 256),
                (13, 37, 257),
                (64, 160, 576),
                (70, 33, 600),
            ] {
                let a = noise(m * k, 1);
                let b = noise(k * n, 2);
                let want = naive(&a, &b, (m, n, k));
                // Packed as the second of two matrices, the first all NaN: reading outside
                // its own matrix would show.
                let mut packed = PackedA::zeroed_for(kern, 2, m, k);
                let at = packed.packing();
                for i in 0..m {
                    for p in 0..k {
                        // SAFETY: offsets of matrices 0 and 1 are inside the buffer.
                        unsafe {
                            *packed.as_mut_ptr().add(at.offset(0, i, p)) = f32::NAN;
                            *packed.as_mut_ptr().add(at.offset(1, i, p)) = a[i * k + p];
                        }
                    }
                }
                for accumulate in [false, true] {
                    // C has wider rows than n, to check ldc, and starts at 1 (kept when
                    // accumulating, overwritten when not).
                    let ldc = n + 3;
                    let mut c = vec![1f32; m * ldc];
                    // SAFETY: b is k × n with rows n apart; c is m rows of ldc ≥ n.
                    unsafe { packed.mul(1, b.as_ptr(), n, n, c.as_mut_ptr(), ldc, accumulate) };
                    for i in 0..m {
                        for j in 0..ldc {
                            let got = c[i * ldc + j];
                            if j >= n {
                                assert_eq!(got, 1.0, "{}: wrote past n at ({i}, {j})", kern.name);
                                continue;
                            }
                            let w = want[i * n + j] + if accumulate { 1.0 } else { 0.0 };
                            let tol = 1e-5 * (k as f64).sqrt() + 1e-6;
                            assert!(
                                (f64::from(got) - w).abs() <= tol,
                                "{}: {m}x{n}x{k} acc={accumulate} ({i}, {j}): {got} vs {w}",
                                kern.name
                            );
                        }
                    }
                }
            }
        }
    }
}
