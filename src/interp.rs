//! Linear interpolation taps shared by the input resize ([`crate::model::transform`]) and the
//! mask paste ([`crate::postprocess`]): both mirror torch's bilinear `interpolate`.

/// One axis of torch's `upsample_bilinear2d(align_corners=False)` with no explicit scale:
/// source index `max((dst + 0.5) * in / out - 0.5, 0)`, its floor, the next index (clamped)
/// and the weight of that next index.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LinearTap {
    pub i0: usize,
    pub i1: usize,
    pub l1: f32,
}

pub(crate) fn linear_taps(input: usize, output: usize) -> impl Iterator<Item = LinearTap> {
    let scale = input as f32 / output as f32;
    (0..output).map(move |d| {
        let src = (scale * (d as f32 + 0.5) - 0.5).max(0.0);
        let i0 = src as usize;
        let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
        LinearTap {
            i0,
            i1,
            l1: (src - i0 as f32).clamp(0.0, 1.0),
        }
    })
}
