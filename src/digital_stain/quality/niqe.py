"""NIQE, the Natural Image Quality Evaluator (no reference image needed).

Mittal, Soundararajan & Bovik, "Making a 'Completely Blind' Image Quality
Analyzer", IEEE Signal Processing Letters 20(3), 2013. Lower is better: the
score is the distance between a multivariate Gaussian fitted to natural-scene
statistics of the image's 96 x 96 blocks and the one fitted by the authors to
pristine natural photographs.

This is our own implementation of the authors' MATLAB release
(``computequality.m``, ``computefeature.m``, ``estimateaggdparam.m``), using
their pristine model (``modelparameters.mat``, shipped as
``data/niqe_pristine.json``), in float64 like MATLAB. It agrees with BasicSR's
``calculate_niqe`` (which reports matching MATLAB to 1e-7 on its test image) to
~1e-13 when BasicSR is run in float64 (with the flat-window rule of
:func:`mscn`), and to ~3e-3 relative at worst as shipped, where its float32 arithmetic moves some AGGD shape estimates by a grid
step; see ``tests/test_niqe.py``.

The pristine model is fitted to photographs of natural scenes, not to
microscopy, so on tissue images NIQE is a relative measure only: compare
methods on the same inputs, do not read absolute values as "quality".
"""

from __future__ import annotations

import functools
import json
import math
from importlib import resources

import numpy as np
from scipy.ndimage import correlate1d
from scipy.special import gamma

__all__ = [
    "niqe",
    "niqe_features",
    "pristine_model",
    "luma",
    "mscn",
    "imresize_half",
    "aggd_fit",
    "block_features",
]

BLOCK_SIZE = 96
"""Block side at full scale (the reference's recommended and only trained value)."""

MIN_SIZE = 2 * BLOCK_SIZE
"""Smallest image side accepted: two blocks per side, so that the block features have a covariance."""

# Grid of AGGD shape values searched by the reference (MATLAB ``0.2:0.001:10``, 9801 values).
# start + k * step, as numpy's arange computes it (MATLAB's colon differs by rounding at most).
_ALPHA_GRID = 0.2 + 0.001 * np.arange(9801)
# The generalized Gaussian ratio rho(alpha) = Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a)) on that grid.
_RHO_GRID = gamma(2.0 / _ALPHA_GRID) ** 2 / (gamma(1.0 / _ALPHA_GRID) * gamma(3.0 / _ALPHA_GRID))

# |image - local mean| below this (0-255 scale) is floating-point noise of a flat window, see mscn().
_FLAT_TOLERANCE = 1e-9

# Neighbour offsets (rows, columns) of the paired products: horizontal, vertical, main and anti-diagonal.
_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))


@functools.lru_cache(maxsize=1)
def pristine_model() -> tuple[np.ndarray, np.ndarray]:
    """The pristine multivariate Gaussian of the MATLAB reference release.

    Returns
    -------
    mu : ndarray, shape (36,), float64
        Mean of the 36 features (18 per scale) over pristine natural images.
    cov : ndarray, shape (36, 36), float64
        Their covariance (symmetric, positive definite).

    Notes
    -----
    Read from ``data/niqe_pristine.json`` once and cached; the arrays are
    read-only so that the cache cannot be altered by a caller.
    """
    text = resources.files("digital_stain").joinpath("data", "niqe_pristine.json").read_text(encoding="utf-8")
    data = json.loads(text)
    mu = np.asarray(data["mu"], dtype=np.float64)
    cov = np.asarray(data["cov"], dtype=np.float64)
    mu.setflags(write=False)
    cov.setflags(write=False)
    return mu, cov


