//! Faults an unattended appliance meets in a store, one test each: a capture thread that
//! panics, a run loop left early, a camera that never comes back while the service is being
//! stopped. Every wait here only bounds a hang; no test depends on how fast the machine is.

mod common;

use std::io::{self, BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::scripted::{Scripted, Then};
use drape::capture::{
    CameraSource, CaptureControl, CaptureError, Device, Frame, FrameSource, PixelFormat, RawBuffer,
    ReconnectPolicy, StreamFormat,
};
use drape::clock::ManualClock;
use drape::health::RunStatus;
use drape::pipeline::{self, BudgetController, PipelineOptions};
use drape::stream::http::{AcceptBackoff, HttpOptions, HttpServer};
use drape::stream::jsonl::{JsonlFile, RotatePolicy, SinkHealth};
use drape::stream::unix::{UnixOptions, UnixServer};
use drape::stream::{Emitted, Hub, Sink};
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
    PipelineOptions::new(10_000.0)
}

/// A sink that keeps nothing.
struct Discard;

impl Sink for Discard {
    fn frame(&mut self, _: &Emitted<'_>) -> io::Result<()> {
        Ok(())
    }
}

/// `frames` flat 32x32 frames, paced so the loop sees them one by one, then `then`.
fn scripted(frames: usize, then: Then) -> Scripted {
    Scripted::flat(32, 32, 100, frames)
        .then(then)
        .paced(Duration::from_millis(2))
}

fn run_scripted(source: Scripted) -> drape::Result<pipeline::Summary> {
    run_scripted_into(source, vec![Box::new(Discard)])
}

fn run_scripted_into(
    source: Scripted,
    mut sinks: Vec<Box<dyn Sink + Send>>,
) -> drape::Result<pipeline::Summary> {
    bounded(move || {
        let model = common::tiny_model();
        let mut sinks: Vec<Box<dyn Sink>> = sinks.drain(..).map(|s| s as Box<dyn Sink>).collect();
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
    let err = run_scripted(scripted(2, Then::Panic)).unwrap_err();
    assert!(
        matches!(&err, Error::Panicked { thread: "capture", message } if message == "decoder bug"),
        "{err}"
    );
}

#[test]
fn an_early_error_in_the_run_loop_stops_a_source_that_never_ends() {
    let err = run_scripted(scripted(1, Then::Unusable)).unwrap_err();
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
        let stderr = common::run_err(common::drape_command().args(&args));
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// `n` frames, each delivered once the previous one was processed, and the sink that counts
/// them (it must be among the run's sinks).
fn frames(n: usize) -> (Scripted, Box<Count>) {
    let source = scripted(n, Then::End).lock_step();
    let count = Box::new(Count(source.seen()));
    (source, count)
}

/// Counts the frames it is given.
struct Count(Arc<AtomicUsize>);

impl Sink for Count {
    fn frame(&mut self, _: &Emitted<'_>) -> io::Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn no_rotation() -> RotatePolicy {
    RotatePolicy {
        max_bytes: None,
        keep: 0,
    }
}

#[test]
fn a_restart_appends_to_the_jsonl_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.jsonl");
    for _ in 0..2 {
        let sink = JsonlFile::open(&path, no_rotation(), SinkHealth::new("jsonl")).unwrap();
        let (source, count) = frames(3);
        run_scripted_into(source, vec![Box::new(sink), count]).unwrap();
    }
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 6, "{text}");
    for line in text.lines() {
        serde_json::from_str::<serde_json::Value>(line).unwrap();
    }
}

#[test]
fn the_jsonl_file_rotates_by_size_and_keeps_a_capped_number() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.jsonl");
    // Lines are about 700 bytes: a file holds one or two.
    let policy = RotatePolicy {
        max_bytes: Some(1500),
        keep: 2,
    };
    let sink = JsonlFile::open(&path, policy, SinkHealth::new("jsonl")).unwrap();
    let (source, count) = frames(12);
    run_scripted_into(source, vec![Box::new(sink), count]).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["out.jsonl", "out.jsonl.1", "out.jsonl.2"]);
    for name in &names {
        let text = std::fs::read_to_string(dir.path().join(name)).unwrap();
        assert!(text.len() <= 1500, "{name}: {} bytes", text.len());
        assert!(text.ends_with('\n'), "{name} ends in a whole line");
    }
}

