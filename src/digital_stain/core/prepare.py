"""Input preparation: raw dark-field pixels -> the enhanced image and the student's input. One object, every path.

Eager staining (:meth:`digital_stain.stain.model.StainModel.stain`), lazy layers
(:class:`digital_stain.stain.lazy.LazyStain`) and whole-slide units (:mod:`digital_stain.slide.run`)
all prepare their input with one :class:`Preparation`, made once per input by
:meth:`StainModel.preparation`. It holds everything that must be the same for every tile,
chunk and unit of that input: the value scaling, the enhancer's look-up table (refitted on
the input when it is adapted, :mod:`digital_stain.core.adapt`) and the maps of the student's
input channels. Every step is per pixel, so any region prepared on its own equals the same
region of the whole input prepared at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from digital_stain.core.adapt import OFF, Adaptation, channel_maps
from digital_stain.core.arrays import ValueScaling, unit_values
from digital_stain.core.color import luma
from digital_stain.core.enhance import bin_index, enhancement_table, on_input_grid


@dataclass(frozen=True, eq=False)
class Preparation:
    """How one input's raw pixels become network inputs (see the module docstring).

    Attributes
    ----------
    scaling : ValueScaling
        Raw values -> [0, 1], decided for the whole input.
    input_dtype : numpy dtype
        The raw pixels' dtype (8/16-bit luma is rounded to its own gray levels, as the enhancer's CDF counts it).
    table : ndarray, shape (BINS,), float32
        The enhancer's look-up table over luma bins (``c_d`` refitted on the input when adapted).
    maps : ndarray, shape (3, BINS), float32, or None
        The student's input channels -> the distribution it was trained on; ``None``: used as they are.
    adaptation : Adaptation
        What was decided for this input (for provenance).
    """

    scaling: ValueScaling
    input_dtype: np.dtype
    table: np.ndarray
    maps: np.ndarray | None = None
    adaptation: Adaptation = OFF
    _levels: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, enhancer, scaling: ValueScaling, input_dtype, adaptation: Adaptation = OFF) -> Preparation:
        """The preparation for an input with ``scaling`` under ``adaptation``, for a model's ``enhancer``.

        Not adapted, the enhancer's own table is used and the channels are mapped only from the
        model's dark-field onto its student's inputs (the identity, unless the model was fine-tuned
        with adapted inputs). Adapted, both start from the input's measured histograms.
        """
        source = adaptation.measured if adaptation.applied else enhancer.darkfield
        table = enhancement_table(source.luma, enhancer.brightfield_counts) if adaptation.applied else enhancer.table
        return cls(scaling, np.dtype(input_dtype), table, channel_maps(source, enhancer.student_inputs), adaptation)

    # -- per pixel ---------------------------------------------------------------------------
    def unit_rgb(self, raw: np.ndarray, has_channels: bool) -> np.ndarray:
        """Raw pixels ``(..., Y, X[, C])`` -> float32 RGB in [0, 1], ``(..., Y, X, 3)``."""
        return unit_values(raw, self.scaling, has_channels)

    def enhanced(self, rgb: np.ndarray) -> np.ndarray:
        """The enhanced gray ``(..., Y, X)`` float32 of unit RGB: luma on the input's own gray levels, then the table."""
        dtype = self.input_dtype
        if dtype.kind == "u" and dtype.itemsize <= 2:
            # the luma's gray level indexes a table over the levels: the values of on_input_grid and the
            # table's bins, without the division and binning of every pixel (3x faster)
            top = np.float32(np.iinfo(dtype).max)
            levels = luma(rgb)
            levels *= top
            np.round(levels, out=levels)
            np.clip(levels, 0.0, top, out=levels)
            return np.take(self._level_table(), levels.astype(np.intp))
        gray = np.clip(on_input_grid(luma(rgb), dtype), 0.0, 1.0)
        return np.take(self.table, bin_index(gray))

    def _level_table(self) -> np.ndarray:
        """:meth:`enhanced` of every gray level of the input's 8- or 16-bit dtype (made once)."""
        top = int(np.iinfo(self.input_dtype).max)
        if top not in self._levels:
            self._levels[top] = np.take(self.table, bin_index(np.arange(top + 1, dtype=np.float32) / np.float32(top)))
        return self._levels[top]

    def student_rgb(self, rgb: np.ndarray) -> np.ndarray:
        """The dark-field channels ``(..., 3)`` as the student receives them (mapped when :attr:`maps` is set)."""
        if self.maps is None:
            return rgb
        out = np.empty(rgb.shape, dtype=np.float32)
        for c in range(3):
            np.take(self.maps[c], bin_index(rgb[..., c]), out=out[..., c])
        return out

    def student_input(self, rgb: np.ndarray, enhanced: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The student's input ``(4, Y, X)`` float32 in [-1, 1]: the (mapped) channels of ``rgb`` ``(Y, X, 3)``
        and the enhanced gray ``(Y, X)``.

        Written channel by channel into ``out`` (made when not given): a concatenation of the
        transposed RGB costs about 4x as much and is not C-contiguous.
        """
        if out is None:
            out = np.empty((4, *enhanced.shape), dtype=np.float32)
        if self.maps is None:
            np.multiply(rgb.transpose(2, 0, 1), 2.0, out=out[:3])
        else:
            for c in range(3):
                np.take(self.maps[c], bin_index(rgb[..., c]), out=out[c])
            np.multiply(out[:3], 2.0, out=out[:3])
        np.multiply(enhanced, 2.0, out=out[3])
        np.subtract(out, 1.0, out=out)
        return out

    # -- one whole plane ------------------------------------------------------------------------
    def plane(self, raw: np.ndarray, *, student: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """The enhanced image ``(Y, X)`` and the student's input ``(4, Y, X)`` (or ``None``) of one raw plane.

        Large planes are worked in row bands on threads; every step is per pixel, so the result
        is exactly that of one pass.
        """
        height, width = raw.shape[:2]
        has_channels = raw.ndim == 3
        enhanced = np.empty((height, width), dtype=np.float32)
        student_in = np.empty((4, height, width), dtype=np.float32) if student else None

        def work(y0: int, y1: int) -> None:
            rgb = self.unit_rgb(raw[y0:y1], has_channels)
            enhanced[y0:y1] = self.enhanced(rgb)
            if student_in is not None:
                self.student_input(rgb, enhanced[y0:y1], out=student_in[:, y0:y1])

        each_band(work, row_bands(height, width))
        return enhanced, student_in


HOST_BAND_PIXELS = 1 << 21  # planes above this many pixels are prepared in row bands on threads


def row_bands(height: int, width: int) -> list[tuple[int, int]]:
    """Row bands ``[(y0, y1), ...]`` covering ``[0, height)``: one for small planes, else one per
    ``HOST_BAND_PIXELS`` (at least 64 rows each, at most 4 per CPU)."""
    count = min(height * width // HOST_BAND_PIXELS, height // 64, 4 * (os.cpu_count() or 1))
    if count <= 1:
        return [(0, height)]
    edges = np.linspace(0, height, count + 1).round().astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def each_band(work: Callable[[int, int], None], bands: list[tuple[int, int]]) -> None:
    """Run ``work(y0, y1)`` for every band, on threads when there are several (numpy releases the GIL)."""
    if len(bands) == 1:
        work(*bands[0])
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(len(bands), os.cpu_count() or 1)) as pool:
        for future in [pool.submit(work, y0, y1) for y0, y1 in bands]:
            future.result()
