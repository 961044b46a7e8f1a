//! A small HTTP/1.1 server for the live preview: one thread per connection, one request per
//! connection, strict limits on request size and time, and a cap on streaming clients.
//!
//! Every resource is bounded, as an appliance on a shop's LAN needs: connections are capped
//! (the excess gets a 503 from the acceptor and is closed at once), the whole request head must
//! arrive within a deadline (nginx's `client_header_timeout`; a per-read timeout alone lets a
//! client trickling a byte a second hold its thread for hours), a failing `accept` (out of
//! descriptors) backs off instead of spinning, and a thread that cannot be spawned costs that
//! one connection. Bound to anything but loopback, the server requires a bearer token on every
//! route except `/healthz` and accepts only Host headers that are IP addresses or names it was
//! told, so a DNS-rebinding page in a shopper's browser cannot read the camera.
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
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
/// First and longest wait after `accept` fails (EMFILE, ENOMEM), doubling in between.
const ACCEPT_BACKOFF_INITIAL: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How long the acceptor spends telling a connection over the cap that it is refused.
const REFUSE_WRITE_TIMEOUT: Duration = Duration::from_millis(100);
/// Cookie the page's own requests carry the token in once it was given as `?token=`.
const TOKEN_COOKIE: &str = "drape_token";

#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Concurrent streaming clients (`/stream.mjpg`, `/events`); more get 503.
    pub max_clients: usize,
    /// Concurrent connections of any kind; more get 503 from the acceptor and are closed.
    pub max_connections: usize,
    /// A client that takes our bytes slower than this is dropped.
    pub io_timeout: Duration,
    /// The whole request head must arrive within this of the connection being accepted.
    pub head_deadline: Duration,
    /// Required as `Authorization: Bearer …` (or `?token=`, then a cookie) on every route but
    /// `/healthz`. Mandatory when the address is not loopback.
    pub token: Option<String>,
    /// Host names (without port) accepted besides IP addresses and `localhost` when the
    /// address is not loopback, e.g. the mirror's own `mirror-12.local`.
    pub allowed_hosts: Vec<String>,
    /// Starts a connection's thread. [`spawn_connection_thread`] unless a test makes it fail,
    /// to check that the acceptor survives a failed spawn (out of memory or threads), which
    /// cannot be provoked reliably from a test, least of all as root.
    pub spawn_connection: SpawnConnection,
}

/// How the acceptor starts a connection's thread.
pub type SpawnConnection = fn(Box<dyn FnOnce() + Send>) -> io::Result<()>;

/// A named thread per connection.
pub fn spawn_connection_thread(work: Box<dyn FnOnce() + Send>) -> io::Result<()> {
    std::thread::Builder::new()
        .name("http-client".into())
        .spawn(work)
        .map(drop)
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            max_clients: 8,
            max_connections: 32,
            io_timeout: Duration::from_secs(5),
            head_deadline: Duration::from_secs(10),
            token: None,
            allowed_hosts: Vec::new(),
            spawn_connection: spawn_connection_thread,
        }
    }
}

/// Why [`HttpServer::bind`] refused to start.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(
        "{0} is reachable from other machines: give a token (--http-token, `http-token` in the \
         config file or DRAPE_HTTP_TOKEN) or bind to 127.0.0.1"
    )]
    TokenRequired(SocketAddr),
    #[error("{0}")]
    Invalid(String),
}

