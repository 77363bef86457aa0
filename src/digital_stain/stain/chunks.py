"""Chunks of one input stained through the kernel: grid, margins, per-plane statistics, out-of-memory fallback.

:class:`ChunkStainer` is what a lazily stained layer (:class:`~digital_stain.stain.lazy.LazyStain`: a dask
graph, a cache and a background worker over it) and a whole-slide unit
(:mod:`digital_stain.slide.run`) share: both cut the input into the same chunks, borrow the same
margins from the neighbours, record the student's statistics of a plane the same way, and stain a
chunk with the same :class:`~digital_stain.stain.kernel.StainKernel` call. So the store a slide run writes
holds exactly what the napari view shows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from digital_stain.stain.kernel import StainKernel
from digital_stain.stain.oom import is_out_of_memory, next_step, release_memory

GRID = 16  # a multiple of every shipped network's stride grid: chunks and margins are rounded to it


def chunk_sizes(length: int, chunk: int, overlap: int) -> tuple[int, ...]:
    """Chunks of ``chunk`` pixels along an axis, the remainder merged into the last one if it is under ``overlap``.

    Every chunk but the last starts on a multiple of ``chunk``, and none is
    smaller than the overlap its neighbours borrow from it.
    """
    if length <= chunk:
        return (length,)
    sizes = [chunk] * (length // chunk)
    rest = length - sum(sizes)
    if rest >= max(overlap, 1):
        sizes.append(rest)
    elif rest:
        sizes[-1] += rest
    return tuple(sizes)


def grid_sizes(chunk: int, overlap: int) -> tuple[int, int]:
    """``(chunk, overlap)`` rounded to the stride grid: the overlap up, the chunk down, at least twice the overlap."""
    overlap = max(GRID, overlap + (-overlap) % GRID)
    return max(2 * overlap, chunk - chunk % GRID), overlap


def chunked(source, stack_ndim: int, chunk: int, overlap: int):
    """``source`` (dask, ``(..., Y, X[, C])``) rechunked to one plane per stack index and :func:`chunk_sizes` along Y, X."""
    chunks = {i: 1 for i in range(stack_ndim)}
    chunks[stack_ndim] = chunk_sizes(source.shape[stack_ndim], chunk, overlap)
    chunks[stack_ndim + 1] = chunk_sizes(source.shape[stack_ndim + 1], chunk, overlap)
    if source.ndim == stack_ndim + 3:
        chunks[stack_ndim + 2] = -1
    return source.rechunk(chunks)


def unit_rgb_array(source, prep, stack_ndim: int, name: str):
    """The :func:`chunked` raw input as float32 RGB in [0, 1], ``(..., Y, X, 3)``, chunk by chunk (elementwise).

    ``name`` is the graph's key: explicit, or dask would tokenize ``prep`` by pickling it (slow).
    """
    has_channels = source.ndim == stack_ndim + 3

    def block(raw: np.ndarray) -> np.ndarray:
        return prep.unit_rgb(raw, has_channels=has_channels)

    chunks = (*source.chunks[: stack_ndim + 2], (3,))
    if has_channels:
        return source.map_blocks(block, chunks=chunks, dtype=np.float32, name=name)
    return source.map_blocks(block, chunks=chunks, new_axis=source.ndim, dtype=np.float32, name=name)


class ChunkStainer:
    """Stains the chunks of one input: the kernel, the chunk grid of its unit-RGB array, the statistics.

    Parameters
    ----------
    kernel : StainKernel
    rgb : dask array ``(..., Y, X, 3)`` float32
        The input as unit RGB, chunked by :func:`chunked` (one chunk per plane along the stack axes).
    stack_ndim : int
    overlap : int
        Pixels borrowed from each neighbour (on the stride grid).
    chunk : int
        The chunk side (inner chunks with margins on all four sides run compiled, when asked).
    on_fallback : callable(str), optional
        Told, in one sentence, when the device ran out of memory and staining moved to the CPU.

    Attributes
    ----------
    kernel : StainKernel
        Replaced by one on the CPU after an out-of-memory fallback.
    plane_statistics : dict
        The student's statistics per plane (stack index), recorded on first use or given.
    fallbacks : list of str
    """

    def __init__(self, kernel: StainKernel, rgb, stack_ndim: int, overlap: int, chunk: int,
                 on_fallback: Callable[[str], None] | None = None):
        self.kernel, self.rgb, self.stack_ndim = kernel, rgb, stack_ndim
        self.overlap, self.chunk, self.on_fallback = overlap, chunk, on_fallback
        self.plane_statistics: dict[tuple, tuple] = {}
        self.fallbacks: list[str] = []

    # -- where a chunk lies ------------------------------------------------------------------
    def margins(self, key: tuple) -> list[tuple[int, int]]:
        """Pixels borrowed before and after chunk ``key`` along Y and X (only towards neighbours)."""
        counts = self.rgb.numblocks
        return [(self.overlap if key[a] > 0 else 0, self.overlap if key[a] < counts[a] - 1 else 0)
                for a in (self.stack_ndim, self.stack_ndim + 1)]

    def region(self, key: tuple) -> tuple[slice, ...]:
        """Where chunk ``key`` and its borrowed margins lie in ``rgb`` (what ``map_overlap`` hands a block)."""
        starts = [sum(sizes[:i]) for sizes, i in zip(self.rgb.chunks, key)]
        index = [slice(s, s + sizes[i]) for s, sizes, i in zip(starts, self.rgb.chunks, key)]
        for axis, (before, after) in zip((self.stack_ndim, self.stack_ndim + 1), self.margins(key)):
            index[axis] = slice(index[axis].start - before, index[axis].stop + after)
        return tuple(index)

    def trim(self, out: np.ndarray, key: tuple) -> np.ndarray:
        """Cut the borrowed margins off a plane ``(y, x[, 3])`` of chunk ``key``."""
        (top, bottom), (left, right) = self.margins(key)
        return out[top : out.shape[0] - bottom, left : out.shape[1] - right]

    # -- staining -------------------------------------------------------------------------------
    def prepare(self, role: str, plane: np.ndarray, enhanced: np.ndarray | None = None) -> tuple[np.ndarray, int, int]:
        """A network's padded input ``(C, Y', X')`` for one plane region ``(y, x, 3)``, and ``(y, x)`` (host work only)."""
        enhanced = self.kernel.prep.enhanced(plane) if enhanced is None else enhanced
        return self.kernel.padded(role, self.kernel.network_input(role, plane, enhanced))

    def forward(self, role: str, prepared: tuple, plane_index: tuple, uint8: bool = False) -> np.ndarray:
        """A :meth:`prepare`-d chunk through the network: ``(y, x, 3)`` in [0, 1] (float32, or uint8 when asked).

        On the CPU after the device runs out of memory (:func:`digital_stain.stain.oom.next_step`: a chunk's
        size is fixed, so the next step is the CPU), for this chunk and the rest of the input.
        """
        try:
            return self._forward(role, prepared, plane_index, uint8)
        except Exception as error:
            if not is_out_of_memory(error) or next_step(self.kernel.device, self.chunk, self.chunk) is None:
                raise
            # retried below, outside the except block: its traceback still holds device tensors
        self._fall_back(f"GPU ran out of memory staining a {self.chunk}-px chunk; "
                        "the rest of this image is stained on the CPU")
        return self._forward(role, prepared, plane_index, uint8)

    def _forward(self, role: str, prepared: tuple, plane_index: tuple, uint8: bool) -> np.ndarray:
        """Only inner chunks (margins on all four sides, one shape) run compiled: each other shape would compile anew.

        ``uint8``: rounded as :func:`digital_stain.core.arrays.to_uint8` rounds, on the network's device (a quarter
        of the bytes to copy back); the result is then a ``(y, x, 3)`` view of a ``(3, y, x)`` array.
        """
        padded, h, w = prepared
        statistics = self.statistics(plane_index) if role == "student" else None
        compiled = self.kernel.settings.compile and padded.shape[1:] == (self.chunk + 2 * self.overlap,) * 2
        out = self.kernel.forward(role, padded, statistics, compiled)
        if uint8:  # to_uint8's float32 steps, one at a time (no fused multiply-add): the same bytes as on the host
            out = out.mul(255.0).add(0.5).to(torch.uint8)
        return out.cpu().numpy()[:, :h, :w].transpose(1, 2, 0)

    def _fall_back(self, message: str) -> None:
        release_memory()
        self.kernel = self.kernel.on_cpu()  # fp32, eager: no second compile mid-image
        self.plane_statistics = {k: self.kernel.to_device(s) for k, s in self.plane_statistics.items()}
        self.fallbacks.append(message)
        if self.on_fallback is not None:
            self.on_fallback(message)

    # -- the student's statistics -------------------------------------------------------------
    def statistics(self, plane_index: tuple) -> tuple:
        """Norm statistics of one plane, recorded on first use as ``StainModel.stain`` records them."""
        if plane_index not in self.plane_statistics:
            self.plane_statistics[plane_index] = self.kernel.statistics(self._sample(self.rgb[plane_index]))
        return self.plane_statistics[plane_index]

    def use_statistics(self, plane_index: tuple, statistics) -> None:
        """Stain plane ``plane_index`` with ``statistics`` (e.g. a slide's stored values) instead of recording them."""
        self.plane_statistics[plane_index] = self.kernel.to_device(statistics)

    def _sample(self, plane) -> np.ndarray:
        """The student inputs ``(N, 4, h, w)`` one plane's statistics are recorded on."""
        boxes = self.kernel.stats_boxes(*plane.shape[:2])
        regions = [plane.compute()] if boxes is None else [_padded_region(plane, y, x, side) for y, x, side in boxes]
        return np.stack([self.prepare("student", rgb)[0] for rgb in regions])


def _padded_region(plane, y: int, x: int, side: int) -> np.ndarray:
    """A ``side``-square crop at (y, x) of a dask plane, padded as ``pad_image`` pads it (reflect)."""
    height, width = plane.shape[:2]
    region = plane[y : min(y + side, height), x : min(x + side, width)].compute()
    short_y, short_x = side - region.shape[0], side - region.shape[1]
    if short_y or short_x:  # the crop reaches into the bottom/right padding
        region = np.pad(region, ((0, short_y), (0, short_x), (0, 0)), mode="reflect")
    return region
