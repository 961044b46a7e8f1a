//! `drape eval` and `drape submit`: flags, progress bars and the printed tables; the loops are
//! [`drape::eval::Evaluation`] and [`drape::eval::write_submission`].

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};

use drape::eval::{Annotations, EvalOptions, EvalReport, Evaluation, RunReport, DEFAULT_MIN_SCORE};

/// The model flags `eval` and `submit` share.
#[derive(clap::Args)]
pub struct ModelArgs {
    #[command(flatten)]
    model: super::ModelArgs,
    /// Detections scoring below this are left out of the submission (and, in `eval`, of the
    /// iMaterialist score).
    #[arg(long, default_value_t = DEFAULT_MIN_SCORE, value_parser = parse_score)]
    min_score: f32,
}

/// A score threshold: a number in [0, 1].
fn parse_score(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a score in [0, 1]")),
    }
}

/// Exactly one ground-truth format.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
pub struct AnnotationArgs {
    /// iMaterialist (Fashion) 2019 train.csv: ImageId,EncodedPixels,Height,Width,ClassId.
    #[arg(long)]
    annotations: Option<PathBuf>,
    /// COCO instance JSON (polygons or RLE), e.g. Fashionpedia's.
    #[arg(long)]
    coco: Option<PathBuf>,
}

/// `drape eval`'s flags.
#[derive(clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Directory of the annotated images.
    #[arg(long)]
    images: PathBuf,
    #[command(flatten)]
    annotations: AnnotationArgs,
    /// COCO only: torchvision label = category_id + this (1 for Fashionpedia, whose ids start
    /// at 0).
    // `requires = "coco"` is not enforced for a member of a satisfied group; this is.
    #[arg(long, conflicts_with = "annotations")]
    label_offset: Option<usize>,
    /// Evaluate only the first N images.
    #[arg(long)]
    limit: Option<usize>,
    /// Print one JSON object instead of tables (no progress bar).
    #[arg(long)]
    json: bool,
    /// Run the images at every input size of the budget ladder and every mask cap.
    #[arg(long)]
    sweep: bool,
    /// Draw the sweep's accuracy against latency to this PNG.
    #[arg(long, requires = "sweep")]
    plot: Option<PathBuf>,
}

/// `drape submit`'s flags.
#[derive(clap::Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Directory of test images (PNG or JPEG); each file name is its ImageId.
    #[arg(long)]
    images: PathBuf,
    /// Where to write the CSV.
    #[arg(long)]
    out: PathBuf,
    /// Only the first N images (by file name).
    #[arg(long)]
    limit: Option<usize>,
}

fn progress_bar(hidden: bool, len: usize, message: &str) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    ProgressBar::new(len as u64)
        .with_style(
            ProgressStyle::with_template("{msg} {wide_bar} {pos}/{len} runs, eta {eta}")
                .expect("static template"),
        )
        .with_message(message.to_owned())
}

/// `drape eval`.
pub fn run_eval(args: EvalArgs) -> Result<()> {
    let model = args.model.model.load()?;
    let annotations = match (args.annotations.annotations, args.annotations.coco) {
        (Some(csv), _) => Annotations::Imaterialist(csv),
        (None, Some(path)) => Annotations::Coco {
            path,
            label_offset: args.label_offset.unwrap_or(0),
        },
        (None, None) => bail!("give --annotations or --coco"),
    };
    let opts = EvalOptions {
        images: args.images,
        annotations,
        limit: args.limit,
        sweep: args.sweep,
        min_score: args.model.min_score,
    };
    let mut evaluation = Evaluation::new(model, &opts)?;
    if evaluation.wants_reference() {
        evaluation = evaluation.with_reference(args.model.model.load_on(&Device::Cpu)?);
    }
    let bar = progress_bar(args.json, evaluation.model_runs(), "evaluating");
    let report = evaluation.run(|| bar.inc(1))?;
    bar.finish_and_clear();

    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else if args.sweep {
        print_sweep(&report);
    } else {
        print_single(&report.runs[0], args.model.min_score);
    }
    if let Some(path) = &args.plot {
        drape::image_io::save_png(&drape::eval::sweep_plot(&report.runs), path)?;
    }
    Ok(())
}

fn fmt(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |v| format!("{v:.3}"))
}

fn print_single(r: &RunReport, min_score: f32) {
    println!(
        "{} images on {} ({}) at input {}/{}, masks for up to {} detections",
        r.images, r.device, r.precision, r.min_size, r.max_size, r.max_masks
    );
    println!(
        "mask AP {}  AP50 {}  AP75 {}  (pycocotools COCOeval segm, maxDets 100, area all)",
        fmt(r.mask_ap),
        fmt(r.mask_ap50),
        fmt(r.mask_ap75)
    );
    println!(
        "iMaterialist 2019 score {} over {} image-class pairs (masks scoring >= {min_score}, \
         made non-overlapping)",
        fmt(r.imaterialist),
        r.imaterialist_pairs
    );
    println!(
        "detect: median {:.1} ms, p99 {:.1} ms per image",
        r.detect_ms.median_ms, r.detect_ms.p99_ms
    );
    println!(
        "{:>4} {:<32} {:>6} {:>6} {:>6} {:>6} {:>6}",
        "id", "class", "masks", "AP", "AP50", "AP75", "iMat"
    );
    for c in &r.classes {
        println!(
            "{:>4} {:<32} {:>6} {:>6} {:>6} {:>6} {:>6}",
            c.class_id,
            c.label,
            c.truths,
            fmt(c.ap),
            fmt(c.ap50),
            fmt(c.ap75),
            fmt(c.imaterialist)
        );
    }
}

fn print_sweep(report: &EvalReport) {
    println!(
        "{:<10} {:<11} {:>5} {:>7} {:>6} {:>6} {:>6} {:>10} {:>8}",
        "device", "input", "masks", "mask AP", "AP50", "AP75", "iMat", "median ms", "p99 ms"
    );
    for r in &report.runs {
        println!(
            "{:<10} {:<11} {:>5} {:>7} {:>6} {:>6} {:>6} {:>10.1} {:>8.1}",
            format!("{} {}", r.device, r.precision),
            format!("{}/{}", r.min_size, r.max_size),
            r.max_masks,
            fmt(r.mask_ap),
            fmt(r.mask_ap50),
            fmt(r.mask_ap75),
            fmt(r.imaterialist),
            r.detect_ms.median_ms,
            r.detect_ms.p99_ms
        );
    }
    if let Some(note) = report.f16 {
        println!("{note}");
    }
}

/// `drape submit`.
pub fn run_submit(args: SubmitArgs) -> Result<()> {
    let model = args.model.model.load()?;
    let mut paths = drape::eval::submit::list_images(&args.images)?;
    if let Some(n) = args.limit {
        paths.truncate(n);
    }
    if paths.is_empty() {
        bail!("{}: no PNG or JPEG images", args.images.display());
    }
    let bar = progress_bar(false, paths.len(), "submitting");
    let rows =
        drape::eval::write_submission(&model, &paths, &args.out, args.model.min_score, || {
            bar.inc(1)
        })?;
    bar.finish_and_clear();
    eprintln!(
        "{}: {rows} masks for {} images",
        args.out.display(),
        paths.len()
    );
    Ok(())
}
