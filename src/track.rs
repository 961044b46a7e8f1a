//! Garment tracks: one integer id per garment for as long as it stays in view, so the mirror's
//! app can keep a product card on "this jacket" instead of diffing unrelated lists.
//!
//! Each frame, detections are matched to live tracks of the same class (a garment never turns
//! into another class's track) by mask IoU where both sides have a mask and box IoU otherwise.
//! The match maximising total IoU is solved exactly with the Hungarian algorithm (Kuhn–Munkres
//! with potentials, O(n²m)), per class, since cross-class pairs are forbidden and the problem
//! splits into one block per class. Lifecycle as in SORT/DeepStream's tracker: a new track is
//! tentative until it has been matched `confirm_hits` frames in a row (a tentative track missed
//! once is dropped silently), then `started` is emitted; a confirmed track not seen for
//! `max_age` of capture time ends with `ended`. Ages are in time, not frames, because the
//! budget controller changes the frame rate. Ids count up from 1 and are never reused in a run.
//!
//! All buffers live in the tracker and grow only while the largest frame so far is seen, so the
//! steady state allocates nothing (the no-alloc test covers it).

use std::time::{Duration, Instant};

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};

use crate::error::{Error, Result};
use crate::labels::Labels;
use crate::model::box_ops::{self, Box};
use crate::postprocess::Instance;
use crate::rle::Rle;

/// A detection and a track overlap enough to be the same garment at this IoU.
pub const MIN_IOU: f32 = 0.3;
/// Consecutive matched frames before a track is confirmed and `started` is emitted.
pub const CONFIRM_HITS: u32 = 3;
/// A confirmed track unseen for this long (capture time) has ended.
pub const MAX_AGE: Duration = Duration::from_millis(1000);
/// Weight of the newest box in the smoothed box (1 = no smoothing).
pub const BOX_EMA_WEIGHT: f32 = 0.5;
/// Live tracks kept at most; beyond it the longest-unseen confirmed track is ended early.
pub const MAX_TRACKS: usize = 512;

/// How tracks are made, kept and ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrackerConfig {
    pub min_iou: f32,
    pub confirm_hits: u32,
    pub max_age: Duration,
    pub box_ema: f32,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            min_iou: MIN_IOU,
            confirm_hits: CONFIRM_HITS,
            max_age: MAX_AGE,
            box_ema: BOX_EMA_WEIGHT,
        }
    }
}

