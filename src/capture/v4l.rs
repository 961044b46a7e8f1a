//! V4L2 cameras through the `v4l` crate: capability enumeration, format negotiation
//! ([`super::negotiate()`]), mmap streaming with four kernel buffers, and driver timestamps mapped
//! to the process's clocks.
//!
//! The buffer queue is driven with the V4L2 ioctls directly (`MmapQueue`) rather than through
//! `v4l::io::mmap::Stream`: that stream requeues the previous buffer inside `next`, so a dequeue
//! that fails with EAGAIN (a spurious wake-up) or EINTR (a signal during the wait) cannot be
//! retried — the retry queues the same buffer twice — and every such hiccup would cost a
//! reconnect; its `Drop` also panics when stopping fails with anything but ENODEV.
//!
//! Run `drape cameras` to see what each `/dev/video*` node offers.

use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ::v4l::buffer::{Flags as BufferFlags, Metadata, Type};
use ::v4l::frameinterval::FrameIntervalEnum;
use ::v4l::framesize::FrameSizeEnum;
use ::v4l::memory::Memory;
use ::v4l::v4l2::vidioc;
use ::v4l::v4l_sys::{v4l2_buffer, v4l2_requestbuffers};
use ::v4l::video::capture::Parameters;
use ::v4l::video::Capture;
use ::v4l::{Format, FourCC, Fraction, Timestamp};

use super::camera::{Device, RawBuffer, StreamFormat};
use super::negotiate::{
    negotiate, Capability, FormatRequest, FourCc, DEFAULT_HEIGHT, DEFAULT_WIDTH,
};
use super::CameraInfo;
use super::{CaptureError, PixelFormat};

/// Kernel buffers in flight: one being filled, one being converted, two of slack so a slow
/// conversion does not make the driver drop frames.
const BUFFER_COUNT: u32 = 4;
/// A camera that delivers nothing for this long is treated as lost and reopened. UVC cameras
/// that crash firmware-side stay enumerated but go silent.
const STALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Lists the `/dev/video*` nodes that capture video, sorted by path. Nodes that cannot be opened
/// or that offer no capture format (UVC metadata nodes) are left out.
pub fn list_cameras() -> Vec<CameraInfo> {
    cameras_in(Path::new("/dev"))
}

/// The capture devices among `dir`'s `video*` nodes.
fn cameras_in(dir: &Path) -> Vec<CameraInfo> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("video"))
        })
        .collect();
    paths.sort();
    paths
        .into_iter()
        .filter_map(|path| {
            let dev = ::v4l::Device::with_path(&path).ok()?;
            let caps = dev.query_caps().ok()?;
            let formats = capabilities(&dev, None).ok()?;
            (!formats.is_empty()).then_some(CameraInfo {
                path,
                name: caps.card,
                driver: caps.driver,
                bus: caps.bus,
                formats,
            })
        })
        .collect()
}

/// Everything `dev` advertises for capture. With a `request`, continuous ranges also list the
/// requested size and rate so negotiation can pick them exactly.
fn capabilities(
    dev: &::v4l::Device,
    request: Option<&FormatRequest>,
) -> io::Result<Vec<Capability>> {
    let mut caps = Vec::new();
    for desc in dev.enum_formats()? {
        // A format whose sizes cannot be enumerated is one we cannot negotiate; skip it.
        let Ok(sizes) = dev.enum_framesizes(desc.fourcc) else {
            continue;
        };
        for size in sizes {
            for (width, height) in sizes_of(size.size, request) {
                let rates = dev
                    .enum_frameintervals(desc.fourcc, width, height)
                    .map(|intervals| {
                        intervals
                            .into_iter()
                            .flat_map(|i| rates_of(i.interval, request))
                            .collect()
                    })
                    .unwrap_or_else(|_| vec![0.0]);
                for fps in rates {
                    caps.push(Capability {
                        fourcc: FourCc(desc.fourcc.repr),
                        width,
                        height,
                        fps,
                    });
                }
            }
        }
    }
    Ok(caps)
}

