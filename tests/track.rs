//! Garment tracks: ids follow garments across frames (mask IoU, class-gated, solved with the
//! Hungarian algorithm), tracks start once confirmed and end once expired in capture time, and
//! ids are never reused. Pure tracker logic on synthetic instances, then once end to end
//! through the bundled tiny model on a panning view of a fixture photo.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use drape::postprocess::Instance;
use drape::rle::Rle;
use drape::track::{EventKind, FrameTracks, TrackEvent, Tracker, TrackerConfig};

const H: usize = 120;
const W: usize = 160;

/// A garment: a filled rectangle of class `class_id` with its mask.
fn garment(class_id: usize, x: f32, y: f32, w: f32, h: f32, masked: bool) -> Instance {
    let (x0, y0) = (x.max(0.0) as usize, y.max(0.0) as usize);
    let (x1, y1) = (((x + w) as usize).min(W), ((y + h) as usize).min(H));
    let mut pixels = vec![0u8; H * W];
    for row in y0..y1 {
        pixels[row * W + x0..row * W + x1].fill(1);
    }
    Instance {
        class_id,
        score: 0.9,
        bbox: [x, y, x + w, y + h],
        mask: masked.then(|| Rle::encode(&pixels, H, W)),
    }
}

/// Feeds frames to a tracker at the given capture times and keeps what it said.
struct Run {
    tracker: Tracker,
    out: FrameTracks,
    t0: Instant,
    /// Per frame: the track id of each instance.
    ids: Vec<Vec<u64>>,
    events: Vec<TrackEvent>,
}

impl Run {
    fn new(config: TrackerConfig) -> Self {
        Self {
            tracker: Tracker::new(config).unwrap(),
            out: FrameTracks::default(),
            t0: Instant::now(),
            ids: Vec::new(),
            events: Vec::new(),
        }
    }

    fn frame(&mut self, at_ms: u64, instances: &[Instance]) -> &[u64] {
        let now = self.t0 + Duration::from_millis(at_ms);
        self.tracker.update(instances, now, &mut self.out);
        assert_eq!(self.out.instances.len(), instances.len());
        self.events.extend_from_slice(&self.out.events);
        self.ids
            .push(self.out.instances.iter().map(|t| t.track_id).collect());
        self.ids.last().unwrap()
    }

    fn count(&self, kind: EventKind) -> usize {
        self.events.iter().filter(|e| e.kind == kind).count()
    }
}

/// Every track starts at most once and ends at most once, and only after it started.
fn assert_events_well_formed(events: &[TrackEvent]) {
    let mut state: HashMap<u64, (usize, usize)> = HashMap::new();
    for e in events {
        let s = state.entry(e.track_id).or_default();
        match e.kind {
            EventKind::Started => {
                assert_eq!(s.0, 0, "track {} started twice", e.track_id);
                s.0 += 1;
            }
            EventKind::Ended => {
                assert_eq!((s.0, s.1), (1, 0), "track {} ended out of turn", e.track_id);
                s.1 += 1;
            }
        }
    }
}

#[test]
fn panning_garments_keep_their_ids() {
    let mut run = Run::new(TrackerConfig::default());
    // A jacket and trousers panning right 3 px per frame at 30 fps; a top panning left.
    for f in 0..40u64 {
        let dx = 3.0 * f as f32;
        let frame = [
            garment(1, 5.0 + dx, 10.0, 30.0, 40.0, true),
            garment(2, 5.0 + dx, 55.0, 30.0, 50.0, true),
            garment(3, 120.0 - dx, 20.0, 25.0, 30.0, true),
        ];
        run.frame(f * 33, &frame);
    }
    let first = run.ids[0].clone();
    assert_eq!(first.iter().collect::<HashSet<_>>().len(), 3);
    for (f, ids) in run.ids.iter().enumerate() {
        assert_eq!(ids, &first, "frame {f}");
    }
    assert_eq!(run.count(EventKind::Started), 3);
    assert_eq!(run.count(EventKind::Ended), 0);
    // Started on the confirming frame, not before.
    let confirmed_at = drape::track::CONFIRM_HITS as u64 - 1;
    assert!(run
        .events
        .iter()
        .all(|e| e.duration_ms == (confirmed_at * 33) as f64));
    assert!(run.tracker.live() == 3);
}

