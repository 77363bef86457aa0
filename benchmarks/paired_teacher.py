"""How a fine-tune's teacher should learn from adjacent sections, chosen on the DSD_P dev split.

A fine-tune that finds adjacent sections can teach the teacher from the pairs: the enhanced gray
of each dark-field image in, the chroma of its stained section out. This compares ways of doing
that on the dev split of ``benchmarks/finetune_defaults.py`` (never on ``transfer.py``'s held-out
pairs): the starting teacher of ``INIT`` with the fine-tune's refitted enhancer, then each
configuration (JSON: ``steps``, ``lr``, ``mix`` the weight of the paper's H&E-only pairs added to
each step, ``align`` whether each section is first shifted onto its image by the phase correlation
of their edges, ``turns`` whether crops are mirrored and turned as the library's are), scored as ``transfer.py`` scores: PSNR, SSIM and nuclei Dice of the teacher's stain
against the adjacent sections.

The loop is deliberately bare, to compare the ingredients and nothing else: random crops without
flips, a constant learning rate, the last state. ``--library`` runs ``train_teacher(enhanced=...)``
instead (flips and turns, the learning-rate decay, the best validated state), as ``fine_tune`` does;
there a configuration's ``val_every`` sets how often a state is validated (``val_every`` = ``steps``:
the last state is kept).

Example (from the repository root; about 2.5 minutes per 300 steps on 2 CPU cores)::

    python benchmarks/paired_teacher.py dsd-unpaired-fast '[{"steps": 0}, {"steps": 300}, {"steps": 1000}]'
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from finetune_defaults import dev_split
from transfer import scores, stain_set

ROOT = Path(__file__).resolve().parents[1]
CROP, BATCH = 128, 8


def _edges(gray: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return np.hypot(ndimage.gaussian_filter(gray, 2, order=(0, 1)), ndimage.gaussian_filter(gray, 2, order=(1, 0)))


def section_shift(gray: np.ndarray, section: np.ndarray) -> tuple[int, int]:
    """(dy, dx) with ``section[y + dy, x + dx]`` on ``gray[y, x]``, by phase correlation of the edges."""
    from skimage.registration import phase_cross_correlation

    section_gray = section.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255
    shift, _, _ = phase_cross_correlation(_edges(section_gray), _edges(gray), normalization=None)
    return int(shift[0]), int(shift[1])


def _paired_batch(grays, sections, shifts, rng, turns: bool = False):
    from digital_stain.core.color import rgb_to_lab
    from digital_stain.core.nets.unet import AB_SCALE, lightness_input

    inputs, targets = [], []
    while len(inputs) < BATCH:
        i = rng.integers(len(grays))
        (dy, dx), (height, width) = shifts[i], grays[i].shape
        y = rng.integers(max(0, -dy), height - CROP - max(0, dy) + 1)
        x = rng.integers(max(0, -dx), width - CROP - max(0, dx) + 1)
        gray, section = grays[i][y: y + CROP, x: x + CROP], sections[i][y + dy: y + dy + CROP, x + dx: x + dx + CROP]
        if turns:  # as the library's random_crops: a mirror half the time, then a quarter turn, both alike
            if rng.random() < 0.5:
                gray, section = gray[:, ::-1], section[:, ::-1]
            k = int(rng.integers(4))
            gray, section = np.rot90(gray, k), np.rot90(section, k)
        inputs.append(np.ascontiguousarray(gray))
        targets.append(np.ascontiguousarray(section))
    rgb = torch.from_numpy(np.stack(targets)).permute(0, 3, 1, 2).float() / 255
    return lightness_input(torch.from_numpy(np.stack(inputs))[:, None]), rgb_to_lab(rgb)[:, 1:] / AB_SCALE


def bare_loop(teacher, grays, sections, config: dict) -> None:
    from digital_stain.train.data import random_crops
    from digital_stain.train.teacher import pairs

    shifts = ([section_shift(g, s) for g, s in zip(grays, sections)] if config.get("align", True)
              else [(0, 0)] * len(grays))
    optimizer = torch.optim.Adam(teacher.parameters(), lr=config.get("lr", 2e-4), betas=(0.5, 0.999))
    rng = np.random.default_rng(0)
    teacher.train()
    for _ in range(config.get("steps", 300)):
        x, target = _paired_batch(grays, sections, shifts, rng, config.get("turns", False))
        loss = F.l1_loss(teacher(x), target)
        if config.get("mix"):  # the paper's pairs too: each H&E crop's own gray, with input noise
            rgb = torch.from_numpy(random_crops(sections, BATCH, CROP, rng)).permute(0, 3, 1, 2).float() / 255
            own_x, own_target = pairs(rgb, torch.from_numpy(rng.uniform(0, 0.04, BATCH)).float())
            loss = loss + config["mix"] * F.l1_loss(teacher(own_x), own_target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    teacher.eval()


def library(teacher, grays, sections, names, config: dict):
    from digital_stain.train.teacher import TeacherConfig, train_teacher

    settings = TeacherConfig(width=teacher.config["width"], depth=teacher.config["depth"], device="cpu",
                             steps=config.get("steps", 300), lr=config.get("lr", 2e-4),
                             val_every=config.get("val_every", max(50, config.get("steps", 300) // 4)))
    trained, _ = train_teacher(sections, settings, names=names, enhanced=grays, init_state=teacher.state_dict())
    return trained


def run(init: str, config: dict, dark_dir: Path, hne_dir: Path, dev_dark, dev_hne, use_library: bool) -> str:
    from digital_stain.stain.model import StainModel
    from digital_stain.train.data import load_images
    from digital_stain.train.finetune import _fit_enhancer

    model = StainModel.load(init, device="cpu")
    dark = load_images(dark_dir, min_side=CROP, kind="dark-field")
    hne = load_images(hne_dir, min_side=CROP, kind="H&E")
    # the fine-tune's enhancer when its teacher is tuned: both CDFs decided as fine_tune decides them
    enhancer, _ = _fit_enhancer(model.enhancer, dark.images, hne.images, "auto", True, teacher_tuned=True)
    grays = [enhancer(image).astype(np.float32) for image in dark.images]
    started = time.time()
    teacher = model.teacher
    if config.get("steps", 300) > 0:
        if use_library:
            teacher = library(teacher, grays, hne.images, hne.names, config)
        else:
            bare_loop(teacher, grays, hne.images, config)
    minutes = (time.time() - started) / 60
    produced = stain_set(StainModel(enhancer, teacher, None, {"name": "teacher"}), dev_dark, "folder", ["teacher"])
    values = scores(produced["teacher"], dev_hne)
    return (f"| {json.dumps(config)} | {values['psnr']:.2f} | {values['ssim']:.3f} | {values['dice']:.3f} | "
            f"{minutes:.1f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("init", help="the model whose teacher starts")
    parser.add_argument("configs", help="JSON list of configurations (steps, lr, mix, align, turns; val_every with --library)")
    parser.add_argument("--library", action="store_true", help="train with train_teacher(enhanced=...)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/dsd")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs/paired-teacher")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    dev_dark, dev_hne, dark_dir, hne_dir = dev_split(args.data / "DSD_P/train", args.workdir)
    print(f"Command: `python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:] if argv is None else argv)}`\n")
    loop = "`train_teacher(enhanced=...)`" if args.library else "the bare loop"
    print(f"`{args.init}`'s teacher with the fine-tune's enhancer, trained by {loop} on "
          f"{len(list(dark_dir.iterdir()))} DSD_P pairs; scored on the {len(dev_dark)} dev pairs.\n")
    print("| configuration | teacher PSNR ↑ | SSIM ↑ | nuclei Dice ↑ | minutes |")
    print("|---|---:|---:|---:|---:|")
    for config in json.loads(args.configs):
        print(run(args.init, config, dark_dir, hne_dir, dev_dark, dev_hne, args.library), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
