//! Winograd F(4×4, 3×3) for the model's 3×3 stride-1 pad-1 convolutions (Lavin & Gray, 2015):
//! each 6×6 input tile becomes a 4×4 output tile with 36 multiplies per (in, out) channel pair
//! instead of 144, as 36 GEMMs of `[out, in] × [in, tiles]`. The transforms are exact in real
//! arithmetic; in f32 they add rounding of a few 1e-6 relative to a layer's outputs (the
//! unit test in `conv.rs` bounds it against im2col), well inside the parity tests.
//!
//! Tiles are numbered across a whole batch (image after image, tile row after tile row), so
//! the mask head's 100 small 14×14 RoIs make GEMMs as wide as one large image does. Transforms
//! run a whole row of tiles at a time so the inner loops are straight-line over x.
//!
//! The interpolation points are 0, -1, 1, ½, -2 and ∞ rather than the usual 0, ±1, ±2, ∞: with
//! the same cost they halve the f32 rounding error (Barabasz, Anderson & Gregg, 2018, "Error
//! analysis and improving the accuracy of Winograd convolution"). The matrices, from the
//! Toom-Cook construction over those points:
//! `B^T = [1 -3⁄2 -2 3⁄2 1 0; 0 1 -5⁄2 ½ 1 0; 0 -1 ½ 5⁄2 1 0; 0 -2 -1 2 1 0; 0 ½ -1 -½ 1 0;
//! 0 1 -3⁄2 -2 3⁄2 1]`,
//! `G = [1 0 0; -⅓ ⅓ -⅓; ⅓ ⅓ ⅓; -16⁄15 -8⁄15 -4⁄15; 1⁄15 -2⁄15 4⁄15; 0 0 1]`,
//! `A^T = [1 1 1 1 1 0; 0 -1 1 ½ -2 0; 0 1 1 ¼ 4 0; 0 -1 1 ⅛ -8 1]`.

use std::cell::RefCell;

use rayon::prelude::*;

use super::conv::OutPtr;
use super::sgemm::{self, PackedA};

/// Output tile side.
const M: usize = 4;
/// Input tile side: `M + 3 - 1`.
const T: usize = 6;
/// Transformed values per tile.
const XI: usize = T * T;
/// Tiles per GEMM: wide enough for gemm's microkernel to run at full speed; small enough that
/// one GEMM's operands (`U[ξ]` 256 KB, `V[ξ]` and `M[ξ]` 160 KB each for 256 channels) stay in
/// a 1–2 MB L2 while gemm walks them.
const TILES_PER_JOB: usize = 160;

#[derive(Default)]
struct Scratch {
    v: Vec<f32>,
    m: Vec<f32>,
    rows: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Weights transformed once at load, `U = G g G^T`, and packed for the GEMM kernel: one
/// `[out, in]` matrix per transformed position ξ.
#[derive(Debug)]
pub struct Winograd {
    u: PackedA,
    out: usize,
    inp: usize,
}

/// `G` applied to `[g0, g1, g2]`, in f64 so the thirds and fifteenths round once.
fn g(v: [f64; 3]) -> [f64; T] {
    let [a, b, c] = v;
    [
        a,
        (-a + b - c) / 3.0,
        (a + b + c) / 3.0,
        -(16.0 * a + 8.0 * b + 4.0 * c) / 15.0,
        (a - 2.0 * b + 4.0 * c) / 15.0,
        c,
    ]
}

/// `B^T` applied to six values (a column or a row of an input tile).
#[inline(always)]
fn bt(d: [f32; T]) -> [f32; T] {
    [
        d[0] - 1.5 * d[1] - 2.0 * d[2] + 1.5 * d[3] + d[4],
        d[1] - 2.5 * d[2] + 0.5 * d[3] + d[4],
        -d[1] + 0.5 * d[2] + 2.5 * d[3] + d[4],
        2.0 * (d[3] - d[1]) - d[2] + d[4],
        0.5 * (d[1] - d[3]) - d[2] + d[4],
        d[1] - 1.5 * d[2] - 2.0 * d[3] + 1.5 * d[4] + d[5],
    ]
}

/// `A^T` applied to six values.
#[inline(always)]
fn at(m: [f32; T]) -> [f32; M] {
    let (s12, d21) = (m[1] + m[2], m[2] - m[1]);
    [
        m[0] + s12 + m[3] + m[4],
        d21 + 0.5 * m[3] - 2.0 * m[4],
        s12 + 0.25 * m[3] + 4.0 * m[4],
        d21 + 0.125 * m[3] - 8.0 * m[4] + m[5],
    ]
}

/// The output tile geometry of a batch of same-sized images.
#[derive(Debug, Clone, Copy)]
pub struct Tiles {
    pub images: usize,
    pub h: usize,
    pub w: usize,
    /// Tiles across and down one image.
    pub across: usize,
    pub down: usize,
}

impl Tiles {
    pub fn new(images: usize, h: usize, w: usize) -> Self {
        Self {
            images,
            h,
            w,
            across: w.div_ceil(M),
            down: h.div_ceil(M),
        }
    }

