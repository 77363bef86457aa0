"""Pairing "auto": the edge agreement of adjacent sections against same-named unpaired tiles (train/pairing.py).

``fine_tune(paired="auto")`` trains paired when the dark-field and H&E folders pair by name and
size *and* the tissue of the pairs agrees: the median edge agreement of up to 16 pairs is at least
``AGREEMENT`` and exceeds the median of the same pairs with the H&E turned half a turn by
``MARGIN``. This prints what those thresholds were set on: per pair, the agreement of DSD_P's
adjacent sections and of DSD_U's same-named unpaired tiles (train and val), with the half-turn
baseline of each; then the decision ``detect_pairs`` makes on random folders of 1 to 16 pairs of
each (how often it says "paired"), and on DSD_P pairs pushed further apart by a shift.

Example (from the repository root; about a minute on 2 CPU cores)::

    python benchmarks/pairing.py > benchmarks/results/pairing.md
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

from digital_stain.train.data import ImageSet, load_rgb_folder
from digital_stain.train.pairing import AGREEMENT, MARGIN, detect_pairs, edge_agreement

ROOT = Path(__file__).resolve().parents[1]
SETS = {"DSD_P/train (adjacent sections)": "DSD_P/train", "DSD_U/train (same names, other tissue)": "DSD_U/train",
        "DSD_U/val (same names, other tissue)": "DSD_U/val"}


def load(folder: Path, limit: int):
    dark = load_rgb_folder(folder / "darkfield", min_side=1, kind="dark-field")
    hne = load_rgb_folder(folder / "stained", min_side=1, kind="H&E")
    partner = dict(zip(hne.names, hne.images))
    step = max(1, len(dark.names) // limit)
    return [(n, d, partner[n]) for n, d in zip(dark.names[::step], dark.images[::step]) if n in partner]


def per_pair(pairs) -> tuple[list, list]:
    return ([edge_agreement(d, s) for _, d, s in pairs], [edge_agreement(d, np.rot90(s, 2)) for _, d, s in pairs])


def decisions(pairs, n: int, draws: int, rng) -> float:
    said = 0
    for _ in range(draws):
        chosen = [pairs[i] for i in rng.choice(len(pairs), min(n, len(pairs)), replace=False)]
        dark = ImageSet(None, [d for _, d, _ in chosen], [name for name, _, _ in chosen])
        hne = ImageSet(None, [s for _, _, s in chosen], [name for name, _, _ in chosen])
        said += detect_pairs(dark, hne).paired
    return said / draws


def shifted(pairs, pixels: int):
    return [(n, d, np.roll(s, (pixels, pixels), axis=(0, 1))) for n, d, s in pairs]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/dsd")
    parser.add_argument("--limit", type=int, default=120, help="pairs read per set (evenly spread by name)")
    parser.add_argument("--draws", type=int, default=100, help="random folders per size")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"Command: `python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:] if argv is None else argv)}`\n")
    print(f"Thresholds: median agreement >= {AGREEMENT}, and >= the half-turn median + {MARGIN}.\n")
    print("| set | pairs | agreement: 1st / 10th / 50th / 90th pct | half-turn: 50th / 99th pct |")
    print("|---|---:|---|---|")
    loaded = {}
    for label, sub in SETS.items():
        if not (args.data / sub / "stained").is_dir():
            continue
        loaded[label] = pairs = load(args.data / sub, args.limit)
        agree, turned = per_pair(pairs)
        a, t = np.percentile(agree, [1, 10, 50, 90]), np.percentile(turned, [50, 99])
        print(f"| {label} | {len(pairs)} | {' / '.join(f'{v:.3f}' for v in a)} | {t[0]:.3f} / {t[1]:.3f} |")
    print("\n| set | folder of n pairs: said \"paired\" in n = 1 / 2 / 4 / 16 |")
    print("|---|---|")
    for label, pairs in loaded.items():
        rates = [decisions(pairs, n, args.draws, rng) for n in (1, 2, 4, 16)]
        print(f"| {label} | {' / '.join(f'{r:.0%}' for r in rates)} |")
    adjacent = next((p for label, p in loaded.items() if label.startswith("DSD_P")), None)
    if adjacent is not None:
        print("\n| DSD_P sections shifted further by (px, px) | median agreement | folder of 16 said \"paired\" |")
        print("|---|---:|---:|")
        for pixels in (0, 4, 8, 16, 32):
            moved = shifted(adjacent, pixels)
            print(f"| {pixels} | {np.median(per_pair(moved)[0]):.3f} | {decisions(moved, 16, 20, rng):.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