def luma(image: np.ndarray) -> np.ndarray:
    """8-bit gray levels of an image, as the reference sees them.

    Parameters
    ----------
    image : ndarray, shape (Y, X), (Y, X, 1) or (Y, X, 3)
        Gray or RGB; uint8, or float in [0, 1] (scaled by 255, clipped to
        [0, 255]).

    Returns
    -------
    ndarray, shape (Y, X), float64
        Integer values on the 0-255 scale. RGB becomes the Y (luma) channel
        of ITU-R BT.601 YCbCr as MATLAB's ``rgb2ycbcr`` computes it,
        ``16 + (65.481 R + 128.553 G + 24.966 B) / 255`` for R, G, B in
        0-255, so in [16, 235]; this is BasicSR's default
        (``convert_to='y'``), so that our values can be checked against it.
        The MATLAB reference itself uses ``rgb2gray``, so on RGB images its
        values differ from both (gray images give the same value in all
        three).

    Notes
    -----
    Values are rounded to integers because the reference works on 8-bit
    images (``imread`` output, ``rgb2ycbcr`` of uint8 rounds), and so that
    a float image ``u8 / 255`` gives exactly the value of ``u8``.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3)):
        raise ValueError(f"NIQE takes a (Y, X) gray or (Y, X, 3) RGB image; got shape {image.shape}.")
    if image.dtype == np.uint8:
        levels = image.astype(np.float64)
    elif np.issubdtype(image.dtype, np.floating):
        levels = np.clip(image.astype(np.float64) * 255.0, 0.0, 255.0)
    else:
        raise ValueError(f"NIQE takes uint8 or float images in [0, 1]; got dtype {image.dtype}.")
    if levels.ndim == 3:
        levels = 16.0 + levels @ np.array([65.481, 128.553, 24.966]) / 255.0
    # MATLAB rounds halves away from zero; all values are >= 0 here.
    return np.floor(levels + 0.5)


def _gaussian_window_1d(size: int = 7, sigma: float = 7.0 / 6.0) -> np.ndarray:
    """1-D factor of MATLAB's ``fspecial('gaussian', size, sigma)``, shape (size,), summing to 1."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    window = np.exp(-(x**2) / (2.0 * sigma**2))
    return window / window.sum()


def mscn(image: np.ndarray) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients of a gray image.

    Parameters
    ----------
    image : ndarray, shape (Y, X), float
        Gray levels on the 0-255 scale (the ``+ 1`` below assumes it).

    Returns
    -------
    ndarray, shape (Y, X), float64
        ``(image - mu) / (sigma + 1)`` with ``mu`` and ``sigma`` the local
        mean and standard deviation under a 7 x 7 Gaussian window
        (sigma 7/6, normalised to sum 1), borders replicated, as the
        reference's ``imfilter(..., 'replicate')``.
    """
    image = np.asarray(image, dtype=np.float64)
    window = _gaussian_window_1d()

    # The 2-D Gaussian is separable: two 1-D passes give the same window, 7x fewer operations.
    def smooth(a: np.ndarray) -> np.ndarray:
        return correlate1d(correlate1d(a, window, axis=0, mode="nearest"), window, axis=1, mode="nearest")

    mu = smooth(image)
    # abs() as in the reference: rounding can make the variance estimate slightly negative on flat areas.
    sigma = np.sqrt(np.abs(smooth(image * image) - mu * mu))
    centred = image - mu
    # Where the window is flat, image - mu is 0, but rounding leaves +-1e-13 whose *sign* decides
    # whether the sample counts in the left or the right half of the AGGD fits: that moves the
    # features by whole grid steps on images with flat areas (dark-field background), depending on
    # floating-point details only. Snap that noise to the exact 0 (genuine values are >~1e-4).
    centred[np.abs(centred) < _FLAT_TOLERANCE] = 0.0
    return centred / (sigma + 1.0)


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's ``'bicubic'``), elementwise."""
    ax = np.abs(x)
    ax2, ax3 = ax**2, ax**3
    inner = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    outer = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return inner + outer


def _half_resize_weights(length: int) -> tuple[np.ndarray, np.ndarray]:
    """Taps of MATLAB's ``imresize(..., 0.5)`` along one axis.

    Returns
    -------
    weights : ndarray, shape (ceil(length / 2), 10), float64
        Each row sums to 1.
    indices : ndarray, same shape, int
        Input indices in ``[0, length)``, edges mirrored (``symmetric``:
        the edge sample repeated) as MATLAB does.
    """
    scale = 0.5
    # Antialiasing: the kernel is stretched by 1/scale (width 4 -> 8) and scaled by scale.
    width = 4.0 / scale
    out_length = math.ceil(length * scale)
    # 1-based output coordinates mapped to 1-based input coordinates (pixel centres aligned).
    u = np.arange(1, out_length + 1, dtype=np.float64) / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    taps = math.ceil(width) + 2
    indices = left[:, None] + np.arange(taps)[None, :]
    weights = scale * _cubic(scale * (u[:, None] - indices))
    weights /= weights.sum(axis=1, keepdims=True)
    # To 0-based, then mirror out-of-range indices: ..., 1, 0 | 0, 1, ..., L-1 | L-1, L-2, ...
    zero_based = indices.astype(np.int64) - 1
    period = np.concatenate([np.arange(length), np.arange(length - 1, -1, -1)])
    return weights, period[np.mod(zero_based, 2 * length)]