#[test]
fn a_full_disk_disables_the_jsonl_sink_alone() {
    let health = SinkHealth::new("jsonl");
    let hub = Hub::new();
    hub.watch_sink(Arc::clone(&health));
    let sink = JsonlFile::open(Path::new("/dev/full"), no_rotation(), Arc::clone(&health)).unwrap();
    let (source, count) = frames(5);
    let summary = run_scripted_into(source, vec![Box::new(sink), count]).unwrap();
    assert_eq!(
        summary.counters.processed, 5,
        "the other sinks got every frame"
    );
    assert!(health.failing());
    assert!(health.errors() >= 1);
    let metrics = hub
        .metrics
        .render(&drape::stream::http::output_stats(&hub, 0, 0));
    assert!(
        metrics.contains(&format!(
            "drape_sink_errors_total{{sink=\"jsonl\"}} {}",
            health.errors()
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("drape_sink_up{sink=\"jsonl\"} 0"),
        "{metrics}"
    );
}

#[test]
fn the_unix_socket_has_an_explicit_mode_a_client_cap_and_keeps_a_live_instance() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("drape.sock");
    let first = UnixServer::bind(
        &path,
        Hub::new(),
        UnixOptions {
            mode: 0o640,
            max_clients: 1,
        },
    )
    .unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);

    // A second instance must not take the socket from the live first one.
    let err = UnixServer::bind(&path, Hub::new(), UnixOptions::default())
        .err()
        .unwrap();
    assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
    assert!(path.exists());

    // One client is served; the next is closed at once (EOF, not a hang).
    let _served = UnixStream::connect(&path).unwrap();
    let mut refused = UnixStream::connect(&path).unwrap();
    refused.set_read_timeout(Some(HANG)).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(refused.read(&mut buf).unwrap(), 0);

    // A stale socket (its listener gone) is replaced.
    drop(first);
    let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
    drop(stale);
    UnixServer::bind(&path, Hub::new(), UnixOptions::default()).unwrap();
}

fn http_server(addr: &str, hub: Arc<Hub>, options: HttpOptions) -> HttpServer {
    HttpServer::bind(addr, hub, options).unwrap()
}

/// Sends `request` and returns the status code and the whole response.
fn http_get(addr: SocketAddr, request: &str) -> (u16, String) {
    let r = common::http_exchange(addr, request, HANG).unwrap();
    (r.status, r.text())
}

#[test]
fn slowloris_clients_are_cut_at_the_head_deadline() {
    let server = http_server(
        "127.0.0.1:0",
        Hub::new(),
        HttpOptions {
            max_connections: 64,
            head_deadline: Duration::from_millis(300),
            ..HttpOptions::default()
        },
    );
    let addr = server.local_addr();
    // Each client trickles a header byte every 20 ms, far inside any per-read timeout; a whole
    // head would take 400 of them. Only the deadline for the whole head can end them early.
    let clients: Vec<_> = (0..20)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(b"GET / HTTP/1.1\r\nX-Slow: ").unwrap();
                for sent in 0..400 {
                    if s.write_all(b"a").is_err() {
                        return Some(sent);
                    }
                    s.set_nonblocking(true).unwrap();
                    let mut buf = [0u8; 64];
                    let read = s.read(&mut buf);
                    s.set_nonblocking(false).unwrap();
                    match read {
                        Ok(n) if n > 0 => {
                            // TCP keeps no message boundaries: read on until the status line
                            // is whole, or the server closes.
                            let mut got = buf[..n].to_vec();
                            s.set_read_timeout(Some(HANG)).unwrap();
                            while got.len() < b"HTTP/1.1 408".len() {
                                match s.read(&mut buf) {
                                    Ok(0) | Err(_) => break,
                                    Ok(m) => got.extend_from_slice(&buf[..m]),
                                }
                            }
                            let text = String::from_utf8_lossy(&got);
                            assert!(text.starts_with("HTTP/1.1 408"), "{text}");
                            return Some(sent);
                        }
                        Ok(_) => return Some(sent),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => return Some(sent),
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                None
            })
        })
        .collect();
    for c in clients {
        assert!(
            c.join().unwrap().is_some(),
            "a trickling client was never cut"
        );
    }
    // And the server still answers.
    assert_eq!(http_get(addr, "GET /healthz HTTP/1.1\r\n\r\n").0, 200);
}

