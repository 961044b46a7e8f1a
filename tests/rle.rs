//! Both mask encodings round-trip through decoders written here from the formats'
//! definitions (not drape's own code): COCO compressed RLE (pycocotools' `rleFrString`) and
//! the iMaterialist/Kaggle `start length` pairs (1-indexed, column-major).

mod common;

use drape::rle::Rle;

/// Kaggle EncodedPixels → row-major mask.
fn decode_kaggle(s: &str, height: usize, width: usize) -> Vec<u8> {
    let mut mask = vec![0u8; height * width];
    let nums: Vec<usize> = s.split_whitespace().map(|n| n.parse().unwrap()).collect();
    for pair in nums.chunks_exact(2) {
        for p in pair[0] - 1..pair[0] - 1 + pair[1] {
            // Column-major position p → (row p % h, column p / h).
            mask[(p % height) * width + p / height] = 1;
        }
    }
    mask
}

/// Column-major (as the COCO decoder returns) → row-major.
fn transpose(col_major: &[u8], height: usize, width: usize) -> Vec<u8> {
    let mut out = vec![0u8; height * width];
    for x in 0..width {
        for y in 0..height {
            out[y * width + x] = col_major[x * height + y];
        }
    }
    out
}

#[test]
fn masks_round_trip_through_independent_decoders() {
    let (h, w) = (7, 5);
    let mut x = 12345u32;
    let mut random = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x.is_multiple_of(3) as u8
    };
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![0; h * w]),
        ("full", vec![1; h * w]),
        ("first pixel", (0..h * w).map(|i| (i == 0) as u8).collect()),
        (
            "last pixel",
            (0..h * w).map(|i| (i == h * w - 1) as u8).collect(),
        ),
    ];
    for _ in 0..20 {
        cases.push(("random", (0..h * w).map(|_| random()).collect()));
    }
    for (name, mask) in cases {
        let rle = Rle::encode(&mask, h, w);
        let coco = transpose(&common::decode_coco_rle(&rle.to_coco_string(), h, w), h, w);
        assert_eq!(coco, mask, "{name}: COCO");
        let mut kaggle = String::new();
        rle.write_kaggle_string(&mut kaggle).unwrap();
        assert_eq!(
            decode_kaggle(&kaggle, h, w),
            mask,
            "{name}: Kaggle {kaggle:?}"
        );
        assert_eq!(
            rle.area(),
            mask.iter().map(|&v| v as u64).sum::<u64>(),
            "{name}: area"
        );
    }
    // The classic off-by-one: the image's first and last pixels are 1 and h*w.
    let mut s = String::new();
    Rle::encode(
        &(0..h * w)
            .map(|i| (i == 0 || i == h * w - 1) as u8)
            .collect::<Vec<_>>(),
        h,
        w,
    )
    .write_kaggle_string(&mut s)
    .unwrap();
    assert_eq!(s, format!("1 1 {} 1", h * w));
}
