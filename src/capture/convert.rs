//! Pixel conversions into RGB8: packed YUYV and planar YCbCr (BT.601, integer math), and MJPEG
//! decoding into a preallocated buffer.
//!
//! The YCbCr → RGB coefficients are BT.601's scaled by 256 and rounded, as in libyuv and the
//! V4L2 documentation's reference conversion: limited range (Y 16..235, C 16..240) is what
//! cameras send; full range is what JPEG/JFIF and `XCOLORRANGE=FULL` recordings use.

use zune_jpeg::zune_core::bytestream::ZCursor;
use zune_jpeg::zune_core::colorspace::ColorSpace;
use zune_jpeg::zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;

/// Quantisation range of the luma and chroma samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum YuvRange {
    /// Y 16..235, Cb/Cr 16..240 (cameras, most video).
    Limited,
    /// Y and Cb/Cr 0..255 (JPEG).
    Full,
}

/// BT.601 YCbCr → RGB in 8.8 fixed point.
#[derive(Debug, Clone, Copy)]
struct Coeffs {
    y_offset: i32,
    y_gain: i32,
    r_cr: i32,
    g_cb: i32,
    g_cr: i32,
    b_cb: i32,
}

impl Coeffs {
    const fn of(range: YuvRange) -> Self {
        match range {
            // 255/219 = 1.164; 1.596, 0.391, 0.813, 2.018 are 1.402, 0.344, 0.714, 1.772
            // scaled by 255/224 for the 16..240 chroma range.
            YuvRange::Limited => Self {
                y_offset: 16,
                y_gain: 298,
                r_cr: 409,
                g_cb: 100,
                g_cr: 208,
                b_cb: 516,
            },
            YuvRange::Full => Self {
                y_offset: 0,
                y_gain: 256,
                r_cr: 359,
                g_cb: 88,
                g_cr: 183,
                b_cb: 454,
            },
        }
    }

    #[inline(always)]
    fn rgb(&self, y: u8, cb: u8, cr: u8) -> [u8; 3] {
        let y = (y as i32 - self.y_offset) * self.y_gain + 128;
        let d = cb as i32 - 128;
        let e = cr as i32 - 128;
        [
            clamp8((y + self.r_cr * e) >> 8),
            clamp8((y - self.g_cb * d - self.g_cr * e) >> 8),
            clamp8((y + self.b_cb * d) >> 8),
        ]
    }
}

#[inline(always)]
fn clamp8(v: i32) -> u8 {
    v.clamp(0, 255) as u8
}

/// Converts one YUYV (Y0 Cb Y1 Cr per pixel pair) image with `stride` bytes per row into `rgb`
/// (`width * height * 3` bytes). An odd last column takes its pair's chroma.
///
/// Panics if `yuyv` is shorter than `stride * height` or `rgb` is shorter than the image; callers
/// check the driver's byte count first and treat a short buffer as a corrupt frame.
pub fn yuyv_to_rgb(yuyv: &[u8], width: usize, height: usize, stride: usize, rgb: &mut [u8]) {
    let c = Coeffs::of(YuvRange::Limited);
    let row_bytes = width.div_ceil(2) * 4;
    for (src, dst) in yuyv
        .chunks(stride)
        .zip(rgb.chunks_exact_mut(width * 3))
        .take(height)
    {
        let mut pairs = dst.chunks_exact_mut(6);
        for (quad, out) in src[..row_bytes].chunks_exact(4).zip(&mut pairs) {
            out[..3].copy_from_slice(&c.rgb(quad[0], quad[1], quad[3]));
            out[3..].copy_from_slice(&c.rgb(quad[2], quad[1], quad[3]));
        }
        let rest = pairs.into_remainder();
        if !rest.is_empty() {
            let quad = &src[row_bytes - 4..row_bytes];
            rest.copy_from_slice(&c.rgb(quad[0], quad[1], quad[3]));
        }
    }
}

