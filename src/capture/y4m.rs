//! YUV4MPEG2 (`.y4m`) recordings, the uncompressed format ffmpeg and the Xiph test media use:
//! a text header (`YUV4MPEG2 W640 H480 F30:1 C420jpeg ...`), then per frame a `FRAME` line
//! followed by the Y, Cb and Cr planes. Format description:
//! <https://wiki.multimedia.cx/index.php/YUV4MPEG2>.
//!
//! Only the header and frame offsets are parsed here; frames are converted to RGB on demand.

use std::ops::Range;

use super::convert::{Subsampling, YuvRange};

/// The layout of a parsed recording.
#[derive(Debug, Clone, PartialEq)]
pub struct Y4mLayout {
    pub width: usize,
    pub height: usize,
    /// The header's frame rate, if it has one.
    pub fps: Option<f64>,
    pub subsampling: Subsampling,
    pub range: YuvRange,
    /// Byte range of each complete frame's planes.
    pub frames: Vec<Range<usize>>,
    /// The file ended inside a frame (a recording cut short); that frame is not in `frames`.
    pub truncated: bool,
}

const MAGIC: &[u8] = b"YUV4MPEG2";
const FRAME: &[u8] = b"FRAME";
/// Longest header or frame line accepted, so a non-y4m file fails fast.
const MAX_LINE: usize = 4096;

/// Parses a whole `.y4m` file held in memory.
pub fn parse(data: &[u8]) -> Result<Y4mLayout, String> {
    let (header, mut pos) = line(data, 0).ok_or("no header line")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not text")?;
    let mut tokens = header.split(' ').filter(|t| !t.is_empty());
    if tokens.next().map(str::as_bytes) != Some(MAGIC) {
        return Err("does not start with YUV4MPEG2".into());
    }

    let (mut width, mut height, mut fps) = (None, None, None);
    let mut subsampling = Subsampling::S420;
    let mut range = YuvRange::Limited;
    for token in tokens {
        let mut chars = token.chars();
        let tag = chars.next();
        let value = chars.as_str();
        match tag {
            Some('W') => width = Some(dimension(value).ok_or(format!("bad width `{value}`"))?),
            Some('H') => height = Some(dimension(value).ok_or(format!("bad height `{value}`"))?),
            Some('F') => fps = Some(rate(value).ok_or(format!("bad frame rate `{value}`"))?),
            Some('C') => subsampling = colorspace(value)?,
            Some('X') if value.eq_ignore_ascii_case("COLORRANGE=FULL") => range = YuvRange::Full,
            Some('X') if value.eq_ignore_ascii_case("COLORRANGE=LIMITED") => {
                range = YuvRange::Limited
            }
            // Interlacing, aspect ratio and other extensions do not change the bytes.
            _ => {}
        }
    }
    let width = width.ok_or("header has no width (W)")?;
    let height = height.ok_or("header has no height (H)")?;
    let frame_len = subsampling.frame_len(width, height);

    let mut frames = Vec::new();
    let mut truncated = false;
    while pos < data.len() {
        let Some((frame_line, planes_at)) = line(data, pos) else {
            truncated = true;
            break;
        };
        if !frame_line.starts_with(FRAME) {
            return Err(format!(
                "expected FRAME at byte {pos} (frame {})",
                frames.len()
            ));
        }
        let end = planes_at + frame_len;
        if end > data.len() {
            truncated = true;
            break;
        }
        frames.push(planes_at..end);
        pos = end;
    }
    Ok(Y4mLayout {
        width,
        height,
        fps,
        subsampling,
        range,
        frames,
        truncated,
    })
}

/// The line starting at `start` (without its `\n`) and where the next begins.
fn line(data: &[u8], start: usize) -> Option<(&[u8], usize)> {
    let rest = data.get(start..)?;
    let len = rest.iter().take(MAX_LINE).position(|&b| b == b'\n')?;
    Some((&rest[..len], start + len + 1))
}

