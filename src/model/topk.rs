//! `torch.topk(logits, n, sorted=True)` for the RPN's per-level pre-NMS selection, done where
//! the logits are. candle has no top-k, and its CUDA argsort is a shared-memory bitonic sort
//! limited to 8192 elements per row, while P2 alone has about 160k anchors at 800 px.
//!
//! A radix select over order-preserving 32-bit keys: three histogram passes (11, 11 and 10
//! bits) find the key of the n-th largest value, one collect pass gathers the keys above it and
//! the indices of the keys equal to it, and the host sorts those n. Only three 8 KiB histograms
//! and the n winners leave the device, not the whole level's logits. On CUDA the two passes are
//! candle custom ops (`kernels/topk.cu`). On the CPU they run in place on the levels' values,
//! through the same host functions the ops' CPU kernels call, so parity tests exercise this
//! very selection logic without a tensor per pass. Metal copies the levels to the host.
//!
//! Ties at the threshold are broken by the lowest index, which is also what the sort gives
//! among equal values, so the result is deterministic on every device.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::conv::{contiguous_f32, host_f32};
use crate::error::Result;

/// The key's digits, most significant first: (shift, bits). The bins of the widest digit are
/// what the CUDA kernel keeps in shared memory (`TOPK_MAX_BINS`).
const DIGITS: [(u32, u32); 3] = [(21, 11), (10, 11), (0, 10)];

/// Threads per block of both CUDA kernels.
#[cfg(any(test, feature = "cuda"))]
const THREADS: u32 = 256;

/// Blocks to cover `n` values, but no more than a GPU keeps busy: each block's histogram is
/// merged into the global one with atomics.
#[cfg(any(test, feature = "cuda"))]
fn blocks(n: u32) -> u32 {
    n.div_ceil(THREADS).clamp(1, 1024)
}

/// Maps an f32 to a u32 that sorts as `f32::total_cmp` does.
fn order_key(v: f32) -> u32 {
    let bits = v.to_bits();
    if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

/// The inverse of [`order_key`].
fn from_key(key: u32) -> f32 {
    f32::from_bits(if key & 0x8000_0000 != 0 {
        key & 0x7fff_ffff
    } else {
        !key
    })
}

/// The largest values of a level, largest first, ties in index order.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TopN {
    pub indices: Vec<u32>,
    pub values: Vec<f32>,
}

/// Buffers a selection reuses from one call to the next, and its result: each level's
/// search, each pass's ops and outputs, the winners being sorted, and every level's
/// [`TopN`]. Over host levels ([`top_n_slices`]) nothing is allocated once they have grown.
#[derive(Debug, Default)]
pub struct TopNScratch {
    searches: Vec<Search>,
    histograms: Vec<Option<Histogram>>,
    collects: Vec<Option<Collect>>,
    /// Each level's output of the last pass.
    outputs: Vec<Vec<u32>>,
    pairs: Vec<(u32, u32)>,
    equal: Vec<u32>,
    tops: Vec<TopN>,
}

impl TopNScratch {
    /// The last selection's winners, one [`TopN`] per level.
    pub fn tops(&self) -> &[TopN] {
        &self.tops
    }
}

/// The `n` largest entries of the 1-D `values` (f32, or f16 on CUDA), as f32.
pub fn top_n(values: &Tensor, n: usize) -> Result<TopN> {
    let mut scratch = TopNScratch::default();
    top_n_levels(std::slice::from_ref(values), n, &mut scratch)?;
    Ok(scratch.tops.pop().unwrap_or_default())
}