/// Chroma subsampling of a planar YCbCr image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subsampling {
    S420,
    S422,
    S444,
    /// Greyscale: no chroma planes.
    Mono,
}

impl Subsampling {
    /// How many luma columns and rows share one chroma sample.
    fn factors(self) -> Option<(usize, usize)> {
        match self {
            Self::S420 => Some((2, 2)),
            Self::S422 => Some((2, 1)),
            Self::S444 => Some((1, 1)),
            Self::Mono => None,
        }
    }

    /// Width and height of each chroma plane for a `width` x `height` image.
    pub fn chroma_size(self, width: usize, height: usize) -> (usize, usize) {
        match self.factors() {
            Some((sx, sy)) => (width.div_ceil(sx), height.div_ceil(sy)),
            None => (0, 0),
        }
    }

    /// Bytes of one 8-bit Y + Cb + Cr frame.
    pub fn frame_len(self, width: usize, height: usize) -> usize {
        let (cw, ch) = self.chroma_size(width, height);
        width * height + 2 * cw * ch
    }
}

/// Converts one 8-bit planar Y, Cb, Cr frame (planes back to back, as in Y4M) into `rgb`.
/// Chroma is upsampled by replication; the half-sample siting difference between 4:2:0 variants
/// is below what the detector notices.
///
/// Panics if `planes` is shorter than [`Subsampling::frame_len`] or `rgb` than the image.
pub fn planar_to_rgb(
    planes: &[u8],
    width: usize,
    height: usize,
    sub: Subsampling,
    range: YuvRange,
    rgb: &mut [u8],
) {
    let c = Coeffs::of(range);
    let (luma, chroma) = planes.split_at(width * height);
    let (cw, ch) = sub.chroma_size(width, height);
    let (cb, cr) = chroma.split_at(cw * ch);
    for (y, (src, dst)) in luma
        .chunks_exact(width)
        .zip(rgb.chunks_exact_mut(width * 3))
        .take(height)
        .enumerate()
    {
        match sub.factors() {
            Some((sx, sy)) => {
                let crow = (y / sy) * cw;
                for (x, (&l, out)) in src.iter().zip(dst.chunks_exact_mut(3)).enumerate() {
                    let ci = crow + x / sx;
                    out.copy_from_slice(&c.rgb(l, cb[ci], cr[ci]));
                }
            }
            None => {
                for (&l, out) in src.iter().zip(dst.chunks_exact_mut(3)) {
                    out.copy_from_slice(&c.rgb(l, 128, 128));
                }
            }
        }
    }
}

/// Why an MJPEG frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MjpegError {
    #[error("not a JPEG (no SOI marker)")]
    NoSoi,
    #[error("truncated: no EOI marker at the end of {0} bytes")]
    Truncated(usize),
    #[error("malformed marker segment at byte {0}")]
    Malformed(usize),
    #[error("decoding failed: {0}")]
    Decode(String),
    #[error("frame is {found_width}x{found_height}, not the negotiated {width}x{height}")]
    SizeMismatch {
        found_width: usize,
        found_height: usize,
        width: usize,
        height: usize,
    },
}

/// Decodes MJPEG frames into RGB8, inserting the standard Huffman tables into frames that omit
/// them (UVC cameras may, as the AVI MJPEG convention allows).
///
/// Allocation: the patched copy goes into a scratch buffer reused from frame to frame. zune-jpeg
/// itself still allocates per frame (its decoder state, per-component coefficient rows and
/// upsampling scratch) because a `JpegDecoder` decodes one image and cannot be reset.
#[derive(Debug, Default)]
pub struct MjpegDecoder {
    patched: Vec<u8>,
}

impl MjpegDecoder {
    /// A decoder whose scratch buffer already fits a `max_frame_bytes` JPEG plus the tables.
    pub fn with_capacity(max_frame_bytes: usize) -> Self {
        Self {
            patched: Vec::with_capacity(max_frame_bytes + DHT_SEGMENT.len()),
        }
    }

