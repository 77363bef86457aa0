"""Image quality measures that need no downloaded network.

With a reference (paired or synthetic data): :func:`psnr`, :func:`ssim` and
:func:`nuclei_dice` (where the hematoxylin is). Without one:
:func:`structure_score` (edges kept from the enhanced input, the paper's
LPIPS-c idea), :func:`stain_style_distance` (colour distribution against real
H&E) and NIQE (:func:`digital_stain.niqe.niqe`). Images are ``(Y, X, 3)`` RGB,
uint8 or float in [0, 1], as everywhere in the package.
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


# -- against a reference (paired data) --------------------------------------------------------


def _unit(image: np.ndarray) -> np.ndarray:
    """Unsigned integers -> float64 in [0, 1] (by their dtype's maximum); floats are taken to be in [0, 1]."""
    image = np.asarray(image)
    if image.dtype.kind == "u":
        return image.astype(np.float64) / np.iinfo(image.dtype).max
    if image.dtype.kind != "f":
        raise ValueError(f"images must be unsigned integers or floats in [0, 1], not {image.dtype}.")
    return image.astype(np.float64)


def _check_same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"prediction {a.shape} and reference {b.shape} differ in shape; compare images of the same size.")


def psnr(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB, over [0, 1] (uint8 inputs are scaled by 1/255).

    Parameters
    ----------
    prediction, reference : ndarray, same shape, e.g. (Y, X, 3)
    """
    a, b = _unit(prediction), _unit(reference)
    _check_same_shape(a, b)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def ssim(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Structural similarity (Wang et al. 2004, Gaussian window σ=1.5 as in their paper), over [0, 1].

    RGB images ``(Y, X, 3)`` are compared channel by channel and averaged.
    """
    from skimage.metrics import structural_similarity

    a, b = _unit(prediction), _unit(reference)
    _check_same_shape(a, b)
    if min(a.shape[:2]) < 7:
        raise ValueError(f"SSIM needs images of at least 7 x 7 pixels (its window); these are {a.shape[:2]}.")
    channel_axis = -1 if a.ndim == 3 else None
    return float(structural_similarity(a, b, data_range=1.0, channel_axis=channel_axis,
                                       gaussian_weights=True, sigma=1.5, use_sample_covariance=False))


def hematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Hematoxylin optical density by colour deconvolution (Ruifrok & Johnston), ``(Y, X)`` float.

    Higher where nuclei (hematoxylin-stained) are.
    """
    from skimage.color import rgb2hed

    return rgb2hed(np.clip(_unit(rgb), 0.0, 1.0))[..., 0]


def nuclei_mask(rgb: np.ndarray) -> np.ndarray:
    """Nuclei of an H&E RGB image: hematoxylin density above its Otsu threshold, ``(Y, X)`` bool.

    Each image gets its own threshold, so the score compares where nuclei
    are, not how dark a model paints them.
    """
    from skimage.filters import threshold_otsu

    density = hematoxylin(rgb)
    if np.ptp(density) == 0:
        return np.zeros(density.shape, bool)
    return density > threshold_otsu(density)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def nuclei_dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Agreement of the nuclei of a stained prediction with those of the real H&E (Dice of :func:`nuclei_mask`)."""
    _check_same_shape(np.asarray(prediction), np.asarray(reference))
    return dice(nuclei_mask(prediction), nuclei_mask(reference))


# -- without a reference ----------------------------------------------------------------------


def _gradients(gray: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage

    return np.stack([ndimage.gaussian_filter(gray, sigma, order=(1, 0)),
                     ndimage.gaussian_filter(gray, sigma, order=(0, 1))])


def structure_score(stained: np.ndarray, enhanced: np.ndarray, sigma: float = 2.0) -> float:
    """Structure kept from the input: correlation of the gradients of the output's gray and of the enhanced image.

    The paper's LPIPS-c idea (compare the gray of the output with the
    enhanced image ``z``) without a downloaded network. Gradients, not
    intensities, so a model may remap brightness but not move or invent
    edges; Gaussian-derivative gradients at ``sigma`` pixels, so edges of
    cells count and the pixel noise of the enhanced image (which a good
    stain need not copy) does not. 1 = the same edges, 0 = unrelated,
    negative = inverted contrast. On DSD tiles a 3-pixel shift of the
    enhanced image itself scores about 0.64.

    Parameters
    ----------
    stained : ndarray, shape (Y, X, 3), uint8 or float in [0, 1]
    enhanced : ndarray, shape (Y, X), float in [0, 1] (or uint8)
    sigma : float
        Scale of the gradients in pixels (default 2: nuclei here are 10-15 px across).
    """
    from .color import luma

    gray = luma(_unit(stained))
    z = _unit(enhanced)
    _check_same_shape(gray, z)
    g, h = _gradients(gray.astype(np.float64), sigma).ravel(), _gradients(z, sigma).ravel()
    g, h = g - g.mean(), h - h.mean()
    norm = np.sqrt((g * g).sum() * (h * h).sum())
    return 0.0 if norm == 0 else float((g * h).sum() / norm)
