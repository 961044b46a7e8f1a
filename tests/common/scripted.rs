//! A camera stand-in that plays a script, for the tests that run the real pipeline loop. What
//! a test asserts must follow from the script alone, however fast or loaded the machine is, so
//! the source can hand frames out in lock step with the sinks and stamp them on an injected
//! clock. It allocates nothing per frame once the frame slots have their size, so the
//! allocation-counting test can drive it too.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drape::capture::{CaptureControl, CaptureError, CaptureStats, Frame, FrameSource};
use drape::clock::{Clock, SystemClock};

/// Bounds one wait at the gate; only a hung pipeline gets anywhere near it.
const HANG: Duration = Duration::from_secs(120);

/// What the source does once the script's frames are out.
#[derive(Debug, Clone, Copy)]
pub enum Then {
    /// End the stream, as a recording does.
    End,
    /// Panic in `next_frame`, as a decoder bug would.
    Panic,
    /// Keep delivering frames the model rejects (0x0), forever.
    Unusable,
    /// Block, as a stalled camera does, until the pipeline stops capture.
    Stall,
}

/// Frame `k` (sequence number `k`) is `images[k % images.len()]`, stamped `ages_ms[k]` old
/// (0 where not given) on the script's clock, and, when gated, handed out only once the sinks
/// have counted `gate(k)` frames on [`Scripted::seen`], so which frames meet in the pipeline's
/// slot is fixed by the script. After `frames` frames the source does [`Then`].
pub struct Scripted {
    images: Vec<image::RgbImage>,
    frames: usize,
    then: Then,
    gate: Option<fn(u64) -> usize>,
    seen: Arc<AtomicUsize>,
    clock: Arc<dyn Clock>,
    ages_ms: Vec<f64>,
    pace: Duration,
    fps: f64,
    served: u64,
    control: Option<Arc<CaptureControl>>,
}

impl Scripted {
    /// `frames` frames cycling through `images`, ungated, on the system clock, then the end.
    /// The default rate (one frame per 100 s) is slow enough that no frame is ever stale unless
    /// the script makes it so.
    pub fn new(images: Vec<image::RgbImage>, frames: usize) -> Self {
        assert!(!images.is_empty());
        Self {
            images,
            frames,
            then: Then::End,
            gate: None,
            seen: Arc::default(),
            clock: Arc::new(SystemClock),
            ages_ms: Vec::new(),
            pace: Duration::ZERO,
            fps: 0.01,
            served: 0,
            control: None,
        }
    }

    /// One flat `width` x `height` image of grey `level`.
    pub fn flat(width: u32, height: u32, level: u8, frames: usize) -> Self {
        Self::new(
            vec![image::RgbImage::from_pixel(
                width,
                height,
                image::Rgb([level; 3]),
            )],
            frames,
        )
    }

    /// Frame `k` waits until the sinks have counted `gate(k)` frames.
    pub fn gated(mut self, gate: fn(u64) -> usize) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Frame `k` waits until the sinks have counted `k` frames: none is superseded, and the
    /// frames come in order.
    pub fn lock_step(self) -> Self {
        self.gated(|k| k as usize)
    }

    pub fn then(mut self, then: Then) -> Self {
        self.then = then;
        self
    }

    pub fn clock(mut self, clock: Arc<impl Clock + 'static>) -> Self {
        self.clock = clock;
        self
    }

    /// How old each frame is when handed out, in milliseconds of the script's clock.
    pub fn ages_ms(mut self, ages_ms: Vec<f64>) -> Self {
        self.ages_ms = ages_ms;
        self
    }

    /// Sleeps this long before each frame, so that the loop sees frames one by one even
    /// ungated. It is not a timing assumption: nothing asserted depends on it.
    pub fn paced(mut self, pace: Duration) -> Self {
        self.pace = pace;
        self
    }

    pub fn fps(mut self, fps: f64) -> Self {
        self.fps = fps;
        self
    }

    /// The count the gate waits on: a sink of the run must add one per frame it is given.
    pub fn seen(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.seen)
    }
}

impl FrameSource for Scripted {
    fn next_frame(&mut self, frame: &mut Frame) -> Result<(), CaptureError> {
        std::thread::sleep(self.pace);
        let k = self.served;
        if k as usize >= self.frames {
            match self.then {
                Then::End => return Err(CaptureError::EndOfStream),
                Then::Panic => panic!("decoder bug"),
                Then::Unusable => frame.resize(0, 0),
                Then::Stall => loop {
                    if self.control.as_ref().is_some_and(|c| c.stopped()) {
                        return Err(CaptureError::Stopped);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                },
            }
        } else {
            if let Some(gate) = self.gate {
                let want = gate(k);
                let waited = Instant::now();
                while self.seen.load(Ordering::SeqCst) < want {
                    assert!(
                        waited.elapsed() < HANG,
                        "frame {k} waited for {want} frames to reach the sinks"
                    );
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            let image = &self.images[k as usize % self.images.len()];
            frame.resize(image.width() as usize, image.height() as usize);
            frame.rgb.copy_from_slice(image.as_raw());
        }
        let age_ms = self.ages_ms.get(k as usize).copied().unwrap_or(0.0);
        frame.seq = k;
        frame.captured = self.clock.now() - Duration::from_secs_f64(age_ms / 1e3);
        frame.captured_at_unix_ms = 0.0;
        self.served += 1;
        Ok(())
    }

    fn stats(&self) -> CaptureStats {
        CaptureStats {
            frames: self.served,
            ..Default::default()
        }
    }

    fn describe(&self) -> String {
        "scripted".into()
    }

    fn fps(&self) -> f64 {
        self.fps
    }

    fn attach(&mut self, control: Arc<CaptureControl>) {
        self.control = Some(control);
    }
}
