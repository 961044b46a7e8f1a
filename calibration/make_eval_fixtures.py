#!/usr/bin/env python3
"""Reference numbers for tests/eval.rs, computed with pycocotools (2.0.x):

* coco_gt.json / coco_dt.json: a small synthetic COCO instance set (polygons, multi-part
  polygons, compressed and uncompressed RLE, crowd regions, an image without annotations, a
  category without annotations) and detections (near and far copies, duplicates, score ties,
  hits on crowd regions, more than maxDets=100 in one image and category, a category that is
  not in the ground truth).
* coco_expected.json: COCOeval(iouType="segm") stats[0:3] (AP, AP50, AP75), the same per
  category, and COCOeval's iouThrs/recThrs as repr strings (to compare bit for bit).
* polygons.json: pycocotools' rasterisation (frPyObjects + merge) of a few polygons, as
  uncompressed column-major counts starting with background.
* e2e_gt.json / e2e_train.csv / e2e_expected.json: ground truth for `drape eval` end to end on
  the fixture photos, made from torchvision's own detections of the tiny_r50 fixture model
  (tests/fixtures/tiny_r50/<image>.json, written by make_fixtures.py) that score at least
  E2E_GT_SCORE, as COCO JSON (Fashionpedia category ids, label - 1) and as an iMaterialist
  train.csv; and pycocotools' segm AP of torchvision's full detections against it, which drape's
  detections of the same model must reproduce.

Run from the repo root; output is deterministic:

    /work/venv/bin/python calibration/make_eval_fixtures.py
"""

import json
import pathlib

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "eval"
RNG = np.random.default_rng(2019)


