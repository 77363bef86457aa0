"""What a dark-field input looks like, as histograms: the measurement behind adaptation and the enhancer's fit.

A :class:`Distribution` holds the histograms of an image's (or a folder's, or a slide's)
dark-field pixels over the enhancer's ``BINS`` equal bins of [0, 1]: the Rec.601 luma, on
the input's own gray levels exactly as the enhancer bins it, and each colour channel
(R, G, B) as the student receives it. A model file records the one its dark-field was
fitted on (:attr:`digital_stain.core.enhance.Enhancer.darkfield`); an input is measured with
:func:`measure` and compared with it (:mod:`digital_stain.core.adapt`).

Whole inputs are measured, never a tile at a time: numpy arrays completely; dask arrays
(lazy layers, whole slides) completely up to ``SAMPLE_PIXELS`` (16 MP) and otherwise on
64 crops spread evenly over each plane, ``SAMPLE_PIXELS`` in all, so a 50,000^2 slide is
measured in seconds. A histogram of 4096 bins is estimated from 16 M pixels to far better
than the differences the adaptation decides on.
"""

from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass

import numpy as np

from digital_stain.core.arrays import ValueScaling, split_planes, unit_values
from digital_stain.core.color import luma
from digital_stain.core.enhance import BINS, bin_index, on_input_grid

SAMPLE_PIXELS = 1 << 24  # dask inputs larger than this are measured on crops spread over them
SAMPLE_GRID = 8  # crops per side of a plane when sampling (64 crops)
PIECE = 2048  # regions are read and measured in pieces of at most this side (bounded float32 temporaries)


@dataclass(frozen=True, eq=False)
class Distribution:
    """Histograms of dark-field pixels over ``BINS`` equal bins of [0, 1].

    Attributes
    ----------
    luma : ndarray, shape (BINS,), int64
        Rec.601 luma on the input's gray levels (what the enhancer's ``c_d`` counts).
    channels : ndarray, shape (3, BINS), int64, or None
        R, G and B (gray input: its gray in all three, as the student receives it).
        ``None`` for model files written before channels were recorded.
    """

    luma: np.ndarray
    channels: np.ndarray | None = None

    def __post_init__(self):
        luma_counts = np.asarray(self.luma, dtype=np.int64)
        if luma_counts.shape != (BINS,) or (luma_counts < 0).any():
            raise ValueError(f"a luma histogram has {BINS} non-negative bins")
        object.__setattr__(self, "luma", luma_counts)
        if self.channels is not None:
            channels = np.asarray(self.channels, dtype=np.int64)
            if channels.shape != (3, BINS) or (channels < 0).any():
                raise ValueError(f"channel histograms are (3, {BINS}) non-negative counts")
            object.__setattr__(self, "channels", channels)

    @property
    def pixels(self) -> int:
        """How many pixels were counted."""
        return int(self.luma.sum())

    def __add__(self, other: Distribution) -> Distribution:
        """Pooled histograms (e.g. the images of a folder); channels only when both have them."""
        channels = None if self.channels is None or other.channels is None else self.channels + other.channels
        return Distribution(self.luma + other.luma, channels)

    def same_as(self, other: Distribution | None) -> bool:
        """Whether both hold exactly the same counts (then mapping one onto the other is the identity)."""
        if other is None or not np.array_equal(self.luma, other.luma):
            return False
        if self.channels is None or other.channels is None:
            return self.channels is None and other.channels is None
        return np.array_equal(self.channels, other.channels)

    def as_dict(self) -> dict:
        """JSON-ready and compact (zlib + base64 of the counts): for store attributes and provenance."""
        return {"bins": BINS, "pixels": self.pixels, "luma": _pack(self.luma),
                "channels": None if self.channels is None else _pack(self.channels)}

    @classmethod
    def from_dict(cls, data: dict) -> Distribution:
        if data.get("bins") != BINS:
            raise ValueError(f"histograms of {data.get('bins')} bins; this version uses {BINS}")
        channels = data.get("channels")
        return cls(_unpack(data["luma"], (BINS,)), None if channels is None else _unpack(channels, (3, BINS)))


def _pack(counts: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(np.ascontiguousarray(counts, dtype="<i8").tobytes(), 9)).decode("ascii")


def _unpack(text: str, shape: tuple) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype="<i8").reshape(shape).astype(np.int64)


