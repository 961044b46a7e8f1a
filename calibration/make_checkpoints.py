"""Write the PyTorch checkpoints `tests/convert.rs` feeds to `drape convert`.

Usage (from the repository root, with the project venv, after make_fixtures.py):

    /work/venv/bin/python calibration/make_checkpoints.py   # -> tests/fixtures/checkpoints/

Every good checkpoint holds the tiny R50 fixture's weights (tests/fixtures/tiny_r50/model.safetensors,
f16) loaded into the same torchvision model, so `model.state_dict()` is the real thing: an
OrderedDict with `_metadata`, `num_batches_tracked` buffers, f32 tensors whose values are exactly
the f16 ones. Each file then varies one thing a converter must get right; converted back to f16,
all of them must reproduce the fixture byte for byte. The bad ones are tiny and must each be
refused with a named error.

The files are deterministic in content but not byte-reproducible (torch.save stamps a random
serialization id into zip archives and storage addresses into legacy ones).
"""

import argparse
import collections
import os
from pathlib import Path

import safetensors.torch
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from make_fixtures import SlimResNet, tiny_maskrcnn

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests/fixtures/tiny_r50/model.safetensors"


def state_dict():
    """The fixture's weights as the tiny model's own f32 state_dict."""
    model = tiny_maskrcnn(Bottleneck, [1, 1, 1, 1], 47)
    f16 = safetensors.torch.load_file(FIXTURE)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in f16.items()}, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    return model.state_dict()


def mapped(sd, fn):
    """A copy of `sd` (keeping its `_metadata`) with every float tensor passed through fn(name, t)."""
    out = collections.OrderedDict((k, fn(k, v) if v.is_floating_point() else v) for k, v in sd.items())
    out._metadata = sd._metadata
    return out


def half(sd):
    return mapped(sd, lambda k, v: v.half())


def nudge_subnormals(v):
    """f32 values off the f16 grid that still round to the same f16: every nonzero value below
    f16's normal range (6.1e-5) moves by 2^-26, a quarter of the subnormal spacing. Converting
    to f16 must then reproduce the fixture exactly while reporting the precision these lose."""
    tiny = (v != 0) & (v.abs() < torch.finfo(torch.float16).tiny)
    return torch.where(tiny, v + v.sign() * 2.0**-26, v)


def mixed(sd):
    """Every other float tensor f16, the rest f32 (with nudged subnormals): both storage types
    in one archive."""
    names = [k for k, v in sd.items() if v.is_floating_point()]
    f16 = set(names[::2])
    return mapped(sd, lambda k, v: v.half() if k in f16 else nudge_subnormals(v))


def f64_batchnorm(sd):
    """BatchNorm running stats as f64 (exact: they are f16 values), as mixed-precision trainers leave them."""
    return mapped(sd, lambda k, v: v.double() if "running_" in k else v.half())


def strided(sd):
    """Layouts a converter must not assume away, all holding the same values:
    - a channels-last conv weight (strides not C-order),
    - a transposed FC weight (strides (1, rows)),
    - two biases cut from one shared storage (the second at a nonzero storage offset).
    """
    sd = half(sd)
    conv = "backbone.body.conv1.weight"
    sd[conv] = sd[conv].contiguous(memory_format=torch.channels_last)
    assert not sd[conv].is_contiguous()
    fc = "roi_heads.box_head.fc6.weight"
    sd[fc] = sd[fc].t().contiguous().t()
    assert not sd[fc].is_contiguous()
    a, b = "roi_heads.box_head.fc6.bias", "roi_heads.box_head.fc7.bias"
    shared = torch.cat([sd[a], sd[b]])
    sd[a], sd[b] = shared[: len(sd[a])], shared[len(sd[a]) :]
    assert sd[b].storage_offset() > 0
    return sd


class RunsCode:
    """Unpickling this calls os.system: what a hostile "checkpoint" looks like."""

    def __reduce__(self):
        return (os.system, ("echo drape-must-never-run-this",))


