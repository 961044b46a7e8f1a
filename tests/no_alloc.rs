//! The host side of the steady state allocates nothing: capture (replay and YUYV conversion),
//! the latest-frame hand-off, preprocessing, postprocessing (batched NMS, mask paste, RLE),
//! tracking and emitting, run over many frames from buffers that grew during warm-up.
//!
//! Its own test binary, with a counting global allocator and a single test, so nothing else
//! runs while it counts. candle's tensor ops allocate per op; `drape bench` reports that share
//! (`model_allocs_per_frame`) separately.

mod common;

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use drape::alloc::{counts, CountingAlloc};
use drape::capture::{self, Frame};
use drape::model::box_ops::Candidates;
use drape::model::roi_heads::{Detection, MASK_SIZE};
use drape::model::transform::{ResizeScratch, Transform};
use drape::pipeline::{LatestFrame, Take};
use drape::postprocess::{Detections, Postprocessor};
use drape::stream::{write_record, FrameRecord};
use drape::track::{EventKind, FrameTracks, Tracker};

#[global_allocator]
static GLOBAL: CountingAlloc<std::alloc::System> = CountingAlloc(std::alloc::System);

#[test]
fn steady_state_host_stages_do_not_allocate() {
    let model = common::tiny_model();
    let mut source = capture::open(&common::replay_frames(1000.0)).unwrap();
    let slot = LatestFrame::new(Frame::with_capacity(320, 240));
    let (mut back, mut front) = (
        Frame::with_capacity(320, 240),
        Frame::with_capacity(320, 240),
    );
    let transform = Transform::new(model.config());
    let (mut scratch, mut input) = (ResizeScratch::default(), Vec::new());

    // A camera's YUYV buffer for the conversion path.
    let yuyv: Vec<u8> = common::noise(320 * 240 * 2, 7)
        .iter()
        .map(|v| (v * 255.0) as u8)
        .collect();
    let mut rgb = vec![0u8; 320 * 240 * 3];

    // RPN-sized NMS input and a full set of detections with mask probabilities.
    let raw = common::noise(1000 * 5, 11);
    let mut candidates = Candidates::default();
    let detections: Vec<Detection> = (0..100)
        .map(|i| {
            let (x, y) = (raw[i] * 150.0, raw[i + 100] * 100.0);
            Detection {
                bbox: [
                    x,
                    y,
                    x + 20.0 + raw[i + 200] * 100.0,
                    y + 20.0 + raw[i + 300] * 80.0,
                ],
                score: 1.0 - i as f32 / 200.0,
                label: 1 + i % 46,
            }
        })
        .collect();
    let probs = Tensor::from_vec(
        common::noise(100 * MASK_SIZE * MASK_SIZE, 13),
        (100, MASK_SIZE, MASK_SIZE),
        &Device::Cpu,
    )
    .unwrap();
    let mut paster = Postprocessor::new();
    let mut result = Detections::default();
    let mut line = Vec::new();
    // Garments come and go: instances past the first 90 show up in some frames and not in
    // others, so tracks are born, confirmed, expire and their slots are reused. Frames are
    // 400 ms apart, so three missed frames outlast the default 1 s expiry.
    let mut tracker = Tracker::new(Default::default()).unwrap();
    let mut tracks = FrameTracks::default();
    let (t0, mut frame_no) = (Instant::now(), 0u64);
    let (mut started, mut ended) = (0usize, 0usize);

    // Allocations per stage, summed over the counted frames, so a failure names the stage.
    let mut per_stage = [
        ("capture", 0u64),
        ("hand-off", 0),
        ("yuyv", 0),
        ("preprocess", 0),
        ("nms", 0),
        ("paste+rle", 0),
        ("track", 0),
        ("emit", 0),
    ];
    let mut mark = counts().0;
    let mut tally = |stage: usize, per_stage: &mut [(&str, u64); 8]| {
        let now = counts().0;
        per_stage[stage].1 += now - mark;
        mark = now;
    };
    let mut frame_pass = |source: &mut Box<dyn capture::FrameSource>,
                          per_stage: &mut [(&str, u64); 8]| {
        tally(7, per_stage);
        source.next_frame(&mut back).unwrap();
        tally(0, per_stage);
        slot.publish(&mut back);
        assert!(matches!(
            slot.take(&mut front, Duration::from_secs(1)),
            Take::Frame
        ));
        tally(1, per_stage);
        capture::convert::yuyv_to_rgb(&yuyv, 320, 240, 640, &mut rgb);
        tally(2, per_stage);
        let g = transform
            .apply_into(
                &front.rgb,
                (front.height, front.width),
                (160, 224),
                &mut scratch,
                &mut input,
            )
            .unwrap();
        tally(3, per_stage);
        candidates.clear();
        for (i, r) in raw.chunks_exact(5).enumerate() {
            let (x, y) = (r[0] * 200.0, r[1] * 150.0);
            candidates.push(
                [x, y, x + 10.0 + r[2] * 60.0, y + 10.0 + r[3] * 60.0],
                r[4],
                i % 5,
            );
        }
        candidates.batched_nms(0.7);
        tally(4, per_stage);
        paster
            .paste_into(
                &detections,
                Some(&probs),
                (g.image_size, g.original),
                0.5,
                &mut result.instances,
            )
            .unwrap();
        tally(5, per_stage);
        frame_no += 1;
        let shown = 90 + (frame_no % 11) as usize;
        let now = t0 + Duration::from_millis(400 * frame_no);
        tracker.update(&result.instances[..shown], now, &mut tracks);
        for e in &tracks.events {
            match e.kind {
                EventKind::Started => started += 1,
                EventKind::Ended => ended += 1,
            }
        }
        tally(6, per_stage);
        result.width = front.width;
        result.height = front.height;
        let record = FrameRecord {
            labels: model.labels(),
            frame: &front,
            result: &result,
            tracks: &tracks,
            age_ms: 1.0,
            latency_ms: 2.0,
            budget_met: true,
            masks: Some(Default::default()),
        };
        write_record(&mut line, &record).unwrap();
    };

    let mut warmup = per_stage;
    // Three periods of the come-and-go pattern, so every track slot has held its largest mask.
    for _ in 0..33 {
        frame_pass(&mut source, &mut warmup);
    }
    let (before, bytes_before) = counts();
    const FRAMES: usize = 60;
    for _ in 0..FRAMES {
        frame_pass(&mut source, &mut per_stage);
    }
    let (after, bytes_after) = counts();
    assert_eq!(
        after - before,
        0,
        "{} allocations ({} bytes) over {FRAMES} frames: {per_stage:?}",
        after - before,
        bytes_after - bytes_before
    );
    // The work was real: masks were pasted and the line holds them.
    assert_eq!(result.instances.len(), 100);
    assert!(result.instances.iter().all(|i| i.mask.is_some()));
    assert!(line.len() > 1000);
    // ...and so was the tracking: garments beyond the first 90 started and ended repeatedly.
    assert!(
        started > 100 && ended > 30,
        "{started} started, {ended} ended"
    );
}