/// [`top_n`] of every level at once, into `scratch`'s [`TopNScratch::tops`]: each pass is launched
/// for all levels and their results come back in one read, so the whole selection costs four
/// reads whatever the level count (three histograms and the collect), not four per level.
pub fn top_n_levels(levels: &[Tensor], n: usize, scratch: &mut TopNScratch) -> Result<()> {
    let lens = levels
        .iter()
        .map(|t| t.dim(0))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let Some(first) = levels.first() else {
        scratch.tops.clear();
        return Ok(());
    };
    let levels = levels
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<Vec<_>>>()?;
    match first.device() {
        // The passes read the levels in place. Each counts as the read a GPU makes for it, so
        // the CPU pins the GPU's count (see `crate::device::count_read`).
        Device::Cpu => {
            let guards: Vec<_> = levels.iter().map(|t| t.storage_and_layout()).collect();
            let values = guards
                .iter()
                .map(|(s, l)| host_f32(s, l, "top_n"))
                .collect::<candle_core::Result<Vec<_>>>()?;
            top_n_slices(&values, n, scratch)
        }
        // Metal has no kernels for the passes: every level comes over in one read and the
        // passes run on the host copy.
        Device::Metal(_) => {
            let flat: Vec<Tensor> = levels
                .iter()
                .map(|t| t.to_dtype(DType::F32))
                .collect::<candle_core::Result<_>>()?;
            let host: Vec<f32> = crate::device::read_vec1(&Tensor::cat(&flat, 0)?)?;
            let mut rest = &host[..];
            let values: Vec<&[f32]> = lens
                .iter()
                .map(|&len| {
                    let (head, tail) = rest.split_at(len);
                    rest = tail;
                    head
                })
                .collect();
            top_n_host(&values, n, scratch, || {})
        }
        _ => select_levels(
            lens,
            n,
            scratch,
            |ops, outs| run_pass(&levels, ops, outs),
            |ops, outs| run_pass(&levels, ops, outs),
        ),
    }
}

/// [`top_n_levels`] of levels held on the host, in place. Each pass counts as the read a GPU
/// makes for it (see `crate::device::count_read`).
pub fn top_n_slices(levels: &[&[f32]], n: usize, scratch: &mut TopNScratch) -> Result<()> {
    top_n_host(levels, n, scratch, crate::device::count_read)
}

/// The selection over levels already on the host, each pass run in place over every level;
/// `on_pass` is called once per pass.
fn top_n_host(
    values: &[&[f32]],
    n: usize,
    scratch: &mut TopNScratch,
    on_pass: impl Fn(),
) -> Result<()> {
    select_levels(
        values.iter().map(|v| v.len()),
        n,
        scratch,
        |ops, outs| {
            on_pass();
            host_pass(values, ops, outs, Histogram::count_into);
            Ok(())
        },
        |ops, outs| {
            on_pass();
            host_pass(values, ops, outs, Collect::gather_into);
            Ok(())
        },
    )
}

/// One pass on the host: `pass` over each level that has an op, into that level's output; the
/// others' outputs are emptied.
fn host_pass<Op>(
    values: &[&[f32]],
    ops: &[Option<Op>],
    outs: &mut [Vec<u32>],
    pass: impl Fn(&Op, &[f32], &mut Vec<u32>),
) {
    for ((v, op), out) in values.iter().zip(ops).zip(outs) {
        match op {
            Some(op) => pass(op, v, out),
            None => out.clear(),
        }
    }
}

/// One pass over every level with an op: the outputs concatenated, read once, split back by
/// level into `outs`.
fn run_pass<C: CustomOp1>(
    levels: &[Tensor],
    ops: &[Option<C>],
    outs: &mut [Vec<u32>],
) -> Result<()> {
    let mut parts = Vec::new();
    let mut sizes = Vec::with_capacity(ops.len());
    for (values, op) in levels.iter().zip(ops) {
        match op {
            Some(op) => {
                let out = values.apply_op1_no_bwd(op)?;
                sizes.push(out.dim(0)?);
                parts.push(out);
            }
            None => sizes.push(0),
        }
    }
    let all: Vec<u32> = if parts.is_empty() {
        Vec::new()
    } else {
        crate::device::read_vec1(&Tensor::cat(&parts, 0)?)?
    };
    let mut rest = &all[..];
    for (&size, out) in sizes.iter().zip(outs) {
        let (head, tail) = rest.split_at(size);
        rest = tail;
        out.clear();
        out.extend_from_slice(head);
    }
    Ok(())
}

