"""Nuclei from dark-field alone: Dice and AJI against real instance masks, on synthetic dark-field.

H&E images with nuclei instance masks (``DATA/stained/NAME.png``, ``DATA/masks/NAME.tif``; put
there by ``benchmarks/nuclei_data.py``; no method here was trained on them) are turned into
dark-field by the enhancer's inverse, as ``digital-stain synth`` does (``dsd-unpaired``'s CDFs, the
tint of DSD_U dark-field, blur 1 px, noise 0.003; several noise seeds). Then, against the masks:

* **ceiling**: the H&E segmenter (:func:`digital_stain.nuclei.segment.segment_nuclei`) on the
  real H&E;
* **adaptation**: each model stains the synthetic dark-field (``adapt="auto"``, decided per
  image as the napari widget does) and the segmenter finds the nuclei of its teacher's stain and
  of its student's (:func:`digital_stain.nuclei.find.find_nuclei` with ``stain=``);
* **tutorship**: each model file given by ``--tutorship`` (one with a segmenter, from
  ``digital-stain train-nuclei``; trained on other H&E than these) finds the nuclei from the
  enhanced gray of the synthetic dark-field;
* **floor**: the segmenter on the enhancer's gray of the synthetic dark-field (no colour).

Binary Dice of the nuclei foreground and the aggregated Jaccard index (AJI, instances), the mean
over images and seeds. ``--scale`` resamples the H&E and masks first (area mean / nearest):
the DSD models were trained at a magnification where nuclei are 10-15 px across.

Examples (from the repository root)::

    python benchmarks/nuclei.py --data ../shared/data/nuclei/cellseg-0.1.30
    python benchmarks/nuclei.py --data DIR --scale 1 --models dsd-unpaired-fast --seeds 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DSD_TINT = ROOT.parent / "shared" / "data" / "dsd" / "DSD_U" / "val" / "darkfield"


def load_pairs(data: Path, scale: float) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, H&E uint8, instance labels)`` for every H&E image with a mask, resampled by ``scale``."""
    import tifffile

    from digital_stain.io.images import read_image

    pairs = []
    for path in sorted((data / "stained").glob("*.png")):
        mask_path = data / "masks" / f"{path.stem}.tif"
        if not mask_path.exists():
            continue
        rgb, labels = np.asarray(read_image(path))[..., :3], tifffile.imread(mask_path)
        if scale != 1:
            rgb, labels = resample(rgb, labels, scale)
        pairs.append((path.stem, rgb, labels))
    if not pairs:
        raise SystemExit(f"no H&E with masks in {data} (stained/NAME.png with masks/NAME.tif); see benchmarks/nuclei_data.py")
    return pairs


def resample(rgb: np.ndarray, labels: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    from skimage.transform import resize

    shape = tuple(max(int(round(side * scale)), 1) for side in labels.shape)
    small = resize(rgb, shape, order=1, anti_aliasing=scale < 1, preserve_range=True)
    return np.clip(np.rint(small), 0, 255).astype(np.uint8), resize(labels, shape, order=0, preserve_range=True,
                                                                     anti_aliasing=False).astype(labels.dtype)


def tint_from(folder: Path) -> np.ndarray:
    from digital_stain.io.images import list_images, read_image
    from digital_stain.quality.synth import darkfield_tint

    images = list_images(folder)[:40] if folder.is_dir() else []
    if not images:
        from digital_stain._sample_data import sample_paths

        images = sample_paths("darkfield")
    return darkfield_tint(np.asarray(read_image(path)) for path in images)


def scores(labels: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    from digital_stain.quality.metrics import aggregated_jaccard, dice

    return dice(labels > 0, truth > 0), aggregated_jaccard(labels, truth)


def run(args, pairs: list) -> list[tuple[str, float, float, float]]:
    from digital_stain.core.arrays import to_uint8
    from digital_stain.nuclei.find import find_nuclei, stain_source
    from digital_stain.nuclei.segment import segment_nuclei
    from digital_stain.quality.synth import synthesize_darkfield
    from digital_stain.stain.model import StainModel

    synthesis = StainModel.load("dsd-unpaired", device="cpu")
    tint = tint_from(args.tint_from)
    darkfield = {(name, seed): synthesize_darkfield(rgb, synthesis.enhancer, tint, blur_sigma=1.0, noise_std=0.003,
                                                    rng=np.random.default_rng(seed))
                 for name, rgb, _ in pairs for seed in range(args.seeds)}
    rows = []

    def row(method: str, found: dict) -> None:
        values = [scores(found[key], truth) for key in darkfield for name, _, truth in pairs if name == key[0]]
        rows.append((method, float(np.mean([v[0] for v in values])), float(np.mean([v[1] for v in values])),
                     time.perf_counter() - started))

    started = time.perf_counter()
    real = {name: segment_nuclei(rgb) for name, rgb, _ in pairs}
    row("ceiling: segmenter on the real H&E", {key: real[key[0]] for key in darkfield})
    started = time.perf_counter()
    floor = {}
    for key, image in darkfield.items():
        gray = synthesis.stain(image, ["enhanced"], adapt="auto")["enhanced"]
        floor[key] = segment_nuclei(np.repeat(to_uint8(gray)[..., None], 3, axis=2))
    row("floor: segmenter on the enhanced gray", floor)
    for model_name in args.models:
        model = StainModel.load(model_name, device="cpu")
        for output in ("student", "teacher"):
            if output not in model.outputs:
                continue
            started = time.perf_counter()
            found = {}
            for key, image in darkfield.items():  # the library's adaptation path itself
                found[key] = find_nuclei(model, image, stain=output, adapt="auto").labels
            default = " (the default: `--stain auto`)" if stain_source(model) == output else ""
            row(f"adaptation: {model_name} {output}{default}", found)
    for path in args.tutorship:
        model = StainModel.load(path, device="cpu")
        started = time.perf_counter()
        found = {key: find_nuclei(model, image, method="tutorship", adapt="auto").labels
                 for key, image in darkfield.items()}
        row(f"tutorship: {model.name}", found)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with stained/NAME.png and masks/NAME.tif")
    parser.add_argument("--models", type=lambda text: text.split(","),
                        default=["dsd-unpaired", "dsd-unpaired-fast", "dsd-paired"])
    parser.add_argument("--scale", type=float, default=0.5, help="resample the H&E and masks first (default 0.5)")
    parser.add_argument("--seeds", type=int, default=3, help="noise realisations of each synthetic dark-field")
    parser.add_argument("--tint-from", type=Path, default=DSD_TINT, help="dark-field images whose tint to give")
    parser.add_argument("--tutorship", type=Path, nargs="*", default=[],
                        help="model files holding a tutorship segmenter (digital-stain train-nuclei)")
    args = parser.parse_args(argv)
    pairs = load_pairs(args.data, args.scale)
    rows = run(args, pairs)
    print(f"`python benchmarks/nuclei.py {' '.join(argv if argv is not None else sys.argv[1:])}`: "
          f"{len(pairs)} H&E image(s) of {args.data.name} with {sum(int(len(np.unique(t)) - 1) for _, _, t in pairs)} "
          f"nuclei, scale {args.scale}, {args.seeds} noise seed(s)\n")
    print("| method | Dice ↑ | AJI ↑ | seconds |")
    print("|---|---:|---:|---:|")
    for method, dice_score, aji, seconds in rows:
        print(f"| {method} | {dice_score:.3f} | {aji:.3f} | {seconds:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
