//! Faults an unattended appliance meets in a store, one test each: a capture thread that
//! panics, a run loop left early, a camera that never comes back while the service is being
//! stopped. Every wait here only bounds a hang; no test depends on how fast the machine is.

mod common;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use drape::capture::{
    CameraSource, CaptureControl, CaptureError, CaptureStats, Device, Frame, FrameSource,
    PixelFormat, RawBuffer, ReconnectPolicy, StreamFormat,
};
use drape::pipeline::{self, BudgetController, Emitted, PipelineOptions, Sink};
use drape::Error;

/// Generous: only a hung run takes this long.
const HANG: Duration = Duration::from_secs(60);

/// Runs `f` on its own thread and fails the test if it does not finish within [`HANG`].
fn bounded<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(HANG).expect("hung instead of ending")
}

fn options() -> PipelineOptions {
    PipelineOptions {
        budget_ms: 10_000.0,
        duration: None,
        slow_stage: None,
        rle: Default::default(),
    }
}

/// A sink that keeps nothing.
struct Discard;

impl Sink for Discard {
    fn frame(&mut self, _: &Emitted<'_>) -> io::Result<()> {
        Ok(())
    }
}

/// A looping source that delivers `frames` good 32x32 frames, then does `after`.
struct Scripted {
    frames: usize,
    after: After,
    delivered: usize,
}

#[derive(Clone, Copy)]
enum After {
    /// Panic in `next_frame`, as a decoder bug would.
    Panic,
    /// Keep delivering frames the model rejects (0x0), forever.
    Unusable,
}

impl FrameSource for Scripted {
    fn next_frame(&mut self, frame: &mut Frame) -> Result<(), CaptureError> {
        // Paced a little so the loop sees frames one by one; not a timing assumption.
        std::thread::sleep(Duration::from_millis(2));
        if self.delivered >= self.frames {
            match self.after {
                After::Panic => panic!("decoder bug"),
                After::Unusable => frame.resize(0, 0),
            }
        } else {
            frame.resize(32, 32);
            frame.rgb.fill(100);
        }
        self.delivered += 1;
        frame.seq = self.delivered as u64;
        frame.captured = Instant::now();
        Ok(())
    }
    fn stats(&self) -> CaptureStats {
        CaptureStats {
            frames: self.delivered as u64,
            ..Default::default()
        }
    }
    fn describe(&self) -> String {
        "scripted".into()
    }
    fn fps(&self) -> f64 {
        // Slow enough that no frame is ever stale on a loaded machine.
        0.01
    }
}

fn run_scripted(source: Scripted) -> drape::Result<pipeline::Summary> {
    bounded(move || {
        let model = common::tiny_model();
        let mut sinks: Vec<Box<dyn Sink>> = vec![Box::new(Discard)];
        pipeline::run(
            &model,
            Box::new(source),
            BudgetController::new(10_000.0, (64, 64), 100),
            &mut sinks,
            &options(),
            &AtomicBool::new(false),
        )
    })
}

#[test]
fn a_panicking_capture_thread_ends_the_run_with_a_named_error() {
    let err = run_scripted(Scripted {
        frames: 2,
        after: After::Panic,
        delivered: 0,
    })
    .unwrap_err();
    assert!(
        matches!(&err, Error::Panicked { thread: "capture", message } if message == "decoder bug"),
        "{err}"
    );
}

#[test]
fn an_early_error_in_the_run_loop_stops_a_source_that_never_ends() {
    let err = run_scripted(Scripted {
        frames: 1,
        after: After::Unusable,
        delivered: 0,
    })
    .unwrap_err();
    assert!(err.to_string().contains("does not hold a 0x0"), "{err}");
}

/// A camera that streamed once, then is gone for good.
struct Unplugged {
    opened: bool,
}

impl Device for Unplugged {
    fn name(&self) -> &str {
        "/dev/fake0"
    }
    fn open(&mut self) -> Result<StreamFormat, CaptureError> {
        if self.opened {
            return Err(CaptureError::Open {
                device: self.name().into(),
                reason: "No such file or directory".into(),
            });
        }
        self.opened = true;
        Ok(StreamFormat {
            pixel: PixelFormat::Yuyv,
            width: 32,
            height: 32,
            stride: 64,
            fps: 30.0,
        })
    }
    fn dequeue(&mut self) -> io::Result<RawBuffer<'_>> {
        Err(io::Error::from_raw_os_error(libc::ENODEV))
    }
    fn close(&mut self) {}
}

#[test]
fn a_stop_request_ends_the_camera_reconnect_loop() {
    // The "signal" arrives during the third backoff sleep; no real time passes.
    let control = Arc::new(CaptureControl::default());
    let sleeps = Arc::new(AtomicUsize::new(0));
    let sleeper = {
        let (control, sleeps) = (Arc::clone(&control), Arc::clone(&sleeps));
        move |_: Duration| {
            if sleeps.fetch_add(1, Ordering::Relaxed) == 2 {
                assert!(
                    control.reconnecting(),
                    "the outage is visible to the pipeline"
                );
                control.stop();
            }
        }
    };
    let mut camera = CameraSource::new(
        Unplugged { opened: false },
        ReconnectPolicy::default(),
        sleeper,
    )
    .unwrap();
    camera.attach(Arc::clone(&control));
    let err = camera
        .next_frame(&mut Frame::with_capacity(0, 0))
        .unwrap_err();
    assert!(matches!(err, CaptureError::Stopped), "{err}");
    assert_eq!(sleeps.load(Ordering::Relaxed), 3);
    assert!(!control.reconnecting());
}