struct Shared {
    hub: Arc<Hub>,
    options: HttpOptions,
    /// Loopback binds skip the Host and token checks: only this machine can connect.
    loopback: bool,
    connections: AtomicUsize,
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
    pub fn bind(addr: &str, hub: Arc<Hub>, options: HttpOptions) -> Result<Self, BindError> {
        if options.max_clients == 0 || options.max_connections == 0 {
            return Err(BindError::Invalid(
                "the HTTP client and connection limits must be at least 1".into(),
            ));
        }
        if options.token.as_deref().is_some_and(str::is_empty) {
            return Err(BindError::Invalid(
                "the HTTP token must not be empty".into(),
            ));
        }
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let loopback = addr.ip().is_loopback();
        if !loopback && options.token.is_none() {
            return Err(BindError::TokenRequired(addr));
        }
        let shared = Arc::new(Shared {
            hub,
            options,
            loopback,
            connections: AtomicUsize::new(0),
            streaming: AtomicUsize::new(0),
            mjpeg_skipped: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("http-accept".into())
                .spawn(move || accept_loop(&listener, &shared))?
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

/// Accepts until stopped: caps connections, backs off on errors, survives spawn failures.
fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let mut backoff = AcceptBackoff::default();
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        let stream = match stream {
            Ok(s) => {
                backoff.succeeded();
                s
            }
            Err(e) => {
                let (delay, first) = backoff.failed();
                if first {
                    tracing::warn!(error = %e, "http accept failed; backing off");
                }
                std::thread::sleep(delay);
                continue;
            }
        };
        let Some(place) = ConnectionPlace::acquire(shared) else {
            refuse(stream, shared.options.max_connections);
            continue;
        };
        let worker = Arc::clone(shared);
        let spawned = (shared.options.spawn_connection)(Box::new(move || {
            let _place = place;
            if let Err(e) = handle(stream, &worker) {
                tracing::debug!("http client: {e}");
            }
        }));
        if let Err(e) = spawned {
            // The closure, its stream and its place are dropped: the client sees a close.
            tracing::warn!("http: cannot start a connection thread: {e}");
        }
    }
}

/// Doubling waits while `accept` keeps failing; the first failure of a run is logged.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    failures: u32,
}

impl AcceptBackoff {
    /// The wait after one more failure, and whether it starts a new run of failures.
    pub fn failed(&mut self) -> (Duration, bool) {
        let delay = ACCEPT_BACKOFF_INITIAL
            .saturating_mul(1 << self.failures.min(16))
            .min(ACCEPT_BACKOFF_MAX);
        self.failures += 1;
        (delay, self.failures == 1)
    }

    pub fn succeeded(&mut self) {
        if self.failures > 0 {
            tracing::info!(failures = self.failures, "http accept recovered");
        }
        self.failures = 0;
    }
}

/// One of `max_connections`, released on drop (including when its thread never started).
/// Counts one more user of `count` unless `max` are already in; the caller releases it.
fn take_place(count: &AtomicUsize, max: usize) -> bool {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

struct ConnectionPlace(Arc<Shared>);

impl ConnectionPlace {
    fn acquire(shared: &Arc<Shared>) -> Option<Self> {
        take_place(&shared.connections, shared.options.max_connections)
            .then(|| Self(Arc::clone(shared)))
    }
}

impl Drop for ConnectionPlace {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Answers a connection over the cap from the acceptor itself, briefly, and closes it.
fn refuse(mut stream: TcpStream, limit: usize) {
    let _ = stream.set_write_timeout(Some(REFUSE_WRITE_TIMEOUT));
    let body = format!("too many connections (limit {limit})\n");
    // One write, as in `respond_with`.
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nRetry-After: 5\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
}

/// The output-side numbers `/metrics` adds to the pipeline's.
pub fn output_stats(hub: &Hub, http_clients: usize, mjpeg_skipped: u64) -> OutputStats {
    OutputStats {
        http_clients,
        events_dropped: hub.events.dropped(),
        socket_clients: hub.socket.subscribers(),
        socket_dropped: hub.socket.dropped(),
        mjpeg_skipped,
        sinks: hub.sink_states(),
        health: hub.health().state,
    }
}

/// Reads the request head, all of it before `deadline`; `Ok(None)` when the client went away
/// first.
fn read_head(stream: &mut TcpStream, deadline: Instant) -> io::Result<Option<Result<String, u16>>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        // Each read may wait only for what is left of the head's deadline.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Some(Err(408)));
        }
        stream.set_read_timeout(Some(left))?;
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

/// The value of header `name` (case-insensitive) in a request head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Whether `host` (a Host header's value) names this server in a way DNS rebinding cannot
/// fake: an IP literal, `localhost`, or a name the operator listed.
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = match host.strip_prefix('[') {
        // [v6]:port
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                host
            }
        }),
    };
    name.parse::<IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
}