def _counts(values: np.ndarray) -> np.ndarray:
    return np.bincount(bin_index(values).ravel(), minlength=BINS).astype(np.int64)


def region_distribution(raw: np.ndarray, scaling: ValueScaling, has_channels: bool) -> Distribution:
    """Histograms of one region of raw pixels ``(..., Y, X[, C])`` under ``scaling`` (no sampling)."""
    unit = unit_values(raw, scaling, has_channels)  # (..., Y, X, 3) float32 in [0, 1]
    gray = np.clip(on_input_grid(luma(unit), raw.dtype), 0.0, 1.0)
    channels = np.stack([_counts(unit[..., c]) for c in range(3)])
    return Distribution(_counts(gray), channels)


def sample_boxes(height: int, width: int, max_pixels: int) -> list[tuple[int, int, int, int]]:
    """Regions ``(y, x, h, w)`` to measure a plane on: the whole plane if it has at most ``max_pixels``,
    else ``SAMPLE_GRID``^2 equal squares spread evenly over it (``max_pixels`` in all)."""
    if height * width <= max_pixels:
        return [(0, 0, height, width)]
    side = max(16, min(height, width, int(np.sqrt(max_pixels / SAMPLE_GRID**2))))
    ys = np.linspace(0, height - side, SAMPLE_GRID).round().astype(int)
    xs = np.linspace(0, width - side, SAMPLE_GRID).round().astype(int)
    return [(int(y), int(x), side, side) for y in ys for x in xs]


def measure(image, scaling: ValueScaling, *, max_pixels: int | None = SAMPLE_PIXELS) -> Distribution:
    """The :class:`Distribution` of a whole dark-field input (plane or stack, numpy or dask).

    Parameters
    ----------
    image : ndarray or dask array, shape (..., Y, X[, C])
    scaling : ValueScaling
        The input's value scaling (decided for the whole input, as staining uses it).
    max_pixels : int or None
        A dask input with more pixels than this is measured on crops spread over its planes
        (see the module docstring); ``None`` measures every pixel. Numpy inputs are always
        measured whole.
    """
    stack, plane = split_planes(tuple(image.shape))
    has_channels = len(plane) == 3
    height, width = plane[:2]
    planes = int(np.prod(stack)) if stack else 1
    sampled = max_pixels is not None and not isinstance(image, np.ndarray) and planes * height * width > max_pixels
    chosen = np.unique(np.linspace(0, planes - 1, min(planes, SAMPLE_GRID)).round().astype(int)) \
        if sampled else np.arange(planes)
    budget = max_pixels // len(chosen) if sampled else height * width
    total = None
    for index in chosen:
        where = tuple(int(i) for i in np.unravel_index(index, stack)) if stack else ()
        for y, x, h, w in sample_boxes(height, width, budget):
            for y0 in range(y, y + h, PIECE):
                for x0 in range(x, x + w, PIECE):
                    piece = image[(*where, slice(y0, min(y0 + PIECE, y + h)), slice(x0, min(x0 + PIECE, x + w)))]
                    part = region_distribution(np.asarray(piece), scaling, has_channels)
                    total = part if total is None else total + part
    return total


def folder_distribution(folder) -> tuple[Distribution, int]:
    """Pooled :class:`Distribution` of every readable image in ``folder`` (each with its own value scaling).

    Returns ``(distribution, n_images)``; unreadable files are skipped, a folder with none is refused.
    """
    from digital_stain.core.arrays import InputError, value_scaling
    from digital_stain.io.images import list_images, read_image  # local: io imports the enhancer's users

    total, n = None, 0
    for path in list_images(folder):
        try:
            image = np.asarray(read_image(path))
            part = measure(image, value_scaling(image))
        except InputError:
            continue
        total, n = (part if total is None else total + part), n + 1
    if n == 0:
        raise InputError(f"no readable image in {folder}; point at a folder of PNG or TIFF images.")
    return total, n


def arrays_distribution(planes) -> Distribution:
    """Pooled :class:`Distribution` of planes or stacks (numpy or dask, every pixel), each with its own scaling."""
    from digital_stain.core.arrays import InputError, scaling_of

    total = None
    for plane in planes:
        part = measure(plane, scaling_of(plane), max_pixels=None)
        total = part if total is None else total + part
    if total is None or total.pixels == 0:
        raise InputError("no pixels to fit the enhancer on.")
    return total
