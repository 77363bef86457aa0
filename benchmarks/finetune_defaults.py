"""Choosing ``fine_tune``'s defaults on a dev split of DSD_P, never on ``transfer.py``'s held-out pairs.

The training part of ``benchmarks/transfer.py`` (DSD_P/train outside its held-out 15 %) is split
again by another salted file-name hash: about 18 % of it is the dev split, the rest is given to
``fine_tune`` as two folders of the same names (adjacent sections: ``fine_tune``'s default,
``paired="auto"``, trains them paired; a configuration with ``"paired": false`` trains unpaired). Each configuration (JSON: ``fine_tune`` keyword arguments and a
``label``) is fine-tuned and scored on the dev pairs against the adjacent sections (PSNR, SSIM,
nuclei Dice) for the teacher and the student, with its time, chosen step, validation history and
the check's verdict. Configurations with the same ``teacher_steps`` and pairing share the teacher stage (its
checkpoint is copied), so only the first pays for it.

Example (from the repository root; minutes per configuration on 2 CPU cores)::

    python benchmarks/finetune_defaults.py dsd-unpaired-fast \
        '[{"label": "s500 ema", "steps": 500, "config_overrides": {"val_every": 100, "ema_decay": 0.99}}]'
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from transfer import held_out, scores, stain_set

ROOT = Path(__file__).resolve().parents[1]
DEV = 0.18


def in_dev(name: str) -> bool:
    return zlib.crc32(f"dev:{name}".encode()) % 1000 < DEV * 1000


def dev_split(root: Path, workdir: Path):
    """The dev pairs (arrays) and the rest of the benchmark's training part as folders of links."""
    names = sorted(p.name for p in (root / "darkfield").glob("*.png"))
    pool = [n for n in names if not held_out(n)]
    dev = [n for n in pool if in_dev(n)]
    for kind in ("darkfield", "stained"):
        folder = workdir / "train" / kind
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name in pool:
            if name not in dev:
                (folder / name).symlink_to((root / kind / name).resolve())
    load = lambda kind: [np.asarray(Image.open(root / kind / n).convert("RGB")) for n in dev]  # noqa: E731
    return load("darkfield"), load("stained"), workdir / "train" / "darkfield", workdir / "train" / "stained"


def run(init: str, config: dict, dark_dir: Path, hne_dir: Path, dev_dark, dev_hne, workdir: Path) -> str:
    from digital_stain.train.finetune import fine_tune, teacher_checkpoint

    config = dict(config)
    label = config.pop("label")
    checkpoint = workdir / f"{init}-{label.replace(' ', '-')}.ckpt.safetensors"
    # a paired teacher learns from other data (and by default for longer) than an unpaired one: not shared
    pairing = "unpaired" if config.get("paired") is False else "paired"
    shared = workdir / f"{init}-teacher-{config.get('teacher_steps', 'default')}-{pairing}.safetensors"
    if shared.exists() and not teacher_checkpoint(checkpoint).exists():
        shutil.copy(shared, teacher_checkpoint(checkpoint))
    started = time.time()
    result = fine_tune(init, dark_dir, hne_dir, device="cpu", checkpoint=checkpoint, resume=True, **config)
    seconds = time.time() - started
    if teacher_checkpoint(checkpoint).exists() and not shared.exists():
        shutil.copy(teacher_checkpoint(checkpoint), shared)
    produced = stain_set(result.model, dev_dark, "folder", result.model.outputs)
    cells = []
    for output in ("teacher", "student"):
        values = scores(produced[output], dev_hne)
        cells.append(f"{values['psnr']:.2f} / {values['ssim']:.3f} / {values['dice']:.3f}")
    history = ", ".join(f"{h['step']}: {h.get('style', float('nan')):.2f} ({h['structure']:.3f})"
                        for h in result.result.history)
    verdict = "passed" if result.accepted else "failed"
    return (f"| {label} | {' | '.join(cells)} | {result.result.best_step} | {seconds / 60:.1f} | {verdict} | "
            f"{history} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("init", help="the model to fine-tune")
    parser.add_argument("configs", help="JSON list of fine_tune keyword arguments, each with a 'label'")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/dsd")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs/finetune-defaults")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    dev_dark, dev_hne, dark_dir, hne_dir = dev_split(args.data / "DSD_P/train", args.workdir)
    print(f"Command: `python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:] if argv is None else argv)}`\n")
    print(f"`{args.init}`; dev split: {len(dev_dark)} pairs; fine-tuned on the other "
          f"{len(list(dark_dir.iterdir()))} (pairing as each configuration says; default: detected).\n")
    print("| configuration | teacher PSNR / SSIM / Dice | student PSNR / SSIM / Dice | chosen step | minutes | "
          "check | validation: step: style (structure) |")
    print("|---|---|---|---|---|---|---|")
    for config in json.loads(args.configs):
        print(run(args.init, config, dark_dir, hne_dir, dev_dark, dev_hne, args.workdir), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
