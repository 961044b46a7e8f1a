//! Winograd F(2×2, 3×3) for the model's 3×3 stride-1 pad-1 convolutions (Lavin & Gray, 2015):
//! each 4×4 input tile becomes a 2×2 output tile with 16 multiplies per (in, out) channel pair
//! instead of 36, as 16 GEMMs of `[out, in] × [in, tiles]`. The transforms are exact in real
//! arithmetic; in f32 they add rounding at the 1e-6 level, well inside the parity tests.
//! Transforms run a whole row of tiles at a time so the inner loops are straight-line over x.
//!
//! `B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]`, `G = [1 0 0; ½ ½ ½; ½ -½ ½; 0 0 1]`,
//! `A^T = [1 1 1 0; 0 1 -1 -1]`.

use std::cell::RefCell;

/// Tiles per GEMM: wide enough for gemm to be efficient, small enough that the transformed
/// input and output of a 256-channel conv stay a few MB.
const TILES_PER_JOB: usize = 384;

#[derive(Default)]
struct Scratch {
    v: Vec<f32>,
    m: Vec<f32>,
    rows: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Weights transformed once at load: `U = G g G^T`, stored `[16][out][in]`.
#[derive(Debug)]
pub struct Winograd {
    u: Vec<f32>,
    out: usize,
    inp: usize,
}

/// `[g0, g1, g2]` → `G` applied.
fn g(v: [f32; 3]) -> [f32; 4] {
    [
        v[0],
        0.5 * (v[0] + v[1] + v[2]),
        0.5 * (v[0] - v[1] + v[2]),
        v[2],
    ]
}

/// The output tile geometry of one image.
#[derive(Debug, Clone, Copy)]
pub struct Tiles {
    pub h: usize,
    pub w: usize,
    /// Tiles across and down.
    pub across: usize,
    pub down: usize,
}

impl Tiles {
    pub fn new(h: usize, w: usize) -> Self {
        Self {
            h,
            w,
            across: w.div_ceil(2),
            down: h.div_ceil(2),
        }
    }

    /// Tile rows per job so a job holds about `TILES_PER_JOB` tiles.
    pub fn rows_per_job(&self) -> usize {
        (TILES_PER_JOB / self.across).clamp(1, self.down)
    }
}

/// What is added after the GEMMs: bias, an optional residual, an optional ReLU.
pub struct Epilogue<'a> {
    pub bias: &'a [f32],
    /// The residual image, `[out, h, w]`, or none.
    pub residual: Option<&'a [f32]>,
    pub relu: bool,
}

impl Winograd {
    /// `weight` is PyTorch's `[out, in, 3, 3]`.
    pub fn new(weight: &[f32], out: usize, inp: usize) -> Self {
        let mut u = vec![0f32; 16 * out * inp];
        for o in 0..out {
            for c in 0..inp {
                let k = &weight[(o * inp + c) * 9..][..9];
                // Columns: G g (4×3), then rows: (G g) G^T (4×4).
                let cols: [[f32; 4]; 3] = [0, 1, 2].map(|j| g([k[j], k[3 + j], k[6 + j]]));
                for r in 0..4 {
                    let row = g([cols[0][r], cols[1][r], cols[2][r]]);
                    for (s, v) in row.iter().enumerate() {
                        u[((r * 4 + s) * out + o) * inp + c] = *v;
                    }
                }
            }
        }
        Self { u, out, inp }
    }

