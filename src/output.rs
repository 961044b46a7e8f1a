//! The JSON form of results, shared by `drape detect` and the streaming outputs. Serialised
//! straight from the result (no intermediate strings or vectors), so emitting a frame into a
//! reused buffer allocates nothing.

use std::fmt;

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};

use crate::labels::Labels;
use crate::postprocess::{Detections, Instance};
use crate::rle::Rle;
use crate::track::InstanceTrack;

/// How masks are written in JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RleFormat {
    /// `{"size": [H, W], "counts": "<COCO compressed RLE>"}`, as `pycocotools.mask.encode`.
    #[default]
    Coco,
    /// `{"size": [H, W], "encoded_pixels": "start length ..."}`: iMaterialist/Kaggle runs of
    /// foreground, 1-indexed, column-major.
    Kaggle,
}

/// `[{"class_id", "label", "score", "box", "mask": {...} | null}, ...]`, each instance with its
/// track's `track_id`, `track_confirmed` and `smoothed_box` beside the raw values when `tracks`
/// is given (one per instance, in order).
pub struct InstancesJson<'a> {
    pub labels: &'a Labels,
    pub instances: &'a [Instance],
    /// `None` leaves the `mask` key out (light records, e.g. for a message broker).
    pub masks: Option<RleFormat>,
    pub tracks: Option<&'a [InstanceTrack]>,
}

impl Serialize for InstancesJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.instances.len()))?;
        for (k, i) in self.instances.iter().enumerate() {
            let track = self.tracks.and_then(|t| t.get(k));
            seq.serialize_element(&InstanceJson(self, i, track))?;
        }
        seq.end()
    }
}

struct InstanceJson<'a>(
    &'a InstancesJson<'a>,
    &'a Instance,
    Option<&'a InstanceTrack>,
);

impl Serialize for InstanceJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (all, i) = (self.0, self.1);
        let mut m = s.serialize_map(None)?;
        if let Some(t) = self.2 {
            m.serialize_entry("track_id", &t.track_id)?;
        }
        m.serialize_entry("class_id", &i.class_id)?;
        m.serialize_entry("label", all.labels.get(i.class_id))?;
        m.serialize_entry("score", &i.score)?;
        m.serialize_entry("box", &i.bbox)?;
        if let Some(format) = all.masks {
            m.serialize_entry("mask", &i.mask.as_ref().map(|r| MaskJson(r, format)))?;
        }
        if let Some(t) = self.2 {
            m.serialize_entry("track_confirmed", &t.confirmed)?;
            m.serialize_entry("smoothed_box", &t.smoothed_box)?;
        }
        m.end()
    }
}

/// A mask in the chosen format.
pub struct MaskJson<'a>(pub &'a Rle, pub RleFormat);

impl Serialize for MaskJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("size", &[self.0.height, self.0.width])?;
        let key = match self.1 {
            RleFormat::Coco => "counts",
            RleFormat::Kaggle => "encoded_pixels",
        };
        m.serialize_entry(key, &CountsStr(self))?;
        m.end()
    }
}

/// The encoded counts, written character by character as the serialiser asks.
struct CountsStr<'a>(&'a MaskJson<'a>);

impl Serialize for CountsStr<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for CountsStr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 .1 {
            RleFormat::Coco => self.0 .0.write_coco_string(f),
            RleFormat::Kaggle => self.0 .0.write_kaggle_string(f),
        }
    }
}

/// `{"width", "height", "input_size", "timings_ms", "instances"}`, instances by descending score.
pub fn to_json(labels: &Labels, d: &Detections, format: RleFormat) -> serde_json::Value {
    struct Json<'a>(&'a Labels, &'a Detections, RleFormat);
    impl Serialize for Json<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let d = self.1;
            let mut m = s.serialize_map(Some(5))?;
            m.serialize_entry("width", &d.width)?;
            m.serialize_entry("height", &d.height)?;
            m.serialize_entry("input_size", &[d.input_size.0, d.input_size.1])?;
            // The same stage names as `drape run`'s lines and `drape bench`.
            m.serialize_entry("timings_ms", &d.timings)?;
            let instances = InstancesJson {
                labels: self.0,
                instances: &d.instances,
                masks: Some(self.2),
                tracks: None,
            };
            m.serialize_entry("instances", &instances)?;
            m.end()
        }
    }
    serde_json::to_value(Json(labels, d, format)).expect("plain data serialises")
}