/// Compares without an early exit, so the time taken says nothing about the token.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// How the request proved it holds the token: `Some(true)` from the query string (the page
/// then sets the cookie), `Some(false)` from a header or the cookie, `None` not at all.
fn token_given(head: &str, target: &str, token: &str) -> Option<bool> {
    let bearer = header(head, "authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| same_secret(t.trim().as_bytes(), token.as_bytes()));
    let cookie = header(head, "cookie").is_some_and(|c| {
        c.split(';').any(|kv| {
            kv.trim()
                .strip_prefix(TOKEN_COOKIE)
                .and_then(|v| v.strip_prefix('='))
                .is_some_and(|v| same_secret(v.as_bytes(), token.as_bytes()))
        })
    });
    if bearer || cookie {
        return Some(false);
    }
    let query = target.split_once('?').map_or("", |(_, q)| q);
    query
        .split('&')
        .filter_map(|kv| kv.strip_prefix("token="))
        .any(|v| same_secret(v.as_bytes(), token.as_bytes()))
        .then_some(true)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
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
    respond_with(stream, status, content_type, body, head_only, "")
}

/// [`respond`] with `headers` (each ending in CRLF) added.
fn respond_with(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    head_only: bool,
    headers: &str,
) -> io::Result<()> {
    let extra = match status {
        503 => "Retry-After: 5\r\n",
        401 => "WWW-Authenticate: Bearer realm=\"drape\"\r\n",
        _ => "",
    };
    // Formatted first and sent in one write: `write!` on the socket made a system call, and
    // often a TCP segment, per piece of the format string, so a client could read the status
    // line cut after "HTTP/1.1 ".
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\n{extra}{headers}Connection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    stream.write_all(head.as_bytes())?;
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
    let deadline = Instant::now() + shared.options.head_deadline;
    stream.set_write_timeout(Some(shared.options.io_timeout))?;
    let head = match read_head(stream, deadline)? {
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
    let mut set_cookie = String::new();
    if !shared.loopback {
        let host = header(&head, "host").unwrap_or("");
        if !host_allowed(host, &shared.options.allowed_hosts) {
            return error(stream, 403, &format!("host `{host}` is not served here"));
        }
    }
    if let (Some(token), false) = (&shared.options.token, path == "/healthz") {
        match token_given(&head, target, token) {
            None => return error(stream, 401, "a bearer token is required"),
            Some(true) => {
                set_cookie = format!(
                    "Set-Cookie: {TOKEN_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/\r\n"
                )
            }
            Some(false) => {}
        }
    }
    let hub = &shared.hub;
    match path {
        "/" | "/index.html" => respond_with(
            stream,
            200,
            "text/html; charset=utf-8",
            PAGE.as_bytes(),
            head_only,
            &set_cookie,
        ),
        "/healthz" => {
            let health = hub.health();
            let body = serde_json::json!({
                "status": health.state.name(),
                "reason": health.reason,
                "frames_processed": hub.metrics.counters().processed,
                "last_result_age_s": health.last_result_age.map(|a| a.as_secs_f64()),
            });
            let code = if health.state.healthy() { 200 } else { 503 };
            respond(
                stream,
                code,
                "application/json",
                body.to_string().as_bytes(),
                head_only,
            )
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
        take_place(&shared.streaming, shared.options.max_clients).then(|| Self(&shared.streaming))
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
        let (generation, jpeg) = match shared.hub.jpeg.newer_than(seen, TICK) {
            Some(newer) => newer,
            // No new frame for a tick (a camera outage, say): send the last one again. The
            // write is the heartbeat that finds a client gone away and frees its place.
            None => match shared.hub.jpeg.current() {
                Some(current) => current,
                None => continue,
            },
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
