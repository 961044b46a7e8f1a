//! Camera format negotiation as a pure function over what a camera advertises, so every choice is
//! unit tested without a device.
//!
//! Order of decisions: resolution first (what the user asked for, or the closest offered), then
//! the pixel format at that resolution (YUYV if it reaches the frame rate there, else MJPEG,
//! because uncompressed 4:2:2 at high resolutions exceeds USB 2 bandwidth and cameras only offer
//! it at low rates), then the slowest frame rate that still reaches the requested one.

use std::fmt;

use super::PixelFormat;

/// Resolution asked for when the user names none: every UVC camera offers it, in YUYV at 30 fps
/// over USB 2.
pub const DEFAULT_WIDTH: u32 = 640;
pub const DEFAULT_HEIGHT: u32 = 480;
/// Rates within this many frames per second of the request count as reaching it: cameras
/// advertise 29.97 (1001/30000) next to 30.
const FPS_SLACK: f64 = 0.5;

/// A V4L2 four-character pixel format code.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct FourCc(pub [u8; 4]);

impl FourCc {
    pub const YUYV: FourCc = FourCc(*b"YUYV");
    pub const MJPG: FourCc = FourCc(*b"MJPG");
}

impl fmt::Display for FourCc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in &self.0 {
            let c = if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '?'
            };
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for FourCc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FourCc({self})")
    }
}

impl serde::Serialize for FourCc {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// One (format, size, rate) combination a camera advertises.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Capability {
    pub fourcc: FourCc,
    pub width: u32,
    pub height: u32,
    pub fps: f64,
}

/// What the user asked for; `None` leaves the choice to [`negotiate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FormatRequest {
    pub format: Option<PixelFormat>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub fps: f64,
}

/// Picks the capability to stream with, or says why none fits.
pub fn negotiate(caps: &[Capability], request: &FormatRequest) -> Result<Capability, String> {
    let usable: Vec<&Capability> = caps
        .iter()
        .filter(|c| match request.format {
            Some(format) => c.fourcc == format.fourcc(),
            None => PixelFormat::from_fourcc(c.fourcc).is_some(),
        })
        .collect();
    if usable.is_empty() {
        let mut offered: Vec<String> = caps.iter().map(|c| c.fourcc.to_string()).collect();
        offered.dedup();
        let wanted = match request.format {
            Some(format) => format.to_string(),
            None => "YUYV or MJPG".to_string(),
        };
        return Err(format!(
            "it offers [{}], drape needs {wanted}",
            offered.join(", ")
        ));
    }

    let size = closest_size(&usable, request);
    let at_size: Vec<&Capability> = usable
        .into_iter()
        .filter(|c| (c.width, c.height) == size)
        .collect();
    let max_fps = |fourcc: FourCc| {
        at_size
            .iter()
            .filter(|c| c.fourcc == fourcc)
            .map(|c| c.fps)
            .fold(None, |best: Option<f64>, fps| {
                Some(best.map_or(fps, |b| b.max(fps)))
            })
    };
    let fourcc = match request.format {
        Some(format) => format.fourcc(),
        None => {
            let reaches = |fps: Option<f64>| fps.is_some_and(|f| f + FPS_SLACK >= request.fps);
            let (yuyv, mjpg) = (max_fps(FourCc::YUYV), max_fps(FourCc::MJPG));
            if reaches(yuyv) {
                FourCc::YUYV
            } else if reaches(mjpg) {
                FourCc::MJPG
            } else if yuyv.unwrap_or(0.0) >= mjpg.unwrap_or(0.0) {
                FourCc::YUYV
            } else {
                FourCc::MJPG
            }
        }
    };
    let rates = at_size.iter().filter(|c| c.fourcc == fourcc);
    // The slowest rate that reaches the request, else the fastest there is.
    let reaching = rates
        .clone()
        .filter(|c| c.fps + FPS_SLACK >= request.fps)
        .min_by(|a, b| a.fps.total_cmp(&b.fps));
    let chosen = reaching.or_else(|| rates.max_by(|a, b| a.fps.total_cmp(&b.fps)));
    chosen
        .map(|c| **c)
        .ok_or_else(|| format!("no {fourcc} mode at {}x{}", size.0, size.1))
}