def imresize_half(image: np.ndarray) -> np.ndarray:
    """Halve a gray image like MATLAB's ``imresize(image, 0.5)``.

    Bicubic (a = -0.5) with antialiasing (kernel widened by 2), symmetric
    padding at the edges, no clipping or rounding (as MATLAB does for a
    double image).

    Parameters
    ----------
    image : ndarray, shape (Y, X), float

    Returns
    -------
    ndarray, shape (ceil(Y / 2), ceil(X / 2)), float64
    """
    image = np.asarray(image, dtype=np.float64)
    # Separable: rows first, then columns (MATLAB's order when both scales are equal).
    for axis in (0, 1):
        weights, indices = _half_resize_weights(image.shape[axis])
        moved = np.moveaxis(image, axis, 0)
        out = np.zeros((weights.shape[0],) + moved.shape[1:])
        # Loop over the 10 taps rather than gathering all at once: 10 x less memory.
        for k in range(weights.shape[1]):
            out += weights[:, k, None] * moved[indices[:, k]]
        image = np.moveaxis(out, 0, axis)
    return image


def aggd_fit(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit an asymmetric generalized Gaussian to each row of samples.

    Moment matching as the reference's ``estimateaggdparam.m``: the shape is
    the value of the grid 0.2:0.001:10 whose ratio
    ``Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a))`` is nearest to the
    bias-corrected sample ratio.

    Parameters
    ----------
    samples : ndarray, shape (n, m), float
        ``n`` independent sample sets.

    Returns
    -------
    alpha : ndarray, shape (n,), float64
        Shape, in [0.2, 10]. 0.2 (the first grid value) where the ratio is
        undefined, as in the reference.
    beta_left, beta_right : ndarray, shape (n,), float64
        Scales of the left and right halves,
        ``std * sqrt(Gamma(1/a) / Gamma(3/a))`` with ``std`` the root mean
        square of the negative (positive) samples. NaN where a set has no
        negative (positive) sample.
    """
    x = np.asarray(samples, dtype=np.float64)
    square = x * x
    negative, positive = x < 0, x > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        left_std = np.sqrt((square * negative).sum(axis=1) / negative.sum(axis=1))
        right_std = np.sqrt((square * positive).sum(axis=1) / positive.sum(axis=1))
        gamma_hat = left_std / right_std
        r_hat = np.abs(x).mean(axis=1) ** 2 / square.mean(axis=1)
        r_hat_norm = r_hat * (gamma_hat**3 + 1) * (gamma_hat + 1) / (gamma_hat**2 + 1) ** 2
    # The reference takes argmin((rho_grid - r)^2) over the grid. rho is strictly increasing, so
    # the argmin is one of the two grid neighbours of r: O(log n) instead of 9801 differences per set.
    upper = np.clip(np.searchsorted(_RHO_GRID, r_hat_norm), 1, _RHO_GRID.size - 1)
    lower = upper - 1
    # Ties go to the lower value, as argmin returns the first minimum.
    pick_upper = (_RHO_GRID[upper] - r_hat_norm) ** 2 < (_RHO_GRID[lower] - r_hat_norm) ** 2
    position = np.where(pick_upper, upper, lower)
    # An undefined ratio (NaN) gives index 0 in MATLAB's min() and numpy's argmin alike.
    position = np.where(np.isnan(r_hat_norm), 0, position)
    alpha = _ALPHA_GRID[position]
    to_scale = np.sqrt(gamma(1.0 / alpha) / gamma(3.0 / alpha))
    return alpha, left_std * to_scale, right_std * to_scale


def block_features(blocks: np.ndarray) -> np.ndarray:
    """The 18 NIQE features of each MSCN block (the reference's ``computefeature.m``).

    Parameters
    ----------
    blocks : ndarray, shape (n, b, b), float
        MSCN coefficients of ``n`` square blocks.

    Returns
    -------
    ndarray, shape (n, 18), float64
        ``[alpha, (beta_l + beta_r) / 2]`` of the coefficients, then for
        the horizontal, vertical, diagonal and anti-diagonal neighbour
        products ``[alpha, mean, beta_l, beta_r]`` with
        ``mean = (beta_r - beta_l) Gamma(2/alpha) / Gamma(1/alpha)``.
        The betas are AGGD scale parameters (as in the reference code and
        its pristine model), not the variances of the paper's notation.
    """
    blocks = np.asarray(blocks, dtype=np.float64)
    n = blocks.shape[0]
    alpha, beta_l, beta_r = aggd_fit(blocks.reshape(n, -1))
    columns = [alpha, (beta_l + beta_r) / 2.0]
    for shift in _SHIFTS:
        # circshift within the block, as the reference (blkproc hands each block to computefeature).
        products = blocks * np.roll(blocks, shift, axis=(1, 2))
        alpha, beta_l, beta_r = aggd_fit(products.reshape(n, -1))
        mean = (beta_r - beta_l) * gamma(2.0 / alpha) / gamma(1.0 / alpha)
        columns += [alpha, mean, beta_l, beta_r]
    return np.stack(columns, axis=1)


def _blocks(image: np.ndarray, size: int) -> np.ndarray:
    """Non-overlapping blocks, row-major: (Y, X) with sides multiples of size -> (n, size, size)."""
    rows, cols = image.shape[0] // size, image.shape[1] // size
    return image.reshape(rows, size, cols, size).swapaxes(1, 2).reshape(rows * cols, size, size)


def _check_size(shape: tuple[int, ...]) -> None:
    if shape[0] < MIN_SIZE or shape[1] < MIN_SIZE:
        raise ValueError(
            f"NIQE needs an image of at least {MIN_SIZE} x {MIN_SIZE} pixels (after crop_border): "
            f"it is computed on {BLOCK_SIZE} x {BLOCK_SIZE} blocks and needs at least two per side; "
            f"got {shape[0]} x {shape[1]}."
        )


def niqe_features(gray: np.ndarray) -> np.ndarray:
    """The 36 NIQE features of each 96 x 96 block of a gray image.

    Parameters
    ----------
    gray : ndarray, shape (Y, X), float
        Gray levels on the 0-255 scale (see :func:`luma`), Y and X >= 192.
        Cropped at the bottom and right to multiples of 96, as the
        reference does.

    Returns
    -------
    ndarray, shape (floor(Y / 96) * floor(X / 96), 36), float64
        Per block (row-major), the 18 features of :func:`block_features`
        at full scale, then the 18 of the same area at half scale
        (:func:`imresize_half`, 48 x 48 blocks).
    """
    gray = np.asarray(gray, dtype=np.float64)
    _check_size(gray.shape)
    rows, cols = gray.shape[0] // BLOCK_SIZE, gray.shape[1] // BLOCK_SIZE
    image = gray[: rows * BLOCK_SIZE, : cols * BLOCK_SIZE]
    scales = []
    for block_size in (BLOCK_SIZE, BLOCK_SIZE // 2):
        scales.append(block_features(_blocks(mscn(image), block_size)))
        image = imresize_half(image)
    return np.concatenate(scales, axis=1)


def niqe(image: np.ndarray, crop_border: int = 0) -> float:
    """NIQE score of an image; lower means closer to pristine natural images.

    Parameters
    ----------
    image : ndarray, shape (Y, X) or (Y, X, 3)
        Gray or RGB, uint8 or float in [0, 1]. RGB is reduced to the Y
        channel of YCbCr (BasicSR's default; MATLAB's reference uses
        ``rgb2gray``), see :func:`luma`. At least 192 x 192 after cropping.
        A gray image stored as three equal channels is therefore scored on
        the Y range [16, 235], not like the same image given as (Y, X).
    crop_border : int, optional
        Pixels removed from each edge before the computation (e.g. the
        scale factor in super-resolution benchmarks).

    Returns
    -------
    float
        ``sqrt((mu_p - mu_d) pinv((S_p + S_d) / 2) (mu_p - mu_d)^T)`` with
        ``mu_p, S_p`` the pristine model (:func:`pristine_model`), ``mu_d``
        the NaN-ignoring mean of the block features (:func:`niqe_features`)
        and ``S_d`` their covariance over the blocks without NaN. NaN when
        fewer than two blocks have finite features (e.g. a flat image).

    Raises
    ------
    ValueError
        If the image is smaller than 192 x 192 (after ``crop_border``), or
        of an unsupported shape or dtype.
    """
    gray = luma(image)
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0; got {crop_border}.")
    if crop_border > 0:
        gray = gray[crop_border:-crop_border, crop_border:-crop_border]
    features = niqe_features(gray)

    complete = features[~np.isnan(features).any(axis=1)]
    if len(complete) < 2:
        return float("nan")
    mu_p, cov_p = pristine_model()
    # Every column has >= 2 finite values here, so nanmean is defined (the reference's nanmean).
    mu_d = np.nanmean(features, axis=0)
    cov_d = np.cov(complete, rowvar=False)
    diff = mu_p - mu_d
    distance = diff @ np.linalg.pinv((cov_p + cov_d) / 2.0) @ diff
    # (S_p + S_d) / 2 is positive definite, so the distance is >= 0 but for rounding.
    return float(np.sqrt(max(distance, 0.0)))
