"""Generate torchvision reference fixtures for drape's Mask R-CNN.

Usage (from the repository root, with the project venv):

    /work/venv/bin/python calibration/make_fixtures.py             # small committed set -> tests/fixtures/
    /work/venv/bin/python calibration/make_fixtures.py --full DIR  # ResNet-50-FPN set -> DIR (not committed)
    /work/venv/bin/python calibration/make_fixtures.py --full DIR --time-only  # just redo the timings

Pretrained weights cannot be downloaded here, so every model is torchvision's own
architecture with seeded random init, made "realistic enough" by:
  1. calibrating BatchNorm running stats on real photos (skimage sample data), so the
     activations have a natural scale instead of exploding or vanishing;
  2. rescaling the RPN and box-predictor outputs: random heads give near-constant
     objectness and a near-uniform softmax, which nothing passes the 0.05 threshold;
  3. rounding all weights to f16 (the file format) and loading them back, so every
     reference tensor is what torchvision computes in f32 from exactly the stored weights.

Stage outputs are computed by calling torchvision's own modules one by one, and the
staged result is asserted to be bit-identical to the end-to-end `model([img])`.
Everything is seeded; reruns on the same torch build reproduce the files.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import safetensors.torch
import skimage.data
import torch
from pycocotools import mask as mask_util
from torch import nn
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import maskrcnn_inference
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

REPO = Path(__file__).resolve().parent.parent
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # GeneralizedRCNNTransform defaults
CALIB_PHOTOS = ["astronaut", "coffee", "chelsea", "rocket"]  # used with their mirror images

# Target spreads for the rescaled heads (std over the calibration photos; the class
# logit settings are per model, in MODELS). RPN box_coder weights are (1,1,1,1) and the
# box head's (10,10,5,5), hence the different delta scales; both move boxes visibly off
# their anchors/proposals (median IoU proposal vs refined box ~0.5) without hitting clamps.
HEAD_TARGETS = dict(rpn_obj_std=2.0, rpn_delta_std=0.15, box_delta_std=1.5)
FPN_TILT = 1.6  # see tilt_fpn


# ----------------------------------------------------------------------------- models
class SlimResNet(ResNet):
    """torchvision's ResNet with a narrower stem and stages.

    ResNet.__init__ hard-codes 64 stem channels and 64/128/256/512 planes, so this redoes
    its body with the same attribute names, `_make_layer` and init: the state_dict keys
    are resnet50/resnet18's. avgpool/fc are left out (IntermediateLayerGetter drops them).
    """

    def __init__(self, block, layers, stem=16, planes=(16, 32, 64, 128)):
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = stem, 1, 1, 64
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for i, (p, n) in enumerate(zip(planes, layers)):
            setattr(self, f"layer{i + 1}", self._make_layer(block, p, n, stride=1 if i == 0 else 2))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def tiny_maskrcnn(block, layers, num_classes):
    body = SlimResNet(block, layers)
    backbone = BackboneWithFPN(
        body,
        return_layers={f"layer{i + 1}": str(i) for i in range(4)},
        in_channels_list=[p * block.expansion for p in (16, 32, 64, 128)],
        out_channels=32,
        extra_blocks=LastLevelMaxPool(),
    )
    # FasterRCNN insists on num_classes=None once a predictor is passed, so the (narrow)
    # box predictor is given explicitly too; it is the one FasterRCNN would build.
    return MaskRCNN(
        backbone,
        num_classes=None,
        min_size=160,
        max_size=224,
        rpn_head=RPNHead(32, 3),
        box_head=TwoMLPHead(32 * 7 * 7, 64),
        box_predictor=FastRCNNPredictor(64, num_classes),
        mask_head=MaskRCNNHeads(32, (32, 32, 32, 32), 1),
        mask_predictor=MaskRCNNPredictor(32, 32, num_classes),
    )


def tiny_maskrcnn_v2(num_classes):
    """The `maskrcnn_resnet50_fpn_v2` layout, narrow: BatchNorm in the FPN and the heads, a
    two-conv RPN head and a four-conv + one-FC box head (FastRCNNConvFCHead)."""
    body = SlimResNet(Bottleneck, [1, 1, 1, 1])
    backbone = BackboneWithFPN(
        body,
        return_layers={f"layer{i + 1}": str(i) for i in range(4)},
        in_channels_list=[p * Bottleneck.expansion for p in (16, 32, 64, 128)],
        out_channels=32,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=nn.BatchNorm2d,
    )
    return MaskRCNN(
        backbone,
        num_classes=None,
        min_size=160,
        max_size=224,
        rpn_head=RPNHead(32, 3, conv_depth=2),
        box_head=FastRCNNConvFCHead((32, 7, 7), [32, 32, 32, 32], [64], norm_layer=nn.BatchNorm2d),
        box_predictor=FastRCNNPredictor(64, num_classes),
        mask_head=MaskRCNNHeads(32, [32, 32, 32, 32], 1, norm_layer=nn.BatchNorm2d),
        mask_predictor=MaskRCNNPredictor(32, 32, num_classes),
    )


def freeze_batchnorm(module, eps):
    """Swap every BatchNorm2d for FrozenBatchNorm2d(eps) holding the same (calibrated) stats."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=eps)
            for k in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, k).copy_(getattr(child, k).detach())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child, eps)


