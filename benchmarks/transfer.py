"""Other microscopes: the DSD_U models on DSD_P dark-field, zero-shot (with and without adaptation) and fine-tuned.

DSD_P is the same lab's second dark-field set-up (about 9x brighter than DSD_U, pinker H&E),
"another microscope" for the models trained on DSD_U. A held-out split of DSD_P/train pairs is
carved by a salted hash of the file names (about 15 %; never trained on here) and every method
stains its dark-field, scored against the adjacent H&E sections (PSNR, SSIM, nuclei Dice; the
sections are misaligned at the pixel level, so compare rows, not absolute values):

* zero-shot, ``adapt="off"``: the model as it was, on DSD_P;
* zero-shot, ``adapt="auto"``, decided once for the held-out folder (as ``digital-stain stain
  FOLDER`` does), and decided per image (as the napari widget stains one image);
* after ``fine_tune`` on the rest of DSD_P/train (timed): with its defaults, which find that the
  folders hold adjacent sections and train paired (Learning to Align), and forced unpaired
  (``paired=False``), the folders used as unpaired H&E;
* ``dsd-paired`` on the same split, for scale (trained on DSD_P/train pairs outside its own 10 %
  selection split, so it has seen most of this split: optimistic).

Then a synthetic shift: 16 DSD_U/val dark-field tiles under a gain (x4 to x10), a gamma (0.5 to 2)
and a tint, stained with adaptation, compared with the stain of the unshifted images (PSNR and the
Lab colour distance between the two stains, and the structure score of the shifted stain
against the unshifted enhanced image), with ``adapt="off"`` beside it. Last, the distances
behind ``auto``'s threshold: same-microscope inputs of 1 to 32 tiles, DSD_P and the shifts.

Examples (from the repository root; the fine-tunes take about 20 min each on 2 CPU cores)::

    python benchmarks/transfer.py > benchmarks/results/transfer-cpu.md
    python benchmarks/transfer.py --models dsd-unpaired-fast --skip-finetune --limit 8   # a quick look
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import shutil
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from digital_stain.quality import metrics
from digital_stain.core.adapt import distance, threshold
from digital_stain.core.arrays import value_scaling
from digital_stain.quality.evaluate import as_rgb_uint8
from digital_stain.core.histograms import measure
from digital_stain.stain.model import StainModel
from digital_stain.train.data import load_rgb_folder

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = 0.15


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def held_out(name: str, fraction: float | None = None) -> bool:
    """The benchmark's split (``HELD_OUT``): a hash salted so that it is independent of the training's own split."""
    return zlib.crc32(f"transfer:{name}".encode()) % 1000 < (HELD_OUT if fraction is None else fraction) * 1000


def split_pairs(root: Path, workdir: Path, limit: int | None):
    """The held-out pairs (arrays) and, as folders of links, the rest of DSD_P/train for fine-tuning."""
    dark = load_rgb_folder(root / "darkfield", min_side=1, kind="dark-field")
    hne = load_rgb_folder(root / "stained", min_side=1, kind="H&E")
    by_name = dict(zip(hne.names, hne.images))
    test = [(n, im, by_name[n]) for n, im in zip(dark.names, dark.images) if held_out(n)][:limit]
    train = workdir / "train"
    for kind in ("darkfield", "stained"):
        folder = train / kind
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name in dark.names:
            if not held_out(name):
                (folder / name).symlink_to((root / kind / name).resolve())
    return test, train / "darkfield", train / "stained"


def scores(stains: list, references: list) -> dict:
    stains = [as_rgb_uint8(s) for s in stains]
    return {"psnr": float(np.mean([metrics.psnr(s, r) for s, r in zip(stains, references)])),
            "ssim": float(np.mean([metrics.ssim(s, r) for s, r in zip(stains, references)])),
            "dice": float(np.mean([metrics.nuclei_dice(s, r) for s, r in zip(stains, references)]))}


def stain_set(model: StainModel, images: list, adapt, outputs) -> dict:
    """Every output of every image; ``adapt`` is a mode decided per image, or ``"folder"`` (one decision for all)."""
    decided = model.adaptation(images, "auto") if adapt == "folder" else adapt
    produced = {o: [] for o in outputs}
    for image in images:
        result = model.stain(image, outputs, adapt=decided)
        for o in outputs:
            produced[o].append(result[o])
    return produced


def row(label: str, values: dict) -> str:
    return f"| {label} | {values['psnr']:.2f} | {values['ssim']:.3f} | {values['dice']:.3f} |"


def zero_shot(models: list[str], test, paired_model: str) -> list[str]:
    images, references = [t[1] for t in test], [t[2] for t in test]
    rows = ["| method | PSNR ↑ | SSIM ↑ | nuclei Dice ↑ |", "|---|---|---|---|"]
    for name in models:
        model = StainModel.load(name, device="cpu")
        decided = model.adaptation(images, "auto")
        _log(f"{name} on the held-out folder: {decided.message(name)}")
        for adapt, label in (("off", "adapt off"), ("folder", "adapt auto, folder"), ("auto", "adapt auto, per image")):
            t0 = time.time()
            produced = stain_set(model, images, adapt, model.outputs)
            for output in model.outputs:
                rows.append(row(f"`{name}` {output}, {label}", scores(produced[output], references)))
            _log(f"  {name} {label}: {time.time() - t0:.0f} s")
    paired = StainModel.load(paired_model, device="cpu")
    produced = stain_set(paired, images, "folder", paired.outputs)
    for output in paired.outputs:
        rows.append(row(f"`{paired_model}` {output} (for scale)", scores(produced[output], references)))
    return rows


def fine_tuned(models: list[str], test, dark_dir: Path, hne_dir: Path, workdir: Path, steps, teacher_steps,
               pairings=("defaults", "unpaired")) -> list[str]:
    from digital_stain.train.finetune import fine_tune

    images, references = [t[1] for t in test], [t[2] for t in test]
    rows = ["| method | PSNR ↑ | SSIM ↑ | nuclei Dice ↑ | minutes | check |", "|---|---|---|---|---|---|"]
    for name, (label, paired) in itertools.product(models, [p for p in PAIRINGS if p[0] in pairings]):
        tag = f"{name}-dsdp-{label.split()[0]}"
        t0 = time.time()
        result = fine_tune(name, dark_dir, hne_dir, device="cpu", steps=steps, teacher_steps=teacher_steps,
                           checkpoint=workdir / f"{tag}.ckpt.safetensors", resume=True, paired=paired,
                           on_note=_log, progress=lambda p: p.message and _log(f"  [{p.stage}] {p.message}"))
        minutes = (time.time() - t0) / 60
        _log(f"{name} ({label}): fine-tuned in {minutes:.1f} min; {result.summary}")
        if result.model is None:
            continue
        result.model.save(workdir / f"{tag}.safetensors", overwrite=True)
        mode = result.model.metadata["provenance"]["student"]["mode"]
        produced = stain_set(result.model, images, "folder", result.model.outputs)
        verdict = "passed" if result.accepted else "FAILED: " + "; ".join(result.check.reasons)
        for output in result.model.outputs:
            values = scores(produced[output], references)
            rows.append(row(f"`{name}` fine-tuned, {label} (trained {mode}): {output}", values)
                        + f" {minutes:.1f} | {verdict} |")
    return rows


# the default (pairing detected: these folders hold adjacent sections) and the folders forced unpaired
PAIRINGS = (("defaults", "auto"), ("unpaired", False))


def shift(image: np.ndarray, gain: float, gamma: float, tint: tuple) -> np.ndarray:
    unit = image.astype(np.float64) / 255.0 * gain * np.asarray(tint)
    return np.round(255 * np.clip(unit, 0, 1) ** gamma).astype(np.uint8)


SHIFT_IMAGES = 16  # DSD_U/val tiles under each synthetic shift (the first, by name)
SHIFTS = [(4, 1.0, (1, 1, 1)), (10, 1.0, (1, 1, 1)), (1, 0.5, (1, 1, 1)), (1, 2.0, (1, 1, 1)),
          (6, 0.8, (1.2, 1.0, 0.8)), (4, 1.5, (0.8, 1.0, 1.25))]


def synthetic_shift(models: list[str], data: Path, limit: int | None) -> list[str]:
    from digital_stain.quality.metrics import lab_pixels, sliced_wasserstein, structure_score

    val = load_rgb_folder(data / "DSD_U/val/darkfield", min_side=1, kind="dark-field").images[:limit or SHIFT_IMAGES]
    rows = ["| model, output | gain, gamma, tint | adapt | PSNR to unshifted ↑ | colour distance ↓ | structure ↑ |",
            "|---|---|---|---|---|---|"]
    for name in models:
        model = StainModel.load(name, device="cpu")
        plain = stain_set(model, val, "off", model.outputs)
        for gain, gamma, tint in SHIFTS:
            shifted = [shift(im, gain, gamma, tint) for im in val]
            for adapt in ("folder", "off"):
                produced = stain_set(model, shifted, adapt, model.outputs)
                for output in ("teacher", "student"):
                    a, b = [as_rgb_uint8(x) for x in produced[output]], [as_rgb_uint8(x) for x in plain[output]]
                    psnr = np.mean([metrics.psnr(x, y) for x, y in zip(a, b)])
                    colour = sliced_wasserstein(lab_pixels(np.stack(a)), lab_pixels(np.stack(b)))
                    structure = np.mean([structure_score(x, e) for x, e in zip(a, plain["enhanced"])])
                    label = "auto (folder)" if adapt == "folder" else "off"
                    rows.append(f"| `{name}` {output} | x{gain}, γ {gamma}, {tint} | {label} | {psnr:.2f} | "
                                f"{colour:.2f} | {structure:.3f} |")
        _log(f"  synthetic shift, {name}: done")
    return rows


def calibration(data: Path, models: dict, limit: int | None) -> list[str]:
    """Distances of same-microscope inputs of 1..32 tiles, of DSD_P, and of the shifts, against ``auto``'s threshold."""
    rng = np.random.default_rng(0)
    rows = ["| model | input | tiles | distance: median / 99th pct / max | threshold |", "|---|---|---|---|---|"]
    for name, folder in models.items():
        model = StainModel.load(name, device="cpu")
        tiles = load_rgb_folder(folder, min_side=1, kind="dark-field").images
        parts = [measure(t, value_scaling(t)) for t in tiles]
        for n in (1, 2, 4, 8, 16, 32):
            if n > len(parts):
                break
            values = []
            for _ in range(200 if n > 1 else 1):
                chosen = rng.choice(len(parts), n, replace=False) if n > 1 else None
                pool = [parts[i] for i in chosen] if n > 1 else None
                if n == 1:
                    values = [distance(p, model.enhancer.darkfield) for p in parts]
                    break
                total = pool[0]
                for p in pool[1:]:
                    total = total + p
                values.append(distance(total, model.enhancer.darkfield))
            q = np.percentile(values, [50, 99, 100])
            rows.append(f"| `{name}` | {folder.relative_to(data)} | {n} | {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f} | "
                        f"{threshold(n * 256 * 256):.3f} |")
    name = next(iter(models))  # the DSD_U model: another microscope's tiles and shifted folders against it
    unpaired = StainModel.load(name, device="cpu")
    other = load_rgb_folder(data / "DSD_P/train/darkfield", min_side=1, kind="dark-field").images
    per_tile = [distance(measure(t, value_scaling(t)), unpaired.enhancer.darkfield) for t in other]
    rows.append(f"| `{name}` | DSD_P/train/darkfield, each tile | 1 | {np.median(per_tile):.3f} / "
                f"{np.percentile(per_tile, 1):.3f} (1st pct) / {min(per_tile):.3f} (min) | {threshold(65536):.3f} |")
    val = load_rgb_folder(data / "DSD_U/val/darkfield", min_side=1, kind="dark-field").images[:limit]
    for gain, gamma, tint in [(1.5, 1.0, (1, 1, 1)), (2, 1.0, (1, 1, 1)), *SHIFTS]:
        shifted = [shift(im, gain, gamma, tint) for im in val]
        decided = unpaired.adaptation(shifted, "auto")
        rows.append(f"| `{name}` | DSD_U/val x{gain}, γ {gamma}, tint {tint}, folder | {len(val)} | "
                    f"{decided.distance:.3f} | {decided.threshold:.3f} |")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/dsd")
    parser.add_argument("--models", default="dsd-unpaired,dsd-unpaired-fast")
    parser.add_argument("--paired-model", default="dsd-paired")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs/transfer")
    parser.add_argument("--steps", type=int, default=None, help="student steps of the fine-tune (default: fine_tune's)")
    parser.add_argument("--teacher-steps", type=int, default=None, help="teacher steps (default: fine_tune's)")
    parser.add_argument("--skip-finetune", action="store_true")
    parser.add_argument("--pairings", default="defaults,unpaired",
                        help="which fine-tunes: defaults (pairing detected), unpaired (forced), or both")
    parser.add_argument("--only", choices=("zero-shot", "fine-tune", "shift", "calibration"), default=None)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N test images (smoke runs)")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    args.workdir.mkdir(parents=True, exist_ok=True)
    test, dark_dir, hne_dir = split_pairs(args.data / "DSD_P/train", args.workdir, args.limit)
    print(f"Command: `python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:] if argv is None else argv)}`\n")
    print(f"Held-out DSD_P/train pairs: {len(test)} (salted file-name hash, {HELD_OUT:.0%}); the fine-tunes "
          f"train on the other {len(list(dark_dir.iterdir()))} (two folders, each image under its own name).\n")
    if args.only in (None, "zero-shot"):
        print("### Zero-shot on DSD_P, against the adjacent sections\n")
        print("\n".join(zero_shot(models, test, args.paired_model)) + "\n")
    if args.only in (None, "fine-tune") and not args.skip_finetune:
        print("### After `fine_tune` on the rest of DSD_P/train: defaults (pairing detected) and forced unpaired\n")
        print("\n".join(fine_tuned(models, test, dark_dir, hne_dir, args.workdir, args.steps, args.teacher_steps,
                                   args.pairings.split(","))) + "\n")
    if args.only in (None, "shift"):
        print("### Synthetic shift of DSD_U/val, against the stain of the unshifted images\n")
        print("\n".join(synthetic_shift(models, args.data, args.limit)) + "\n")
    if args.only in (None, "calibration"):
        print("### The distances behind `auto`'s threshold\n")
        print("\n".join(calibration(args.data, {models[0]: args.data / "DSD_U/val/darkfield",
                                                args.paired_model: args.data / "DSD_P/train/darkfield"}, args.limit)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
