//! The `drape` command line: flags are parsed and validated here, then handed to the library.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use drape::alloc::CountingAlloc;
use drape::{image_io, output, overlay, MaskRcnn};

// candle allocates a fresh buffer per tensor op; glibc malloc returns large ones to the kernel
// and faults them back in every time, mimalloc keeps them (5x on large elementwise ops here).
// Counted, so `drape bench` can report the model's allocations per frame.
#[global_allocator]
static GLOBAL: CountingAlloc<mimalloc::MiMalloc> = CountingAlloc(mimalloc::MiMalloc);

/// The model shipped in the repository: a reduced-width ResNet-50-FPN layout with random
/// (calibrated) weights, for trying drape without a trained garment model.
const DEFAULT_WEIGHTS: &str = "weights/drape-tiny-r50.safetensors";

#[derive(Parser)]
#[command(
    name = "drape",
    version,
    about = "Mask R-CNN garment segmentation, torchvision-compatible, on candle"
)]
struct Cli {
    /// Log filter, e.g. `info`, `drape=debug` (RUST_LOG wins when set).
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Segment garments in one PNG or JPEG image.
    Detect(DetectArgs),
    /// Time every stage over repeated runs on one image (median, p99, allocations, RSS).
    Bench(BenchArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
    Metal,
}

/// Settings shared by every command that loads a model.
#[derive(clap::Args)]
struct ModelArgs {
    /// Safetensors weights with torchvision key names.
    #[arg(long, default_value = DEFAULT_WEIGHTS)]
    weights: PathBuf,
    /// Shorter side the image is resized to (default: the file's metadata, else 800).
    #[arg(long)]
    min_size: Option<usize>,
    /// Cap on the longer side (default: the file's metadata, else 1333).
    #[arg(long)]
    max_size: Option<usize>,
    /// Keep detections scoring above this (torchvision's default 0.05).
    #[arg(long)]
    score_thresh: Option<f32>,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Worker threads for the CPU kernels (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

impl ModelArgs {
    /// Validates the flags, sizes the thread pool and loads the model.
    fn load(&self) -> Result<MaskRcnn> {
        set_threads(self.threads)?;
        let device = device(self.device)?;
        if let Some(t) = self.score_thresh {
            if !(0.0..=1.0).contains(&t) {
                bail!("--score-thresh {t} must lie in [0, 1]");
            }
        }
        MaskRcnn::load(
            &self.weights,
            |cfg| {
                if let Some(v) = self.min_size {
                    cfg.min_size = v;
                }
                if let Some(v) = self.max_size {
                    cfg.max_size = v;
                }
                if let Some(v) = self.score_thresh {
                    cfg.box_score_thresh = v;
                }
            },
            &device,
        )
        .with_context(|| format!("loading weights {}", self.weights.display()))
    }
}

#[derive(clap::Args)]
struct DetectArgs {
    /// Image to segment (PNG or JPEG).
    image: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// Write the result as JSON to this file, or `-` for stdout (the default when no
    /// --overlay is given).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write a PNG with masks, boxes and labels drawn over the image.
    #[arg(long)]
    overlay: Option<PathBuf>,
}

#[derive(clap::Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Image to run on (PNG or JPEG).
    #[arg(long, default_value = "tests/fixtures/images/landscape.png")]
    image: PathBuf,
    /// Timed runs.
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Untimed runs first (the first one also gives the cold-start time).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Print one JSON object instead of a table (no progress bar).
    #[arg(long)]
    json: bool,
}

fn device(arg: DeviceArg) -> Result<Device> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda => bail!("this drape was built without CUDA support"),
        DeviceArg::Metal => bail!("this drape was built without Metal support"),
    }
}

fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        // candle sizes its CPU kernels from this variable; gemm and our kernels use rayon's pool.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("configuring the thread pool")?;
    }
    Ok(())
}

fn detect(args: DetectArgs) -> Result<()> {
    let model = args.model.load()?;
    let image = image_io::load_rgb(&args.image)?;
    let size = (image.height() as usize, image.width() as usize);
    let result = model
        .detect(image.as_raw(), size)
        .with_context(|| format!("running the model on {}", args.image.display()))?;
    eprintln!(
        "{}: {} instances in {:.0} ms ({}x{} input)",
        args.image.display(),
        result.instances.len(),
        result.timings.total,
        size.1,
        size.0
    );

    let json_target = match (&args.json, &args.overlay) {
        (Some(p), _) => Some(p.as_path()),
        (None, None) => Some(Path::new("-")),
        (None, Some(_)) => None,
    };
    if let Some(target) = json_target {
        let text = serde_json::to_string(&output::to_json(&model, &result))?;
        if target == Path::new("-") {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{text}")?;
        } else {
            std::fs::write(target, text + "\n")
                .with_context(|| format!("writing {}", target.display()))?;
        }
    }
    if let Some(path) = &args.overlay {
        let mut canvas = image;
        overlay::draw(&mut canvas, &result.instances, |c| model.label(c));
        image_io::save_png(&canvas, path)?;
    }
    Ok(())
}

fn bench(args: BenchArgs, process_start: Instant) -> Result<()> {
    if args.iters == 0 {
        bail!("--iters must be at least 1");
    }
    let load_start = Instant::now();
    let model = args.model.load()?;
    let load_ms = load_start.elapsed().as_secs_f64() * 1e3;
    let image = image_io::load_rgb(&args.image)?;
    let size = (image.height() as usize, image.width() as usize);
    let warmup = args.warmup.max(1);
    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new((warmup + args.iters) as u64).with_style(
            ProgressStyle::with_template("{msg} {wide_bar} {pos}/{len} runs, eta {eta}")
                .expect("static template"),
        )
    };
    bar.set_message(format!("bench {}", args.model.weights.display()));
    let report = drape::bench::run(
        &model,
        image.as_raw(),
        size,
        warmup,
        args.iters,
        load_ms,
        process_start,
        || bar.inc(1),
    )?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let a = model.architecture();
    println!(
        "{} ({} classes, FPN {}), input {}x{} from {}x{}, {} threads, {} runs, {} instances",
        a.backbone,
        a.num_classes,
        a.fpn_channels,
        report.input_size[0],
        report.input_size[1],
        size.1,
        size.0,
        report.threads,
        report.iters,
        report.instances
    );
    println!("{:<12} {:>10} {:>10}", "stage", "median ms", "p99 ms");
    for (name, _) in drape::model::Timings::default().stages() {
        let s = report.stages[name];
        println!("{name:<12} {:>10.1} {:>10.1}", s.median_ms, s.p99_ms);
    }
    println!(
        "backbone {:.1} GFLOP/s, {:.0} model allocations/frame, peak RSS {}, load {:.0} ms, \
         cold start {:.0} ms",
        report.backbone_gflops,
        report.model_allocs_per_frame,
        report
            .peak_rss_mb
            .map_or("n/a".into(), |m| format!("{m:.0} MiB")),
        report.load_ms,
        report.cold_start_ms
    );
    Ok(())
}

fn main() -> ExitCode {
    let process_start = Instant::now();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Detect(args) => detect(args),
        Command::Bench(args) => bench(args, process_start),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