fn sizes_of(size: FrameSizeEnum, request: Option<&FormatRequest>) -> Vec<(u32, u32)> {
    match size {
        FrameSizeEnum::Discrete(d) => vec![(d.width, d.height)],
        FrameSizeEnum::Stepwise(s) => {
            let snap = |want: u32, min: u32, max: u32, step: u32| {
                let want = want.clamp(min, max);
                min + (want - min) / step.max(1) * step.max(1)
            };
            let mut sizes = vec![(s.min_width, s.min_height), (s.max_width, s.max_height)];
            if let Some(r) = request {
                sizes.push((
                    snap(
                        r.width.unwrap_or(DEFAULT_WIDTH),
                        s.min_width,
                        s.max_width,
                        s.step_width,
                    ),
                    snap(
                        r.height.unwrap_or(DEFAULT_HEIGHT),
                        s.min_height,
                        s.max_height,
                        s.step_height,
                    ),
                ));
            }
            sizes
        }
    }
}

fn rates_of(interval: FrameIntervalEnum, request: Option<&FormatRequest>) -> Vec<f64> {
    let fps = |f: Fraction| {
        if f.numerator == 0 {
            0.0
        } else {
            f64::from(f.denominator) / f64::from(f.numerator)
        }
    };
    match interval {
        FrameIntervalEnum::Discrete(f) => vec![fps(f)],
        // The shortest interval is the fastest rate.
        FrameIntervalEnum::Stepwise(s) => {
            let (fastest, slowest) = (fps(s.min), fps(s.max));
            let mut rates = vec![fastest, slowest];
            if let Some(r) = request.filter(|r| (slowest..=fastest).contains(&r.fps)) {
                rates.push(r.fps);
            }
            rates
        }
    }
}

/// A V4L2 capture node; see [`Device`].
pub struct V4l2Device {
    path: PathBuf,
    name: String,
    request: FormatRequest,
    open: Option<Streaming>,
}

struct Streaming {
    // Field order matters: the queue (its mappings) goes before the device handle it maps.
    queue: MmapQueue,
    _device: ::v4l::Device,
}

impl V4l2Device {
    /// A device that will stream from `path` in the format `request` negotiates to. Nothing is
    /// opened until [`Device::open`].
    pub fn new(path: &Path, request: FormatRequest) -> Self {
        Self {
            path: path.to_path_buf(),
            name: path.display().to_string(),
            request,
            open: None,
        }
    }

    fn start(&self) -> Result<(Streaming, StreamFormat), CaptureError> {
        let open_err = |reason: String| CaptureError::Open {
            device: self.name.clone(),
            reason,
        };
        let dev = ::v4l::Device::with_path(&self.path).map_err(|e| open_err(e.to_string()))?;
        let caps = capabilities(&dev, Some(&self.request))
            .map_err(|e| open_err(format!("cannot list its formats: {e}")))?;
        let chosen =
            negotiate(&caps, &self.request).map_err(|reason| CaptureError::UnsupportedFormat {
                device: self.name.clone(),
                reason,
            })?;

        let wanted = Format::new(chosen.width, chosen.height, FourCC::new(&chosen.fourcc.0));
        let actual = dev
            .set_format(&wanted)
            .map_err(|e| open_err(format!("setting format {}: {e}", chosen.fourcc)))?;
        // The driver may adjust what it was asked for; what it reports is what it will send.
        let pixel = PixelFormat::from_fourcc(FourCc(actual.fourcc.repr)).ok_or_else(|| {
            CaptureError::UnsupportedFormat {
                device: self.name.clone(),
                reason: format!(
                    "asked for {}, the driver chose {}",
                    chosen.fourcc, actual.fourcc
                ),
            }
        })?;
        let fps = if chosen.fps > 0.0 {
            chosen.fps
        } else {
            self.request.fps
        };
        // Frame interval as a fraction of seconds; x1000 keeps 29.97 exact enough.
        let interval = Fraction::new(1000, (fps * 1000.0).round() as u32);
        // Some drivers have a fixed rate and reject VIDIOC_S_PARM; they still stream.
        let actual_fps = match dev.set_params(&Parameters::new(interval)) {
            Ok(params) if params.interval.numerator > 0 => {
                f64::from(params.interval.denominator) / f64::from(params.interval.numerator)
            }
            Ok(_) => fps,
            Err(e) => {
                tracing::warn!(device = %self.name, error = %e, fps, "cannot set the frame rate");
                fps
            }
        };

        let mut queue = MmapQueue::new(dev.handle().fd(), BUFFER_COUNT)
            .map_err(|e| open_err(format!("mapping {BUFFER_COUNT} buffers: {e}")))?;
        queue
            .start()
            .map_err(|e| open_err(format!("starting the stream: {e}")))?;
        let format = StreamFormat {
            pixel,
            width: actual.width as usize,
            height: actual.height as usize,
            stride: actual.stride as usize,
            fps: actual_fps,
        };
        Ok((
            Streaming {
                queue,
                _device: dev,
            },
            format,
        ))
    }
}

