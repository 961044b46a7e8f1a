//! A small HTTP/1.1 server for the live preview: one thread per connection, one request per
//! connection, strict limits on request size and time, and a cap on streaming clients.
//!
//! | route          | what                                                           |
//! |----------------|----------------------------------------------------------------|
//! | `/`            | self-contained page: live view, instances, latency stats       |
//! | `/stream.mjpg` | overlaid frames, `multipart/x-mixed-replace` MJPEG            |
//! | `/events`      | Server-Sent Events, one per processed frame (the JSONL line)   |
//! | `/frame.jpg`   | the newest overlaid frame                                      |
//! | `/healthz`     | liveness                                                       |
//! | `/metrics`     | Prometheus text format                                         |
//!
//! Written on `std::net` rather than a framework because the hard parts here are the
//! streaming policies (newest-frame-only, bounded queues, write timeouts that cut stalled
//! clients loose), which a request/response framework would have to be bent around.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;

use super::metrics::OutputStats;
use super::Hub;

const PAGE: &str = include_str!("page.html");
/// Requests larger than this are refused (431): a browser's GET is well under 2 KiB.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
const MJPEG_BOUNDARY: &str = "drapeframe";
/// Lines an SSE client may fall behind by before it loses some.
const EVENT_QUEUE: usize = 16;
/// How often idle streaming loops wake to check for shutdown (and SSE sends a keep-alive).
const TICK: Duration = Duration::from_secs(1);
/// How long, and how much, unread request bytes are drained before closing.
const LINGER: Duration = Duration::from_millis(200);
const MAX_LINGER_BYTES: u64 = 64 * 1024;

#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Concurrent streaming clients (`/stream.mjpg`, `/events`); more get 503.
    pub max_clients: usize,
    /// A client that sends its request or takes our bytes slower than this is dropped.
    pub io_timeout: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            max_clients: 8,
            io_timeout: Duration::from_secs(5),
        }
    }
}

struct Shared {
    hub: Arc<Hub>,
    options: HttpOptions,
    streaming: AtomicUsize,
    mjpeg_skipped: AtomicU64,
    stop: AtomicBool,
}

/// A running server; dropping it stops accepting and ends the streaming loops.
pub struct HttpServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl HttpServer {
    pub fn bind(addr: &str, hub: Arc<Hub>, options: HttpOptions) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            hub,
            options,
            streaming: AtomicUsize::new(0),
            mjpeg_skipped: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if shared.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let shared = Arc::clone(&shared);
                    std::thread::spawn(move || {
                        if let Err(e) = handle(stream, &shared) {
                            tracing::debug!("http client: {e}");
                        }
                    });
                }
            })
        };
        tracing::info!(%addr, "http server listening");
        Ok(Self {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Wake the blocking accept with a connection of our own.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

/// The output-side numbers `/metrics` adds to the pipeline's.
pub fn output_stats(hub: &Hub, http_clients: usize, mjpeg_skipped: u64) -> OutputStats {
    OutputStats {
        http_clients,
        events_dropped: hub.events.dropped(),
        socket_clients: hub.socket.subscribers(),
        socket_dropped: hub.socket.dropped(),
        mjpeg_skipped,
    }
}

/// Reads the request head; `Ok(None)` when the client went away first.
fn read_head(stream: &mut TcpStream) -> io::Result<Option<Result<String, u16>>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Ok(None),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(Some(Err(408)))
            }
            Err(e) => return Err(e),
        };
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Some(
                String::from_utf8(buf[..end].to_vec()).map_err(|_| 400),
            ));
        }
        if buf.len() > MAX_REQUEST_BYTES {
            return Ok(Some(Err(431)));
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    head_only: bool,
) -> io::Result<()> {
    let extra = if status == 503 {
        "Retry-After: 5\r\n"
    } else {
        ""
    };
    write!(
        stream,
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\n{extra}Connection: close\r\n\r\n",
        reason(status),
        body.len()
    )?;
    if !head_only {
        stream.write_all(body)?;
    }
    stream.flush()
}

fn error(stream: &mut TcpStream, status: u16, message: &str) -> io::Result<()> {
    respond(
        stream,
        status,
        "text/plain; charset=utf-8",
        format!("{message}\n").as_bytes(),
        false,
    )
}

