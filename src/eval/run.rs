//! What the `eval` and `submit` commands run: the loop over images and the reports. The
//! commands' flags, progress bars and tables are the binary's; progress is reported here by
//! calling back once per model run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, DeviceLocation};
use serde::Serialize;

use crate::bench::percentile;
use crate::device::compute_dtype;
use crate::eval::metric::{CocoEvaluator, ImaterialistMetric, Scored};
use crate::eval::plot::{self, Point, Series};
use crate::eval::submit::{self, SubmissionWriter};
use crate::eval::{coco, imaterialist, locate_image, Dataset, EvalError, GtImage};
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

/// Where the ground truth comes from.
#[derive(Debug, Clone)]
pub enum Annotations {
    /// iMaterialist (Fashion) 2019 train.csv: ImageId,EncodedPixels,Height,Width,ClassId.
    Imaterialist(PathBuf),
    /// COCO instance JSON (polygons or RLE); torchvision label = category_id + `label_offset`.
    Coco { path: PathBuf, label_offset: usize },
}

/// What `drape eval` evaluates and how.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Directory of the annotated images.
    pub images: PathBuf,
    pub annotations: Annotations,
    /// Only the first N annotated images.
    pub limit: Option<usize>,
    /// Every input size of the budget ladder with every mask cap, instead of the model's own
    /// settings.
    pub sweep: bool,
    /// Detections below this score are left out of the iMaterialist score.
    pub min_score: f32,
}

/// An evaluation read and checked, ready to run: the dataset, every image file found with its
/// size checked, and the configurations to run it in.
pub struct Evaluation {
    models: Vec<MaskRcnn>,
    dataset: Dataset,
    paths: Vec<PathBuf>,
    runs: Vec<Run>,
    f16: Option<&'static str>,
    /// A sweep on a reduced-precision device, not yet given its f32 reference.
    wants_reference: bool,
    min_score: f32,
}

impl Evaluation {
    /// Reads the annotations and finds every image before the first (slow) model run.
    pub fn new(model: MaskRcnn, opts: &EvalOptions) -> Result<Self, EvalError> {
        let num_classes = model.architecture().num_classes;
        let mut dataset = match &opts.annotations {
            Annotations::Imaterialist(csv) => imaterialist::read_train_csv(csv, num_classes)?,
            Annotations::Coco { path, label_offset } => {
                coco::read_instances(path, num_classes, *label_offset)?
            }
        };
        if let Some(n) = opts.limit {
            dataset.images.truncate(n);
        }
        if dataset.images.is_empty() {
            return Err(EvalError::NoImages);
        }
        let paths = dataset
            .images
            .iter()
            .map(|image| locate_image(&opts.images, image))
            .collect::<Result<Vec<_>, _>>()?;
        let settings = if opts.sweep {
            sweep_settings(&model)
        } else {
            vec![model.default_settings()]
        };
        let reduced = compute_dtype(model.device().location()) != DType::F32;
        let mut evaluation = Self {
            models: vec![model],
            runs: Vec::new(),
            f16: (opts.sweep && !reduced).then_some(F16_NOT_APPLICABLE),
            wants_reference: opts.sweep && reduced,
            min_score: opts.min_score,
            dataset,
            paths,
        };
        evaluation.runs = settings
            .into_iter()
            .map(|s| evaluation.new_run(0, s))
            .collect();
        Ok(evaluation)
    }

    /// Whether a sweep on a reduced-precision device wants an f32 reference run
    /// ([`Self::with_reference`]): a GPU only computes in f16, so the f32 reference is the same
    /// model on the CPU.
    pub fn wants_reference(&self) -> bool {
        self.wants_reference
    }

    /// Adds `reference`'s run at its default settings beside the others.
    pub fn with_reference(mut self, reference: MaskRcnn) -> Self {
        let settings = reference.default_settings();
        self.wants_reference = false;
        self.models.push(reference);
        let run = self.new_run(self.models.len() - 1, settings);
        self.runs.push(run);
        self
    }