/// The offered size nearest the requested one (only the given dimensions count; with none given,
/// [`DEFAULT_WIDTH`] x [`DEFAULT_HEIGHT`]). Ties go to the larger image.
fn closest_size(usable: &[&Capability], request: &FormatRequest) -> (u32, u32) {
    let (want_w, want_h) = match (request.width, request.height) {
        (None, None) => (Some(DEFAULT_WIDTH), Some(DEFAULT_HEIGHT)),
        given => given,
    };
    let distance = |c: &Capability| {
        want_w.map_or(0, |w| c.width.abs_diff(w) as u64)
            + want_h.map_or(0, |h| c.height.abs_diff(h) as u64)
    };
    let area = |c: &Capability| c.width as u64 * c.height as u64;
    usable
        .iter()
        .min_by(|a, b| {
            distance(a)
                .cmp(&distance(b))
                .then_with(|| area(b).cmp(&area(a)))
        })
        .map_or((0, 0), |c| (c.width, c.height))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(fourcc: FourCc, width: u32, height: u32, fps: f64) -> Capability {
        Capability {
            fourcc,
            width,
            height,
            fps,
        }
    }

    /// A typical USB 2 webcam: YUYV is full rate only at small sizes, MJPEG everywhere.
    fn webcam() -> Vec<Capability> {
        let mut caps = Vec::new();
        for (w, h, yuyv_fps) in [(640, 480, 30.0), (1280, 720, 10.0), (1920, 1080, 5.0)] {
            for fps in [yuyv_fps, 5.0] {
                caps.push(cap(FourCc::YUYV, w, h, fps));
            }
            for fps in [30.0, 15.0] {
                caps.push(cap(FourCc::MJPG, w, h, fps));
            }
        }
        caps.push(cap(FourCc(*b"H264"), 1920, 1080, 30.0));
        caps
    }

    fn request(format: Option<PixelFormat>, size: Option<(u32, u32)>, fps: f64) -> FormatRequest {
        FormatRequest {
            format,
            width: size.map(|s| s.0),
            height: size.map(|s| s.1),
            fps,
        }
    }

    #[test]
    fn choices() {
        use PixelFormat::*;
        let yuyv = FourCc::YUYV;
        let mjpg = FourCc::MJPG;
        #[rustfmt::skip]
        let cases: Vec<(&str, Vec<Capability>, FormatRequest, Capability)> = vec![
            ("default size, YUYV reaches 30", webcam(), request(None, None, 30.0), cap(yuyv, 640, 480, 30.0)),
            ("720p30: YUYV only 10 there, so MJPEG", webcam(), request(None, Some((1280, 720)), 30.0), cap(mjpg, 1280, 720, 30.0)),
            ("720p at 10 fps: YUYV reaches it", webcam(), request(None, Some((1280, 720)), 10.0), cap(yuyv, 1280, 720, 10.0)),
            ("1080p at 15: MJPEG's slowest rate reaching 15", webcam(), request(None, Some((1920, 1080)), 15.0), cap(mjpg, 1920, 1080, 15.0)),
            ("YUYV forced at 1080p30: best it has", webcam(), request(Some(Yuyv), Some((1920, 1080)), 30.0), cap(yuyv, 1920, 1080, 5.0)),
            ("MJPEG forced at the default size", webcam(), request(Some(Mjpeg), None, 30.0), cap(mjpg, 640, 480, 30.0)),
            ("unlisted size: nearest offered", webcam(), request(None, Some((1280, 800)), 30.0), cap(mjpg, 1280, 720, 30.0)),
            ("29.97 counts as 30", vec![cap(yuyv, 640, 480, 29.97), cap(yuyv, 640, 480, 15.0)], request(None, None, 30.0), cap(yuyv, 640, 480, 29.97)),
            ("25 asked, 30 and 15 offered: 30", vec![cap(yuyv, 640, 480, 30.0), cap(yuyv, 640, 480, 15.0)], request(None, None, 25.0), cap(yuyv, 640, 480, 30.0)),
            ("60 asked, nobody reaches it: fastest", vec![cap(yuyv, 640, 480, 30.0), cap(mjpg, 640, 480, 50.0)], request(None, None, 60.0), cap(mjpg, 640, 480, 50.0)),
            ("width only", webcam(), request(None, None, 30.0).with_width(1900), cap(mjpg, 1920, 1080, 30.0)),
            ("MJPEG-only camera", vec![cap(mjpg, 320, 240, 30.0)], request(None, None, 30.0), cap(mjpg, 320, 240, 30.0)),
        ];
        let mut failures = Vec::new();
        for (name, caps, req, want) in cases {
            match negotiate(&caps, &req) {
                Ok(got) if got == want => {}
                other => failures.push(format!("{name}: want {want:?}, got {other:?}")),
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
    }

    #[test]
    fn nothing_decodable() {
        let caps = [cap(FourCc(*b"H264"), 1920, 1080, 30.0)];
        let err = negotiate(&caps, &request(None, None, 30.0)).unwrap_err();
        assert!(err.contains("H264") && err.contains("YUYV"), "{err}");
        let caps = [cap(FourCc::YUYV, 640, 480, 30.0)];
        let err = negotiate(&caps, &request(Some(PixelFormat::Mjpeg), None, 30.0)).unwrap_err();
        assert!(err.contains("MJPG"), "{err}");
    }

    impl FormatRequest {
        fn with_width(mut self, width: u32) -> Self {
            self.width = Some(width);
            self
        }
    }
}
