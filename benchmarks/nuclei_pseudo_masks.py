"""Masks for tutorship without an annotator: the H&E segmenter's nuclei on real DSD H&E, as training data.

Writes ``OUT/stained/NAME.png`` (links to every ``--every``-th tile of ``DSD_U/train/stained``) and
``OUT/masks/NAME.tif`` (:func:`digital_stain.nuclei.segment.segment_nuclei` of it, uint16), for
``digital-stain train-nuclei --stained OUT/stained --masks OUT/masks``. A segmenter taught by them
learns to find from dark-field what the H&E segmenter finds in H&E (at best its ceiling), at the
DSD's magnification; ``benchmarks/nuclei.py --tutorship MODEL`` then scores it on other H&E::

    python benchmarks/nuclei_pseudo_masks.py --output /tmp/dsd-pseudo
    digital-stain train-nuclei --stained /tmp/dsd-pseudo/stained --masks /tmp/dsd-pseudo/masks \\
        --init dsd-unpaired --tint-from ../shared/data/dsd/DSD_U/train/darkfield -o /tmp/tutor.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
DSD_U_STAINED = ROOT.parent / "shared" / "data" / "dsd" / "DSD_U" / "train" / "stained"


def main(argv=None) -> int:
    import numpy as np
    import tifffile

    from digital_stain.io.images import read_image
    from digital_stain.nuclei.segment import segment_nuclei

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="a new folder")
    parser.add_argument("--stained", type=Path, default=DSD_U_STAINED, help="H&E tiles (default DSD_U/train/stained)")
    parser.add_argument("--every", type=int, default=4, help="take every N-th tile (default 4: 140 of 559)")
    args = parser.parse_args(argv)
    if args.output.exists():
        print(f"{args.output} exists; choose a new folder.", file=sys.stderr)
        return 2
    (args.output / "stained").mkdir(parents=True)
    (args.output / "masks").mkdir()
    counts = []
    for path in sorted(args.stained.glob("*.png"))[:: args.every]:
        labels = segment_nuclei(read_image(path))
        tifffile.imwrite(args.output / "masks" / f"{path.stem}.tif", labels)
        (args.output / "stained" / path.name).symlink_to(path.resolve())
        counts.append(int(labels.max()))
    print(f"{len(counts)} tiles, {np.mean(counts):.1f} nuclei each on average, in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
