//! The `drape` command line: flags are parsed and validated here, then handed to the library.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use drape::alloc::CountingAlloc;
use drape::calibrate::{Profile, ProfileTransforms, RunSetup, Seed};
use drape::capture::{Crop, PixelFormat, Rotation, SourceSpec, Transforms};
use drape::clock::SystemClock;
use drape::health::RunStatus;
use drape::pipeline::{self, BudgetController, PipelineOptions};
use drape::stream::http::{HttpOptions, HttpServer};
use drape::stream::jsonl::{JsonLines, JsonlFile, RotatePolicy, SinkHealth};
use drape::stream::mqtt::{MqttConfig, MqttSink, MqttStats};
use drape::stream::unix::{UnixOptions, UnixServer};
use drape::stream::{Hub, HubSink, Sink};
use drape::track::TrackerConfig;
use drape::{image_io, output, overlay};

mod cli;

use cli::{choice, ModelArgs};

/// Where `--http-token` is read from when the flag and the config file do not give it.
const HTTP_TOKEN_ENV: &str = "DRAPE_HTTP_TOKEN";

// candle allocates a fresh buffer per tensor op; glibc malloc returns large ones to the kernel
// and faults them back in every time, mimalloc keeps them (5x on large elementwise ops here).
// Counted, so `drape bench` can report the model's allocations per frame.
#[global_allocator]
static GLOBAL: CountingAlloc<mimalloc::MiMalloc> = CountingAlloc(mimalloc::MiMalloc);

