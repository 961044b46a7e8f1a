//! What every output receives about a processed frame: the typed [`FrameRecord`], its JSON line
//! (`drape detect`'s object plus the pipeline's fields), and the run's counters.

use serde::{Serialize, Serializer};

use crate::capture::Frame;
use crate::error::{Error, Result};
use crate::labels::Labels;
use crate::output::{InstancesJson, RleFormat};
use crate::pipeline::stats::Counters;
use crate::postprocess::Detections;
use crate::track::{EventsJson, FrameTracks};

/// Where results go. Every sink gets every processed frame; a sink must not block the loop.
pub trait Sink {
    fn frame(&mut self, out: &Emitted<'_>) -> std::io::Result<()>;
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Everything a sink gets about one processed frame.
pub struct Emitted<'a> {
    pub record: &'a FrameRecord<'a>,
    /// `record` as JSON, masks in the run's format (no trailing newline), written once for
    /// every sink that sends it as it is.
    pub line: &'a [u8],
    /// The run's counters so far, this frame included.
    pub counters: &'a Counters,
}

/// One processed frame.
#[derive(Clone, Copy)]
pub struct FrameRecord<'a> {
    pub labels: &'a Labels,
    pub frame: &'a Frame,
    pub result: &'a Detections,
    pub tracks: &'a FrameTracks,
    pub age_ms: f64,
    pub latency_ms: f64,
    pub budget_met: bool,
    /// Mask encoding; `None` leaves masks out.
    pub masks: Option<RleFormat>,
}

/// Replaces `line` with the record's JSON, serialised straight into the reused buffer.
pub fn write_record(line: &mut Vec<u8>, record: &FrameRecord<'_>) -> Result<()> {
    line.clear();
    serde_json::to_writer(line, record)
        .map_err(|e| Error::Output(format!("serialising frame {}: {e}", record.frame.seq)))
}

impl Serialize for FrameRecord<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let r = self.result;
        let mut m = s.serialize_map(Some(12))?;
        m.serialize_entry("seq", &self.frame.seq)?;
        m.serialize_entry("captured_at", &self.frame.captured_at_unix_ms)?;
        m.serialize_entry("age_ms", &self.age_ms)?;
        m.serialize_entry("timings_ms", &r.timings)?;
        m.serialize_entry("latency_ms", &self.latency_ms)?;
        m.serialize_entry("budget_met", &self.budget_met)?;
        m.serialize_entry("input_size", &[r.input_size.0, r.input_size.1])?;
        m.serialize_entry("masked", &r.masked)?;
        m.serialize_entry("width", &r.width)?;
        m.serialize_entry("height", &r.height)?;
        let instances = InstancesJson {
            labels: self.labels,
            instances: &r.instances,
            masks: self.masks,
            tracks: Some(&self.tracks.instances),
        };
        m.serialize_entry("instances", &instances)?;
        m.serialize_entry("events", &EventsJson(self.labels, &self.tracks.events))?;
        m.end()
    }
}
