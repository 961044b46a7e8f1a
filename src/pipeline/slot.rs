//! The latest-frame slot between the capture thread and the inference loop: a one-frame
//! hand-off that never blocks the producer and never queues (GStreamer's leaky queue of one).

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::capture::Frame;

/// How a frame left the latest-frame slot.
pub enum Take {
    Frame,
    /// Nothing new within the timeout.
    Timeout,
    /// The capture side has finished; `Some` carries its error.
    Closed(Option<String>),
}

struct SlotState {
    frame: Frame,
    fresh: bool,
    closed: Option<Option<String>>,
    superseded: u64,
}

/// A one-frame hand-off: the producer swaps its filled buffer in (never waiting for the
/// consumer), the consumer swaps the newest out. A frame replaced before it was taken is
/// superseded and counted. Swapping exchanges buffers, so nothing is copied or allocated.
pub struct LatestFrame {
    state: Mutex<SlotState>,
    ready: Condvar,
}

impl LatestFrame {
    pub fn new(frame: Frame) -> Self {
        Self {
            state: Mutex::new(SlotState {
                frame,
                fresh: false,
                closed: None,
                superseded: 0,
            }),
            ready: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        // A panic elsewhere cannot leave a half-swapped frame: recover the data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes `back` as the newest frame; `back` receives the buffer it replaced.
    pub fn publish(&self, back: &mut Frame) {
        let mut s = self.lock();
        std::mem::swap(&mut s.frame, back);
        if s.fresh {
            s.superseded += 1;
        }
        s.fresh = true;
        drop(s);
        self.ready.notify_one();
    }

    /// Swaps the newest frame into `front`, waiting up to `timeout` for one.
    pub fn take(&self, front: &mut Frame, timeout: Duration) -> Take {
        let s = self.lock();
        let (mut s, _) = self
            .ready
            .wait_timeout_while(s, timeout, |s| !s.fresh && s.closed.is_none())
            .unwrap_or_else(|e| e.into_inner());
        if s.fresh {
            std::mem::swap(&mut s.frame, front);
            s.fresh = false;
            Take::Frame
        } else if let Some(reason) = &s.closed {
            Take::Closed(reason.clone())
        } else {
            Take::Timeout
        }
    }

    pub fn close(&self, error: Option<String>) {
        self.lock().closed = Some(error);
        self.ready.notify_all();
    }

    pub fn superseded(&self) -> u64 {
        self.lock().superseded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64) -> Frame {
        let mut f = Frame::with_capacity(2, 2);
        f.resize(2, 2);
        f.seq = seq;
        f
    }

    #[test]
    fn latest_frame_hands_over_the_newest_and_counts_the_superseded() {
        let slot = LatestFrame::new(frame(0));
        let mut front = frame(0);
        assert!(matches!(
            slot.take(&mut front, Duration::ZERO),
            Take::Timeout
        ));
        for seq in 1..=3 {
            slot.publish(&mut frame(seq));
        }
        assert!(matches!(slot.take(&mut front, Duration::ZERO), Take::Frame));
        assert_eq!(front.seq, 3);
        assert_eq!(slot.superseded(), 2);
        slot.close(Some("unplugged".into()));
        assert!(
            matches!(slot.take(&mut front, Duration::ZERO), Take::Closed(Some(e)) if e == "unplugged")
        );
    }
}
