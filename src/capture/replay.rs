//! Recordings replayed as if they were a live camera: a directory of same-size PNG/JPEG images
//! (decoded once, at open, within [`MAX_REPLAY_BYTES`]) or a `.y4m` file (memory-mapped,
//! converted frame by frame, so any length replays in constant memory).
//!
//! Pacing: frame slot `i` is due at `start + i / fps`. A consumer that keeps up gets every slot on
//! time; one that falls behind gets the slot that is current when it asks, never a stale one and
//! never a burst of catch-up frames, and the slots it missed count as dropped, exactly what a
//! camera's driver does to a slow reader.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use memmap2::Mmap;

use super::convert::planar_to_rgb;
use super::y4m::{self, Y4mLayout};
use super::{check_fps, CaptureError, CaptureStats, FpsLabel, Frame, FrameSource, DEFAULT_FPS};

/// Image file extensions a replay directory is read from (compared case-insensitively); other
/// files in it are ignored.
const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];
/// Decoded bytes an image directory may hold in memory: about 1,400 VGA frames. The sizes are
/// read from the headers and summed before anything is decoded; a longer recording belongs in a
/// `.y4m` file, which is memory-mapped instead.
pub const MAX_REPLAY_BYTES: u64 = 1 << 30;

enum Frames {
    /// Decoded RGB8 images, in file-name order.
    Images(Vec<Vec<u8>>),
    Y4m {
        data: Mmap,
        layout: Y4mLayout,
    },
}

impl Frames {
    fn len(&self) -> usize {
        match self {
            Self::Images(images) => images.len(),
            Self::Y4m { layout, .. } => layout.frames.len(),
        }
    }
}

/// A recording paced like a camera; see the module docs.
pub struct ReplaySource {
    path: PathBuf,
    frames: Frames,
    width: usize,
    height: usize,
    fps: f64,
    looping: bool,
    /// When slot 0 was due: the first `next_frame` call, not the (possibly slow) open.
    start: Option<Instant>,
    next_slot: u64,
    stats: CaptureStats,
}

impl ReplaySource {
    /// Opens an image directory or a `.y4m` file. `fps` overrides the recording's own rate
    /// (the `.y4m` header's; [`DEFAULT_FPS`] for images).
    pub fn open(path: &Path, fps: Option<f64>, looping: bool) -> Result<Self, CaptureError> {
        let io_err = |source| CaptureError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io_err)?;
        let is_y4m = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("y4m"));
        let (frames, width, height, own_fps) = if meta.is_dir() {
            let (images, width, height) = load_images(path)?;
            (Frames::Images(images), width, height, None)
        } else if is_y4m {
            let file = File::open(path).map_err(io_err)?;
            let data = crate::mmap::map_readonly(&file).map_err(io_err)?;
            let layout = y4m::parse(&data).map_err(|reason| CaptureError::Y4m {
                path: path.to_path_buf(),
                reason,
            })?;
            if layout.truncated {
                tracing::warn!(
                    path = %path.display(),
                    frames = layout.frames.len(),
                    "recording ends inside a frame; replaying the complete frames"
                );
            }
            let (width, height, own_fps) = (layout.width, layout.height, layout.fps);
            (Frames::Y4m { data, layout }, width, height, own_fps)
        } else {
            return Err(CaptureError::InvalidSpec(format!(
                "{}: not a camera (/dev/videoN), an image directory or a .y4m file",
                path.display()
            )));
        };
        if frames.len() == 0 {
            return Err(CaptureError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            frames,
            width,
            height,
            fps: check_fps(fps.or(own_fps).unwrap_or(DEFAULT_FPS))?,
            looping,
            start: None,
            next_slot: 0,
            stats: CaptureStats::default(),
        })
    }

    pub fn size(&self) -> (usize, usize) {
        (self.width, self.height)
    }

    /// How long after the start slot `slot` is due.
    fn due_after(&self, slot: u64) -> Duration {
        Duration::from_secs_f64(slot as f64 / self.fps)
    }
}

