"""Input checking and value scaling, shared by the library, the CLI and the widgets.

The conventions are written down once, in ``docs/architecture.md``:

* a plane is ``(Y, X)`` (gray) or ``(Y, X, C)`` with ``C`` in {1, 3, 4}
  (RGBA: alpha is dropped); channels last;
* a stack is ``(..., Y, X[, C])``, stained plane by plane;
* ``uint8`` is scaled by 255, ``uint16`` by 65535; floats in [0, 1] are taken
  as they are, other floats are stretched from their own [min, max] (and the
  scaling is reported); values are never clipped to 8 bits on the way in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class InputError(ValueError):
    """An input the user gave cannot be stained; the message says why and what to do."""


@dataclass(frozen=True)
class ValueScaling:
    """How raw values were mapped to [0, 1]: ``unit = (raw - offset) / scale``."""

    offset: float
    scale: float
    source: str  # e.g. "uint8 / 255"

    def as_dict(self) -> dict:
        return {"offset": self.offset, "scale": self.scale, "source": self.source}


MIN_SIDE = 8


def split_planes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Split an array shape into ``(stack dims, plane dims)``.

    A trailing axis of length 1, 3 or 4 is a channel axis; anything before the
    last two spatial axes is a stack of planes.
    """
    if len(shape) < 2:
        raise InputError(f"an image needs at least 2 dimensions (Y, X); got shape {shape}.")
    if len(shape) >= 3 and shape[-1] in (1, 3, 4):
        return tuple(shape[:-3]), tuple(shape[-3:])
    if len(shape) >= 3 and shape[-1] in (2, 5, 6) and shape[-1] < min(shape[-3:-1]):
        raise InputError(
            f"an image with {shape[-1]} channels (shape {shape}) cannot be stained: dark-field input must be "
            "gray (1 channel) or RGB (3 channels; RGBA's alpha is dropped). Pick one channel or merge them to RGB first."
        )
    return tuple(shape[:-2]), tuple(shape[-2:])


def plain_array(image) -> np.ndarray:
    """``image`` as a numpy array; a masked array whose mask hides pixels is refused (staining would ignore it)."""
    if isinstance(image, np.ma.MaskedArray):
        if np.ma.getmaskarray(image).any():
            raise InputError(
                f"the image is a masked array with {int(np.ma.getmaskarray(image).sum())} masked pixel(s); staining "
                "cannot leave pixels out. Fill them first (e.g. image.filled(0)) and pass a plain array.")
        return np.asarray(image.data)
    return np.asarray(image)


def check_plane_shape(shape: tuple[int, ...]) -> None:
    """Refuse planes too small to stain."""
    ny, nx = shape[0], shape[1]
    if ny == 0 or nx == 0:
        raise InputError(f"the image is empty (shape {shape}); open an image with pixels in it.")
    if min(ny, nx) < MIN_SIDE:
        raise InputError(
            f"the image is {ny} x {nx} pixels; digital staining needs at least {MIN_SIDE} x {MIN_SIDE} "
            "(it looks at cells and their surroundings)."
        )


def check_dtype(dtype) -> np.dtype:
    """Refuse pixel types that cannot be stained (booleans, strings, complex, objects)."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        raise InputError("a boolean mask cannot be stained; open the dark-field image itself.")
    if dtype.kind not in "uif":
        raise InputError(f"pixel type {dtype} cannot be stained; use integers or floats.")
    return dtype


def scaling_of(image) -> ValueScaling:
    """:func:`value_scaling` of a numpy array, or of a dask array (min and max computed lazily, only when needed)."""
    if isinstance(image, np.ndarray):
        return value_scaling(image)
    dtype = check_dtype(image.dtype)
    described = f"{dtype.name} (lazy)"
    if dtype.kind == "u" and dtype.itemsize <= 2:
        return ValueScaling(0.0, float(np.iinfo(dtype).max), described)
    import dask.array as da

    lo, hi, finite = da.compute(image.min(), image.max(), da.isfinite(image).all())
    if not finite:
        raise InputError("the image has NaN or infinite pixels; fill or mask them before staining.")
    return _scaling_from_range(dtype, float(lo), float(hi), described)


def value_scaling(image: np.ndarray) -> ValueScaling:
    """Decide how to map ``image``'s values to [0, 1] (see module docstring)."""
    dtype = check_dtype(image.dtype)
    if dtype.kind == "u" and dtype.itemsize <= 2:
        top = float(np.iinfo(dtype).max)
        return ValueScaling(0.0, top, f"{dtype.name} / {int(top)}")
    finite = np.isfinite(image) if dtype.kind == "f" else None
    if finite is not None and not finite.all():
        bad = int((~finite).sum())
        raise InputError(
            f"the image has {bad} NaN or infinite pixel(s); fill or mask them (e.g. numpy.nan_to_num) before staining."
        )
    if image.size == 0:
        raise InputError(f"the image is empty (shape {image.shape}); open an image with pixels in it.")
    lo, hi = float(image.min()), float(image.max())
    return _scaling_from_range(dtype, lo, hi, dtype.name)


