//! Criterion benches per stage and end to end for a full-size ResNet-50-FPN Mask R-CNN with
//! random weights written by `drape::synthetic` (nothing to download), on a 512×512 image at
//! min/max size 512 and at torchvision's default 800/1333 (upscaled to 800×800).
//! The score threshold is 0 so the mask head always runs on the full 100 detections.
//!
//! `cargo bench --bench stages` (each end-to-end sample takes seconds on a 2-core machine).

use std::time::Duration;

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion};
use drape::model::box_ops::Candidates;
use drape::model::rpn::RpnScratch;
use drape::postprocess::{Detections, Detector};
use drape::synthetic::{write_random_weights, SyntheticSpec};
use drape::MaskRcnn;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A smooth colour field: deterministic and with some structure for the RPN to rank.
fn image(size: usize) -> Vec<u8> {
    (0..size * size)
        .flat_map(|i| {
            let (y, x) = (i / size, i % size);
            [
                (x * 255 / size) as u8,
                (y * 255 / size) as u8,
                ((x ^ y) & 0xff) as u8,
            ]
        })
        .collect()
}

fn stages(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let weights = dir.path().join("r50.safetensors");
    write_random_weights(&weights, &SyntheticSpec::resnet50_fpn(), 1).expect("weights");
    let rgb = image(512);
    for (min_size, max_size) in [(512, 512), (800, 1333)] {
        let model = MaskRcnn::load(
            &weights,
            |cfg| {
                cfg.min_size = min_size;
                cfg.max_size = max_size;
                cfg.box_score_thresh = 0.0;
            },
            &Device::Cpu,
        )
        .expect("model");
        let mut group = c.benchmark_group(format!("r50_{min_size}"));
        group
            .sample_size(10)
            .measurement_time(Duration::from_secs(20));

        let batch = model.preprocess(&rgb, (512, 512)).expect("preprocess");
        let c5 = model.backbone.forward(&batch.tensor).expect("backbone");
        let features = model.fpn.forward(&c5).expect("fpn");
        let mut scratch = RpnScratch::default();
        let mut cand = Candidates::default();
        let mut proposals = Vec::new();
        let (size, padded) = (batch.image_size, batch.padded);
        model
            .rpn
            .forward(
                &features,
                size,
                padded,
                &mut scratch,
                &mut cand,
                &mut proposals,
            )
            .expect("rpn");
        let heads = &model.roi_heads;
        let pyramid = &features[..4];

        group.bench_function("preprocess", |b| {
            b.iter(|| model.preprocess(&rgb, (512, 512)).unwrap())
        });
        group.bench_function("backbone", |b| {
            b.iter(|| model.backbone.forward(&batch.tensor).unwrap())
        });
        group.bench_function("fpn", |b| b.iter(|| model.fpn.forward(&c5).unwrap()));
        group.bench_function("rpn", |b| {
            let mut out = Vec::new();
            b.iter(|| {
                model
                    .rpn
                    .forward(&features, size, padded, &mut scratch, &mut cand, &mut out)
                    .unwrap()
            })
        });
        group.bench_function("box_roi_align", |b| {
            b.iter(|| {
                heads
                    .box_roi_pool(pyramid, &proposals, batch.image_size)
                    .unwrap()
            })
        });
        let pooled = heads
            .box_roi_pool(pyramid, &proposals, batch.image_size)
            .unwrap();
        group.bench_function("box_head", |b| {
            b.iter(|| {
                heads
                    .box_predictor(&heads.box_head(&pooled).unwrap())
                    .unwrap()
            })
        });
        let (logits, regression) = heads
            .box_predictor(&heads.box_head(&pooled).unwrap())
            .unwrap();
        let mut detections = Vec::new();
        heads.postprocess_detections(
            &logits.flatten_all().unwrap().to_vec1().unwrap(),
            &regression.flatten_all().unwrap().to_vec1().unwrap(),
            &proposals,
            batch.image_size,
            &mut cand,
            &mut detections,
        );
        let boxes: Vec<_> = detections.iter().map(|d| d.bbox).collect();
        let labels: Vec<usize> = detections.iter().map(|d| d.label).collect();
        let mask_pooled = heads
            .mask_roi_pool(pyramid, &boxes, batch.image_size)
            .unwrap();
        group.bench_function("mask_head", |b| {
            b.iter(|| heads.mask_probs_from_pooled(&mask_pooled, &labels).unwrap())
        });
        let (mut detector, mut out) = (Detector::default(), Detections::default());
        let settings = model.default_settings();
        group.bench_function("end_to_end", |b| {
            b.iter(|| {
                detector
                    .run(&model, &rgb, (512, 512), settings, &mut out)
                    .unwrap()
            })
        });
        group.finish();
    }
}

criterion_group!(benches, stages);
criterion_main!(benches);
