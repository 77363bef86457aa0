"""Losses of the student beyond the paper's: a structure loss on the enhanced gray's gradients.

The student learns from a teacher whose stain keeps the enhanced gray's edges exactly (its
structure score is 0.999) and from a discriminator that only asks for H&E-looking colour; the
paper's losses let a small student move or soften edges (nuclei Dice below its teacher's,
``docs/benchmarks.md``). ``structure_loss`` asks the gray of the student's stain to have the
gradients of the enhanced image, up to a gain and an offset (a correlation, so the student may
still remap brightness, as H&E does). Gradients are Gaussian derivatives at ``sigma`` 1 px: cell
edges count, and the validation's structure score (sigma 2) stays a separate check.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from digital_stain.core.color import luma_torch


def _derivative_kernels(sigma: float, device, dtype) -> torch.Tensor:
    """``(2, 1, k, k)``: Gaussian derivative along y, then along x."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    gauss = torch.exp(-0.5 * (t / sigma) ** 2)
    gauss = gauss / gauss.sum()
    derivative = t * gauss / (t * t * gauss).sum()  # cross-correlation (conv2d) of a ramp gives its slope
    return torch.stack([torch.outer(derivative, gauss), torch.outer(gauss, derivative)])[:, None]


def gradients(gray: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Gaussian-derivative gradients of ``(N, 1, Y, X)`` gray images: ``(N, 2, Y, X)`` (reflect-padded)."""
    kernels = _derivative_kernels(sigma, gray.device, gray.dtype)
    pad = kernels.shape[-1] // 2
    return F.conv2d(F.pad(gray, (pad, pad, pad, pad), mode="reflect"), kernels)


def structure_loss(stained: torch.Tensor, enhanced: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """``1 - corr`` of the gradients of the stain's gray and of the enhanced gray, averaged over the batch.

    Parameters
    ----------
    stained : Tensor, shape (N, 3, Y, X)
        The student's RGB output, in [-1, 1].
    enhanced : Tensor, shape (N, 1, Y, X)
        The enhanced gray it was given, in [-1, 1].
    sigma : float
        Scale of the gradients in pixels.

    Returns
    -------
    Tensor, shape ()
        0 when the gradients agree up to a positive gain, 1 when unrelated, up to 2 when inverted.
    """
    g = gradients(luma_torch(stained.float()), sigma).flatten(1)
    h = gradients(enhanced.float(), sigma).flatten(1)
    g, h = g - g.mean(1, keepdim=True), h - h.mean(1, keepdim=True)
    corr = (g * h).sum(1) / torch.sqrt((g * g).sum(1) * (h * h).sum(1)).clamp_min(1e-12)
    return (1.0 - corr).mean()
