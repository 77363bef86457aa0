"""Is a student's structure gap a change of tone or of edges? Structure score before and after tone matching.

For each DSD_U/val dark-field tile, each model's student (and teacher) gray is remapped onto the
enhanced image's histogram (``skimage.exposure.match_histograms``, a monotone map per image), and
the structure score (``digital_stain.quality.metrics.structure_score``) is computed again. A gap that
closes under the remapping is global tone; one that stays is local: edges moved, added or smoothed.

    OMP_NUM_THREADS=1 python benchmarks/structure_tone.py [--models dsd-unpaired dsd-unpaired-fast ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from skimage.exposure import match_histograms

from digital_stain.core.color import luma
from digital_stain.quality.evaluate import as_rgb_uint8
from digital_stain.quality.metrics import structure_score
from digital_stain.stain.model import StainModel
from digital_stain.train.data import load_rgb_folder

ROOT = Path(__file__).resolve().parents[1]


def scores(model: StainModel, darkfield: list, output: str) -> tuple[float, float]:
    """Mean structure score of ``output`` as stained, and after matching its gray's histogram to the enhanced image."""
    raw, matched = [], []
    for image in darkfield:
        outs = model.stain(image, ["enhanced", output])
        enhanced, stained = outs["enhanced"], as_rgb_uint8(outs[output])
        raw.append(structure_score(stained, enhanced))
        gray = match_histograms(luma(stained / 255.0), enhanced)
        matched.append(structure_score(np.repeat(gray[..., None], 3, -1).clip(0, 1), enhanced))
    return float(np.mean(raw)), float(np.mean(matched))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/dsd/DSD_U/val/darkfield")
    parser.add_argument("--models", nargs="+", default=["dsd-unpaired", "dsd-unpaired-fast"])
    args = parser.parse_args(argv)
    darkfield = load_rgb_folder(args.data, min_side=1, kind="dark-field").images
    print(f"{len(darkfield)} dark-field tiles from {args.data}\n")
    print("| model | output | structure ↑ | after tone matching ↑ |\n|---|---|---:|---:|")
    for name in args.models:
        model = StainModel.load(name, device="cpu")
        for output in ("teacher", "student"):
            raw, matched = scores(model, darkfield, output)
            print(f"| {name} | {output} | {raw:.3f} | {matched:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