impl TrackerConfig {
    pub fn validate(&self) -> Result<()> {
        let unit = |v: f32| v > 0.0 && v <= 1.0;
        if !unit(self.min_iou) || !unit(self.box_ema) || self.confirm_hits == 0 {
            return Err(Error::Config(format!(
                "tracker: min IoU ({}) and box smoothing weight ({}) must be in (0, 1] and the \
                 confirmation count ({}) at least 1",
                self.min_iou, self.box_ema, self.confirm_hits
            )));
        }
        if self.max_age.is_zero() {
            return Err(Error::Config(
                "tracker: the track expiry must be positive".into(),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Started,
    Ended,
}

/// Why a track ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EndReason {
    /// Unseen for longer than the expiry.
    Expired,
    /// Ended early to make room: more live tracks than [`MAX_TRACKS`].
    Evicted,
}

/// A track starting (on confirmation) or ending, emitted exactly once each.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrackEvent {
    pub track_id: u64,
    pub kind: EventKind,
    pub class_id: usize,
    /// The last raw box of the track.
    pub bbox: Box,
    /// From the track's first sighting to now (started) or to its last sighting (ended).
    pub duration_ms: f64,
    /// Frames the track was matched in.
    pub frames: u32,
    pub reason: Option<EndReason>,
}

/// The track of one emitted instance, in the order of the instances.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InstanceTrack {
    pub track_id: u64,
    /// False while the track is tentative (no `started` event yet).
    pub confirmed: bool,
    /// The track's box, smoothed by an exponential moving average; the raw box stays `box`.
    pub smoothed_box: Box,
}

/// What the tracker says about one frame.
#[derive(Debug, Clone, Default)]
pub struct FrameTracks {
    pub instances: Vec<InstanceTrack>,
    pub events: Vec<TrackEvent>,
}

#[derive(Debug, Clone)]
struct Track {
    alive: bool,
    id: u64,
    class_id: usize,
    confirmed: bool,
    hits: u32,
    first_seen: Instant,
    last_seen: Instant,
    bbox: Box,
    smoothed: Box,
    /// The last mask, valid when `has_mask`; its buffer is reused by the next track in the slot.
    mask: Rle,
    mask_area: u64,
    has_mask: bool,
    /// Matched in the frame being processed.
    seen: bool,
}

/// Instance → slot of its track, for instances the association left unmatched.
const UNMATCHED: usize = usize::MAX;

/// The tracker of one run; feed it every processed frame in capture order.
#[derive(Debug)]
pub struct Tracker {
    config: TrackerConfig,
    tracks: Vec<Track>,
    next_id: u64,
    // Per-frame scratch, reused.
    slot_of: Vec<usize>,
    done: Vec<bool>,
    rows: Vec<usize>,
    cols: Vec<usize>,
    weights: Vec<f32>,
    cost: Vec<f64>,
    assign: Vec<usize>,
    hungarian: Hungarian,
    /// The most runs a stored mask has had: a slot's mask buffer is made at least this large,
    /// so each grows at most once after the largest mask has been seen.
    most_runs: usize,
}

/// Events one frame can make at most: every track ends, and as many start in the freed slots.
const MAX_EVENTS: usize = 2 * MAX_TRACKS;

impl Tracker {
    pub fn new(config: TrackerConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            // Bounded, so reserved whole: a busy frame never grows them mid-run.
            tracks: Vec::with_capacity(MAX_TRACKS),
            next_id: 1,
            slot_of: Vec::new(),
            done: Vec::new(),
            rows: Vec::new(),
            cols: Vec::new(),
            weights: Vec::new(),
            cost: Vec::new(),
            assign: Vec::new(),
            hungarian: Hungarian::default(),
            most_runs: 0,
        })
    }

    pub fn config(&self) -> &TrackerConfig {
        &self.config
    }

    /// Live tracks, tentative ones included.
    pub fn live(&self) -> usize {
        self.tracks.iter().filter(|t| t.alive).count()
    }

    /// Associates `instances`, captured at `now`, with the live tracks and writes each
    /// instance's track and this frame's events to `out`.
    pub fn update(&mut self, instances: &[Instance], now: Instant, out: &mut FrameTracks) {
        out.instances.clear();
        out.events.clear();
        out.events.reserve(MAX_EVENTS);
        out.instances.reserve(instances.len());
        let max_age = self.config.max_age;
        for t in self.tracks.iter_mut().filter(|t| t.alive) {
            t.seen = false;
            if t.confirmed && now.saturating_duration_since(t.last_seen) > max_age {
                out.events.push(end(t, EndReason::Expired));
            }
        }
        self.associate(instances);
        // A tentative track missed once was noise (or lost before it proved itself).
        for t in self.tracks.iter_mut() {
            if t.alive && !t.seen && !t.confirmed {
                t.alive = false;
            }
        }
        for (i, inst) in instances.iter().enumerate() {
            let slot = match self.slot_of[i] {
                UNMATCHED => self.spawn(inst, now, out),
                s => {
                    self.refresh(s, inst, now, out);
                    Some(s)
                }
            };
            out.instances.push(match slot {
                Some(s) => {
                    let t = &self.tracks[s];
                    InstanceTrack {
                        track_id: t.id,
                        confirmed: t.confirmed,
                        smoothed_box: t.smoothed,
                    }
                }
                // Every slot is held by a track matched in this very frame: this instance
                // gets an id of its own that no later frame will see again.
                None => {
                    tracing::warn!(
                        max = MAX_TRACKS,
                        "tracker full: instance left untracked this frame"
                    );
                    InstanceTrack {
                        track_id: self.take_id(),
                        confirmed: false,
                        smoothed_box: inst.bbox,
                    }
                }
            });
        }
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Fills `slot_of` with each instance's matched track slot, class by class.
    fn associate(&mut self, instances: &[Instance]) {
        let n = instances.len();
        self.slot_of.clear();
        self.slot_of.resize(n, UNMATCHED);
        self.done.clear();
        self.done.resize(n, false);
        for first in 0..n {
            if self.done[first] {
                continue;
            }
            let class = instances[first].class_id;
            self.rows.clear();
            for (i, inst) in instances.iter().enumerate().skip(first) {
                if inst.class_id == class {
                    self.done[i] = true;
                    self.rows.push(i);
                }
            }
            self.cols.clear();
            self.cols.extend(
                self.tracks
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| t.alive && t.class_id == class)
                    .map(|(s, _)| s),
            );
            if self.cols.is_empty() {
                continue;
            }
            let (r, c) = (self.rows.len(), self.cols.len());
            self.weights.clear();
            for &i in &self.rows {
                for &s in &self.cols {
                    self.weights
                        .push(similarity(&instances[i], &self.tracks[s]));
                }
            }
            // Kuhn–Munkres wants no more rows than columns: transpose when needed. Weights
            // below the gate count as zero, the same as leaving the pair unmatched.
            let transpose = r > c;
            let (n_rows, n_cols) = if transpose { (c, r) } else { (r, c) };
            self.cost.clear();
            for a in 0..n_rows {
                for b in 0..n_cols {
                    let w = if transpose {
                        self.weights[b * c + a]
                    } else {
                        self.weights[a * c + b]
                    };
                    let gated = if w >= self.config.min_iou { w } else { 0.0 };
                    self.cost.push(-f64::from(gated));
                }
            }
            self.hungarian
                .solve(&self.cost, n_rows, n_cols, &mut self.assign);
            for (a, &b) in self.assign.iter().enumerate() {
                let (ri, ci) = if transpose { (b, a) } else { (a, b) };
                if self.weights[ri * c + ci] >= self.config.min_iou {
                    let slot = self.cols[ci];
                    self.slot_of[self.rows[ri]] = slot;
                    self.tracks[slot].seen = true;
                }
            }
        }
    }

    fn refresh(&mut self, slot: usize, inst: &Instance, now: Instant, out: &mut FrameTracks) {
        let (ema, confirm) = (self.config.box_ema, self.config.confirm_hits);
        let t = &mut self.tracks[slot];
        t.hits = t.hits.saturating_add(1);
        t.last_seen = now;
        t.bbox = inst.bbox;
        for (s, r) in t.smoothed.iter_mut().zip(inst.bbox) {
            *s += ema * (r - *s);
        }
        store_mask(t, inst, &mut self.most_runs);
        if !t.confirmed && t.hits >= confirm {
            t.confirmed = true;
            out.events.push(started(t, now));
        }
    }

    /// Opens a tentative track for an unmatched instance, in a free slot (or one made free);
    /// `None` when every slot holds a track matched in this frame.
    fn spawn(&mut self, inst: &Instance, now: Instant, out: &mut FrameTracks) -> Option<usize> {
        let slot = match self.tracks.iter().position(|t| !t.alive) {
            Some(s) => s,
            None if self.tracks.len() < MAX_TRACKS => {
                self.tracks.push(Track {
                    alive: false,
                    id: 0,
                    class_id: 0,
                    confirmed: false,
                    hits: 0,
                    first_seen: now,
                    last_seen: now,
                    bbox: [0.0; 4],
                    smoothed: [0.0; 4],
                    mask: Rle {
                        height: 0,
                        width: 0,
                        counts: Vec::new(),
                    },
                    mask_area: 0,
                    has_mask: false,
                    seen: false,
                });
                self.tracks.len() - 1
            }
            None => {
                let s = self
                    .tracks
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| !t.seen)
                    .min_by_key(|(_, t)| t.last_seen)
                    .map(|(s, _)| s)?;
                out.events
                    .push(end(&mut self.tracks[s], EndReason::Evicted));
                s
            }
        };
        let id = self.take_id();
        let confirm = self.config.confirm_hits;
        let t = &mut self.tracks[slot];
        t.alive = true;
        t.id = id;
        t.class_id = inst.class_id;
        t.confirmed = false;
        t.hits = 1;
        t.first_seen = now;
        t.last_seen = now;
        t.bbox = inst.bbox;
        t.smoothed = inst.bbox;
        t.seen = true;
        store_mask(t, inst, &mut self.most_runs);
        if confirm <= 1 {
            t.confirmed = true;
            out.events.push(started(t, now));
        }
        Some(slot)
    }
}

