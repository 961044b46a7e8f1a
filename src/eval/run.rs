//! The `eval` and `submit` commands: flags, the loop over images, and the reports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device, DeviceLocation};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::bench::percentile;
use crate::device::compute_dtype;
use crate::eval::metric::{CocoEvaluator, ImaterialistMetric, Scored};
use crate::eval::plot::{self, Point, Series};
use crate::eval::submit::{self, SubmissionWriter};
use crate::eval::{coco, imaterialist, locate_image, Dataset, GtImage};
use crate::model::FrameSettings;
use crate::pipeline::ladder;
use crate::postprocess::{Detections, Detector};
use crate::{image_io, MaskRcnn};

/// Detections scoring below this are left out of submissions and of the iMaterialist score,
/// which punishes every extra mask (COCO AP ranks all detections instead). The 2019 winner
/// tuned this threshold to 0.5.
pub const DEFAULT_MIN_SCORE: f32 = 0.5;
/// Mask caps `--sweep` tries at every input size, all masks first.
const SWEEP_MASK_CAPS: [usize; 4] = [100, 20, 10, 5];
/// The CPU computes only in f32 (GPUs in f16, compared against a CPU f32 reference run).
const F16_NOT_APPLICABLE: &str = "f16 vs f32: not applicable on the CPU, which computes in f32";
const MASK_AP_COLOUR: [u8; 3] = [31, 119, 180];
const IMATERIALIST_COLOUR: [u8; 3] = [255, 127, 14];

