//! `drape convert`'s flags, progress bar and summary; the conversion is
//! [`drape::convert::convert`].

use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use drape::convert::{convert, read_labels, Options, Summary};
use drape::model::DEFAULT_BN_EPS;

use super::choice;

/// Inputs at least this large get a progress bar.
const PROGRESS_MIN_BYTES: u64 = 32 << 20;
/// How many tensors a precision warning names.
const WARN_TOP: usize = 5;

const BN_EPS_HELP: &str = "\
BatchNorm epsilon the model was trained with, stored in the file's metadata.

1e-5 (the default) is nn.BatchNorm2d's and FrozenBatchNorm2d's default. Models fine-tuned from \
torchvision's COCO weights use 0.0: maskrcnn_resnet50_fpn(weights=\"COCO_V1\") (or \
pretrained=True before torchvision 0.13) calls overwrite_eps(model, 0.0), and the frozen \
backbone keeps it through fine-tuning; the checkpoint does not record it. So: if the training \
script built the model with COCO detection weights, pass --bn-eps 0; if it started from \
scratch or from ImageNet backbone weights only (weights_backbone=...), keep 1e-5. In Python, \
{m.eps for m in model.modules() if hasattr(m, \"eps\")} on the training model tells for sure.";

/// `drape convert`'s flags.
#[derive(clap::Args)]
pub struct ConvertArgs {
    /// PyTorch checkpoint (.pth/.pt) as torch.save writes it, zip or legacy format.
    input: PathBuf,
    /// Safetensors file to write.
    output: PathBuf,
    /// Top-level key holding the state_dict [default: the checkpoint itself when it is one,
    /// else `model`, `state_dict` or `model_state_dict`].
    #[arg(long)]
    key: Option<String>,
    /// Element type of the written weights.
    #[arg(long, value_enum, default_value = "f16")]
    dtype: choice::Dtype,
    /// Names of classes 1, 2, ... (0 is background): a JSON list, or a text file with one name
    /// per line [default: iMaterialist 2019's 46 for a 47-class model, else none].
    #[arg(long)]
    labels: Option<PathBuf>,
    /// BatchNorm epsilon the model was trained with: 0 for models fine-tuned from torchvision's
    /// COCO weights (see --help).
    #[arg(long, default_value_t = DEFAULT_BN_EPS, long_help = BN_EPS_HELP)]
    bn_eps: f32,
    /// Shorter side the model resizes images to, stored for `drape detect` [default: 800].
    #[arg(long)]
    min_size: Option<usize>,
    /// Cap on the longer side, stored for `drape detect` [default: 1333].
    #[arg(long)]
    max_size: Option<usize>,
    /// Replace OUTPUT if it exists.
    #[arg(long)]
    force: bool,
}

/// Validates the flags, converts with a progress bar for large inputs, prints a summary.
pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    if !args.bn_eps.is_finite() || args.bn_eps < 0.0 {
        anyhow::bail!("--bn-eps {} must be a finite value >= 0", args.bn_eps);
    }
    if args.min_size == Some(0) || args.max_size == Some(0) {
        anyhow::bail!("--min-size and --max-size must be at least 1");
    }
    let labels = args.labels.as_deref().map(read_labels).transpose()?;
    let opts = Options {
        input: args.input,
        output: args.output,
        key: args.key,
        dtype: args.dtype.into(),
        labels,
        bn_eps: args.bn_eps,
        min_size: args.min_size,
        max_size: args.max_size,
        force: args.force,
    };
    let input_len = std::fs::metadata(&opts.input)
        .with_context(|| format!("reading {}", opts.input.display()))?
        .len();
    let bar = if input_len >= PROGRESS_MIN_BYTES {
        ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr()).with_style(
            ProgressStyle::with_template("converting {wide_bar} {bytes}/{total_bytes}, eta {eta}")
                .expect("static template"),
        )
    } else {
        ProgressBar::hidden()
    };
    let summary = convert(&opts, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let s = summary?;
    print_summary(&opts, &s);
    Ok(())
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn print_summary(opts: &Options, s: &Summary) {
    let a = &s.architecture;
    let place = match &s.key {
        Some(k) => format!("state_dict under `{k}`"),
        None => "bare state_dict".into(),
    };
    let prefix = if s.stripped_prefix {
        ", `module.` prefix stripped"
    } else {
        ""
    };
    println!("{} -> {}", opts.input.display(), opts.output.display());
    println!("  checkpoint    {}, {place}{prefix}", s.format);
    println!(
        "  architecture  {}, FPN {}, box head {}, mask head {:?}",
        a.backbone, a.fpn_channels, a.representation_size, a.mask_layers
    );
    let labels = match &s.labels {
        Some(l) => format!("labels {}", preview(l)),
        None => "no labels (shown as `class k`)".into(),
    };
    println!(
        "  classes       {} incl. background, {labels}",
        a.num_classes
    );
    println!(
        "  tensors       {} written as {}, {} num_batches_tracked dropped, bn_eps {}",
        s.tensors,
        s.dtype.name(),
        s.dropped,
        a.bn_eps
    );
    println!(
        "  size          {} -> {}",
        megabytes(s.input_bytes),
        megabytes(s.output_bytes)
    );
    println!("  source sha256 {}", s.source_sha256);
    if !s.tiny.is_empty() {
        let total: usize = s.tiny.iter().map(|t| t.count).sum();
        let top: Vec<String> = s
            .tiny
            .iter()
            .take(WARN_TOP)
            .map(|t| format!("`{}` {} of {}", t.name, t.count, t.numel))
            .collect();
        eprintln!(
            "warning: {total} values in {} tensors are below {}'s normal range (|x| < {}) and \
             lost precision, becoming subnormal or zero: {}{}",
            s.tiny.len(),
            s.dtype.name(),
            s.dtype.min_normal(),
            top.join(", "),
            if s.tiny.len() > WARN_TOP { ", ..." } else { "" }
        );
    }
}

/// The first few names, for a one-line summary.
fn preview(labels: &[String]) -> String {
    const SHOWN: usize = 3;
    let head: Vec<String> = labels
        .iter()
        .take(SHOWN)
        .map(|l| format!("{l:?}"))
        .collect();
    if labels.len() > SHOWN {
        format!("[{}, ... {} in all]", head.join(", "), labels.len())
    } else {
        format!("[{}]", head.join(", "))
    }
}