    /// Tile rows of the whole batch.
    pub fn rows(&self) -> usize {
        self.images * self.down
    }

    /// Tile rows per job: about `TILES_PER_JOB` tiles, with the job count a multiple of the
    /// thread count so both threads of a 2-core machine get equal work (layer4's 16×16 maps
    /// are only four tile rows; layer1's 128×128 ones would split 7 ways).
    pub fn rows_per_job(&self, threads: usize) -> usize {
        let rows = self.rows().max(1);
        let jobs = rows
            .div_ceil((TILES_PER_JOB / self.across).max(1))
            .next_multiple_of(threads.max(1));
        rows.div_ceil(jobs).max(1)
    }
}

/// What is added after the GEMMs: bias, an optional residual, an optional ReLU.
pub struct Epilogue<'a> {
    pub bias: &'a [f32],
    /// The residual batch, `[images, out, h, w]`, or none.
    pub residual: Option<&'a [f32]>,
    pub relu: bool,
}

impl Winograd {
    /// `weight` is PyTorch's `[out, in, 3, 3]`. Runs at load, spread over the threads: the
    /// model's 3×3 convs hold 1.8 M (out, in) pairs, a large part of the load time.
    pub fn new(weight: &[f32], out: usize, inp: usize) -> Self {
        // Written straight into the kernel's packed layout: no second copy of the weights.
        let mut u = PackedA::zeroed(XI, out, inp);
        let at = u.packing();
        let dst = OutPtr(u.as_mut_ptr());
        (0..out).into_par_iter().for_each(|o| {
            for c in 0..inp {
                let k: [f64; 9] = std::array::from_fn(|i| f64::from(weight[(o * inp + c) * 9 + i]));
                // Columns: G g (6×3), then rows: (G g) G^T (6×6).
                let cols: [[f64; T]; 3] = [0, 1, 2].map(|j| g([k[j], k[3 + j], k[6 + j]]));
                let rows: [[f64; T]; T] =
                    std::array::from_fn(|r| g([cols[0][r], cols[1][r], cols[2][r]]));
                for (r, row) in rows.iter().enumerate() {
                    for (s, v) in row.iter().enumerate() {
                        // SAFETY: the offset is inside `u` (ξ < 36, o < out, c < inp), and
                        // only this iteration writes output channel `o`'s entries.
                        unsafe { *dst.get().add(at.offset(r * T + s, o, c)) = *v as f32 };
                    }
                }
            }
        });
        Self { u, out, inp }
    }

