//! The `--plot` chart of `drape eval --sweep`: accuracy against median detect latency, one
//! colour per metric, each point labelled with its input size and mask cap. Drawn directly
//! with `image` and the 8×8 font8x8 glyphs, so no plotting stack is needed.

use image::{Rgb, RgbImage};

use crate::overlay::{glyphs as text, put};

const WIDTH: u32 = 960;
const HEIGHT: u32 = 600;
/// Plot area insets: room for tick labels left and below, the legend above.
const LEFT: i64 = 80;
const RIGHT: i64 = 40;
const TOP: i64 = 50;
const BOTTOM: i64 = 60;
const TICKS: usize = 5;
const POINT_RADIUS: i64 = 3;
pub(crate) const BACKGROUND: [u8; 3] = [255, 255, 255];
pub(crate) const INK: [u8; 3] = [40, 40, 40];
pub(crate) const GRID: [u8; 3] = [225, 225, 225];

pub struct Point {
    pub x: f64,
    pub y: f64,
    pub label: String,
}

pub struct Series {
    pub name: String,
    pub colour: [u8; 3],
    pub points: Vec<Point>,
}

/// Maps data to pixels: x in [0, x_max] and y in [0, y_max] onto the plot area.
struct Frame {
    x_max: f64,
    y_max: f64,
}

impl Frame {
    fn px(&self, x: f64, y: f64) -> (i64, i64) {
        let w = (WIDTH as i64 - LEFT - RIGHT) as f64;
        let h = (HEIGHT as i64 - TOP - BOTTOM) as f64;
        (
            LEFT + (x / self.x_max * w).round() as i64,
            HEIGHT as i64 - BOTTOM - (y / self.y_max * h).round() as i64,
        )
    }
}

/// Rounds up to 1, 2 or 5 times a power of ten, for tick-friendly axis ends.
pub(crate) fn nice_ceiling(v: f64) -> f64 {
    if !(v.is_finite() && v > 0.0) {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|&c| c >= v)
        .unwrap_or(10.0 * magnitude)
}

pub fn draw(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> RgbImage {
    let mut img = RgbImage::from_pixel(WIDTH, HEIGHT, Rgb(BACKGROUND));
    let points = || series.iter().flat_map(|s| &s.points);
    let frame = Frame {
        x_max: nice_ceiling(points().map(|p| p.x).fold(0.0, f64::max) * 1.05),
        // Both metrics are at most 1.
        y_max: nice_ceiling(points().map(|p| p.y).fold(0.0, f64::max) * 1.05).min(1.0),
    };
    let (x0, y0) = frame.px(0.0, 0.0);
    let (x1, y1) = frame.px(frame.x_max, frame.y_max);
    for i in 0..=TICKS {
        let f = i as f64 / TICKS as f64;
        let (gx, gy) = frame.px(f * frame.x_max, f * frame.y_max);
        rect(&mut img, (gx, y0), (gx, y1), GRID);
        rect(&mut img, (x0, gy), (x1, gy), GRID);
        let xt = if frame.x_max >= 10.0 {
            format!("{:.0}", f * frame.x_max)
        } else {
            format!("{:.1}", f * frame.x_max)
        };
        text(&mut img, gx - 4 * xt.len() as i64, y0 + 8, &xt, INK);
        let yt = format!("{:.2}", f * frame.y_max);
        text(&mut img, x0 - 8 * yt.len() as i64 - 6, gy - 4, &yt, INK);
    }
    rect(&mut img, (x0, y0), (x1, y0), INK);
    rect(&mut img, (x0, y0), (x0, y1), INK);
    text(&mut img, x0, 12, title, INK);
    text(
        &mut img,
        (x0 + x1) / 2 - 4 * x_label.len() as i64,
        y0 + 32,
        x_label,
        INK,
    );
    text(&mut img, 8, y1 - 20, y_label, INK);

    // Legend at the top right, one colour box and name per series.
    let entry_width = |s: &Series| 14 + 8 * s.name.len() as i64 + 24;
    let mut legend_x = x1 - series.iter().map(entry_width).sum::<i64>();
    for s in series {
        square(&mut img, legend_x + 4, 34, POINT_RADIUS + 1, s.colour);
        text(&mut img, legend_x + 14, 30, &s.name, INK);
        legend_x += entry_width(s);
        for p in &s.points {
            let (px, py) = frame.px(p.x, p.y);
            square(&mut img, px, py, POINT_RADIUS, s.colour);
            text(&mut img, px + 6, py - 10, &p.label, s.colour);
        }
    }
    img
}

/// Fills the rectangle spanned by two corners: an axis-parallel line when they share x or y,
/// all a chart of axes, grid and square markers needs.
pub(crate) fn rect(
    img: &mut RgbImage,
    (xa, ya): (i64, i64),
    (xb, yb): (i64, i64),
    colour: [u8; 3],
) {
    for x in xa.min(xb)..=xa.max(xb) {
        for y in ya.min(yb)..=ya.max(yb) {
            put(img, x, y, colour);
        }
    }
}

fn square(img: &mut RgbImage, cx: i64, cy: i64, r: i64, colour: [u8; 3]) {
    rect(img, (cx - r, cy - r), (cx + r, cy + r), colour);
}