impl Device for V4l2Device {
    fn name(&self) -> &str {
        &self.name
    }

    fn open(&mut self) -> Result<StreamFormat, CaptureError> {
        self.close();
        let (streaming, format) = self.start()?;
        self.open = Some(streaming);
        Ok(format)
    }

    fn dequeue(&mut self) -> io::Result<RawBuffer<'_>> {
        let streaming = self
            .open
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "not streaming"))?;
        let (data, meta) = streaming.queue.dequeue(STALL_TIMEOUT)?;
        let (captured, captured_at_unix_ms) = capture_time(&meta);
        Ok(RawBuffer {
            data,
            sequence: meta.sequence,
            error: meta.flags.contains(BufferFlags::ERROR),
            captured,
            captured_at_unix_ms,
        })
    }

    fn close(&mut self) {
        self.open = None;
    }
}

impl Drop for V4l2Device {
    fn drop(&mut self) {
        self.close();
    }
}

/// The driver's capture buffers, mapped into this process, cycled with QBUF/DQBUF. The caller
/// holds at most one buffer at a time (the one it is converting); it goes back to the driver on
/// the next dequeue.
struct MmapQueue {
    fd: RawFd,
    buffers: Vec<Mapping>,
    /// Index of the buffer the caller is reading.
    held: Option<u32>,
    streaming: bool,
}

struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mappings belong to this queue alone and are only read through `&self`/`&mut self`;
// the driver writes a buffer only while it is queued, and a buffer handed out is not requeued
// until the next `dequeue`, which needs `&mut self` and so outlives every slice given out.
unsafe impl Send for MmapQueue {}

impl MmapQueue {
    /// Asks the driver for `count` buffers (it may grant fewer or more) and maps each one.
    fn new(fd: RawFd, count: u32) -> io::Result<Self> {
        let granted = request_buffers(fd, count)?;
        if granted == 0 {
            return Err(io::Error::other("the driver granted no buffers"));
        }
        // Built first so that `Drop` releases whatever was mapped if a later buffer fails.
        let mut queue = Self {
            fd,
            buffers: Vec::with_capacity(granted as usize),
            held: None,
            streaming: false,
        };
        for index in 0..granted {
            let mut buf = buffer_desc(index);
            buffer_ioctl(fd, vidioc::VIDIOC_QUERYBUF, &mut buf)?;
            // SAFETY: for MMAP buffers the driver fills the `offset` member of the union.
            let offset = unsafe { buf.m.offset };
            let len = buf.length as usize;
            // SAFETY: a new shared, read-only mapping of the driver's buffer at the offset it
            // gave; nothing else refers to the address range, and `Drop` unmaps it.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd,
                    offset as libc::off_t,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            queue.buffers.push(Mapping { ptr, len });
        }
        Ok(queue)
    }

    /// Hands every buffer to the driver and starts capturing.
    fn start(&mut self) -> io::Result<()> {
        for index in 0..self.buffers.len() as u32 {
            buffer_ioctl(self.fd, vidioc::VIDIOC_QBUF, &mut buffer_desc(index))?;
        }
        set_streaming(self.fd, true)?;
        self.streaming = true;
        Ok(())
    }