    /// Decodes `jpeg`, which must be `size` = (width, height), into `rgb` (resized to it).
    ///
    /// A frame whose header claims another size is refused before anything is allocated: the
    /// header is the camera's (or the bus's) word, and a damaged one could otherwise grow the
    /// frame buffer to hundreds of megabytes, for good.
    pub fn decode(
        &mut self,
        jpeg: &[u8],
        size: (usize, usize),
        rgb: &mut Vec<u8>,
    ) -> Result<(), MjpegError> {
        let jpeg = framed(jpeg)?;
        let input = match missing_dht_insert_at(jpeg)? {
            Some(at) => {
                self.patched.clear();
                self.patched.extend_from_slice(&jpeg[..at]);
                self.patched.extend_from_slice(&DHT_SEGMENT);
                self.patched.extend_from_slice(&jpeg[at..]);
                &self.patched[..]
            }
            None => jpeg,
        };
        let options = DecoderOptions::default().jpeg_set_out_colorspace(ColorSpace::RGB);
        let mut decoder = JpegDecoder::new_with_options(ZCursor::new(input), options);
        let decode_err = |e: zune_jpeg::errors::DecodeErrors| MjpegError::Decode(e.to_string());
        decoder.decode_headers().map_err(decode_err)?;
        let (width, height) = decoder
            .dimensions()
            .ok_or_else(|| MjpegError::Decode("no frame header".into()))?;
        if (width, height) != size {
            return Err(MjpegError::SizeMismatch {
                found_width: width,
                found_height: height,
                width: size.0,
                height: size.1,
            });
        }
        rgb.resize(width * height * 3, 0);
        decoder.decode_into(rgb).map_err(decode_err)?;
        Ok(())
    }
}

/// Checks SOI at the start and EOI at the end (ignoring zero padding some drivers append) and
/// returns the JPEG without the padding. A missing EOI is how a frame cut short on the USB bus
/// shows; zune-jpeg would otherwise fill the missing rows with grey and call it success.
fn framed(jpeg: &[u8]) -> Result<&[u8], MjpegError> {
    if !jpeg.starts_with(&[0xFF, 0xD8]) {
        return Err(MjpegError::NoSoi);
    }
    let end = jpeg.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let jpeg = &jpeg[..end];
    if jpeg.len() < 4 || !jpeg.ends_with(&[0xFF, 0xD9]) {
        return Err(MjpegError::Truncated(jpeg.len()));
    }
    Ok(jpeg)
}

/// Walks the marker segments up to the first scan. Returns where to insert Huffman tables if the
/// image defines none before it (just before SOS), or `None` if it has its own.
fn missing_dht_insert_at(jpeg: &[u8]) -> Result<Option<usize>, MjpegError> {
    const DHT: u8 = 0xC4;
    const SOS: u8 = 0xDA;
    let mut pos = 2;
    loop {
        if jpeg.get(pos) != Some(&0xFF) {
            return Err(MjpegError::Malformed(pos));
        }
        // Any number of 0xFF fill bytes may precede a marker code.
        let mut code_at = pos + 1;
        while jpeg.get(code_at) == Some(&0xFF) {
            code_at += 1;
        }
        let code = *jpeg.get(code_at).ok_or(MjpegError::Malformed(pos))?;
        match code {
            DHT => return Ok(None),
            SOS => return Ok(Some(pos)),
            // TEM and RSTn stand alone, without a length.
            0x01 | 0xD0..=0xD7 => pos = code_at + 1,
            _ => {
                let len = jpeg
                    .get(code_at + 1..code_at + 3)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
                    .filter(|&len| len >= 2)
                    .ok_or(MjpegError::Malformed(pos))?;
                pos = code_at + 1 + len;
            }
        }
    }
}