fn handle(mut stream: TcpStream, shared: &Shared) -> io::Result<()> {
    let result = route(&mut stream, shared);
    // Lingering close: a client whose request we did not read to the end (a refused
    // oversized one) would otherwise get a reset instead of our answer.
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(LINGER));
    let _ = io::copy(&mut (&stream).take(MAX_LINGER_BYTES), &mut io::sink());
    result
}

fn route(stream: &mut TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_read_timeout(Some(shared.options.io_timeout))?;
    stream.set_write_timeout(Some(shared.options.io_timeout))?;
    let head = match read_head(stream)? {
        None => return Ok(()),
        Some(Err(status)) => return error(stream, status, reason(status)),
        Some(Ok(head)) => head,
    };
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return error(stream, 400, "malformed request line");
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return error(stream, 400, "malformed request line");
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return error(stream, 405, "only GET and HEAD are served"),
    };
    let path = target.split(['?', '#']).next().unwrap_or("/");
    let hub = &shared.hub;
    match path {
        "/" | "/index.html" => respond(
            stream,
            200,
            "text/html; charset=utf-8",
            PAGE.as_bytes(),
            head_only,
        ),
        "/healthz" => {
            let c = hub.metrics.counters();
            let body = format!("{{\"status\":\"ok\",\"frames_processed\":{}}}", c.processed);
            respond(stream, 200, "application/json", body.as_bytes(), head_only)
        }
        "/metrics" => {
            let stats = output_stats(
                hub,
                shared.streaming.load(Ordering::Relaxed),
                shared.mjpeg_skipped.load(Ordering::Relaxed),
            );
            let body = hub.metrics.render(&stats);
            respond(
                stream,
                200,
                "text/plain; version=0.0.4",
                body.as_bytes(),
                head_only,
            )
        }
        "/frame.jpg" => match hub.jpeg.current() {
            Some((_, jpeg)) => respond(stream, 200, "image/jpeg", &jpeg, head_only),
            None => error(stream, 503, "no frame has been processed yet"),
        },
        "/stream.mjpg" | "/events" => {
            let Some(_slot) = StreamingSlot::acquire(shared) else {
                let limit = shared.options.max_clients;
                return error(
                    stream,
                    503,
                    &format!("too many streaming clients (limit {limit})"),
                );
            };
            if path == "/events" {
                stream_events(stream, shared, head_only)
            } else {
                stream_mjpeg(stream, shared, head_only)
            }
        }
        _ => error(stream, 404, &format!("no such page: {path}")),
    }
}

/// One of the capped streaming places, released on drop.
struct StreamingSlot<'a>(&'a AtomicUsize);

impl<'a> StreamingSlot<'a> {
    fn acquire(shared: &'a Shared) -> Option<Self> {
        let max = shared.options.max_clients;
        shared
            .streaming
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(&shared.streaming))
    }
}

impl Drop for StreamingSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn stream_mjpeg(stream: &mut TcpStream, shared: &Shared, head_only: bool) -> io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary={MJPEG_BOUNDARY}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n"
    )?;
    if head_only {
        return stream.flush();
    }
    let mut seen = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        let Some((generation, jpeg)) = shared.hub.jpeg.newer_than(seen, TICK) else {
            continue;
        };
        if seen > 0 && generation > seen + 1 {
            shared
                .mjpeg_skipped
                .fetch_add(generation - seen - 1, Ordering::Relaxed);
        }
        seen = generation;
        write!(
            stream,
            "--{MJPEG_BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n",
            jpeg.len()
        )?;
        stream.write_all(&jpeg)?;
        stream.write_all(b"\r\n")?;
        stream.flush()?;
    }
    Ok(())
}

fn stream_events(stream: &mut TcpStream, shared: &Shared, head_only: bool) -> io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n\
         Connection: close\r\n\r\n"
    )?;
    stream.flush()?;
    if head_only {
        return Ok(());
    }
    let lines = shared.hub.events.subscribe(EVENT_QUEUE);
    while !shared.stop.load(Ordering::Relaxed) {
        match lines.recv_timeout(TICK) {
            Ok(line) => {
                stream.write_all(b"data: ")?;
                stream.write_all(&line)?;
                stream.write_all(b"\n\n")?;
            }
            Err(RecvTimeoutError::Timeout) => stream.write_all(b": keep-alive\n\n")?,
            Err(RecvTimeoutError::Disconnected) => break,
        }
        stream.flush()?;
    }
    Ok(())
}