    /// Output tile rows `ty0..ty1` of one image: `image` is `[in, h, w]`, `out` points at the
    /// image's `[out, h, w]` output (same size: stride 1, pad 1).
    ///
    /// # Safety
    /// `out` must be valid for the image's whole output and no other thread may write the
    /// output rows `2*ty0 .. 2*ty1`.
    pub unsafe fn rows(
        &self,
        image: &[f32],
        tiles: Tiles,
        (ty0, ty1): (usize, usize),
        epilogue: &Epilogue<'_>,
        out: *mut f32,
    ) {
        let (h, w, across) = (tiles.h, tiles.w, tiles.across);
        let n = (ty1 - ty0) * across;
        let (c_in, c_out) = (self.inp, self.out);
        // Padded row width: one zero column left, the row, zeros up to 2 * across + 2.
        let pw = 2 * across + 2;
        SCRATCH.with_borrow_mut(|s| {
            let Scratch { v, m, rows } = s;
            if v.len() < 16 * c_in * n {
                v.resize(16 * c_in * n, 0.0);
            }
            if m.len() < 16 * c_out * n {
                m.resize(16 * c_out * n, 0.0);
            }
            rows.clear();
            rows.resize(8 * pw, 0.0);
            let (padded, tv) = rows.split_at_mut(4 * pw);
            // Input transform: V[ξ][c][t] = (B^T d B)[ξ] for each channel and tile.
            for c in 0..c_in {
                let plane = &image[c * h * w..][..h * w];
                for ty in ty0..ty1 {
                    for r in 0..4 {
                        let dst = &mut padded[r * pw..][..pw];
                        dst.fill(0.0);
                        let y = (2 * ty + r) as isize - 1;
                        if y >= 0 && (y as usize) < h {
                            dst[1..1 + w].copy_from_slice(&plane[y as usize * w..][..w]);
                        }
                    }
                    // B^T down the rows, for every x at once.
                    {
                        let (p0, rest) = padded.split_at(pw);
                        let (p1, rest) = rest.split_at(pw);
                        let (p2, p3) = rest.split_at(pw);
                        let (t0, rest) = tv.split_at_mut(pw);
                        let (t1, rest) = rest.split_at_mut(pw);
                        let (t2, t3) = rest.split_at_mut(pw);
                        for x in 0..pw {
                            t0[x] = p0[x] - p2[x];
                            t1[x] = p1[x] + p2[x];
                            t2[x] = p2[x] - p1[x];
                            t3[x] = p1[x] - p3[x];
                        }
                    }
                    // B across each tile's four columns.
                    let t_base = (ty - ty0) * across;
                    for r in 0..4 {
                        let row = &tv[r * pw..][..pw];
                        let base = |s: usize| ((r * 4 + s) * c_in + c) * n + t_base;
                        let (b0, b1, b2, b3) = (base(0), base(1), base(2), base(3));
                        for tx in 0..across {
                            let (a, b, cc, d) = (
                                row[2 * tx],
                                row[2 * tx + 1],
                                row[2 * tx + 2],
                                row[2 * tx + 3],
                            );
                            v[b0 + tx] = a - cc;
                            v[b1 + tx] = b + cc;
                            v[b2 + tx] = cc - b;
                            v[b3 + tx] = b - d;
                        }
                    }
                }
            }
            // M[ξ] = U[ξ] · V[ξ]: [out, in] × [in, n].
            for xi in 0..16 {
                gemm::gemm(
                    c_out,
                    n,
                    c_in,
                    m.as_mut_ptr().add(xi * c_out * n),
                    1,
                    n as isize,
                    false,
                    self.u.as_ptr().add(xi * c_out * c_in),
                    1,
                    c_in as isize,
                    v.as_ptr().add(xi * c_in * n),
                    1,
                    n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            // Output transform Y = A^T M A, then the epilogue, into the image.
            for o in 0..c_out {
                let bias = epilogue.bias[o];
                let dst = out.add(o * h * w);
                let res = epilogue.residual.map(|r| &r[o * h * w..][..h * w]);
                let mrow = |xi: usize| &m[(xi * c_out + o) * n..][..n];
                let mx: [&[f32]; 16] = std::array::from_fn(mrow);
                for ty in ty0..ty1 {
                    let t_base = (ty - ty0) * across;
                    for i in 0..2 {
                        let y = 2 * ty + i;
                        if y >= h {
                            break;
                        }
                        let line = std::slice::from_raw_parts_mut(dst.add(y * w), w);
                        let res_line = res.map(|r| &r[y * w..][..w]);
                        for tx in 0..across {
                            let t = t_base + tx;
                            // A^T down the four rows of M, for row i of the output tile.
                            let col = |s: usize| {
                                let (m0, m1, m2, m3) =
                                    (mx[s][t], mx[4 + s][t], mx[8 + s][t], mx[12 + s][t]);
                                if i == 0 {
                                    m0 + m1 + m2
                                } else {
                                    m1 - m2 - m3
                                }
                            };
                            let (c0, c1, c2, c3) = (col(0), col(1), col(2), col(3));
                            let pair = [c0 + c1 + c2, c1 - c2 - c3];
                            for (j, val) in pair.iter().enumerate() {
                                let x = 2 * tx + j;
                                if x >= w {
                                    break;
                                }
                                let mut v = val + bias;
                                if let Some(r) = res_line {
                                    v += r[x];
                                }
                                line[x] = if epilogue.relu { v.max(0.0) } else { v };
                            }
                        }
                    }
                }
            }
        });
    }
}