#[derive(Parser)]
#[command(
    name = "drape",
    version,
    about = "Mask R-CNN garment segmentation, torchvision-compatible, on candle",
    // A flag given twice takes its last value, so the command line overrides --config.
    args_override_self = true
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
    /// Convert a PyTorch checkpoint (.pth/.pt) to the safetensors file drape loads.
    Convert(cli::convert::ConvertArgs),
    /// Describe a weights file and check that drape can run it.
    Inspect(InspectArgs),
    /// Accuracy on annotated images: iMaterialist 2019 score and COCO mask AP, per class;
    /// --sweep prices each input size and mask cap in accuracy and latency.
    Eval(cli::eval::EvalArgs),
    /// Write a Kaggle iMaterialist submission CSV (non-overlapping masks).
    Submit(cli::eval::SubmitArgs),
    /// Stream a camera or a recording through the model under a latency budget (JSON Lines).
    Run(RunArgs),
    /// The whole pipeline on the bundled frames and model, with the live preview page.
    Demo(DemoArgs),
    /// Measure this device's costs and write the profile `drape run` loads.
    Calibrate(CalibrateArgs),
    /// List V4L2 cameras and the formats they offer.
    Cameras {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Where frames come from and how the installation turns them.
#[derive(clap::Args)]
struct SourceArgs {
    /// A camera (/dev/videoN), a directory of PNG/JPEG images, or a .y4m recording
    /// [default: the bundled frames, tests/fixtures/frames].
    #[arg(long)]
    source: Option<String>,
    /// Frame rate to ask the camera for / to replay at (default: the recording's, else 30).
    #[arg(long)]
    fps: Option<f64>,
    /// Replay: start over after the last frame.
    #[arg(long = "loop")]
    looping: bool,
    /// Camera: preferred frame width in pixels (the driver may pick the nearest it has).
    #[arg(long)]
    width: Option<u32>,
    /// Camera: preferred frame height in pixels (the driver may pick the nearest it has).
    #[arg(long)]
    height: Option<u32>,
    /// Camera: preferred pixel format, yuyv or mjpeg (default: whichever the camera offers
    /// at the chosen size, YUYV first).
    #[arg(long)]
    format: Option<PixelFormat>,
    /// Rotate frames clockwise by 0, 90, 180 or 270 degrees (portrait mirrors).
    #[arg(long, default_value = "0")]
    rotate: Rotation,
    /// Mirror frames horizontally.
    #[arg(long)]
    flip: bool,
    /// Crop to a region of interest, `x,y,w,h` in camera pixels (applied before rotation).
    #[arg(long)]
    crop: Option<Crop>,
}

impl SourceArgs {
    fn spec(&self) -> Result<SourceSpec> {
        let source = match &self.source {
            Some(source) => source.clone(),
            None => drape::assets::find(drape::assets::DEMO_FRAMES)?
                .display()
                .to_string(),
        };
        Ok(SourceSpec {
            source,
            fps: self.fps,
            looping: self.looping,
            width: self.width,
            height: self.height,
            format: self.format,
            transforms: Transforms {
                rotate: self.rotate,
                flip_horizontal: self.flip,
                crop: self.crop,
            },
            stop: None,
        })
    }

    fn transforms(&self) -> ProfileTransforms {
        ProfileTransforms {
            rotate: match self.rotate {
                Rotation::R0 => 0,
                Rotation::R90 => 90,
                Rotation::R180 => 180,
                Rotation::R270 => 270,
            },
            flip: self.flip,
            crop: self
                .crop
                .map(|c| format!("{},{},{},{}", c.x, c.y, c.w, c.h)),
        }
    }
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    source: SourceArgs,
    /// End-to-end latency budget per frame, capture to emit.
    #[arg(long)]
    budget_ms: f64,
    /// Write one JSON line per processed frame here (`-`: stdout).
    #[arg(long, default_value = "-")]
    jsonl: PathBuf,
    /// Also serve the live preview, MJPEG, SSE and metrics on this address.
    #[arg(long)]
    http: Option<String>,
    #[command(flatten)]
    outputs: OutputArgs,
}

/// Options every streaming command shares.
#[derive(clap::Args)]
struct OutputArgs {
    /// TOML file of settings for this command: keys are long flag names without the dashes
    /// (`budget-ms = 150`, `flip = true`, `http-allowed-host = ["a", "b"]`); flags on the
    /// command line override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Also stream JSON lines to clients of this Unix socket.
    #[arg(long)]
    unix: Option<PathBuf>,
    /// Permission bits of the --unix socket, in octal.
    #[arg(long, default_value = "660", value_parser = parse_mode)]
    unix_mode: u32,
    /// Clients of the --unix socket served at once; more are closed on connect.
    #[arg(long, default_value_t = 8)]
    unix_max_clients: usize,
    /// Streaming HTTP clients served at once; more get 503.
    #[arg(long, default_value_t = 8)]
    max_clients: usize,
    /// HTTP connections of any kind served at once; more get 503 and are closed.
    #[arg(long, default_value_t = 32)]
    http_max_connections: usize,
    /// Bearer token every HTTP route but /healthz requires; mandatory when --http is not a
    /// loopback address. Prefer `http-token` in the --config file or DRAPE_HTTP_TOKEN: a
    /// command line is visible to every user of the machine.
    #[arg(long)]
    http_token: Option<String>,
    /// A host name the HTTP server answers to on a non-loopback address, besides IP addresses
    /// and localhost (repeatable), e.g. mirror-12.local.
    #[arg(long)]
    http_allowed_host: Vec<String>,
    /// Stop after this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Rotate the --jsonl file once it would grow past this many bytes (0: never rotate).
    #[arg(long, default_value_t = 64 << 20)]
    jsonl_max_bytes: u64,
    /// Rotated --jsonl files kept (`out.jsonl.1` is the newest).
    #[arg(long, default_value_t = 4)]
    jsonl_keep: usize,
    /// Calibration profile to seed the cost model (default: calibration/<device>.toml if present).
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Ignore any calibration profile and learn costs online.
    #[arg(long, conflicts_with = "profile")]
    no_profile: bool,
    /// Mask encoding in the JSON lines.
    #[arg(long, value_enum, default_value = "coco")]
    rle: choice::Rle,
    #[command(flatten)]
    mqtt: MqttArgs,
    #[command(flatten)]
    track: TrackArgs,
}

/// Publishing to a store's MQTT broker (credentials: DRAPE_MQTT_USERNAME/DRAPE_MQTT_PASSWORD).
#[derive(clap::Args)]
struct MqttArgs {
    /// Publish frames, track events and a retained status under TOPIC/ on this broker:
    /// mqtt://HOST[:PORT]/TOPIC or mqtts://HOST[:PORT]/TOPIC.
    #[arg(long, value_name = "URL")]
    mqtt: Option<String>,
    /// PEM CA certificate that signed an mqtts:// broker's certificate.
    #[arg(long, value_name = "FILE", requires = "mqtt")]
    mqtt_ca: Option<PathBuf>,
    /// Masks in the frame records sent to the broker.
    #[arg(long, value_enum, default_value = "none", requires = "mqtt")]
    mqtt_masks: choice::MqttMasks,
    /// MQTT client id, unique per mirror (default: drape-HOSTNAME).
    #[arg(long, requires = "mqtt")]
    mqtt_client_id: Option<String>,
}

impl MqttArgs {
    fn config(&self) -> Result<Option<MqttConfig>> {
        let Some(url) = &self.mqtt else {
            return Ok(None);
        };
        let client_id = match &self.mqtt_client_id {
            Some(id) => id.clone(),
            None => format!("drape-{}", hostname()),
        };
        let mut config = MqttConfig::from_url(url, &client_id)?.credentials_from_env()?;
        config.ca = self.mqtt_ca.clone();
        config.masks = self.mqtt_masks.into();
        config.validate()?;
        Ok(Some(config))
    }
}

fn hostname() -> String {
    let uname = rustix::system::uname();
    match uname.nodename().to_str() {
        Ok(h) if !h.is_empty() => h.to_string(),
        _ => "unknown".to_string(),
    }
}

/// How garments are tracked across frames.
#[derive(clap::Args)]
struct TrackArgs {
    /// A confirmed track unseen for this long (capture time) ends.
    #[arg(long, value_name = "MS", default_value_t = drape::track::MAX_AGE.as_millis() as u64)]
    track_expiry_ms: u64,
    /// Consecutive frames a new track must be seen in before it starts.
    #[arg(long, value_name = "N", default_value_t = drape::track::CONFIRM_HITS)]
    track_confirm: u32,
    /// Least mask (or box) IoU for a detection to continue a track.
    #[arg(long, value_name = "IOU", default_value_t = drape::track::MIN_IOU)]
    track_iou: f32,
}

impl TrackArgs {
    fn config(&self) -> Result<TrackerConfig> {
        let config = TrackerConfig {
            min_iou: self.track_iou,
            confirm_hits: self.track_confirm,
            max_age: Duration::from_millis(self.track_expiry_ms),
            ..TrackerConfig::default()
        };
        config.validate()?;
        Ok(config)
    }
}

#[derive(clap::Args)]
struct DemoArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    source: SourceArgs,
    /// Address of the preview page (loopback by default; 0.0.0.0:8080 to show it on the LAN).
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: String,
    /// End-to-end latency budget per frame.
    #[arg(long, default_value_t = 1000.0)]
    budget_ms: f64,
    /// Also write JSON lines here (`-`: stdout).
    #[arg(long)]
    jsonl: Option<PathBuf>,
    #[command(flatten)]
    outputs: OutputArgs,
}