#[test]
fn a_garment_back_after_the_expiry_gets_a_new_id_and_within_it_keeps_its_own() {
    let config = TrackerConfig {
        max_age: Duration::from_millis(500),
        ..TrackerConfig::default()
    };
    let jacket = garment(1, 40.0, 20.0, 40.0, 60.0, true);
    // Gone for 400 ms (fewer than the expiry), then for 2 s.
    let mut run = Run::new(config);
    let mut t = 0;
    for _ in 0..5 {
        run.frame(t, std::slice::from_ref(&jacket));
        t += 100;
    }
    let id = run.ids[0][0];
    for _ in 0..3 {
        run.frame(t, &[]);
        t += 100;
    }
    assert_eq!(run.frame(t, std::slice::from_ref(&jacket)), &[id]);
    t += 2000;
    for _ in 0..4 {
        run.frame(t, std::slice::from_ref(&jacket));
        t += 100;
    }
    let new_id = *run.ids.last().unwrap().first().unwrap();
    assert!(new_id > id, "{new_id} after {id}");
    let ended: Vec<_> = run
        .events
        .iter()
        .filter(|e| e.kind == EventKind::Ended)
        .collect();
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].track_id, id);
    // Its lifetime: first to last sighting.
    assert_eq!(ended[0].duration_ms, 800.0);
    assert_eq!(ended[0].frames, 6);
    assert_eq!(run.count(EventKind::Started), 2);
    assert_events_well_formed(&run.events);
}

#[test]
fn expiry_follows_capture_time_not_frame_count() {
    // The same three missed frames: 100 ms apart keeps the track, 400 ms apart ends it.
    let jacket = garment(1, 40.0, 20.0, 40.0, 60.0, true);
    let outcome = |period: u64| {
        let mut run = Run::new(TrackerConfig::default());
        for f in 0..8 {
            let present = !(3..6).contains(&f);
            let frame = if present {
                vec![jacket.clone()]
            } else {
                vec![]
            };
            run.frame(f * period, &frame);
        }
        (run.ids[0][0] == run.ids[7][0], run.count(EventKind::Ended))
    };
    assert_eq!(outcome(100), (true, 0));
    assert_eq!(outcome(400), (false, 1));
}

#[test]
fn crossing_garments_of_different_classes_never_swap_ids() {
    let mut run = Run::new(TrackerConfig::default());
    // A skirt moving right and a bag moving left pass straight through each other: for
    // several frames each overlaps the other's last position more than its own would.
    let mut by_class: BTreeMap<usize, HashSet<u64>> = BTreeMap::new();
    for f in 0..30u64 {
        let x = 4.0 * f as f32;
        let frame = [
            garment(5, 4.0 + x, 40.0, 36.0, 36.0, f % 4 != 1),
            garment(9, 120.0 - x, 42.0, 36.0, 36.0, true),
        ];
        let ids = run.frame(f * 33, &frame).to_vec();
        for (inst, id) in frame.iter().zip(ids) {
            by_class.entry(inst.class_id).or_default().insert(id);
        }
    }
    assert_eq!(by_class[&5].len(), 1, "{by_class:?}");
    assert_eq!(by_class[&9].len(), 1, "{by_class:?}");
    assert_ne!(by_class[&5], by_class[&9]);
    assert_eq!(run.count(EventKind::Started), 2);
}

