"""A self-supervised warm-up of the registration network ``R`` before paired training.

Why: in Learning-to-Align training ``R`` learns only through ``L_con`` on the student's output,
which is poor for a long time, and at the paper's settings ``R`` stays at the identity field
(``docs/benchmarks.md``, "Learning to Align"). The training sections alone can teach ``R`` what
a misalignment looks like first: warp a crop ``y`` of a stained section by a random smooth field
``ψ`` and train ``R(y', warp(y, ψ)) = ψ``, where ``y'`` is ``y`` with jittered colours and added
noise (in training ``R`` compares the student's stain, not the section itself, with the section).
Only the user's own sections are used, and for aligned images ``R`` still returns (nearly) the
identity, so paired training starts where the paper's does, with an ``R`` that already moves.

The fields are a different family from the benchmark's misalignments (``benchmarks/lta_synthetic.py``:
a 4 x 4 control grid plus a rotation): a 3 x 3 control grid plus a translation, so the warm-up
does not know the answer it is tested on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import torch
from torch.nn import functional as F

from digital_stain.core.nets.registration import RegistrationNet, warp
from digital_stain.train.data import random_crops
from digital_stain.train.events import Progress, stop_requested

LR = 1e-3  # R is small and the target is exact: it learns quickly at this rate
BATCH = 4
MAX_SMOOTH = 3.0  # px, largest control vector of the smooth part
MAX_TRANSLATE = 5.0  # px per axis
GRID = 3


def random_fields(n: int, size: int, rng: np.random.Generator, max_smooth: float = MAX_SMOOTH,
                  max_translate: float = MAX_TRANSLATE, grid: int = GRID) -> torch.Tensor:
    """Random displacement fields, float32 ``(n, 2, size, size)`` in pixels (channel 0 x, 1 y).

    A ``grid x grid`` set of control vectors, uniform in ``[-max_smooth, max_smooth]`` per component
    and upsampled bicubically, plus one translation per field, uniform in
    ``[-max_translate, max_translate]`` per axis.
    """
    control = torch.from_numpy(rng.uniform(-max_smooth, max_smooth, (n, 2, grid, grid)).astype(np.float32))
    smooth = F.interpolate(control, size=(size, size), mode="bicubic", align_corners=True)
    shift = torch.from_numpy(rng.uniform(-max_translate, max_translate, (n, 2, 1, 1)).astype(np.float32))
    return smooth + shift


def jitter(images: torch.Tensor, rng: np.random.Generator, noise: float = 0.03) -> torch.Tensor:
    """Per-image, per-channel gain (0.85-1.15) and offset (±0.1), plus Gaussian noise, on [-1, 1] images."""
    n, c = images.shape[:2]
    gain = torch.from_numpy(rng.uniform(0.85, 1.15, (n, c, 1, 1)).astype(np.float32)).to(images.device)
    offset = torch.from_numpy(rng.uniform(-0.1, 0.1, (n, c, 1, 1)).astype(np.float32)).to(images.device)
    grain = torch.from_numpy(rng.normal(0.0, noise, images.shape).astype(np.float32)).to(images.device)
    return (images * gain + offset + grain).clamp(-1, 1)


def warm_up_registration(
    registration: RegistrationNet,
    sections: list,
    steps: int,
    crop: int,
    device: torch.device,
    seed: int = 0,
    progress: Callable[[Progress], None] | None = None,
    stop: threading.Event | None = None,
) -> list | None:
    """Train ``registration`` for ``steps`` steps to return known fields between a section and its warped copy.

    Parameters
    ----------
    registration : RegistrationNet
        Trained in place (Adam, lr :data:`LR`, batch :data:`BATCH`).
    sections : list of uint8 ``(Y, X, 3)``
        Stained sections (the training pairs'; never the held-out ones).
    steps, crop : int
        Crops are ``crop`` px square with flips and rotations; the loss is the mean end-point
        error in pixels, L1 per component, over the interior (a border as wide as the largest
        possible displacement is left out: there the warped copy repeats its edge).
    device : torch.device
    seed : int
        Crops, fields and jitter are drawn from ``default_rng([seed, 1, step])``: a run is repeatable.
    progress, stop : optional
        ``progress`` gets a message every 10 % of the steps; ``stop`` is checked before every step.

    Returns
    -------
    list of float or None
        The loss of every step (px), or ``None`` when stopped (``registration`` is then part-trained).
    """
    optimiser = torch.optim.Adam(registration.parameters(), lr=LR, betas=(0.5, 0.999))
    margin = int(np.ceil(np.hypot(MAX_SMOOTH, MAX_SMOOTH) + np.hypot(MAX_TRANSLATE, MAX_TRANSLATE)))
    inner = slice(margin, crop - margin) if crop > 2 * margin + 8 else slice(None)
    registration.train()
    losses = []
    for step in range(steps):
        if stop_requested(stop):
            return None
        rng = np.random.default_rng([seed, 1, step])
        batch = torch.from_numpy(random_crops(sections, BATCH, crop, rng)).to(device)
        section = batch.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        field = random_fields(BATCH, crop, rng).to(device)
        fixed = warp(section, field)  # fixed(p) = section(p + ψ(p)): R(section, fixed) should give ψ
        predicted = registration(jitter(section, rng), fixed).float()
        loss = (predicted - field)[..., inner, inner].abs().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if progress and (step + 1) % max(1, steps // 10) == 0:
            recent = float(np.mean(losses[-max(1, steps // 10):]))
            progress(Progress(0, 0, message=f"registration warm-up: step {step + 1}/{steps}, field error {recent:.2f} px"))
    return losses