#[test]
fn connections_over_the_cap_get_503_at_once() {
    let server = http_server(
        "127.0.0.1:0",
        Hub::new(),
        HttpOptions {
            max_connections: 2,
            head_deadline: HANG,
            ..HttpOptions::default()
        },
    );
    let addr = server.local_addr();
    // Two idle connections hold both places (the acceptor takes connections in order, so both
    // are counted before the third is looked at).
    let _idle: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let mut third = TcpStream::connect(addr).unwrap();
    third.set_read_timeout(Some(HANG)).unwrap();
    let mut text = String::new();
    third.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("limit 2"), "{text}");
}

/// Connection threads the failing spawner below still has to refuse.
static SPAWNS_TO_FAIL: AtomicUsize = AtomicUsize::new(0);

/// Fails while `SPAWNS_TO_FAIL` is positive, as `thread::Builder::spawn` does when the
/// process is out of memory or threads; then spawns for real.
fn failing_spawner(work: Box<dyn FnOnce() + Send>) -> io::Result<()> {
    let left = SPAWNS_TO_FAIL.load(Ordering::SeqCst);
    if left > 0 {
        SPAWNS_TO_FAIL.store(left - 1, Ordering::SeqCst);
        return Err(io::Error::new(
            io::ErrorKind::OutOfMemory,
            "Resource temporarily unavailable",
        ));
    }
    drape::stream::http::spawn_connection_thread(work)
}

#[test]
fn a_failed_connection_thread_costs_that_connection_only() {
    SPAWNS_TO_FAIL.store(3, Ordering::SeqCst);
    let server = http_server(
        "127.0.0.1:0",
        Hub::new(),
        HttpOptions {
            // Fewer places than failures: a place leaked by a failed spawn would turn the
            // next client away with 503.
            max_connections: 2,
            spawn_connection: failing_spawner,
            ..HttpOptions::default()
        },
    );
    let addr = server.local_addr();
    for _ in 0..3 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(HANG)).unwrap();
        let _ = s.write_all(b"GET /healthz HTTP/1.1\r\n\r\n");
        let mut raw = Vec::new();
        // Closed without an answer (or reset): never a response, never a hang.
        let _ = s.read_to_end(&mut raw);
        assert!(raw.is_empty(), "{}", String::from_utf8_lossy(&raw));
    }
    assert_eq!(SPAWNS_TO_FAIL.load(Ordering::SeqCst), 0);
    // The acceptor is alive and every place is free again.
    assert_eq!(http_get(addr, "GET /healthz HTTP/1.1\r\n\r\n").0, 200);
    assert_eq!(http_get(addr, "GET /healthz HTTP/1.1\r\n\r\n").0, 200);
}

