//! Frame capture without a camera: pixel conversions against hand-computed BT.601 values,
//! MJPEG against frames the `image` crate encodes, the camera state machine (sequence gaps,
//! corrupt frames, unplug → backoff → replug) through a scripted fake device and clock, replay
//! pacing in real time, `.y4m` parsing, and transforms on a 3x2 image.
//!
//! Every image is generated here; there are no binary fixtures.

mod common;

use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drape::capture::convert::{yuyv_to_rgb, MjpegDecoder};
use drape::capture::{
    CameraSource, CaptureError, Crop, Device, Frame, FrameSource, PixelFormat, RawBuffer,
    ReconnectPolicy, ReplaySource, Rotation, SourceSpec, StreamFormat, Transforms,
};
use image::codecs::jpeg::JpegEncoder;
use image::{ExtendedColorType, Rgb, RgbImage};

/// JPEG round trips of flat colours land within this of the original (quality 95, 4:2:0).
const JPEG_TOLERANCE: u8 = 8;

fn assert_close(got: &[u8], want: &[u8], tolerance: u8, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let worst = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| g.abs_diff(w))
        .max()
        .unwrap_or(0);
    assert!(
        worst <= tolerance,
        "{what}: off by {worst} (> {tolerance})\n got {got:?}\nwant {want:?}"
    );
}

fn solid_jpeg(width: u32, height: u32, rgb: [u8; 3]) -> Vec<u8> {
    let image = RgbImage::from_pixel(width, height, Rgb(rgb));
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, 95)
        .encode(image.as_raw(), width, height, ExtendedColorType::Rgb8)
        .expect("encode test JPEG");
    out
}

fn repeat_pixel(rgb: [u8; 3], count: usize) -> Vec<u8> {
    rgb.iter().copied().cycle().take(count * 3).collect()
}

// BT.601 limited-range YCbCr of the primaries (Y, Cb, Cr).
const RED_YCC: [u8; 3] = [81, 90, 240];
const GREEN_YCC: [u8; 3] = [145, 54, 34];
const BLUE_YCC: [u8; 3] = [41, 240, 110];

#[test]
fn yuyv_to_rgb_known_pixels() {
    // (name, YUYV bytes, width, height, stride, expected RGB)
    type Case = (&'static str, Vec<u8>, usize, usize, usize, Vec<u8>);
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        ("black, white", vec![16, 128, 235, 128], 2, 1, 4, vec![0, 0, 0, 255, 255, 255]),
        ("red pair", vec![RED_YCC[0], RED_YCC[1], RED_YCC[0], RED_YCC[2]], 2, 1, 4, vec![255, 0, 0, 255, 0, 0]),
        ("green pair", vec![GREEN_YCC[0], GREEN_YCC[1], GREEN_YCC[0], GREEN_YCC[2]], 2, 1, 4, vec![0, 255, 0, 0, 255, 0]),
        ("blue pair", vec![BLUE_YCC[0], BLUE_YCC[1], BLUE_YCC[0], BLUE_YCC[2]], 2, 1, 4, vec![0, 0, 255, 0, 0, 255]),
        ("odd width uses the pair's first luma", vec![16, 128, 16, 128, 235, 128, 16, 128], 3, 1, 8, vec![0, 0, 0, 0, 0, 0, 255, 255, 255]),
        ("row padding is skipped", vec![16, 128, 16, 128, 99, 99, 235, 128, 235, 128, 99, 99], 2, 2, 6,
            vec![0, 0, 0, 0, 0, 0, 255, 255, 255, 255, 255, 255]),
    ];
    for (name, yuyv, width, height, stride, want) in cases {
        let mut rgb = vec![0; width * height * 3];
        yuyv_to_rgb(&yuyv, width, height, stride, &mut rgb);
        // BT.601's 8-bit primaries round-trip to within 2 in integer math.
        assert_close(&rgb, &want, 2, name);
    }
}

