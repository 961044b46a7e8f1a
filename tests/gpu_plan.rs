//! The GPU path's plan, checked on the CPU: the host round trips a frame makes (counted through
//! the same code paths on every backend), and the GPU convolution's composition of candle ops
//! run on the CPU device against the CPU's own conv kernel.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use drape::device::{round_trips, RoundTrips};
use drape::inspect::{inspect, PlanRequest};
use drape::model::conv::FusedConv;
use drape::model::gpu_conv::{DeviceConv, SCRATCH_BYTES};
use drape::model::plan::{DevicePlan, PlanTarget};
use drape::postprocess::{Detections, Detector};
use drape::synthetic::SyntheticSpec;

/// One frame's round trips on the tiny model, which finds instances in the landscape photo.
fn frame_round_trips(model: &drape::MaskRcnn) -> (RoundTrips, Detections) {
    let image = fixture_image("landscape");
    let size = (image.height() as usize, image.width() as usize);
    let mut out = Detections::default();
    let before = round_trips();
    Detector::default()
        .run(
            model,
            image.as_raw(),
            size,
            model.default_settings(),
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
    // preprocess, backbone, fpn, rpn, box roi_align, box head, mask roi_align, mask head (the
    // paste that follows times itself: its read of the pixels waits for the device anyway).
    assert_eq!(trips, RoundTrips { reads: 7, syncs: 8 });
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

/// The full-size ResNet-50-FPN layout with random weights, its plan at `sizes`.
fn r50_plans(sizes: &[(usize, usize)]) -> Vec<DevicePlan> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r50.safetensors");
    drape::synthetic::write_random_weights(&path, &SyntheticSpec::resnet50_fpn(), 1).unwrap();
    sizes
        .iter()
        .map(|&(min_size, max_size)| {
            let request = PlanRequest {
                target: PlanTarget::Cuda,
                min_size: Some(min_size),
                max_size: Some(max_size),
            };
            inspect(&path, Some(request)).unwrap().plan.unwrap()
        })
        .collect()
}

#[test]
fn the_full_r50_plans_under_a_gib_at_800_and_far_less_at_512() {
    const MIB: u64 = 1 << 20;
    let plans = r50_plans(&[(800, 1333), (512, 853)]);
    let (full, small) = (&plans[0], &plans[1]);
    for p in &plans {
        eprintln!(
            "plan {:?}: peak {:.1} MiB at {}, weights {:.1} MiB, largest scratch {:.1} MiB at {}",
            p.input_size,
            p.peak_device_bytes as f64 / MIB as f64,
            p.peak_at,
            p.weights_bytes as f64 / MIB as f64,
            p.largest_scratch_bytes as f64 / MIB as f64,
            p.largest_scratch_at
        );
    }
    assert_eq!(full.input_size, [1344, 800]);
    assert_eq!(small.input_size, [864, 512]);
    // 44.4M parameters after folding, in f16.
    assert!(
        (80 * MIB..95 * MIB).contains(&full.weights_bytes),
        "{full:?}"
    );
    assert!(full.peak_device_bytes < 1024 * MIB, "{full:?}");
    // The conv tiles stay within their budget (one row of the widest conv fits easily).
    assert!(
        full.largest_scratch_bytes <= SCRATCH_BYTES as u64,
        "{full:?}"
    );
    // Activations scale with the input; the weights do not.
    assert!(small.peak_device_bytes < full.peak_device_bytes);
    assert_eq!(small.weights_bytes, full.weights_bytes);
    assert!(full.f32_layers.is_empty());
}

/// A copy of the tiny model whose `layer1.0.bn2` has a gamma of 1e6 (stored as f32), so the
/// folded `layer1.0.conv2` weights reach far beyond f16's 65504.
fn beyond_f16_checkpoint(dir: &std::path::Path) -> std::path::PathBuf {
    let (mut tensors, meta) = read_safetensors(&tiny_weights());
    let gamma = stored_mut(&mut tensors, "backbone.body.layer1.0.bn2.weight");
    gamma.dtype = safetensors::Dtype::F32;
    gamma.data = (0..gamma.shape[0])
        .flat_map(|_| 1e6f32.to_le_bytes())
        .collect();
    let path = dir.join("beyond-f16.safetensors");
    write_safetensors(&path, &tensors, &meta);
    path
}

#[test]
fn a_layer_beyond_f16s_range_is_named_and_planned_in_f32() {
    let dir = tempfile::tempdir().unwrap();
    let path = beyond_f16_checkpoint(dir.path());
    let conv = "backbone.body.layer1.0.conv2";
    // Recorded on the CPU too; a GPU load keeps exactly these layers in f32.
    let model = drape::MaskRcnn::load(&path, |_| {}, &Device::Cpu).unwrap();
    assert_eq!(model.beyond_f16(), [conv]);
    let plan = |p: &std::path::Path| {
        let request = PlanRequest {
            target: PlanTarget::Cuda,
            min_size: None,
            max_size: None,
        };
        inspect(p, Some(request)).unwrap().plan.unwrap()
    };
    let crafted = plan(&path);
    let plain = plan(&fixtures().join("tiny_r50/model.safetensors"));
    assert_eq!(crafted.f32_layers, [conv]);
    assert!(plain.f32_layers.is_empty());
    // The layer's weight and bias take 4 bytes a value instead of 2.
    let w = drape::weights::Weights::open(&path).unwrap();
    let params: usize = [".weight"]
        .iter()
        .map(|leaf| {
            w.shape(&format!("{conv}{leaf}"))
                .unwrap()
                .iter()
                .product::<usize>()
        })
        .sum::<usize>()
        + w.shape("backbone.body.layer1.0.bn2.bias").unwrap()[0];
    assert_eq!(
        crafted.weights_bytes,
        plain.weights_bytes + 2 * params as u64
    );
}

#[test]
fn f16_range_is_what_rounds_to_a_finite_half() {
    use drape::model::layers::{fits_f16, F16_MAX};
    let cases = [
        (vec![0.0, -1.0, F16_MAX, -F16_MAX], true),
        // Rounds down to 65504.
        (vec![65519.0], true),
        (vec![65520.0], false),
        (vec![-1e6], false),
        (vec![f32::INFINITY], false),
        (vec![f32::NAN], false),
        (vec![], true),
    ];
    for (values, want) in cases {
        assert_eq!(fits_f16(&values), want, "{values:?}");
    }
    // Around the edge, and a bad value deep in a long slice: the cast's own verdict.
    let edge = 65520f32;
    for v in [
        f32::from_bits(edge.to_bits() - 1),
        edge,
        f32::from_bits(edge.to_bits() + 1),
        -f32::from_bits(edge.to_bits() - 1),
        -edge,
    ] {
        let want = half::f16::from_f32(v).is_finite();
        assert_eq!(fits_f16(&[v]), want, "{v}");
        let mut long = vec![1.0f32; 1000];
        long[777] = v;
        assert_eq!(fits_f16(&long), want, "{v} at 777 of 1000");
    }
}

#[test]
fn inspect_prints_the_plan_as_json_for_cuda_and_metal() {
    let weights = fixtures().join("tiny_r50/model.safetensors");
    let mut peaks = Vec::new();
    for target in ["cuda", "metal"] {
        let (json, _) = run_json(
            drape_command()
                .args([
                    "inspect",
                    "--plan",
                    target,
                    "--min-size",
                    "320",
                    "--max-size",
                    "480",
                ])
                .arg(&weights)
                .arg("--json"),
        );
        let plan = &json["plan"];
        assert_eq!(plan["target"], target);
        assert_eq!(plan["input_size"], serde_json::json!([480, 320]));
        let peak = plan["peak_device_bytes"].as_u64().unwrap();
        let scratch = plan["largest_scratch_bytes"].as_u64().unwrap();
        assert!(scratch > 0 && peak > scratch, "{plan}");
        peaks.push(peak);
    }
    // Metal pastes on the host: no device buffer of pasted pixels.
    assert!(peaks[1] <= peaks[0], "{peaks:?}");
    // Sizes belong to the plan.
    let out = drape_command()
        .args(["inspect", "--min-size", "320"])
        .arg(&weights)
        .output()
        .unwrap();
    assert!(!out.status.success());
}