#[derive(clap::Args)]
struct CalibrateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    source: SourceArgs,
    /// The latency budget to choose settings for.
    #[arg(long)]
    budget_ms: f64,
    /// Runs per input size (each runs once without and once with masks).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Where to write the profile (default: calibration/<device>.toml).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::Args)]
struct DetectArgs {
    /// Image to segment (PNG or JPEG).
    image: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// Write the result as JSON to this file instead of stdout (`-`: stdout, the default).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write a PNG with masks, boxes and labels drawn over the image.
    #[arg(long)]
    overlay: Option<PathBuf>,
    /// Mask encoding in the JSON.
    #[arg(long, value_enum, default_value = "coco")]
    rle: choice::Rle,
}

#[derive(clap::Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Image to run on, PNG or JPEG [default: the bundled photo,
    /// tests/fixtures/images/landscape.png].
    #[arg(long)]
    image: Option<PathBuf>,
    /// Timed runs.
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Untimed runs first (the first one also gives the cold-start time).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Print one JSON object instead of a table (no progress bar).
    #[arg(long)]
    json: bool,
    /// Bench torchvision's full-size ResNet-50-FPN layout (47 classes) with random weights
    /// instead of --weights: realistic latency with nothing to download (the detections are
    /// meaningless; add --score-thresh 0 to run the mask head on all 100).
    #[arg(long, conflicts_with = "weights")]
    random_r50: bool,
    /// Also draw per-stage medians and the latency distribution (p50/p90/p99) to this PNG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Draw another engine's per-stage medians beside drape's in the plot, from a JSON file
    /// `{"name": "torchvision", "stages": {"backbone": 247.3, ...}}` (what
    /// `calibration/compare_torchvision.py --plot` writes).
    #[arg(long, requires = "plot", value_name = "JSON")]
    beside: Option<PathBuf>,
    /// Wait for the device at every stage boundary, so per-stage times are exact on a GPU
    /// (each wait idles it; the CPU's times are the same either way).
    #[arg(long)]
    sync_stages: bool,
}

