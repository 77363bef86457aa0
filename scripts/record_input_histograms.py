"""Add the dark-field channel histograms to a shipped model file that predates them (run once per file).

Model files written before adaptation (``digital_stain.core.adapt``) record the luma histogram of the
dark-field their enhancer was fitted on, not its R, G and B histograms. This recomputes the
histograms from that same folder, checks that the recomputed luma histogram matches the stored
one (the same pixel count; at most 0.1 % of pixels one gray level apart, which is what float32
rounding of the luma on another CPU moves at exact half levels), and rewrites the file with the channel histograms
added and the change recorded in its provenance (``inputs_recorded``: folder, date, previous
checksum). Weights are unchanged (float16 in, float16 out).

    python scripts/record_input_histograms.py src/digital_stain/weights/dsd-unpaired.safetensors \
        ../shared/data/dsd/DSD_U/train/darkfield
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np

from digital_stain.core.enhance import Enhancer
from digital_stain.core.histograms import folder_distribution
from digital_stain.stain.model import StainModel


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("darkfield", type=Path, help="the folder the model's dark-field CDF was fitted on")
    args = parser.parse_args(argv)
    model = StainModel.load(args.model, device="cpu")
    measured, count = folder_distribution(args.darkfield)
    moved = int(np.abs(measured.luma - model.enhancer.darkfield_counts).sum()) // 2
    if measured.pixels != model.enhancer.darkfield.pixels or moved > measured.pixels // 1000:
        print(f"{args.darkfield} is not the folder {args.model.name} was fitted on: {measured.pixels} pixels "
              f"against {model.enhancer.darkfield.pixels}, {moved} in other bins.", file=sys.stderr)
        return 2
    previous = model.checksum
    enhancer = model.enhancer
    model.enhancer = Enhancer(enhancer.darkfield_counts, enhancer.brightfield_counts, measured.channels)
    model.metadata.setdefault("provenance", {})["inputs_recorded"] = {
        "what": "R, G, B histograms of the dark-field the enhancer was fitted on (enhancer.darkfield_channel_counts)",
        "darkfield": str(args.darkfield), "images": count, "luma_pixels_in_other_bins": moved,
        "date": datetime.date.today().isoformat(), "previous_checksum": previous}
    checksum = model.save(args.model, half=True, overwrite=True)
    print(f"{args.model}: {count} images, checksum {previous[:16]} -> {checksum[:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