    /// Returns the previously held buffer to the driver, then waits up to `timeout` for the next
    /// filled one: its bytes (`bytesused` of them) and the driver's metadata. Spurious wake-ups
    /// (poll ready, DQBUF EAGAIN) and signals (EINTR) are waited through; any other error means
    /// the stream is gone.
    fn dequeue(&mut self, timeout: Duration) -> io::Result<(&[u8], Metadata)> {
        if let Some(index) = self.held.take() {
            buffer_ioctl(self.fd, vidioc::VIDIOC_QBUF, &mut buffer_desc(index))?;
        }
        let deadline = Instant::now() + timeout;
        let mut retries = 0u32;
        let buf = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no frame within {timeout:?} ({retries} empty wake-ups)"),
                ));
            }
            let mut pfd = libc::pollfd {
                fd: self.fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let wait_ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd that outlives the call.
            let ready = unsafe { libc::poll(&mut pfd, 1, wait_ms) };
            if ready < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    retries += 1;
                    continue;
                }
                return Err(e);
            }
            if ready == 0 {
                continue;
            }
            let mut buf = buffer_desc(0);
            match buffer_ioctl(self.fd, vidioc::VIDIOC_DQBUF, &mut buf) {
                Ok(()) => break buf,
                // With POLLERR the driver has nothing to give and never will; with POLLIN the
                // buffer went elsewhere (a spurious wake-up) and the next one is still coming.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) && pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) == 0 =>
                {
                    retries += 1;
                }
                Err(e) => return Err(e),
            }
        };
        if retries > 0 {
            tracing::debug!(retries, "dequeue waited through empty wake-ups");
        }
        let mapping = self.buffers.get(buf.index as usize).ok_or_else(|| {
            io::Error::other(format!(
                "the driver returned buffer {} of {}",
                buf.index,
                self.buffers.len()
            ))
        })?;
        self.held = Some(buf.index);
        let used = (buf.bytesused as usize).min(mapping.len);
        // SAFETY: the mapping is live until `Drop`, and the driver leaves a dequeued buffer
        // alone until it is queued again, which takes `&mut self` and so ends this borrow.
        let data = unsafe { std::slice::from_raw_parts(mapping.ptr as *const u8, used) };
        let meta = Metadata {
            bytesused: buf.bytesused,
            flags: BufferFlags::from(buf.flags),
            field: buf.field,
            timestamp: Timestamp::from(buf.timestamp),
            sequence: buf.sequence,
        };
        Ok((data, meta))
    }
}

impl Drop for MmapQueue {
    /// Stops the stream, unmaps every buffer, then frees them (drivers refuse to free buffers
    /// that are still mapped). An unplugged camera answers ENODEV to all of it, which is
    /// expected; anything else is logged, never a panic.
    fn drop(&mut self) {
        let report = |what: &str, e: io::Error| {
            if e.raw_os_error() == Some(libc::ENODEV) {
                tracing::debug!(error = %e, "{what}: camera already gone");
            } else {
                tracing::warn!(error = %e, "{what} failed");
            }
        };
        if self.streaming {
            if let Err(e) = set_streaming(self.fd, false) {
                report("stopping the stream", e);
            }
        }
        for m in self.buffers.drain(..) {
            // SAFETY: `ptr`/`len` are a mapping made in `new` and not unmapped since; no slice
            // into it outlives `&mut self`.
            if unsafe { libc::munmap(m.ptr, m.len) } != 0 {
                report("unmapping a buffer", io::Error::last_os_error());
            }
        }
        if let Err(e) = request_buffers(self.fd, 0) {
            report("freeing the buffers", e);
        }
    }
}

fn buffer_desc(index: u32) -> v4l2_buffer {
    v4l2_buffer {
        index,
        type_: Type::VideoCapture as u32,
        memory: Memory::Mmap as u32,
        // SAFETY: v4l2_buffer is a plain C struct of integers, a union of integers/pointers and
        // a timeval, for all of which zero is a valid value.
        ..unsafe { std::mem::zeroed() }
    }
}

/// VIDIOC_QUERYBUF, VIDIOC_QBUF or VIDIOC_DQBUF, the requests that take a `v4l2_buffer`.
fn buffer_ioctl(fd: RawFd, request: vidioc::_IOC_TYPE, buf: &mut v4l2_buffer) -> io::Result<()> {
    // SAFETY: each of these requests reads and writes one v4l2_buffer, which `buf` is,
    // exclusively borrowed for the call.
    unsafe { ::v4l::v4l2::ioctl(fd, request, buf as *mut v4l2_buffer as *mut libc::c_void) }
}

/// VIDIOC_REQBUFS for MMAP capture buffers; returns how many the driver granted.
fn request_buffers(fd: RawFd, count: u32) -> io::Result<u32> {
    let mut req = v4l2_requestbuffers {
        count,
        type_: Type::VideoCapture as u32,
        memory: Memory::Mmap as u32,
        // SAFETY: a plain C struct of integers; zero is valid for all of them.
        ..unsafe { std::mem::zeroed() }
    };
    // SAFETY: VIDIOC_REQBUFS reads and writes one v4l2_requestbuffers, exclusively borrowed.
    unsafe {
        ::v4l::v4l2::ioctl(
            fd,
            vidioc::VIDIOC_REQBUFS,
            &mut req as *mut v4l2_requestbuffers as *mut libc::c_void,
        )?;
    }
    Ok(req.count)
}