fn detect(args: DetectArgs) -> Result<()> {
    let model = args.model.load()?;
    let image = image_io::load_rgb(&args.image)?;
    let size = (image.height() as usize, image.width() as usize);
    let result = model
        .detect(image.as_raw(), size)
        .with_context(|| format!("running the model on {}", args.image.display()))?;
    eprintln!(
        "{}: {} instances in {:.0} ms (image {}x{}, model input {}x{})",
        args.image.display(),
        result.instances.len(),
        result.timings.total,
        size.1,
        size.0,
        result.input_size.0,
        result.input_size.1
    );

    let text = serde_json::to_string(&output::to_json(model.labels(), &result, args.rle.into()))?;
    match args.json.as_deref() {
        None => writeln!(std::io::stdout().lock(), "{text}")?,
        Some(target) if target == Path::new("-") => writeln!(std::io::stdout().lock(), "{text}")?,
        Some(target) => std::fs::write(target, text + "\n")
            .with_context(|| format!("writing JSON to {}", target.display()))?,
    }
    if let Some(path) = &args.overlay {
        let mut canvas = image;
        overlay::draw(&mut canvas, &result.instances, |c| model.label(c));
        image_io::save_png(&canvas, path).context("writing the overlay")?;
    }
    Ok(())
}

#[derive(clap::Args)]
struct InspectArgs {
    /// Safetensors weights file.
    weights: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Also plan one frame's device memory for `cuda` or `metal`, from shapes alone.
    #[arg(long)]
    plan: Option<drape::model::plan::PlanTarget>,
    /// Shorter side the plan resizes to (default: the file's metadata, else 800).
    #[arg(long, requires = "plan")]
    min_size: Option<usize>,
    /// Cap on the longer side for the plan (default: the file's metadata, else 1333).
    #[arg(long, requires = "plan")]
    max_size: Option<usize>,
}

/// Prints the report; fails (exit code 1) when the check fails.
fn inspect(args: InspectArgs) -> Result<()> {
    let plan = args.plan.map(|target| drape::inspect::PlanRequest {
        target,
        min_size: args.min_size,
        max_size: args.max_size,
    });
    let report = drape::inspect::inspect(&args.weights, plan)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string(&report)?)?;
    } else {
        print_report(&report, &mut out)?;
    }
    match &report.check.error {
        None => Ok(()),
        Some(e) => bail!("check failed: {e}"),
    }
}

fn print_report(r: &drape::inspect::Report, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "{}", r.path.display())?;
    writeln!(
        out,
        "  file          {:.1} MB, sha256 {}",
        r.file_bytes as f64 / 1e6,
        r.sha256
    )?;
    writeln!(
        out,
        "  tensors       {}, {} parameters, {}",
        r.tensors,
        r.parameters,
        r.dtypes.join(" + ")
    )?;
    if let Some(a) = &r.architecture {
        writeln!(out, "  backbone      {}", a.backbone)?;
        writeln!(
            out,
            "  blocks        {} {:?}, stage channels {:?}",
            a.block, a.blocks_per_stage, a.stage_channels
        )?;
        writeln!(
            out,
            "  heads         FPN {}, head variant {} (box head {}, mask head {:?}), bn_eps {}",
            a.fpn_channels, r.head, a.representation_size, a.mask_layers, a.bn_eps
        )?;
        writeln!(out, "  classes       {} incl. background", a.num_classes)?;
    }
    if let Some(labels) = &r.labels {
        let source = if r.metadata.contains_key("labels") {
            "from the file"
        } else {
            "default"
        };
        let numbered: Vec<String> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| format!("{}: {l}", i + 1))
            .collect();
        writeln!(out, "  labels        ({source}) {}", numbered.join(" | "))?;
    }
    if let (Some(min), Some(max)) = (r.min_size, r.max_size) {
        writeln!(
            out,
            "  input size    shorter side {min}, longer side at most {max}"
        )?;
    }
    if let Some(p) = &r.plan {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        writeln!(
            out,
            "  plan          {} {} at {}x{}: peak {:.0} MiB (weights {:.0} MiB) at {}, largest \
             scratch {:.1} MiB ({}){}",
            p.target,
            p.dtype,
            p.input_size[0],
            p.input_size[1],
            mib(p.peak_device_bytes),
            mib(p.weights_bytes),
            p.peak_at,
            mib(p.largest_scratch_bytes),
            p.largest_scratch_at,
            if p.f32_layers.is_empty() {
                String::new()
            } else {
                format!(", kept f32: {}", p.f32_layers.join(", "))
            }
        )?;
    }
    for (k, v) in &r.metadata {
        // Labels were shown above, one per class.
        if k != "labels" {
            writeln!(out, "  metadata      {k} = {v}")?;
        }
    }
    match &r.check.error {
        None => writeln!(
            out,
            "  check         ok: every tensor the model needs is present with the right shape"
        )?,
        Some(e) => writeln!(out, "  check         FAILED: {e}")?,
    }
    Ok(())
}

