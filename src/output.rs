//! The JSON form of a result, shared by `drape detect` and the streaming outputs.

use serde::Serialize;

use crate::model::{Detections, MaskRcnn, StageSummary};
use crate::postprocess::CocoRle;

#[derive(Serialize)]
struct InstanceJson<'a> {
    class_id: usize,
    label: &'a str,
    score: f32,
    #[serde(rename = "box")]
    bbox: [f32; 4],
    mask: Option<CocoRle>,
}

#[derive(Serialize)]
struct DetectionsJson<'a> {
    width: usize,
    height: usize,
    timings_ms: StageSummary,
    instances: Vec<InstanceJson<'a>>,
}

/// `{"width", "height", "timings_ms", "instances": [{"class_id", "label", "score", "box",
/// "mask": {"size", "counts"}}]}`, instances by descending score.
pub fn to_json(model: &MaskRcnn, d: &Detections) -> serde_json::Value {
    let json = DetectionsJson {
        width: d.width,
        height: d.height,
        timings_ms: d.timings.summary(),
        instances: d
            .instances
            .iter()
            .map(|i| InstanceJson {
                class_id: i.class_id,
                label: model.label(i.class_id),
                score: i.score,
                bbox: i.bbox,
                mask: i.mask.as_ref().map(CocoRle::from),
            })
            .collect(),
    };
    serde_json::to_value(json).expect("plain data serialises")
}
