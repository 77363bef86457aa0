"""Enhancer only vs teacher vs CycleGAN without distillation vs the student, same data and seed.

Two test sets, neither seen in training:

* **DSD_U/val** (40 real dark-field tiles), reference-free: structure
  (gradient correlation of the output's gray with the enhanced image), NIQE,
  and stain style (sliced Wasserstein in Lab to the 40 real H&E tiles of
  DSD_U/val/stained).
* **synthetic paired**: each H&E tile of DSD_U/val/stained turned into a
  dark-field image by the enhancer's inverse (``digital_stain.quality.synth``; blur
  σ=1 px, noise 0.003, 8-bit, tinted like DSD_U/train/darkfield), stained,
  and compared with the real H&E: PSNR, SSIM, nuclei Dice (hematoxylin by
  colour deconvolution, Otsu, Dice), plus the reference-free scores.

The two students are model files trained by ``digital-stain train`` with the
same data, seed, size and steps, one with the paper's ``λ_kd = 5`` and one
with ``--lambda-kd 0`` (CycleGAN losses only: the paper's "w/o L_kd"
ablation). ``--train-steps N`` trains both here first (same settings through
the library); otherwise pass the files.

Examples (from the repository root)::

    python benchmarks/compare_methods.py --student runs/student-kd.safetensors --ablation runs/student-nokd.safetensors
    python benchmarks/compare_methods.py --train-steps 200 --workdir runs/compare-smoke
    python benchmarks/compare_methods.py --also 'fast=dsd-unpaired-fast'   # shipped students, no ablation

Besides those scores every row has the checkerboard (``checkerboard_2``,
``checkerboard_4``: the grid a stride-2 transposed convolution leaves, median
over tiles; :func:`digital_stain.quality.metrics.checkerboard`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from digital_stain.quality.evaluate import as_rgb_uint8, format_table, score_images
from digital_stain.quality.metrics import lab_pixels
from digital_stain.stain.model import StainModel
from digital_stain.quality.synth import darkfield_tint, synthesize_darkfield
from digital_stain.train.data import load_rgb_folder

ROOT = Path(__file__).resolve().parents[1]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train_pair(base: StainModel, data: Path, workdir: Path, steps: int, size: str, crop: int, seed: int) -> tuple[Path, Path]:
    """Train the student and the no-distillation ablation with identical settings; return their files."""
    from digital_stain.train.student import StudentConfig, train_student

    files = []
    for label, lambda_kd in (("student-kd", 5.0), ("student-nokd", 0.0)):
        path = workdir / f"{label}.safetensors"
        files.append(path)
        if path.exists():
            _log(f"{path} exists, reusing it")
            continue
        cfg = StudentConfig.preset(size, steps=steps, crop=crop, seed=seed, lambda_kd=lambda_kd)
        _log(f"training {label} ({steps} steps, {size}, crop {crop}, seed {seed}, lambda_kd {lambda_kd})")
        student, result = train_student(base, data / "train/darkfield", data / "train/stained", cfg,
                                        checkpoint=workdir / f"{label}.ckpt.safetensors", resume=True)
        meta = {"name": label, "provenance": {"benchmark": "compare_methods", "config": vars(cfg),
                                              "best_step": result.best_step, "history": result.history}}
        StainModel(base.enhancer, base.teacher, student, meta).save(path, overwrite=True)
    return files[0], files[1]


def stain_all(model: StainModel, darkfield: list, outputs: list[str]) -> dict[str, list]:
    outputs = list(dict.fromkeys(outputs))
    produced = {name: [] for name in outputs}
    for image in darkfield:
        result = model.stain(image, outputs)
        for name in outputs:
            produced[name].append(result[name])
    return produced


def compare(methods: dict[str, tuple[StainModel, str]], darkfield: list, references, style) -> dict:
    """Score each method (model, output) on the dark-field images; the enhanced image is the same for all."""
    enhanced = None
    results = {}
    for label, (model, output) in methods.items():
        t0 = time.time()
        outs = stain_all(model, darkfield, ["enhanced", output])
        enhanced = enhanced if enhanced is not None else outs["enhanced"]
        results[label] = score_images([as_rgb_uint8(o) for o in outs[output]], enhanced, references, style)
        _log(f"  {label}: {time.time() - t0:.0f} s")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/dsd/DSD_U")
    parser.add_argument("--base", default="dsd-unpaired", help="model with the enhancer and teacher")
    parser.add_argument("--student", type=Path, help="model file with the student (lambda_kd 5; default: --base's own)")
    parser.add_argument("--ablation", type=Path, help="model file with the no-distillation student (lambda_kd 0; "
                                                      "default: none)")
    parser.add_argument("--train-steps", type=int, default=None, help="train both students here first")
    parser.add_argument("--size", default="small")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs/compare")
    parser.add_argument("--also", action="append", default=[], metavar="LABEL=MODEL",
                        help="another student to score alongside (e.g. 'fast student=runs/student-fast.safetensors')")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N test images (smoke runs)")
    args = parser.parse_args(argv)

    base = StainModel.load(args.base, device="cpu")
    if args.train_steps:
        args.workdir.mkdir(parents=True, exist_ok=True)
        args.student, args.ablation = train_pair(base, args.data, args.workdir, args.train_steps,
                                                 args.size, args.crop, args.seed)
    methods = {"enhancer only (gray)": (base, "enhanced"), "teacher": (base, "teacher")}
    if args.ablation:
        methods["CycleGAN, no distillation (λ_kd = 0)"] = (StainModel.load(args.ablation, device="cpu"), "student")
    if args.student:
        methods["student (ours, λ_kd = 5)"] = (StainModel.load(args.student, device="cpu"), "student")
    elif base.student is not None:
        methods[f"student of {args.base} (shipped)"] = (base, "student")
    for item in args.also:
        label, _, path = item.partition("=")
        methods[label] = (StainModel.load(path, device="cpu"), "student")

    val_dark = load_rgb_folder(args.data / "val/darkfield", min_side=1, kind="dark-field")
    val_hne = load_rgb_folder(args.data / "val/stained", min_side=1, kind="H&E")
    val_dark.images, val_hne.images = val_dark.images[: args.limit], val_hne.images[: args.limit]
    style = lab_pixels(np.concatenate([im.reshape(-1, 3) for im in val_hne.images])[None])
    tint = darkfield_tint(load_rgb_folder(args.data / "train/darkfield", min_side=1, kind="dark-field").images)
    synthetic = [synthesize_darkfield(y, base.enhancer, tint, blur_sigma=1.0, noise_std=0.003,
                                      rng=np.random.default_rng([args.seed, i]))
                 for i, y in enumerate(val_hne.images)]

    print(f"Command: `python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:] if argv is None else argv)}`\n")
    print(f"Students: `{args.student or args.base}` and `{args.ablation or 'none'}`; base `{args.base}`.\n")
    _log(f"DSD_U/val, real dark-field ({len(val_dark.images)} images)")
    real = compare(methods, val_dark.images, None, style)
    other_hne = load_rgb_folder(args.data / "train/stained", min_side=1, kind="H&E").images[:40]
    real["real H&E (40 of DSD_U/train/stained, for scale)"] = score_images(other_hne, None, None, style)
    print(f"### DSD_U/val: {len(val_dark.images)} real dark-field tiles, no reference\n")
    print(format_table(real) + "\n")
    _log(f"synthetic paired ({len(synthetic)} images)")
    paired = compare(methods, synthetic, val_hne.images, style)
    print(f"### Synthetic paired: {len(synthetic)} dark-field images made from DSD_U/val/stained\n")
    print(format_table(paired))
    return 0


if __name__ == "__main__":
    sys.exit(main())
