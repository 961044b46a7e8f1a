//! The live outputs with real clients: SSE, MJPEG, metrics, health, the client cap, clients
//! that stop reading, bad requests, and the Unix socket.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drape::capture;
use drape::pipeline::{self, BudgetController, PipelineOptions};
use drape::stream::http::{HttpOptions, HttpServer};
use drape::stream::unix::{UnixOptions, UnixServer};
use drape::stream::{Hub, HubSink, Sink};

const MAX_CLIENTS: usize = 2;

/// Runs the pipeline on the bundled frames with the hub's outputs until dropped.
struct Running {
    addr: SocketAddr,
    socket: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    pipeline: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Running {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("drape.sock");
        let hub = Hub::new();
        let server = HttpServer::bind(
            "127.0.0.1:0",
            Arc::clone(&hub),
            HttpOptions {
                max_clients: MAX_CLIENTS,
                io_timeout: Duration::from_secs(2),
                ..HttpOptions::default()
            },
        )
        .unwrap();
        let addr = server.local_addr();
        let unix = UnixServer::bind(&socket, Arc::clone(&hub), UnixOptions::default()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let pipeline = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let (_server, _unix) = (server, unix);
                let model = common::tiny_model();
                let source = capture::open(&common::replay_frames(15.0)).unwrap();
                let mut sinks: Vec<Box<dyn Sink>> =
                    vec![Box::new(HubSink::new(hub, model.labels().clone()))];
                let options = PipelineOptions {
                    duration: Some(Duration::from_secs(120)),
                    ..PipelineOptions::new(2000.0)
                };
                let controller = BudgetController::new(2000.0, (160, 224), 100);
                pipeline::run(&model, source, controller, &mut sinks, &options, &stop).unwrap();
            })
        };
        Self {
            addr,
            socket,
            stop,
            pipeline: Some(pipeline),
            _dir: dir,
        }
    }

    fn connect(&self, request: &str) -> TcpStream {
        let mut s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        s
    }

    /// (status, headers, body) of a plain request.
    fn get(&self, request: &str) -> (u16, String, Vec<u8>) {
        let r = common::http_exchange(self.addr, request, Duration::from_secs(20)).unwrap();
        (r.status, r.head, r.body)
    }

    fn processed(&self) -> u64 {
        let (status, _, body) = self.get("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v["frames_processed"].as_u64().unwrap()
    }

    fn http_clients(&self) -> usize {
        let (_, _, body) = self.get("GET /metrics HTTP/1.1\r\n\r\n");
        let text = String::from_utf8(body).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("drape_clients{output=\"http\"}"))
            .expect("client gauge");
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    fn wait_for_frames(&self, n: u64) {
        let start = Instant::now();
        while self.processed() < n {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "pipeline made no progress"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(p) = self.pipeline.take() {
            let _ = p.join();
        }
    }
}

/// Reads one `multipart/x-mixed-replace` part's JPEG from an MJPEG stream.
fn read_part(r: &mut BufReader<TcpStream>) -> Vec<u8> {
    let mut length = None;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if let Some(v) = line.strip_prefix("Content-Length: ") {
            length = Some(v.parse::<usize>().unwrap());
        }
        if line.is_empty() && length.is_some() {
            break;
        }
    }
    let mut jpeg = vec![0; length.unwrap()];
    r.read_exact(&mut jpeg).unwrap();
    jpeg
}

