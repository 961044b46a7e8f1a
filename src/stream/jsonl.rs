//! JSON Lines outputs: [`JsonLines`] to any writer, and [`JsonlFile`], a file that an appliance
//! can leave alone for weeks: appended to (a restart never truncates what was written), rotated
//! by size like logrotate's `size` + `rotate` (`out.jsonl` → `out.jsonl.1` → … →
//! `out.jsonl.N`, the oldest deleted), and isolated: a write error (disk full, the card pulled)
//! disables this sink alone, is counted and logged once, and the file is retried with a
//! doubling backoff while the other outputs keep serving.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Emitted, Sink};

/// First wait before a failed file is tried again.
const RETRY_INITIAL: Duration = Duration::from_secs(1);
/// Longest wait between retries.
const RETRY_MAX: Duration = Duration::from_secs(60);

/// What `/metrics` and `/healthz` know about one output that can fail on its own.
#[derive(Debug)]
pub struct SinkHealth {
    /// The `sink` label in `drape_sink_errors_total`.
    pub name: &'static str,
    errors: AtomicU64,
    failing: AtomicBool,
}

impl SinkHealth {
    pub fn new(name: &'static str) -> Arc<Self> {
        Arc::new(Self {
            name,
            errors: AtomicU64::new(0),
            failing: AtomicBool::new(false),
        })
    }

    /// Write errors so far (each failed attempt counts once).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// The sink is disabled until its next retry succeeds.
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }
}

/// Rotation policy: `None` for `max_bytes` never rotates.
#[derive(Debug, Clone, Copy)]
pub struct RotatePolicy {
    pub max_bytes: Option<u64>,
    /// Rotated files kept beside the live one.
    pub keep: usize,
}

/// JSON Lines to any writer (stdout, a file), flushed per frame so a reader downstream sees
/// each result as it is made.
pub struct JsonLines<W: Write>(pub W);

impl<W: Write> Sink for JsonLines<W> {
    fn frame(&mut self, out: &Emitted<'_>) -> std::io::Result<()> {
        self.0.write_all(out.line)?;
        self.0.write_all(b"\n")?;
        self.0.flush()
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// The file sink; see the module docs.
pub struct JsonlFile {
    path: PathBuf,
    rotation: RotatePolicy,
    out: Option<BufWriter<File>>,
    /// Bytes in the live file.
    size: u64,
    health: Arc<SinkHealth>,
    clock: Box<dyn Fn() -> Instant + Send>,
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Lines not written while the sink was failing.
    lost: u64,
}

impl JsonlFile {
    /// Opens `path` for appending (creating it); failing to open it at start is an error, since
    /// then the setting itself is likely wrong.
    pub fn open(path: &Path, rotation: RotatePolicy, health: Arc<SinkHealth>) -> io::Result<Self> {
        Self::with_clock(path, rotation, health, Box::new(Instant::now))
    }

    /// As [`Self::open`], deciding retries by `clock` (tests hand it a fake one).
    pub fn with_clock(
        path: &Path,
        rotation: RotatePolicy,
        health: Arc<SinkHealth>,
        clock: Box<dyn Fn() -> Instant + Send>,
    ) -> io::Result<Self> {
        let mut sink = Self {
            path: path.to_path_buf(),
            rotation,
            out: None,
            size: 0,
            health,
            clock,
            retry_at: None,
            backoff: RETRY_INITIAL,
            lost: 0,
        };
        sink.reopen()?;
        Ok(sink)
    }

    fn reopen(&mut self) -> io::Result<()> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        // Character devices (/dev/stdout, /dev/full) report 0 and never rotate.
        let meta = file.metadata()?;
        self.size = if meta.is_file() { meta.len() } else { 0 };
        self.out = Some(BufWriter::new(file));
        Ok(())
    }

    fn rotated(&self, n: usize) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    /// Shifts `path.1..` up by one, drops the oldest beyond `keep`, and starts a new file.
    fn rotate(&mut self) -> io::Result<()> {
        if let Some(mut out) = self.out.take() {
            out.flush()?;
        }
        if self.rotation.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(self.rotated(self.rotation.keep));
            for n in (1..self.rotation.keep).rev() {
                let from = self.rotated(n);
                if from.exists() {
                    std::fs::rename(&from, self.rotated(n + 1))?;
                }
            }
            std::fs::rename(&self.path, self.rotated(1))?;
        }
        self.reopen()
    }

    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        let len = line.len() as u64 + 1;
        let full = self
            .rotation
            .max_bytes
            .is_some_and(|max| self.size > 0 && self.size + len > max);
        if full || self.out.is_none() {
            if full {
                self.rotate()?;
            } else {
                self.reopen()?;
            }
        }
        let out = self.out.as_mut().expect("opened above");
        out.write_all(line)?;
        out.write_all(b"\n")?;
        out.flush()?;
        self.size += len;
        Ok(())
    }

    fn fail(&mut self, error: &io::Error, now: Instant) {
        self.health.errors.fetch_add(1, Ordering::Relaxed);
        if !self.health.failing.swap(true, Ordering::Relaxed) {
            tracing::error!(path = %self.path.display(), %error,
                "JSON Lines output failed; disabled, retrying with backoff while the other outputs keep serving");
        } else {
            tracing::debug!(path = %self.path.display(), %error, "JSON Lines retry failed");
        }
        // Whatever was buffered may be half-written; start from a fresh handle next time.
        self.out = None;
        self.retry_at = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(RETRY_MAX);
    }
}

impl Sink for JsonlFile {
    /// Never fails: errors are isolated here (see the module docs).
    fn frame(&mut self, out: &Emitted<'_>) -> io::Result<()> {
        let now = (self.clock)();
        if self.retry_at.is_some_and(|at| now < at) {
            self.lost += 1;
            return Ok(());
        }
        match self.write_line(out.line) {
            Ok(()) => {
                if self.health.failing.swap(false, Ordering::Relaxed) {
                    tracing::warn!(path = %self.path.display(), lost = self.lost,
                        "JSON Lines output recovered");
                }
                self.retry_at = None;
                self.backoff = RETRY_INITIAL;
                self.lost = 0;
            }
            Err(e) => {
                self.lost += 1;
                self.fail(&e, now);
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(out) = self.out.as_mut() {
            if let Err(e) = out.flush() {
                // At shutdown: logged, not fatal, like every other failure of this sink.
                tracing::warn!(path = %self.path.display(), error = %e, "flushing JSON Lines");
            }
        }
        Ok(())
    }
}
