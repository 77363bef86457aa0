"""Lazy staining: dask arrays whose chunks are stained only when something reads them.

For images too large to stain up front (whole slides, dask-backed napari
layers), :class:`LazyStain` builds one dask array per output. Nothing runs
when it is built except what the student's normalisation needs: its
instance-norm statistics are recorded once, on the whole image when it is
small enough or on crops spread over it (exactly what
:meth:`StainModel.stain` records), and frozen in a private copy of the
network, so every chunk is normalised identically.

Each chunk is computed from the chunk plus ``overlap`` pixels of its
neighbours (``dask.array.map_overlap``), on the network's stride grid, and
the margins are cut off: the result equals a one-pass run to within the
tiling error of :mod:`digital_stain.tiling` (no seams). Computed chunks are
kept in a small cache, so reading a region again (panning back) does not
run the network again.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from .arrays import InputError, ValueScaling, check_plane_shape, split_planes, value_scaling
from .devices import autocast, resolve_precision
from .model import enhance_rgb, student_input
from .nets.norm import TileStableInstanceNorm, set_norm_mode
from .nets.unet import colorize
from .tiling import pad_image, stats_boxes


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


def _scaling(image) -> ValueScaling:
    """One value scaling for the whole (possibly lazy) image, as :meth:`StainModel.stain` decides it."""
    if isinstance(image, np.ndarray):
        return value_scaling(image)
    from .enhance import _dask_scaling

    if np.dtype(image.dtype) == np.bool_:
        raise InputError("a boolean mask cannot be stained; open the dark-field image itself.")
    offset, scale = _dask_scaling(image)
    return ValueScaling(offset, scale, f"{np.dtype(image.dtype).name} (lazy)")


class LazyStain:
    """Lazily stained outputs of one image (plane or stack).

    Parameters
    ----------
    model : StainModel
    image : ndarray or dask array, shape (..., Y, X[, C])
        As for :meth:`StainModel.stain`.
    outputs : sequence of str, optional
        ``enhanced``, ``teacher``, ``student``; default all the model has.
    chunk, overlap : int
        Chunk side and the margin borrowed from neighbours, in pixels; both
        are rounded to the networks' stride grid (16).
    device, precision : str, optional
        As for :meth:`StainModel.stain`.
    stats_pixels, stats_crop : int
        Images up to ``stats_pixels`` get whole-image student statistics,
        larger ones crops of ``stats_crop`` spread over them (as
        ``StainModel.stain(tile=stats_crop)``).
    cache_chunks : int
        How many computed chunks to keep (per output).

    Attributes
    ----------
    arrays : dict of str to dask array
        ``enhanced`` ``(..., Y, X)``, ``teacher``/``student`` ``(..., Y, X, 3)``; float32 in [0, 1].
    network_runs : dict of str to int
        How many chunks each network has computed (cache hits not counted).
    """

    GRID = 16  # a multiple of every shipped network's stride grid

    def __init__(self, model, image, outputs: Sequence[str] | None = None, *, chunk: int = 1024,
                 overlap: int = 128, device: str | None = None, precision: str = "auto",
                 stats_pixels: int = 2048 * 2048, stats_crop: int = 512, cache_chunks: int = 256):
        import dask.array as da

        self.model = model
        self.wanted = model.check_outputs(outputs)
        if device is not None:
            model.to(device)
        self.device = model._device
        self.precision = resolve_precision(precision, self.device)
        self.overlap = max(self.GRID, overlap + (-overlap) % self.GRID)
        self.chunk = max(2 * self.overlap, chunk - chunk % self.GRID)
        stack, plane = split_planes(tuple(image.shape))
        check_plane_shape(plane)
        self.stack_ndim = len(stack)
        self.input_dtype = np.dtype(image.dtype)
        self.scaling = _scaling(image)
        self.network_runs = {name: 0 for name in ("teacher", "student")}
        self._cache: dict[str, OrderedDict] = {name: OrderedDict() for name in ("teacher", "student")}
        self._cache_chunks = cache_chunks
        self._stats_pixels, self._stats_crop = stats_pixels, stats_crop
        self._lock = threading.Lock()

        source = image if not isinstance(image, np.ndarray) else da.from_array(image, chunks=-1)
        y_axis = self.stack_ndim
        chunks = {i: 1 for i in range(self.stack_ndim)}
        chunks[y_axis] = chunk_sizes(plane[0], self.chunk, self.overlap)
        chunks[y_axis + 1] = chunk_sizes(plane[1], self.chunk, self.overlap)
        if len(plane) == 3:
            chunks[y_axis + 2] = -1
        source = source.rechunk(chunks)
        self.rgb = self._unit_rgb(source)
        self.arrays: dict = {}
        if "enhanced" in self.wanted:
            self.arrays["enhanced"] = self.rgb.map_blocks(self._enhanced_block, drop_axis=self.rgb.ndim - 1,
                                                          dtype=np.float32)
        if "teacher" in self.wanted:
            self._teacher = model.teacher
            self.arrays["teacher"] = self._overlapped("teacher")
        if "student" in self.wanted:
            # a private copy: its frozen statistics are this image's, whatever else the model stains meanwhile
            self._student = copy.deepcopy(model.student).to(self.device).eval()
            self._plane_stats: dict[tuple, list] = {}
            self._statistics(self._first_plane())  # recorded now: building the arrays does what staining needs first
            self.arrays["student"] = self._overlapped("student")

    # -- per-chunk work ------------------------------------------------------
    def _unit_rgb(self, source):
        """Raw chunks -> float32 RGB in [0, 1], ``(..., Y, X, 3)``."""
        scaling, has_channels = self.scaling, source.ndim == self.stack_ndim + 3

        def block(raw):
            unit = (raw.astype(np.float32) - np.float32(scaling.offset)) / np.float32(scaling.scale)
            unit = np.clip(unit, 0.0, 1.0)
            if not has_channels:
                unit = unit[..., None]
            unit = unit[..., :3]
            return np.ascontiguousarray(np.broadcast_to(unit, (*unit.shape[:-1], 3)) if unit.shape[-1] == 1 else unit)

        chunks = (*source.chunks[: self.stack_ndim + 2], (3,))
        if has_channels:
            return source.map_blocks(block, chunks=chunks, dtype=np.float32)
        return source.map_blocks(block, chunks=chunks, new_axis=source.ndim, dtype=np.float32)

    def _enhanced_block(self, rgb: np.ndarray) -> np.ndarray:
        return enhance_rgb(self.model.enhancer, rgb, self.input_dtype)

    def _overlapped(self, role: str):
        """A network's output, chunk by chunk with ``overlap`` borrowed from each neighbour."""
        axes = {i: 0 for i in range(self.rgb.ndim)}
        axes[self.stack_ndim] = axes[self.stack_ndim + 1] = self.overlap

        def block(rgb, block_info=None):
            return self._network_block(role, rgb, block_info[0])

        return self.rgb.map_overlap(block, depth=axes, boundary="none", trim=False, dtype=np.float32,
                                    chunks=self.rgb.chunks, meta=np.empty((0,) * self.rgb.ndim, np.float32))

    def _network_block(self, role: str, rgb: np.ndarray, info: dict) -> np.ndarray:
        location, counts = info["chunk-location"], info["num-chunks"]
        key = tuple(location)
        with self._lock:
            cache = self._cache[role]
            if key in cache:
                cache.move_to_end(key)
                return cache[key]
            y_axis = self.stack_ndim
            plane = rgb.reshape(rgb.shape[y_axis:])
            if role == "student":
                self._freeze(self._statistics(key[:y_axis]))
            out = self._run(role, plane)
            # cut the borrowed margins (only where there is a neighbour: boundary="none")
            lead = [self.overlap if location[a] > 0 else 0 for a in (y_axis, y_axis + 1)]
            trail = [self.overlap if location[a] < counts[a] - 1 else 0 for a in (y_axis, y_axis + 1)]
            out = out[lead[0] : out.shape[0] - trail[0], lead[1] : out.shape[1] - trail[1]]
            out = np.ascontiguousarray(out).reshape(*rgb.shape[:y_axis], *out.shape)
            self.network_runs[role] += 1
            cache[key] = out
            if len(cache) > self._cache_chunks:
                cache.popitem(last=False)
            return out

    def _run(self, role: str, plane: np.ndarray) -> np.ndarray:
        """One network on one (overlapped) plane ``(y, x, 3)`` -> ``(y, x, 3)`` in [0, 1]."""
        net = self._teacher if role == "teacher" else self._student
        if role == "teacher":
            gray = self._enhanced_block(plane)[None]
            x = gray
        else:
            x = student_input(plane, self._enhanced_block(plane))
        padded, (h, w) = pad_image(np.ascontiguousarray(x, dtype=np.float32), net.size_multiple, net.min_size)
        tensor = torch.from_numpy(np.ascontiguousarray(padded[None])).to(self.device)
        with torch.no_grad(), autocast(self.device, self.precision):
            if role == "teacher":
                out = colorize(net, tensor)
            else:
                out = (net(tensor).float() + 1.0) / 2.0
        out = out.float().clamp(0.0, 1.0).cpu().numpy()[0, :, :h, :w]
        return out.transpose(1, 2, 0)

    # -- the student's frozen statistics -------------------------------------------
    def _first_plane(self) -> tuple:
        return (0,) * self.stack_ndim

    def _statistics(self, plane_index: tuple) -> list:
        """Norm statistics of one plane (recorded once, on first use): as ``StainModel.stain`` records them."""
        if plane_index not in self._plane_stats:
            norms = [m for m in self._student.modules() if isinstance(m, TileStableInstanceNorm)]
            sample = torch.from_numpy(self._stats_sample(self.rgb[plane_index])).to(self.device)
            set_norm_mode(self._student, "record")
            with torch.no_grad(), autocast(self.device, self.precision):
                self._student(sample)
            self._plane_stats[plane_index] = [(m.frozen_mean.clone(), m.frozen_var.clone()) for m in norms]
            set_norm_mode(self._student, "frozen")
        return self._plane_stats[plane_index]

    def _freeze(self, stats: list) -> None:
        norms = [m for m in self._student.modules() if isinstance(m, TileStableInstanceNorm)]
        for module, (mean, var) in zip(norms, stats):
            module.frozen_mean.copy_(mean)
            module.frozen_var.copy_(var)
        set_norm_mode(self._student, "frozen")

    def _stats_sample(self, plane) -> np.ndarray:
        """The student inputs ``(N, 4, h, w)`` one plane's statistics are recorded on."""
        student = self._student
        height, width = plane.shape[:2]
        boxes = stats_boxes(height, width, student.size_multiple, self._stats_pixels, self._stats_crop,
                            student.min_size)
        if boxes is None:
            regions = [plane.compute()]
        else:
            regions = [self._padded_region(plane, y, x, side) for y, x, side in boxes]
        samples = []
        for rgb in regions:
            x = student_input(rgb, self._enhanced_block(rgb))
            samples.append(pad_image(x.astype(np.float32), student.size_multiple, student.min_size)[0])
        return np.stack(samples)

    @staticmethod
    def _padded_region(plane, y: int, x: int, side: int) -> np.ndarray:
        """A ``side``-square crop at (y, x) of the plane padded as ``pad_image`` pads it (reflect)."""
        height, width = plane.shape[:2]
        region = plane[y : min(y + side, height), x : min(x + side, width)].compute()
        short_y, short_x = side - region.shape[0], side - region.shape[1]
        if short_y or short_x:  # the crop reaches into the bottom/right padding
            region = np.pad(region, ((0, short_y), (0, short_x), (0, 0)), mode="reflect")
        return region


def stain_lazy(model, image, outputs: Sequence[str] | None = None, **options) -> dict:
    """Lazily stained outputs of ``image``: ``{name: dask array}`` (see :class:`LazyStain`)."""
    return LazyStain(model, image, outputs, **options).arrays
