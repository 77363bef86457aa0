"""Whole slides: stain an image of any size into an OME-Zarr store, chunk by chunk, resumably.

>>> from digital_stain import StainModel
>>> from digital_stain.slide.run import stain_to_zarr
>>> model = StainModel.load("dsd-unpaired-fast")                          # doctest: +SKIP
>>> result = stain_to_zarr(model, "slide.ome.zarr", "stained.ome.zarr")   # doctest: +SKIP
>>> result.complete                                                       # doctest: +SKIP
True

The input is read lazily (OME-Zarr level 0, TIFF/BigTIFF through tifffile's
Zarr store, or any dask array) and never held whole in memory. Each work
unit is one level-0 chunk (default 1024 px) of every output asked for: it
reads the chunk plus ``overlap`` pixels of its neighbours, stains it exactly
as :class:`digital_stain.stain.lazy.LazyStain` does (the same code, so the store
holds what the napari plugin shows), rounds to uint8 and writes it into the
store (layout: :mod:`digital_stain.slide.store`). Then the lower pyramid levels
are made from the stored level above, one chunk at a time. Peak memory
depends on the chunk size, not on the slide's size.

Statistics. The student normalises with whole-image statistics. They are
recorded once per slide on a bounded sample (the whole plane up to
2048 x 2048 px, else 16 crops of 512 px spread over it, as ``LazyStain``
does), written to the store's attributes before the first chunk, and every
chunk, in this run or a resumed one, is stained with the stored values. The
input's value scaling is stored the same way.

Resume. A unit counts as done once its progress element is written, after
its data (both flushed to disk). ``resume=True`` skips the done units and
redoes the others, so a run stopped by ``stop``, Ctrl-C, an exception, a
killed process or a full disk ends, once resumed, with the very bytes an
uninterrupted run writes. Resuming with another model, other outputs or
other settings (chunk, overlap, device, precision, pyramid, compile), or on
another input, is refused with what differs.

Distribution. :func:`stain_chunk` / :func:`process_chunk` (level 0) and
:meth:`SlideStore.build_level_unit` (lower levels) are functions of picklable
arguments (the model, the source array, the :class:`SlideJob`, the store's
path and a unit key); no unit shares a file with another, so units of one
level may run in parallel processes, each loading the model once.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from digital_stain.core.adapt import Adaptation, check_mode
from digital_stain.core.arrays import InputError, ValueScaling, check_dtype, check_plane_shape, scaling_note, split_planes, to_uint8
from digital_stain.stain.chunks import ChunkStainer, chunked, grid_sizes, unit_rgb_array
from digital_stain.io.images import Source, open_source, reading_failed
from digital_stain.stain.kernel import StainKernel
from digital_stain.slide.store import (FORMAT, FORMAT_VERSION, NGFF_VERSION, NGFF_VERSIONS, Grid, SlideStore,
                                      level_shapes, prepare_output, stored_statistics)
from digital_stain.io.outputs import check_not_input, check_writable, output_lock
from digital_stain.stain.settings import StainSettings
from digital_stain.stain.tiling import CHUNK_RANGE
from digital_stain.slide.units import ThreadUnits, run_units

log = logging.getLogger(__name__)
__all__ = ["BlockCache", "DiskFullError", "SlideJob", "SlideResult", "Source", "open_source", "process_chunk",
           "stain_chunk", "stain_to_zarr"]

STATS_PIXELS, STATS_CROP = 2048 * 2048, 512  # LazyStain's defaults: the same statistics as the napari view
DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
GPU_THREADS = 4  # units in flight on a GPU by default
# settings added since the first stores: what a store without them used
SETTING_DEFAULTS = {"compile": False, "adapt": "off", "ngff": NGFF_VERSION}


class DiskFullError(InputError):
    """The disk filled up while writing; the store is intact and the run can be resumed."""


def _fingerprint(array) -> str:
    """Shape, dtype and the bytes of a central 256-px square: tells one slide from another without reading it all."""
    height, width = array.shape[:2]
    side = min(256, height, width)
    y, x = (height - side) // 2, (width - side) // 2
    block = np.ascontiguousarray(np.asarray(array[y : y + side, x : x + side].compute(scheduler="sync")))
    digest = hashlib.sha256(repr((tuple(array.shape), str(array.dtype))).encode())
    digest.update(block.tobytes())
    return digest.hexdigest()[:32]


# -- one unit of work ------------------------------------------------------------------------
@dataclass(frozen=True)
class SlideJob:
    """Everything a worker needs besides the model, the source and the store (picklable, small).

    Attributes
    ----------
    grid : Grid
        Chunk size, level-0 units, pyramid levels.
    outputs : tuple of str
    overlap : int
        Pixels borrowed from each neighbour (on the networks' 16-px grid).
    precision : str
        Resolved: ``fp32``, ``bf16`` or ``fp16``.
    scaling : tuple (offset, scale, description)
        Raw values -> [0, 1], decided once for the slide.
    statistics : tuple, optional
        The student's frozen norm statistics, ``((mean, var), ...)`` per norm layer as float tuples.
    token : str
        Identifies this job (a worker keeps one stainer per model, source and token).
    compile : bool
        Run the networks through ``torch.compile`` (each worker compiles once).
    adaptation : dict or str
        The slide's :class:`~digital_stain.core.adapt.Adaptation` as stored (``as_dict``), decided once
        for the whole slide; a mode (``auto|on|off``) only in the job that decides it.
    """

    grid: Grid
    outputs: tuple[str, ...]
    overlap: int
    precision: str
    scaling: tuple
    statistics: tuple | None
    token: str
    compile: bool = False
    adaptation: dict | str = "off"

    @classmethod
    def from_store(cls, store: SlideStore) -> SlideJob:
        """The job recorded in a store :func:`stain_to_zarr` started (what a worker needs to resume its units)."""
        state = store.state
        settings = state["settings"]
        return cls(Grid.from_dict(state["grid"]), tuple(settings["outputs"]), settings["overlap"],
                   settings["precision"], _scaling_tuple(state), _as_tuples(stored_statistics(store.path, state)),
                   state["token"],
                   settings.get("compile", SETTING_DEFAULTS["compile"]), _stored_adaptation(state))


class BlockCache:
    """Regions of a chunked (dask) array, assembled from its decoded blocks, the least recently used dropped.

    A unit's region (its chunk and the margins it borrows) spans up to 9 blocks, 6 of them shared
    with the unit before it in the row; kept, each block is decoded about 3 times instead of 9.

    Parameters
    ----------
    array : dask array, shape (Y, X[, C])
        Chunked along Y and X only.
    max_bytes : int
        Blocks kept (at least 9, so that one unit never decodes a block twice).
    """

    def __init__(self, array, max_bytes: int = 96 * 2**20):
        self.array = array
        self._starts = [np.concatenate([[0], np.cumsum(sizes)]) for sizes in array.chunks[:2]]
        channels = int(np.prod(array.shape[2:]))
        block_bytes = max(array.chunks[0]) * max(array.chunks[1]) * channels * array.dtype.itemsize
        self.max_blocks = max(9, max_bytes // max(block_bytes, 1))
        self._blocks: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.decoded = 0

    def _block(self, i: int, j: int) -> np.ndarray:
        with self._lock:
            block = self._blocks.get((i, j))
            if block is not None:
                self._blocks.move_to_end((i, j))
                return block
        # decoded outside the lock (other threads go on); two threads may decode one block at once, harmlessly
        block = np.asarray(self.array.blocks[i, j].compute(scheduler="sync"))
        with self._lock:
            self.decoded += 1
            self._blocks[(i, j)] = block
            while len(self._blocks) > self.max_blocks:
                self._blocks.popitem(last=False)
        return block

    def region(self, rows: slice, cols: slice) -> np.ndarray:
        """``array[rows, cols]`` as a numpy array (slices with start and stop, step 1)."""
        (y0, y1), (x0, x1) = (rows.start, rows.stop), (cols.start, cols.stop)
        out = np.empty((y1 - y0, x1 - x0, *self.array.shape[2:]), dtype=self.array.dtype)
        ys, xs = self._starts
        for i in range(np.searchsorted(ys, y0, "right") - 1, np.searchsorted(ys, y1, "left")):
            for j in range(np.searchsorted(xs, x0, "right") - 1, np.searchsorted(xs, x1, "left")):
                top, bottom = max(y0, ys[i]), min(y1, ys[i + 1])
                left, right = max(x0, xs[j]), min(x1, xs[j + 1])
                block = self._block(i, j)
                out[top - y0 : bottom - y0, left - x0 : right - x0] = \
                    block[top - ys[i] : bottom - ys[i], left - xs[j] : right - xs[j]]
        return out


class _ChunkStain:
    """One slide's level-0 units, stained one at a time by the napari view's own chunk code (:class:`ChunkStainer`).

    The slide's value scaling, adaptation and stored statistics; the unit grid is the lazy view's chunk
    grid, so a unit is stained exactly as :class:`~digital_stain.stain.lazy.LazyStain` stains that chunk.
    """

    def __init__(self, model, array, job: SlideJob, device=None):
        settings = StainSettings(chunk=job.grid.chunk, overlap=job.overlap, precision=job.precision,
                                 device=None if device is None else str(device),
                                 stats_pixels=STATS_PIXELS, stats_crop=STATS_CROP, compile=job.compile,
                                 adapt=job.adaptation if isinstance(job.adaptation, str)
                                 else Adaptation.from_dict(job.adaptation))
        self.wanted = model.check_outputs(job.outputs)
        self.chunk, self.overlap = grid_sizes(settings.chunk, settings.overlap)
        check_plane_shape(split_planes(tuple(array.shape))[1])
        check_dtype(array.dtype)
        self.prep = model.preparation(array, adapt=settings.adapt,
                                      scaling=ValueScaling(*job.scaling) if job.scaling is not None else None)
        self.scaling = self.prep.scaling
        source = chunked(array, 0, self.chunk, self.overlap)
        self.rgb = unit_rgb_array(source, self.prep, 0, f"slide-rgb-{uuid.uuid4().hex}")
        self.stainer = ChunkStainer(StainKernel(model, self.prep, settings), self.rgb, 0, self.overlap, self.chunk)
        self.blocks = BlockCache(source)
        self._net_lock = threading.Lock()  # units of one slide share the device: one network run at a time
        if job.statistics is not None:
            self.use_statistics(job.statistics)

    @property
    def device(self):
        return self.stainer.kernel.device

    @property
    def precision(self) -> str:
        return self.stainer.kernel.precision

    def record_statistics(self) -> tuple:
        """Record the plane's student statistics (bounded sample) as float tuples, the form they are stored in."""
        stats = self.stainer.statistics(())
        return tuple((tuple(m.float().cpu().tolist()), tuple(v.float().cpu().tolist())) for m, v in stats)

    def use_statistics(self, statistics: tuple) -> None:
        self.stainer.use_statistics((), statistics)

    def unit(self, key: tuple[int, int]) -> dict[str, np.ndarray]:
        """uint8 outputs of level-0 unit ``key``: enhanced ``(h, w)``, teacher/student ``(h, w, 3)``."""
        block = (*key, 0)  # the unit-RGB array has one chunk along its channel axis
        # the chunk and its borrowed margins, converted after slicing: converting the whole
        # neighbouring chunks (what self.rgb would do) costs more than the read on a fast GPU
        rgb = self.prep.unit_rgb(self.blocks.region(*self.stainer.region(block)[:2]), has_channels=self.rgb_has_channels)
        enhanced = self.prep.enhanced(rgb)  # once per unit: the output and both networks' inputs
        results = {}
        if "enhanced" in self.wanted:
            results["enhanced"] = to_uint8(self.stainer.trim(enhanced, block))
        for role in ("teacher", "student"):
            if role in self.wanted:
                prepared = self.stainer.prepare(role, rgb, enhanced)
                with self._net_lock:
                    out = self.stainer.forward(role, prepared, (), uint8=True)
                # a (h, w, 3) view of the (3, h, w) network output: the store wants (3, h, w) again
                results[role] = self.stainer.trim(out, block)
        return results

    @property
    def rgb_has_channels(self) -> bool:
        return self.blocks.array.ndim == 3


_STAINERS: OrderedDict = OrderedDict()  # (id(model), source name, job token) -> _ChunkStain; the model is kept alive


def _stainer(model, array, job: SlideJob) -> _ChunkStain:
    key = (id(model), array.name, job.token)
    if key not in _STAINERS:
        _STAINERS[key] = _ChunkStain(model, array, job)
        while len(_STAINERS) > 2:
            _STAINERS.popitem(last=False)
    return _STAINERS[key]


def stain_chunk(model, array, job: SlideJob, key: tuple[int, int]) -> dict[str, np.ndarray]:
    """Stain level-0 unit ``key`` of a slide; writes nothing.

    Parameters
    ----------
    model : StainModel
        On the device it should run on.
    array : dask array (Y, X[, C])
        :attr:`Source.array`.
    job : SlideJob
    key : (int, int)
        Unit row and column (:meth:`Grid.units`).

    Returns
    -------
    dict of output name to uint8 array: ``enhanced`` ``(h, w)``, ``teacher``/``student`` ``(h, w, 3)``,
    ``(h, w)`` being :meth:`Grid.box` of the unit. The same key, job and model give the same bytes.
    """
    return _stainer(model, array, job).unit(key)


def process_chunk(model, array, store: SlideStore, job: SlideJob, key: tuple[int, int]) -> None:
    """Stain level-0 unit ``key``, write it into ``store`` and mark it done (the unit of work to distribute)."""
    results = stain_chunk(model, array, job, key)
    box = job.grid.box(0, key)
    for output in job.outputs:
        store.write(output, 0, box, results[output])
    store.mark_done(0, key)


# -- the whole slide -------------------------------------------------------------------------
@dataclass
class SlideResult:
    """What :func:`stain_to_zarr` did.

    Attributes
    ----------
    path : Path
        The store.
    outputs : tuple of str
    levels : list of (int, int)
        ``(Y, X)`` of each pyramid level.
    units_total, units_done, units_skipped : int
        Work units of all levels; those done by this call; those found done (resume).
    complete : bool
        Every unit of every level is written.
    stopped : bool
        ``stop`` was set; the store is resumable.
    seconds : float
    notes : list of str
        Input re-chunking and resume notes (also logged).
    adaptation : Adaptation or None
        What was decided for the slide (:mod:`digital_stain.core.adapt`), stored in the store's attributes.
    """

    path: Path
    outputs: tuple[str, ...]
    levels: list
    units_total: int
    units_done: int = 0
    units_skipped: int = 0
    complete: bool = False
    stopped: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    adaptation: Adaptation | None = None


def stain_to_zarr(model, source, output: str | os.PathLike, outputs: Sequence[str] | None = None, *,
                  settings: StainSettings | None = None, chunk: int | None = None, overlap: int | None = None,
                  device: str | None = None, precision: str | None = None,
                  min_side: int = 512, resume: bool = False, overwrite: bool = False,
                  progress: Callable[[int, int], None] | None = None,
                  stop: threading.Event | None = None, client=None, threads: int | None = None,
                  compile: bool | None = None, adapt: str | None = None, ngff: str | None = None) -> SlideResult:
    """Stain a whole slide into an OME-Zarr store (one image group per output, with a pyramid).

    Parameters
    ----------
    model : StainModel or str
        A loaded model, or a shipped model's name or a model file's path.
    source : path-like, array or Source
        The dark-field slide (see :func:`open_source`).
    output : path-like
        The store to write (``*.ome.zarr``); layout in :mod:`digital_stain.slide.store`.
    outputs : sequence of str, optional
        ``enhanced``, ``teacher``, ``student``; default all the model has.
    settings : StainSettings, optional
        How to stain (:class:`~digital_stain.stain.settings.StainSettings`: its chunk, overlap,
        device, precision, compile and adapt are used, the adapt not when resuming; the statistics
        are the slide's own, below). The keywords below, when given, win over it.
    chunk : int
        Side of a work unit and of the stored chunks, 256..4096 px (rounded
        down to the networks' 16-px grid). Memory grows with its square.
    overlap : int
        Pixels each chunk borrows from its neighbours (rounded up to 16);
        128 makes chunked staining match one pass to about 1/255.
    device, precision : str
        As for :meth:`StainModel.stain`: default where the model is (a model given by name is
        loaded with ``auto``). The model itself is never moved.
    min_side : int
        Pyramid levels are added until the longer side is at most this.
    resume : bool
        Continue a store this function started: done units are kept, the rest
        is done with the stored statistics. Refused if the model, outputs,
        settings or input differ. A missing store is simply started.
    overwrite : bool
        Replace an existing store (only a Zarr store or an empty folder is deleted).
    progress : callable(done, total), optional
        Called after every unit (all levels), counting units already done.
    stop : threading.Event, optional
        Set it to stop after the current unit; the result then has ``stopped``
        and the store can be resumed.
    threads : int, optional
        Units worked on at once in this process (default 4 on a GPU, 1 on the CPU). Reading,
        preparing, compressing and writing one unit overlap the network of another; the
        networks themselves run one at a time. Memory grows with it.
    compile : bool
        Run the networks through ``torch.compile``: one compile (10-60 s) at the first inner unit,
        then each inner unit (margins on all sides) runs faster; units at the slide's edges run
        eagerly (:class:`~digital_stain.stain.lazy.LazyStain`). Inner units match an uncompiled run to
        float rounding (at most 1 gray level), so a store is resumed with the setting it was started with.
    adapt : ``auto|on|off``, optional
        Adaptation to another microscope (:mod:`digital_stain.core.adapt`), decided once for the whole
        slide (on 16 MP of crops spread over it) and stored, so every unit, resumed or on a cluster
        worker, uses the same mapping. Default: ``auto`` for a new store, the stored setting when
        resuming (stores written before adaptation resume with ``off``).
    ngff : ``0.4|0.5``, optional
        The OME-Zarr version written: 0.4 on Zarr format 2 (default for a new store; every
        OME-Zarr reader opens it) or 0.5 on Zarr format 3. Resuming keeps the store's.
    client : distributed.Client, optional
        Spread the units over this dask.distributed cluster
        (:func:`digital_stain.slide.cluster.cluster_client`); each worker loads the
        model file once. This process still decides the scaling and statistics,
        so the store's bytes are those of a run without a cluster.

    Returns
    -------
    SlideResult

    Raises
    ------
    InputError
        Bad input or settings, an existing output without ``resume`` or
        ``overwrite``, a resume that does not match the store.
    DiskFullError
        The disk filled up; units written so far are kept and marked, so the
        same call with ``resume=True`` continues once space is freed.
    """
    started = time.perf_counter()
    output = Path(output)
    base = settings if settings is not None else StainSettings()
    chunk = base.chunk if chunk is None else chunk
    overlap = base.overlap if overlap is None else overlap
    device = base.device if device is None else device
    precision = base.precision if precision is None else precision
    compile = base.compile if compile is None else compile
    if adapt is None and settings is not None and not resume:  # else: auto for a new store, the stored one on resume
        adapt = settings.adapt.mode if isinstance(settings.adapt, Adaptation) else settings.adapt
    if not CHUNK_RANGE[0] <= chunk <= CHUNK_RANGE[1]:
        raise InputError(f"chunk {chunk} px is out of range; use {CHUNK_RANGE[0]}..{CHUNK_RANGE[1]} (default 1024).")
    if resume and overwrite:
        raise InputError("resume and overwrite exclude each other: resume continues the store, overwrite replaces it.")
    if ngff is not None and str(ngff) not in NGFF_VERSIONS:
        raise InputError(f"NGFF version {ngff} cannot be written; choose one of {', '.join(NGFF_VERSIONS)} "
                         "(0.4 opens in every OME-Zarr reader, 0.5 in recent ones).")
    src = open_source(source, chunk=chunk)
    if src.path is not None:
        check_not_input(output, [src.path])
    check_writable(output)
    with output_lock(output):  # one writer at a time: a second run on the same store is refused
        try:
            return _stain_to_zarr(model, source, src, output, outputs, chunk=chunk, overlap=overlap,
                                  device=device, precision=precision, min_side=min_side, resume=resume,
                                  overwrite=overwrite, progress=progress, stop=stop, client=client,
                                  threads=threads, compile=compile, adapt=adapt, ngff=ngff, started=started)
        except (InputError, KeyboardInterrupt):
            raise
        except Exception as err:
            if not reading_failed(err):
                raise
            raise InputError(f"part of {src.name} cannot be read ({type(err).__name__}: {err}): the file or store "
                             f"is damaged. What was stained is kept in {output}; repair or re-export the input, "
                             "then finish with --resume (resume=True).") from err


def _stain_to_zarr(model, source, src: Source, output: Path, outputs, *, chunk, overlap, device, precision,
                   min_side, resume, overwrite, progress, stop, client, threads, compile, adapt,
                   ngff, started) -> SlideResult:
    """:func:`stain_to_zarr` once its input is open and checked and the output is locked."""
    from digital_stain import __version__
    from digital_stain.stain.model import StainModel, provenance

    if not isinstance(model, StainModel):
        model = StainModel.load(model, device=device or "auto")
    wanted = model.check_outputs(outputs)
    adapt = check_mode(adapt) if adapt is not None else None
    stored = prepare_output(output, resume=resume, overwrite=overwrite)
    if adapt is None:
        adapt = stored["settings"].get("adapt", SETTING_DEFAULTS["adapt"]) if stored is not None else "auto"
    if ngff is None:  # a new store: 0.4; a resumed one: as it was started
        ngff = stored["settings"].get("ngff", SETTING_DEFAULTS["ngff"]) if stored is not None else NGFF_VERSION

    # decided here, or as stored: a resumed run must not measure the slide again
    adaptation = _stored_adaptation(stored) if stored is not None and "adaptation" in stored else adapt
    stainer = _ChunkStain(model, src.array, SlideJob(Grid(chunk, (), (), ()), wanted, overlap, precision,
                                                     _scaling_tuple(stored), None, "probe", bool(compile),
                                                     adaptation), device=device)
    grid = Grid(stainer.chunk, tuple(stainer.rgb.chunks[0]), tuple(stainer.rgb.chunks[1]),
                level_shapes(tuple(src.array.shape[:2]), min_side))
    settings = {"outputs": list(wanted), "chunk": stainer.chunk, "overlap": stainer.overlap,
                "precision": stainer.precision, "device": stainer.device.type, "min_side": min_side,
                "stats_pixels": STATS_PIXELS, "stats_crop": STATS_CROP, "compile": bool(compile), "adapt": adapt,
                "ngff": str(ngff)}
    identity = {"shape": list(src.array.shape), "dtype": str(src.array.dtype), "fingerprint": _fingerprint(src.array)}
    model_id = {"name": model.name, "checksum": model.checksum, "path": str(model.path) if model.path else None}
    notes = list(src.notes)
    if stored is not None:
        _check_resume(output, stored, model_id, settings, identity)
        if stored.get("package") != f"napari-digital-stain {__version__}":
            notes.append(f"{output} was started by {stored.get('package')}; continuing with {__version__}.")
        statistics = _as_tuples(stored_statistics(output, stored))
        scaling = _scaling_tuple(stored)
    else:
        scaling = (stainer.scaling.offset, stainer.scaling.scale, stainer.scaling.source)
        if scaling_note(stainer.scaling) is not None:
            notes.append(scaling_note(stainer.scaling))
        statistics = stainer.record_statistics() if "student" in wanted else None
    job = SlideJob(grid, wanted, stainer.overlap, stainer.precision, scaling, statistics,
                   token=stored["token"] if stored else uuid.uuid4().hex, compile=bool(compile),
                   adaptation=stainer.prep.adaptation.as_dict())
    if statistics is not None:
        stainer.use_statistics(statistics)  # the stored (rounded-trip) values, exactly as a resumed run uses them
    cache_key = (id(model), src.array.name, job.token)
    _STAINERS[cache_key] = stainer  # what stain_chunk uses; dropped at the end (it holds the model and the source)

    result = SlideResult(output, wanted, [list(level) for level in grid.levels],
                         sum(len(grid.units(level)) for level in range(len(grid.levels))), notes=notes,
                         adaptation=stainer.prep.adaptation)
    try:
        if stored is None:
            store = SlideStore.create(output, {
                "format": FORMAT, "format_version": FORMAT_VERSION, "token": job.token, "complete": False,
                **provenance(), "model": model_id, "settings": settings, "source": {"name": src.name, **identity},
                "scaling": {"offset": scaling[0], "scale": scaling[1], "source": scaling[2]},
                "statistics": _as_lists(statistics), "grid": grid.as_dict(), "adaptation": job.adaptation},
                src.calibration)
        else:
            store = SlideStore(output)
            if not stored.get("complete"):
                SlideStore.create(output, stored, src.calibration)  # arrays a crash during creation left unmade
            cleaned = store.clean_partial_files()
            if cleaned:
                notes.append(f"removed {cleaned} temporary file(s) left by an interrupted write.")
        for note in notes[len(src.notes):]:
            log.warning(note)
        if client is None:
            if threads is None:
                # a unit's host work took ~4x what its network is expected to take on a fast GPU
                # (docs/benchmarks.md, "Host work per unit"): four in flight keep the GPU busy
                threads = 1 if stainer.device.type == "cpu" else GPU_THREADS
            backend = ThreadUnits(partial(process_chunk, model, src.array, store, job), store.build_level_unit,
                                  threads=threads)
        else:  # cluster imports neither slide nor units (no import cycle): process_chunk goes to it as an argument
            from digital_stain.slide.cluster import ClusterUnits, source_reference

            backend = ClusterUnits(client, model, source_reference(source, src), store, job, process_chunk)
        run_units(backend, store, grid, result, progress, stop)
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        raise DiskFullError(
            f"the disk holding {output} is full ({err.strerror or err}). {result.units_skipped + result.units_done} "
            f"of {result.units_total} chunks are written and kept; free some space, then run the same command "
            "with --resume (resume=True) to finish the rest."
        ) from err
    finally:
        _STAINERS.pop(cache_key, None)
    result.seconds = round(time.perf_counter() - started, 2)
    return result


def _check_resume(output: Path, stored: dict, model_id: dict, settings: dict, identity: dict) -> None:
    """Refuse to resume with anything that would change the pixels; name every difference."""
    differences = []
    if stored["model"].get("checksum") != model_id["checksum"]:
        differences.append(f"model: stored {stored['model'].get('name')} (checksum "
                           f"{str(stored['model'].get('checksum'))[:12]}), now {model_id['name']} "
                           f"(checksum {str(model_id['checksum'])[:12]})")
    for key, value in settings.items():
        before = stored["settings"].get(key, SETTING_DEFAULTS.get(key))
        if before != value:
            differences.append(f"{key}: stored {_text(before)}, now {_text(value)}")
    source = stored.get("source", {})
    for key in ("shape", "dtype", "fingerprint"):
        if source.get(key) != identity[key]:
            differences.append(f"input {key}: stored {_text(source.get(key))}, now {_text(identity[key])}")
    if differences:
        raise InputError(f"cannot resume {output}: it was started with other settings ("
                         + "; ".join(differences) + "). Resume with the settings it was started with, "
                         "or pass --overwrite (overwrite=True) to start again.")


def _text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _scaling_tuple(stored: dict | None) -> tuple | None:
    if stored is None:
        return None
    scaling = stored["scaling"]
    return float(scaling["offset"]), float(scaling["scale"]), str(scaling["source"])


def _stored_adaptation(state: dict) -> dict | str:
    """The adaptation a store records (stores written before adaptation: ``off``)."""
    return state.get("adaptation") or state.get("settings", {}).get("adapt", SETTING_DEFAULTS["adapt"])


def _as_tuples(statistics) -> tuple | None:
    return None if statistics is None else tuple((tuple(m), tuple(v)) for m, v in statistics)


def _as_lists(statistics) -> list | None:
    return None if statistics is None else [[list(m), list(v)] for m, v in statistics]
