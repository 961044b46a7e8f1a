//! The GPU path's plan, checked on the CPU: the host round trips a frame makes (counted through
//! the same code paths on every backend), and the GPU convolution's composition of candle ops
//! run on the CPU device against the CPU's own conv kernel.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use drape::device::{round_trips, RoundTrips};
use drape::model::conv::FusedConv;
use drape::model::gpu_conv::DeviceConv;
use drape::model::{Detections, Workspace};

/// One frame's round trips on the tiny model, which finds instances in the landscape photo.
fn frame_round_trips(model: &drape::MaskRcnn) -> (RoundTrips, Detections) {
    let image = fixture_image("landscape");
    let size = (image.height() as usize, image.width() as usize);
    let mut out = Detections::default();
    let before = round_trips();
    model
        .detect_into(
            image.as_raw(),
            size,
            model.default_settings(),
            &mut Workspace::default(),
            &mut out,
        )
        .unwrap();
    (before.since(round_trips()), out)
}

#[test]
fn a_frame_reads_back_seven_times_and_synchronises_only_when_asked() {
    let mut model = tiny_model();
    let (trips, out) = frame_round_trips(&model);
    assert!(out.masked > 0, "the frame must reach the mask stage");
    // RPN: three histogram passes and the collect for all levels at once, then one read of
    // the winners' deltas; the box head's logits and regression together; the mask pixels.
    assert_eq!(trips, RoundTrips { reads: 7, syncs: 0 });
    model.set_sync_stages(true);
    let (trips, _) = frame_round_trips(&model);
    // preprocess, backbone, fpn, rpn, box roi_align, box head, mask roi_align, mask head,
    // paste.
    assert_eq!(trips, RoundTrips { reads: 7, syncs: 9 });
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u32) -> Vec<f32> {
    noise(n, seed).iter().map(|v| 2.0 * v - 1.0).collect()
}

#[test]
fn the_gpu_conv_composition_matches_the_cpu_conv() {
    // (batch, in, out, h, w, kernel, stride, padding): odd sizes, 1/3/7 kernels, strides 1
    // and 2, with and without padding, batches as the RoI heads run them.
    let cases = [
        (1, 5, 7, 13, 11, 1, 1, 0),
        (2, 6, 4, 9, 7, 1, 1, 0),
        (1, 5, 6, 13, 11, 1, 2, 0),
        (1, 4, 6, 15, 9, 3, 1, 1),
        (3, 4, 5, 7, 7, 3, 1, 1),
        (1, 4, 6, 15, 10, 3, 2, 1),
        (1, 3, 4, 12, 13, 3, 1, 0),
        (1, 3, 4, 12, 13, 3, 2, 0),
        (1, 3, 8, 23, 17, 7, 2, 3),
        (1, 3, 5, 9, 11, 7, 1, 0),
        (1, 2, 3, 5, 6, 7, 1, 3),
    ];
    let mut wrong = Vec::new();
    for (i, &(n, c, o, h, w, k, s, p)) in cases.iter().enumerate() {
        let seed = i as u32 * 3;
        let weight = values(o * c * k * k, seed + 1);
        let bias = values(o, seed + 2);
        let x =
            Tensor::from_vec(values(n * c * h * w, seed + 3), (n, c, h, w), &Device::Cpu).unwrap();
        let cpu = FusedConv::new(weight.clone(), bias.clone(), c, o, (k, s, p));
        let want: Vec<f32> = x
            .apply_op1_no_bwd(&cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let wt = Tensor::from_vec(weight, (o, c, k, k), &Device::Cpu).unwrap();
        let bt = Tensor::from_vec(bias, o, &Device::Cpu).unwrap();
        let conv = DeviceConv::new(&wt, &bt, s, p).unwrap();
        // The default budget (one tile here), then one output row per tile.
        for (budget, conv) in [
            ("default", conv.clone()),
            ("1 row", conv.with_scratch_bytes(1)),
        ] {
            let y = conv.forward(&x).unwrap();
            let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            if got.len() != want.len() || err > 1e-5 {
                wrong.push(format!(
                    "case {i} {:?} ({budget}): {} values vs {}, max error {err:e}",
                    cases[i],
                    got.len(),
                    want.len()
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn the_gpu_conv_computes_in_f16_within_f16_rounding() {
    // The dtype GPUs run it in: the same composition on f16 tensors, against the f32 CPU conv.
    let (n, c, o, h, w) = (1, 8, 4, 11, 9);
    let weight = values(o * c * 9, 7);
    let bias = values(o, 8);
    let x = Tensor::from_vec(values(n * c * h * w, 9), (n, c, h, w), &Device::Cpu).unwrap();
    let want: Vec<f32> = x
        .apply_op1_no_bwd(&FusedConv::new(
            weight.clone(),
            bias.clone(),
            c,
            o,
            (3, 2, 1),
        ))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let half = |t: Tensor| t.to_dtype(DType::F16).unwrap();
    let wt = half(Tensor::from_vec(weight, (o, c, 3, 3), &Device::Cpu).unwrap());
    let bt = half(Tensor::from_vec(bias, o, &Device::Cpu).unwrap());
    let conv = DeviceConv::new(&wt, &bt, 2, 1)
        .unwrap()
        .with_scratch_bytes(1);
    let got: Vec<f32> = conv
        .forward(&half(x))
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    // 72 products of values in [-1, 1), each input rounded to f16 (2^-11 relative).
    assert!(err < 0.05, "max error {err}");
}