fn set_streaming(fd: RawFd, on: bool) -> io::Result<()> {
    let request = if on {
        vidioc::VIDIOC_STREAMON
    } else {
        vidioc::VIDIOC_STREAMOFF
    };
    let mut kind = Type::VideoCapture as libc::c_int;
    // SAFETY: STREAMON/STREAMOFF read one int, the buffer type, borrowed for the call.
    unsafe {
        ::v4l::v4l2::ioctl(
            fd,
            request,
            &mut kind as *mut libc::c_int as *mut libc::c_void,
        )
    }
}

/// When the driver captured the buffer, as an `Instant` and as Unix milliseconds. Drivers stamp
/// buffers on CLOCK_MONOTONIC (the flag says so); a buffer without such a stamp is taken as
/// captured now.
fn capture_time(meta: &Metadata) -> (Instant, f64) {
    let monotonic = (meta.flags & BufferFlags::TIMESTAMP_MASK) == BufferFlags::TIMESTAMP_MONOTONIC;
    let stamp = Duration::new(meta.timestamp.sec.max(0) as u64, 0)
        + Duration::from_micros(meta.timestamp.usec.max(0) as u64);
    let age = match monotonic_now() {
        Some(now) if monotonic && !stamp.is_zero() => now.saturating_sub(stamp),
        _ => Duration::ZERO,
    };
    backdate(age, Instant::now(), SystemTime::now())
}

/// Moves both clocks' "now" back by `age`.
fn backdate(age: Duration, now: Instant, wall_now: SystemTime) -> (Instant, f64) {
    let captured = now.checked_sub(age).unwrap_or(now);
    let wall = wall_now.checked_sub(age).unwrap_or(wall_now);
    let unix_ms = wall
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    (captured, unix_ms)
}

fn monotonic_now() -> Option<Duration> {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    Some(Duration::new(
        u64::try_from(ts.tv_sec).ok()?,
        u32::try_from(ts.tv_nsec).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backdating_moves_both_clocks() {
        let now = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_secs(1_000);
        let (captured, unix_ms) = backdate(Duration::from_millis(40), now, wall);
        assert_eq!(now - captured, Duration::from_millis(40));
        assert!((unix_ms - 999_960.0).abs() < 1e-6, "{unix_ms}");
    }

    #[test]
    fn monotonic_clock_advances_with_instant() {
        // Readings bracketing an Instant interval span at least as long an interval.
        let before = monotonic_now().unwrap();
        let start = Instant::now();
        std::thread::sleep(Duration::from_millis(20));
        let elapsed = start.elapsed();
        let after = monotonic_now().unwrap();
        assert!(
            after - before >= elapsed,
            "{:?} < {elapsed:?}",
            after - before
        );
    }

    #[test]
    fn stepwise_ranges_list_ends_and_request() {
        use ::v4l::framesize::Stepwise;
        let request = FormatRequest {
            format: None,
            width: Some(1000),
            height: Some(700),
            fps: 25.0,
        };
        let size = FrameSizeEnum::Stepwise(Stepwise {
            min_width: 160,
            max_width: 1920,
            step_width: 16,
            min_height: 120,
            max_height: 1080,
            step_height: 8,
        });
        assert_eq!(
            sizes_of(size, Some(&request)),
            vec![(160, 120), (1920, 1080), (992, 696)]
        );
        let rates = rates_of(
            FrameIntervalEnum::Stepwise(::v4l::frameinterval::Stepwise {
                min: Fraction::new(1, 60),
                max: Fraction::new(1, 5),
                step: Fraction::new(1, 1000),
            }),
            Some(&request),
        );
        assert_eq!(rates, vec![60.0, 5.0, 25.0]);
    }

    #[test]
    fn nodes_that_are_not_capture_devices_make_an_empty_list() {
        // A `video*` name is not enough: a node that is no V4L2 device (here a plain file and a
        // folder) is left out, as is a missing folder. Real and emulated capture devices are
        // listed by tests/camera_emu.rs.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("video0"), b"not a device").unwrap();
        std::fs::create_dir(dir.path().join("video1")).unwrap();
        std::fs::write(dir.path().join("null"), b"").unwrap();
        assert!(cameras_in(dir.path()).is_empty());
        assert!(cameras_in(&dir.path().join("missing")).is_empty());
    }
}
