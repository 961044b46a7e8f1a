#!/usr/bin/env python3
"""Time drape and torchvision on the same weights, image, sizes and thread count, stage by stage.

Runs `drape bench --json` (its per-stage medians), then torchvision's `maskrcnn_resnet50_fpn`
(eager, f32 copy of the same f16 weights) on the same image with forward hooks on
`backbone.body`, `backbone.fpn`, `rpn`, the two RoI poolers, the box head and predictor, the mask
head and predictor, and prints one table: per-stage medians and the drape/torchvision ratio.
The header names the CPU and the SIMD flags its kernels can use.

    python calibration/compare_torchvision.py --synthetic /tmp/r50.safetensors --image photo.png \
        --min-size 512 --max-size 512 --score-thresh 0 --threads 2 --iters 5 --rounds 3

`--rounds N` alternates drape and torchvision N times and reports, per stage, the median over
rounds of each round's ratio: on a machine whose speed drifts (shared, thermally throttled) the
two sides of one ratio are then measured minutes apart at most.

`--plot FILE` draws the picture at the end: one more `drape bench --plot FILE --beside ...` run,
torchvision's per-stage medians over the rounds as a bar beside drape's on the same scale.

`--synthetic PATH` first writes a random full-size ResNet-50-FPN (47 classes) to PATH with
torchvision and benchmarks that. Needs torch, torchvision, safetensors, numpy and Pillow.

`--max-isa avx2` measures both engines' AVX2 code paths on an AVX-512 machine: torch is started
with its kernels capped at AVX2 (ATen's dispatch, oneDNN and MKL), and the drape binary must
have been built without AVX-512 kernels (`cargo build --release --no-default-features`), which
the script checks from the kernel drape reports. The header says so.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np
import torch
import torchvision
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

# What caps torch's kernels at an instruction set; read when torch loads, so the script restarts
# itself with them set.
ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                    "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}

# drape's stage names (`Timings::stages`), each with the torchvision pieces it corresponds to.
# drape's box_head includes the predictor and postprocess_detections, as here; its mask_head
# includes the predicted class's sigmoid (torchvision's maskrcnn_inference, timed with it);
# torchvision's transform.postprocess pastes the masks (drape's paste + rle).
STAGES = [
    ("preprocess", "transform"),
    ("backbone", "backbone.body"),
    ("fpn", "backbone.fpn"),
    ("rpn", "rpn"),
    ("roi_align", "roi_heads.box_roi_pool + roi_heads.mask_roi_pool"),
    ("box_head", "roi_heads.box_head + box_predictor + postprocess_detections"),
    ("mask_head", "roi_heads.mask_head + mask_predictor"),
    ("paste", "transform.postprocess (paste_masks_in_image)"),
]
# The flags that decide which kernels gemm, oneDNN and MKL pick.
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl",
              "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "asimd", "asimdhp", "sve", "sve2")


def cpu_description():
    """`model name` (x86) or the implementer/part (aarch64) and the SIMD flags, from /proc/cpuinfo."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and value.strip():
                    model = value.strip()
                elif key in ("flags", "Features"):
                    flags.update(value.split())
    except OSError:
        pass
    return model, [f for f in SIMD_FLAGS if f in flags]


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