fn bench(args: BenchArgs, process_start: Instant) -> Result<()> {
    if args.iters == 0 {
        bail!("--iters must be at least 1");
    }
    // Read before the model loads and the runs start, so a bad file fails in a moment.
    let beside: Option<drape::bench::plot::Reference> = match &args.beside {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --beside {}", path.display()))?;
            Some(serde_json::from_str(&text).with_context(|| {
                format!(
                    "--beside {}: expected {{\"name\": ..., \"stages\": {{stage: ms, ...}}}}",
                    path.display()
                )
            })?)
        }
        None => None,
    };
    let mut model_args = args.model;
    // Held until the model is loaded; the file is removed with it.
    let _synthetic = if args.random_r50 {
        let dir = tempfile::tempdir().context("creating a temp dir for the random weights")?;
        let path = dir.path().join("random-r50.safetensors");
        drape::synthetic::write_random_weights(
            &path,
            &drape::synthetic::SyntheticSpec::resnet50_fpn(),
            1,
        )
        .context("writing random ResNet-50-FPN weights")?;
        model_args.weights = Some(path);
        Some(dir)
    } else {
        None
    };
    let load_start = Instant::now();
    let mut model = model_args.load()?;
    model.set_sync_stages(args.sync_stages);
    let load_ms = load_start.elapsed().as_secs_f64() * 1e3;
    let image_path = match args.image {
        Some(path) => path,
        None => drape::assets::find(drape::assets::BENCH_IMAGE)?,
    };
    let image = image_io::load_rgb(&image_path)?;
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
    bar.set_message(format!("bench {}", model_args.weights_path()?.display()));
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
    let a = model.architecture();
    if let Some(path) = &args.plot {
        let name = format!("{}, {} classes", a.backbone, a.num_classes);
        drape::bench::plot::draw(&report, &name, beside.as_ref())
            .save(path)
            .with_context(|| format!("writing the plot to {}", path.display()))?;
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string(&report)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{} ({} classes, FPN {}), input {}x{} from {}x{}, {}, {} threads, {} runs, {} instances",
        a.backbone,
        a.num_classes,
        a.fpn_channels,
        report.input_size[0],
        report.input_size[1],
        size.1,
        size.0,
        report.device,
        report.threads,
        report.iters,
        report.instances
    )?;
    writeln!(out, "{:<12} {:>10} {:>10}", "stage", "median ms", "p99 ms")?;
    for (name, _) in drape::model::Timings::default().stages() {
        let s = report.stages[name];
        writeln!(out, "{name:<12} {:>10.1} {:>10.1}", s.median_ms, s.p99_ms)?;
    }
    writeln!(
        out,
        "backbone {:.1} GFLOP/s, {:.0} model allocations/frame, peak RSS {}, load {:.0} ms, \
         cold start {:.0} ms",
        report.backbone_gflops,
        report.model_allocs_per_frame,
        report
            .peak_rss_mb
            .map_or("n/a".into(), |m| format!("{m:.0} MiB")),
        report.load_ms,
        report.cold_start_ms
    )?;
    if let Some(m) = report.device_memory {
        writeln!(
            out,
            "device memory {:.0} of {:.0} MiB in use, pool peak {}",
            m.used_mb,
            m.total_mb,
            m.pool_peak_mb
                .map_or("n/a".into(), |p| format!("{p:.0} MiB"))
        )?;
    }
    Ok(())
}

fn run(args: RunArgs) -> Result<()> {
    let jsonl = Some(args.jsonl);
    stream(
        &args.model,
        &args.source,
        args.budget_ms,
        jsonl,
        args.http,
        &args.outputs,
        false,
    )
}

fn demo(mut args: DemoArgs) -> Result<()> {
    // The bundled frames stand in for a camera: replay them for as long as the demo runs.
    args.source.looping = true;
    stream(
        &args.model,
        &args.source,
        args.budget_ms,
        args.jsonl,
        Some(args.http),
        &args.outputs,
        true,
    )
}

