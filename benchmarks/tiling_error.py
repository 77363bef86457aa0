"""Tiled vs one-pass staining: how large is the difference, and where (seams)?

Stains a 768 x 768 mosaic of the shipped dark-field tiles with a random-weight
instance-norm generator (the machinery, not a stain: the student ships in a
later release) in one pass and in 256-pixel tiles with several overlaps, with
norm statistics frozen on the whole image (what ``StainModel`` does) and,
for comparison, recomputed per tile (plain instance norm). Prints the maximum
and mean absolute difference (values in [0, 1]) and the seam ratio: gradient
energy of the difference at tile borders divided by elsewhere (about 1: no seam).

Usage: python benchmarks/tiling_error.py [--width 16] [--blocks 4]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from digital_stain._sample_data import sample_paths
from digital_stain.core.enhance import Enhancer
from digital_stain.stain.model import StainModel
from digital_stain.stain.settings import StainSettings
from digital_stain.stain.tiling import tile_starts, tiled_apply


def seam_ratio(diff: np.ndarray, starts: list[int], tile: int) -> float:
    energy = np.abs(np.diff(diff, axis=1)).mean(axis=(0, 2))
    border = np.zeros(len(energy), bool)
    for edge in {s + tile for s in starts} | set(starts):
        if 0 < edge < len(energy):
            border[max(edge - 2, 0) : edge + 1] = True
    return float(energy[border].mean() / energy[~border].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    from digital_stain.core.nets import ResnetGenerator

    tile = np.asarray(Image.open(sample_paths("darkfield")[0]).convert("RGB"))
    mosaic = np.tile(tile, (3, 3, 1))
    flat = np.ones(4096, np.int64)
    model = StainModel(Enhancer(flat, flat), None, ResnetGenerator(4, 3, args.width, args.blocks))
    one_pass = model.stain(mosaic, ["student"], tile=1024, precision="fp32")["student"]
    starts = tile_starts(768, 256, 0)
    print(f"generator width {args.width}, {args.blocks} blocks, random weights; 768 x 768, tiles of 256")
    print("| overlap | statistics | max abs diff | mean abs diff | seam ratio |")
    print("|---:|---|---:|---:|---:|")
    for overlap in (32, 64, 96, 128):
        # an image within stats_pixels is stained in one pass whatever the tile; one pixel fewer tiles it, with
        # statistics recorded on one crop of 768 px: the whole image
        settings = StainSettings(tile=256, overlap=overlap, precision="fp32", stats_pixels=768 * 768 - 1,
                                 stats_crop=768)
        tiled = model.stain(mosaic, ["student"], settings=settings)["student"]
        diff = tiled - one_pass
        starts = tile_starts(768, 256, overlap)
        print(f"| {overlap} | frozen, whole image | {np.abs(diff).max():.2g} | {np.abs(diff).mean():.2g} | "
              f"{seam_ratio(diff, starts, 256):.2f} |")
    # per-tile statistics: what naive tiling of an instance-norm network does
    student_in = model.enhancer(mosaic)[None] * 2 - 1
    student_in = np.concatenate([(mosaic.transpose(2, 0, 1) / 255.0) * 2 - 1, student_in]).astype(np.float32)
    # called without statistics, the student normalises every tile by its own
    naive = tiled_apply(lambda x: (model.student(x) + 1) / 2, student_in, out_channels=3, tile=256, overlap=96,
                        multiple=4).transpose(1, 2, 0)
    diff = naive - one_pass
    print(f"| 96 | per tile (plain instance norm) | {np.abs(diff).max():.2g} | {np.abs(diff).mean():.2g} | "
          f"{seam_ratio(diff, tile_starts(768, 256, 96), 256):.2f} |")
    print("\nCommand: `python benchmarks/tiling_error.py" + f" --width {args.width} --blocks {args.blocks}`")


if __name__ == "__main__":
    main()
