//! `drape eval` / `drape submit`: the iMaterialist metric on hand-made cases with known answers,
//! COCO mask AP and polygon rasterisation against pycocotools
//! (`calibration/make_eval_fixtures.py` wrote `tests/fixtures/eval/`), Kaggle's RLE at the
//! image's first and last pixel, named errors for bad annotations, and both commands end to end.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use drape::eval::metric::{
    coco_iou_thresholds, coco_recall_thresholds, CocoEvaluator, ImaterialistMetric, Scored,
};
use drape::eval::{
    coco, imaterialist, kaggle_rle, masks, submit, Annotations, EvalError, EvalOptions, Evaluation,
    GtObject, RleError, DEFAULT_MIN_SCORE,
};
use drape::postprocess::Instance;
use drape::rle::Rle;
use serde::Deserialize;

const TINY_MODEL: &str = "tests/fixtures/tiny_r50/model.safetensors";
/// The tiny fixture model's classes, background included (46 iMaterialist categories).
const TINY_CLASSES: usize = 47;
/// AP values are means of a few thousand terms; pycocotools sums them pairwise.
const AP_TOLERANCE: f64 = 1e-12;

fn eval_fixtures() -> PathBuf {
    common::fixtures().join("eval")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A `height × width` mask with the rectangle rows `y0..y1`, columns `x0..x1` set.
fn rect(height: usize, width: usize, [y0, x0, y1, x1]: [usize; 4]) -> Rle {
    let mut m = vec![0u8; height * width];
    for y in y0..y1 {
        for x in x0..x1 {
            m[y * width + x] = 1;
        }
    }
    Rle::encode(&m, height, width)
}

// --- iMaterialist metric -------------------------------------------------------------------

#[test]
fn imaterialist_metric_known_answers() {
    const S: usize = 20;
    let square = [0, 0, 10, 10];
    struct Case {
        name: &'static str,
        truth: Vec<(usize, [usize; 4])>,
        predictions: Vec<(usize, f64, [usize; 4])>,
        score: f64,
        pairs: usize,
    }
    let cases = [
        Case {
            name: "perfect prediction",
            truth: vec![(1, square), (2, [12, 12, 20, 20])],
            predictions: vec![(1, 0.9, square), (2, 0.8, [12, 12, 20, 20])],
            score: 1.0,
            pairs: 2,
        },
        Case {
            name: "empty prediction",
            truth: vec![(1, square)],
            predictions: vec![],
            score: 0.0,
            pairs: 1,
        },
        Case {
            name: "half the mask: IoU 0.5 is not above the 0.5 threshold",
            truth: vec![(1, square)],
            predictions: vec![(1, 0.9, [0, 0, 10, 5])],
            score: 0.0,
            pairs: 1,
        },
        Case {
            name: "IoU 0.72 hits at 0.50..0.70, 5 of 10 thresholds",
            truth: vec![(1, square)],
            predictions: vec![(1, 0.9, [0, 0, 8, 9])],
            score: 0.5,
            pairs: 1,
        },
        Case {
            name: "a duplicate prediction is a false positive: 1 / (1 + 1 + 0)",
            truth: vec![(1, square)],
            predictions: vec![(1, 0.9, square), (1, 0.8, square)],
            score: 0.5,
            pairs: 1,
        },
        Case {
            name: "right mask, wrong class: two pairs scoring 0",
            truth: vec![(1, square)],
            predictions: vec![(2, 0.9, square)],
            score: 0.0,
            pairs: 2,
        },
        Case {
            name: "pairs average uniformly: one class right, one missed",
            truth: vec![(1, square), (3, [12, 0, 20, 8])],
            predictions: vec![(1, 0.9, square)],
            score: 0.5,
            pairs: 2,
        },
        Case {
            name: "greedy by score: the better-scored, worse-fitting prediction takes the truth \
                   (IoU 0.72) and the perfect one is a false positive",
            truth: vec![(1, square)],
            predictions: vec![(1, 0.9, [0, 0, 8, 9]), (1, 0.4, square)],
            // t <= 0.70: 1/(1+1+0); t > 0.70: the second matches, 1/(1+1+0) again.
            score: 0.5,
            pairs: 1,
        },
    ];
    let mut failures = Vec::new();
    for case in &cases {
        let truth: Vec<GtObject> = case
            .truth
            .iter()
            .map(|&(class_id, r)| GtObject {
                class_id,
                mask: rect(S, S, r),
                iscrowd: false,
            })
            .collect();
        let pred_masks: Vec<Rle> = case
            .predictions
            .iter()
            .map(|&(_, _, r)| rect(S, S, r))
            .collect();
        let predictions: Vec<Scored> = case
            .predictions
            .iter()
            .zip(&pred_masks)
            .map(|(&(class_id, score, _), mask)| Scored {
                class_id,
                score,
                mask,
            })
            .collect();
        let mut metric = ImaterialistMetric::new();
        metric.add_image(&truth, &predictions);
        let summary = metric.summary();
        let score = summary.score.unwrap_or(f64::NAN);
        if (score - case.score).abs() > 1e-12 || summary.pairs != case.pairs {
            failures.push(format!(
                "{}: score {score} over {} pairs, expected {} over {}",
                case.name, summary.pairs, case.score, case.pairs
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// --- COCO AP and polygons against pycocotools ----------------------------------------------

#[derive(Deserialize)]
struct ExpectedAp {
    ap: f64,
    ap50: f64,
    ap75: f64,
    per_class: Vec<ExpectedClass>,
    iou_thresholds: Vec<String>,
    recall_thresholds: Vec<String>,
}

#[derive(Deserialize)]
struct ExpectedClass {
    class_id: usize,
    ap: f64,
    ap50: f64,
    ap75: f64,
}

#[derive(Deserialize)]
struct ResultEntry {
    image_id: u64,
    category_id: usize,
    segmentation: CompressedRle,
    score: f64,
}

#[derive(Deserialize)]
struct CompressedRle {
    size: [usize; 2],
    counts: String,
}

#[test]
fn thresholds_are_numpys_to_the_bit() {
    let expected: ExpectedAp =
        serde_json::from_str(&read(&eval_fixtures().join("coco_expected.json"))).unwrap();
    let parse = |v: &[String]| -> Vec<f64> { v.iter().map(|s| s.parse().unwrap()).collect() };
    assert_eq!(
        coco_iou_thresholds().to_vec(),
        parse(&expected.iou_thresholds)
    );
    assert_eq!(
        coco_recall_thresholds().to_vec(),
        parse(&expected.recall_thresholds)
    );
}

#[test]
fn coco_mask_ap_matches_pycocotools() {
    let dir = eval_fixtures();
    let gt_path = dir.join("coco_gt.json");
    let dataset = coco::read_instances(&gt_path, 10, 0).unwrap();
    // The reader names images by file_name; the result file refers to them by id.
    let gt_json: serde_json::Value = serde_json::from_str(&read(&gt_path)).unwrap();
    let ids: HashMap<String, u64> = gt_json["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["file_name"].as_str().unwrap().to_owned(),
                i["id"].as_u64().unwrap(),
            )
        })
        .collect();
    let results: Vec<ResultEntry> = serde_json::from_str(&read(&dir.join("coco_dt.json"))).unwrap();
    let decoded: Vec<Rle> = results
        .iter()
        .map(|r| {
            let [h, w] = r.segmentation.size;
            masks::from_coco_string(&r.segmentation.counts, h, w).unwrap()
        })
        .collect();

    let mut evaluator = CocoEvaluator::new(&dataset.categories);
    for image in &dataset.images {
        let id = ids[&image.name];
        let detections: Vec<Scored> = results
            .iter()
            .zip(&decoded)
            .filter(|(r, _)| r.image_id == id)
            .map(|(r, mask)| Scored {
                class_id: r.category_id,
                score: r.score,
                mask,
            })
            .collect();
        evaluator.add_image(&image.objects, &detections);
    }
    let ours = evaluator.summary();
    let expected: ExpectedAp =
        serde_json::from_str(&read(&dir.join("coco_expected.json"))).unwrap();

    let mut rows = vec![(
        "all".to_owned(),
        [ours.ap.unwrap(), ours.ap50.unwrap(), ours.ap75.unwrap()],
        [expected.ap, expected.ap50, expected.ap75],
    )];
    assert_eq!(ours.per_class.len(), expected.per_class.len());
    for (o, e) in ours.per_class.iter().zip(&expected.per_class) {
        assert_eq!(o.class_id, e.class_id);
        rows.push((
            format!("class {}", o.class_id),
            [o.ap, o.ap50, o.ap75],
            [e.ap, e.ap50, e.ap75],
        ));
    }
    let failures: Vec<_> = rows
        .iter()
        .filter(|(_, o, e)| o.iter().zip(e).any(|(a, b)| (a - b).abs() > AP_TOLERANCE))
        .collect();
    assert!(
        failures.is_empty(),
        "AP/AP50/AP75 differ from pycocotools: {failures:?}"
    );
}

#[derive(Deserialize)]
struct PolygonCase {
    name: String,
    height: usize,
    width: usize,
    polygons: Vec<Vec<f64>>,
    counts: Vec<u32>,
}

/// `rleFrPoly` is ported operation for operation, so the tolerance is zero pixels.
#[test]
fn polygons_rasterise_like_pycocotools() {
    let cases: Vec<PolygonCase> =
        serde_json::from_str(&read(&eval_fixtures().join("polygons.json"))).unwrap();
    let mut failures = Vec::new();
    for case in &cases {
        // Through the COCO reader, so multi-part objects are merged as annToRLE does.
        let json = serde_json::json!({
            "images": [{"id": 1, "file_name": "x.png", "height": case.height, "width": case.width}],
            "categories": [{"id": 1}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "segmentation": case.polygons}
            ],
        });
        let dataset =
            coco::parse_instances(&json.to_string(), Path::new("polygons.json"), 2, 0).unwrap();
        let ours = &dataset.images[0].objects[0].mask;
        let reference = Rle {
            height: case.height,
            width: case.width,
            counts: case.counts.clone(),
        };
        let (inter, union) = masks::intersection_union(ours, &reference);
        if inter != union || ours.counts != case.counts {
            failures.push(format!(
                "{}: {} pixels differ; ours {:?}, pycocotools {:?}",
                case.name,
                union - inter,
                ours.counts,
                case.counts
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// --- Kaggle RLE --------------------------------------------------------------------------

#[test]
fn kaggle_rle_round_trip_is_one_indexed_and_column_major() {
    struct Case {
        name: &'static str,
        height: usize,
        width: usize,
        /// Foreground pixels as (y, x).
        pixels: &'static [(usize, usize)],
        kaggle: &'static str,
    }
    let case = |name, height, width, pixels, kaggle| Case {
        name,
        height,
        width,
        pixels,
        kaggle,
    };
    let cases = [
        case("first pixel of the image", 4, 3, &[(0, 0)], "1 1"),
        case("last pixel of the image", 4, 3, &[(3, 2)], "12 1"),
        case("numbering goes down a column first", 4, 3, &[(1, 0)], "2 1"),
        case("then on to the next column", 4, 3, &[(0, 1)], "5 1"),
        case(
            "a run continues across a column boundary",
            4,
            3,
            &[(3, 0), (0, 1)],
            "4 2",
        ),
        case(
            "first and last pixel together",
            4,
            3,
            &[(0, 0), (3, 2)],
            "1 1 12 1",
        ),
        case("a one-row image", 1, 5, &[(0, 0), (0, 4)], "1 1 5 1"),
        case(
            "every pixel",
            2,
            2,
            &[(0, 0), (1, 0), (0, 1), (1, 1)],
            "1 4",
        ),
        case("no pixel", 2, 2, &[], ""),
    ];
    let mut failures = Vec::new();
    for &Case {
        name,
        height: h,
        width: w,
        pixels,
        kaggle: text,
    } in &cases
    {
        let mut bitmap = vec![0u8; h * w];
        for &(y, x) in pixels {
            bitmap[y * w + x] = 1;
        }
        let mask = Rle::encode(&bitmap, h, w);
        let encoded = kaggle_rle::encode(&mask);
        let decoded = kaggle_rle::decode(text, h, w);
        let mut back = Vec::new();
        if let Ok(d) = &decoded {
            d.for_each_foreground(|y, x| back.push((y, x)));
        }
        back.sort_by_key(|&(y, x)| (x, y));
        let mut want = pixels.to_vec();
        want.sort_by_key(|&(y, x)| (x, y));
        if encoded != text || decoded.as_ref().ok() != Some(&mask) || back != want {
            failures.push(format!(
                "{name}: encoded {encoded:?} (want {text:?}), decoded {decoded:?} -> {back:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// --- named errors --------------------------------------------------------------------------

#[test]
fn malformed_train_csv_rows_are_named_errors_with_line_numbers() {
    const HEADER: &str = "ImageId,EncodedPixels,Height,Width,ClassId";
    type Check = fn(&EvalError) -> bool;
    let csv: Check = |e| matches!(e, EvalError::Csv { .. });
    let overrun: Check = |e| {
        matches!(
            e,
            EvalError::Rle {
                reason: RleError::Overrun { .. },
                ..
            }
        )
    };
    let order: Check = |e| {
        matches!(
            e,
            EvalError::Rle {
                reason: RleError::Order { .. },
                ..
            }
        )
    };
    let rle_format: Check = |e| {
        matches!(
            e,
            EvalError::Rle {
                reason: RleError::Malformed(_),
                ..
            }
        )
    };
    let unknown: Check = |e| matches!(e, EvalError::UnknownClass { class_id: 46, .. });
    // (name, rows after a valid first row, line of the error, expected variant)
    let cases: &[(&str, &str, usize, Check)] = &[
        ("too few fields", "b,1 2,4,3", 3, csv),
        ("too many fields", "b,1 2,4,3,1,9", 3, csv),
        ("Height not a number", "b,1 2,four,3,1", 3, csv),
        ("zero Width", "b,1 2,4,0,1", 3, csv),
        ("ClassId without a category", "b,1 2,4,3,shirt", 3, csv),
        ("empty EncodedPixels", "b,,4,3,1", 3, csv),
        (
            "an odd number of RLE values",
            "b,1 2 5,4,3,1",
            3,
            rle_format,
        ),
        ("pixel 0 (RLE is 1-indexed)", "b,0 2,4,3,1", 3, rle_format),
        ("a run of length 0", "b,3 0,4,3,1", 3, rle_format),
        ("a run past Height×Width", "b,10 4,4,3,1", 3, overrun),
        ("a start past Height×Width", "b,13 1,4,3,1", 3, overrun),
        ("decreasing runs", "b,5 2 1 1,4,3,1", 3, order),
        ("overlapping runs", "b,1 4 3 2,4,3,1", 3, order),
        ("ClassId beyond the model's 46", "b,1 2,4,3,46", 3, unknown),
        (
            "ClassId beyond the model's, with attributes",
            "b,1 2,4,3,46_1_2",
            3,
            unknown,
        ),
        ("an image changing size", "a,1 2,5,3,1", 3, csv),
        ("an unterminated quote", "b,\"1 2,4,3,1", 3, csv),
    ];
    let mut failures = Vec::new();
    for &(name, row, line, check) in cases {
        let text = format!("{HEADER}\na,1 2,4,3,1\n{row}\n");
        let path = Path::new("train.csv");
        match imaterialist::parse_train_csv(&text, path, TINY_CLASSES) {
            Ok(_) => failures.push(format!("{name}: accepted")),
            Err(e) => {
                let message = e.to_string();
                if !check(&e) || !message.starts_with(&format!("train.csv:{line}: ")) {
                    failures.push(format!("{name}: {message} ({e:?})"));
                }
            }
        }
    }
    for (name, text) in [
        ("no header", ""),
        (
            "a header without ClassId",
            "ImageId,EncodedPixels,Height,Width",
        ),
    ] {
        match imaterialist::parse_train_csv(text, Path::new("train.csv"), TINY_CLASSES) {
            Err(e @ EvalError::Csv { line: 1, .. }) => assert!(e.to_string().contains(":1: ")),
            other => failures.push(format!("{name}: {other:?}")),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn train_csv_reads_categories_groups_images_and_joins_touching_runs() {
    let text = "ImageId,EncodedPixels,Height,Width,ClassId,AttributesIds\r\n\
                a.jpg,1 2 3 2,4,3,31_115_136,\"115,136\"\r\n\
                b,12 1,4,3,0,\r\n\
                a.jpg,5 1,4,3,45,\r\n";
    let d = imaterialist::parse_train_csv(text, Path::new("train.csv"), TINY_CLASSES).unwrap();
    let names: Vec<&str> = d.images.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["a.jpg", "b"]);
    let a = &d.images[0];
    let labels: Vec<usize> = a.objects.iter().map(|o| o.class_id).collect();
    // iMaterialist ClassId k is torchvision label k + 1; attributes are dropped.
    assert_eq!(labels, [32, 46]);
    // `1 2 3 2` touch: one run of 4 pixels.
    assert_eq!(a.objects[0].mask.counts, [0, 4, 8]);
    assert_eq!(d.images[1].objects[0].class_id, 1);
    assert_eq!(d.images[1].objects[0].mask.counts, [11, 1]);
}

#[test]
fn bad_coco_annotations_are_named_errors() {
    let with = |annotation: serde_json::Value| {
        serde_json::json!({
            "images": [{"id": 1, "file_name": "x.png", "height": 4, "width": 3}],
            "categories": [{"id": 1}, {"id": 60}],
            "annotations": [annotation],
        })
        .to_string()
    };
    let cases = [
        (
            "category not listed",
            with(serde_json::json!({"id": 7, "image_id": 1, "category_id": 2,
                "segmentation": [[0, 0, 2, 0, 2, 2]]})),
            "annotation 7: category_id 2 is not in `categories`",
        ),
        (
            "category beyond the model's labels",
            with(
                serde_json::json!({"id": 7, "image_id": 1, "category_id": 60,
                "segmentation": [[0, 0, 2, 0, 2, 2]]}),
            ),
            "annotation 7: category_id 60 + label offset 0 is not one of the model's labels",
        ),
        (
            "unknown image",
            with(serde_json::json!({"id": 7, "image_id": 5, "category_id": 1,
                "segmentation": [[0, 0, 2, 0, 2, 2]]})),
            "annotation 7: image_id 5 is not in `images`",
        ),
        (
            "RLE of another size",
            with(serde_json::json!({"id": 7, "image_id": 1, "category_id": 1,
                "segmentation": {"size": [3, 4], "counts": [12]}})),
            "annotation 7: RLE size [3, 4] differs",
        ),
        (
            "RLE counts not covering the image",
            with(serde_json::json!({"id": 7, "image_id": 1, "category_id": 1,
                "segmentation": {"size": [4, 3], "counts": [5, 2]}})),
            "annotation 7: RLE counts cover 7 pixels, not 4×3 = 12",
        ),
        (
            "compressed RLE outside the alphabet",
            with(serde_json::json!({"id": 7, "image_id": 1, "category_id": 1,
                "segmentation": {"size": [4, 3], "counts": "<~"}})),
            "annotation 7: byte 0x7e",
        ),
        (
            "a polygon of two points",
            with(serde_json::json!({"id": 7, "image_id": 1, "category_id": 1,
                "segmentation": [[0, 0, 2, 2]]})),
            "annotation 7: a polygon needs an even number of at least 6 coordinates",
        ),
        (
            "broken JSON",
            "{\"images\": [\n  {\"id\": 1,,}]}".to_owned(),
            "instances.json: line 2, column",
        ),
    ];
    let mut failures = Vec::new();
    for (name, json, expected) in &cases {
        match coco::parse_instances(json, Path::new("instances.json"), TINY_CLASSES, 0) {
            Ok(_) => failures.push(format!("{name}: accepted")),
            Err(e) if e.to_string().contains(expected) => {}
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// --- submissions -------------------------------------------------------------------------

#[test]
fn higher_scores_win_pixels_and_empty_masks_are_dropped() {
    const S: usize = 10;
    let instance = |class_id, score, mask: Option<Rle>| Instance {
        class_id,
        score,
        bbox: [0.0; 4],
        mask,
    };
    let instances = [
        // Out of score order on purpose.
        instance(2, 0.6, Some(rect(S, S, [0, 0, 10, 6]))),
        instance(1, 0.9, Some(rect(S, S, [0, 4, 10, 10]))),
        // Entirely under the first two: dropped.
        instance(3, 0.55, Some(rect(S, S, [2, 2, 8, 8]))),
        // Beyond the mask cap, and below the score threshold: skipped.
        instance(4, 0.95, None),
        instance(5, 0.4, Some(rect(S, S, [0, 0, 10, 10]))),
    ];
    let kept = submit::non_overlapping(&instances, 0.5);
    let summary: Vec<(usize, u64)> = kept.iter().map(|k| (k.class_id, k.mask.area())).collect();
    assert_eq!(summary, [(1, 60), (2, 40)]);
    assert_eq!(kept[1].mask, rect(S, S, [0, 0, 10, 4]));
}

// --- end to end --------------------------------------------------------------------------

fn fixture_images() -> Vec<PathBuf> {
    let dir = common::fixtures().join("images");
    submit::list_images(&dir).unwrap()
}

/// `e2e_expected.json` (`calibration/make_eval_fixtures.py`): pycocotools' segm AP of
/// torchvision's detections with the tiny_r50 fixture model against `e2e_gt.json` /
/// `e2e_train.csv`, ground truth made from torchvision's confident detections, partly moved,
/// relabelled and missed so that AP is far from 1.
fn expected_e2e_ap() -> f64 {
    let path = common::fixtures().join("eval/e2e_expected.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["mask_ap"].as_f64().unwrap()
}

/// drape's detections match torchvision's to the parity tests' tolerances (same class, box IoU
/// >= 0.98, score within 0.01, mask IoU >= 0.95), which moves AP by at most this much here.
const E2E_AP_TOL: f64 = 0.02;

#[test]
fn eval_reads_coco_json_end_to_end() {
    let (v, _) = common::run_json(
        common::drape_command()
            .args(["eval", "--json", "--device", "cpu", "--weights", TINY_MODEL])
            .args([
                "--images",
                "tests/fixtures/images",
                "--label-offset",
                "1",
                "--coco",
                "tests/fixtures/eval/e2e_gt.json",
            ]),
    );
    let run = &v["runs"][0];
    assert_eq!(run["images"], 3);
    let (ap, expected) = (run["mask_ap"].as_f64().unwrap(), expected_e2e_ap());
    assert!(
        (ap - expected).abs() <= E2E_AP_TOL,
        "mask AP {ap}, pycocotools on torchvision's detections {expected}"
    );
}

#[test]
fn eval_reads_train_csv_and_sweeps_sizes_and_mask_caps() {
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("sweep.png");
    let (v, _) = common::run_json(
        common::drape_command()
            .args([
                "eval",
                "--json",
                "--sweep",
                "--device",
                "cpu",
                "--weights",
                TINY_MODEL,
            ])
            .args([
                "--images",
                "tests/fixtures/images",
                "--annotations",
                "tests/fixtures/eval/e2e_train.csv",
            ])
            .arg("--plot")
            .arg(&plot),
    );
    let runs = v["runs"].as_array().unwrap();
    // 4 ladder sizes × mask caps 100, 20, 10, 5.
    assert_eq!(runs.len(), 16);
    let full = &runs[0];
    assert_eq!(full["images"], 3);
    assert_eq!(full["max_masks"], 100);
    // The same ground truth as the COCO file, read from Kaggle RLE rows with attribute ids.
    let (ap, expected) = (full["mask_ap"].as_f64().unwrap(), expected_e2e_ap());
    assert!(
        (ap - expected).abs() <= E2E_AP_TOL,
        "mask AP {ap}, pycocotools on torchvision's detections {expected}"
    );
    let imat = full["imaterialist"].as_f64().unwrap();
    assert!(imat > 0.0 && imat < 1.0, "iMaterialist score {imat}");
    // Fewer masks can only lose ground truth that needs one: AP falls with the cap at the
    // full size (runs 0..4 are caps 100, 20, 10, 5).
    let capped: Vec<f64> = runs[..4]
        .iter()
        .map(|r| r["mask_ap"].as_f64().unwrap())
        .collect();
    assert!(capped.windows(2).all(|w| w[1] <= w[0] + 1e-9), "{capped:?}");
    assert!(capped[3] < capped[0], "{capped:?}");
    assert!(full["detect_ms"]["median_ms"].as_f64().unwrap() > 0.0);
    assert!(!full["classes"].as_array().unwrap().is_empty());
    assert_eq!(full["precision"], "f32");
    assert!(v["f16"].as_str().unwrap().contains("not applicable"));
    // The plot is the sweep's picture: as wide as its header says, and not blank.
    let png = image::open(&plot).unwrap().to_rgb8();
    let first = *png.get_pixel(0, 0);
    assert!(
        png.width() >= 400 && png.height() >= 300,
        "{}x{}",
        png.width(),
        png.height()
    );
    assert!(png.pixels().filter(|p| **p != first).count() > 1000);
}

/// The library's side of `drape eval` and `drape submit`, as the binary drives it: typed
/// options in, one progress call per model run, named errors out.
#[test]
fn evaluation_and_submission_report_progress_per_run() {
    let mut opts = EvalOptions {
        images: common::fixtures().join("images"),
        annotations: Annotations::Coco {
            path: eval_fixtures().join("e2e_gt.json"),
            label_offset: 1,
        },
        limit: Some(2),
        sweep: false,
        min_score: DEFAULT_MIN_SCORE,
    };
    let evaluation = Evaluation::new(common::tiny_model(), &opts).unwrap();
    // The CPU computes in f32: there is nothing to compare an f32 reference with.
    assert!(!evaluation.wants_reference());
    assert_eq!(evaluation.model_runs(), 2);
    let mut calls = 0;
    let report = evaluation.run(|| calls += 1).unwrap();
    assert_eq!(calls, 2);
    assert_eq!(report.runs.len(), 1);
    assert_eq!(report.runs[0].images, 2);

    opts.limit = Some(0);
    let err = Evaluation::new(common::tiny_model(), &opts).err().unwrap();
    assert!(matches!(err, EvalError::NoImages), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("submission.csv");
    let images = fixture_images();
    let mut calls = 0;
    let rows = drape::eval::write_submission(
        &common::tiny_model(),
        &images,
        &csv,
        DEFAULT_MIN_SCORE,
        || calls += 1,
    )
    .unwrap();
    assert_eq!(calls, images.len());
    assert_eq!(
        read(&csv).lines().count(),
        rows + 1,
        "a header and a row per mask"
    );
}

#[test]
fn eval_names_a_missing_image() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("train.csv");
    std::fs::write(
        &csv,
        "ImageId,EncodedPixels,Height,Width,ClassId\nnowhere,1 2,4,3,1\n",
    )
    .unwrap();
    let stderr = common::run_err(
        common::drape_command()
            .args([
                "eval",
                "--weights",
                TINY_MODEL,
                "--images",
                "tests/fixtures/images",
            ])
            .arg("--annotations")
            .arg(&csv),
    );
    assert!(
        stderr.contains("no image file for `nowhere` (tried nowhere, nowhere.jpg"),
        "{stderr}"
    );
}

#[test]
fn submit_writes_a_parseable_csv_without_overlaps() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("submission.csv");
    common::run_ok(
        common::drape_command()
            .args([
                "submit",
                "--weights",
                TINY_MODEL,
                "--images",
                "tests/fixtures/images",
            ])
            .arg("--out")
            .arg(&path),
    );
    // Only the submission is left: the temporary file was renamed into place.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    let sizes: HashMap<String, (usize, usize)> = fixture_images()
        .iter()
        .map(|p| {
            let (w, h) = image::image_dimensions(p).unwrap();
            let name = p.file_name().unwrap().to_str().unwrap().to_owned();
            (name, (h as usize, w as usize))
        })
        .collect();
    let text = read(&path);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("ImageId,EncodedPixels,ClassId"));
    // Decoded here from the format's definition, independently of drape's decoder.
    let mut covered: HashMap<String, Vec<u8>> = HashMap::new();
    let mut rows = 0;
    for line in lines {
        let fields: Vec<&str> = line.split(',').collect();
        assert_eq!(fields.len(), 3, "{line}");
        let (h, w) = sizes[fields[0]];
        let class: usize = fields[2].parse().unwrap();
        assert!(class < 46, "{line}");
        let pixels = covered
            .entry(fields[0].to_owned())
            .or_insert_with(|| vec![0; h * w]);
        let numbers: Vec<usize> = fields[1].split(' ').map(|n| n.parse().unwrap()).collect();
        assert!(
            !numbers.is_empty() && numbers.len().is_multiple_of(2),
            "{line}"
        );
        for pair in numbers.chunks(2) {
            let (start, len) = (pair[0], pair[1]);
            assert!(start >= 1 && len >= 1 && start - 1 + len <= h * w, "{line}");
            for p in &mut pixels[start - 1..start - 1 + len] {
                *p += 1;
            }
        }
        rows += 1;
    }
    assert!(rows > 0);
    let images: Vec<&String> = covered.keys().collect();
    assert_eq!(
        covered.len(),
        sizes.len(),
        "every image has a row: {images:?}"
    );
    for (image, pixels) in &covered {
        assert!(pixels.iter().all(|&c| c <= 1), "{image}: masks overlap");
    }
}
