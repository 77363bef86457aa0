"""Image quality measures that need no downloaded network.

``stain_style_distance`` compares colour distributions (does it look like
H&E?); it is the reference-free stain-style score of the evaluation issue.
"""

from __future__ import annotations

import numpy as np
import torch

from .color import rgb_to_lab


def lab_pixels(rgb: np.ndarray, max_pixels: int = 200_000, seed: int = 0) -> np.ndarray:
    """Lab values of (a random subset of) the pixels of RGB images.

    Parameters
    ----------
    rgb : ndarray, shape (..., Y, X, 3), float in [0, 1] or uint8

    Returns
    -------
    ndarray, shape (n, 3), float32: L in [0, 100], a, b.
    """
    rgb = np.asarray(rgb)
    unit = rgb.astype(np.float32) / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float32)
    flat = unit.reshape(-1, 3)
    if len(flat) > max_pixels:
        flat = flat[np.random.default_rng(seed).choice(len(flat), max_pixels, replace=False)]
    tensor = torch.from_numpy(np.ascontiguousarray(flat.T)).reshape(1, 3, -1, 1)
    return rgb_to_lab(tensor)[0, :, :, 0].T.numpy()


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, projections: int = 128, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between two point clouds ``(n, d)`` and ``(m, d)``.

    The mean over random unit directions of the 1-D Wasserstein distance of
    the projections (computed on matched quantiles). Same units as the points.
    """
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(projections, a.shape[1]))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    quantiles = np.linspace(0.0, 1.0, 1001)
    pa = np.quantile(a @ directions.T, quantiles, axis=0)
    pb = np.quantile(b @ directions.T, quantiles, axis=0)
    return float(np.abs(pa - pb).mean())


def stain_style_distance(images: np.ndarray, reference: np.ndarray, seed: int = 0) -> float:
    """Sliced Wasserstein distance in Lab between the colours of ``images`` and of real H&E ``reference``.

    Lower is more H&E-like. Both are RGB, ``(..., Y, X, 3)``, uint8 or float in [0, 1].
    """
    return sliced_wasserstein(lab_pixels(images, seed=seed), lab_pixels(reference, seed=seed + 1), seed=seed)