/// A width or height: positive and at most [`crate::image_io::MAX_IMAGE_SIDE`], so a header
/// claiming 2^32 fails here rather than as an overflowing frame size.
fn dimension(value: &str) -> Option<usize> {
    let max = crate::image_io::MAX_IMAGE_SIDE as usize;
    value.parse().ok().filter(|&v| v > 0 && v <= max)
}

fn rate(value: &str) -> Option<f64> {
    let (num, den) = value.split_once(':')?;
    let (num, den): (u32, u32) = (num.parse().ok()?, den.parse().ok()?);
    (num > 0 && den > 0).then(|| f64::from(num) / f64::from(den))
}

fn colorspace(value: &str) -> Result<Subsampling, String> {
    match value {
        "420jpeg" | "420paldv" | "420mpeg2" | "420" => Ok(Subsampling::S420),
        "422" => Ok(Subsampling::S422),
        "444" => Ok(Subsampling::S444),
        "mono" => Ok(Subsampling::Mono),
        other => Err(format!(
            "colour space C{other} is not supported \
             (8-bit 420jpeg, 420paldv, 420mpeg2, 420, 422, 444 or mono)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_variants() {
        let frame = |c: &str| format!("YUV4MPEG2 W4 H2 F25:1 Ip A1:1 {c}\nFRAME\n");
        // (C tag, Ok((subsampling, frame bytes)) or Err(message part))
        type Case = (&'static str, Result<(Subsampling, usize), &'static str>);
        #[rustfmt::skip]
        let cases: [Case; 7] = [
            ("C420jpeg", Ok((Subsampling::S420, 8 + 2 * 2))),
            ("C420mpeg2 XYSCSS=420MPEG2", Ok((Subsampling::S420, 12))),
            ("C422", Ok((Subsampling::S422, 8 + 2 * 4))),
            ("C444", Ok((Subsampling::S444, 8 * 3))),
            ("Cmono", Ok((Subsampling::Mono, 8))),
            ("", Ok((Subsampling::S420, 12))),
            ("C420p10", Err("not supported")),
        ];
        for (c, want) in cases {
            let mut file = frame(c).into_bytes();
            file.extend(std::iter::repeat_n(0u8, 24));
            match (parse(&file), want) {
                (Ok(layout), Ok((sub, len))) => {
                    assert_eq!(layout.subsampling, sub, "{c}");
                    assert_eq!(layout.frames[0].len(), len, "{c}");
                    assert_eq!(layout.fps, Some(25.0));
                }
                (Err(e), Err(want)) => assert!(e.contains(want), "{c}: {e}"),
                (got, want) => panic!("{c}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn bad_files() {
        #[rustfmt::skip]
        let cases: [(&[u8], &str); 7] = [
            (b"", "no header"),
            (b"P6 4 2 255\n", "YUV4MPEG2"),
            (b"YUV4MPEG2 H2 F30:1\n", "width"),
            (b"YUV4MPEG2 W4 H2 F30:0\n", "frame rate"),
            (b"YUV4MPEG2 W4 H2\nJUNK\n", "expected FRAME"),
            (b"YUV4MPEG2 W4294967296 H4294967296 F30:1\n", "bad width"),
            (b"YUV4MPEG2 W4 H8193 F30:1\n", "bad height"),
        ];
        for (file, want) in cases {
            let err = parse(file).unwrap_err();
            assert!(
                err.contains(want),
                "{:?}: {err}",
                String::from_utf8_lossy(file)
            );
        }
    }

    #[test]
    fn cut_short_recording_keeps_whole_frames() {
        let mut file = b"YUV4MPEG2 W2 H2 F30:1 C444 XCOLORRANGE=FULL\n".to_vec();
        for _ in 0..2 {
            file.extend_from_slice(b"FRAME\n");
            file.extend_from_slice(&[0; 12]);
        }
        file.extend_from_slice(b"FRAME\n\x01\x02");
        let layout = parse(&file).unwrap();
        assert_eq!(layout.frames.len(), 2);
        assert!(layout.truncated);
        assert_eq!(layout.range, YuvRange::Full);
    }
}
