//! The `drape` binary as a user runs it.

mod common;

use std::process::Command;

fn drape() -> Command {
    common::drape_command()
}

fn image() -> String {
    common::fixtures()
        .join("images/portrait.png")
        .display()
        .to_string()
}

#[test]
fn detect_prints_json_with_the_documented_fields() {
    let out = drape()
        .args([
            "detect",
            "--json",
            "-",
            "--weights",
            "tests/fixtures/tiny_r50/model.safetensors",
        ])
        .arg(image())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["width"], 150);
    assert_eq!(v["height"], 200);
    for stage in [
        "preprocess",
        "backbone",
        "rpn",
        "roi_heads",
        "masks",
        "total",
    ] {
        assert!(v["timings_ms"][stage].is_number(), "timings_ms.{stage}");
    }
    let instances = v["instances"].as_array().unwrap();
    assert!(!instances.is_empty());
    let mut last = f64::INFINITY;
    for i in instances {
        let class_id = i["class_id"].as_u64().unwrap();
        assert!((1..47).contains(&class_id));
        assert!(!i["label"].as_str().unwrap().is_empty());
        let score = i["score"].as_f64().unwrap();
        assert!(score > 0.05 && score <= last);
        last = score;
        assert_eq!(i["box"].as_array().unwrap().len(), 4);
        assert_eq!(i["mask"]["size"], serde_json::json!([200, 150]));
        common::decode_coco_rle(i["mask"]["counts"].as_str().unwrap(), 200, 150);
    }
}

#[test]
fn detect_uses_bundled_weights_and_writes_an_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("overlay.png");
    let json = dir.path().join("out.json");
    let out = drape()
        .args(["detect", "--overlay"])
        .arg(&png)
        .arg("--json")
        .arg(&json)
        .arg(image())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let overlay = image::open(&png).unwrap();
    assert_eq!((overlay.width(), overlay.height()), (150, 200));
    let original = image::open(image()).unwrap();
    assert_ne!(
        overlay.to_rgb8().as_raw(),
        original.to_rgb8().as_raw(),
        "nothing was drawn"
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert!(v["instances"].is_array());
}

#[test]
fn bad_inputs_fail_with_a_message_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.jpg");
    let mut jpeg = std::fs::read(image()).unwrap();
    jpeg.truncate(100);
    std::fs::write(&corrupt, jpeg).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--weights".into(), "no/such.safetensors".into(), image()],
            "no/such.safetensors",
        ),
        (vec![corrupt.display().to_string()], "corrupt.jpg"),
        (
            vec!["--score-thresh".into(), "1.5".into(), image()],
            "--score-thresh",
        ),
        (vec!["--device".into(), "cuda".into(), image()], "CUDA"),
    ];
    for (args, needle) in cases {
        let out = drape().arg("detect").args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
