//! CUDA against the CPU reference and torchvision's fixtures. Built only with `--features cuda`
//! and meant for a machine with an NVIDIA GPU (`.ci/gpu-verify` runs it): without a CUDA device
//! every test fails and says so, rather than passing without having run anything.
//!
//! Tolerances: the kernels are checked in f32 against the CPU kernels (RoIAlign within 1e-5 of
//! the output's scale; top-n and paste exactly, since they compare and threshold in the same
//! order and build.rs compiles without fused multiply-adds), and on f16 inputs against the CPU
//! run on the same f16-rounded values (top-n exactly; RoIAlign within 2e-3, one f16 rounding of
//! the output). The f16 backbone and FPN stay within 5% of the f32 CPU features' scale. End to
//! end the GPU computes in f16, so the fixtures' matcher (same class, box
//! IoU >= 0.98, score within 0.01, mask IoU >= 0.95) must match at least 90% of torchvision's
//! instances (f32 on the CPU matches all of them, tests/parity.rs). The full-size ResNet-50-FPN
//! layout (random weights) in f16 must match at least 95% of the CPU's own f32 instances, and the
//! pool's measured peak for one frame must stay within `inspect --plan`'s figure.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use drape::device::{DeviceSpec, GpuOptions};
use drape::model::roi_align::RoiAlign;
use drape::model::roi_heads::{Detection, MASK_SIZE};
use drape::model::topk::top_n;
use drape::postprocess::{Instance, Postprocessor};
use drape::MaskRcnn;

fn cuda() -> Device {
    "cuda"
        .parse::<DeviceSpec>()
        .unwrap()
        .open(GpuOptions::default())
        .unwrap_or_else(|e| panic!("these tests need a CUDA GPU: {e}"))
}