/// The host side of the radix select over one level of `len` values, whatever runs the two
/// passes.
#[cfg(test)]
fn select(
    len: usize,
    n: usize,
    mut histogram: impl FnMut(&Histogram) -> Result<Vec<u32>>,
    collect: impl FnOnce(&Collect) -> Result<Vec<u32>>,
) -> Result<TopN> {
    let mut scratch = TopNScratch::default();
    select_levels(
        [len],
        n,
        &mut scratch,
        |ops, outs| {
            outs[0] = ops[0]
                .as_ref()
                .map(&mut histogram)
                .transpose()?
                .unwrap_or_default();
            Ok(())
        },
        |ops, outs| {
            outs[0] = ops[0]
                .as_ref()
                .map(collect)
                .transpose()?
                .unwrap_or_default();
            Ok(())
        },
    )?;
    Ok(scratch.tops.pop().unwrap_or_default())
}

/// Where one level's search stands between passes.
#[derive(Debug)]
struct Search {
    len: usize,
    n: usize,
    /// How many of the n winners are still to be found among the keys that share `prefix`.
    need: u32,
    prefix: u32,
    at_threshold: u32,
}

/// The host side of the radix select over levels of `lens` values in lock step: each pass
/// asks `histogram` (then `collect`) for every level with something to select (`None` for the
/// others) and gets one result per level back in the outputs it is handed. The winners land in
/// `scratch`'s [`TopNScratch::tops`].
fn select_levels(
    lens: impl IntoIterator<Item = usize>,
    n: usize,
    scratch: &mut TopNScratch,
    mut histogram: impl FnMut(&[Option<Histogram>], &mut [Vec<u32>]) -> Result<()>,
    collect: impl FnOnce(&[Option<Collect>], &mut [Vec<u32>]) -> Result<()>,
) -> Result<()> {
    let TopNScratch {
        searches,
        histograms,
        collects,
        outputs,
        pairs,
        equal,
        tops,
    } = scratch;
    searches.clear();
    searches.extend(lens.into_iter().map(|len| Search {
        len,
        n: n.min(len),
        need: n.min(len) as u32,
        prefix: 0,
        at_threshold: 0,
    }));
    outputs.resize_with(searches.len(), Vec::new);
    for (shift, bits) in DIGITS {
        histograms.clear();
        histograms.extend(searches.iter().map(|s| {
            (s.n > 0).then_some(Histogram {
                prefix: s.prefix,
                prefix_shift: shift + bits,
                shift,
                bits,
            })
        }));
        histogram(histograms, outputs)?;
        for (s, hist) in searches.iter_mut().zip(&*outputs).filter(|(s, _)| s.n > 0) {
            let mut digit = None;
            for (d, &count) in hist.iter().enumerate().rev() {
                if count >= s.need {
                    digit = Some(d as u32);
                    s.at_threshold = count;
                    break;
                }
                s.need -= count;
            }
            let Some(digit) = digit else {
                // The matching keys were counted as at least `need` one pass earlier.
                let msg = format!(
                    "top_n: histogram of {} values lost entries at shift {shift}",
                    s.len
                );
                return Err(candle_core::Error::Msg(msg).into());
            };
            s.prefix = (s.prefix << bits) | digit;
        }
    }
    collects.clear();
    collects.extend(searches.iter().map(|s| {
        (s.n > 0).then_some(Collect {
            threshold: s.prefix,
            above: s.n as u32 - s.need,
            equal: s.at_threshold,
        })
    }));
    collect(collects, outputs)?;
    tops.resize_with(searches.len(), TopN::default);
    for (((s, op), collected), top) in searches.iter().zip(&*collects).zip(&*outputs).zip(tops) {
        top.indices.clear();
        top.values.clear();
        if let Some(op) = op {
            winners(s, op, collected, (pairs, equal), top)?;
        }
    }
    Ok(())
}