/// The shared body of `run` and `demo`: source → pipeline → JSONL / Unix socket / HTTP.
fn stream(
    model_args: &ModelArgs,
    source_args: &SourceArgs,
    budget_ms: f64,
    jsonl: Option<PathBuf>,
    http: Option<String>,
    outputs: &OutputArgs,
    announce: bool,
) -> Result<()> {
    if !(budget_ms.is_finite() && budget_ms > 0.0) {
        bail!("--budget-ms must be positive");
    }
    if let Some(fps) = source_args.fps {
        drape::capture::check_fps(fps).map_err(|e| anyhow::anyhow!("--fps: {e}"))?;
    }
    let duration = outputs
        .duration
        .map(|d| {
            Duration::try_from_secs_f64(d).map_err(|_| {
                anyhow::anyhow!("--duration {d}: expected a finite number of seconds, at least 0")
            })
        })
        .transpose()?;
    if outputs.max_clients == 0 || outputs.unix_max_clients == 0 {
        bail!("--max-clients and --unix-max-clients must be at least 1");
    }
    let track = outputs.track.config()?;
    let mqtt = outputs.mqtt.config()?;
    let model = model_args.load()?;
    // Installed before the source opens, so a camera waiting to reconnect can be stopped too.
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing signal handlers")?;
    }
    let spec = SourceSpec {
        stop: Some(Arc::clone(&stop)),
        ..source_args.spec()?
    };
    let source = drape::capture::open(&spec).with_context(|| format!("opening {}", spec.source))?;
    eprintln!("drape: {} at a {budget_ms} ms budget", source.describe());
    let threads = rayon::current_num_threads();
    let base = (model.config().min_size, model.config().max_size);
    let mut controller = BudgetController::new(budget_ms, base, model.config().detections_per_img);
    let explicit = outputs.profile.as_deref();
    let found = Profile::for_run(explicit, model.device(), threads);
    if let Some(path) = found.filter(|_| !outputs.no_profile) {
        let profile = Profile::load(&path)?;
        let setup = RunSetup {
            device: &drape::calibrate::device_name(model.device(), threads),
            threads,
            model_sha256: &drape::weights::sha256_file(&model_args.weights_path()?)?,
            budget_ms,
            base,
            transforms: &source_args.transforms(),
        };
        match profile.seed(&setup) {
            Seed::Ignore(why) => {
                tracing::warn!(profile = %path.display(), "{why}; ignoring it");
            }
            Seed::Costs { costs, level } => {
                controller = controller.with_costs(costs, level);
                eprintln!("drape: costs from {}", path.display());
            }
        }
    }

    let notifier = drape::service::Notifier::from_env()
        .with_context(|| format!("${}", drape::service::NOTIFY_SOCKET))?;
    let hub = Hub::with_status(RunStatus::new(Arc::new(SystemClock), notifier));
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if let Some(path) = jsonl {
        if path == Path::new("-") {
            sinks.push(Box::new(JsonLines(std::io::stdout().lock())));
        } else {
            let health = SinkHealth::new("jsonl");
            let rotation = RotatePolicy {
                max_bytes: (outputs.jsonl_max_bytes > 0).then_some(outputs.jsonl_max_bytes),
                keep: outputs.jsonl_keep,
            };
            let file = JsonlFile::open(&path, rotation, Arc::clone(&health))
                .with_context(|| format!("opening --jsonl {}", path.display()))?;
            hub.watch_sink(health);
            sinks.push(Box::new(file));
        }
    }
    let _unix = match &outputs.unix {
        Some(path) => Some(
            UnixServer::bind(
                path,
                Arc::clone(&hub),
                UnixOptions {
                    mode: outputs.unix_mode,
                    max_clients: outputs.unix_max_clients,
                },
            )
            .with_context(|| format!("listening on {}", path.display()))?,
        ),
        None => None,
    };
    let _http = match &http {
        Some(addr) => {
            let options = HttpOptions {
                max_clients: outputs.max_clients,
                max_connections: outputs.http_max_connections,
                token: outputs
                    .http_token
                    .clone()
                    .or_else(|| std::env::var(HTTP_TOKEN_ENV).ok()),
                allowed_hosts: outputs.http_allowed_host.clone(),
                ..HttpOptions::default()
            };
            let server = HttpServer::bind(addr, Arc::clone(&hub), options)
                .with_context(|| format!("serving HTTP on {addr}"))?;
            let url = format!("http://{}/", server.local_addr());
            if announce {
                eprintln!("drape demo: open {url} in a browser (Ctrl-C to stop)");
            } else {
                eprintln!("drape: live preview at {url}");
            }
            Some(server)
        }
        None => None,
    };
    if outputs.unix.is_some() || http.is_some() {
        sinks.push(Box::new(HubSink::new(
            Arc::clone(&hub),
            model.labels().clone(),
        )));
    }
    if let Some(config) = mqtt {
        let url = outputs.mqtt.mqtt.as_deref().unwrap_or_default();
        let stats = Arc::new(MqttStats::default());
        hub.metrics.attach_mqtt(Arc::clone(&stats));
        let sink = MqttSink::start(config, stats)
            .with_context(|| format!("starting MQTT output to {url}"))?;
        eprintln!("drape: publishing to {url}");
        sinks.push(Box::new(sink));
    }
    if sinks.is_empty() {
        bail!("no output: give --jsonl, --http, --unix or --mqtt");
    }

    let options = PipelineOptions {
        duration,
        rle: outputs.rle.into(),
        status: Some(Arc::clone(&hub.status)),
        track,
        ..PipelineOptions::new(budget_ms)
    };
    let summary = pipeline::run(&model, source, controller, &mut sinks, &options, &stop)?;
    print_summary(&summary);
    Ok(())
}