#[test]
fn same_class_neighbours_are_matched_optimally_not_greedily() {
    // Two shirts side by side drift right together. A greedy matcher taking the best pair
    // first can hand the left track to the right shirt; the optimum keeps both.
    let mut run = Run::new(TrackerConfig {
        min_iou: 0.1,
        ..TrackerConfig::default()
    });
    let a0 = garment(1, 10.0, 10.0, 40.0, 40.0, false);
    let b0 = garment(1, 40.0, 10.0, 40.0, 40.0, false);
    let first = run.frame(0, &[a0, b0]).to_vec();
    // Both moved 20 px right: the new left shirt overlaps old B best (IoU 0.75 vs 0.2), but
    // only the assignment left→A, right→B keeps both tracks going.
    let a1 = garment(1, 30.0, 10.0, 40.0, 40.0, false);
    let b1 = garment(1, 60.0, 10.0, 40.0, 40.0, false);
    let second = run.frame(33, &[a1, b1]).to_vec();
    // The total IoU of left→A, right→B beats left→B alone; every detection stays matched.
    assert!(
        second.iter().all(|id| first.contains(id)),
        "{first:?} → {second:?}"
    );
}

#[test]
fn noise_never_starts_a_track_and_ids_are_never_reused() {
    let mut run = Run::new(TrackerConfig::default());
    let jacket = garment(1, 40.0, 20.0, 40.0, 60.0, true);
    let mut seen = Vec::new();
    for f in 0..20u64 {
        // A flicker somewhere new every other frame.
        let mut frame = vec![jacket.clone()];
        if f % 2 == 0 {
            frame.push(garment(2, (f * 7 % 100) as f32, 90.0, 10.0, 10.0, true));
        }
        let ids = run.frame(f * 33, &frame).to_vec();
        if let Some(&flicker) = ids.get(1) {
            assert!(!seen.contains(&flicker), "id {flicker} reused");
            seen.push(flicker);
        }
    }
    assert_eq!(run.count(EventKind::Started), 1);
    assert_eq!(run.tracker.live(), 1);
    assert!(!seen.contains(&run.ids[0][0]));
}

#[test]
fn events_come_exactly_once_per_start_and_end_over_a_busy_scene() {
    // Six garments of three classes drift, vanish and return on their own schedules.
    let mut run = Run::new(TrackerConfig {
        max_age: Duration::from_millis(300),
        ..TrackerConfig::default()
    });
    let noise = common::noise(6 * 3, 5);
    for f in 0..200u64 {
        let mut frame = Vec::new();
        for g in 0..6usize {
            let period = 20 + 7 * g as u64;
            if (f + 3 * g as u64) % period < period * 2 / 3 {
                let x = 5.0 + noise[g] * 90.0 + (f % period) as f32;
                let y = 5.0 + noise[g + 6] * 60.0;
                frame.push(garment(1 + g % 3, x, y, 30.0, 40.0, g != 4));
            }
        }
        run.frame(f * 50, &frame);
    }
    assert_events_well_formed(&run.events);
    let started = run.count(EventKind::Started);
    let ended = run.count(EventKind::Ended);
    assert!(started > 12, "{started} tracks started");
    // Whatever has not ended is still live.
    let live_confirmed = started - ended;
    assert!(live_confirmed <= 6, "{live_confirmed}");
}