# ----------------------------------------------------------------------------- images
def load_image(path):
    """Exactly how the Rust side's tests feed torchvision: RGB8 -> float [0,1], CHW."""
    return torch.from_numpy(np.array(PIL.Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


def crop_resize(arr, w, h):
    """Centre-crop an HWC uint8 photo to the w:h aspect ratio, then resize to w x h."""
    H, W = arr.shape[:2]
    if W * h > H * w:
        cw = round(H * w / h)
        arr = arr[:, (W - cw) // 2 : (W - cw) // 2 + cw]
    else:
        ch = round(W * h / w)
        arr = arr[(H - ch) // 2 : (H - ch) // 2 + ch]
    return PIL.Image.fromarray(arr).resize((w, h), PIL.Image.LANCZOS)


def calibration_photos():
    photos = []
    for name in CALIB_PHOTOS:
        x = torch.from_numpy(getattr(skimage.data, name)().copy()).permute(2, 0, 1).float() / 255
        photos += [x, x.flip(-1)]
    return photos


# ----------------------------------------------------------------------------- calibration
@torch.no_grad()
def calibrate_batchnorm(model, photos):
    """Running stats := average of per-photo batch stats (momentum=None), on transformed photos."""
    bns = [m for m in model.backbone.body.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.eval()
    model.backbone.body.train()
    for x in photos:
        model.backbone.body(model.transform([x])[0].tensors)
    model.eval()


@torch.no_grad()
def damp_residuals(model, gain):
    """Scale each Bottleneck's residual branch (its last BatchNorm) by `gain`.

    A random 33-block network is chaotic: float rounding, which differs between any two conv
    implementations, grows ~100x through layer3's 23 blocks, so near-tie detections flip. Trained
    ResNets keep residual branches small relative to the identity path; this gives the random
    one that property, so the fixture tests the implementation rather than the chaos.
    """
    for m in model.backbone.body.modules():
        if isinstance(m, Bottleneck):
            m.bn3.weight *= gain
            m.bn3.bias *= gain


def rescale_(layer, scale, shift=None):
    """out -> scale * (out - shift) for a Linear/Conv layer, per output channel."""
    layer.weight *= scale
    if shift is not None:
        layer.bias -= shift
    layer.bias *= scale


@torch.no_grad()
def tilt_fpn(model, photos, tilt):
    """Rescale FPN output level i to std(level 0) * tilt**i over the calibration photos.

    With a random RPN head (shared over levels), objectness spread follows the feature
    spread, which a random FPN gives to the fine levels (and they have the most anchors),
    so nearly all proposals would be small and RoIAlign would only ever read FPN levels
    0-1. Giving the coarse levels more spread yields proposals and detections of all sizes
    (on 800 px images; 160x224 images are too small for RoIAlign levels 2-3 anyway).
    """
    feats = [model.backbone(model.transform([x])[0].tensors) for x in photos]
    stds = [torch.cat([f[str(i)].flatten() for f in feats]).std() for i in range(4)]
    for i, block in enumerate(model.backbone.fpn.layer_blocks):
        # The block's last layer: the conv (v1), or the BatchNorm after a bias-free conv (v2).
        rescale_(block[-1], stds[0] * tilt**i / stds[i])  # the 'pool' level follows level 3


@torch.no_grad()
def head_io(model, module, photos):
    """Run the full model on the photos; return `module`'s first input and its outputs.

    Tensors are concatenated over the photos along dim 0 (one row per RoI); the RPN
    head's per-level lists are flattened, which is enough for taking a std.
    """
    got = []
    handle = module.register_forward_hook(lambda m, i, o: got.append((i[0],) + (o if isinstance(o, tuple) else (o,))))
    for x in photos:
        model([x])
    handle.remove()
    flat = lambda t: torch.cat([v.flatten() for v in t]) if isinstance(t, list) else t
    return tuple(torch.cat([flat(g[j]) for g in got]) for j in range(len(got[0])))


@torch.no_grad()
def spread_heads(model, photos, cls_std, bg_gain, rpn_obj_std, rpn_delta_std, box_delta_std):
    """Rescale the heads' last layers to the target output spreads (see HEAD_TARGETS).

    Order matters: the RPN decides which proposals the box head sees, and the detections
    decide what the mask head sees.

    Class logits are centred per class (otherwise the class with the largest random bias
    wins every box), then the background logit is replaced by `bg_gain` times the box
    feature's size (sum of the ReLU'd box_head features, relative to its calibration
    mean). A plain background bias does not work: a random backbone's activations scale
    with image contrast (~2x between these photos), so any fixed offset lets one image
    flood the 100-detection cap while another gets none. Making background grow with the
    same scale keeps most proposals background on every image, with the survivors'
    scores spread above 0.05. Mask logits are centred so masks are neither empty nor
    full at the 0.5 cut.
    """
    rpn = model.rpn.head
    _, obj, deltas = head_io(model, rpn, photos)
    rescale_(rpn.cls_logits, rpn_obj_std / obj.std())
    rescale_(rpn.bbox_pred, rpn_delta_std / deltas.std())

    pred = model.roi_heads.box_predictor
    feats, logits, deltas = head_io(model, pred, photos)
    mean = logits.mean(0)
    rescale_(pred.cls_score, cls_std / (logits - mean).std(), shift=mean)
    pred.cls_score.weight[0] = bg_gain / feats.sum(1).mean()
    pred.cls_score.bias[0] = 0.0
    rescale_(pred.bbox_pred, box_delta_std / deltas.std())

    _, mask_logits = head_io(model, model.roi_heads.mask_predictor, photos)
    rescale_(model.roi_heads.mask_predictor.mask_fcn_logits, 1.0, shift=mask_logits.transpose(0, 1).flatten(1).mean(1))


def round_to_f16(model):
    """f16 copy of the state dict, loaded back into the f32 model. Returns the f16 dict."""
    sd = {k: v.detach().half().contiguous() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    for k, v in sd.items():
        assert torch.isfinite(v).all(), f"{k} overflows f16"
        if k.endswith("running_var"):
            assert (v > 0).all(), f"{k} underflows to 0 in f16"
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    return sd


def build(name):
    """Seeded model -> BN calibration -> head rescaling -> f16 rounding. Returns (model, f16 dict)."""
    cfg = MODELS[name]
    torch.manual_seed(0)
    model = cfg["make"]()
    photos = calibration_photos()
    calibrate_batchnorm(model, photos)
    if "residual_gain" in cfg:
        damp_residuals(model, cfg["residual_gain"])
    if cfg["bn_eps"] == "0.0":
        freeze_batchnorm(model.backbone.body, eps=0.0)
    tilt_fpn(model, photos, FPN_TILT)
    spread_heads(model, photos, **dict(HEAD_TARGETS, **cfg["heads"]))
    return model.eval(), round_to_f16(model)


# cls_std / bg_gain were tuned by hand (see spread_heads) for ~10-100 detections per image.
MODELS = {
    "tiny_r50": dict(make=lambda: tiny_maskrcnn(Bottleneck, [1, 1, 1, 1], 47), bn_eps="1e-05",
                     heads=dict(cls_std=5.0, bg_gain=18.5)),
    # FrozenBatchNorm2d with eps=0 like torchvision's pretrained COCO checkpoint; two
    # blocks in layer1 exercise the non-downsampling block path.
    "tiny_r18": dict(make=lambda: tiny_maskrcnn(BasicBlock, [2, 1, 1, 1], 6), bn_eps="0.0",
                     heads=dict(cls_std=5.0, bg_gain=12.0),
                     labels=["shirt", "pants", "shoe", "bag", "hat"]),
    # ResNet-101's block counts at the tiny widths: same code path as R50, 33 blocks deep.
    # End-to-end references only (stage_refs=False) keep it to a few hundred KB beside the model.
    "tiny_r101": dict(make=lambda: tiny_maskrcnn(Bottleneck, [3, 4, 23, 3], 47), bn_eps="1e-05",
                      heads=dict(cls_std=5.0, bg_gain=18.5), stage_refs=False, residual_gain=0.25),
    "tiny_v2": dict(make=lambda: tiny_maskrcnn_v2(47), bn_eps="1e-05",
                    heads=dict(cls_std=5.0, bg_gain=18.5)),
    "r50": dict(make=lambda: maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=47),
                bn_eps="1e-05", heads=dict(cls_std=5.0, bg_gain=16.0)),
}


def save_file(tensors, path, metadata):
    """safetensors.torch.save_file, made byte-reproducible.

    The library writes the metadata in (random) hash-map order; re-emit its JSON header
    with sorted keys, padded with spaces to the same length (as the format allows).
    """
    blob = safetensors.torch.save(tensors, metadata=metadata)
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    assert len(header) <= n
    Path(path).write_bytes(blob[:8] + header.ljust(n) + blob[8 + n :])


# ----------------------------------------------------------------------------- references
@torch.no_grad()
def reference(model, img):
    """All stage-by-stage torchvision outputs for one image, plus model([img])[0]."""
    rh = model.roi_heads
    image_list, _ = model.transform([img])
    x, sizes = image_list.tensors, image_list.image_sizes
    t = {"images": x, "image_size": torch.tensor(sizes[0], dtype=torch.float32)}
    t.update({f"body.{k}": v for k, v in model.backbone.body(x).items()})
    features = model.backbone(x)
    t.update({f"fpn.{k}": v for k, v in features.items()})
    proposals, _ = model.rpn(image_list, features)
    t["rpn.boxes"] = proposals[0]

    t["box_roi_pool"] = rh.box_roi_pool(features, proposals, sizes)
    # RoIAlign works box by box (FPN level chosen per box), so pooling a prefix of the
    # proposals gives a prefix of the rows: row-trimmed fixtures stay exact.
    assert torch.equal(rh.box_roi_pool(features, [proposals[0][:64]], sizes), t["box_roi_pool"][:64])
    t["box_head"] = rh.box_head(t["box_roi_pool"])
    t["class_logits"], t["box_regression"] = rh.box_predictor(t["box_head"])
    boxes, scores, labels = rh.postprocess_detections(t["class_logits"], t["box_regression"], proposals, sizes)
    t["detections.boxes"], t["detections.scores"], t["detections.labels"] = boxes[0], scores[0], labels[0].float()

    t["mask_roi_pool"] = rh.mask_roi_pool(features, boxes, sizes)
    mask_logits = rh.mask_predictor(rh.mask_head(t["mask_roi_pool"]))
    t["mask_probs"] = maskrcnn_inference(mask_logits, labels)[0]

    # The staged pipeline must be exactly what the end-to-end forward computes.
    staged = {"boxes": boxes[0], "scores": scores[0], "labels": labels[0], "masks": t["mask_probs"]}
    staged = model.transform.postprocess([staged], sizes, [tuple(img.shape[-2:])])[0]
    final = model([img])[0]
    for k in final:
        assert torch.equal(staged[k], final[k]), f"staged {k} differs from model([img])"
    return {k: v.float().contiguous() for k, v in t.items()}, final


# What goes into the committed set, which must stay under ~8 MB. Storing everything for
# the three tiny images would take ~22 MB (mostly `images`, `fpn.*`, RoI features and
# P x 4K box regressions), so only the stage image carries every stage; the other images
# carry the end-to-end outputs plus the proposals (to tell a backbone/RPN mismatch from a
# RoI-heads one). Bulky per-RoI tensors keep only their first rows, and metadata
# `<name>_rois` says how many. This keeps every stage testable from stored inputs:
# box_roi_pool[:n] -> box_head[:n] -> class_logits[:n], box_regression[:n]; the full
# class_logits/box_regression/rpn.boxes -> detections.*; and so on.
STAGE_IMAGE = "landscape"
STAGE_PREFIX_ROWS = {"box_roi_pool": 16, "box_head": 16, "mask_roi_pool": 4}
END_TO_END = ["image_size", "rpn.boxes", "detections.boxes", "detections.scores", "detections.labels", "mask_probs"]
END_TO_END_PREFIX_ROWS = {"mask_probs": 8}


def select(t, complete, stage):
    """Pick the tensors/rows to store; returns (tensors, metadata with the `<name>_rois` counts)."""
    if complete:
        keep, rows = dict(t), dict.fromkeys(STAGE_PREFIX_ROWS)  # all rows, counts still recorded
    elif stage:
        keep, rows = dict(t), STAGE_PREFIX_ROWS
    else:
        keep, rows = {k: t[k] for k in END_TO_END}, END_TO_END_PREFIX_ROWS
    meta = {}
    for name, n in rows.items():
        keep[name] = keep[name][:n].contiguous()
        meta[f"{name}_rois"] = str(len(keep[name]))
    return keep, meta


def final_json(final, height, width):
    """model([img])[0] as JSON; masks binarised at 0.5 and COCO-RLE encoded."""
    instances = []
    for box, score, label, prob in zip(final["boxes"], final["scores"], final["labels"], final["masks"]):
        m = (prob[0] > 0.5).numpy().astype(np.uint8)
        rle = mask_util.encode(np.asfortranarray(m))
        instances.append({
            "label": int(label), "score": float(score), "box": [float(v) for v in box],
            "mask": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": int(m.sum()),
        })
    return {"width": width, "height": height, "instances": instances}


def write_model_fixtures(name, images, outdir, complete):
    """Build the model, write model.safetensors and per-image .safetensors/.json; return the model."""
    cfg = MODELS[name]
    model, f16 = build(name)
    meta = {"bn_eps": cfg["bn_eps"]}
    if name.startswith("tiny"):
        meta.update(min_size=str(model.transform.min_size[-1]), max_size=str(model.transform.max_size))
    if "labels" in cfg:
        meta["labels"] = json.dumps(cfg["labels"])
    d = outdir / name
    d.mkdir(parents=True, exist_ok=True)
    save_file(f16, str(d / "model.safetensors"), metadata=meta)
    for stem, path in images.items():
        img = load_image(path)
        t, final = reference(model, img)
        resized, n_props = [int(v) for v in t["image_size"]], len(t["rpn.boxes"])
        t, tmeta = select(t, complete, stage=stem == STAGE_IMAGE and cfg.get("stage_refs", True))
        save_file(t, str(d / f"{stem}.safetensors"), metadata=tmeta)
        (d / f"{stem}.json").write_text(json.dumps(final_json(final, *img.shape[-2:])) + "\n")
        s = final["scores"]
        print(f"{name}/{stem}: in {list(img.shape[-2:])} resized {resized} proposals {n_props} "
              f"detections {len(s)} labels {sorted(set(final['labels'].tolist()))} "
              + (f"scores {s.min():.3f}..{s.max():.3f} (median {s.median():.3f})" if len(s) else ""))
    return model


def transform_sizes():
    """Resize/pad table from torchvision's GeneralizedRCNNTransform itself (eval mode)."""
    common = [(480, 640), (720, 1280), (1080, 1920), (512, 512), (400, 600), (300, 451), (1, 1000),
              (97, 131), (150, 200), (200, 150), (333, 500), (427, 640), (768, 1024), (1000, 667),
              (600, 400), (640, 480), (1333, 800), (800, 1333), (799, 1201), (37, 2000), (2000, 37), (1001, 1499)]
    rows = []
    for lo, hi in [(800, 1333), (160, 224), (512, 512), (640, 1066), (384, 640)]:
        tf = GeneralizedRCNNTransform(lo, hi, MEAN, STD).eval()
        for h, w in common:
            try:
                il, _ = tf([torch.zeros(3, h, w)])
            except RuntimeError as e:  # e.g. 1x1000 at 160/224 resizes to height 0: leave it out
                print(f"transform_sizes: skipping {h}x{w} at {lo}/{hi}: {e}")
                continue
            rows.append({"in": [h, w], "min_size": lo, "max_size": hi,
                         "resized": [int(v) for v in il.image_sizes[0]], "padded": list(il.tensors.shape[-2:])})
    return rows


# ----------------------------------------------------------------------------- main
def small_set(root):
    torch.set_num_threads(1)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    # The odd size also has odd scaling (97 -> 160 is x1.649) and padding on both axes.
    sources = {"landscape": ("coffee", 200, 150), "portrait": ("astronaut", 150, 200), "odd": ("astronaut", 131, 97)}
    images = {stem: img_dir / f"{stem}.png" for stem in sources}
    for stem, (photo, w, h) in sources.items():
        crop_resize(getattr(skimage.data, photo)(), w, h).save(images[stem])
    for name in ("tiny_r50", "tiny_r18", "tiny_r101", "tiny_v2"):
        write_model_fixtures(name, images, root, complete=False)
    (root / "transform_sizes.json").write_text(json.dumps(transform_sizes(), indent=1) + "\n")


FULL_IMAGES = [("astronaut", 512, 512), ("coffee", 600, 400), ("chelsea", 451, 300), ("rocket", 640, 480)]


def full_images(root):
    return {stem: root / "images" / f"{stem}.png" for stem, _, _ in FULL_IMAGES}


def full_set(root):
    torch.set_num_threads(2)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for stem, w, h in FULL_IMAGES:
        crop_resize(getattr(skimage.data, stem)(), w, h).save(img_dir / f"{stem}.png")  # rocket: 427x640 -> 480x640
    model = write_model_fixtures("r50", full_images(root), root, complete=True)
    time_torchvision(model, root)


@torch.inference_mode()
def time_torchvision(model, root):
    """Median of 3 end-to-end runs (after 1 warm-up) per image on 2 threads -> torchvision_timing.json."""
    torch.set_num_threads(2)
    timing = {}
    for stem, path in full_images(root).items():
        img = load_image(path)
        model([img])
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            model([img])
            runs.append((time.perf_counter() - t0) * 1000)
        timing[stem] = round(statistics.median(runs), 1)
        print(f"torchvision r50 {stem}: {timing[stem]} ms (runs {[round(r) for r in runs]})")
    (root / "r50" / "torchvision_timing.json").write_text(json.dumps(timing, indent=1) + "\n")


def load_r50(root):
    """The --full model back from its f16 file (for --time-only)."""
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=47)
    sd = safetensors.torch.load_file(str(root / "r50" / "model.safetensors"))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    return model.eval()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", metavar="OUTDIR", type=Path, help="write the full ResNet-50-FPN set to OUTDIR instead")
    ap.add_argument("--time-only", action="store_true", help="with --full: only redo torchvision_timing.json "
                    "from the files already in OUTDIR (timings need an otherwise idle machine)")
    args = ap.parse_args()
    if args.time_only and not args.full:
        ap.error("--time-only needs --full OUTDIR")
    if args.time_only:
        time_torchvision(load_r50(args.full), args.full)
    elif args.full:
        full_set(args.full)
    else:
        small_set(REPO / "tests" / "fixtures")
        # Files derived from the tiny model: the bundled demo weights and the torch.save
        # checkpoints the converter tests read (they compare bytes with tiny_r50's weights).
        shutil.copyfile(REPO / "tests" / "fixtures" / "tiny_r50" / "model.safetensors",
                        REPO / "weights" / "drape-tiny-r50.safetensors")
        subprocess.run([sys.executable, str(REPO / "calibration" / "make_checkpoints.py")], check=True)