# Staining computes in float32: a range wider than this cannot be mapped to [0, 1] without overflow.
FLOAT32_SPAN = float(np.finfo(np.float32).max) / 4


def _scaling_from_range(dtype: np.dtype, lo: float, hi: float, described: str) -> ValueScaling:
    if dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
        return ValueScaling(0.0, 1.0, "float in [0, 1]" if described == dtype.name else described)
    if not (abs(lo) <= FLOAT32_SPAN and abs(hi) <= FLOAT32_SPAN):
        raise InputError(
            f"the image's values span [{lo:g}, {hi:g}], beyond what staining can scale (it computes in 32-bit "
            "floats); rescale the image (e.g. to [0, 1]) before staining.")
    if hi == lo:
        return ValueScaling(lo, 1.0, f"constant image ({lo:g})")
    return ValueScaling(lo, hi - lo, f"{described} stretched from [{lo:g}, {hi:g}]")


def scaling_note(scaling: ValueScaling) -> str | None:
    """The sentence to show a user when their values were not taken as they are (stretched or constant)."""
    if "stretched" in scaling.source:
        return (f"values {scaling.source} to [0, 1] (only uint8, uint16 and floats in [0, 1] are taken as they "
                "are): brightness is relative to this image, so images stained apart may differ in tone.")
    if scaling.source.startswith("constant"):
        return f"the image is constant ({scaling.offset:g}): its stain is flat."
    return None


def to_unit_rgb(plane: np.ndarray, scaling: ValueScaling | None = None) -> np.ndarray:
    """One plane -> float32 RGB in [0, 1], shape ``(Y, X, 3)``.

    Parameters
    ----------
    plane : ndarray, shape (Y, X) or (Y, X, C), C in {1, 3, 4}
    scaling : ValueScaling, optional
        Use this scaling (e.g. one decided for a whole stack) instead of the plane's own.
    """
    plane = np.asarray(plane)
    stack, dims = split_planes(plane.shape)
    if stack:
        raise InputError(f"expected one plane, got shape {plane.shape}; stain stacks plane by plane.")
    check_plane_shape(dims)
    return unit_values(plane, scaling or value_scaling(plane), has_channels=plane.ndim == 3)


def unit_values(raw: np.ndarray, scaling: ValueScaling, has_channels: bool) -> np.ndarray:
    """Raw pixels ``(..., Y, X[, C])`` -> float32 RGB in [0, 1], ``(..., Y, X, 3)``, elementwise (no checks).

    The one place the value scaling is applied: ``(raw - offset) / scale``, clipped to [0, 1];
    gray (no channel axis, or one channel) is repeated into three channels, alpha dropped.
    """
    unit = (raw.astype(np.float32) - np.float32(scaling.offset)) / np.float32(scaling.scale)
    np.clip(unit, 0.0, 1.0, out=unit)
    if not has_channels:
        unit = unit[..., None]
    unit = unit[..., :3]
    if unit.shape[-1] == 1:
        return np.ascontiguousarray(np.broadcast_to(unit, (*unit.shape[:-1], 3)))
    return np.ascontiguousarray(unit)


def to_uint8(unit: np.ndarray) -> np.ndarray:
    """Float in [0, 1] -> uint8 with rounding (for PNG output and display)."""
    return (np.clip(unit, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