#[test]
fn mjpeg_to_rgb_known_colours() {
    let mut decoder = MjpegDecoder::default();
    let mut rgb = Vec::new();
    for colour in [
        [255, 0, 0],
        [0, 255, 0],
        [0, 0, 255],
        [128, 128, 128],
        [250, 200, 20],
    ] {
        let jpeg = solid_jpeg(16, 8, colour);
        // Without tables a plain JPEG decoder gives up; the camera path must not.
        assert!(image::load_from_memory(&common::without_dht(&jpeg)).is_err());
        for (variant, bytes) in [
            ("with DHT", jpeg.clone()),
            ("DHT stripped", common::without_dht(&jpeg)),
        ] {
            decoder
                .decode(&bytes, (16, 8), &mut rgb)
                .unwrap_or_else(|e| panic!("{colour:?} {variant}: {e}"));
            assert_eq!(rgb.len(), 16 * 8 * 3);
            let want = repeat_pixel(colour, 16 * 8);
            assert_close(
                &rgb,
                &want,
                JPEG_TOLERANCE,
                &format!("{colour:?} {variant}"),
            );
        }
    }
}

#[test]
fn mjpeg_decoding_reuses_the_frame_buffer() {
    let jpeg = common::without_dht(&solid_jpeg(32, 16, [10, 20, 30]));
    let mut decoder = MjpegDecoder::with_capacity(jpeg.len());
    let mut rgb = Vec::with_capacity(32 * 16 * 3);
    let buffer = rgb.as_ptr();
    for _ in 0..3 {
        decoder.decode(&jpeg, (32, 16), &mut rgb).unwrap();
    }
    assert_eq!(rgb.as_ptr(), buffer, "the output buffer was reallocated");
}

#[test]
fn an_mjpeg_frame_of_another_size_is_refused_before_the_buffer_grows() {
    // A frame header claiming more than the negotiated format (a damaged header, or a camera
    // that switched modes) must not resize the frame buffer.
    let mut decoder = MjpegDecoder::default();
    let mut rgb = Vec::with_capacity(16 * 8 * 3);
    for (w, h) in [(64, 32), (8, 8)] {
        let err = decoder
            .decode(&solid_jpeg(w, h, [1, 2, 3]), (16, 8), &mut rgb)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("frame is {w}x{h}, not the negotiated 16x8")
        );
        assert!(rgb.is_empty() && rgb.capacity() == 16 * 8 * 3);
    }
}