/// One level's winners from its collect pass, best first, into `top` (empty when called);
/// `pairs` and `equal` are sorting space.
fn winners(
    s: &Search,
    op: &Collect,
    collected: &[u32],
    (pairs, equal): (&mut Vec<(u32, u32)>, &mut Vec<u32>),
    top: &mut TopN,
) -> Result<()> {
    let (above, at_threshold) = (op.above, op.equal);
    if collected.len() < 2 || collected[..2] != [above, at_threshold] {
        let msg = format!(
            "top_n: collected {:?} keys above and at the threshold where the histograms \
             counted {above} and {at_threshold}",
            collected.get(..2)
        );
        return Err(candle_core::Error::Msg(msg).into());
    }
    let collected = &collected[2..];
    let (above, at) = collected.split_at(2 * above as usize);
    pairs.clear();
    pairs.extend(above.chunks_exact(2).map(|p| (p[0], p[1])));
    pairs.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    equal.clear();
    equal.extend_from_slice(at);
    equal.sort_unstable();
    pairs.extend(equal.iter().take(s.need as usize).map(|&i| (s.prefix, i)));
    top.indices.extend(pairs.iter().map(|w| w.1));
    top.values.extend(pairs.iter().map(|w| from_key(w.0)));
    Ok(())
}

/// Per digit value at `shift`, how many keys whose bits from `prefix_shift` up equal `prefix`
/// have it: `[2^bits]` u32.
#[derive(Debug)]
struct Histogram {
    prefix: u32,
    prefix_shift: u32,
    shift: u32,
    bits: u32,
}

impl Histogram {
    fn matches(&self, key: u32) -> bool {
        self.prefix_shift >= 32 || key >> self.prefix_shift == self.prefix
    }

    /// The pass over `values` on the host, into `hist` (its memory reused).
    fn count_into(&self, values: &[f32], hist: &mut Vec<u32>) {
        let bins = 1usize << self.bits;
        hist.clear();
        hist.resize(bins, 0);
        for &v in values {
            let key = order_key(v);
            if self.matches(key) {
                hist[(key >> self.shift) as usize & (bins - 1)] += 1;
            }
        }
    }
}

/// Every key above `threshold` with its index, and the indices of the keys equal to it, when
/// the histograms counted `above` and `equal` of them: `[2 + 2 * above + equal]` u32, the
/// first two words being how many of each were found (the kernel's slot counters), which
/// `top_n` checks against the histograms.
#[derive(Debug)]
struct Collect {
    threshold: u32,
    above: u32,
    equal: u32,
}

impl Collect {
    fn len(&self) -> usize {
        2 + 2 * self.above as usize + self.equal as usize
    }

    /// The pass over `values` on the host, into `out` (its memory reused).
    fn gather_into(&self, values: &[f32], out: &mut Vec<u32>) {
        out.clear();
        out.resize(self.len(), 0);
        let (counts, rest) = out.split_at_mut(2);
        let (above, equal) = rest.split_at_mut(2 * self.above as usize);
        let (mut n_above, mut n_equal) = (0usize, 0usize);
        for (i, &v) in values.iter().enumerate() {
            let key = order_key(v);
            if key > self.threshold {
                if let Some(slot) = above.get_mut(2 * n_above..2 * n_above + 2) {
                    slot.copy_from_slice(&[key, i as u32]);
                }
                n_above += 1;
            } else if key == self.threshold {
                if let Some(slot) = equal.get_mut(n_equal) {
                    *slot = i as u32;
                }
                n_equal += 1;
            }
        }
        // As the CUDA kernel's counters report them, so `top_n` checks both alike.
        counts.copy_from_slice(&[n_above as u32, n_equal as u32]);
    }
}