    /// Tile rows `g0..g1` of the batch (row `g` is tile row `g % down` of image `g / down`):
    /// `input` is `[images, in, h, w]`, `out` points at the batch's `[images, out, h, w]` output
    /// (same size: stride 1, pad 1).
    ///
    /// # Safety
    /// `out` must be valid for the batch's whole output and no other thread may write the
    /// output rows of tile rows `g0..g1`.
    pub unsafe fn rows(
        &self,
        input: &[f32],
        tiles: Tiles,
        (g0, g1): (usize, usize),
        epilogue: &Epilogue<'_>,
        out: *mut f32,
    ) {
        let (h, w, across, down) = (tiles.h, tiles.w, tiles.across, tiles.down);
        // The GEMMs' width, padded past the job's tiles (whose results are never read) to whole
        // panels of the kernel, which then never takes its slower ragged-edge path.
        let n = ((g1 - g0) * across).next_multiple_of(sgemm::panel_width());
        let (c_in, c_out) = (self.inp, self.out);
        // Padded row width: one zero column left, the row, zeros up to 4 * across + 2.
        let pw = M * across + 2;
        SCRATCH.with_borrow_mut(|s| {
            let Scratch { v, m, rows } = s;
            if v.len() < XI * c_in * n {
                v.resize(XI * c_in * n, 0.0);
            }
            if m.len() < XI * c_out * n {
                m.resize(XI * c_out * n, 0.0);
            }
            // 6 padded input rows, their 6 B^T rows; reused as A^T's 4×6 column sums and
            // 4 output lines.
            let need = 2 * T * pw.max(M * across);
            if rows.len() < need {
                rows.resize(need, 0.0);
            }
            let (padded, tv) = rows.split_at_mut(T * pw);
            // Input transform: V[ξ][c][t] = (B^T d B)[ξ] for each channel and tile.
            for c in 0..c_in {
                for gr in g0..g1 {
                    let (img, ty) = (gr / down, gr % down);
                    let plane = &input[(img * c_in + c) * h * w..][..h * w];
                    for r in 0..T {
                        let dst = &mut padded[r * pw..][..pw];
                        let y = (M * ty + r) as isize - 1;
                        if y >= 0 && (y as usize) < h {
                            dst[0] = 0.0;
                            dst[1..1 + w].copy_from_slice(&plane[y as usize * w..][..w]);
                            dst[1 + w..].fill(0.0);
                        } else {
                            dst.fill(0.0);
                        }
                    }
                    // B^T down the rows, for every x at once.
                    {
                        let p: [&[f32]; T] = std::array::from_fn(|r| &padded[r * pw..][..pw]);
                        let mut chunks = tv.chunks_exact_mut(pw);
                        let t: [&mut [f32]; T] = std::array::from_fn(|_| {
                            chunks.next().expect("tv holds six rows of pw")
                        });
                        for x in 0..pw {
                            let col = bt(std::array::from_fn(|r| p[r][x]));
                            for (r, v) in col.into_iter().enumerate() {
                                t[r][x] = v;
                            }
                        }
                    }
                    // B across each tile's six columns.
                    let t_base = (gr - g0) * across;
                    for r in 0..T {
                        let row = &tv[r * pw..][..pw];
                        let base: [usize; T] =
                            std::array::from_fn(|s| ((r * T + s) * c_in + c) * n + t_base);
                        for tx in 0..across {
                            let d: [f32; T] = row[M * tx..][..T].try_into().unwrap_or([0.0; T]);
                            for (s, val) in bt(d).into_iter().enumerate() {
                                v[base[s] + tx] = val;
                            }
                        }
                    }
                }
            }
            // M[ξ] = U[ξ] · V[ξ]: [out, in] × [in, n].
            for xi in 0..XI {
                self.u.mul(
                    xi,
                    v.as_ptr().add(xi * c_in * n),
                    n,
                    n,
                    m.as_mut_ptr().add(xi * c_out * n),
                    n,
                    false,
                );
            }
            // Output transform Y = A^T M A, then the epilogue, into the batch.
            let (colsum, lines) = rows.split_at_mut(T * pw.max(M * across));
            let ow = M * across;
            for o in 0..c_out {
                let bias = epilogue.bias[o];
                for gr in g0..g1 {
                    let (img, ty) = (gr / down, gr % down);
                    let t_base = (gr - g0) * across;
                    let mx: [&[f32]; XI] =
                        std::array::from_fn(|xi| &m[(xi * c_out + o) * n + t_base..][..across]);
                    // A^T down the six rows of M, for every tile of the row at once:
                    // colsum[i][s][tx].
                    for s in 0..T {
                        for tx in 0..across {
                            let col = at(std::array::from_fn(|r| mx[r * T + s][tx]));
                            for (i, val) in col.into_iter().enumerate() {
                                colsum[(i * T + s) * across + tx] = val;
                            }
                        }
                    }
                    // Then A across: four output lines of the tile row.
                    for i in 0..M {
                        let line = &mut lines[i * ow..][..ow];
                        for tx in 0..across {
                            let q = at(std::array::from_fn(|s| colsum[(i * T + s) * across + tx]));
                            line[M * tx..][..M].copy_from_slice(&q);
                        }
                    }
                    let plane = (img * c_out + o) * h * w;
                    let res = epilogue.residual.map(|r| &r[plane..][..h * w]);
                    for i in 0..M {
                        let y = M * ty + i;
                        if y >= h {
                            break;
                        }
                        let src = &lines[i * ow..][..w];
                        let dst = std::slice::from_raw_parts_mut(out.add(plane + y * w), w);
                        match res {
                            Some(r) => {
                                let r = &r[y * w..][..w];
                                for ((d, s), r) in dst.iter_mut().zip(src).zip(r) {
                                    *d = s + bias + r;
                                }
                            }
                            None => {
                                for (d, s) in dst.iter_mut().zip(src) {
                                    *d = s + bias;
                                }
                            }
                        }
                        if epilogue.relu {
                            dst.iter_mut().for_each(|v| *v = v.max(0.0));
                        }
                    }
                }
            }
        });
    }
}