/// ITU-T T.81 Annex K.3 tables (K.3–K.6): the "typical" Huffman tables MJPEG streams are
/// encoded with when they leave them out.
const DC_LUMA_BITS: [u8; 16] = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0];
const DC_CHROMA_BITS: [u8; 16] = [0, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0];
const DC_VALUES: [u8; 12] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
const AC_LUMA_BITS: [u8; 16] = [0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7D];
#[rustfmt::skip]
const AC_LUMA_VALUES: [u8; 162] = [
    0x01, 0x02, 0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61, 0x07,
    0x22, 0x71, 0x14, 0x32, 0x81, 0x91, 0xA1, 0x08, 0x23, 0x42, 0xB1, 0xC1, 0x15, 0x52, 0xD1, 0xF0,
    0x24, 0x33, 0x62, 0x72, 0x82, 0x09, 0x0A, 0x16, 0x17, 0x18, 0x19, 0x1A, 0x25, 0x26, 0x27, 0x28,
    0x29, 0x2A, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3A, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49,
    0x4A, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5A, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69,
    0x6A, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7A, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89,
    0x8A, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6, 0xA7,
    0xA8, 0xA9, 0xAA, 0xB2, 0xB3, 0xB4, 0xB5, 0xB6, 0xB7, 0xB8, 0xB9, 0xBA, 0xC2, 0xC3, 0xC4, 0xC5,
    0xC6, 0xC7, 0xC8, 0xC9, 0xCA, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8, 0xD9, 0xDA, 0xE1, 0xE2,
    0xE3, 0xE4, 0xE5, 0xE6, 0xE7, 0xE8, 0xE9, 0xEA, 0xF1, 0xF2, 0xF3, 0xF4, 0xF5, 0xF6, 0xF7, 0xF8,
    0xF9, 0xFA,
];
const AC_CHROMA_BITS: [u8; 16] = [0, 2, 1, 2, 4, 4, 3, 4, 7, 5, 4, 4, 0, 1, 2, 0x77];
#[rustfmt::skip]
const AC_CHROMA_VALUES: [u8; 162] = [
    0x00, 0x01, 0x02, 0x03, 0x11, 0x04, 0x05, 0x21, 0x31, 0x06, 0x12, 0x41, 0x51, 0x07, 0x61, 0x71,
    0x13, 0x22, 0x32, 0x81, 0x08, 0x14, 0x42, 0x91, 0xA1, 0xB1, 0xC1, 0x09, 0x23, 0x33, 0x52, 0xF0,
    0x15, 0x62, 0x72, 0xD1, 0x0A, 0x16, 0x24, 0x34, 0xE1, 0x25, 0xF1, 0x17, 0x18, 0x19, 0x1A, 0x26,
    0x27, 0x28, 0x29, 0x2A, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3A, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48,
    0x49, 0x4A, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5A, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68,
    0x69, 0x6A, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7A, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87,
    0x88, 0x89, 0x8A, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0xA2, 0xA3, 0xA4, 0xA5,
    0xA6, 0xA7, 0xA8, 0xA9, 0xAA, 0xB2, 0xB3, 0xB4, 0xB5, 0xB6, 0xB7, 0xB8, 0xB9, 0xBA, 0xC2, 0xC3,
    0xC4, 0xC5, 0xC6, 0xC7, 0xC8, 0xC9, 0xCA, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8, 0xD9, 0xDA,
    0xE2, 0xE3, 0xE4, 0xE5, 0xE6, 0xE7, 0xE8, 0xE9, 0xEA, 0xF2, 0xF3, 0xF4, 0xF5, 0xF6, 0xF7, 0xF8,
    0xF9, 0xFA,
];

/// One DHT segment holding all four tables: marker, length, then (class/id, 16 counts, values)
/// per table.
const DHT_SEGMENT_LEN: usize = 4 + 4 * 17 + 2 * 12 + 2 * 162;
const DHT_SEGMENT: [u8; DHT_SEGMENT_LEN] = dht_segment();

