"""Lazy staining: dask arrays whose chunks are stained only when something reads them.

For images too large to stain up front (whole slides, dask-backed napari
layers), :class:`LazyStain` builds one dask array per output. Building them
runs no network: the input is only checked (shape, pixel type, NaNs) and its
value scaling decided. The student's instance-norm statistics of a plane are
recorded by the first chunk of that plane that needs them, on the whole
plane when it is small enough or on crops spread over it (exactly what
:meth:`StainModel.stain` records), kept and handed to every chunk's call
(:class:`~digital_stain.stain.chunks.ChunkStainer`, :mod:`digital_stain.stain.kernel`),
so every chunk of the plane is normalised identically.

Each chunk is computed from the chunk plus ``overlap`` pixels of its
neighbours (``dask.array.map_overlap``), on the network's stride grid, and
the margins are cut off: the result equals a one-pass run to within the
tiling error of :mod:`digital_stain.stain.tiling` (no seams). Computed chunks are
kept in a small cache, so reading a region again (panning back) does not
run the network again.

Background mode (``background=True``, for viewers): a read that misses the
cache does not wait for the network. It queues the chunk for one private
worker thread (:class:`~digital_stain.stain.background.NewestFirst`) and returns at once a
placeholder, the chunk's enhanced gray in three channels. The worker serves
the newest request first (the region looked at now), caches the result and
calls ``on_ready`` so the viewer can read the region again. (A napari layer
showing these arrays needs ``cache=False``: napari's own dask cache would
keep the placeholders.)

Out of GPU memory: a chunk whose network run raises an out-of-memory error
moves this instance's kernel to the CPU (the model itself is not moved),
says so through ``on_fallback`` and is computed again there, as is the rest
of the image.

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
import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import torch

from digital_stain.core.adapt import Adaptation
from digital_stain.core.arrays import MIN_SIDE, InputError, ValueScaling, check_dtype, check_plane_shape, plain_array, scaling_of, split_planes
from digital_stain.stain.background import NewestFirst
from digital_stain.stain.chunks import ChunkStainer, chunk_sizes, chunked, grid_sizes, unit_rgb_array  # noqa: F401  (chunk_sizes: public here too)
from digital_stain.stain.kernel import StainKernel
from digital_stain.stain.settings import StainSettings


_LIVE: weakref.WeakSet = weakref.WeakSet()  # background instances not yet closed
_READ_NOW = threading.local()  # stained_when_read(): this thread wants stains, not placeholders


@contextlib.contextmanager
def stained_when_read():
    """Chunks read inside this block are stained there and then, never shown as placeholders.

    A background :class:`LazyStain` (napari's) answers a read with the enhanced gray while its
    worker stains the chunk; saving a layer must get the stain itself. dask runs the blocks in
    this thread (synchronous scheduler), so the switch, kept per thread, reaches them.
    """
    import dask

    before = getattr(_READ_NOW, "on", False)
    _READ_NOW.on = True
    try:
        with dask.config.set(scheduler="synchronous"):
            yield
    finally:
        _READ_NOW.on = before


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
    settings : StainSettings, optional
        How to stain (:class:`~digital_stain.stain.settings.StainSettings`); its ``tile`` and
        ``batch`` are the eager path's and unused here. The keywords below, when given, change
        single settings of it.
    chunk, overlap : int
        Chunk side and the margin borrowed from neighbours, in pixels; both
        are rounded to the networks' stride grid (16).
    device, precision : str, optional
        As for :meth:`StainModel.stain`.
    stats_pixels, stats_crop : int
        Images up to ``stats_pixels`` get whole-image student statistics,
        larger ones crops of ``stats_crop`` spread over them (as
        ``StainModel.stain`` records them).
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
        Adaptation to another microscope (:mod:`digital_stain.core.adapt`), decided once on the whole
        image (a dask image larger than 16 MP on crops spread over it) and the same for every
        chunk; an :class:`~digital_stain.core.adapt.Adaptation` decided beforehand is used as it is.

    Attributes
    ----------
    arrays : dict of str to dask array
        ``enhanced`` ``(..., Y, X)``, ``teacher``/``student`` ``(..., Y, X, 3)``; float32 in [0, 1].
    prep : Preparation
        The image's value scaling, adaptation and input tables (:mod:`digital_stain.core.prepare`).
    network_runs : dict of str to int
        How many chunks each network has computed (cache hits not counted).
    errors : list of str
        Chunks that failed in the worker thread (``role chunk (..., y, x): error``, chunk indices).
    fallbacks : list of str
        The out-of-memory fallbacks that happened (at most one per instance).
    device : torch.device
        Where the networks run (the CPU after a fallback).
    """

    def __init__(self, model, image, outputs: Sequence[str] | None = None, *, settings: StainSettings | None = None,
                 chunk: int | None = None, overlap: int | None = None, device: str | None = None,
                 precision: str | None = None, stats_pixels: int | None = None, stats_crop: int | None = None,
                 cache_chunks: int = 256, background: bool = False, on_ready: Callable[[], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None,
                 on_fallback: Callable[[str], None] | None = None, max_pending: int = 64,
                 scaling: ValueScaling | None = None, cache_bytes: int | None = None,
                 net_lock: threading.Lock | None = None, compile: bool | None = None,
                 adapt: str | Adaptation | None = None):
        import dask.array as da

        settings = StainSettings.of(settings, chunk=chunk, overlap=overlap, device=None if device is None else str(device),
                                    precision=precision, stats_pixels=stats_pixels, stats_crop=stats_crop,
                                    compile=compile, adapt=adapt)
        self.model = model
        self.settings = settings
        self.wanted = model.check_outputs(outputs)
        self.chunk, self.overlap = grid_sizes(settings.chunk, settings.overlap)
        if isinstance(image, np.ndarray):
            image = plain_array(image)  # a masked array's mask cannot be honoured: refused
        stack, plane = split_planes(tuple(image.shape))
        check_plane_shape(plane)
        check_dtype(image.dtype)
        self.stack_ndim = len(stack)
        self.input_dtype = np.dtype(image.dtype)
        # decided once for the whole image (its value scaling and adaptation); every chunk uses it
        self.prep = model.preparation(image, adapt=settings.adapt, scaling=scaling)
        self.scaling = self.prep.scaling
        self.network_runs = {name: 0 for name in ("teacher", "student")}
        self.errors: list[str] = []
        self.background, self.max_pending = background, max_pending
        self.on_ready, self.on_error, self.on_fallback = on_ready, on_error, on_fallback
        self._cache: dict[str, OrderedDict] = {name: OrderedDict() for name in ("teacher", "student")}
        if cache_bytes is not None:  # a memory budget rather than a count: chunks are float32 RGB
            cache_chunks = max(4, cache_bytes // (self.chunk * self.chunk * 3 * 4))
        self._cache_chunks = cache_chunks
        self._lock = threading.Lock()  # guards the caches, counters and errors; never held while a network runs
        # one network run at a time on the device, whatever reads in parallel (a pyramid's levels share one lock):
        # it bounds the device memory a layer takes
        self._net_lock = net_lock or threading.Lock()
        # (role, chunk key) jobs for the background thread; a failed one is shown as a placeholder, not retried
        self._queue = NewestFirst(lambda job: self._compute(*job), done=self._chunk_ready, failed=self._chunk_failed,
                                  max_pending=max_pending)
        if background:
            _LIVE.add(self)

        source = chunked(image if not isinstance(image, np.ndarray) else da.from_array(image, chunks=-1),
                         self.stack_ndim, self.chunk, self.overlap)
        # explicit task names: otherwise dask tokenizes our bound methods by pickling the whole model (~0.3 s each)
        self._token = uuid.uuid4().hex
        self._source = source  # raw, for readers that convert only the region they need (slide units)
        self.rgb = unit_rgb_array(source, self.prep, self.stack_ndim, f"unit-rgb-{self._token}")
        # the kernel (the networks' read-only copies on the device, precision, settings), the chunk grid and
        # the per-plane statistics: what a slide unit stains with too
        self.stainer = ChunkStainer(StainKernel(model, self.prep, settings), self.rgb,
                                    self.stack_ndim, self.overlap, self.chunk, on_fallback)
        self.arrays: dict = {}
        if "enhanced" in self.wanted:
            self.arrays["enhanced"] = self.rgb.map_blocks(self._enhanced_block, drop_axis=self.rgb.ndim - 1,
                                                          dtype=np.float32, name=f"enhanced-{self._token}")
        for role in ("teacher", "student"):
            if role in self.wanted:
                self.arrays[role] = self._overlapped(role)

    @property
    def kernel(self) -> StainKernel:
        return self.stainer.kernel

    @kernel.setter
    def kernel(self, kernel: StainKernel) -> None:
        self.stainer.kernel = kernel

    @property
    def fallbacks(self) -> list[str]:
        return self.stainer.fallbacks

    @property
    def _plane_stats(self) -> dict:
        return self.stainer.plane_statistics

    @property
    def device(self) -> torch.device:
        """Where the networks run (the CPU after a fallback)."""
        return self.kernel.device

    @property
    def precision(self) -> str:
        return self.kernel.precision

    @property
    def compile(self) -> bool:
        return self.kernel.settings.compile

    # -- background worker (digital_stain.stain.background) ---------------------------------
    @property
    def pending(self) -> int:
        """Chunks queued or being computed by the worker."""
        return self._queue.pending

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no chunk is queued or being computed; False if ``timeout`` (s) ran out first."""
        return self._queue.wait(timeout)

    def close(self, wait: bool = True) -> None:
        """Drop the waiting chunks and stop the worker after the chunk in progress.

        ``wait`` joins the worker (a GUI passes False: the chunk in progress
        may take seconds). Reads after closing compute synchronously, as with
        ``background=False``.
        """
        _LIVE.discard(self)
        self._queue.close(wait)

    def cancel_pending(self) -> int:
        """Drop the waiting chunks (not the one in progress); returns how many. Reading them queues them again."""
        return self._queue.cancel_pending()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (reads then compute in the reading thread)."""
        return self._queue.closed

    @property
    def _running(self) -> tuple | None:
        return self._queue.running

    @property
    def _worker(self) -> threading.Thread | None:
        return self._queue.thread

    def _chunk_ready(self, job: tuple) -> None:
        if self.on_ready is not None:
            self.on_ready()

    def _chunk_failed(self, job: tuple, error: BaseException) -> None:
        role, key = job
        with self._lock:
            self.errors = [*self.errors[-19:], f"{role} chunk {key[: self.stack_ndim + 2]}: "
                           f"{type(error).__name__}: {error}"]
        if self.on_error is not None:
            self.on_error(error)

    def __enter__(self) -> LazyStain:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- per-chunk work ------------------------------------------------------
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
        if hit is not None:
            return hit
        if self.background and not self._queue.closed and not getattr(_READ_NOW, "on", False):
            self._queue.submit((role, key))  # a chunk that failed before is not queued again
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
        gray = self.stainer.trim(self._enhanced_block(rgb.reshape(rgb.shape[y_axis:])), key)
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
            rgb = self.rgb[self.stainer.region(key)].compute()
        y_axis = self.stack_ndim
        plane = rgb.reshape(rgb.shape[y_axis:])
        prepared = self.stainer.prepare(role, plane, enhanced)
        with self._net_lock:
            with self._lock:
                hit = self._cached(role, key)  # another thread may have computed it while this one waited
            if hit is not None:
                return hit
            out = self.stainer.forward(role, prepared, key[:y_axis])  # on the CPU if the device runs out of memory
        out = np.ascontiguousarray(self.stainer.trim(out, key))
        out = out.reshape(*rgb.shape[:y_axis], *out.shape)
        with self._lock:
            self.network_runs[role] += 1
            cache = self._cache[role]
            cache[key] = out
            if len(cache) > self._cache_chunks:
                cache.popitem(last=False)
        return out

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
    settings = options.get("settings")
    adapt = options.pop("adapt", None) or (settings.adapt if settings is not None else "auto")
    adaptation = model.adaptation(levels[0], adapt, scaling=scaling)
    net_lock = options.pop("net_lock", None) or threading.Lock()  # the levels share the teacher
    stains = [LazyStain(model, level, outputs, scaling=scaling, net_lock=net_lock, adapt=adaptation, **options)
              for level in levels]
    return {name: [stain.arrays[name] for stain in stains] for name in stains[0].arrays}, stains
