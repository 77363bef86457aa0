"""Colour conversions used by the networks and the enhancer.

Conventions (see ``docs/architecture.md``): RGB values are sRGB-encoded in
[0, 1]; torch tensors are ``(N, C, H, W)``; numpy arrays are ``(..., C)``.
CIE Lab uses the D65 white point, ``L`` in [0, 100] and ``a``, ``b`` roughly in
[-110, 110]. The torch functions are differentiable and match
``skimage.color.rgb2lab`` / ``lab2rgb`` to float precision.

"Gray" is Rec.601 luma of the *encoded* values, ``0.299 R + 0.587 G + 0.114 B``:
it is what the authors' enhancer used (their enhanced images are a look-up
table of exactly this quantity), so the enhancer, the teacher's input and the
structure score all use it.
"""

from __future__ import annotations

import numpy as np
import torch

LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# sRGB (linear) -> XYZ, D65
_RGB_TO_XYZ = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]],
    dtype=torch.float64,
)
_XYZ_TO_RGB = torch.linalg.inv(_RGB_TO_XYZ)
_WHITE_D65 = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)
_EPS = 216.0 / 24389.0  # (6/29)^3
_KAPPA = 24389.0 / 27.0


def luma(rgb: np.ndarray) -> np.ndarray:
    """Rec.601 luma of an RGB array.

    Parameters
    ----------
    rgb : ndarray, shape (..., 3)
        Any real dtype; the result keeps the input's scale.

    Returns
    -------
    ndarray, shape (...), float32
    """
    w = np.asarray(LUMA_WEIGHTS, dtype=np.float32)
    return np.asarray(rgb, dtype=np.float32) @ w


def luma_torch(rgb: torch.Tensor) -> torch.Tensor:
    """Rec.601 luma of ``(N, 3, H, W)`` RGB, returned as ``(N, 1, H, W)``."""
    w = torch.tensor(LUMA_WEIGHTS, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return (rgb * w).sum(dim=1, keepdim=True)


def _mat(m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return m.to(dtype=like.dtype, device=like.device)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], ``(N, 3, H, W)`` -> CIE Lab ``(N, 3, H, W)`` (L in [0, 100])."""
    rgb = rgb.clamp(0.0, 1.0)
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).clamp_min(1e-12) ** 2.4, rgb / 12.92)
    xyz = torch.einsum("ij,njhw->nihw", _mat(_RGB_TO_XYZ, rgb), linear)
    xyz = xyz / _mat(_WHITE_D65, rgb).view(1, 3, 1, 1)
    f = torch.where(xyz > _EPS, xyz.clamp_min(1e-12) ** (1.0 / 3.0), (_KAPPA * xyz + 16.0) / 116.0)
    fx, fy, fz = f[:, 0:1], f[:, 1:2], f[:, 2:3]
    lightness = 116.0 * fy - 16.0
    return torch.cat([lightness, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIE Lab ``(N, 3, H, W)`` -> sRGB in [0, 1] ``(N, 3, H, W)`` (out-of-gamut clipped)."""
    lightness, a, b = lab[:, 0:1], lab[:, 1:2], lab[:, 2:3]
    fy = (lightness + 16.0) / 116.0
    fx = fy + a / 500.0
    fz = (fy - b / 200.0).clamp_min(0.0)
    f = torch.cat([fx, fy, fz], dim=1)
    xyz = torch.where(f > 6.0 / 29.0, f**3, (116.0 * f - 16.0) / _KAPPA)
    xyz = xyz * _mat(_WHITE_D65, lab).view(1, 3, 1, 1)
    linear = torch.einsum("ij,njhw->nihw", _mat(_XYZ_TO_RGB, lab), xyz).clamp(0.0, 1.0)
    rgb = torch.where(linear > 0.0031308, 1.055 * linear.clamp_min(1e-12) ** (1.0 / 2.4) - 0.055, 12.92 * linear)
    return rgb.clamp(0.0, 1.0)


def gray_to_lightness(gray: torch.Tensor) -> torch.Tensor:
    """Lab lightness ``L`` of the neutral colour ``(g, g, g)``, for ``g`` in [0, 1].

    The teacher colourises a gray image; its lightness is that of the gray seen
    as a neutral RGB colour, so a gray input and its colourised output have
    the same luminance.
    """
    g = gray.clamp(0.0, 1.0)
    y = torch.where(g > 0.04045, ((g + 0.055) / 1.055).clamp_min(1e-12) ** 2.4, g / 12.92)
    f = torch.where(y > _EPS, y.clamp_min(1e-12) ** (1.0 / 3.0), (_KAPPA * y + 16.0) / 116.0)
    return 116.0 * f - 16.0
