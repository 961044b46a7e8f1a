//! The JSON form of results, shared by `drape detect` and the streaming outputs. Serialised
//! straight from the result (no intermediate strings or vectors), so emitting a frame into a
//! reused buffer allocates nothing.

use std::fmt;

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};

use crate::model::{Detections, MaskRcnn};
use crate::postprocess::{Instance, Rle};

/// `[{"class_id", "label", "score", "box", "mask": {"size", "counts"} | null}, ...]`.
pub struct InstancesJson<'a>(pub &'a MaskRcnn, pub &'a [Instance]);

impl Serialize for InstancesJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.1.len()))?;
        for i in self.1 {
            seq.serialize_element(&InstanceJson(self.0, i))?;
        }
        seq.end()
    }
}

struct InstanceJson<'a>(&'a MaskRcnn, &'a Instance);

impl Serialize for InstanceJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (model, i) = (self.0, self.1);
        let mut m = s.serialize_map(Some(5))?;
        m.serialize_entry("class_id", &i.class_id)?;
        m.serialize_entry("label", model.label(i.class_id))?;
        m.serialize_entry("score", &i.score)?;
        m.serialize_entry("box", &i.bbox)?;
        m.serialize_entry("mask", &i.mask.as_ref().map(CocoRleJson))?;
        m.end()
    }
}

/// `{"size": [H, W], "counts": "<COCO compressed RLE>"}`.
pub struct CocoRleJson<'a>(pub &'a Rle);

impl Serialize for CocoRleJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("size", &[self.0.height, self.0.width])?;
        m.serialize_entry("counts", &CountsStr(self.0))?;
        m.end()
    }
}

/// The compressed counts, written character by character as the serialiser asks.
struct CountsStr<'a>(&'a Rle);

impl Serialize for CountsStr<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for CountsStr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.write_coco_string(f)
    }
}

/// `{"width", "height", "timings_ms", "instances"}`, instances by descending score.
pub fn to_json(model: &MaskRcnn, d: &Detections) -> serde_json::Value {
    struct Json<'a>(&'a MaskRcnn, &'a Detections);
    impl Serialize for Json<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let d = self.1;
            let mut m = s.serialize_map(Some(4))?;
            m.serialize_entry("width", &d.width)?;
            m.serialize_entry("height", &d.height)?;
            m.serialize_entry("timings_ms", &d.timings.summary())?;
            m.serialize_entry("instances", &InstancesJson(self.0, &d.instances))?;
            m.end()
        }
    }
    serde_json::to_value(Json(model, d)).expect("plain data serialises")
}
