"""How far a large image's tiled stain is from its one-pass stain, with statistics from its own tiles or from crops.

    python benchmarks/eager_statistics.py [--models dsd-unpaired-fast,dsd-unpaired] [--side 4096]

An image larger than the statistics pass (``stats_pixels``, 2048² by default) is stained in tiles
normalised with statistics pooled over a sample of it. Since 2026-12-07 the eager path samples a
spread of its own 1024-px (fitted) tiles and keeps their stains; before, it pooled 16 crops of 512 px
and then ran 512-px tiles. Both are compared here with the one-pass stain (exact whole-image
statistics; the reference, made with ``stats_pixels`` raised to the whole image), on a ``--side``
mosaic of real dark-field tiles (DSD_U/val in ``../shared/data/dsd`` when present, else the
package's samples), fp32. Prints the largest, 99.9th-percentile and mean absolute differences in
gray levels (0-255) and the time of each way.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from digital_stain import hostmem

hostmem.own_process()  # as the CLI does: before torch allocates (docs/benchmarks.md, host memory)

import numpy as np

from digital_stain.stain.kernel import StainKernel, to_yxc
from digital_stain.stain.model import StainModel
from digital_stain.stain.settings import StainSettings
from digital_stain.stain.tiling import stats_sample, tiled_apply

sys.path.insert(0, str(Path(__file__).parent))
from throughput import dark_tiles, mosaic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def crops_then_tiles(model: StainModel, image: np.ndarray, stats_pixels: int) -> np.ndarray:
    """The former eager way: statistics pooled over 512-px crops spread over the image, then 512-px tiles."""
    settings = StainSettings(tile=512, precision="fp32", device="cpu", stats_pixels=stats_pixels)
    kernel = StainKernel(model, model.preparation(image), settings)
    student_in = kernel.prep.plane(image, student=True)[1]
    net = model.student
    statistics = kernel.statistics(stats_sample(student_in, net.size_multiple, settings.stats_pixels,
                                                settings.stats_crop, net.min_size))
    out = tiled_apply(kernel.runner("student", statistics), student_in, out_channels=3, tile=settings.tile,
                      overlap=settings.overlap, multiple=net.size_multiple, min_size=net.min_size)
    return to_yxc(out, clip=True)


def gray_levels(stain: np.ndarray, reference: np.ndarray) -> tuple[float, float, float]:
    difference = np.abs(stain.astype(np.float64) - reference) * 255.0
    return float(difference.max()), float(np.percentile(difference, 99.9)), float(difference.mean())


def levels(value: float) -> str:
    """Two decimals, or two significant figures where two decimals would print a small difference as 0."""
    return f"{value:.2f}" if value >= 0.01 or value == 0 else f"{value:.1e}"


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="dsd-unpaired-fast,dsd-unpaired")
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--stats-pixels", type=int, default=StainSettings.stats_pixels)
    parser.add_argument("--tile", type=int, default=StainSettings.tile, help="our tile side (default %(default)s)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/dsd")
    args = parser.parse_args(argv)

    tiles, source = dark_tiles(args.data)
    image = mosaic(tiles, args.side)
    print(f"a {args.side}² mosaic of {source}; fp32, CPU; differences from the one-pass stain in gray levels (0-255)\n")
    print("| student | statistics from | tiles | largest | 99.9th pct | mean | time |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name in args.models.split(","):
        model = StainModel.load(name)
        whole = args.side * args.side + 1
        reference, seconds = timed(lambda: model.stain(image, ["student"], precision="fp32", device="cpu",
                                                       stats_pixels=whole)["student"])
        print(f"| `{name}` | the whole image (reference) | one pass | 0 | 0 | 0 | {seconds:.1f} s |")
        ours, seconds = timed(lambda: model.stain(image, ["student"], precision="fp32", device="cpu",
                                                  stats_pixels=args.stats_pixels, tile=args.tile)["student"])
        print(f"| `{name}` | its own tiles, kept (default) | {args.tile} px, fitted | "
              + " | ".join(map(levels, gray_levels(ours, reference))) + f" | {seconds:.1f} s |")
        former, seconds = timed(lambda: crops_then_tiles(model, image, args.stats_pixels))
        print(f"| `{name}` | 16 crops of 512 px (before) | 512 px, fitted | "
              + " | ".join(map(levels, gray_levels(former, reference))) + f" | {seconds:.1f} s |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
