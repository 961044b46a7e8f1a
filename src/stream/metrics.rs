//! Prometheus text exposition (format 0.0.4) of the pipeline's counters and latency
//! histograms, names prefixed `drape_`, so a fleet of mirrors is watched with the stack shops
//! already run.

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::mqtt::MqttStats;
use super::Emitted;
use crate::health::State as HealthState;
use crate::model::Timings;
use crate::pipeline::Counters;

/// Histogram bucket upper bounds, in seconds: 10 ms to 10 s.
const BUCKETS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const STAGES: usize = 11;

#[derive(Debug, Clone, Copy, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (c, &bound) in self.counts.iter_mut().zip(&BUCKETS) {
            if seconds <= bound {
                *c += 1;
            }
        }
        self.sum += seconds;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (c, bound) in self.counts.iter().zip(BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Debug, Default)]
struct State {
    counters: Counters,
    latency: Histogram,
    stages: [Histogram; STAGES],
    input: (usize, usize),
}

#[derive(Debug, Default)]
pub struct Metrics {
    state: Mutex<State>,
    mqtt: Mutex<Option<Arc<MqttStats>>>,
}

/// Extra gauges and counters only the outputs know.
pub struct OutputStats {
    pub http_clients: usize,
    pub events_dropped: u64,
    pub socket_clients: usize,
    pub socket_dropped: u64,
    pub mjpeg_skipped: u64,
    /// (name, write errors, failing now) per independently failing sink.
    pub sinks: Vec<(&'static str, u64, bool)>,
    pub health: HealthState,
}

impl Metrics {
    pub fn record(&self, out: &Emitted<'_>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.counters = *out.counters;
        let r = out.record;
        s.latency.observe(r.latency_ms / 1e3);
        for (h, (_, ms)) in s.stages.iter_mut().zip(r.result.timings.stages()) {
            h.observe(ms / 1e3);
        }
        s.input = r.result.input_size;
    }

    /// Reports the MQTT output's counters from now on.
    pub fn attach_mqtt(&self, stats: Arc<MqttStats>) {
        *self.mqtt.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats);
    }

    pub fn counters(&self) -> Counters {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .counters
    }

    pub fn render(&self, outputs: &OutputStats) -> String {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let c = &s.counters;
        let mut out = String::with_capacity(8 * 1024);
        let mut counter = |name: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(
                out,
                "# HELP drape_{name} {help}\n# TYPE drape_{name} counter"
            );
            for (labels, v) in samples {
                let labels = if labels.is_empty() {
                    String::new()
                } else {
                    format!("{{{labels}}}")
                };
                let _ = writeln!(out, "drape_{name}{labels} {v}");
            }
        };
        counter(
            "frames_captured_total",
            "Frames the source delivered.",
            &[("", c.captured)],
        );
        counter(
            "frames_processed_total",
            "Frames run through the model and emitted.",
            &[("", c.processed)],
        );
        counter(
            "frames_dropped_total",
            "Frames not processed, by reason.",
            &[
                ("reason=\"stale\"", c.dropped_stale),
                ("reason=\"superseded\"", c.dropped_superseded),
                ("reason=\"corrupt\"", c.corrupt),
                ("reason=\"driver\"", c.driver_dropped),
            ],
        );
        counter(
            "budget_misses_total",
            "Frames emitted later than the latency budget.",
            &[("", c.budget_misses)],
        );
        counter(
            "camera_reconnects_total",
            "Times a lost camera was reopened.",
            &[("", c.reconnects)],
        );
        counter(
            "output_lines_dropped_total",
            "Lines a slow client lost, by output.",
            &[
                ("output=\"sse\"", outputs.events_dropped),
                ("output=\"unix\"", outputs.socket_dropped),
            ],
        );
        counter(
            "mjpeg_frames_skipped_total",
            "Preview frames MJPEG clients were too slow for.",
            &[("", outputs.mjpeg_skipped)],
        );
        let sink_errors: Vec<(String, u64)> = outputs
            .sinks
            .iter()
            .map(|(name, errors, _)| (format!("sink=\"{name}\""), *errors))
            .collect();
        let sink_errors: Vec<(&str, u64)> =
            sink_errors.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        counter(
            "sink_errors_total",
            "Failed writes to an output that is retried on its own, by sink.",
            &sink_errors,
        );
        if let Some(m) = &*self.mqtt.lock().unwrap_or_else(|e| e.into_inner()) {
            counter(
                "mqtt_queued_total",
                "Messages handed to the MQTT network thread.",
                &[("", m.queued.load(Ordering::Relaxed))],
            );
            counter(
                "mqtt_dropped_total",
                "MQTT messages lost to a full queue (broker down or slow).",
                &[("", m.dropped.load(Ordering::Relaxed))],
            );
            counter(
                "mqtt_connects_total",
                "Connections made to the MQTT broker.",
                &[("", m.connects.load(Ordering::Relaxed))],
            );
            let _ = writeln!(out, "# HELP drape_mqtt_connected Whether the MQTT broker is connected.\n# TYPE drape_mqtt_connected gauge\ndrape_mqtt_connected {}", u8::from(m.connected.load(Ordering::Relaxed)));
        }
        let _ = writeln!(out, "# HELP drape_sink_up Whether an output is writing (0 while it fails and waits to retry).\n# TYPE drape_sink_up gauge");
        for (name, _, failing) in &outputs.sinks {
            let _ = writeln!(
                out,
                "drape_sink_up{{sink=\"{name}\"}} {}",
                u8::from(!failing)
            );
        }
        let _ = writeln!(out, "# HELP drape_health The state /healthz reports (1 for the current one).\n# TYPE drape_health gauge");
        for state in HealthState::ALL {
            let _ = writeln!(
                out,
                "drape_health{{state=\"{}\"}} {}",
                state.name(),
                u8::from(state == outputs.health)
            );
        }
        let _ = writeln!(out, "# HELP drape_clients Connected streaming clients, by output.\n# TYPE drape_clients gauge");
        let _ = writeln!(
            out,
            "drape_clients{{output=\"http\"}} {}",
            outputs.http_clients
        );
        let _ = writeln!(
            out,
            "drape_clients{{output=\"unix\"}} {}",
            outputs.socket_clients
        );
        let _ = writeln!(out, "# HELP drape_input_pixels Model input size of the last frame.\n# TYPE drape_input_pixels gauge");
        let _ = writeln!(out, "drape_input_pixels{{dim=\"width\"}} {}", s.input.0);
        let _ = writeln!(out, "drape_input_pixels{{dim=\"height\"}} {}", s.input.1);
        let _ = writeln!(out, "# HELP drape_latency_seconds End-to-end latency, capture to emit.\n# TYPE drape_latency_seconds histogram");
        s.latency.write(&mut out, "drape_latency_seconds", "");
        let _ = writeln!(out, "# HELP drape_stage_seconds Time per pipeline stage.\n# TYPE drape_stage_seconds histogram");
        for (h, (name, _)) in s.stages.iter().zip(Timings::default().stages()) {
            h.write(
                &mut out,
                "drape_stage_seconds",
                &format!("stage=\"{name}\""),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::default();
        for s in [0.005, 0.03, 0.03, 20.0] {
            h.observe(s);
        }
        assert_eq!(h.counts[0], 1);
        assert_eq!(h.counts[2], 3);
        assert_eq!(h.counts[BUCKETS.len() - 1], 3);
        assert_eq!(h.count, 4);
        let mut out = String::new();
        h.write(&mut out, "x", "");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"));
        assert!(out.contains("x_count 4\n"));
    }
}