fn f16_rounded(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

#[test]
fn top_n_matches_the_cpu() {
    let gpu = cuda();
    // P2's anchor count at 800x1067, logits over several binades.
    let values: Vec<f32> = noise(160_800, 7).iter().map(|v| v * 30.0 - 20.0).collect();
    let cpu = Tensor::from_vec(values, 160_800, &Device::Cpu).unwrap();
    for n in [1, 1000, 2000, 160_800] {
        let want = top_n(&cpu, n).unwrap();
        let got = top_n(&cpu.to_device(&gpu).unwrap(), n).unwrap();
        assert_eq!(got, want, "f32, n={n}");
        // f16 has few distinct values, so the threshold is shared: ties by index.
        let want = top_n(&f16_rounded(&cpu), n).unwrap();
        let half = cpu.to_dtype(DType::F16).unwrap().to_device(&gpu).unwrap();
        assert_eq!(top_n(&half, n).unwrap(), want, "f16, n={n}");
    }
}

#[test]
fn roi_align_matches_the_cpu() {
    let gpu = cuda();
    let (c, h, w) = (8, 50, 61);
    let features = Tensor::from_vec(noise(2 * c * h * w, 11), (2, c, h, w), &Device::Cpu).unwrap();
    // Inside, across every edge, degenerate, and on the second image.
    let rois: Vec<f32> = vec![
        0.0, 10.0, 12.0, 180.0, 150.0, //
        0.0, -30.0, -20.0, 40.0, 30.0, //
        1.0, 200.0, 150.0, 260.0, 230.0, //
        1.0, 50.0, 50.0, 50.0, 50.0, //
        0.0, 3.5, 7.25, 9.0, 8.0,
    ];
    let rois = Tensor::from_vec(rois, (5, 5), &Device::Cpu).unwrap();
    for (sampling_ratio, aligned) in [(2, false), (0, false), (0, true)] {
        let op = RoiAlign {
            output_size: (7, 7),
            spatial_scale: 0.25,
            sampling_ratio,
            aligned,
        };
        let on_gpu = |f: &Tensor| {
            let out = op
                .apply(&f.to_device(&gpu).unwrap(), &rois.to_device(&gpu).unwrap())
                .unwrap();
            to_vec(&out.to_dtype(DType::F32).unwrap())
        };
        let want = to_vec(&op.apply(&features, &rois).unwrap());
        let err = scaled_error(&on_gpu(&features), &want);
        assert!(err <= 1e-5, "f32 {sampling_ratio} {aligned}: {err}");
        let rounded = f16_rounded(&features);
        let want = to_vec(&op.apply(&rounded, &rois).unwrap());
        let err = scaled_error(&on_gpu(&features.to_dtype(DType::F16).unwrap()), &want);
        assert!(err <= 2e-3, "f16 {sampling_ratio} {aligned}: {err}");
    }
}

#[test]
fn paste_matches_the_cpu() {
    let gpu = cuda();
    let raw = noise(400, 5);
    let detections: Vec<Detection> = (0..100)
        .map(|i| {
            // Some boxes run off the frame's edges.
            let (x, y) = (raw[i] * 700.0 - 40.0, raw[i + 100] * 500.0 - 30.0);
            Detection {
                bbox: [
                    x,
                    y,
                    x + 4.0 + raw[i + 200] * 300.0,
                    y + 4.0 + raw[i + 300] * 200.0,
                ],
                score: 0.9,
                label: 1,
            }
        })
        .collect();
    let probs = Tensor::from_vec(
        noise(100 * MASK_SIZE * MASK_SIZE, 3),
        (100, MASK_SIZE, MASK_SIZE),
        &Device::Cpu,
    )
    .unwrap();
    let paste = |probs: &Tensor| {
        let mut out: Vec<Instance> = Vec::new();
        Postprocessor::new()
            .paste_into(
                &detections,
                Some(probs),
                ((480, 640), (720, 960)),
                0.5,
                &mut out,
            )
            .unwrap();
        out.into_iter().map(|i| i.mask.unwrap()).collect::<Vec<_>>()
    };
    let want = paste(&probs);
    let got = paste(&probs.to_device(&gpu).unwrap());
    let differing = want.iter().zip(&got).filter(|(a, b)| a != b).count();
    assert_eq!(differing, 0, "{differing} of 100 masks differ");
}

#[test]
fn f16_features_stay_close_to_the_cpu() {
    let gpu = cuda();
    for model in ["tiny_r50", "tiny_r18", "tiny_r101", "tiny_v2"] {
        let path = fixtures().join(model).join("model.safetensors");
        let features = |device: &Device| {
            let m = MaskRcnn::load(&path, |_| {}, device).unwrap();
            let im = fixture_image("landscape");
            let batch = m
                .preprocess(im.as_raw(), (im.height() as usize, im.width() as usize))
                .unwrap();
            let c = m.backbone.forward(&batch.tensor).unwrap();
            m.fpn.forward(&c).unwrap()
        };
        let (cpu, on_gpu) = (features(&Device::Cpu), features(&gpu));
        for (level, (c, g)) in cpu.iter().zip(&on_gpu).enumerate() {
            let err = scaled_error(&to_vec(&g.to_dtype(DType::F32).unwrap()), &to_vec(c));
            println!("{model} FPN level {level}: f16 scaled error {err:e}");
            // f16 keeps 11 significant bits; a few dozen layers of rounding stay within 5%.
            assert!(err <= 5e-2, "{model} FPN level {level}: {err:e}");
        }
    }
}

#[test]
fn tiny_models_match_torchvision_in_f16() {
    let gpu = cuda();
    for model in ["tiny_r50", "tiny_r18", "tiny_r101", "tiny_v2"] {
        let path = fixtures().join(model).join("model.safetensors");
        let m = MaskRcnn::load(&path, |_| {}, &gpu).unwrap();
        for img in ["landscape", "portrait", "odd"] {
            let im = fixture_image(img);
            let result = m
                .detect(im.as_raw(), (im.height() as usize, im.width() as usize))
                .unwrap();
            let reference = load_final(&fixtures().join(model).join(format!("{img}.json")));
            let ours = candidates(&result);
            let report = match_instances(&reference, &ours);
            println!("{model}/{img} f16 on CUDA: {report:?}");
            assert!(
                report.matched * 10 >= report.reference * 9,
                "{model}/{img}: {report:?}"
            );
        }
    }
}

/// The full-size ResNet-50-FPN layout with random weights, written to `dir`.
fn random_r50(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("r50.safetensors");
    drape::synthetic::write_random_weights(
        &path,
        &drape::synthetic::SyntheticSpec::resnet50_fpn(),
        1,
    )
    .unwrap();
    path
}

#[test]
fn full_size_r50_in_f16_matches_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let path = random_r50(dir.path());
    let sizes = |c: &mut drape::Config| {
        c.min_size = 800;
        c.max_size = 1333;
    };
    let cpu = MaskRcnn::load(&path, sizes, &Device::Cpu).unwrap();
    let gpu = MaskRcnn::load(&path, sizes, &cuda()).unwrap();
    let im = fixture_image("landscape");
    let size = (im.height() as usize, im.width() as usize);
    let want = cpu.detect(im.as_raw(), size).unwrap();
    let reference: FinalJson = serde_json::from_value(drape::output::to_json(
        cpu.labels(),
        &want,
        Default::default(),
    ))
    .unwrap();
    let ours = candidates(&gpu.detect(im.as_raw(), size).unwrap());
    let report = match_instances(&reference, &ours);
    println!("full-size R50 at 800/1333, f16 on CUDA vs f32 on the CPU: {report:?}");
    assert!(report.reference > 0, "the CPU found nothing to match");
    assert!(report.matched * 100 >= report.reference * 95, "{report:?}");
}

#[test]
fn one_frames_pool_peak_stays_within_the_plan() {
    use drape::inspect::{inspect, PlanRequest};
    use drape::model::plan::PlanTarget;

    let dir = tempfile::tempdir().unwrap();
    let path = random_r50(dir.path());
    let gpu = cuda();
    let im = fixture_image("landscape");
    let size = (im.height() as usize, im.width() as usize);
    for (min_size, max_size) in [(512, 853), (800, 1333)] {
        let request = PlanRequest {
            target: PlanTarget::Cuda,
            min_size: Some(min_size),
            max_size: Some(max_size),
        };
        let plan = inspect(&path, Some(request)).unwrap().plan.unwrap();
        // Score threshold 0: every proposal and 100 detections reach the heads, as planned.
        let m = MaskRcnn::load(
            &path,
            |c| {
                c.min_size = min_size;
                c.max_size = max_size;
                c.box_score_thresh = 0.0;
            },
            &gpu,
        )
        .unwrap();
        m.detect(im.as_raw(), size).unwrap();
        drape::device::reset_memory_peak(&gpu).unwrap();
        m.detect(im.as_raw(), size).unwrap();
        let peak_mb = drape::device::memory(&gpu)
            .and_then(|m| m.pool_peak_mb)
            .expect("a stream-ordered pool");
        let plan_mb = plan.peak_device_bytes as f64 / (1024.0 * 1024.0);
        println!("{min_size}/{max_size}: pool peak {peak_mb:.1} MiB, plan {plan_mb:.1} MiB");
        assert!(
            peak_mb <= plan_mb,
            "{min_size}/{max_size}: {peak_mb} > {plan_mb}"
        );
    }
}