const fn dht_segment() -> [u8; DHT_SEGMENT_LEN] {
    let mut out = [0u8; DHT_SEGMENT_LEN];
    out[0] = 0xFF;
    out[1] = 0xC4;
    let len = (DHT_SEGMENT_LEN - 2) as u16;
    out[2] = (len >> 8) as u8;
    out[3] = len as u8;
    let mut pos = 4;
    // Class 0 = DC, 1 = AC; id 0 = luma, 1 = chroma.
    pos = put_table(&mut out, pos, 0x00, &DC_LUMA_BITS, &DC_VALUES);
    pos = put_table(&mut out, pos, 0x01, &DC_CHROMA_BITS, &DC_VALUES);
    pos = put_table(&mut out, pos, 0x10, &AC_LUMA_BITS, &AC_LUMA_VALUES);
    put_table(&mut out, pos, 0x11, &AC_CHROMA_BITS, &AC_CHROMA_VALUES);
    out
}

const fn put_table(
    out: &mut [u8; DHT_SEGMENT_LEN],
    mut pos: usize,
    class_id: u8,
    bits: &[u8; 16],
    values: &[u8],
) -> usize {
    out[pos] = class_id;
    pos += 1;
    let mut i = 0;
    while i < 16 {
        out[pos] = bits[i];
        pos += 1;
        i += 1;
    }
    let mut i = 0;
    while i < values.len() {
        out[pos] = values[i];
        pos += 1;
        i += 1;
    }
    pos
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huffman_tables_are_consistent() {
        // Each table's code-length counts must add up to its number of values.
        let sum = |bits: &[u8; 16]| bits.iter().map(|&b| b as usize).sum::<usize>();
        assert_eq!(sum(&DC_LUMA_BITS), DC_VALUES.len());
        assert_eq!(sum(&DC_CHROMA_BITS), DC_VALUES.len());
        assert_eq!(sum(&AC_LUMA_BITS), AC_LUMA_VALUES.len());
        assert_eq!(sum(&AC_CHROMA_BITS), AC_CHROMA_VALUES.len());
        // The well-known 420-byte segment with length 0x01A2.
        assert_eq!(DHT_SEGMENT.len(), 420);
        assert_eq!(&DHT_SEGMENT[..4], &[0xFF, 0xC4, 0x01, 0xA2]);
    }

    #[test]
    fn limited_and_full_range_extremes() {
        #[rustfmt::skip]
        let cases = [
            (YuvRange::Limited, (16, 128, 128), [0, 0, 0]),
            (YuvRange::Limited, (235, 128, 128), [255, 255, 255]),
            (YuvRange::Limited, (81, 90, 240), [255, 0, 0]),
            (YuvRange::Limited, (145, 54, 34), [0, 255, 0]),
            (YuvRange::Limited, (41, 240, 110), [0, 0, 255]),
            (YuvRange::Full, (0, 128, 128), [0, 0, 0]),
            (YuvRange::Full, (255, 128, 128), [255, 255, 255]),
            (YuvRange::Full, (76, 85, 255), [254, 0, 0]),
        ];
        for (range, (y, cb, cr), want) in cases {
            let got = Coeffs::of(range).rgb(y, cb, cr);
            let close = got.iter().zip(want).all(|(&g, w)| g.abs_diff(w) <= 2);
            assert!(
                close,
                "{range:?} {:?} -> {got:?}, want {want:?}",
                (y, cb, cr)
            );
        }
    }

    #[test]
    fn framing() {
        assert_eq!(framed(&[0x00, 0xD8, 0xFF, 0xD9]), Err(MjpegError::NoSoi));
        assert_eq!(
            framed(&[0xFF, 0xD8, 0xFF, 0xDA, 0x12]),
            Err(MjpegError::Truncated(5))
        );
        // Zero padding after EOI is trimmed, not mistaken for truncation.
        let padded = [0xFF, 0xD8, 0xFF, 0xD9, 0, 0, 0];
        assert_eq!(framed(&padded), Ok(&padded[..4]));
    }
}