    fn new_run(&self, model: usize, settings: FrameSettings) -> Run {
        Run {
            model,
            settings,
            coco: CocoEvaluator::new(&self.dataset.categories),
            imaterialist: ImaterialistMetric::new(),
            detect_ms: Vec::with_capacity(self.paths.len()),
        }
    }

    /// Timed model runs [`Self::run`] makes, each reported to its `progress` callback.
    pub fn model_runs(&self) -> usize {
        self.paths.len() * self.runs.len()
    }

    /// Runs every image in every configuration; `progress` is called after each model run.
    pub fn run(mut self, mut progress: impl FnMut()) -> Result<EvalReport, EvalError> {
        let mut detectors: Vec<Detector> =
            self.models.iter().map(|_| Detector::default()).collect();
        let mut out = Detections::default();
        for (i, (truth, path)) in self.dataset.images.iter().zip(&self.paths).enumerate() {
            let image = image_io::load_rgb(path)?;
            let size = (truth.height, truth.width);
            let models = &self.models;
            let mut detect = |model: usize, settings: FrameSettings, out: &mut Detections| {
                detectors[model]
                    .run(&models[model], image.as_raw(), size, settings, out)
                    .map_err(|source| EvalError::Detect {
                        path: path.clone(),
                        source: Box::new(source),
                    })
            };
            if i == 0 {
                // Untimed: each model's first run pays for growing its buffers.
                for (m, model) in models.iter().enumerate() {
                    detect(m, model.default_settings(), &mut out)?;
                }
            }
            for run in &mut self.runs {
                detect(run.model, run.settings, &mut out)?;
                run.observe(truth, &out, self.min_score);
                progress();
            }
        }
        Ok(EvalReport {
            runs: self
                .runs
                .iter()
                .map(|r| RunReport::new(r, &self.models, &self.dataset))
                .collect(),
            f16: self.f16,
        })
    }
}

/// The sweep's accuracy against latency, one series per metric.
pub fn sweep_plot(runs: &[RunReport]) -> image::RgbImage {
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
    plot::draw(
        "accuracy vs latency (points: input min size / mask cap precision)",
        "median detect ms",
        "accuracy",
        &[
            series("mask AP", MASK_AP_COLOUR, |r| r.mask_ap),
            series("iMaterialist", IMATERIALIST_COLOUR, |r| r.imaterialist),
        ],
    )
}

/// Writes a Kaggle iMaterialist submission of `images` (each file name is its ImageId) to
/// `out`, masks made non-overlapping and those below `min_score` left out; `progress` is called
/// after each image. Returns the number of rows (masks) written.
pub fn write_submission(
    model: &MaskRcnn,
    images: &[PathBuf],
    out: &Path,
    min_score: f32,
    mut progress: impl FnMut(),
) -> Result<usize, EvalError> {
    let categories = model.architecture().num_classes - 1;
    if categories != crate::labels::IMATERIALIST_2019.len() {
        tracing::warn!(
            categories,
            "the model does not have iMaterialist's 46 categories; ClassId is still label - 1"
        );
    }
    let mut writer = SubmissionWriter::create(out)?;
    let mut detector = Detector::default();
    let mut detections = Detections::default();
    for path in images {
        let image = image_io::load_rgb(path)?;
        let size = (image.height() as usize, image.width() as usize);
        detector
            .run(
                model,
                image.as_raw(),
                size,
                model.default_settings(),
                &mut detections,
            )
            .map_err(|source| EvalError::Detect {
                path: path.clone(),
                source: Box::new(source),
            })?;
        let kept = submit::non_overlapping(&detections.instances, min_score);
        let image_id = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| EvalError::FileName { path: path.clone() })?;
        writer.image(image_id, &kept)?;
        progress();
    }
    writer.finish()
}