/// The model flags `eval` and `submit` share.
#[derive(clap::Args)]
pub struct ModelArgs {
    #[command(flatten)]
    model: crate::cli::ModelArgs,
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

/// One configuration's accumulated results.
struct Run {
    /// Index into the models being compared (the device's, then any CPU f32 reference).
    model: usize,
    settings: FrameSettings,
    coco: CocoEvaluator,
    imaterialist: ImaterialistMetric,
    detect_ms: Vec<f64>,
}

impl Run {
    fn observe(&mut self, truth: &GtImage, out: &Detections, min_score: f32) {
        self.detect_ms.push(out.timings.total);
        // Instances beyond the mask cap have no mask and so are not results at all.
        let detections: Vec<Scored> = out
            .instances
            .iter()
            .filter_map(|i| {
                Some(Scored {
                    class_id: i.class_id,
                    score: i.score as f64,
                    mask: i.mask.as_ref()?,
                })
            })
            .collect();
        self.coco.add_image(&truth.objects, &detections);
        // The iMaterialist score is the competition's, so it sees what a submission holds.
        let kept = submit::non_overlapping(&out.instances, min_score);
        let submitted: Vec<Scored> = kept
            .iter()
            .map(|k| Scored {
                class_id: k.class_id,
                score: k.score as f64,
                mask: &k.mask,
            })
            .collect();
        self.imaterialist.add_image(&truth.objects, &submitted);
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    pub median_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClassReport {
    pub class_id: usize,
    pub label: String,
    /// Ground-truth masks, crowd regions excluded.
    pub truths: usize,
    pub ap: Option<f64>,
    pub ap50: Option<f64>,
    pub ap75: Option<f64>,
    pub imaterialist: Option<f64>,
}

/// One configuration's results, as `--json` prints them.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// As `--device` names it: `cpu`, `cuda:N`, `metal`.
    pub device: String,
    /// The compute dtype, `f32` or `f16`.
    pub precision: &'static str,
    pub min_size: usize,
    pub max_size: usize,
    pub max_masks: usize,
    pub images: usize,
    pub mask_ap: Option<f64>,
    pub mask_ap50: Option<f64>,
    pub mask_ap75: Option<f64>,
    /// The iMaterialist 2019 score over `imaterialist_pairs` (image, class) pairs.
    pub imaterialist: Option<f64>,
    pub imaterialist_pairs: usize,
    pub detect_ms: Latency,
    pub classes: Vec<ClassReport>,
}

impl RunReport {
    fn new(run: &Run, models: &[MaskRcnn], dataset: &Dataset) -> Self {
        let model = &models[run.model];
        let coco = run.coco.summary();
        let imat = run.imaterialist.summary();
        let mut truths: BTreeMap<usize, usize> = BTreeMap::new();
        for o in dataset.images.iter().flat_map(|i| &i.objects) {
            if !o.iscrowd {
                *truths.entry(o.class_id).or_default() += 1;
            }
        }
        let aps: BTreeMap<usize, _> = coco.per_class.iter().map(|c| (c.class_id, c)).collect();
        let mut ids: Vec<usize> = truths
            .keys()
            .chain(imat.per_class.keys())
            .copied()
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let classes = ids
            .into_iter()
            .map(|class_id| ClassReport {
                class_id,
                label: model.label(class_id).to_owned(),
                truths: truths.get(&class_id).copied().unwrap_or(0),
                ap: aps.get(&class_id).map(|c| c.ap),
                ap50: aps.get(&class_id).map(|c| c.ap50),
                ap75: aps.get(&class_id).map(|c| c.ap75),
                imaterialist: imat.per_class.get(&class_id).copied(),
            })
            .collect();
        let mut ms = run.detect_ms.clone();
        ms.sort_by(f64::total_cmp);
        Self {
            device: device_name(model.device().location()),
            precision: compute_dtype(model.device().location()).as_str(),
            min_size: run.settings.min_size,
            max_size: run.settings.max_size,
            max_masks: run.settings.max_masks,
            images: run.detect_ms.len(),
            mask_ap: coco.ap,
            mask_ap50: coco.ap50,
            mask_ap75: coco.ap75,
            imaterialist: imat.score,
            imaterialist_pairs: imat.pairs,
            detect_ms: Latency {
                median_ms: percentile(&ms, 50.0),
                p99_ms: percentile(&ms, 99.0),
            },
            classes,
        }
    }
}

/// What `drape eval --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub runs: Vec<RunReport>,
    /// Why there is no f16/f32 comparison, when there is none.
    pub f16: Option<&'static str>,
}

fn device_name(location: DeviceLocation) -> String {
    match location {
        DeviceLocation::Cpu => "cpu".to_owned(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { .. } => "metal".to_owned(),
    }
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

/// The model's input sizes down the budget ladder `drape run` steps through, each with every
/// mask cap.
fn sweep_settings(model: &MaskRcnn) -> Vec<FrameSettings> {
    let cfg = model.config();
    let all = cfg.detections_per_img;
    let mut caps: Vec<usize> = SWEEP_MASK_CAPS.iter().map(|&c| c.min(all)).collect();
    caps.dedup();
    ladder((cfg.min_size, cfg.max_size))
        .into_iter()
        .flat_map(|(min_size, max_size)| {
            caps.iter().map(move |&max_masks| FrameSettings {
                min_size,
                max_size,
                max_masks,
            })
        })
        .collect()
}

/// `drape eval`.
pub fn run_eval(args: EvalArgs) -> anyhow::Result<()> {
    let mut models = vec![args.model.model.load()?];
    let device = models[0].device().clone();
    let num_classes = models[0].architecture().num_classes;
    let mut dataset = match (&args.annotations.annotations, &args.annotations.coco) {
        (Some(csv), _) => imaterialist::read_train_csv(csv, num_classes)?,
        (None, Some(json)) => {
            coco::read_instances(json, num_classes, args.label_offset.unwrap_or(0))?
        }
        (None, None) => bail!("give --annotations or --coco"),
    };
    if let Some(n) = args.limit {
        dataset.images.truncate(n);
    }
    if dataset.images.is_empty() {
        bail!("no annotated images to evaluate");
    }
    // Every file is found and its size checked before the first (slow) model run.
    let paths = dataset
        .images
        .iter()
        .map(|image| locate_image(&args.images, image))
        .collect::<Result<Vec<_>, _>>()?;

    let new_run = |model, settings| Run {
        model,
        settings,
        coco: CocoEvaluator::new(&dataset.categories),
        imaterialist: ImaterialistMetric::new(),
        detect_ms: Vec::with_capacity(paths.len()),
    };
    let mut runs: Vec<Run> = if args.sweep {
        sweep_settings(&models[0])
            .into_iter()
            .map(|s| new_run(0, s))
            .collect()
    } else {
        vec![new_run(0, models[0].default_settings())]
    };
    let reduced = compute_dtype(device.location()) != DType::F32;
    let f16 = match (args.sweep, reduced) {
        (false, _) => None,
        // A GPU only computes in f16: the f32 reference is the same model on the CPU.
        (true, true) => {
            models.push(args.model.model.load_on(&Device::Cpu)?);
            runs.push(new_run(1, models[1].default_settings()));
            None
        }
        (true, false) => Some(F16_NOT_APPLICABLE),
    };

    let bar = progress_bar(args.json, paths.len() * runs.len(), "evaluating");
    let mut detectors: Vec<Detector> = models.iter().map(|_| Detector::default()).collect();
    let mut out = Detections::default();
    for (i, (truth, path)) in dataset.images.iter().zip(&paths).enumerate() {
        let image = image_io::load_rgb(path)?;
        let size = (truth.height, truth.width);
        let mut detect = |model: usize, settings: FrameSettings, out: &mut Detections| {
            detectors[model]
                .run(&models[model], image.as_raw(), size, settings, out)
                .with_context(|| format!("running the model on {}", path.display()))
        };
        if i == 0 {
            // Untimed: each model's first run pays for growing its buffers.
            for (m, model) in models.iter().enumerate() {
                detect(m, model.default_settings(), &mut out)?;
            }
        }
        for run in &mut runs {
            detect(run.model, run.settings, &mut out)?;
            run.observe(truth, &out, args.model.min_score);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();

    let report = EvalReport {
        runs: runs
            .iter()
            .map(|r| RunReport::new(r, &models, &dataset))
            .collect(),
        f16,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else if args.sweep {
        print_sweep(&report);
    } else {
        print_single(&report.runs[0], args.model.min_score);
    }
    if let Some(path) = &args.plot {
        save_plot(&report.runs, path)?;
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

fn save_plot(runs: &[RunReport], path: &Path) -> anyhow::Result<()> {
    let series = |name: &str, colour, value: fn(&RunReport) -> Option<f64>| Series {
        name: name.to_owned(),
        colour,
        points: runs
            .iter()
            .filter_map(|r| {
                Some(Point {
                    x: r.detect_ms.median_ms,
                    y: value(r)?,
                    label: format!("{}/{} {}", r.min_size, r.max_masks, r.precision),
                })
            })
            .collect(),
    };
    let image = plot::draw(
        "accuracy vs latency (points: input min size / mask cap precision)",
        "median detect ms",
        "accuracy",
        &[
            series("mask AP", MASK_AP_COLOUR, |r| r.mask_ap),
            series("iMaterialist", IMATERIALIST_COLOUR, |r| r.imaterialist),
        ],
    );
    image_io::save_png(&image, path)?;
    Ok(())
}

/// `drape submit`.
pub fn run_submit(args: SubmitArgs) -> anyhow::Result<()> {
    let model = args.model.model.load()?;
    let categories = model.architecture().num_classes - 1;
    if categories != crate::labels::IMATERIALIST_2019.len() {
        tracing::warn!(
            categories,
            "the model does not have iMaterialist's 46 categories; ClassId is still label - 1"
        );
    }
    let mut paths = submit::list_images(&args.images)?;
    if let Some(n) = args.limit {
        paths.truncate(n);
    }
    if paths.is_empty() {
        bail!("{}: no PNG or JPEG images", args.images.display());
    }
    let mut writer = SubmissionWriter::create(&args.out)?;
    let bar = progress_bar(false, paths.len(), "submitting");
    let mut detector = Detector::default();
    let mut out = Detections::default();
    for path in &paths {
        let image = image_io::load_rgb(path)?;
        let size = (image.height() as usize, image.width() as usize);
        detector
            .run(
                &model,
                image.as_raw(),
                size,
                model.default_settings(),
                &mut out,
            )
            .with_context(|| format!("running the model on {}", path.display()))?;
        let kept = submit::non_overlapping(&out.instances, args.model.min_score);
        let image_id = path
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{}: file name is not UTF-8", path.display()))?;
        writer.image(image_id, &kept)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let rows = writer.finish()?;
    eprintln!(
        "{}: {rows} masks for {} images",
        args.out.display(),
        paths.len()
    );
    Ok(())
}