class StageClock:
    """Per-stage wall time of one forward, from forward (pre-)hooks and two wrapped methods."""

    def __init__(self, model):
        self.ms = defaultdict(float)
        self.started = {}
        heads = model.roi_heads
        modules = {
            "preprocess": [model.transform],
            "backbone": [model.backbone.body],
            "fpn": [model.backbone.fpn],
            "rpn": [model.rpn],
            "roi_align": [heads.box_roi_pool, heads.mask_roi_pool],
            "box_head": [heads.box_head, heads.box_predictor],
            "mask_head": [heads.mask_head, heads.mask_predictor],
        }
        for stage, mods in modules.items():
            for m in mods:
                m.register_forward_pre_hook(self._start(m))
                m.register_forward_hook(self._stop(m, stage))
        # Plain methods, not modules: wrapped on the instance.
        heads.postprocess_detections = self._timed(heads.postprocess_detections, "box_head")
        model.transform.postprocess = self._timed(model.transform.postprocess, "paste")

    def _start(self, module):
        def hook(*_):
            self.started[id(module)] = time.perf_counter()
        return hook

    def _stop(self, module, stage):
        def hook(*_):
            self.ms[stage] += (time.perf_counter() - self.started.pop(id(module))) * 1e3
        return hook

    def _timed(self, fn, stage):
        def wrapped(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.ms[stage] += (time.perf_counter() - start) * 1e3
        return wrapped

    def take(self):
        ms, self.ms = dict(self.ms), defaultdict(float)
        return ms


def run_drape(args, weights, extra=()):
    cmd = [args.drape, "bench", "--json", "--weights", weights, "--image", args.image,
           "--min-size", str(args.min_size), "--max-size", str(args.max_size),
           "--score-thresh", str(args.score_thresh), "--threads", str(args.threads),
           "--iters", str(args.iters), *extra]
    report = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    medians = {name: s["median_ms"] for name, s in report["stages"].items()}
    # torchvision pastes and encodes in one call; drape times paste and RLE apart.
    medians["paste"] = medians.get("paste", 0.0) + medians.get("rle", 0.0)
    return report, medians


def run_torchvision(model, clock, img, iters):
    samples, totals = defaultdict(list), []
    with torch.inference_mode():
        out = model([img])[0]
        clock.take()
        for _ in range(iters):
            start = time.perf_counter()
            model([img])
            totals.append((time.perf_counter() - start) * 1e3)
            for stage, ms in clock.take().items():
                samples[stage].append(ms)
    medians = {stage: statistics.median(v) for stage, v in samples.items()}
    medians["total"] = statistics.median(totals)
    return out, medians, totals


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
    ap.add_argument("--rounds", type=int, default=1, help="alternate drape and torchvision this often")
    ap.add_argument("--drape", default="target/release/drape")
    ap.add_argument("--json", help="also write the table's numbers here")
    ap.add_argument("--plot", help="also draw drape's and torchvision's stage bars to this PNG")
    ap.add_argument("--max-isa", choices=sorted(ISA_ENV),
                    help="cap both engines' kernels at this instruction set (see above)")
    args = ap.parse_args()
    if args.max_isa:
        env = ISA_ENV[args.max_isa]
        if any(os.environ.get(k) != v for k, v in env.items()):
            os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})

    weights = args.weights
    if args.synthetic:
        torch.manual_seed(0)
        m = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=47)
        save_file({k: v.half() for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")},
                  args.synthetic, metadata={"bn_eps": "1e-05"})
        weights = args.synthetic
    if not weights:
        raise SystemExit("give --weights or --synthetic")

    torch.set_num_threads(args.threads)
    model = torchvision_model(weights, args.min_size, args.max_size, args.score_thresh)
    clock = StageClock(model)
    img = torch.from_numpy(np.array(Image.open(args.image).convert("RGB"))).permute(2, 0, 1).float() / 255

    names = [s for s, _ in STAGES] + ["total"]
    d_rounds, t_rounds, t_all = [], [], []
    for _ in range(max(1, args.rounds)):
        drape, d_med = run_drape(args, weights)
        if args.max_isa and drape["cpu"]["gemm_kernel"] != args.max_isa:
            raise SystemExit(f"--max-isa {args.max_isa}: {args.drape} runs its {drape['cpu']['gemm_kernel']} "
                             "kernels; build it with `cargo build --release --no-default-features`")
        out, t_med, t_totals = run_torchvision(model, clock, img, args.iters)
        d_rounds.append(d_med)
        t_rounds.append(t_med)
        t_all += t_totals

    def med(rounds, stage):
        return statistics.median(r.get(stage, 0.0) for r in rounds)

    def ratio(stage):
        per_round = [d.get(stage, 0.0) / t[stage] for d, t in zip(d_rounds, t_rounds) if t.get(stage)]
        return statistics.median(per_round) if per_round else float("nan")

    cpu, flags = cpu_description()
    w, h = drape["input_size"]
    print(f"CPU: {cpu}; SIMD: {' '.join(flags) or 'none listed'}")
    if args.max_isa:
        print(f"kernels capped at {args.max_isa}: torch with "
              f"{' '.join(f'{k}={v}' for k, v in ISA_ENV[args.max_isa].items())}; "
              f"drape's GEMM kernel {drape['cpu']['gemm_kernel']}")
    print(f"torch {torch.__version__} (oneDNN {torch.backends.mkldnn.is_available()}), "
          f"torchvision {torchvision.__version__}, {args.threads} threads")
    print(f"input {w}x{h} (min/max {args.min_size}/{args.max_size}), {args.iters} runs x "
          f"{len(d_rounds)} rounds; instances drape {drape['instances']}, torchvision {len(out['scores'])}")
    print(f"| {'stage':<10} | {'drape ms':>9} | {'torchvision ms':>14} | {'ratio':>5} |")
    print(f"|{'-' * 12}|{'-' * 11}|{'-' * 16}|{'-' * 7}|")
    table = {}
    for stage in names:
        d, t, r = med(d_rounds, stage), med(t_rounds, stage), ratio(stage)
        table[stage] = {"drape_ms": d, "torchvision_ms": t, "ratio": r}
        print(f"| {stage:<10} | {d:>9.1f} | {t:>14.1f} | {r:>5.2f} |")
    print(f"torchvision total p99 {percentile(t_all, 99):.0f} ms; drape load {drape['load_ms']:.0f} ms, "
          f"cold start {drape['cold_start_ms']:.0f} ms")
    # ru_maxrss is this process only (drape ran as a child): torchvision's own peak, in KiB.
    torch_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: drape {drape['peak_rss_mb']:.0f} MiB, torchvision {torch_rss:.0f} MiB")
    if args.plot:
        # The plot's drape bar comes from one more run; torchvision's from the rounds above.
        reference = {"name": "torchvision",
                     "stages": {stage: med(t_rounds, stage) for stage in names}}
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            json.dump(reference, f)
            f.flush()
            run_drape(args, weights, ["--plot", args.plot, "--beside", f.name])
        print(f"plot: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu, "simd": flags, "max_isa": args.max_isa, "input_size": [w, h],
                       "threads": args.threads, "stages": table}, f, indent=1)


if __name__ == "__main__":
    main()