#[test]
fn damaged_mjpeg_is_an_error_not_grey_pixels() {
    let jpeg = solid_jpeg(16, 16, [255, 0, 0]);
    let mut decoder = MjpegDecoder::default();
    let mut rgb = Vec::new();
    for (name, bytes) in [
        ("truncated", &jpeg[..jpeg.len() / 2]),
        ("truncated just before EOI", &jpeg[..jpeg.len() - 2]),
        ("empty", &jpeg[..0]),
        ("not a JPEG", &b"\x00\x01\x02\x03"[..]),
    ] {
        assert!(
            decoder.decode(bytes, (16, 16), &mut rgb).is_err(),
            "{name} decoded"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The camera state machine through a scripted fake device.

enum Step {
    Frame {
        seq: u32,
        data: Vec<u8>,
    },
    /// The driver's buffer error flag.
    Flagged {
        seq: u32,
    },
    /// The camera is yanked: this dequeue fails with ENODEV and opens fail until replugged.
    Unplug,
}

struct FakeState {
    plugged: bool,
    script: VecDeque<Step>,
    format: StreamFormat,
    opens: u32,
    closes: u32,
}

struct FakeDevice {
    state: Arc<Mutex<FakeState>>,
    current: Vec<u8>,
}

impl FakeDevice {
    fn new(format: StreamFormat, script: Vec<Step>) -> Self {
        Self {
            state: Arc::new(Mutex::new(FakeState {
                plugged: true,
                script: script.into(),
                format,
                opens: 0,
                closes: 0,
            })),
            current: Vec::new(),
        }
    }
}

impl Device for FakeDevice {
    fn name(&self) -> &str {
        "/dev/fake0"
    }

    fn open(&mut self) -> Result<StreamFormat, CaptureError> {
        let mut state = self.state.lock().unwrap();
        if !state.plugged {
            return Err(CaptureError::Open {
                device: self.name().to_string(),
                reason: "No such file or directory".into(),
            });
        }
        state.opens += 1;
        Ok(state.format)
    }

    fn dequeue(&mut self) -> io::Result<RawBuffer<'_>> {
        let mut state = self.state.lock().unwrap();
        let (seq, error) = match state.script.pop_front() {
            Some(Step::Frame { seq, data }) => {
                self.current = data;
                (seq, false)
            }
            Some(Step::Flagged { seq }) => (seq, true),
            Some(Step::Unplug) => {
                state.plugged = false;
                return Err(io::Error::from_raw_os_error(libc::ENODEV));
            }
            None => panic!("the test asked for more frames than it scripted"),
        };
        Ok(RawBuffer {
            data: &self.current,
            sequence: seq,
            error,
            captured: Instant::now(),
            captured_at_unix_ms: 1.0e12,
        })
    }

    fn close(&mut self) {
        self.state.lock().unwrap().closes += 1;
    }
}

/// A clock that records every backoff and plugs the camera back in on the `replug_at`-th sleep.
fn recording_sleeper(
    state: Arc<Mutex<FakeState>>,
    replug_at: Option<usize>,
) -> (Arc<Mutex<Vec<Duration>>>, impl FnMut(Duration) + Send) {
    let sleeps = Arc::new(Mutex::new(Vec::new()));
    let recorded = Arc::clone(&sleeps);
    let sleeper = move |d: Duration| {
        let mut sleeps = recorded.lock().unwrap();
        sleeps.push(d);
        assert!(sleeps.len() < 100, "backoff never ended");
        if Some(sleeps.len()) == replug_at {
            state.lock().unwrap().plugged = true;
        }
    };
    (sleeps, sleeper)
}

fn yuyv_format(width: usize, height: usize) -> StreamFormat {
    StreamFormat {
        pixel: PixelFormat::Yuyv,
        width,
        height,
        stride: width * 2,
        fps: 30.0,
    }
}

/// A flat YUYV frame of one limited-range colour.
fn yuyv_frame(width: usize, height: usize, ycc: [u8; 3]) -> Vec<u8> {
    [ycc[0], ycc[1], ycc[0], ycc[2]]
        .iter()
        .copied()
        .cycle()
        .take(width * height * 2)
        .collect()
}

fn frame_of(seq: u32, data: Vec<u8>) -> Step {
    Step::Frame { seq, data }
}

#[test]
fn corrupt_mjpeg_is_skipped_and_counted() {
    let good = solid_jpeg(16, 8, [0, 0, 255]);
    let truncated = good[..good.len() / 2].to_vec();
    let format = StreamFormat {
        pixel: PixelFormat::Mjpeg,
        width: 16,
        height: 8,
        stride: 0,
        fps: 30.0,
    };
    let device = FakeDevice::new(
        format,
        vec![
            frame_of(0, truncated),
            frame_of(1, common::without_dht(&good)),
            Step::Flagged { seq: 2 },
            frame_of(3, good),
        ],
    );
    let (_, sleeper) = recording_sleeper(Arc::clone(&device.state), None);
    let mut camera = CameraSource::new(device, ReconnectPolicy::default(), sleeper).unwrap();
    let mut frame = Frame::with_capacity(16, 8);

    camera.next_frame(&mut frame).unwrap();
    assert_eq!(frame.seq, 1, "the truncated frame 0 was not skipped");
    assert_eq!((frame.width, frame.height), (16, 8));
    assert_close(
        &frame.rgb,
        &repeat_pixel([0, 0, 255], 128),
        JPEG_TOLERANCE,
        "blue",
    );
    camera.next_frame(&mut frame).unwrap();
    assert_eq!(frame.seq, 3, "the flagged frame 2 was not skipped");

    let stats = camera.stats();
    assert_eq!(
        (stats.frames, stats.corrupt, stats.driver_dropped),
        (2, 2, 0)
    );
}

#[test]
fn sequence_gaps_are_driver_drops() {
    let (w, h) = (4, 2);
    let device = FakeDevice::new(
        yuyv_format(w, h),
        vec![
            frame_of(7, yuyv_frame(w, h, RED_YCC)),
            frame_of(8, yuyv_frame(w, h, GREEN_YCC)),
            frame_of(11, yuyv_frame(w, h, BLUE_YCC)),
            // Too short for 4x2 YUYV: corrupt, yet its sequence number is no drop.
            frame_of(12, vec![16; 6]),
            frame_of(13, yuyv_frame(w, h, RED_YCC)),
        ],
    );
    let (_, sleeper) = recording_sleeper(Arc::clone(&device.state), None);
    let mut camera = CameraSource::new(device, ReconnectPolicy::default(), sleeper).unwrap();
    let mut frame = Frame::with_capacity(w, h);
    let mut seqs = Vec::new();
    for _ in 0..4 {
        camera.next_frame(&mut frame).unwrap();
        seqs.push(frame.seq);
    }
    // Numbering starts at 0 with the first buffer and follows the driver's gaps.
    assert_eq!(seqs, [0, 1, 4, 6]);
    assert_close(&frame.rgb, &repeat_pixel([255, 0, 0], w * h), 2, "red");
    let stats = camera.stats();
    assert_eq!(
        (stats.frames, stats.corrupt, stats.driver_dropped),
        (4, 1, 2)
    );
    assert_eq!(
        frame.captured_at_unix_ms, 1.0e12,
        "the device's timestamp is passed on"
    );
}

#[test]
fn unplug_backs_off_then_resumes_on_replug() {
    let (w, h) = (2, 2);
    let device = FakeDevice::new(
        yuyv_format(w, h),
        vec![
            frame_of(0, yuyv_frame(w, h, RED_YCC)),
            frame_of(1, yuyv_frame(w, h, RED_YCC)),
            Step::Unplug,
            // The replugged camera counts from 0 again.
            frame_of(0, yuyv_frame(w, h, GREEN_YCC)),
            frame_of(1, yuyv_frame(w, h, GREEN_YCC)),
        ],
    );
    let state = Arc::clone(&device.state);
    let (sleeps, sleeper) = recording_sleeper(Arc::clone(&state), Some(7));
    let mut camera = CameraSource::new(device, ReconnectPolicy::default(), sleeper).unwrap();
    let mut frame = Frame::with_capacity(w, h);

    camera.next_frame(&mut frame).unwrap();
    camera.next_frame(&mut frame).unwrap();
    assert_eq!(frame.seq, 1);
    // Blocks through the outage (on the fake clock) and returns the first frame after it.
    camera.next_frame(&mut frame).unwrap();
    assert_eq!(
        frame.seq, 2,
        "sequence numbers keep increasing across the reconnect"
    );
    assert_close(&frame.rgb, &repeat_pixel([0, 255, 0], w * h), 2, "green");
    camera.next_frame(&mut frame).unwrap();
    assert_eq!(frame.seq, 3);

    let ms = |v: u64| Duration::from_millis(v);
    assert_eq!(
        *sleeps.lock().unwrap(),
        [
            ms(100),
            ms(200),
            ms(400),
            ms(800),
            ms(1600),
            ms(2000),
            ms(2000)
        ],
        "backoff doubles from 100 ms and caps at 2 s"
    );
    let stats = camera.stats();
    assert_eq!(
        (stats.frames, stats.reconnects, stats.driver_dropped),
        (4, 1, 0)
    );
    let state = state.lock().unwrap();
    assert_eq!((state.opens, state.closes), (2, 1));
}

#[test]
fn reconnect_gives_up_when_told_to() {
    let device = FakeDevice::new(yuyv_format(2, 2), vec![Step::Unplug]);
    let (sleeps, sleeper) = recording_sleeper(Arc::clone(&device.state), None);
    let policy = ReconnectPolicy {
        give_up_after: Some(Duration::from_secs(1)),
        ..ReconnectPolicy::default()
    };
    let mut camera = CameraSource::new(device, policy, sleeper).unwrap();
    let err = camera
        .next_frame(&mut Frame::with_capacity(2, 2))
        .unwrap_err();
    assert!(
        matches!(&err, CaptureError::Disconnected { device, .. } if device == "/dev/fake0"),
        "{err}"
    );
    assert!(err.to_string().contains("No such device"), "{err}");
    // 100 + 200 + 400 + 800 ms is the first total past one second.
    assert_eq!(sleeps.lock().unwrap().len(), 4);
}

#[test]
fn a_stop_request_ends_a_reconnect_wait() {
    let device = FakeDevice::new(yuyv_format(2, 2), vec![Step::Unplug]);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (sleeps, mut sleeper) = recording_sleeper(Arc::clone(&device.state), None);
    let on_third_sleep = {
        let stop = Arc::clone(&stop);
        let sleeps = Arc::clone(&sleeps);
        move |d: Duration| {
            sleeper(d);
            if sleeps.lock().unwrap().len() == 3 {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    };
    let mut camera = CameraSource::new(device, ReconnectPolicy::default(), on_third_sleep)
        .unwrap()
        .with_stop(stop);
    let err = camera
        .next_frame(&mut Frame::with_capacity(2, 2))
        .unwrap_err();
    // The stream ends cleanly, after the wait in which the stop arrived, without another open.
    assert!(matches!(err, CaptureError::EndOfStream), "{err}");
    assert_eq!(sleeps.lock().unwrap().len(), 3);
}

#[test]
fn stoppable_sleep_ends_early_once_stopped() {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut sleep = drape::capture::StoppableSleep { stop: Some(stop) };
    let start = Instant::now();
    drape::capture::Sleep::sleep(&mut sleep, Duration::from_secs(600));
    // Bounds a hang only: a stopped sleep returns at once.
    assert!(start.elapsed() < Duration::from_secs(60));
}

#[test]
fn a_camera_missing_at_start_is_an_error() {
    let device = FakeDevice::new(yuyv_format(2, 2), vec![]);
    device.state.lock().unwrap().plugged = false;
    let (sleeps, sleeper) = recording_sleeper(Arc::clone(&device.state), None);
    let Err(err) = CameraSource::new(device, ReconnectPolicy::default(), sleeper) else {
        panic!("opened an unplugged camera");
    };
    assert!(err.to_string().contains("/dev/fake0"), "{err}");
    assert!(sleeps.lock().unwrap().is_empty());
}

#[test]
fn opening_a_missing_v4l2_node_names_it() {
    let missing = "/dev/video-drape-test-missing";
    let Err(err) = drape::capture::open(&SourceSpec::new(missing)) else {
        panic!("opened a camera that does not exist");
    };
    assert!(
        matches!(&err, CaptureError::Open { device, .. } if device == missing),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Replay.

const PALETTE: [[u8; 3]; 3] = [[200, 0, 0], [0, 200, 0], [0, 0, 200]];

/// A directory of three 8x6 PNGs, one flat colour each, named so their order is the palette's.
fn image_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (i, colour) in PALETTE.iter().enumerate() {
        RgbImage::from_pixel(8, 6, Rgb(*colour))
            .save(dir.path().join(format!("frame_{i:03}.png")))
            .unwrap();
    }
    std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();
    dir
}

fn replay(path: &Path, fps: f64, looping: bool) -> ReplaySource {
    ReplaySource::open(path, Some(fps), looping).unwrap()
}

/// The frame shows the image its sequence number selects.
fn assert_shows_slot(frame: &Frame) {
    let want = PALETTE[frame.seq as usize % PALETTE.len()];
    assert_eq!(
        &frame.rgb[..3],
        &want,
        "frame {} shows the wrong image",
        frame.seq
    );
}

#[test]
fn replay_is_paced_like_a_camera() {
    let dir = image_dir();
    let mut source = replay(dir.path(), 30.0, true);
    assert!(
        source.describe().contains("3 images"),
        "{}",
        source.describe()
    );
    let mut frame = Frame::with_capacity(8, 6);
    let t0 = Instant::now();
    let mut seqs = Vec::new();
    for _ in 0..10 {
        source.next_frame(&mut frame).unwrap();
        assert_shows_slot(&frame);
        seqs.push(frame.seq);
    }
    let elapsed = t0.elapsed();
    // Nine 33 ms intervals between ten frames; only a lower bound is safe on a busy machine.
    assert!(
        elapsed >= Duration::from_millis(250),
        "10 frames in {elapsed:?}"
    );
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let stats = source.stats();
    assert_eq!(stats.frames, 10);
    assert_eq!(
        stats.driver_dropped,
        seqs[9] - 9,
        "every missed slot is counted"
    );
    assert_eq!((frame.width, frame.height), (8, 6));
}

#[test]
fn replay_skips_to_the_current_frame_when_the_consumer_is_late() {
    let dir = image_dir();
    let mut source = replay(dir.path(), 30.0, true);
    let mut frame = Frame::with_capacity(8, 6);
    source.next_frame(&mut frame).unwrap();
    assert_eq!(frame.seq, 0);
    std::thread::sleep(Duration::from_millis(200));
    source.next_frame(&mut frame).unwrap();
    // 200 ms at 30 fps is slot 6: the current frame, not the stale slot 1.
    assert!(frame.seq >= 5, "seq {} after a 200 ms stall", frame.seq);
    assert_shows_slot(&frame);
    assert_eq!(source.stats().driver_dropped, frame.seq - 1);
    // Afterwards frames follow on the schedule; whatever is skipped is still counted.
    let previous = frame.seq;
    source.next_frame(&mut frame).unwrap();
    assert!(frame.seq > previous);
    let stats = source.stats();
    assert_eq!(stats.driver_dropped, frame.seq + 1 - stats.frames);
}

#[test]
fn replay_ends_or_loops() {
    let dir = image_dir();
    let mut frame = Frame::with_capacity(8, 6);

    // Every frame is either delivered or counted as missed, then the stream ends for good.
    let mut once = replay(dir.path(), 50.0, false);
    let mut delivered = 0;
    while once.next_frame(&mut frame).is_ok() {
        delivered += 1;
    }
    assert_eq!(delivered + once.stats().driver_dropped, 3);
    assert!(matches!(
        once.next_frame(&mut frame),
        Err(CaptureError::EndOfStream)
    ));

    let mut looping = replay(dir.path(), 200.0, true);
    for _ in 0..7 {
        looping.next_frame(&mut frame).unwrap();
        assert_shows_slot(&frame);
    }
    assert!(frame.seq >= 6);

    // A consumer that stalls past the end misses the remaining frames and sees the end.
    let mut stalled = replay(dir.path(), 100.0, false);
    stalled.next_frame(&mut frame).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(matches!(
        stalled.next_frame(&mut frame),
        Err(CaptureError::EndOfStream)
    ));
    assert_eq!(stalled.stats().driver_dropped, 2);
}

#[test]
fn replay_reuses_the_frame_buffer() {
    let dir = image_dir();
    let mut source = replay(dir.path(), 500.0, true);
    let mut frame = Frame::with_capacity(8, 6);
    source.next_frame(&mut frame).unwrap();
    let buffer = frame.rgb.as_ptr();
    for _ in 0..5 {
        source.next_frame(&mut frame).unwrap();
    }
    assert_eq!(frame.rgb.as_ptr(), buffer);
}

#[test]
fn replay_images_must_share_a_size() {
    let dir = image_dir();
    RgbImage::new(9, 6)
        .save(dir.path().join("frame_002b.png"))
        .unwrap();
    let Err(err) = ReplaySource::open(dir.path(), None, false) else {
        panic!("opened images of two sizes");
    };
    let message = err.to_string();
    assert!(
        message.contains("frame_002b.png") && message.contains("9x6"),
        "{message}"
    );

    let empty = tempfile::tempdir().unwrap();
    let Err(err) = ReplaySource::open(empty.path(), None, false) else {
        panic!("opened an empty directory");
    };
    assert!(matches!(err, CaptureError::Empty { .. }), "{err}");
}

/// A 4x2 4:2:0 recording: frame 0 is red on the left half and blue on the right, frame 1 all
/// green. Each 2x2 block shares one chroma sample, so the halves are exact.
fn write_y4m(path: &Path) {
    let mut file = b"YUV4MPEG2 W4 H2 F10:1 Ip A1:1 C420jpeg XYSCSS=420JPEG\n".to_vec();
    let [ry, rb, rr] = RED_YCC;
    let [by, bb, br] = BLUE_YCC;
    let [gy, gb, gr] = GREEN_YCC;
    file.extend_from_slice(b"FRAME\n");
    file.extend_from_slice(&[ry, ry, by, by, ry, ry, by, by]);
    file.extend_from_slice(&[rb, bb]);
    file.extend_from_slice(&[rr, br]);
    file.extend_from_slice(b"FRAME Ixyz\n");
    file.extend_from_slice(&[gy; 8]);
    file.extend_from_slice(&[gb; 2]);
    file.extend_from_slice(&[gr; 2]);
    std::fs::write(path, file).unwrap();
}

#[test]
fn y4m_frames_convert_to_known_colours() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.y4m");
    write_y4m(&path);

    let mut source = ReplaySource::open(&path, None, false).unwrap();
    assert_eq!(source.size(), (4, 2));
    assert!(
        source.describe().contains("@10fps"),
        "{}",
        source.describe()
    );
    let mut frame = Frame::with_capacity(4, 2);
    source.next_frame(&mut frame).unwrap();
    let (red, blue) = ([255, 0, 0], [0, 0, 255]);
    let row = [red, red, blue, blue].concat();
    assert_close(&frame.rgb, &[row.clone(), row].concat(), 2, "frame 0");
    source.next_frame(&mut frame).unwrap();
    assert_close(&frame.rgb, &repeat_pixel([0, 255, 0], 8), 2, "frame 1");
    assert!(matches!(
        source.next_frame(&mut frame),
        Err(CaptureError::EndOfStream)
    ));

    let overridden = ReplaySource::open(&path, Some(50.0), false).unwrap();
    assert!(
        overridden.describe().contains("@50fps"),
        "{}",
        overridden.describe()
    );
}

// ---------------------------------------------------------------------------------------------
// Transforms.

/// 3x2 test image; each pixel is [x, y, 10 * y + x] so its origin is readable.
///
/// ```text
/// a b c
/// d e f
/// ```
fn tiny() -> Vec<u8> {
    let mut rgb = Vec::new();
    for y in 0..2u8 {
        for x in 0..3u8 {
            rgb.extend_from_slice(&[x, y, 10 * y + x]);
        }
    }
    rgb
}

#[test]
fn transforms_move_known_pixels() {
    let px = |name: char| {
        let i = "abcdef".find(name).unwrap() as u8;
        [i % 3, i / 3, 10 * (i / 3) + i % 3]
    };
    let crop = Some(Crop {
        x: 1,
        y: 0,
        w: 2,
        h: 2,
    });
    let t = |rotate, flip_horizontal, crop| Transforms {
        rotate,
        flip_horizontal,
        crop,
    };
    use Rotation::*;
    #[rustfmt::skip]
    let cases = [
        ("identity", t(R0, false, None), (3, 2), "abcdef"),
        ("rotate 90 clockwise", t(R90, false, None), (2, 3), "daebfc"),
        ("rotate 180", t(R180, false, None), (3, 2), "fedcba"),
        ("rotate 270 clockwise", t(R270, false, None), (2, 3), "cfbead"),
        ("flip", t(R0, true, None), (3, 2), "cbafed"),
        ("crop", t(R0, false, crop), (2, 2), "bcef"),
        ("crop, rotate 90", t(R90, false, crop), (2, 2), "ebfc"),
        ("crop, rotate 90, flip", t(R90, true, crop), (2, 2), "becf"),
        ("rotate 90, flip", t(R90, true, None), (2, 3), "adbecf"),
        ("rotate 270, flip", t(R270, true, None), (2, 3), "fcebda"),
    ];
    let mut failures = Vec::new();
    for (name, transforms, size, pixels) in cases {
        let mut out = Vec::new();
        let got_size = transforms.apply(&tiny(), 3, 2, &mut out).unwrap();
        let want: Vec<u8> = pixels.chars().flat_map(px).collect();
        if got_size != size || out != want {
            failures.push(format!(
                "{name}: got {got_size:?} {out:?}, want {size:?} {want:?}"
            ));
        }
        assert_eq!(transforms.output_size(3, 2), size, "{name}");
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn bad_crops_are_rejected_with_the_frame_size() {
    #[rustfmt::skip]
    let crops = [
        Crop { x: 2, y: 0, w: 2, h: 1 },
        Crop { x: 0, y: 1, w: 1, h: 2 },
        Crop { x: 0, y: 0, w: 0, h: 1 },
        Crop { x: usize::MAX, y: 0, w: 2, h: 1 },
    ];
    for crop in crops {
        let transforms = Transforms {
            crop: Some(crop),
            ..Transforms::default()
        };
        let err = transforms
            .apply(&tiny(), 3, 2, &mut Vec::new())
            .unwrap_err();
        assert!(
            matches!(err, CaptureError::Crop { .. }) && err.to_string().contains("3x2"),
            "{crop}: {err}"
        );
    }
}

#[test]
fn open_applies_and_validates_transforms() {
    let dir = image_dir();
    let mut spec = SourceSpec::new(dir.path().to_str().unwrap());
    spec.fps = Some(200.0);
    spec.transforms = Transforms {
        rotate: "90".parse().unwrap(),
        flip_horizontal: true,
        crop: Some("1,1,4,2".parse().unwrap()),
    };
    let mut source = drape::capture::open(&spec).unwrap();
    let mut frame = Frame::with_capacity(2, 4);
    source.next_frame(&mut frame).unwrap();
    assert_eq!((frame.width, frame.height), (2, 4));
    assert_eq!(frame.rgb, repeat_pixel(PALETTE[0], 8));
    assert!(
        source.describe().contains("rotate 90"),
        "{}",
        source.describe()
    );

    spec.transforms.crop = Some("6,0,4,4".parse().unwrap());
    let Err(err) = drape::capture::open(&spec) else {
        panic!("accepted a crop outside the 8x6 images");
    };
    assert!(err.to_string().contains("8x6"), "{err}");
}
