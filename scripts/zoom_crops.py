"""4x zoomed crops of the same dark-field tile stained by several models, side by side (docs/images).

    python scripts/zoom_crops.py --tile ../shared/data/dsd/DSD_U/val/darkfield/0_0.png \\
        --model teacher=dsd-unpaired:teacher --model "student (old)=dsd-unpaired-fast" \\
        --model "student (new)=runs/new.safetensors" --out docs/images/checkerboard-zoom.png

Each ``--model LABEL=MODEL[:OUTPUT]`` (OUTPUT default ``student``) stains the whole tile
(``adapt="off"``, fp32, CPU); a ``--crop``-pixel square at ``--at`` is enlarged ``--zoom``
times by pixel repetition (no smoothing, so a 2-pixel grid stays visible), labelled, and
the panels are joined left to right, with each panel's checkerboard ratios in its label.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from digital_stain.core.arrays import to_uint8
from digital_stain.io.images import read_image
from digital_stain.quality.metrics import checkerboard
from digital_stain.stain.model import StainModel

LABEL_HEIGHT = 34


def panel(image: np.ndarray, at: tuple[int, int], crop: int, zoom: int, label: str) -> Image.Image:
    image = image if image.dtype == np.uint8 else to_uint8(image)
    y, x = at
    patch = image[y:y + crop, x:x + crop]
    big = np.repeat(np.repeat(patch, zoom, axis=0), zoom, axis=1)
    canvas = Image.new("RGB", (big.shape[1], big.shape[0] + LABEL_HEIGHT), "white")
    canvas.paste(Image.fromarray(big), (0, LABEL_HEIGHT))
    grid = checkerboard(image)
    ImageDraw.Draw(canvas).text((4, 2), f"{label}\ncheckerboard {grid[2]:.0f} / {grid[4]:.1f}", fill="black")
    return canvas


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile", type=Path, required=True, help="dark-field image")
    parser.add_argument("--model", action="append", required=True, metavar="LABEL=MODEL[:OUTPUT]")
    parser.add_argument("--reference", type=Path, default=None, help="an H&E image to show last, for scale")
    parser.add_argument("--at", type=int, nargs=2, default=(96, 96), metavar=("Y", "X"))
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--zoom", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    darkfield = read_image(args.tile)
    panels = []
    for item in args.model:
        label, _, spec = item.partition("=")
        name, _, output = spec.partition(":")
        stained = StainModel.load(name, device="cpu").stain(darkfield, [output or "student"], device="cpu",
                                                           precision="fp32", adapt="off")[output or "student"]
        panels.append(panel(stained, args.at, args.crop, args.zoom, label))
    if args.reference is not None:
        panels.append(panel(read_image(args.reference), args.at, args.crop, args.zoom, "real H&E (another tile, for scale)"))
    gap = 6
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    sheet = Image.new("RGB", (width, panels[0].height), "white")
    left = 0
    for p in panels:
        sheet.paste(p, (left, 0))
        left += p.width + gap
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out} ({sheet.width} x {sheet.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
