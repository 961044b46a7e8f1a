#!/usr/bin/env python3
"""Writes the bundled replay frames (tests/fixtures/frames/): a slow pan across scikit-image's
sample photos at 320x240, as a stand-in camera for tests, `drape run` and the demo.

    python calibration/make_frames.py
"""
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "frames"
SIZE = (320, 240)
STEPS = 4


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    n = 0
    for photo in (data.astronaut(), data.coffee(), data.chelsea()):
        img = Image.fromarray(np.asarray(photo)).convert("RGB")
        # Crop a 4:3 window and pan it across the photo, like a person moving past a mirror.
        h = img.height
        w = min(img.width, h * 4 // 3)
        for i in range(STEPS):
            x = (img.width - w) * i // max(STEPS - 1, 1)
            frame = img.crop((x, 0, x + w, h)).resize(SIZE, Image.BILINEAR)
            frame.save(OUT / f"frame_{n:03d}.jpg", quality=85)
            n += 1
    print(f"wrote {n} frames to {OUT}")


if __name__ == "__main__":
    main()
