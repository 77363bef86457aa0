"""Training the tutorship nuclei segmenter: H&E with instance masks, translated into dark-field, teach a U-Net.

Each H&E image is translated into dark-field and enhanced as the model would see it
(:func:`digital_stain.nuclei.tutor.translate`, ``translations`` noise draws per image, made once);
the U-Net (:class:`~digital_stain.core.nets.unet.NucleiUNet`) learns the masks' nuclei and their
boundaries from that enhanced gray (binary cross-entropy on both maps), on random crops with
flips and quarter turns. A validation split carved from the names (by hash) chooses the best
state by the Dice of its nuclei; that state is what is returned, also on Stop. Checkpoints hold
the weights, the optimiser, the best state and the step; every step draws from its own seeded
stream, so a resumed run ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from digital_stain.core.arrays import InputError
from digital_stain.core.nets.unet import NucleiUNet, lightness_input
from digital_stain.train.checkpoint import BestSoFar
from digital_stain.train.data import validation_split
from digital_stain.train.events import Meter, Progress, TrainResult, stop_requested
from digital_stain.train.schedule import constant_then_linear, set_lr


@dataclass
class NucleiConfig:
    """Segmenter training settings (defaults: about 0.2 s a step, 4-6 minutes, on a 2-core CPU).

    ``translator``: ``auto`` (the model's reverse generator F where its file keeps it, else the
    enhancer's inverse), ``reverse`` or ``enhancer`` (:mod:`digital_stain.nuclei.tutor`).
    ``boundary_weight`` weighs the boundary map's loss (boundaries are a few pixels of each nucleus,
    and the seeds that split touching nuclei depend on them).
    """

    width: int = 16
    depth: int = 3
    steps: int = 1500
    batch: int = 8
    crop: int = 96
    lr: float = 1e-3
    seed: int = 0
    translations: int = 2
    translator: str = "auto"
    boundary_weight: float = 2.0
    val_fraction: float = 0.15
    val_every: int = 250
    report_every: int = 10


def make_pairs(model, stained: list, masks: list, names: list, cfg: NucleiConfig, tint) -> list:
    """``(name, enhanced gray, targets)`` for each image and translation draw (checked: masks match images)."""
    from digital_stain.nuclei.tutor import check_masks, targets, translate, translator_of

    translator = translator_of(model, cfg.translator)
    draws = cfg.translations if translator == "enhancer" else 1  # F is deterministic: one draw
    pairs = []
    for name, image, labels in zip(names, stained, masks):
        check_masks(image, labels, name)
        if min(image.shape[:2]) < cfg.crop:
            raise InputError(f"{name} is {image.shape[1]} x {image.shape[0]} px, smaller than the {cfg.crop}-px "
                             "training crop; use larger images or a smaller --crop.")
        wanted = targets(labels)
        for draw in range(draws):
            pairs.append((name, translate(model, image, tint, seed=cfg.seed * 1000 + draw, translator=translator),
                          wanted))
    return pairs


def _batch(pairs: list, cfg: NucleiConfig, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    grays, maps = [], []
    for _ in range(cfg.batch):
        _, gray, target = pairs[int(rng.integers(len(pairs)))]
        y = int(rng.integers(gray.shape[0] - cfg.crop + 1))
        x = int(rng.integers(gray.shape[1] - cfg.crop + 1))
        g, t = gray[y : y + cfg.crop, x : x + cfg.crop], target[:, y : y + cfg.crop, x : x + cfg.crop]
        turns, flip = int(rng.integers(4)), bool(rng.integers(2))
        g, t = np.rot90(g, turns), np.rot90(t, turns, axes=(1, 2))
        if flip:
            g, t = g[:, ::-1], t[:, :, ::-1]
        grays.append(np.ascontiguousarray(g))
        maps.append(np.ascontiguousarray(t))
    return (lightness_input(torch.from_numpy(np.stack(grays))[:, None]),
            torch.from_numpy(np.stack(maps)).float())


def _loss(logits: torch.Tensor, target: torch.Tensor, boundary_weight: float) -> tuple[torch.Tensor, dict]:
    nucleus = F.binary_cross_entropy_with_logits(logits[:, 0], target[:, 0])
    boundary = F.binary_cross_entropy_with_logits(logits[:, 1], target[:, 1])
    return nucleus + boundary_weight * boundary, {"nucleus": nucleus.item(), "boundary": boundary.item()}


def validation_dice(net: NucleiUNet, pairs: list) -> float:
    """Mean Dice of the predicted nuclei (probability > 0.5) on whole validation images."""
    from digital_stain.nuclei.tutor import segmenter_maps
    from digital_stain.quality.metrics import dice

    net.eval()
    scores = [dice(segmenter_maps(net, gray)[0] > 0.5, target[0] > 0) for _, gray, target in pairs]
    net.train()
    return float(np.mean(scores))


def train_segmenter(model, stained: list, masks: list, names: list, config: NucleiConfig | None = None, *,
                    tint=(1.0, 1.0, 1.0), checkpoint: str | os.PathLike | None = None, resume: bool = False,
                    progress: Callable[[Progress], None] | None = None,
                    stop: threading.Event | None = None) -> tuple[NucleiUNet, TrainResult]:
    """Train a tutorship segmenter for ``model`` on H&E images with nuclei instance masks.

    Parameters
    ----------
    model : StainModel
        Its enhancer translates the H&E into dark-field and enhances it back, as at stain time.
    stained, masks : list of arrays
        RGB uint8 H&E images and their instance labels (same size, 0 = background).
    names : list of str
        One per image; they choose the validation split (by hash), as file names do.
    config : NucleiConfig
    tint : sequence of 3 floats
        The dark-field colour relative to its luma (:func:`digital_stain.quality.synth.darkfield_tint`).
    checkpoint : path-like, optional
        Where to save checkpoints (every ``val_every`` steps, and on Stop) and, with ``resume``,
        where to continue from.
    progress : callable, optional
        Receives a :class:`Progress` every ``report_every`` steps.
    stop : threading.Event, optional
        Set it to stop; the loop returns within one step with the best state so far.

    Returns
    -------
    (net, result) : the best segmenter on the validation split (eval mode, CPU) and a :class:`TrainResult`.
    """
    cfg = config or NucleiConfig()
    if not stained or len(stained) != len(masks) or len(names) != len(stained):
        raise InputError(f"{len(stained)} H&E image(s), {len(masks)} mask(s) and {len(names)} name(s): give one "
                         "mask per image, at least one of each.")
    if cfg.crop % 2**cfg.depth:
        raise InputError(f"crop {cfg.crop} px is not a multiple of {2**cfg.depth}, which a U-Net of depth {cfg.depth} "
                         "needs; use e.g. 96 or 128.")
    pairs = make_pairs(model, stained, masks, names, cfg, tint)
    held_out = validation_split(list(names), cfg.val_fraction)
    val_names = {name for name, h in zip(names, held_out) if h}
    if not val_names or len(val_names) == len(set(names)):  # too few to hold any out: validate on the last
        val_names = {names[-1]}
    train_pairs = [p for p in pairs if p[0] not in val_names] or pairs
    val_pairs = [p for p in pairs if p[0] in val_names]

    torch.manual_seed(cfg.seed)
    net = NucleiUNet(cfg.width, cfg.depth)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    chosen = BestSoFar(lambda: NucleiUNet(cfg.width, cfg.depth), net, optimizer, checkpoint, asdict(cfg),
                       higher_is_better=True, check_config=True)
    start = chosen.resume() if resume and checkpoint and Path(checkpoint).exists() else 0

    meter = Meter(cfg.steps, start)
    step, cancelled = start, False
    net.train()
    while step < cfg.steps:
        if stop_requested(stop):
            cancelled = True
            break
        rng = np.random.default_rng([cfg.seed, step])  # per-step stream: resuming replays exactly
        x, target = _batch(train_pairs, cfg, rng)
        set_lr([optimizer], constant_then_linear(cfg.lr, step, cfg.steps))
        loss, parts = _loss(net(x), target, cfg.boundary_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        meter.add(parts, cfg.batch)
        message = ""
        if step % cfg.val_every == 0 or step == cfg.steps:
            score = validation_dice(net, val_pairs)
            chosen.judge(step, score, {"step": step, "val_dice": score})
            chosen.save(step)
            message = f"validation nuclei Dice {score:.3f} (best {chosen.score:.3f} at step {chosen.step})"
        if progress and (step % cfg.report_every == 0 or message or step == cfg.steps):
            progress(meter.report(step, message))
    if cancelled:
        chosen.save(step)
    return chosen.best(), TrainResult(None, step, cancelled, chosen.step, None if chosen.step is None else chosen.score,
                                      chosen.history)