/// Decodes every image in `dir`, sorted by file name; all must share the first one's size.
fn load_images(dir: &Path) -> Result<(Vec<Vec<u8>>, usize, usize), CaptureError> {
    let io_err = |path: &Path, source| CaptureError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let path = entry.map_err(|e| io_err(dir, e))?.path();
        let is_image = path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
            IMAGE_EXTENSIONS
                .iter()
                .any(|known| e.eq_ignore_ascii_case(known))
        });
        if is_image {
            paths.push(path);
        }
    }
    paths.sort();

    let image_err = |path: &Path, reason| CaptureError::Image {
        path: path.to_path_buf(),
        reason,
    };
    // Sizes first, from the headers alone, so a directory too large to hold fails before a
    // single image is decoded.
    let mut size = None;
    let mut total: u64 = 0;
    for path in &paths {
        let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
        let (w, h) = crate::image_io::dimensions(&bytes).map_err(|r| image_err(path, r))?;
        let found = (w as usize, h as usize);
        let (width, height) = *size.get_or_insert(found);
        if found != (width, height) {
            return Err(CaptureError::SizeMismatch {
                path: path.clone(),
                width,
                height,
                found_width: found.0,
                found_height: found.1,
            });
        }
        total += 3 * u64::from(w) * u64::from(h);
        if total > MAX_REPLAY_BYTES {
            return Err(CaptureError::InvalidSpec(format!(
                "{}: {} images of {w}x{h} decode to more than {} MiB; replay a .y4m recording \
                 instead (it is memory-mapped, not decoded up front)",
                dir.display(),
                paths.len(),
                MAX_REPLAY_BYTES >> 20
            )));
        }
    }
    let mut images = Vec::with_capacity(paths.len());
    for path in &paths {
        let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
        let decoded = crate::image_io::decode_rgb(&bytes).map_err(|r| image_err(path, r))?;
        images.push(decoded.into_raw());
    }
    let (width, height) = size.unwrap_or((0, 0));
    Ok((images, width, height))
}

impl FrameSource for ReplaySource {
    fn fps(&self) -> f64 {
        self.fps
    }

    fn next_frame(&mut self, frame: &mut Frame) -> Result<(), CaptureError> {
        let count = self.frames.len() as u64;
        let now = Instant::now();
        let start = *self.start.get_or_insert(now);
        let mut slot = self.next_slot;
        let due = start + self.due_after(slot);
        if now < due {
            std::thread::sleep(due - now);
        } else {
            // Late: jump to the slot that is current now. Past the end of a non-looping
            // recording only the frames that existed count as missed.
            let current = ((now - start).as_secs_f64() * self.fps) as u64;
            if current > slot {
                let missed_until = if self.looping {
                    current
                } else {
                    current.min(count)
                };
                self.stats.driver_dropped += missed_until.saturating_sub(slot);
                slot = current;
            }
        }
        if !self.looping && slot >= count {
            self.next_slot = count;
            return Err(CaptureError::EndOfStream);
        }
        self.next_slot = slot + 1;

        let index = (slot % count) as usize;
        frame.resize(self.width, self.height);
        match &self.frames {
            Frames::Images(images) => frame.rgb.copy_from_slice(&images[index]),
            Frames::Y4m { data, layout } => planar_to_rgb(
                &data[layout.frames[index].clone()],
                self.width,
                self.height,
                layout.subsampling,
                layout.range,
                &mut frame.rgb,
            ),
        }
        frame.seq = slot;
        frame.captured = Instant::now();
        frame.captured_at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        self.stats.frames += 1;
        Ok(())
    }

    fn stats(&self) -> CaptureStats {
        self.stats
    }

    fn describe(&self) -> String {
        let what = match self.frames {
            Frames::Images(_) => "images",
            Frames::Y4m { .. } => "frames",
        };
        format!(
            "replay {} ({} {what}, {}x{}) @{}fps{}",
            self.path.display(),
            self.frames.len(),
            self.width,
            self.height,
            FpsLabel(self.fps),
            if self.looping { " looping" } else { "" }
        )
    }
}