fn store_mask(t: &mut Track, inst: &Instance, most_runs: &mut usize) {
    t.has_mask = false;
    if let Some(m) = &inst.mask {
        *most_runs = (*most_runs).max(m.counts.len());
        t.mask.height = m.height;
        t.mask.width = m.width;
        t.mask.counts.clear();
        t.mask.counts.reserve(*most_runs);
        t.mask.counts.extend_from_slice(&m.counts);
        t.mask_area = m.area();
        t.has_mask = true;
    }
}

fn started(t: &Track, now: Instant) -> TrackEvent {
    TrackEvent {
        track_id: t.id,
        kind: EventKind::Started,
        class_id: t.class_id,
        bbox: t.bbox,
        duration_ms: ms(now.saturating_duration_since(t.first_seen)),
        frames: t.hits,
        reason: None,
    }
}

/// Closes a live track; only confirmed tracks have started, so only they report an end.
fn end(t: &mut Track, reason: EndReason) -> TrackEvent {
    t.alive = false;
    TrackEvent {
        track_id: t.id,
        kind: EventKind::Ended,
        class_id: t.class_id,
        bbox: t.bbox,
        duration_ms: ms(t.last_seen.saturating_duration_since(t.first_seen)),
        frames: t.hits,
        reason: Some(reason),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Mask IoU when both sides have masks of the same frame size, box IoU otherwise.
fn similarity(inst: &Instance, t: &Track) -> f32 {
    let boxes = box_ops::iou(&inst.bbox, &t.bbox);
    match &inst.mask {
        Some(m) if t.has_mask && (m.height, m.width) == (t.mask.height, t.mask.width) => {
            // Masks lie inside their boxes: boxes apart means masks apart.
            if boxes <= 0.0 {
                return 0.0;
            }
            let inter = rle_intersection(m, &t.mask);
            let union = m.area() + t.mask_area - inter;
            if union == 0 {
                0.0
            } else {
                (inter as f64 / union as f64) as f32
            }
        }
        _ => boxes,
    }
}

/// Pixels set in both masks, walking both run lists at once: O(runs), no decoding. Both must
/// have the same size (COCO RLE alternates 0-runs and 1-runs, starting with 0s).
pub fn rle_intersection(a: &Rle, b: &Rle) -> u64 {
    let (ca, cb) = (&a.counts, &b.counts);
    let (mut ia, mut ib) = (0usize, 0usize);
    let mut left_a = ca.first().map_or(0, |&c| u64::from(c));
    let mut left_b = cb.first().map_or(0, |&c| u64::from(c));
    let mut inter = 0u64;
    while ia < ca.len() && ib < cb.len() {
        if left_a == 0 {
            ia += 1;
            left_a = ca.get(ia).map_or(0, |&c| u64::from(c));
            continue;
        }
        if left_b == 0 {
            ib += 1;
            left_b = cb.get(ib).map_or(0, |&c| u64::from(c));
            continue;
        }
        let step = left_a.min(left_b);
        if ia % 2 == 1 && ib % 2 == 1 {
            inter += step;
        }
        left_a -= step;
        left_b -= step;
    }
    inter
}

/// Kuhn–Munkres with row and column potentials (the shortest-augmenting-path form, O(n²m)),
/// on buffers kept between frames.
#[derive(Debug, Default)]
struct Hungarian {
    u: Vec<f64>,
    v: Vec<f64>,
    p: Vec<usize>,
    way: Vec<usize>,
    minv: Vec<f64>,
    used: Vec<bool>,
}

impl Hungarian {
    /// Minimum-cost assignment of every row of the row-major `n`×`m` `cost` (n ≤ m) to a
    /// distinct column; `assign[row]` receives its column.
    fn solve(&mut self, cost: &[f64], n: usize, m: usize, assign: &mut Vec<usize>) {
        debug_assert!(n <= m && cost.len() == n * m);
        let reset = |v: &mut Vec<f64>, len: usize| {
            v.clear();
            v.resize(len, 0.0);
        };
        reset(&mut self.u, n + 1);
        reset(&mut self.v, m + 1);
        reset(&mut self.minv, m + 1);
        // 1-based: p[j] is the row (0 = none) holding column j; column 0 is the virtual root.
        self.p.clear();
        self.p.resize(m + 1, 0);
        self.way.clear();
        self.way.resize(m + 1, 0);
        self.used.clear();
        self.used.resize(m + 1, false);
        let (u, v, p, way, minv, used) = (
            &mut self.u,
            &mut self.v,
            &mut self.p,
            &mut self.way,
            &mut self.minv,
            &mut self.used,
        );
        for i in 1..=n {
            p[0] = i;
            let mut j0 = 0;
            minv.fill(f64::INFINITY);
            used.fill(false);
            loop {
                used[j0] = true;
                let i0 = p[j0];
                let mut delta = f64::INFINITY;
                let mut j1 = 0;
                for j in 1..=m {
                    if used[j] {
                        continue;
                    }
                    let cur = cost[(i0 - 1) * m + j - 1] - u[i0] - v[j];
                    if cur < minv[j] {
                        minv[j] = cur;
                        way[j] = j0;
                    }
                    if minv[j] < delta {
                        delta = minv[j];
                        j1 = j;
                    }
                }
                for j in 0..=m {
                    if used[j] {
                        u[p[j]] += delta;
                        v[j] -= delta;
                    } else {
                        minv[j] -= delta;
                    }
                }
                j0 = j1;
                if p[j0] == 0 {
                    break;
                }
            }
            while j0 != 0 {
                let j1 = way[j0];
                p[j0] = p[j1];
                j0 = j1;
            }
        }
        assign.clear();
        assign.resize(n, 0);
        for j in 1..=m {
            if p[j] != 0 {
                assign[p[j] - 1] = j - 1;
            }
        }
    }
}

/// `[{"track_id", "event", "class_id", "label", "box", "duration_ms", "frames", "reason"?}]`.
pub struct EventsJson<'a>(pub &'a Labels, pub &'a [TrackEvent]);

impl Serialize for EventsJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.1.len()))?;
        for e in self.1 {
            seq.serialize_element(&EventJson(self.0, e))?;
        }
        seq.end()
    }
}

