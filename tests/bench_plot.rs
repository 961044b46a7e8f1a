//! `drape bench --plot`: the real binary on the bundled model writes a PNG of the size the
//! chart module draws, with content in both panels, and the JSON it prints carries what the
//! plot is drawn from (every run's latency, the CPU's SIMD flags).

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
