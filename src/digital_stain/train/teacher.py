"""Training the teacher colouriser ``G_t``: gray/colour pairs made from H&E images, L1 on chroma.

The pairs are made as in the paper: each H&E crop's gray (Rec.601 luma, the
same quantity the enhancer produces) is the input, its Lab chroma the target.
A validation split carved from the folder (by a hash of the file names)
chooses the best state; that state is what is returned, also on cancel.

Given adjacent sections (``enhanced``, a paired fine-tune), the input is instead the enhanced
gray of each dark-field image and the target the chroma of its stained section: the teacher then
learns where the lab's H&E puts hematoxylin given what the dark-field shows, which an H&E image's
own gray does not teach it (nuclei Dice on the DSD_P dev split 0.34 against 0.45,
``docs/benchmarks.md``). The sections are not shifted onto the images first: on DSD_P, whose
sections are misaligned by 1 to 3 px, a phase-correlation shift bought nothing. Pairs are cut
without the mirrors and quarter turns H&E crops get: a fine-tune learns one microscope, whose
dark-field keeps its orientation, and turned pairs taught fewer nuclei (0.424 against 0.446).
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

from digital_stain.core.arrays import InputError, to_uint8
from digital_stain.core.color import luma_torch, rgb_to_lab
from digital_stain.core.devices import autocast, resolve_device, resolve_training_precision
from digital_stain.core.nets.unet import AB_SCALE, ColorizationUNet, lightness_input
from digital_stain.train.checkpoint import BestSoFar
from digital_stain.train.data import center_crop, load_images, random_crops, validation_split
from digital_stain.train.events import Meter, Progress, TrainResult, stop_requested
from digital_stain.train.schedule import constant_then_linear, set_lr


@dataclass
class TeacherConfig:
    """Teacher training settings (defaults: about 0.4 s a step, 20-25 minutes, on a 2-core AVX2 CPU in fp32).

    ``input_noise`` is the largest standard deviation of Gaussian noise added to
    the gray input (each crop draws its own level): enhanced dark-field images
    carry about three times the fine-scale noise of H&E gray (0.030 vs 0.011 on
    DSD_U), and a teacher that never saw noise turns noisy bright areas yellow.
    Validation uses a fixed noise of ``val_noise``, the level measured on
    enhanced images, so the state kept is the one best on inputs like those.
    """

    width: int = 16
    depth: int = 4
    steps: int = 4000
    batch: int = 8
    crop: int = 128
    lr: float = 2e-4
    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    input_noise: float = 0.04
    val_noise: float = 0.03
    val_fraction: float = 0.1
    val_every: int = 250
    report_every: int = 10


def _to_tensor(batch_uint8: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(batch_uint8).to(device).permute(0, 3, 1, 2).float() / 255.0


def _examples(batch: torch.Tensor, noise, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of crops in [0, 1] -> (input, target): an H&E crop and its own gray (3 channels), or a pair (4)."""
    if batch.shape[1] == 4:  # enhanced gray of the dark-field, then its section's RGB: real inputs, no noise added
        return lightness_input(batch[:, :1]), rgb_to_lab(batch[:, 1:])[:, 1:] / AB_SCALE
    return pairs(batch, noise, generator)