#[test]
fn a_lan_bind_needs_a_token_and_a_host_that_cannot_be_rebound() {
    let err = HttpServer::bind("0.0.0.0:0", Hub::new(), HttpOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("--http-token"), "{err}");

    let hub = Hub::new();
    hub.jpeg.publish(Arc::new(vec![0xFF, 0xD8, 0xFF, 0xD9]));
    let server = http_server(
        "0.0.0.0:0",
        hub,
        HttpOptions {
            token: Some("s3cret".into()),
            allowed_hosts: vec!["mirror-12.local".into()],
            ..HttpOptions::default()
        },
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], server.local_addr().port()));
    let host = format!("127.0.0.1:{}", addr.port());
    let bearer = "Authorization: Bearer s3cret\r\n";
    // (request, expected status, text the response must contain)
    let cases = [
        (
            format!("GET /frame.jpg HTTP/1.1\r\nHost: {host}\r\n\r\n"),
            401,
            "token",
        ),
        (
            format!(
                "GET /frame.jpg HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer nope\r\n\r\n"
            ),
            401,
            "token",
        ),
        (
            format!("GET /frame.jpg HTTP/1.1\r\nHost: {host}\r\n{bearer}\r\n"),
            200,
            "image/jpeg",
        ),
        (
            format!("GET /frame.jpg HTTP/1.1\r\nHost: attacker.example\r\n{bearer}\r\n"),
            403,
            "attacker.example",
        ),
        (
            format!("GET /frame.jpg HTTP/1.1\r\n{bearer}\r\n"),
            403,
            "not served",
        ),
        (
            format!("GET /frame.jpg HTTP/1.1\r\nHost: mirror-12.local:8080\r\n{bearer}\r\n"),
            200,
            "image/jpeg",
        ),
        (
            format!("GET /frame.jpg HTTP/1.1\r\nHost: [::1]:8080\r\n{bearer}\r\n"),
            200,
            "image/jpeg",
        ),
        (
            format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n"),
            200,
            "status",
        ),
        (
            format!("GET /?token=s3cret HTTP/1.1\r\nHost: {host}\r\n\r\n"),
            200,
            "Set-Cookie: drape_token=s3cret",
        ),
        (
            format!(
                "GET /metrics HTTP/1.1\r\nHost: {host}\r\nCookie: a=b; drape_token=s3cret\r\n\r\n"
            ),
            200,
            "drape_",
        ),
    ];
    for (request, status, needle) in cases {
        let (got, text) = http_get(addr, &request);
        assert_eq!(got, status, "{request:?}: {text}");
        assert!(text.contains(needle), "{request:?}: {text}");
    }
}

/// The value of an unlabelled-or-labelled series in a /metrics page.
fn metric(addr: SocketAddr, series: &str) -> f64 {
    let (_, text) = http_get(addr, "GET /metrics HTTP/1.1\r\n\r\n");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{series} missing"))
}

