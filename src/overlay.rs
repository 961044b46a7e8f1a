//! Draws instances over the image: translucent masks, boxes, and "label score" captions in an
//! 8×8 bitmap font (font8x8, public domain), coloured by class, or by track in the live preview
//! so each garment keeps its colour while it moves.

use std::fmt::{self, Display, Write};

use font8x8::UnicodeFonts;
use image::{Rgb, RgbImage};

use crate::postprocess::Instance;

/// Mask tint opacity.
const MASK_ALPHA: f32 = 0.45;
const BOX_THICKNESS: i64 = 2;
/// Distinct, saturated colours (Tableau 20 subset), picked by class id; its first ten are
/// matplotlib's tab10, which the bench chart's stages use too.
pub(crate) const PALETTE: [[u8; 3]; 12] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
    [174, 199, 232],
    [255, 187, 120],
];

pub fn class_colour(class_id: usize) -> [u8; 3] {
    PALETTE[class_id % PALETTE.len()]
}

/// The colour of track `id`: the page (src/stream/page.html) picks the same one.
pub fn track_colour(id: u64) -> [u8; 3] {
    PALETTE[(id % PALETTE.len() as u64) as usize]
}

/// Draws `instances` onto `image`, lowest score first so the best ends on top.
pub fn draw<'a>(image: &mut RgbImage, instances: &[Instance], label: impl Fn(usize) -> &'a str) {
    draw_with(
        image,
        instances,
        |i| class_colour(instances[i].class_id),
        |i| Caption {
            track: None,
            label: label(instances[i].class_id),
            score: instances[i].score,
        },
    );
}

/// [`draw`], coloured by track and captioned "#id label score"; `track_ids[k]` is the track of
/// `instances[k]`.
pub fn draw_tracked<'a>(
    image: &mut RgbImage,
    instances: &[Instance],
    track_ids: &[u64],
    label: impl Fn(usize) -> &'a str,
) {
    let id = |i: usize| track_ids.get(i).copied().unwrap_or(0);
    draw_with(
        image,
        instances,
        |i| track_colour(id(i)),
        |i| Caption {
            track: Some(id(i)),
            label: label(instances[i].class_id),
            score: instances[i].score,
        },
    );
}

/// "label score", after "#id " when tracked: formatted straight into the glyphs drawn, so
/// drawing allocates nothing.
struct Caption<'a> {
    track: Option<u64>,
    label: &'a str,
    score: f32,
}

impl Display for Caption<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(id) = self.track {
            write!(f, "#{id} ")?;
        }
        write!(f, "{} {:.2}", self.label, self.score)
    }
}

/// Instances are addressed by index, so colour and caption may depend on more than the instance.
fn draw_with<'a>(
    image: &mut RgbImage,
    instances: &[Instance],
    colour_of: impl Fn(usize) -> [u8; 3],
    caption_of: impl Fn(usize) -> Caption<'a>,
) {
    for (i, inst) in instances.iter().enumerate().rev() {
        let colour = colour_of(i);
        let Some(mask) = &inst.mask else { continue };
        mask.for_each_foreground(|y, x| {
            if let Some(p) = image.get_pixel_mut_checked(x as u32, y as u32) {
                for (c, &k) in p.0.iter_mut().zip(&colour) {
                    *c = (*c as f32 * (1.0 - MASK_ALPHA) + k as f32 * MASK_ALPHA).round() as u8;
                }
            }
        });
    }
    for (i, inst) in instances.iter().enumerate().rev() {
        let colour = colour_of(i);
        let [x1, y1, x2, y2] = inst.bbox.map(|v| v.round() as i64);
        for t in 0..BOX_THICKNESS {
            hline(image, x1, x2, y1 + t, colour);
            hline(image, x1, x2, y2 - t, colour);
            vline(image, x1 + t, y1, y2, colour);
            vline(image, x2 - t, y1, y2, colour);
        }
        let caption = caption_of(i);
        let text_y = if y1 >= 10 {
            y1 - 10
        } else {
            y1 + BOX_THICKNESS
        };
        text(image, x1, text_y, &caption, colour);
    }
}

/// Sets one pixel, ignoring coordinates outside the image.
pub fn put(image: &mut RgbImage, x: i64, y: i64, colour: [u8; 3]) {
    if let (Ok(x), Ok(y)) = (u32::try_from(x), u32::try_from(y)) {
        if let Some(p) = image.get_pixel_mut_checked(x, y) {
            *p = Rgb(colour);
        }
    }
}

fn hline(image: &mut RgbImage, x1: i64, x2: i64, y: i64, colour: [u8; 3]) {
    let w = image.width() as i64;
    for x in x1.max(0)..=x2.min(w - 1) {
        put(image, x, y, colour);
    }
}

fn vline(image: &mut RgbImage, x: i64, y1: i64, y2: i64, colour: [u8; 3]) {
    let h = image.height() as i64;
    for y in y1.max(0)..=y2.min(h - 1) {
        put(image, x, y, colour);
    }
}

/// 8×8 glyphs of `s` with their top-left corner at (x, y), clipped to the image; characters
/// the font lacks are blank.
pub fn glyphs(image: &mut RgbImage, x: i64, y: i64, s: &str, colour: [u8; 3]) {
    for (i, c) in s.chars().enumerate() {
        let glyph = font8x8::BASIC_FONTS.get(c).unwrap_or([0; 8]);
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits >> col & 1 == 1 {
                    put(image, x + 8 * i as i64 + col, y + row as i64, colour);
                }
            }
        }
    }
}

/// White glyphs of `s` on a bar of `background`, drawn as `s` formats itself.
fn text(image: &mut RgbImage, x: i64, y: i64, s: &impl Display, background: [u8; 3]) {
    /// Counts the characters written, for the bar's width.
    struct Count(i64);
    impl Write for Count {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            self.0 += s.chars().count() as i64;
            Ok(())
        }
    }
    /// Draws each piece after the ones before it.
    struct Pen<'a> {
        image: &'a mut RgbImage,
        x: i64,
        y: i64,
    }
    impl Write for Pen<'_> {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            glyphs(self.image, self.x, self.y, s, [255, 255, 255]);
            self.x += 8 * s.chars().count() as i64;
            Ok(())
        }
    }
    let mut count = Count(0);
    // Neither writer fails, and a caption's `Display` only passes their results on.
    let _ = write!(count, "{s}");
    for dy in -1..9 {
        hline(image, x, x + 8 * count.0, y + dy, background);
    }
    let _ = write!(Pen { image, x, y }, "{s}");
}