impl CustomOp1 for Histogram {
    fn name(&self) -> &'static str {
        "topk_histogram"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut hist = Vec::new();
        self.count_into(contiguous_f32(s, l, self.name())?, &mut hist);
        let bins = hist.len();
        Ok((CpuStorage::U32(hist), Shape::from(bins)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let bins = 1usize << self.bits;
        let args = [self.prefix, self.prefix_shift, self.shift, self.bits];
        let out = cuda::launch(s, l, "topk_histogram", &args, bins)?;
        Ok((out, Shape::from(bins)))
    }
}

impl CustomOp1 for Collect {
    fn name(&self) -> &'static str {
        "topk_collect"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut out = Vec::new();
        self.gather_into(contiguous_f32(s, l, self.name())?, &mut out);
        let len = out.len();
        Ok((CpuStorage::U32(out), Shape::from(len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let args = [self.threshold, self.above, self.equal];
        let out = cuda::launch(s, l, "topk_collect", &args, self.len())?;
        Ok((out, Shape::from(self.len())))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CudaStorage, Layout};

    use super::super::ptx;
    use super::{blocks, THREADS};

    /// Launches `{kernel}_{f32,f16}(values, n, args.., out)` over a zeroed `[out_len]` u32
    /// output.
    pub(super) fn launch(
        s: &CudaStorage,
        l: &Layout,
        kernel: &str,
        args: &[u32],
        out_len: usize,
    ) -> candle_core::Result<CudaStorage> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("{kernel}: values must be contiguous");
        };
        let dev = &s.device;
        let n = (end - start) as u32;
        let out = dev.alloc_zeros::<u32>(out_len)?;
        let config = LaunchConfig {
            grid_dim: (blocks(n), 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! run {
            ($values:expr, $suffix:literal) => {{
                let name = format!("{kernel}_{}", $suffix);
                let func = dev.get_or_load_custom_func(&name, "drape_topk", ptx::TOPK)?;
                let values = $values.slice(start..end);
                let mut b = func.builder();
                b.arg(&values);
                b.arg(&n);
                for a in args {
                    b.arg(a);
                }
                b.arg(&out);
                // SAFETY: the arguments match `{kernel}_*` in kernels/topk.cu, `values` holds
                // `n` elements and `out` the `out_len` words the kernel may write.
                unsafe { b.launch(config) }.w()?;
            }};
        }
        match &s.slice {
            CudaStorageSlice::F32(v) => run!(v, "f32"),
            CudaStorageSlice::F16(v) => run!(v, "f16"),
            _ => candle_core::bail!("{kernel}: values must be f32 or f16, got {:?}", s.dtype()),
        }
        Ok(CudaStorage {
            slice: CudaStorageSlice::U32(out),
            device: dev.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::TestRng;

    /// The reference: a full sort by value, ties by index.
    fn sorted_top(values: &[f32], n: usize) -> TopN {
        let mut idx: Vec<u32> = (0..values.len() as u32).collect();
        idx.sort_by(|&a, &b| {
            values[b as usize]
                .total_cmp(&values[a as usize])
                .then(a.cmp(&b))
        });
        idx.truncate(n);
        TopN {
            values: idx.iter().map(|&i| values[i as usize]).collect(),
            indices: idx,
        }
    }

    fn check(values: Vec<f32>, n: usize) {
        let want = sorted_top(&values, n);
        let t = Tensor::from_vec(values.clone(), values.len(), &Device::Cpu).unwrap();
        let got = top_n(&t, n).unwrap();
        assert_eq!(got.indices, want.indices, "n={n} of {}", values.len());
        // Bit-exact, including the sign of zero.
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got.values), bits(&want.values));
    }

    #[test]
    fn keys_sort_like_total_cmp_and_round_trip() {
        let v = [
            f32::NEG_INFINITY,
            -3.5,
            -f32::MIN_POSITIVE,
            -0.0,
            0.0,
            1e-40,
            2.0,
            f32::INFINITY,
        ];
        for w in v.windows(2) {
            assert!(order_key(w[0]) < order_key(w[1]), "{w:?}");
        }
        for x in v {
            assert_eq!(from_key(order_key(x)).to_bits(), x.to_bits());
        }
    }

    #[test]
    fn matches_a_full_sort() {
        // Logits spread over several binades, both signs.
        let mut rng = TestRng::new(1);
        let values: Vec<f32> = (0..50_000).map(|_| rng.unit() * 40.0 - 25.0).collect();
        for n in [1, 7, 1000, 2000, 49_999, 50_000, 60_000] {
            check(values.clone(), n);
        }
    }

    #[test]
    fn ties_at_the_threshold_go_to_the_lowest_indices() {
        // Logits quantised as f16 is: only 9 distinct values, so the threshold is shared by
        // thousands of entries.
        let values: Vec<f32> = (0..10_000).map(|i| ((i * 7919) % 9) as f32 - 4.0).collect();
        for n in [1, 1000, 1111, 1112, 5000] {
            check(values.clone(), n);
        }
        check(vec![0.5; 3000], 1000);
        check(vec![-0.0, 0.0, -0.0, 0.0], 3);
    }

    #[test]
    fn the_cuda_kernels_select_what_the_cpu_ops_do() {
        use super::super::kernel_emu::{self, Values};
        use half::f16;

        let mut rng = TestRng::new(2);
        // Spread values; then a few distinct ones, so thresholds are shared and ties decide.
        let spread: Vec<f32> = (0..300_000).map(|_| rng.unit() * 168.0 - 80.0).collect();
        let few: Vec<f32> = (0..20_000)
            .map(|_| (rng.unit() * 7.0).floor() - 3.0)
            .collect();
        for (seed, raw) in [&spread[..1], &spread[..300], &spread[..], &few[..]]
            .into_iter()
            .enumerate()
        {
            let len = raw.len();
            let halves: Vec<f16> = raw.iter().map(|&v| f16::from_f32(v)).collect();
            let widened: Vec<f32> = halves.iter().map(|h| h.to_f32()).collect();
            for (values, reference) in [(Values::F32(raw), raw), (Values::F16(&halves), &widened)] {
                let grid = blocks(len as u32);
                for n in [1, 1000, len] {
                    let cpu = Tensor::from_slice(reference, len, &Device::Cpu).unwrap();
                    let want = top_n(&cpu, n).unwrap();
                    let got = select(
                        len,
                        n.min(len),
                        |op| {
                            let mut hist = vec![0; 1 << op.bits];
                            let args = [op.prefix, op.prefix_shift, op.shift, op.bits];
                            let seed = seed as u64;
                            kernel_emu::topk_histogram(
                                &values, len as u32, args, &mut hist, grid, seed,
                            );
                            Ok(hist)
                        },
                        |op| {
                            let mut out = vec![0; op.len()];
                            let args = [op.threshold, op.above, op.equal];
                            let launch = (grid, THREADS);
                            kernel_emu::topk_collect(
                                &values, len as u32, args, &mut out, launch, 7,
                            );
                            Ok(out)
                        },
                    )
                    .unwrap();
                    assert_eq!(got, want, "{len} values, n={n}");
                }
            }
        }
    }

    #[test]
    fn collect_reports_what_it_found() {
        let t = Tensor::new(&[1f32, 3.0, 3.0, 2.0], &Device::Cpu).unwrap();
        // Told of one key above 2.0 and none equal, it finds two above and one equal, writes
        // only what fits, and says so.
        let op = Collect {
            threshold: order_key(2.0),
            above: 1,
            equal: 0,
        };
        let out: Vec<u32> = t.apply_op1_no_bwd(&op).unwrap().to_vec1().unwrap();
        assert_eq!(out, vec![2, 1, order_key(3.0), 1]);
    }

    #[test]
    fn small_and_empty_inputs() {
        check(vec![3.0, -1.0, 2.0], 5);
        check(vec![f32::NEG_INFINITY, f32::INFINITY], 1);
        let empty = Tensor::zeros(0, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(top_n(&empty, 10).unwrap(), TopN::default());
        let one = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        assert_eq!(top_n(&one, 0).unwrap(), TopN::default());
    }
}
