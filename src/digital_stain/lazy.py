"""Lazy staining: dask arrays whose chunks are stained only when something reads them.

For images too large to stain up front (whole slides, dask-backed napari
layers), :class:`LazyStain` builds one dask array per output. Building them
runs no network: the input is only checked (shape, pixel type, NaNs) and its
value scaling decided. The student's instance-norm statistics of a plane are
recorded by the first chunk of that plane that needs them, on the whole
plane when it is small enough or on crops spread over it (exactly what
:meth:`StainModel.stain` records), and frozen in a private copy of the
network, so every chunk of the plane is normalised identically.

Each chunk is computed from the chunk plus ``overlap`` pixels of its
neighbours (``dask.array.map_overlap``), on the network's stride grid, and
the margins are cut off: the result equals a one-pass run to within the
tiling error of :mod:`digital_stain.tiling` (no seams). Computed chunks are
kept in a small cache, so reading a region again (panning back) does not
run the network again.

Background mode (``background=True``, for viewers): a read that misses the
cache does not wait for the network. It queues the chunk for one private
worker thread (the networks are not thread-safe) and returns at once a
placeholder, the chunk's enhanced gray in three channels. The worker serves
the newest request first (the region looked at now), caches the result and
calls ``on_ready`` so the viewer can read the region again. (A napari layer
showing these arrays needs ``cache=False``: napari's own dask cache would
keep the placeholders.)

Out of GPU memory: a chunk whose network run raises an out-of-memory error
moves this instance's (private) networks to the CPU, says so through
``on_fallback`` and is computed again there, as is the rest of the image.

Pyramids (:func:`lazy_pyramid`, for multiscale display): lower levels are
produced from the *input*, never from a stained output. Each level halves
the one above it by 2 x 2 means of the raw pixels (``dask.array.coarsen``,
odd last rows/columns dropped), rounded back to the input's own dtype, until
the longer plane side is at most ``min_side``. Every level is then stained
lazily on its own with the level-0 value scaling (same brightness at every
zoom), so looking at the whole slide stains only small coarse chunks and
never a level-0 chunk.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .adapt import Adaptation
from .arrays import MIN_SIDE, InputError, ValueScaling, check_dtype, check_plane_shape, plain_array, scaling_of, split_planes
from .devices import autocast
from .nets.norm import TileStableInstanceNorm, set_norm_mode
from .nets.unet import colorize
from .oom import is_out_of_memory, release_memory
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


def _cpu_copy(net: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``net`` on the CPU, made without allocating anything on its own (full) device."""
    memo = {id(p): torch.nn.Parameter(p.detach().to("cpu", copy=True), p.requires_grad) for p in net.parameters()}
    memo.update({id(b): b.detach().to("cpu", copy=True) for b in net.buffers()})
    return copy.deepcopy(net, memo)


_LIVE: weakref.WeakSet = weakref.WeakSet()  # background instances not yet closed


