"""How H&E-like the teacher's colours are on real dark-field input, for one or more model files.

For every model: stain ``DSD_U/val/darkfield`` (40 tiles the models never
trained on) and compare the teacher outputs' colours with the real H&E tiles
of ``DSD_U/val/stained`` (unpaired: other tissue, same lab):

* sliced Wasserstein distance in Lab (``digital_stain.quality.metrics.stain_style_distance``),
* mean chroma (a, b) of the outputs vs of the real H&E,
* chroma by lightness band (where a colour cast sits),
* how much of the enhanced structure the teacher keeps: correlation of the
  teacher's lightness with the enhanced gray's.

Usage: python benchmarks/teacher_style.py MODEL [MODEL ...] [--data ../shared/data/dsd]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from digital_stain.quality.metrics import lab_pixels, stain_style_distance
from digital_stain.stain.model import StainModel

ROOT = Path(__file__).resolve().parents[1]


def read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="shipped model names or model files")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "dsd")
    args = parser.parse_args()
    val = args.data / "DSD_U" / "val"
    names = sorted(p.name for p in (val / "darkfield").glob("*.png"))
    darkfield = [read(val / "darkfield" / n) for n in names]
    real = np.stack([read(val / "stained" / n) for n in names])
    real_lab = lab_pixels(real)
    print(f"real H&E (DSD_U/val/stained, {len(real)} tiles): mean a {real_lab[:, 1].mean():.1f}, b {real_lab[:, 2].mean():.1f}")
    print()
    print("| model | teacher style distance (Lab SW, lower is better) | enhanced gray distance | mean a | mean b | "
          "b at L 60-70 | b at L 70-80 | lightness corr. with enhanced |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        model = StainModel.load(name)
        outs = [model.stain(x, ["enhanced", "teacher"], precision="fp32") for x in darkfield]
        teacher = np.stack([o["teacher"] for o in outs])
        enhanced = np.stack([np.repeat(o["enhanced"][..., None], 3, -1) for o in outs])
        lab = lab_pixels(teacher)
        bands = [lab[(lab[:, 0] >= lo) & (lab[:, 0] < lo + 10), 2].mean() for lo in (60, 70)]
        gray_lab = lab_pixels(enhanced)
        corr = np.corrcoef(lab[:, 0], gray_lab[:, 0])[0, 1]
        label = Path(name).name if Path(name).exists() else name
        print(f"| {label} | {stain_style_distance(teacher, real):.2f} | {stain_style_distance(enhanced, real):.2f} | "
              f"{lab[:, 1].mean():.1f} | {lab[:, 2].mean():.1f} | {bands[0]:.1f} | {bands[1]:.1f} | {corr:.3f} |")
    print()
    print("Command: `python " + " ".join(["benchmarks/teacher_style.py", *sys.argv[1:]]) + "`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