def counts_of(mask):
    """Uncompressed COCO counts of a binary (h, w) mask: column-major, background first."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            run, current = 0, v
        run += 1
    counts.append(run)
    return counts


def rasterise(polygons, h, w):
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, h, w)))


def compressed(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


POLYGON_CASES = [
    # name, height, width, polygons
    ("triangle", 12, 10, [[1.2, 0.7, 8.6, 3.3, 2.4, 10.9]]),
    ("concave", 16, 14, [[1, 1, 12, 1, 12, 4, 5, 4, 5, 14, 1, 14]]),
    ("clipped", 10, 12, [[-3.5, -2.0, 15.2, 3.1, 6.0, 13.7]]),
    ("two_parts", 14, 16, [[0.5, 0.5, 7.5, 0.5, 7.5, 9.5, 0.5, 9.5], [5, 6, 15, 6, 10, 13.4]]),
    ("repeated_vertex", 10, 10, [[2, 2, 2, 2, 8.3, 2.6, 8.3, 2.6, 5.1, 8.8, 2, 2]]),
    ("sub_pixel", 8, 8, [[3.1, 3.1, 3.3, 3.1, 3.2, 3.35]]),
    ("half_coordinates", 9, 11, [[0.5, 0.5, 9.5, 0.5, 9.5, 7.5, 0.5, 7.5]]),
]


def polygon_fixture():
    return [
        {"name": n, "height": h, "width": w, "polygons": p, "counts": counts_of(rasterise(p, h, w))}
        for n, h, w, p in POLYGON_CASES
    ]


def blob(h, w):
    """A random axis-aligned ellipse mask."""
    cy, cx = RNG.uniform(0, h), RNG.uniform(0, w)
    ry, rx = RNG.uniform(2, h / 2.5), RNG.uniform(2, w / 2.5)
    yy, xx = np.mgrid[:h, :w]
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)


def shifted(mask, dy, dx):
    out = np.zeros_like(mask)
    h, w = mask.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = mask[ys, xs]
    return out


def polygon_around(h, w):
    """A random star-shaped polygon inside (roughly) the image."""
    cy, cx = RNG.uniform(h * 0.25, h * 0.75), RNG.uniform(w * 0.25, w * 0.75)
    n = int(RNG.integers(3, 8))
    angles = np.sort(RNG.uniform(0, 2 * np.pi, n))
    radii = RNG.uniform(2, min(h, w) / 2.2, n)
    xy = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
    return [round(float(v), 2) for v in xy.reshape(-1)]


def coco_set():
    # Ids out of order: COCOeval evaluates images sorted by id.
    sizes = {3: (30, 40), 1: (25, 25), 7: (20, 50), 2: (16, 16)}
    images = [{"id": i, "file_name": f"{i:04d}.png", "height": h, "width": w} for i, (h, w) in sizes.items()]
    categories = [{"id": c, "name": f"class {c}"} for c in (1, 2, 3, 4)]
    annotations, masks = [], []

    def add(image_id, category_id, segmentation, mask, iscrowd=0):
        annotations.append({
            "id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
            "segmentation": segmentation, "area": int(mask.sum()), "iscrowd": iscrowd,
            "bbox": [float(v) for v in mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask)))],
        })
        masks.append((image_id, category_id, mask, iscrowd))

    def add_polygons(image_id, category_id, polygons):
        h, w = sizes[image_id]
        add(image_id, category_id, polygons, rasterise(polygons, h, w))

    add_polygons(1, 1, [polygon_around(25, 25)])
    add_polygons(1, 1, [[2, 2, 9, 2, 9, 8, 2, 8]])
    m = blob(25, 25)
    add(1, 2, compressed(m), m)
    crowd = np.zeros((25, 25), np.uint8)
    crowd[12:, 10:] = 1
    add(1, 3, {"size": [25, 25], "counts": counts_of(crowd)}, crowd, iscrowd=1)
    # A real object inside the crowd region, listed after it: COCOeval sorts crowd regions
    # last and stops at them once a real object matched.
    add_polygons(1, 3, [[14, 14, 22, 14, 22, 22, 14, 22]])
    add_polygons(3, 1, [polygon_around(30, 40), polygon_around(30, 40)])
    add_polygons(3, 2, [polygon_around(30, 40)])
    add_polygons(3, 2, [polygon_around(30, 40)])
    add_polygons(3, 3, [polygon_around(30, 40)])
    m = blob(20, 50)
    add(7, 1, compressed(m), m)
    add_polygons(7, 3, [polygon_around(20, 50)])
    crowd = np.zeros((20, 50), np.uint8)
    crowd[:, 30:] = 1
    add(7, 2, {"size": [20, 50], "counts": counts_of(crowd)}, crowd, iscrowd=1)

    detections = []

    def detect(image_id, category_id, mask, score):
        detections.append({"image_id": image_id, "category_id": category_id,
                           "segmentation": compressed(mask), "score": score})

    for image_id, category_id, mask, iscrowd in masks:
        h, w = mask.shape
        if iscrowd:
            # Hits on crowd regions are ignored, however many.
            for _ in range(3):
                detect(image_id, category_id, blob(h, w) & mask, round(float(RNG.uniform(0.2, 0.9)), 2))
            continue
        kind = RNG.choice(["near", "far", "miss", "duplicate"], p=[0.45, 0.25, 0.1, 0.2])
        if kind == "miss":
            continue
        shift = 1 if kind in ("near", "duplicate") else 3
        detect(image_id, category_id, shifted(mask, int(RNG.integers(-shift, shift + 1)),
                                              int(RNG.integers(-shift, shift + 1))),
               round(float(RNG.uniform(0.3, 1.0)), 2))
        if kind == "duplicate":
            detect(image_id, category_id, mask, 0.5)
    # False positives everywhere, including the image without annotations, the category
    # without annotations, and a category COCOeval does not evaluate; 0.5 ties on purpose.
    for image_id, (h, w) in sizes.items():
        for category_id in (1, 2, 3, 4, 9):
            for _ in range(int(RNG.integers(0, 3))):
                detect(image_id, category_id, blob(h, w), float(RNG.choice([0.5, 0.35, 0.8, 0.11])))
    inside_crowd = masks[4][2]
    detect(1, 3, inside_crowd, 0.77)
    detect(1, 3, shifted(inside_crowd, 1, 1), 0.66)
    # More than maxDets=100 in one image and category: the lowest-scoring ones are cut, here
    # an exact hit that would otherwise add recall.
    for k in range(105):
        m = np.zeros((30, 40), np.uint8)
        m[k % 30, (k * 7) % 40] = 1
        detect(3, 1, m, round(0.3 + k * 0.006, 3))
    detect(3, 1, next(m for i, c, m, _ in masks if (i, c) == (3, 1)), 0.02)
    return {"images": images, "annotations": annotations, "categories": categories}, detections


E2E_IMAGES = ["landscape", "odd", "portrait"]
E2E_GT_SCORE = 0.3


def kaggle_rle(mask):
    """iMaterialist's EncodedPixels: 1-indexed column-major 'start length' runs of foreground."""
    flat = np.concatenate([[0], np.asarray(mask, dtype=np.uint8).flatten(order="F"), [0]])
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts, ends = edges[::2], edges[1::2]
    return " ".join(f"{a} {b - a}" for a, b in zip(starts, ends))


