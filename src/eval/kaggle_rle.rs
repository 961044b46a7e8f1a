//! Kaggle's run-length encoding (iMaterialist `train.csv` and submissions): space-separated
//! `start length` pairs, where pixels are numbered from 1 down each column, then column by
//! column (column-major), so pixel (y, x) of an H×W image is number `x·H + y + 1`.
//!
//! COCO's uncompressed RLE ([`Rle`]) walks pixels in the same order but counts from 0 and
//! stores alternating background/foreground run lengths, so converting is a running sum; the
//! classic bug is a one-pixel shift, which the tests pin at the first and last pixel.

use std::fmt::Write;

use crate::eval::masks::RleBuilder;
use crate::rle::Rle;

/// What is wrong with one `EncodedPixels` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RleError {
    #[error("{0}")]
    Malformed(String),
    #[error(
        "run `{start} {length}` ends at pixel {} but Height×Width is only {pixels}",
        start + length - 1
    )]
    Overrun {
        start: u64,
        length: u64,
        pixels: u64,
    },
    #[error(
        "run starting at pixel {start} does not come after the previous run, which ends at \
         pixel {previous_end}: runs must increase and not overlap"
    )]
    Order { start: u64, previous_end: u64 },
}

/// Appends the Kaggle encoding of `rle` to `out` (nothing for an empty mask).
pub fn write(rle: &Rle, out: &mut String) {
    let mut position = 0u64;
    let mut first = true;
    for (i, &count) in rle.counts.iter().enumerate() {
        if i % 2 == 1 && count > 0 {
            if !first {
                out.push(' ');
            }
            first = false;
            // Writing to a String cannot fail.
            let _ = write!(out, "{} {count}", position + 1);
        }
        position += count as u64;
    }
}

pub fn encode(rle: &Rle) -> String {
    let mut out = String::new();
    write(rle, &mut out);
    out
}

/// Parses `start length` pairs into a mask of `height × width`. Runs must be in increasing
/// order and must not overlap; runs that touch are joined.
pub fn decode(text: &str, height: usize, width: usize) -> Result<Rle, RleError> {
    let pixels = height as u64 * width as u64;
    if pixels > u32::MAX as u64 {
        return Err(RleError::Malformed(format!(
            "{height}×{width} pixels do not fit a 32-bit run length"
        )));
    }
    let number = |token: &str, what: &str| {
        token.parse::<u64>().map_err(|_| {
            RleError::Malformed(format!("{what} `{token}` is not a non-negative integer"))
        })
    };
    let mut tokens = text.split_ascii_whitespace();
    let mut out = RleBuilder::new();
    // 0-based index one past the previous run's last pixel.
    let mut end = 0u64;
    while let Some(start) = tokens.next() {
        let Some(length) = tokens.next() else {
            return Err(RleError::Malformed(format!(
                "an odd number of values: start `{start}` has no length"
            )));
        };
        let (start, length) = (number(start, "start")?, number(length, "length")?);
        if start == 0 {
            return Err(RleError::Malformed(
                "pixel numbers start at 1, not 0".to_owned(),
            ));
        }
        if length == 0 {
            return Err(RleError::Malformed(format!(
                "run at pixel {start} has length 0"
            )));
        }
        if start - 1 < end {
            return Err(RleError::Order {
                start,
                previous_end: end,
            });
        }
        if start - 1 + length > pixels {
            return Err(RleError::Overrun {
                start,
                length,
                pixels,
            });
        }
        out.push(false, start - 1 - end);
        out.push(true, length);
        end = start - 1 + length;
    }
    out.push(false, pixels - end);
    Ok(out.finish(height, width))
}