#[test]
fn mjpeg_clients_get_a_heartbeat_while_no_frames_come() {
    let hub = Hub::new();
    let mut jpeg = Vec::new();
    image::RgbImage::new(8, 8)
        .write_to(&mut io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
        .unwrap();
    hub.jpeg.publish(Arc::new(jpeg.clone()));
    let server = http_server("127.0.0.1:0", hub, HttpOptions::default());
    let addr = server.local_addr();

    // One frame was ever published, yet parts keep coming: the outage heartbeat.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(HANG)).unwrap();
    s.write_all(b"GET /stream.mjpg HTTP/1.1\r\n\r\n").unwrap();
    let mut r = io::BufReader::new(s);
    let mut parts = 0;
    let mut line = Vec::new();
    while parts < 3 {
        line.clear();
        assert!(r.read_until(b'\n', &mut line).unwrap() > 0, "stream ended");
        if line.starts_with(b"--drapeframe") {
            parts += 1;
        }
    }
    drop(r);

    // A client that went away is found by the next heartbeat and its place freed.
    let clients = "drape_clients{output=\"http\"}";
    let start = Instant::now();
    while metric(addr, clients) > 0.0 {
        assert!(start.elapsed() < HANG, "the dead client kept its place");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn accept_backoff_doubles_up_to_a_cap_and_logs_once_per_outage() {
    let mut b = AcceptBackoff::default();
    let (first, log_first) = b.failed();
    let (second, log_second) = b.failed();
    assert!(log_first && !log_second);
    assert_eq!(second, first * 2);
    let last = (0..40).map(|_| b.failed().0).last().unwrap();
    assert_eq!(last, Duration::from_secs(1));
    b.succeeded();
    assert!(b.failed().1, "a new outage is logged again");
}

/// Env var that turns [`emfile_child`] into the child process of the EMFILE test.
const EMFILE_CHILD: &str = "DRAPE_TEST_EMFILE_CHILD";

/// The child of [`an_acceptor_out_of_descriptors_backs_off_and_recovers`]: serves HTTP with a
/// small descriptor limit, uses up every descriptor when told, frees them when told again.
#[test]
#[ignore = "run as the child process of an_acceptor_out_of_descriptors_backs_off_and_recovers"]
fn emfile_child() {
    if std::env::var_os(EMFILE_CHILD).is_none() {
        return;
    }
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_ansi(false)
        .init();
    let limit = rustix::process::Rlimit {
        current: Some(64),
        maximum: Some(64),
    };
    rustix::process::setrlimit(rustix::process::Resource::Nofile, limit).unwrap();
    let server = http_server("127.0.0.1:0", Hub::new(), HttpOptions::default());
    // Markers, not whole lines: the test harness may print on the same line.
    println!("port={}", server.local_addr().port());
    let mut stdin = io::stdin().lines();
    stdin.next();
    let mut hogs = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        hogs.push(f);
    }
    println!("hogging {}", hogs.len());
    stdin.next();
    drop(hogs);
    println!("released");
    stdin.next();
    drop(server);
}

#[test]
fn an_acceptor_out_of_descriptors_backs_off_and_recovers() {
    use std::process::{Command, Stdio};
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "emfile_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(EMFILE_CHILD, "1")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to_child = child.stdin.take().unwrap();
    let mut from_child = io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next_line = |want: &str| loop {
        let line = from_child.next().expect("child output").unwrap();
        if let Some(at) = line.find(want) {
            return line[at + want.len()..].to_string();
        }
    };
    let port: u16 = next_line("port=").trim().parse().unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    writeln!(to_child).unwrap();
    next_line("hogging");
    // This connection waits in the backlog while accept() fails with EMFILE.
    let mut waiting = TcpStream::connect(addr).unwrap();
    waiting.set_read_timeout(Some(HANG)).unwrap();
    waiting.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").unwrap();
    // Let a few accept attempts fail (the backoff's first waits are 10, 20, 40 ms); how many
    // does not matter, only that the server survives them.
    std::thread::sleep(Duration::from_millis(200));
    writeln!(to_child).unwrap();
    next_line("released");
    let mut text = String::new();
    waiting.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    writeln!(to_child).unwrap();
    drop(to_child);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stderr.matches("http accept failed").count(),
        1,
        "logged once per outage, not once per attempt: {stderr}"
    );
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let unit =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/drape.service"))
            .unwrap();
    // verify checks that ExecStart's binary exists: point it at the one just built.
    let unit = unit.replace("/usr/local/bin/drape", env!("CARGO_BIN_EXE_drape"));
    let path = dir.path().join("drape.service");
    std::fs::write(&path, unit).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package `systemd`) must be installed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
}

#[test]
fn the_example_config_holds_only_known_keys() {
    // Every key of deploy/drape.toml is a `drape run` flag: an unknown one would fail first.
    let stderr = common::run_err(common::drape_command().args([
        "run",
        "--config",
        "deploy/drape.toml",
        "--duration=-1",
    ]));
    assert!(stderr.contains("--duration"), "{stderr}");
}