#[test]
fn live_outputs_serve_real_clients() {
    let run = Running::start();
    run.wait_for_frames(1);

    // /events: one event per processed frame, each the frame's JSON line.
    let mut events = BufReader::new(run.connect("GET /events HTTP/1.1\r\nHost: x\r\n\r\n"));
    let mut frames = Vec::new();
    while frames.len() < 3 {
        let mut line = String::new();
        assert!(
            events.read_line(&mut line).unwrap() > 0,
            "event stream ended"
        );
        if let Some(data) = line.strip_prefix("data: ") {
            let v: serde_json::Value = serde_json::from_str(data).unwrap();
            assert!(v["instances"].is_array() && v["seq"].is_u64());
            frames.push(v["seq"].as_u64().unwrap());
        }
    }
    assert!(frames.windows(2).all(|w| w[0] < w[1]), "{frames:?}");
    drop(events);

    // /stream.mjpg: each part a JPEG of the frame's size.
    let mut mjpeg = BufReader::new(run.connect("GET /stream.mjpg HTTP/1.1\r\nHost: x\r\n\r\n"));
    let mut status = String::new();
    mjpeg.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    for _ in 0..2 {
        let jpeg = read_part(&mut mjpeg);
        let img = image::load_from_memory_with_format(&jpeg, image::ImageFormat::Jpeg).unwrap();
        assert_eq!((img.width(), img.height()), (320, 240));
    }
    drop(mjpeg);

    // /frame.jpg and /metrics.
    let (status, head, body) = run.get("GET /frame.jpg HTTP/1.1\r\n\r\n");
    assert_eq!(status, 200);
    assert!(head.contains("image/jpeg"));
    image::load_from_memory_with_format(&body, image::ImageFormat::Jpeg).unwrap();
    let (status, _, body) = run.get("GET /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    let mut names = std::collections::HashSet::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        let name = series.split('{').next().unwrap();
        assert!(name.starts_with("drape_"), "{line}");
        names.insert(name.to_string());
    }
    for name in [
        "drape_frames_processed_total",
        "drape_frames_dropped_total",
        "drape_budget_misses_total",
        "drape_latency_seconds_bucket",
        "drape_stage_seconds_bucket",
    ] {
        assert!(names.contains(name), "{name} missing from /metrics");
    }

    // Two clients that stop reading take both streaming places...
    let stalled: Vec<TcpStream> = ["/stream.mjpg", "/events"]
        .iter()
        .map(|p| run.connect(&format!("GET {p} HTTP/1.1\r\n\r\n")))
        .collect();
    let start = Instant::now();
    while run.http_clients() < MAX_CLIENTS {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "stalled clients never connected"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // ...a third is refused with a clear 503 (read only the head: a 200 would never end)...
    let mut third = BufReader::new(run.connect("GET /events HTTP/1.1\r\n\r\n"));
    let mut status = String::new();
    third.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 503"), "{status}");
    let mut body = String::new();
    third.read_to_string(&mut body).unwrap();
    assert!(body.contains("limit 2"), "{body}");
    // ...and the pipeline keeps going regardless.
    let before = run.processed();
    run.wait_for_frames(before + 5);
    drop(stalled);

    // Bad requests get 4xx, and the server stays up.
    for (request, want) in [
        ("POST / HTTP/1.1\r\n\r\n", 405),
        ("GET /nope HTTP/1.1\r\n\r\n", 404),
        ("garbage\r\n\r\n", 400),
        ("GET relative HTTP/1.1\r\n\r\n", 400),
    ] {
        assert_eq!(run.get(request).0, want, "{request:?}");
    }
    let huge = format!("GET / HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "a".repeat(10_000));
    assert_eq!(run.get(&huge).0, 431);
    let (status, head, page) = run.get("GET / HTTP/1.1\r\n\r\n");
    assert_eq!(status, 200);
    assert!(head.contains("text/html"));
    let page = String::from_utf8(page).unwrap();
    assert!(page.contains("/events") && page.contains("/stream.mjpg"));
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "the page must work offline"
    );

    // Unix socket: a reading client gets every frame's line; a stalled one slows nothing.
    let _stalled_socket = UnixStream::connect(&run.socket).unwrap();
    let reader = UnixStream::connect(&run.socket).unwrap();
    reader
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut lines = BufReader::new(reader).lines();
    let mut seqs = Vec::new();
    for _ in 0..3 {
        let v: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        seqs.push(v["seq"].as_u64().unwrap());
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
}
