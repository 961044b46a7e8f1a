//! The `drape` binary as a user runs it: from a directory other than the repository, with
//! the bundled model and frames found on their own, and errors that name what is wrong.

mod common;

use std::process::Command;

/// `drape`, run from an empty temporary directory (kept alive by the returned guard).
fn drape() -> (Command, tempfile::TempDir) {
    let cwd = tempfile::tempdir().unwrap();
    let mut c = common::drape_command();
    c.current_dir(cwd.path()).env_remove("DRAPE_HOME");
    (c, cwd)
}

fn image() -> String {
    common::fixtures()
        .join("images/portrait.png")
        .display()
        .to_string()
}

#[test]
fn detect_prints_json_with_the_documented_fields() {
    let weights = common::tiny_weights();
    let (mut cmd, _cwd) = drape();
    let (v, stderr) = common::run_json(
        cmd.args(["detect", "--json", "-", "--weights"])
            .arg(weights)
            .arg(image()),
    );
    assert_eq!(v["width"], 150);
    assert_eq!(v["height"], 200);
    // The same stage names as `drape run`'s lines and `drape bench`.
    let stages: Vec<&str> = drape::model::Timings::default()
        .stages()
        .iter()
        .map(|(name, _)| *name)
        .collect();
    for stage in &stages {
        assert!(v["timings_ms"][stage].is_number(), "timings_ms.{stage}");
    }
    assert_eq!(v["timings_ms"].as_object().unwrap().len(), stages.len());
    // The model ran at the file's 160-pixel short side, not at the image's size, and says so.
    assert_eq!(v["input_size"], serde_json::json!([160, 213]));
    assert!(
        stderr.contains("image 150x200, model input 160x213"),
        "{stderr}"
    );
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
    let (mut cmd, _cwd) = drape();
    // The overlay does not take the JSON's place on stdout.
    let (v, _) = common::run_json(cmd.args(["detect", "--overlay"]).arg(&png).arg(image()));
    assert!(!v["instances"].as_array().unwrap().is_empty());
    let overlay = image::open(&png).unwrap();
    assert_eq!((overlay.width(), overlay.height()), (150, 200));
    let original = image::open(image()).unwrap();
    assert_ne!(
        overlay.to_rgb8().as_raw(),
        original.to_rgb8().as_raw(),
        "nothing was drawn"
    );
}

#[test]
fn bad_inputs_fail_with_a_message_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.jpg");
    let mut jpeg = std::fs::read(image()).unwrap();
    jpeg.truncate(100);
    std::fs::write(&corrupt, jpeg).unwrap();
    let dir_path = dir.path().display().to_string();
    let overlay_in_nowhere = dir.path().join("no/such/dir/o.png").display().to_string();
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
        // A negative value is a bad value of the flag, not an unknown flag.
        (
            vec!["--score-thresh".into(), "-1".into(), image()],
            "--score-thresh -1 must lie in [0, 1]",
        ),
        (
            vec!["--min-size".into(), "0".into(), image()],
            "--min-size must be at least 1",
        ),
        (
            vec!["--max-size".into(), "-5".into(), image()],
            "'--max-size <MAX_SIZE>'",
        ),
        (vec!["--device".into(), "cuda".into(), image()], "CUDA"),
        (
            vec!["--weights".into(), dir_path.clone(), image()],
            "is a directory",
        ),
        (
            vec!["--overlay".into(), overlay_in_nowhere, image()],
            "writing the overlay: ",
        ),
    ];
    for (args, needle) in cases {
        let (mut cmd, _cwd) = drape();
        let out = cmd.arg("detect").args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            matches!(out.status.code(), Some(1 | 2)),
            "{args:?}: {stderr}"
        );
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(!stderr.contains("os error 19"), "{args:?}: {stderr}");
    }
}

#[test]
fn a_wrong_drape_home_says_where_it_looked() {
    let (mut cmd, _cwd) = drape();
    let stderr = common::run_err(
        cmd.env("DRAPE_HOME", "/no/such/drape")
            .args(["detect"])
            .arg(image()),
    );
    assert!(
        stderr.contains("weights/drape-tiny-r50.safetensors not found; looked in /no/such/drape"),
        "{stderr}"
    );
}

#[test]
fn inspect_and_detect_explain_a_bad_file_alike() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(common::tiny_weights()).unwrap();
    let image = image();
    let cases: [(&str, Vec<u8>, &str); 3] = [
        ("truncated", good[..100_000].to_vec(), "truncated"),
        ("empty", Vec::new(), "shorter than the 8-byte header length"),
        (
            "text",
            b"just some notes, not weights\n".to_vec(),
            "exceeds the file size",
        ),
    ];
    for (name, bytes, reason) in cases {
        let path = dir.path().join(format!("{name}.safetensors"));
        std::fs::write(&path, bytes).unwrap();
        for command in [vec!["inspect"], vec!["detect", &image, "--weights"]] {
            let (mut cmd, _cwd) = drape();
            let stderr = common::run_err(cmd.args(&command).arg(&path));
            assert!(stderr.contains(reason), "{command:?} {name}: {stderr}");
        }
    }
}

#[test]
fn a_closed_stdout_ends_detect_quietly() {
    let (read, write) = rustix::pipe::pipe().unwrap();
    // The reader is gone before drape writes a byte, as with `drape detect ... | head -c0`.
    drop(read);
    let (mut cmd, _cwd) = drape();
    let out = cmd
        .args(["detect"])
        .arg(image())
        .stdout(std::process::Stdio::from(write))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("error"), "{stderr}");
}

#[test]
fn logs_have_no_colour_codes_when_stderr_is_not_a_terminal() {
    let (mut cmd, _cwd) = drape();
    let out = cmd
        .args(["detect", "--log", "info"])
        .arg(image())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("INFO"), "{stderr}");
    assert!(!stderr.contains('\x1b'), "{stderr}");
}

#[test]
fn run_and_bench_work_from_any_directory_on_the_bundled_files() {
    let (mut cmd, cwd) = drape();
    let jsonl = cwd.path().join("run.jsonl");
    let out = cmd
        .args(["run", "--budget-ms", "2000", "--no-profile", "--jsonl"])
        .arg(&jsonl)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("tests/fixtures/frames"), "{stderr}");
    let lines = std::fs::read_to_string(&jsonl).unwrap();
    assert!(lines.lines().count() >= 1, "{stderr}");
    let (mut cmd, _cwd) = drape();
    let (v, _) = common::run_json(cmd.args(["bench", "--iters", "1", "--warmup", "1", "--json"]));
    assert_eq!(v["iters"], 1);
}