/// One event, as its own JSON object (a frame record's `events` entry, or an MQTT message).
pub struct EventJson<'a>(pub &'a Labels, pub &'a TrackEvent);

impl Serialize for EventJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let e = self.1;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("track_id", &e.track_id)?;
        m.serialize_entry("event", &e.kind)?;
        m.serialize_entry("class_id", &e.class_id)?;
        m.serialize_entry("label", self.0.get(e.class_id))?;
        m.serialize_entry("box", &e.bbox)?;
        m.serialize_entry("duration_ms", &e.duration_ms)?;
        m.serialize_entry("frames", &e.frames)?;
        if let Some(reason) = &e.reason {
            m.serialize_entry("reason", reason)?;
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every assignment of a small matrix, for checking the solver against brute force.
    fn brute_force(cost: &[f64], n: usize, m: usize) -> f64 {
        fn go(cost: &[f64], n: usize, m: usize, row: usize, used: &mut Vec<bool>) -> f64 {
            if row == n {
                return 0.0;
            }
            let mut best = f64::INFINITY;
            for j in 0..m {
                if !used[j] {
                    used[j] = true;
                    best = best.min(cost[row * m + j] + go(cost, n, m, row + 1, used));
                    used[j] = false;
                }
            }
            best
        }
        go(cost, n, m, 0, &mut vec![false; m])
    }

    #[test]
    fn hungarian_matches_brute_force_on_random_rectangles() {
        let mut rng = crate::test_rng::TestRng::new(17);
        let mut h = Hungarian::default();
        let mut assign = Vec::new();
        for case in 0..200 {
            let n = 1 + case % 5;
            let m = n + (case / 5) % 3;
            let cost: Vec<f64> = (0..n * m).map(|_| -f64::from(rng.unit())).collect();
            h.solve(&cost, n, m, &mut assign);
            let mut cols = assign.clone();
            cols.sort_unstable();
            cols.dedup();
            assert_eq!(cols.len(), n, "case {case}: columns reused: {assign:?}");
            let total: f64 = assign
                .iter()
                .enumerate()
                .map(|(i, &j)| cost[i * m + j])
                .sum();
            let best = brute_force(&cost, n, m);
            assert!(
                (total - best).abs() < 1e-9,
                "case {case}: {total} vs {best}"
            );
        }
    }

    #[test]
    fn rle_intersection_equals_decoded_overlap() {
        let mut rng = crate::test_rng::TestRng::new(3);
        for case in 0..50 {
            let (h, w) = (1 + case % 7, 1 + case % 5);
            let a: Vec<u8> = (0..h * w).map(|_| (rng.unit() > 0.5) as u8).collect();
            let b: Vec<u8> = (0..h * w).map(|_| (rng.unit() > 0.4) as u8).collect();
            let expected = a
                .iter()
                .zip(&b)
                .filter(|(x, y)| **x == 1 && **y == 1)
                .count();
            let got = rle_intersection(&Rle::encode(&a, h, w), &Rle::encode(&b, h, w));
            assert_eq!(got, expected as u64, "case {case}");
        }
    }

    #[test]
    fn bad_settings_are_refused_with_their_values() {
        for config in [
            TrackerConfig {
                min_iou: 0.0,
                ..Default::default()
            },
            TrackerConfig {
                box_ema: 1.5,
                ..Default::default()
            },
            TrackerConfig {
                confirm_hits: 0,
                ..Default::default()
            },
            TrackerConfig {
                max_age: Duration::ZERO,
                ..Default::default()
            },
        ] {
            let e = Tracker::new(config).unwrap_err().to_string();
            assert!(e.contains("tracker"), "{e}");
        }
    }
}
