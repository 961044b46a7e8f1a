//! `drape bench --plot`: the real binary on the bundled model writes a PNG of the size the
//! chart module draws, with content in both panels, and the JSON it prints carries what the
//! plot is drawn from (every run's latency, the CPU's SIMD flags); `--beside` adds another
//! engine's bar.

mod common;

#[test]
fn bench_plot_writes_a_chart_with_both_panels() {
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("bench.png");
    let (v, _) = common::run_json(
        common::drape_command()
            .args(["bench", "--iters", "3", "--warmup", "1", "--json", "--plot"])
            .arg(&plot)
            .arg("--image")
            .arg(common::fixtures().join("images/landscape.png")),
    );
    assert_eq!(v["total_ms"].as_array().unwrap().len(), 3);
    assert!(!v["cpu"]["model"].as_str().unwrap().is_empty());

    let png = image::open(&plot).unwrap().to_rgb8();
    assert_eq!((png.width(), png.height()), (960, 600));
    let background = *png.get_pixel(0, 0);
    // Ink in the stage bar's half and in the histogram's half, not only titles.
    let inked = |x0: u32, x1: u32| {
        png.enumerate_pixels()
            .filter(|(x, y, p)| (x0..x1).contains(x) && *y > 80 && **p != background)
            .count()
    };
    assert!(inked(0, 480) > 5000, "stage panel {}", inked(0, 480));
    assert!(inked(480, 960) > 5000, "latency panel {}", inked(480, 960));
}

#[test]
fn a_reference_bar_is_drawn_beside_and_bad_reference_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let bench = |plot: &std::path::Path, beside: &std::path::Path| {
        let mut cmd = common::drape_command();
        cmd.args(["bench", "--iters", "1", "--warmup", "1", "--json", "--plot"])
            .arg(plot)
            .arg("--beside")
            .arg(beside)
            .arg("--image")
            .arg(common::fixtures().join("images/landscape.png"));
        cmd
    };
    let plot = dir.path().join("bench.png");
    let reference = dir.path().join("torchvision.json");
    std::fs::write(
        &reference,
        r#"{"name": "torchvision", "stages": {"backbone": 5000.0, "fpn": 20.0, "total": 5020.0}}"#,
    )
    .unwrap();
    common::run_json(&mut bench(&plot, &reference));
    let png = image::open(&plot).unwrap().to_rgb8();
    // The second bar's column (x 165..235): drape's bar alone leaves it empty but for grid
    // lines; the reference, far slower than the tiny model, sets the scale (rounded up to a
    // whole tick, at most twice the bar) and so fills at least a third of the panel's 450 rows.
    let background = *png.get_pixel(0, 0);
    let inked = (100..540)
        .filter(|&y| *png.get_pixel(200, y) != background)
        .count();
    assert!(inked > 150, "second bar: {inked} inked rows");

    // A missing file and one of the wrong shape are refused before the runs, naming the file.
    let missing = dir.path().join("missing.json");
    let err = common::run_err(&mut bench(&plot, &missing));
    assert!(err.contains("missing.json"), "{err}");
    let wrong = dir.path().join("wrong.json");
    std::fs::write(&wrong, r#"{"stages": [1, 2]}"#).unwrap();
    let err = common::run_err(&mut bench(&plot, &wrong));
    assert!(
        err.contains("wrong.json") && err.contains("stages"),
        "{err}"
    );
    // --beside means nothing without --plot: a usage error.
    let out = common::drape_command()
        .args(["bench", "--beside"])
        .arg(&reference)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--plot"), "{err}");
}