/// `--unix-mode`: octal permission bits, at most 0777.
fn parse_mode(s: &str) -> std::result::Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("`{s}` is not an octal mode such as 660"))
}

fn print_summary(s: &drape::pipeline::Summary) {
    let c = &s.counters;
    eprintln!(
        "frames: {} captured, {} processed, dropped {} stale / {} superseded / {} corrupt; {} skipped at the source (camera driver or replay catching up); {} reconnects; {} budget misses",
        c.captured, c.processed, c.dropped_stale, c.dropped_superseded, c.corrupt, c.driver_dropped, c.reconnects, c.budget_misses
    );
    eprintln!(
        "{:<12} {:>8} {:>8} {:>8} {:>8}",
        "ms", "p50", "p90", "p99", "max"
    );
    let row = |name: &str, p: &drape::pipeline::Percentiles| {
        eprintln!(
            "{name:<12} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
            p.p50, p.p90, p.p99, p.max
        );
    };
    row("end-to-end", &s.latency_ms);
    row("frame age", &s.age_ms);
    for (name, p) in &s.stages_ms {
        row(name, p);
    }
    eprintln!(
        "final input size {}x{}",
        s.final_input_size.0, s.final_input_size.1
    );
}

fn calibrate(args: CalibrateArgs) -> Result<()> {
    if !(args.budget_ms.is_finite() && args.budget_ms > 0.0) {
        bail!("--budget-ms must be positive");
    }
    let model = args.model.load()?;
    let threads = rayon::current_num_threads();
    let spec = args.source.spec()?;
    let mut source =
        drape::capture::open(&spec).with_context(|| format!("opening {}", spec.source))?;
    // A few distinct frames; replay paces them, so a handful is quick.
    let mut frames = Vec::new();
    let mut frame = drape::capture::Frame::with_capacity(0, 0);
    for _ in 0..args.runs.clamp(1, 4) {
        match source.next_frame(&mut frame) {
            Ok(()) => frames.push((frame.rgb.clone(), (frame.height, frame.width))),
            Err(drape::capture::CaptureError::EndOfStream) => break,
            Err(e) => return Err(e.into()),
        }
    }
    let ladder_len = drape::pipeline::LADDER_FRACTIONS.len();
    let bar = ProgressBar::new((ladder_len * args.runs * 2) as u64).with_style(
        ProgressStyle::with_template("calibrating {wide_bar} {pos}/{len} runs, eta {eta}")
            .expect("static template"),
    );
    let (measured, level, max_masks, costs) =
        drape::calibrate::calibrate(&model, &frames, args.budget_ms, args.runs, || bar.inc(1))?;
    bar.finish_and_clear();
    let profile = Profile {
        device: drape::calibrate::device_name(model.device(), threads),
        threads,
        model_sha256: drape::weights::sha256_file(&args.model.weights_path()?)?,
        budget_ms: args.budget_ms,
        level,
        min_size: measured[level].min_size,
        max_size: measured[level].max_size,
        costs,
        transforms: args.source.transforms(),
        measured,
    };
    let path = args
        .out
        .unwrap_or_else(|| Profile::default_path(model.device(), threads));
    profile.save(&path)?;
    writeln!(
        std::io::stdout().lock(),
        "{}: input {}/{} with up to {} masks fits {} ms at p99 ({} size fixed p99 {:.0} ms); wrote {}",
        profile.device,
        profile.min_size,
        profile.max_size,
        max_masks,
        profile.budget_ms,
        if profile.measured[level].fixed_p99_ms <= profile.budget_ms { "this" } else { "even the smallest" },
        profile.measured[level].fixed_p99_ms,
        path.display()
    )?;
    Ok(())
}