#[test]
fn a_panning_view_through_the_tiny_model_keeps_matched_garments_ids() {
    let model = drape::MaskRcnn::load(
        common::tiny_weights(),
        |cfg| cfg.box_score_thresh = 0.01,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let photo = common::fixture_image("landscape");
    let (pw, ph) = (photo.width() as usize, photo.height() as usize);
    // A window panning PAN px per frame across the photo.
    const PAN: usize = 2;
    const FRAMES: usize = 16;
    let (cw, ch) = (pw - PAN * FRAMES, ph);
    let mut tracker = Tracker::new(TrackerConfig::default()).unwrap();
    let mut out = FrameTracks::default();
    let t0 = Instant::now();
    let mut crop = vec![0u8; cw * ch * 3];
    let (mut isolated, mut started) = (0usize, 0usize);
    // The tracks the tracker can still match, as this test sees them: id → (class, last
    // mask, last frame seen, confirmed).
    let mut live: HashMap<u64, (usize, Vec<u8>, usize, bool)> = HashMap::new();
    for f in 0..FRAMES {
        let x0 = PAN * f;
        for y in 0..ch {
            let src = (y * pw + x0) * 3;
            crop[y * cw * 3..(y + 1) * cw * 3].copy_from_slice(&photo.as_raw()[src..src + cw * 3]);
        }
        let result = model.detect(&crop, (ch, cw)).unwrap();
        tracker.update(
            &result.instances,
            t0 + Duration::from_millis(33 * f as u64),
            &mut out,
        );
        started += out
            .events
            .iter()
            .filter(|e| e.kind == EventKind::Started)
            .count();
        // Tentative tracks die when missed once; confirmed ones live until the expiry.
        let max_age_frames = (TrackerConfig::default().max_age.as_millis() / 33) as usize;
        live.retain(|_, t| t.2 + 1 == f || (t.3 && f - t.2 <= max_age_frames));
        let now: Vec<(u64, usize, Vec<u8>)> = out
            .instances
            .iter()
            .zip(&result.instances)
            .map(|(t, i)| {
                let rle = i
                    .mask
                    .as_ref()
                    .expect("no budget: every instance is masked");
                let mask = common::decode_coco_rle(&rle.to_coco_string(), ch, cw);
                (t.track_id, i.class_id, mask)
            })
            .collect();
        let ids: HashSet<u64> = now.iter().map(|n| n.0).collect();
        assert_eq!(ids.len(), now.len(), "frame {f}: an id given twice");
        // Same-class mask IoU between this frame's detections and the live tracks, gated as
        // the tracker gates it. A pair that is the only candidate of both the detection and
        // the track must be in every optimal assignment, so the detection keeps that id.
        let gate = drape::track::MIN_IOU;
        let iou = |d: &(u64, usize, Vec<u8>), t: &(usize, Vec<u8>, usize, bool)| {
            if d.1 == t.0 {
                common::mask_iou(&d.2, &t.1)
            } else {
                0.0
            }
        };
        for d in &now {
            let candidates: Vec<_> = live.iter().filter(|(_, t)| iou(d, t) >= gate).collect();
            let [(&id, t)] = candidates[..] else { continue };
            if now.iter().filter(|o| iou(o, t) >= gate).count() == 1 {
                isolated += 1;
                assert_eq!(d.0, id, "frame {f}: a garment continuing alone changed id");
            }
        }
        for ((id, class, mask), t) in now.into_iter().zip(&out.instances) {
            live.insert(id, (class, mask, f, t.confirmed));
        }
    }
    assert!(
        isolated >= 20,
        "only {isolated} clearly continuing detections"
    );
    assert!(started > 0);
}

#[test]
fn the_smoothed_box_trails_the_raw_one_which_is_reported_unchanged() {
    let mut run = Run::new(TrackerConfig {
        box_ema: 0.5,
        ..TrackerConfig::default()
    });
    // A jacket jumping 8 px right per frame: the raw box follows at once, the smoothed one
    // moves half the remaining way each frame.
    let mut smoothed_x = Vec::new();
    for f in 0..4u64 {
        let jacket = garment(1, 10.0 + 8.0 * f as f32, 20.0, 40.0, 60.0, false);
        run.frame(f * 33, std::slice::from_ref(&jacket));
        let t = run.out.instances[0];
        // Still vertically, so only x moves.
        assert_eq!(
            (jacket.bbox[1], jacket.bbox[3]),
            (t.smoothed_box[1], t.smoothed_box[3])
        );
        assert_eq!(t.smoothed_box[2] - t.smoothed_box[0], 40.0);
        smoothed_x.push(t.smoothed_box[0]);
    }
    assert_eq!(smoothed_x, [10.0, 14.0, 20.0, 27.0]);
}