def tiny(*shape):
    return torch.zeros(shape)


def classifier():
    """A real (slim) ResNet image classifier's state_dict: backbone keys without `backbone.body.`, an fc."""
    torch.manual_seed(0)
    net = SlimResNet(BasicBlock, [1, 1, 1, 1], stem=4, planes=(4, 4, 4, 4))
    net.fc = nn.Linear(4, 10)
    return net.state_dict()


def missing_tensor(sd):
    """The Mask R-CNN's key set with `backbone.body.bn1.running_var` gone.

    drape's loader reads the stem first, so the tensors after it are stand-ins of one element
    (keeping the file at a few KB): the conversion must stop at the missing one and name it.
    """
    out = collections.OrderedDict()
    for k, v in half(sd).items():
        if k == "backbone.body.bn1.running_var":
            continue
        out[k] = v if k.startswith("backbone.body.conv1.") or k.startswith("backbone.body.bn1.") else v.flatten()[:1].clone()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "tests/fixtures/checkpoints")
    out = p.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    sd = state_dict()

    good = {
        # torch >= 1.6 zip format, bare state_dict, f32 and f16 storages, num_batches_tracked.
        "zip_bare_mixed.pth": (mixed(sd), True),
        # torch < 1.6 format: magic number, protocol, sys info, pickle, storage keys, raw storages.
        "legacy_bare_f16.pth": (half(sd), False),
        # A training checkpoint: weights under `model`, with epoch, optimizer state and argparse args.
        "zip_training.pth": (
            {
                "epoch": 3,
                "model": f64_batchnorm(sd),
                "optimizer": {
                    "state": {0: {"momentum_buffer": torch.ones(2)}},
                    "param_groups": [{"lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4, "params": [0, 1]}],
                },
                "args": argparse.Namespace(lr=0.02, epochs=26, data_path="/data/imaterialist"),
            },
            True,
        ),
        # nn.DataParallel's `module.` prefix under `state_dict`, non-contiguous and offset tensors.
        "zip_dataparallel_strided.pth": (
            {"state_dict": collections.OrderedDict(("module." + k, v) for k, v in strided(sd).items())},
            True,
        ),
    }
    bad = {
        "mmdetection.pth": {
            "meta": {"mmdet_version": "2.28.2", "CLASSES": ("shirt", "pants")},
            "state_dict": collections.OrderedDict(
                (k, tiny(2))
                for k in [
                    "backbone.conv1.weight",
                    "backbone.layer1.0.conv1.weight",
                    "neck.lateral_convs.0.conv.weight",
                    "rpn_head.rpn_conv.weight",
                    "roi_head.bbox_head.fc_cls.weight",
                    "roi_head.mask_head.conv_logits.weight",
                ]
            ),
        },
        "detectron2.pth": {
            "model": collections.OrderedDict(
                (k, tiny(2))
                for k in [
                    "backbone.bottom_up.stem.conv1.weight",
                    "backbone.bottom_up.res2.0.conv1.weight",
                    "backbone.fpn_lateral2.weight",
                    "proposal_generator.rpn_head.conv.weight",
                    "roi_heads.box_predictor.cls_score.weight",
                    "roi_heads.mask_head.predictor.weight",
                ]
            ),
            "__author__": "Detectron2 Model Zoo",
            "iteration": 90000,
        },
        "classifier.pth": classifier(),
        "runs_code.pth": {"epoch": 1, "model": RunsCode()},
        "missing_tensor.pth": missing_tensor(sd),
    }
    for name, (obj, zipped) in good.items():
        torch.save(obj, out / name, _use_new_zipfile_serialization=zipped)
    for name, obj in bad.items():
        torch.save(obj, out / name)
    torch.jit.script(nn.Linear(2, 2)).save(out / "torchscript.pt")
    for f in sorted(out.iterdir()):
        print(f"{f.stat().st_size:>9}  {f.relative_to(REPO)}")


if __name__ == "__main__":
    main()