fn cameras(json: bool) -> Result<()> {
    let cameras = drape::capture::list_cameras();
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string(&cameras)?)?;
        return Ok(());
    }
    if cameras.is_empty() {
        eprintln!("no V4L2 capture devices found");
    }
    for c in &cameras {
        writeln!(
            out,
            "{} — {} ({}, {})",
            c.path.display(),
            c.name,
            c.driver,
            c.bus
        )?;
        for f in &c.formats {
            writeln!(
                out,
                "    {} {}x{} @ {:.2} fps",
                f.fourcc, f.width, f.height, f.fps
            )?;
        }
    }
    Ok(())
}

/// Subcommands that take `--config`.
const CONFIGURABLE: [&str; 2] = ["run", "demo"];

/// The command line with the `--config` file's settings inserted right after the subcommand,
/// so that flags given on the command line come later and win.
fn with_config_file(args: Vec<std::ffi::OsString>) -> Result<Vec<std::ffi::OsString>> {
    let Some(sub_at) = args
        .iter()
        .position(|a| CONFIGURABLE.iter().any(|c| a == *c))
    else {
        return Ok(args);
    };
    let mut path = None;
    for (i, a) in args.iter().enumerate().skip(sub_at + 1) {
        let a = a.to_string_lossy();
        if let Some(p) = a.strip_prefix("--config=") {
            path = Some(PathBuf::from(p));
        } else if a == "--config" {
            path = args.get(i + 1).map(PathBuf::from);
        }
    }
    let Some(path) = path else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading --config {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing --config {}", path.display()))?;
    let subcommand = args[sub_at].to_string_lossy().into_owned();
    let command = <Cli as clap::CommandFactory>::command();
    let known: Vec<String> = command
        .find_subcommand(&subcommand)
        .into_iter()
        .flat_map(|c| c.get_arguments())
        .chain(command.get_arguments())
        .filter_map(|a| a.get_long().map(str::to_string))
        .collect();
    let mut inserted = Vec::new();
    for (key, value) in table {
        if key == "config" || !known.contains(&key) {
            bail!(
                "{}: unknown key `{key}`: keys are the long flags of `drape {subcommand}`",
                path.display()
            );
        }
        let flag = format!("--{key}");
        let scalar = |v: &toml::Value| -> Result<String> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                _ => bail!("{}: `{key}` must be a string or a number", path.display()),
            }
        };
        match &value {
            toml::Value::Boolean(true) => inserted.push(flag.into()),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                for item in items {
                    inserted.push(format!("{flag}={}", scalar(item)?).into());
                }
            }
            v => inserted.push(format!("{flag}={}", scalar(v)?).into()),
        }
    }
    let mut out = args;
    out.splice(sub_at + 1..sub_at + 1, inserted);
    Ok(out)
}

/// mimalloc.h's `mi_option_purge_delay`: the entry just before `mi_option_use_numa_nodes` in
/// `mi_option_e` (the bindings name the one but not the other).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t =
    libmimalloc_sys::mi_option_use_numa_nodes - 1;

fn main() -> ExitCode {
    let process_start = Instant::now();
    // mimalloc hands freed pages back to the kernel 10 ms after the last free by default; a
    // frame takes longer than that, so every frame's activations were faulted in and zeroed by
    // the kernel again (a fifth of all cycles in a CPU profile of `drape bench`). Never purging
    // keeps the process at its peak resident size, which it reaches on every frame anyway.
    // SAFETY: sets a process-wide allocator option; mimalloc reads it on every purge decision
    // and allows changing it at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let args = match with_config_file(std::env::args_os().collect()) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    // `--score-thresh -1` is a bad value to report by its flag's name, not an unknown flag.
    let matches = Cli::command()
        .mut_subcommands(|c| c.allow_negative_numbers(true))
        .get_matches_from(args);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in files or the journal.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Command::Detect(args) => detect(args),
        Command::Bench(args) => bench(args, process_start),
        Command::Convert(args) => cli::convert::run(args),
        Command::Inspect(args) => inspect(args),
        Command::Eval(args) => cli::eval::run_eval(args),
        Command::Submit(args) => cli::eval::run_submit(args),
        Command::Run(args) => run(args),
        Command::Demo(args) => demo(args),
        Command::Calibrate(args) => calibrate(args),
        Command::Cameras { json } => cameras(json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `drape detect | head`: the reader has what it wanted; not an error worth a message.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