#[test]
fn a_config_file_sets_flags_and_the_command_line_overrides_it() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "budget-ms = 100\nbudget_msec = 3\n").unwrap();
    let stderr =
        common::run_err(common::drape_command().args(["run", "--config", bad.to_str().unwrap()]));
    assert!(stderr.contains("unknown key `budget_msec`"), "{stderr}");

    let cfg = dir.path().join("drape.toml");
    std::fs::write(&cfg, "budget-ms = 100\nduration = -1\n").unwrap();
    // The file's duration is used.
    let stderr =
        common::run_err(common::drape_command().args(["run", "--config", cfg.to_str().unwrap()]));
    assert!(stderr.contains("--duration -1"), "{stderr}");

    // As a service runs it: notify socket set, stderr not a terminal.
    let notify = dir.path().join("notify");
    let listener = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    listener.set_read_timeout(Some(HANG)).unwrap();
    let jsonl = dir.path().join("out.jsonl");
    let out = common::drape_command()
        .args(["run", "--config", cfg.to_str().unwrap(), "--duration", "3"])
        .args([
            "--jsonl",
            jsonl.to_str().unwrap(),
            "--width",
            "640",
            "--log",
            "info",
        ])
        .env("NOTIFY_SOCKET", &notify)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the command line's duration wins: {stderr}"
    );
    assert!(
        stderr.contains("apply to cameras only"),
        "a warning was logged: {stderr}"
    );
    assert!(
        !stderr.contains('\x1b'),
        "no colour codes for journald: {stderr}"
    );
    let lines = std::fs::read_to_string(&jsonl).unwrap().lines().count();
    assert!(lines > 0);
    let mut messages = Vec::new();
    let mut buf = [0u8; 256];
    while let Ok(n) = listener.recv(&mut buf) {
        let m = String::from_utf8_lossy(&buf[..n]).into_owned();
        let last = m.starts_with("STOPPING=1");
        messages.push(m);
        if last {
            break;
        }
    }
    assert!(messages[0].starts_with("READY=1"), "{messages:?}");
    assert!(messages.iter().any(|m| m == "WATCHDOG=1"), "{messages:?}");
}

#[test]
fn healthz_turns_503_with_a_reason_when_frames_stop() {
    let clock = Arc::new(ManualClock::new());
    let hub = Hub::with_status(RunStatus::new(clock.clone(), None));
    let server = http_server("127.0.0.1:0", Arc::clone(&hub), HttpOptions::default());
    let addr = server.local_addr();
    let (status, text) = http_get(addr, "GET /healthz HTTP/1.1\r\n\r\n");
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"warming_up\""), "{text}");

    let stop = Arc::new(AtomicBool::new(false));
    let run = {
        let (hub, stop) = (Arc::clone(&hub), Arc::clone(&stop));
        std::thread::spawn(move || {
            let model = common::tiny_model();
            let mut sinks: Vec<Box<dyn Sink>> = vec![Box::new(drape::stream::HubSink::new(
                Arc::clone(&hub),
                model.labels().clone(),
            ))];
            let source = Scripted::flat(32, 32, 90, 1).then(Then::Stall).fps(1.0);
            let options = PipelineOptions {
                status: Some(Arc::clone(&hub.status)),
                ..PipelineOptions::new(10_000.0)
            };
            pipeline::run(
                &model,
                Box::new(source),
                BudgetController::new(10_000.0, (64, 64), 100),
                &mut sinks,
                &options,
                &stop,
            )
        })
    };
    let start = Instant::now();
    loop {
        let (status, text) = http_get(addr, "GET /healthz HTTP/1.1\r\n\r\n");
        if text.contains("\"frames_processed\":1") {
            assert_eq!(status, 200, "{text}");
            assert!(text.contains("\"ok\""), "{text}");
            break;
        }
        assert!(start.elapsed() < HANG, "no frame processed: {text}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // 1 fps: stale after 5 periods. The injected clock moves; the machine's does not matter.
    clock.advance(Duration::from_secs(6));
    let (status, text) = http_get(addr, "GET /healthz HTTP/1.1\r\n\r\n");
    assert_eq!(status, 503, "{text}");
    assert!(
        text.contains("\"stalled\"") && text.contains("no result for"),
        "{text}"
    );
    let metrics = http_get(addr, "GET /metrics HTTP/1.1\r\n\r\n").1;
    assert!(
        metrics.contains("drape_health{state=\"stalled\"} 1"),
        "{metrics}"
    );

    stop.store(true, Ordering::Relaxed);
    run.join().unwrap().unwrap();
    let (status, text) = http_get(addr, "GET /healthz HTTP/1.1\r\n\r\n");
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("\"stopped\""), "{text}");
}
