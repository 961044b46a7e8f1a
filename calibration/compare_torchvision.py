#!/usr/bin/env python3
"""Time drape and torchvision on the same weights, image, sizes and thread count, in one run.

Runs `drape bench --json`, then torchvision's `maskrcnn_resnet50_fpn` (eager, f32 copy of the
same f16 weights) on the same image, and prints both medians and their ratio.

    python calibration/compare_torchvision.py --weights W.safetensors --image photo.png \
        --min-size 512 --max-size 512 --threads 2 --iters 5

`--synthetic PATH` first writes a random full-size ResNet-50-FPN (47 classes) to PATH with
torchvision and benchmarks that. Needs torch, torchvision and safetensors.
"""
import argparse
import json
import resource
import statistics
import subprocess
import time

import numpy as np
import torch
import torchvision
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def torchvision_model(weights, min_size, max_size, score_thresh):
    state = {k: v.float() for k, v in load_file(weights).items()}
    with safe_open(weights, "pt") as f:
        meta = f.metadata() or {}
    num_classes = state["roi_heads.box_predictor.cls_score.weight"].shape[0]
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=num_classes,
        min_size=min_size,
        max_size=max_size,
        box_score_thresh=score_thresh,
    )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise SystemExit(f"not a ResNet-50-FPN v1 file: missing {missing[:3]}, unexpected {unexpected[:3]}")
    eps = float(meta.get("bn_eps", "1e-5"))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps = eps
    return model.eval()


def percentile(values, p):
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(np.ceil(p / 100 * len(ordered)))))
    return ordered[rank - 1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights")
    ap.add_argument("--synthetic", help="write a random R50-FPN here first and use it")
    ap.add_argument("--image", default="tests/fixtures/images/landscape.png")
    ap.add_argument("--min-size", type=int, default=800)
    ap.add_argument("--max-size", type=int, default=1333)
    ap.add_argument("--score-thresh", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--drape", default="target/release/drape")
    args = ap.parse_args()

    weights = args.weights
    if args.synthetic:
        torch.manual_seed(0)
        m = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=47)
        save_file({k: v.half() for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")},
                  args.synthetic, metadata={"bn_eps": "1e-05"})
        weights = args.synthetic
    if not weights:
        raise SystemExit("give --weights or --synthetic")

    cmd = [args.drape, "bench", "--json", "--weights", weights, "--image", args.image,
           "--min-size", str(args.min_size), "--max-size", str(args.max_size),
           "--score-thresh", str(args.score_thresh), "--threads", str(args.threads),
           "--iters", str(args.iters)]
    drape = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)

    torch.set_num_threads(args.threads)
    model = torchvision_model(weights, args.min_size, args.max_size, args.score_thresh)
    img = torch.from_numpy(np.array(Image.open(args.image).convert("RGB"))).permute(2, 0, 1).float() / 255
    times = []
    with torch.inference_mode():
        out = model([img])[0]
        for _ in range(args.iters):
            start = time.perf_counter()
            model([img])
            times.append((time.perf_counter() - start) * 1e3)

    d_med, d_p99 = drape["stages"]["total"]["median_ms"], drape["stages"]["total"]["p99_ms"]
    t_med, t_p99 = statistics.median(times), percentile(times, 99)
    w, h = drape["input_size"]
    print(f"input {w}x{h} (min/max {args.min_size}/{args.max_size}), {args.threads} threads, "
          f"{args.iters} runs; instances drape {drape['instances']}, torchvision {len(out['scores'])}")
    print(f"{'':12} {'median ms':>10} {'p99 ms':>10}")
    print(f"{'drape':12} {d_med:>10.0f} {d_p99:>10.0f}")
    print(f"{'torchvision':12} {t_med:>10.0f} {t_p99:>10.0f}")
    print(f"drape / torchvision median: {d_med / t_med:.2f}")
    # ru_maxrss is this process only (drape ran as a child): torchvision's own peak, in KiB.
    torch_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: drape {drape['peak_rss_mb']:.0f} MiB, torchvision {torch_rss:.0f} MiB")


if __name__ == "__main__":
    main()
