//! Winograd F(4×4, 3×3) for the model's 3×3 stride-1 pad-1 convolutions (Lavin & Gray, 2015):
//! each 6×6 input tile becomes a 4×4 output tile with 36 multiplies per (in, out) channel pair
//! instead of 144, as 36 GEMMs of `[out, in] × [in, tiles]`. The transforms are exact in real
//! arithmetic; in f32 they add rounding of a few 1e-6 relative to a layer's outputs (the
//! unit test in `conv.rs` bounds it against im2col), well inside the parity tests.
//!
//! Tiles are numbered across a whole batch (image after image, tile row after tile row), so
//! the mask head's 100 small 14×14 RoIs make GEMMs as wide as one large image does. The
//! transforms run over all of a job's tiles at once, each step a loop over tiles that the
//! compiler vectorises: a channel's 6×6 tiles are first gathered into 36 rows of one value per
//! tile; run per row of tiles instead, the mask head's rows of four tiles fill no vector.
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
use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::conv::{scratch, OutPtr};
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
    /// Two planes of `XI` rows of `n`: a channel's tiles gathered, `[r·T + s][tile]`, then
    /// half-transformed; reused by the output transform.
    planes: Vec<f32>,
    /// One output line of a tile row, for the epilogue.
    line: Vec<f32>,
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
    /// `out` must be valid for writes of the batch's whole output (which may be uninitialised:
    /// these rows are written, never read) and no other thread may write the output rows of
    /// tile rows `g0..g1`.
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
        SCRATCH.with_borrow_mut(|s| {
            let v = scratch(&mut s.v, XI * c_in * n);
            let m = scratch(&mut s.m, XI * c_out * n);
            let (gathered, half) = scratch(&mut s.planes, 2 * XI * n).split_at_mut(XI * n);
            let line = scratch(&mut s.line, w);
            // Input transform, V[ξ][c][t] = (B^T d B)[ξ], every step a loop over the job's
            // tiles t, so it runs in vector lanes even where a row has only a few tiles (the
            // mask head's 14×14 RoIs have four).
            for c in 0..c_in {
                gather(input, c * h * w, c_in * h * w, tiles, (g0, g1), gathered, n);
                // B^T down each of the six columns: half[r'][s] from gathered[r][s].
                for s in 0..T {
                    let src = rows_at(gathered, n, s, T);
                    let dst = rows_at_mut(half, n, s, T);
                    lanes(src, dst, bt);
                }
                // B across each of the six rows: V[r'·T + s][c] from half[r'][j].
                for r in 0..T {
                    let src = rows_at(half, n, r * T, 1);
                    let dst = rows_at_mut(v, n, r * T * c_in + c, c_in);
                    lanes(src, dst, bt);
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
            // Output transform Y = A^T M A, again over the job's tiles in lanes, then the
            // epilogue line by line into the batch.
            let (down_rows, tile_values) = (half, gathered);
            for o in 0..c_out {
                // A^T down each of the six columns: down_rows[i][s] from M[r·T + s][o].
                for s in 0..T {
                    let src = rows_at(m, n, s * c_out + o, T * c_out);
                    let dst = rows_at_mut(down_rows, n, s, T);
                    lanes(src, dst, at);
                }
                // A across each of the four rows: tile_values[i][k] from down_rows[i][s].
                for i in 0..M {
                    let src = rows_at(down_rows, n, i * T, 1);
                    let dst = rows_at_mut(tile_values, n, i * M, 1);
                    lanes(src, dst, at);
                }
                let bias = epilogue.bias[o];
                for gr in g0..g1 {
                    let (img, ty) = (gr / down, gr % down);
                    let first = (gr - g0) * across;
                    let plane = (img * c_out + o) * h * w;
                    let res = epilogue.residual.map(|r| &r[plane..][..h * w]);
                    for i in 0..M.min(h - M * ty) {
                        let y = M * ty + i;
                        for k in 0..M {
                            let values = &tile_values[(i * M + k) * n + first..][..across];
                            for (x, &val) in (k..w).step_by(M).zip(values) {
                                line[x] = val;
                            }
                        }
                        let src = &line[..w];
                        // Written, not read: the output may be uninitialised until here.
                        let dst = std::slice::from_raw_parts_mut(
                            out.add(plane + y * w).cast::<MaybeUninit<f32>>(),
                            w,
                        );
                        let act = |v: f32| if epilogue.relu { v.max(0.0) } else { v };
                        match res {
                            Some(r) => {
                                let r = &r[y * w..][..w];
                                for ((d, s), r) in dst.iter_mut().zip(src).zip(r) {
                                    d.write(act(s + bias + r));
                                }
                            }
                            None => {
                                for (d, s) in dst.iter_mut().zip(src) {
                                    d.write(act(s + bias));
                                }
                            }
                        }
                    }
                }
            }
        });
    }
}

