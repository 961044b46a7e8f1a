//! Whether the pipeline is doing its job, as `/healthz`, `/metrics` and systemd's watchdog see
//! it. "Alive" is not enough: a process whose camera is gone still answers HTTP. Healthy means
//! the newest result is younger than [`STALE_PERIODS`] frame periods (or the run is still
//! warming up), capture is not reconnecting or dead, and no output is failing. Decisions read an
//! injected [`Clock`], so tests drive them without waiting.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::capture::CaptureControl;
use crate::clock::Clock;
use crate::service::Notifier;

/// A run whose newest result is older than this many frame periods is stalled...
pub const STALE_PERIODS: u32 = 5;
/// ...and never sooner than this, so a slow model at a high frame rate is not called stalled.
pub const MIN_STALE_AFTER: Duration = Duration::from_secs(2);
/// systemd's watchdog is pinged at most this often (its timeout is tens of seconds).
const WATCHDOG_EVERY: Duration = Duration::from_secs(1);

/// One word for the state, the same in `/healthz` and `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Loading, warming up, or running but no result yet within the stale limit.
    WarmingUp,
    Ok,
    /// No result for longer than the stale limit.
    Stalled,
    CaptureReconnecting,
    /// The run ended: the source failed, ended, or the process is stopping.
    Stopped,
    SinkFailing,
}

impl State {
    pub const ALL: [State; 6] = [
        State::WarmingUp,
        State::Ok,
        State::Stalled,
        State::CaptureReconnecting,
        State::Stopped,
        State::SinkFailing,
    ];

    pub fn name(self) -> &'static str {
        match self {
            State::WarmingUp => "warming_up",
            State::Ok => "ok",
            State::Stalled => "stalled",
            State::CaptureReconnecting => "capture_reconnecting",
            State::Stopped => "stopped",
            State::SinkFailing => "sink_failing",
        }
    }

    /// Whether `/healthz` answers 200.
    pub fn healthy(self) -> bool {
        matches!(self, State::WarmingUp | State::Ok)
    }
}

/// The verdict and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    pub state: State,
    pub reason: String,
    /// Age of the newest result, if there is one.
    pub last_result_age: Option<Duration>,
}

#[derive(Debug, Default)]
struct Inner {
    /// When the run started taking frames (after warm-up); `None` before.
    running_since: Option<Instant>,
    period: Duration,
    last_result: Option<Instant>,
    /// Set when the run ended, with why.
    ended: Option<String>,
    control: Option<Arc<CaptureControl>>,
    last_watchdog: Option<Instant>,
}

/// Shared between the pipeline (which reports) and the HTTP server (which asks).
pub struct RunStatus {
    clock: Arc<dyn Clock>,
    notifier: Option<Notifier>,
    inner: Mutex<Inner>,
}

impl RunStatus {
    /// `notifier`: systemd's, when the service runs under one.
    pub fn new(clock: Arc<dyn Clock>, notifier: Option<Notifier>) -> Arc<Self> {
        Arc::new(Self {
            clock,
            notifier,
            inner: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The model is warm and capture starts: systemd hears READY=1.
    pub fn running(&self, period: Duration, control: Arc<CaptureControl>) {
        let mut s = self.lock();
        s.running_since = Some(self.clock.now());
        s.period = period;
        s.control = Some(control);
        s.ended = None;
        drop(s);
        if let Some(n) = &self.notifier {
            n.notify("READY=1\nSTATUS=processing frames");
        }
    }

    /// A frame was processed and emitted: the watchdog is fed from here, so only a pipeline
    /// that makes progress keeps the service from being restarted.
    pub fn processed(&self) {
        let now = self.clock.now();
        let mut s = self.lock();
        s.last_result = Some(now);
        let due = s
            .last_watchdog
            .is_none_or(|t| now.saturating_duration_since(t) >= WATCHDOG_EVERY);
        if due {
            s.last_watchdog = Some(now);
        }
        drop(s);
        if let (true, Some(n)) = (due, &self.notifier) {
            n.notify("WATCHDOG=1");
        }
    }

    /// The run is over; `why` is shown by `/healthz` until the process exits.
    pub fn ended(&self, why: &str) {
        self.lock().ended = Some(why.to_string());
        if let Some(n) = &self.notifier {
            n.notify(&format!("STOPPING=1\nSTATUS={why}"));
        }
    }

    /// The verdict now, given the outputs that are failing (by name).
    pub fn health(&self, failing_sinks: &[&str]) -> Health {
        let now = self.clock.now();
        let s = self.lock();
        let last_result_age = s.last_result.map(|t| now.saturating_duration_since(t));
        let verdict = |state, reason: String| Health {
            state,
            reason,
            last_result_age,
        };
        if let Some(why) = &s.ended {
            return verdict(State::Stopped, why.clone());
        }
        let Some(since) = s.running_since else {
            return verdict(State::WarmingUp, "loading and warming up the model".into());
        };
        if s.control.as_ref().is_some_and(|c| c.reconnecting()) {
            return verdict(
                State::CaptureReconnecting,
                "the camera was lost and is being reopened".into(),
            );
        }
        if let Some(name) = failing_sinks.first() {
            return verdict(
                State::SinkFailing,
                format!("output `{name}` is failing and being retried"),
            );
        }
        let limit = (s.period * STALE_PERIODS).max(MIN_STALE_AFTER);
        let age = now.saturating_duration_since(s.last_result.unwrap_or(since));
        match (age > limit, s.last_result.is_some()) {
            (true, _) => verdict(
                State::Stalled,
                format!(
                    "no result for {:.1} s (limit {:.1} s: {STALE_PERIODS} frame periods)",
                    age.as_secs_f64(),
                    limit.as_secs_f64()
                ),
            ),
            (false, false) => verdict(State::WarmingUp, "waiting for the first result".into()),
            (false, true) => verdict(State::Ok, "processing frames".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn health_follows_results_capture_and_sinks_on_an_injected_clock() {
        let clock = Arc::new(ManualClock::new());
        let status = RunStatus::new(clock.clone(), None);
        let control = Arc::new(CaptureControl::default());
        assert_eq!(status.health(&[]).state, State::WarmingUp);
        // 10 fps: stale after max(5 x 100 ms, 2 s) = 2 s.
        status.running(Duration::from_millis(100), Arc::clone(&control));
        assert_eq!(status.health(&[]).state, State::WarmingUp);
        clock.advance(Duration::from_millis(2100));
        assert_eq!(status.health(&[]).state, State::Stalled);
        status.processed();
        assert_eq!(status.health(&[]).state, State::Ok);
        clock.advance(Duration::from_millis(1900));
        assert_eq!(status.health(&[]).state, State::Ok);
        clock.advance(Duration::from_millis(200));
        let stalled = status.health(&[]);
        assert_eq!(stalled.state, State::Stalled);
        assert!(stalled.reason.contains("2.1 s"), "{}", stalled.reason);
        status.processed();
        assert_eq!(status.health(&["jsonl"]).state, State::SinkFailing);
        control.set_reconnecting(true);
        assert_eq!(status.health(&[]).state, State::CaptureReconnecting);
        control.set_reconnecting(false);
        status.ended("capture failed: camera gone");
        let ended = status.health(&[]);
        assert_eq!(ended.state, State::Stopped);
        assert!(!ended.state.healthy());
    }
}