def close_all(wait: bool = True) -> None:
    """Close every background :class:`LazyStain` still open (shutdown, test teardown)."""
    for stain in list(_LIVE):
        stain.close(wait)


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
    cache_bytes : int, optional
        A memory budget per output instead of ``cache_chunks`` (at least 4 chunks are kept).
    net_lock : threading.Lock, optional
        Shared by instances that share networks (a pyramid's levels share the teacher), so that
        only one of them runs a network at a time.
    background : bool
        Compute missing chunks in a worker thread and return placeholders
        meanwhile (see module docstring). Default: compute in the reading thread.
    on_ready : callable(), optional
        Called from the worker thread after each chunk it computed; not
        called after :meth:`close`. Hand it on to a GUI thread without
        waiting for that thread (e.g. a queued Qt signal): :meth:`close`
        waits for the worker.
    on_error : callable(BaseException), optional
        Called from the worker thread when a chunk failed (also recorded in ``errors``).
    on_fallback : callable(str), optional
        Told, in one sentence, when the GPU ran out of memory and staining moved to the CPU.
    max_pending : int
        Most chunks kept waiting for the worker; the oldest requests are dropped beyond it.
    scaling : ValueScaling, optional
        Raw values -> [0, 1]; default decided from ``image`` (pyramid levels get level 0's).
    compile : bool
        Run the networks through ``torch.compile`` for headless work such as whole slides (the first
        inner chunk waits for the compile, 10-60 s). Only chunks with margins on all four sides (the
        inner ones, a ``(chunk + 2 overlap)``-px square) run compiled: one shape, one graph. Chunks at
        the image's edges have other shapes and run eagerly, so they equal an uncompiled run; inner
        ones match it to float rounding. After a fallback to the CPU everything runs eagerly.
    adapt : ``auto|on|off`` or Adaptation
        Adaptation to another microscope (:mod:`digital_stain.adapt`), decided once on the whole
        image (a dask image larger than 16 MP on crops spread over it) and the same for every
        chunk; an :class:`~digital_stain.adapt.Adaptation` decided beforehand is used as it is.

    Attributes
    ----------
    arrays : dict of str to dask array
        ``enhanced`` ``(..., Y, X)``, ``teacher``/``student`` ``(..., Y, X, 3)``; float32 in [0, 1].
    prep : Preparation
        The image's value scaling, adaptation and input tables (:mod:`digital_stain.prepare`).
    network_runs : dict of str to int
        How many chunks each network has computed (cache hits not counted).
    errors : list of str
        Chunks that failed in the worker thread (``role chunk (..., y, x): error``, chunk indices).
    fallbacks : list of str
        The out-of-memory fallbacks that happened (at most one per instance).
    device : torch.device
        Where the networks run (the CPU after a fallback).
    """

    GRID = 16  # a multiple of every shipped network's stride grid

    def __init__(self, model, image, outputs: Sequence[str] | None = None, *, chunk: int = 1024,
                 overlap: int = 128, device: str | None = None, precision: str = "auto",
                 stats_pixels: int = 2048 * 2048, stats_crop: int = 512, cache_chunks: int = 256,
                 background: bool = False, on_ready: Callable[[], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None,
                 on_fallback: Callable[[str], None] | None = None, max_pending: int = 64,
                 scaling: ValueScaling | None = None, cache_bytes: int | None = None,
                 net_lock: threading.Lock | None = None, compile: bool = False,
                 adapt: str | Adaptation = "auto"):
        import dask.array as da

        self.model = model
        self.wanted = model.check_outputs(outputs)
        if device is not None:
            model.to(device)
        self.device = model._device
        self.precision = model.precision_for(precision, self.device)
        self.overlap = max(self.GRID, overlap + (-overlap) % self.GRID)
        self.chunk = max(2 * self.overlap, chunk - chunk % self.GRID)
        if isinstance(image, np.ndarray):
            image = plain_array(image)  # a masked array's mask cannot be honoured: refused
        stack, plane = split_planes(tuple(image.shape))
        check_plane_shape(plane)
        check_dtype(image.dtype)
        self.stack_ndim = len(stack)
        self.input_dtype = np.dtype(image.dtype)
        # decided once for the whole image (its value scaling and adaptation); every chunk uses it
        self.prep = model.preparation(image, adapt=adapt, scaling=scaling)
        self.scaling = self.prep.scaling
        self.network_runs = {name: 0 for name in ("teacher", "student")}
        self.errors: list[str] = []
        self.fallbacks: list[str] = []
        self.background, self.max_pending = background, max_pending
        self.on_ready, self.on_error, self.on_fallback = on_ready, on_error, on_fallback
        self._cache: dict[str, OrderedDict] = {name: OrderedDict() for name in ("teacher", "student")}
        if cache_bytes is not None:  # a memory budget rather than a count: chunks are float32 RGB
            cache_chunks = max(4, cache_bytes // (self.chunk * self.chunk * 3 * 4))
        self._cache_chunks = cache_chunks
        self._failed: set = set()  # (role, key) that raised in the worker: shown as placeholders, not retried
        self._stats_pixels, self._stats_crop = stats_pixels, stats_crop
        self._lock = threading.Lock()  # guards the caches, counters and the job queue; never held while a network runs
        self._changed = threading.Condition(self._lock)  # a job finished or was dropped
        # one network run at a time: the networks are not thread-safe (a pyramid's levels share one lock)
        self._net_lock = net_lock or threading.Lock()
        self._waiting: OrderedDict[tuple, None] = OrderedDict()  # (role, chunk key), oldest request first
        self._running: tuple | None = None
        self._worker: threading.Thread | None = None
        self._closed = False
        if background:
            _LIVE.add(self)

        source = image if not isinstance(image, np.ndarray) else da.from_array(image, chunks=-1)
        y_axis = self.stack_ndim
        chunks = {i: 1 for i in range(self.stack_ndim)}
        chunks[y_axis] = chunk_sizes(plane[0], self.chunk, self.overlap)
        chunks[y_axis + 1] = chunk_sizes(plane[1], self.chunk, self.overlap)
        if len(plane) == 3:
            chunks[y_axis + 2] = -1
        source = source.rechunk(chunks)
        self.compile = compile
        self._compiled: dict[str, torch.nn.Module] = {}
        # explicit task names: otherwise dask tokenizes our bound methods by pickling the whole model (~0.3 s each)
        self._token = uuid.uuid4().hex
        self._source = source  # raw, for readers that convert only the region they need (slide units)
        self.rgb = self._unit_rgb(source)
        self.arrays: dict = {}
        if "enhanced" in self.wanted:
            self.arrays["enhanced"] = self.rgb.map_blocks(self._enhanced_block, drop_axis=self.rgb.ndim - 1,
                                                          dtype=np.float32, name=f"enhanced-{self._token}")
        if "teacher" in self.wanted:
            self._teacher = model.teacher  # shared until a fallback to the CPU needs a private copy
            self.arrays["teacher"] = self._overlapped("teacher")
        if "student" in self.wanted:
            # a private copy: its frozen statistics are this image's, whatever else the model stains meanwhile
            self._student = copy.deepcopy(model.student).to(self.device).eval()
            self._plane_stats: dict[tuple, list] = {}  # recorded per plane by its first chunk
            self.arrays["student"] = self._overlapped("student")

    # -- background worker ---------------------------------------------------
    @property
    def pending(self) -> int:
        """Chunks queued or being computed by the worker."""
        with self._lock:
            return len(self._waiting) + (self._running is not None)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no chunk is queued or being computed; False if ``timeout`` (s) ran out first."""
        with self._lock:
            return self._changed.wait_for(lambda: not self._waiting and self._running is None, timeout)

    def close(self, wait: bool = True) -> None:
        """Drop the waiting chunks and stop the worker after the chunk in progress.

        ``wait`` joins the worker (a GUI passes False: the chunk in progress
        may take seconds). Reads after closing compute synchronously, as with
        ``background=False``.
        """
        with self._lock:
            self._closed = True
            self._waiting.clear()
            worker = self._worker
            self._changed.notify_all()
        _LIVE.discard(self)
        if wait and worker is not None and worker is not threading.current_thread():
            worker.join()

    def cancel_pending(self) -> int:
        """Drop the waiting chunks (not the one in progress); returns how many. Reading them queues them again."""
        with self._lock:
            dropped = len(self._waiting)
            self._waiting.clear()
            self._changed.notify_all()
        return dropped

    def __enter__(self) -> LazyStain:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _submit(self, job: tuple) -> None:
        """Queue ``(role, key)`` for the worker (caller holds ``_lock``); start the worker if it is not running."""
        if job == self._running:
            return
        self._waiting[job] = None
        self._waiting.move_to_end(job)  # asked for again: it is what is on screen now
        while len(self._waiting) > self.max_pending:
            self._waiting.popitem(last=False)  # the oldest request is the least likely still to be looked at
        if self._worker is None:
            self._worker = threading.Thread(target=self._serve, name="LazyStain worker", daemon=True)
            self._worker.start()

    def _serve(self) -> None:
        """The worker: newest request first, until the queue is empty (so no idle thread keeps this alive)."""
        while True:
            with self._lock:
                if self._closed or not self._waiting:
                    self._worker = None
                    return
                role, key = self._running = self._waiting.popitem(last=True)[0]
            try:
                self._compute(role, key)
                if self.on_ready is not None and not self._closed:
                    self.on_ready()  # before the job counts as done, so wait() returns after it
            except Exception as error:  # a failed chunk must not stop the worker, nor be retried on every redraw
                with self._lock:
                    self._failed.add((role, key))
                    self.errors = [*self.errors[-19:], f"{role} chunk {key[: self.stack_ndim + 2]}: "
                                   f"{type(error).__name__}: {error}"]
                if self.on_error is not None:
                    with contextlib.suppress(Exception):
                        self.on_error(error)
            finally:
                with self._lock:
                    self._running = None
                    self._changed.notify_all()

    # -- per-chunk work ------------------------------------------------------
    def _unit_rgb(self, source):
        """Raw chunks -> float32 RGB in [0, 1], ``(..., Y, X, 3)``."""
        has_channels = source.ndim == self.stack_ndim + 3
        block = self._to_unit_rgb

        chunks = (*source.chunks[: self.stack_ndim + 2], (3,))
        if has_channels:
            return source.map_blocks(block, chunks=chunks, dtype=np.float32, name=f"unit-rgb-{self._token}")
        return source.map_blocks(block, chunks=chunks, new_axis=source.ndim, dtype=np.float32,
                                 name=f"unit-rgb-{self._token}")

    def _to_unit_rgb(self, raw: np.ndarray) -> np.ndarray:
        """Raw pixels ``(..., Y, X[, C])`` -> float32 RGB in [0, 1], ``(..., Y, X, 3)`` (elementwise)."""
        return self.prep.unit_rgb(raw, has_channels=raw.ndim == self.stack_ndim + 3)

    def _enhanced_block(self, rgb: np.ndarray) -> np.ndarray:
        return self.prep.enhanced(rgb)

    def _overlapped(self, role: str):
        """A network's output, chunk by chunk with ``overlap`` borrowed from each neighbour."""
        axes = {i: 0 for i in range(self.rgb.ndim)}
        for axis in (self.stack_ndim, self.stack_ndim + 1):
            # one chunk along an axis has no neighbour to borrow from (and dask refuses a depth over the size)
            axes[axis] = self.overlap if len(self.rgb.chunks[axis]) > 1 else 0

        def block(rgb, block_info=None):
            return self._network_block(role, rgb, tuple(block_info[0]["chunk-location"]))

        return self.rgb.map_overlap(block, depth=axes, boundary="none", trim=False, dtype=np.float32,
                                    chunks=self.rgb.chunks, meta=np.empty((0,) * self.rgb.ndim, np.float32),
                                    name=f"{role}-{self._token}")

    def _network_block(self, role: str, rgb: np.ndarray, key: tuple) -> np.ndarray:
        """Chunk ``key`` of an output from its overlapped input ``rgb``: cached, computed, or a placeholder."""
        with self._lock:
            hit = self._cached(role, key)
            queued = hit is None and self.background and not self._closed
            if queued and (role, key) not in self._failed:
                self._submit((role, key))
        if hit is not None:
            return hit
        if queued:
            return self._placeholder(rgb, key)
        return self._compute(role, key, rgb)

    def _cached(self, role: str, key: tuple) -> np.ndarray | None:
        cache = self._cache[role]
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        return None

    def _placeholder(self, rgb: np.ndarray, key: tuple) -> np.ndarray:
        """What a chunk looks like until it is stained: its enhanced gray in 3 channels (never cached)."""
        y_axis = self.stack_ndim
        gray = self._trim(self._enhanced_block(rgb.reshape(rgb.shape[y_axis:])), key)
        return np.repeat(gray[..., None], 3, axis=-1).reshape(*rgb.shape[:y_axis], *gray.shape, 3)

    def _compute(self, role: str, key: tuple, rgb: np.ndarray | None = None,
                 enhanced: np.ndarray | None = None) -> np.ndarray:
        """Stain chunk ``key`` (its overlapped input ``rgb``, read here when not given), cache and return it.

        Reading and preparing the input happen outside the network lock, so that several threads
        (the whole-slide pipeline) keep a GPU busy: only the network itself is serialised.
        """
        with self._lock:
            hit = self._cached(role, key)
        if hit is not None:
            return hit
        if rgb is None:
            rgb = self.rgb[self._region(key)].compute()
        y_axis = self.stack_ndim
        plane = rgb.reshape(rgb.shape[y_axis:])
        prepared = self._prepare(role, plane, enhanced)
        with self._net_lock:
            with self._lock:
                hit = self._cached(role, key)  # another thread may have computed it while this one waited
            if hit is not None:
                return hit
            out = self._forward_or_fall_back(role, prepared, key[:y_axis])
        out = np.ascontiguousarray(self._trim(out, key))
        out = out.reshape(*rgb.shape[:y_axis], *out.shape)
        with self._lock:
            self.network_runs[role] += 1
            cache = self._cache[role]
            cache[key] = out
            if len(cache) > self._cache_chunks:
                cache.popitem(last=False)
        return out

    def _forward_or_fall_back(self, role: str, prepared: tuple, plane_index: tuple, uint8: bool = False) -> np.ndarray:
        """:meth:`_forward`, moved to the CPU and run again there if the GPU runs out of memory (network lock held)."""
        try:
            return self._forward(role, prepared, plane_index, uint8)
        except Exception as error:
            if self.device.type == "cpu" or not is_out_of_memory(error):
                raise
            # retried below, outside the except block: its traceback still holds device tensors
        self._fall_back(f"GPU ran out of memory staining a {self.chunk}-px chunk; "
                        "the rest of this image is stained on the CPU")
        return self._forward(role, prepared, plane_index, uint8)

    def _margins(self, key: tuple) -> list[tuple[int, int]]:
        """Pixels borrowed before and after the chunk along Y and X (only towards neighbours: boundary="none")."""
        counts = self.rgb.numblocks
        return [(self.overlap if key[a] > 0 else 0, self.overlap if key[a] < counts[a] - 1 else 0)
                for a in (self.stack_ndim, self.stack_ndim + 1)]

    def _trim(self, out: np.ndarray, key: tuple) -> np.ndarray:
        """Cut the borrowed margins off a plane ``(y, x[, 3])`` of chunk ``key``."""
        (top, bottom), (left, right) = self._margins(key)
        return out[top : out.shape[0] - bottom, left : out.shape[1] - right]

    def _region(self, key: tuple) -> tuple[slice, ...]:
        """Where chunk ``key`` and its borrowed margins lie in ``self.rgb`` (what ``map_overlap`` hands a block)."""
        starts = [sum(sizes[:i]) for sizes, i in zip(self.rgb.chunks, key)]
        index = [slice(s, s + sizes[i]) for s, sizes, i in zip(starts, self.rgb.chunks, key)]
        for axis, (before, after) in zip((self.stack_ndim, self.stack_ndim + 1), self._margins(key)):
            index[axis] = slice(index[axis].start - before, index[axis].stop + after)
        return tuple(index)

    def _prepare(self, role: str, plane: np.ndarray,
                 enhanced: np.ndarray | None = None) -> tuple[np.ndarray, int, int]:
        """A network's padded input ``(C, Y', X')`` float32 for one plane ``(y, x, 3)``, and ``(y, x)`` (host work only).

        ``enhanced``, the plane's enhanced gray ``(y, x)`` if the caller has it already, is not recomputed.
        """
        net = self._teacher if role == "teacher" else self._student
        if role == "teacher":
            x = (self._enhanced_block(plane) if enhanced is None else enhanced)[None]
        else:
            x = self.prep.student_input(plane, self._enhanced_block(plane) if enhanced is None else enhanced)
        padded, (h, w) = pad_image(np.ascontiguousarray(x, dtype=np.float32), net.size_multiple, net.min_size)
        return np.ascontiguousarray(padded), h, w

    def _network(self, role: str, shape: tuple[int, int]) -> torch.nn.Module:
        """The teacher or student for an input of ``shape`` (Y, X): compiled (on first use) for inner chunks.

        Edge chunks run eagerly: compiling each of their shapes (up to 8 more) would cost more than it saves.
        """
        net = self._teacher if role == "teacher" else self._student
        if not self.compile or shape != (self.chunk + 2 * self.overlap,) * 2:
            return net
        if role not in self._compiled:
            self._compiled[role] = torch.compile(net, dynamic=False)
        return self._compiled[role]

    def _forward(self, role: str, prepared: tuple, plane_index: tuple, uint8: bool = False) -> np.ndarray:
        """The network on a :meth:`_prepare`-d input: ``(y, x, 3)`` float32 in [0, 1]. Call with the network lock held.

        ``uint8``: rounded as :func:`digital_stain.arrays.to_uint8` rounds, on the network's device (a quarter
        of the bytes to copy back); the result is then a ``(y, x, 3)`` view of a ``(3, y, x)`` array.
        """
        padded, h, w = prepared
        if role == "student":
            self._freeze(self._statistics(plane_index))  # in place: a compiled student is not recompiled
        net = self._network(role, padded.shape[1:])
        tensor = torch.from_numpy(padded[None]).to(self.device)
        with torch.no_grad(), autocast(self.device, self.precision):
            if role == "teacher":
                out = colorize(net, tensor)
            else:
                out = (net(tensor).float() + 1.0) / 2.0
        out = out.float().clamp(0.0, 1.0)
        if uint8:  # to_uint8's float32 steps, one at a time (no fused multiply-add): the same bytes as on the host
            out = out.mul(255.0).add(0.5).to(torch.uint8)
        out = out.cpu().numpy()[0, :, :h, :w]
        return out.transpose(1, 2, 0)

    def _fall_back(self, message: str) -> None:
        """Move this instance's networks to the CPU after the device ran out of memory."""
        release_memory()
        cpu = torch.device("cpu")
        if "teacher" in self.wanted:
            self._teacher = _cpu_copy(self._teacher)  # a private copy: the caller's model stays where it was
        if "student" in self.wanted:
            self._student.to(cpu)
            self._plane_stats = {k: [(m.to(cpu), v.to(cpu)) for m, v in s] for k, s in self._plane_stats.items()}
        self.device, self.precision = cpu, "fp32"  # always right on a CPU; not worth timing on this rare path
        self.compile, self._compiled = False, {}  # no second compile mid-image: the rest runs eagerly
        self.fallbacks.append(message)
        if self.on_fallback is not None:
            self.on_fallback(message)

    # -- the student's frozen statistics -------------------------------------------
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
            x = self.prep.student_input(rgb, self._enhanced_block(rgb))
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


def input_pyramid(image, min_side: int = 512) -> list:
    """Lower-resolution levels of an input image, built lazily: ``[image, image / 2, image / 4, ...]``.

    Parameters
    ----------
    image : ndarray or dask array, shape (..., Y, X[, C])
        A dark-field plane or stack, any dtype :class:`LazyStain` accepts.
    min_side : int
        Levels are added until the longer plane side is at most this (or the
        shorter one would drop under 8 px).

    Returns
    -------
    list
        ``image`` itself, then dask arrays of its dtype and stack/channel axes,
        each with half the Y and X of the one before: 2 x 2 means of the level
        above (an odd last row or column dropped), rounded for integer dtypes.
        Computed blocks of each level are kept, so a level is read once.
    """
    import dask.array as da

    stack, plane = split_planes(tuple(image.shape))
    check_plane_shape(plane)
    check_dtype(image.dtype)
    y_axis, dtype = len(stack), np.dtype(image.dtype)
    levels = [image]
    height, width = plane[:2]
    while max(height, width) > min_side and min(height, width) // 2 >= MIN_SIDE:
        above = da.asarray(levels[-1]).rechunk({y_axis: 2048, y_axis + 1: 2048})  # 1024-px chunks below
        mean = da.coarsen(np.mean, above, {y_axis: 2, y_axis + 1: 2}, trim_excess=True)
        height, width = height // 2, width // 2
        # each level is kept once computed: the three outputs, their placeholders and the level below all
        # read it, and without the memo each of them would read the whole input again
        levels.append(_memoized(da.round(mean).astype(dtype) if dtype.kind in "ui" else mean.astype(dtype)))
    return levels


def _memoized(array, max_blocks: int = 32):
    """``array`` with its computed blocks kept (least recently used dropped), computed once per block."""
    import dask.array as da

    cache: OrderedDict = OrderedDict()
    lock = threading.Lock()

    def fetch(block_info=None):
        key = tuple(block_info[None]["chunk-location"])
        with lock:
            if key in cache:
                cache.move_to_end(key)
                return cache[key]
        block = np.asarray(array.blocks[key].compute(scheduler="sync"))
        with lock:
            cache[key] = block
            if len(cache) > max_blocks:
                cache.popitem(last=False)
        return block

    return da.map_blocks(fetch, chunks=array.chunks, dtype=array.dtype, name=f"level-{uuid.uuid4().hex}",
                         meta=np.empty((0,) * array.ndim, array.dtype))


def lazy_pyramid(model, image_or_levels, outputs: Sequence[str] | None = None, *, min_side: int = 512,
                 **options) -> tuple[dict[str, list], list[LazyStain]]:
    """Lazily stained multiscale outputs (e.g. for napari multiscale image layers).

    Lower levels are stained from the downsampled *input* (:func:`input_pyramid`),
    never downsampled from a stained level, so showing the whole slide stains
    only coarse chunks. Every level uses level 0's value scaling (the same
    brightness at every zoom) but records its own student statistics:
    instance-norm statistics depend on scale (at half the resolution the same
    tissue gives different feature statistics), so each level is normalised
    as a one-pass run of that level would be, i.e. equals
    ``LazyStain(model, level)``.

    Parameters
    ----------
    model : StainModel
    image_or_levels : array (..., Y, X[, C]) or list of arrays
        One image, whose lower levels are made here, or a pyramid already
        (e.g. a napari multiscale layer's ``data``, largest first), used as given.
    outputs : sequence of str, optional
        As for :class:`LazyStain`.
    min_side : int
        For one image: levels are added until the longer plane side is at
        most this; a smaller image gives one level.
    **options
        Passed to every level's :class:`LazyStain` (``chunk``, ``device``,
        ``background``, ``on_ready``, ...).

    Returns
    -------
    arrays : dict of str to list of dask array
        ``{output: [level 0, level 1, ...]}``, float32, shapes as :class:`LazyStain`'s.
    stains : list of LazyStain
        One per level: close them when done; their ``network_runs`` say what ran.
    """
    if isinstance(image_or_levels, (list, tuple)):
        levels = list(image_or_levels)
        split = [split_planes(tuple(level.shape)) for level in levels]
        if not levels or any(stack != split[0][0] or plane[0] > above[0] or plane[1] > above[1]
                             for (stack, plane), (_, above) in zip(split[1:], split)):
            raise InputError("a pyramid needs at least one level, all with the same stack axes, largest first.")
    else:
        levels = input_pyramid(image_or_levels, min_side)
    # levels too small for the networks (OME-Zarr pyramids go down to a few pixels) are left out
    levels = levels[:1] + [level for level in levels[1:] if min(split_planes(tuple(level.shape))[1][:2]) >= MIN_SIDE]
    scaling = options.pop("scaling", None) or scaling_of(levels[0])
    # decided on level 0 and used by every level: the same mapping at every zoom
    adaptation = model.adaptation(levels[0], options.pop("adapt", "auto"), scaling=scaling)
    net_lock = options.pop("net_lock", None) or threading.Lock()  # the levels share the teacher
    stains = [LazyStain(model, level, outputs, scaling=scaling, net_lock=net_lock, adapt=adaptation, **options)
              for level in levels]
    return {name: [stain.arrays[name] for stain in stains] for name in stains[0].arrays}, stains
