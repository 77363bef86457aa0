"""Synthetic dark-field from real H&E: paired data with a known answer.

The enhancer maps dark-field luma ``x`` to bright-field gray by
``z = c_b^{-1}(1 - c_d(x))``; run backwards on the gray of a real H&E image
``y`` it gives a dark-field image ``x = c_d^{-1}(1 - c_b(gray(y)))`` that
shows the same tissue. Blur, noise and 8-bit quantisation of the dim result
keep it from being trivially invertible, so a model stained from ``x`` can be
scored against ``y`` with PSNR, SSIM and nuclei agreement.
"""

from __future__ import annotations

import numpy as np

from digital_stain.core.arrays import InputError
from digital_stain.core.color import luma
from digital_stain.core.enhance import BINS, Enhancer


def darkfield_tint(darkfield: list[np.ndarray]) -> np.ndarray:
    """Mean colour of dark-field images relative to their luma, ``(3,)`` float (luma of the tint = 1).

    Real dark-field is dim and slightly coloured (DSD: bluish); synthetic
    images take this tint so they look like what the student was trained on.
    """
    total, count = np.zeros(3), 0
    for image in darkfield:  # a running sum: a folder of large images never sits in memory as float64
        pixels = np.asarray(image).reshape(-1, 3)
        total += pixels.sum(axis=0, dtype=np.float64)
        count += len(pixels)
    if count == 0 or luma(total) <= 0:
        raise InputError("the dark-field images are all black: no colour to take a tint from.")
    mean = total / count
    return mean / float(luma(mean))


def _inverse_cdf(counts: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """Values in [0, 1] whose CDF (over ``BINS`` histogram bins) is ``quantiles``."""
    cdf = np.cumsum(np.asarray(counts, np.float64))
    cdf /= cdf[-1]
    upper = (np.arange(BINS) + 1.0) / BINS  # each bin's mass reached at its upper edge
    keep = np.concatenate([[True], np.diff(cdf) > 0])
    return np.interp(quantiles, np.concatenate([[0.0], cdf[keep]]), np.concatenate([[0.0], upper[keep]]))


def synthesize_darkfield(
    stained: np.ndarray,
    enhancer: Enhancer,
    tint: np.ndarray = (1.0, 1.0, 1.0),
    *,
    blur_sigma: float = 1.0,
    noise_std: float = 0.003,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """A dark-field image of the tissue in an H&E image, by the enhancer's inverse.

    Parameters
    ----------
    stained : ndarray, shape (Y, X, 3), uint8
        Real H&E.
    enhancer : Enhancer
        Supplies ``c_b`` (bright-field gray CDF) and ``c_d`` (dark-field luma CDF).
    tint : sequence of 3 floats
        Colour of the dark-field relative to its luma (see :func:`darkfield_tint`).
    blur_sigma : float
        Gaussian blur in pixels (optics), applied to the dark-field luma.
    noise_std : float
        Gaussian noise std on the [0, 1] scale (sensor), added after the blur.
    rng : numpy Generator, optional
        For the noise (default: seeded from 0, so calls are reproducible).

    Returns
    -------
    ndarray, shape (Y, X, 3), uint8: the synthetic dark-field.
    """
    from scipy import ndimage

    rng = rng or np.random.default_rng(0)
    gray = luma(np.asarray(stained, np.float64) / 255.0)
    c_b = np.cumsum(np.asarray(enhancer.brightfield_counts, np.float64))
    c_b /= c_b[-1]
    centres = (np.arange(BINS) + 0.5) / BINS
    quantile = 1.0 - np.interp(gray, centres, c_b)
    darkfield = _inverse_cdf(enhancer.darkfield_counts, quantile)
    if blur_sigma > 0:
        darkfield = ndimage.gaussian_filter(darkfield, blur_sigma, mode="reflect")
    darkfield = darkfield + rng.normal(0.0, noise_std, darkfield.shape)
    rgb = darkfield[..., None] * np.asarray(tint, np.float64)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