#[test]
fn sigterm_during_a_camera_outage_ends_the_run() {
    // The stop flag a signal handler sets, raised while the camera is reconnecting.
    let stop = Arc::new(AtomicBool::new(false));
    let sleeper = {
        let stop = Arc::clone(&stop);
        move |d: Duration| {
            stop.store(true, Ordering::Relaxed);
            // A real (short) wait, so the inference loop gets to see the flag.
            std::thread::sleep(d.min(Duration::from_millis(50)));
        }
    };
    let camera = CameraSource::new(
        Unplugged { opened: false },
        ReconnectPolicy::default(),
        sleeper,
    )
    .unwrap();
    let summary = bounded(move || {
        let model = common::tiny_model();
        let mut sinks: Vec<Box<dyn Sink>> = vec![Box::new(Discard)];
        pipeline::run(
            &model,
            Box::new(camera),
            BudgetController::new(10_000.0, (64, 64), 100),
            &mut sinks,
            &options(),
            &stop,
        )
    })
    .unwrap();
    assert_eq!(summary.counters.processed, 0);
}

/// CRC-32 (IEEE), for patching PNG chunks.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A valid 1x1 PNG whose header claims `width` x `height`, as a decompression bomb's does.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut png = Vec::new();
    image::RgbImage::new(1, 1)
        .write_to(&mut io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    // Signature (8), IHDR length (4), "IHDR" (4), width, height at 16..24, CRC after 13 bytes.
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

#[test]
fn images_claiming_huge_sizes_are_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let bomb = dir.path().join("bomb.png");
    std::fs::write(&bomb, png_claiming(23_000, 23_000)).unwrap();
    let err = drape::image_io::load_rgb(&bomb).unwrap_err().to_string();
    assert!(err.contains("bomb.png"), "{err}");
    assert!(err.to_lowercase().contains("limit"), "{err}");
}

#[test]
fn a_jpeg_cut_in_half_is_an_error_not_grey() {
    let dir = tempfile::tempdir().unwrap();
    let mut jpeg = Vec::new();
    common::fixture_image("landscape")
        .write_to(&mut io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
        .unwrap();
    let whole = dir.path().join("whole.jpg");
    std::fs::write(&whole, &jpeg).unwrap();
    drape::image_io::load_rgb(&whole).unwrap();
    let half = dir.path().join("half.jpg");
    std::fs::write(&half, &jpeg[..jpeg.len() / 2]).unwrap();
    let err = drape::image_io::load_rgb(&half).unwrap_err().to_string();
    assert!(
        err.contains("half.jpg") && err.contains("truncated JPEG"),
        "{err}"
    );
}

#[test]
fn a_replay_directory_is_bounded_before_anything_is_decoded() {
    // Seven 8K frames would take 1.4 GB decoded; their files are a few hundred bytes.
    let dir = tempfile::tempdir().unwrap();
    for i in 0..7 {
        std::fs::write(
            dir.path().join(format!("{i}.png")),
            png_claiming(8192, 8192),
        )
        .unwrap();
    }
    let spec = drape::capture::SourceSpec::new(dir.path().display().to_string());
    let err = drape::capture::open(&spec).err().unwrap().to_string();
    assert!(err.contains("MiB") && err.contains(".y4m"), "{err}");
}

#[test]
fn recordings_with_absurd_headers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // (header, what the error names)
    let cases = [
        ("YUV4MPEG2 W4294967296 H4294967296 F30:1 C444\n", "width"),
        ("YUV4MPEG2 W4 H4 F1:4294967295 C444\n", "fps"),
    ];
    for (header, want) in cases {
        let path = dir.path().join("r.y4m");
        let mut bytes = header.as_bytes().to_vec();
        bytes.extend_from_slice(b"FRAME\n");
        bytes.extend_from_slice(&[0; 48]);
        std::fs::write(&path, bytes).unwrap();
        let spec = drape::capture::SourceSpec::new(path.display().to_string());
        let err = drape::capture::open(&spec).err().unwrap().to_string();
        assert!(err.contains(want), "{header}: {err}");
    }
}

/// Runs the `drape` binary and returns (exit code, stderr).
fn drape(args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_drape"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn bad_flags_are_refused_naming_the_flag() {
    let run = ["run", "--budget-ms", "100"];
    // (extra flags, the flag the message must name)
    let cases: [(&[&str], &str); 7] = [
        (&["--duration=-1"], "--duration"),
        (&["--duration", "nan"], "--duration"),
        (&["--duration", "1e300"], "--duration"),
        (&["--fps", "1e-300"], "--fps"),
        (&["--fps", "inf"], "--fps"),
        (&["--min-size", "200000"], "--min-size"),
        (&["--max-size", "18446744073709551615"], "--max-size"),
    ];
    for (extra, flag) in cases {
        let args: Vec<&str> = run.iter().chain(extra).copied().collect();
        let (code, stderr) = drape(&args);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