def pairs(rgb: torch.Tensor, noise: torch.Tensor | float = 0.0, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB in [0, 1] -> (U-Net input from its gray plus noise of std ``noise``, target chroma / AB_SCALE)."""
    gray = luma_torch(rgb)
    noise = torch.as_tensor(noise, dtype=gray.dtype, device=gray.device).reshape(-1, 1, 1, 1)
    if bool((noise > 0).any()):
        gray = (gray + noise * torch.randn(gray.shape, generator=generator, dtype=gray.dtype).to(gray.device)).clamp(0, 1)
    return lightness_input(gray), rgb_to_lab(rgb)[:, 1:] / AB_SCALE


def validation_loss(net: ColorizationUNet, images: list, device: torch.device, crop: int = 256,
                    noise: float = 0.0) -> float:
    """Mean L1 of the chroma (in Lab units) on centre crops of held-out images (fixed noise, fixed seed).

    ``images`` are H&E images, or pairs (``(Y, X, 4)``: enhanced gray, then the section's RGB), which get no noise.
    """
    net.eval()
    losses = []
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for i in range(0, len(images), 8):
            size = min(crop, *(min(im.shape[:2]) for im in images[i : i + 8]))
            size -= size % net.size_multiple
            crops = _to_tensor(np.stack([center_crop(im, size) for im in images[i : i + 8]]), device)
            x, target = _examples(crops, noise, generator)
            losses.append(F.l1_loss(net(x).float(), target).item() * AB_SCALE * len(crops))
    net.train()
    return float(np.sum(losses) / len(images))


def _check_same_data(checkpoint, saved: str, now: str) -> None:
    # a teacher half-trained on one kind of pair would silently go on with the other (checkpoints from before
    # paired teachers learnt from the H&E)
    if saved != now:
        kinds = {"sections": "adjacent sections (a paired run)", "H&E": "the H&E images alone (an unpaired run)"}
        raise InputError(f"teacher checkpoint {checkpoint} learnt from {kinds.get(saved, saved)}, and this run learns "
                         f"from {kinds[now]}; resume with the same folders and pairing, or start again without "
                         "--resume (or with another --checkpoint).")


def train_teacher(
    stained_dir: str | os.PathLike,
    config: TeacherConfig | None = None,
    *,
    names: list[str] | None = None,
    enhanced: list | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    init_state: dict | None = None,
    progress: Callable[[Progress], None] | None = None,
    stop: threading.Event | None = None,
) -> tuple[ColorizationUNet, TrainResult]:
    """Train the colouriser on a folder of H&E images.

    Parameters
    ----------
    stained_dir : path-like or sequence of arrays
        Folder of RGB H&E images (any size at least ``config.crop``), or the images themselves.
    config : TeacherConfig
    names : list of str, optional
        Names of in-memory images (they choose the validation split, as file names do).
    enhanced : list of ndarray, optional
        Adjacent sections: the enhanced gray (``(Y, X)`` float in [0, 1]) of the dark-field image
        beside each stained image, in the same order and of the same size. The teacher then learns
        to colour that gray as its section is coloured; held-out pairs validate it. Default:
        each H&E image's own gray, with input noise (the paper's).
    checkpoint : path-like, optional
        Where to save checkpoints (every ``val_every`` steps) and, with
        ``resume``, where to continue from.
    init_state : dict, optional
        Teacher weights to start from (fine-tuning).
    progress : callable, optional
        Receives a :class:`Progress` every ``report_every`` steps.
    stop : threading.Event, optional
        Set it to stop; the loop returns within one step with the best state so far.

    Returns
    -------
    (net, result) : the best network on the validation split (eval mode, CPU) and a :class:`TrainResult`.
    """
    cfg = config or TeacherConfig()
    device = resolve_device(cfg.device)
    precision = resolve_training_precision(cfg.precision, device)
    data = load_images(stained_dir, names, min_side=cfg.crop, kind="H&E")
    items = data.images
    if enhanced is not None:
        if [np.shape(g) for g in enhanced] != [im.shape[:2] for im in data.images]:
            raise ValueError(f"need one enhanced gray of each section's size, got {len(enhanced)} for "
                             f"{len(data.images)} sections")
        items = [np.concatenate([to_uint8(np.asarray(gray))[..., None], section], axis=-1)  # crops cut both alike
                 for gray, section in zip(enhanced, data.images)]
    held_out = validation_split(data.names, cfg.val_fraction)
    if held_out.any() and not held_out.all():
        train_images = [im for im, h in zip(items, held_out) if not h]
        val_images = [im for im, h in zip(items, held_out) if h]
    else:  # too few images to hold any out: validate on the last one (reported as such)
        train_images, val_images = items, items[-1:]

    torch.manual_seed(cfg.seed)
    net = ColorizationUNet(cfg.width, cfg.depth).to(device)
    if init_state is not None:
        net.load_state_dict(init_state)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    learnt_from = "sections" if enhanced is not None else "H&E"
    chosen = BestSoFar(lambda: ColorizationUNet(cfg.width, cfg.depth), net, optimizer, checkpoint,
                       {**asdict(cfg), "learnt_from": learnt_from}, higher_is_better=False)
    start = 0
    if resume and checkpoint and Path(checkpoint).exists():
        start = chosen.resume()
        _check_same_data(checkpoint, chosen.saved_config.get("learnt_from", "H&E"), learnt_from)

    meter = Meter(cfg.steps, start)
    step, cancelled = start, False
    net.train()
    while step < cfg.steps:
        if stop_requested(stop):
            cancelled = True
            break
        rng = np.random.default_rng([cfg.seed, step])  # per-step stream: resuming replays exactly
        # pairs keep the microscope's orientation: mirrored and turned pairs taught the teacher fewer nuclei
        crops = _to_tensor(random_crops(train_images, cfg.batch, cfg.crop, rng, turns=enhanced is None), device)
        noise = torch.from_numpy(rng.uniform(0.0, cfg.input_noise, cfg.batch)).float()
        x, target = _examples(crops, noise, torch.Generator().manual_seed(int(rng.integers(2**31))))
        set_lr([optimizer], constant_then_linear(cfg.lr, step, cfg.steps))
        with autocast(device, precision):
            pred = net(x)
        loss = F.l1_loss(pred.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        meter.add({"l1": loss.item()}, cfg.batch)
        message = ""
        if step % cfg.val_every == 0 or step == cfg.steps:
            score = validation_loss(net, val_images, device, noise=cfg.val_noise)
            chosen.judge(step, score, {"step": step, "val_l1_ab": score})
            chosen.save(step)
            message = f"validation L1(ab) {score:.3f} (best {chosen.score:.3f} at step {chosen.step})"
        if progress and (step % cfg.report_every == 0 or message or step == cfg.steps):
            progress(meter.report(step, message))
    if cancelled:
        chosen.save(step)
    result = TrainResult(None, step, cancelled, chosen.step, None if chosen.step is None else chosen.score,
                         chosen.history, data.skipped)
    return chosen.best(), result