/// Channel `c`'s 6×6 input tiles (pad 1, zeros outside the image) of tile rows `g0..g1`, as
/// `XI` rows of `n`: `dst[(r·T + s)·n + t]` is row `r`, column `s` of the job's tile `t`.
/// `offset` is the channel's plane in the first image, `image` the values per image.
fn gather(
    input: &[f32],
    offset: usize,
    image: usize,
    tiles: Tiles,
    (g0, g1): (usize, usize),
    dst: &mut [f32],
    n: usize,
) {
    let (h, w, across, down) = (tiles.h, tiles.w, tiles.across, tiles.down);
    for gr in g0..g1 {
        let (img, ty) = (gr / down, gr % down);
        let plane = &input[img * image + offset..][..h * w];
        let first = (gr - g0) * across;
        for r in 0..T {
            let y = (M * ty + r) as isize - 1;
            let row = (0..h as isize)
                .contains(&y)
                .then(|| &plane[y as usize * w..][..w]);
            for s in 0..T {
                let out = &mut dst[(r * T + s) * n + first..][..across];
                match row {
                    // Column x = 4·tx + s - 1 of each tile tx.
                    Some(row) => {
                        for (tx, o) in out.iter_mut().enumerate() {
                            let x = (M * tx + s) as isize - 1;
                            *o = if (0..w as isize).contains(&x) {
                                row[x as usize]
                            } else {
                                0.0
                            };
                        }
                    }
                    None => out.fill(0.0),
                }
            }
        }
    }
}

/// Six rows of `n` values in `buf`: row `first`, then every `step`-th after it.
fn rows_at(buf: &[f32], n: usize, first: usize, step: usize) -> [&[f32]; T] {
    std::array::from_fn(|i| &buf[(first + i * step) * n..][..n])
}

/// The mutable twin of [`rows_at`], for `N` rows (four or six).
fn rows_at_mut<const N: usize>(
    buf: &mut [f32],
    n: usize,
    first: usize,
    step: usize,
) -> [&mut [f32]; N] {
    let mut rows = buf.chunks_exact_mut(n).skip(first).step_by(step);
    std::array::from_fn(|_| rows.next().expect("the buffer holds every row asked for"))
}

/// `dst[k][t] = f(src[0][t], …, src[5][t])[k]` for every lane `t`: a transform step over all
/// tiles at once, straight-line per lane so it vectorises.
#[inline(always)]
fn lanes<const N: usize>(src: [&[f32]; T], dst: [&mut [f32]; N], f: impl Fn([f32; T]) -> [f32; N]) {
    let n = src[0].len();
    let src: [&[f32]; T] = src.map(|s| &s[..n]);
    let mut dst: [&mut [f32]; N] = dst.map(|d| &mut d[..n]);
    for t in 0..n {
        let y = f(std::array::from_fn(|i| src[i][t]));
        for (d, y) in dst.iter_mut().zip(y) {
            d[t] = y;
        }
    }
}