def add_gt(annotations, rows, image_id, stem, category, mask):
    h, w = mask.shape
    rle = compressed(mask)
    encoded = {"size": rle["size"], "counts": rle["counts"].encode()}
    annotations.append({
        "id": len(annotations) + 1, "image_id": image_id, "category_id": category,
        "iscrowd": 0, "segmentation": rle, "area": float(mask_utils.area(encoded)),
        "bbox": [float(v) for v in mask_utils.toBbox(encoded)],
    })
    # ClassId with attribute ids, as train.csv has them (drape must ignore them).
    rows.append(f"{stem},{kaggle_rle(mask)},{h},{w},{category}_115_136")


def end_to_end_set():
    root = OUT.parent
    images, annotations, detections, rows = [], [], [], ["ImageId,EncodedPixels,Height,Width,ClassId"]
    for image_id, stem in enumerate(E2E_IMAGES):
        tv = json.loads((root / "tiny_r50" / f"{stem}.json").read_text())
        h, w = tv["height"], tv["width"]
        images.append({"id": image_id, "file_name": f"{stem}.png", "height": h, "width": w})
        for inst in tv["instances"]:
            rle = {"size": [h, w], "counts": inst["mask"]["counts"]}
            category = inst["label"] - 1
            detections.append({"image_id": image_id, "category_id": category,
                               "segmentation": rle, "score": inst["score"]})
            if inst["score"] < E2E_GT_SCORE:
                continue
            mask = mask_utils.decode({"size": [h, w], "counts": rle["counts"].encode()})
            # Ground truth that the detections only partly find, so AP is not trivially 1:
            # every third object is drawn 3 px further right (lower IoU), every fifth is
            # labelled with another class (a miss and a false positive).
            n = len(annotations)
            if n % 3 == 1:
                mask = shifted(mask, 0, 3)
            if n % 5 == 2:
                category = (category + 7) % 46
            add_gt(annotations, rows, image_id, stem, category, mask)
        # An object no detection covers.
        missed = np.zeros((h, w), dtype=np.uint8)
        missed[h // 4: h // 2, w // 4: w // 2] = 1
        add_gt(annotations, rows, image_id, stem, 5, missed)
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": k} for k in range(46)]}
    return gt, detections, "\n".join(rows) + "\n"


def segm_ap(gt_path, dt):
    coco_gt = COCO(str(gt_path))
    ev = COCOeval(coco_gt, coco_gt.loadRes(dt), iouType="segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "polygons.json").write_text(json.dumps(polygon_fixture()) + "\n")

    gt, dt = coco_set()
    gt_path, dt_path = OUT / "coco_gt.json", OUT / "coco_dt.json"
    gt_path.write_text(json.dumps(gt) + "\n")
    dt_path.write_text(json.dumps(dt) + "\n")
    coco_gt = COCO(str(gt_path))
    coco_dt = coco_gt.loadRes(str(dt_path))
    ev = COCOeval(coco_gt, coco_dt, iouType="segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    precision = ev.eval["precision"][:, :, :, 0, 2]  # [T, R, K] at area "all", maxDets 100

    def mean(p):
        p = p[p > -1]
        return float(np.mean(p)) if p.size else None

    per_class = [
        {"class_id": int(c), "ap": mean(precision[:, :, k]), "ap50": mean(precision[0, :, k]),
         "ap75": mean(precision[5, :, k])}
        for k, c in enumerate(ev.params.catIds)
    ]
    expected = {
        "ap": float(ev.stats[0]), "ap50": float(ev.stats[1]), "ap75": float(ev.stats[2]),
        "per_class": [c for c in per_class if c["ap"] is not None],
        "iou_thresholds": [repr(float(v)) for v in ev.params.iouThrs],
        "recall_thresholds": [repr(float(v)) for v in ev.params.recThrs],
    }
    (OUT / "coco_expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote {OUT}: AP {expected['ap']:.4f} AP50 {expected['ap50']:.4f} AP75 {expected['ap75']:.4f}")

    gt, dt, csv = end_to_end_set()
    e2e_gt = OUT / "e2e_gt.json"
    e2e_gt.write_text(json.dumps(gt) + "\n")
    (OUT / "e2e_train.csv").write_text(csv)
    stats = segm_ap(e2e_gt, dt)
    e2e = {"gt_score": E2E_GT_SCORE, "gt_objects": len(gt["annotations"]), "detections": len(dt),
           "mask_ap": float(stats[0]), "mask_ap50": float(stats[1])}
    (OUT / "e2e_expected.json").write_text(json.dumps(e2e, indent=1) + "\n")
    print(f"end to end: {e2e}")


if __name__ == "__main__":
    main()
