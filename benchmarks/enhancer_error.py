"""How closely the package's enhancer reproduces the authors' enhanced images.

Fits :meth:`digital_stain.core.enhance.Enhancer.from_folders` on a training
folder's ``darkfield/`` and ``stained/`` and reports the mean absolute error,
in gray levels (0-255), of the enhanced output (float [0, 1] times 255, not
rounded) against the authors' enhanced images (8-bit gray):

* DSD_U: fit on ``DSD_U/train``, compare ``DSD_U/val/enhanced`` with the
  enhancement of ``DSD_U/val/darkfield`` (same file names);
* DSD_P: fit on ``DSD_P/train``, compare ``DSD_P/train/enhanced`` (the authors
  released it for the first 40 training images) with the enhancement of the
  ``DSD_P/train/darkfield`` image of the same name.

It also reports the *oracle* floor: the MAE of the look-up table of the 8-bit
dark-field luma that is best for exactly these compared images (for each luma
level, the median of the authors' values at the pixels of that level). Any
dataset-level table of the luma, however it is fitted, keeps at least this
error. The oracle is fitted in-sample, so it is optimistic by construction.

Usage (from the repository root)::

    python benchmarks/enhancer_error.py [--data ../shared/data/dsd]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from digital_stain.core.enhance import Enhancer, luma_unit
from digital_stain.io.images import list_images, read_image

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "dsd"

# (data set, folder fitted on, folder compared, first how many compared)
CASES = (
    ("DSD_U", "DSD_U/train", "DSD_U/val", None),
    ("DSD_P", "DSD_P/train", "DSD_P/train", 40),
)


def pairs(folder: Path, limit: int | None) -> list[tuple[Path, Path]]:
    """(darkfield, authors' enhanced) files of the same name, sorted by name."""
    enhanced = list_images(folder / "enhanced")
    out = []
    for path in enhanced:
        dark = folder / "darkfield" / path.name
        if not dark.exists():
            raise SystemExit(f"{path} has no dark-field image of the same name ({dark}).")
        out.append((dark, path))
    if limit is not None:
        out = out[:limit]
    if not out:
        raise SystemExit(f"no enhanced images in {folder / 'enhanced'}.")
    return out


def evaluate(data: Path, name: str, fit_on: str, compare_in: str, limit: int | None) -> dict:
    t0 = time.perf_counter()
    train = data / fit_on
    enhancer = Enhancer.from_folders(train / "darkfield", train / "stained")
    fit_s = time.perf_counter() - t0

    errors, levels, targets = [], [], []
    files = pairs(data / compare_in, limit)
    for dark_path, enh_path in files:
        dark = read_image(dark_path)
        target = np.asarray(read_image(enh_path))
        if target.ndim == 3:  # an RGB copy of a gray image: take one channel
            target = target[..., 0]
        ours = enhancer(dark).astype(np.float64) * 255.0
        if ours.shape != target.shape:
            raise SystemExit(f"{dark_path}: enhanced shape {ours.shape} but the authors' is {target.shape}.")
        errors.append(np.abs(ours - target.astype(np.float64)).ravel())
        # 8-bit luma level of the dark-field, the quantity the authors' table is indexed by
        levels.append(np.round(luma_unit(dark) * 255.0).astype(np.int64).ravel())
        targets.append(target.astype(np.float64).ravel())

    err = np.concatenate(errors)
    level = np.concatenate(levels)
    target = np.concatenate(targets)

    # oracle: per luma level, the median of the authors' values (the L1-best table value)
    table = np.full(256, np.nan)
    for lv in np.unique(level):
        table[lv] = np.median(target[level == lv])
    oracle_err = np.abs(table[level] - target)
    used = table[~np.isnan(table)]
    # the authors' table inverts brightness: dark-field bright -> enhanced dark
    monotone = bool(np.all(np.diff(used) <= 0) or np.all(np.diff(used) >= 0))

    return {
        "name": name,
        "fit_on": fit_on,
        "compare": f"{compare_in}/enhanced" + (f" (first {limit})" if limit else ""),
        "images": len(files),
        "mae": float(err.mean()),
        "p99": float(np.percentile(err, 99)),
        "oracle": float(oracle_err.mean()),
        "oracle_monotone": monotone,
        "fit_s": fit_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help=f"DSD data root holding DSD_U/ and DSD_P/ (default: {DEFAULT_DATA})")
    args = parser.parse_args(argv)
    data = args.data.expanduser().resolve()
    if not data.is_dir():
        print(f"data root {data} not found; give it with --data.", file=sys.stderr)
        return 2

    rows = []
    for name, fit_on, compare_in, limit in CASES:
        print(f"[enhancer_error] {name}: fitting on {fit_on} ...", file=sys.stderr, flush=True)
        rows.append(evaluate(data, name, fit_on, compare_in, limit))

    print("| data set | fitted on | compared with | images | MAE (gray levels) | 99th pct abs. error | oracle MAE (floor) | oracle table monotone |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['name']} | {r['fit_on']} | {r['compare']} | {r['images']} | {r['mae']:.2f} | "
              f"{r['p99']:.1f} | {r['oracle']:.2f} | {'yes' if r['oracle_monotone'] else 'no'} |")
    print()
    print("MAE: |ours*255 - authors'| over all pixels (ours not rounded). Oracle: per 8-bit dark-field luma level, "
          "the median of the authors' values, fitted on the compared images themselves; any dataset-level "
          "table of the luma keeps at least this error.")
    print()
    print("Command: `" + " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]) + "`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
