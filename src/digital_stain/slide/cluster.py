"""Whole slides on a dask.distributed cluster: the units of :mod:`digital_stain.slide.run`, spread over workers.

>>> from digital_stain.slide.cluster import cluster_client
>>> from digital_stain.slide.run import stain_to_zarr
>>> with cluster_client(workers=4) as client:                                     # doctest: +SKIP
...     stain_to_zarr("dsd-unpaired", "slide.ome.zarr", "out.ome.zarr", client=client)

The client process decides everything that must be the same for every chunk (value scaling,
the student's norm statistics, precision) and writes it into the store before the first unit
(:func:`digital_stain.slide.run.stain_to_zarr`). A task then names only small things: the model
file and its checksum, where the slide is, the store's path, the :class:`~digital_stain.slide.run.SlideJob`
and a unit key. Each worker process loads the model once (on its GPU if it has one) and keeps it;
a unit's bytes do not depend on which worker made them. Which units run, in what order, and what a
stop or an error does is decided by :func:`digital_stain.slide.units.run_units`, as for threads; the
back-end here, :class:`ClusterUnits`, only submits units as tasks and collects the finished ones.

A unit writes its chunk, then marks it done. Writing a unit twice writes the same bytes, so when a
worker dies, the scheduler's re-run of its units on another worker is harmless, and a unit the dead
worker had finished but not reported is simply made again.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator

from digital_stain import hostmem
from digital_stain.core.arrays import InputError

log = logging.getLogger(__name__)
__all__ = ["ClusterUnits", "cluster_client", "source_reference"]

_MODELS: dict = {}  # per worker process: (model path, checksum) -> StainModel
_SOURCES: dict = {}  # per worker process: (path, chunk) -> Source
_LOCK = threading.Lock()  # a worker may run several threads


@contextlib.contextmanager
def cluster_client(scheduler: str | None = None, workers: int | None = None, *, timeout: float = 20.0) -> Iterator:
    """A dask.distributed client: connected to ``scheduler``, or on a local cluster of ``workers`` processes.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``); its workers must have this package
        and the model file's path (a shipped model, or a file on a shared disk).
    workers : int, optional
        Start a local cluster of this many worker processes, one thread each, the machine's CPU
        threads shared among them; closed on leaving the block.
    timeout : float
        Seconds to wait for ``scheduler`` to answer.
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise InputError("running on a cluster needs dask.distributed: pip install distributed") from err
    if (scheduler is None) == (workers is None):
        raise InputError("give either a scheduler address or a number of local workers, not both or neither.")
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout=f"{timeout}s", set_as_default=False)
        except (OSError, TimeoutError) as err:
            raise InputError(f"no dask scheduler answered at {scheduler} ({err}); start one with "
                             "`dask scheduler` and workers with `dask worker ADDRESS`, or use --workers N.") from err
        with client:
            yield client
        return
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}.")
    threads = max(1, (os.cpu_count() or 1) // workers)
    # set_as_default=False: only the units go to the cluster; the client's own reads (statistics,
    # the input's fingerprint) stay in this process instead of shipping file handles to workers
    # torch reads its thread count when imported: set it in the workers' environment, so that N
    # workers do not each start one thread per core and slow each other down
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           # the workers are processes of ours, started before their torch allocates: huge pages (hostmem.py)
           **hostmem.child_environment()}
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      env=env) as cluster, Client(cluster, set_as_default=False) as client:
        try:
            yield client
        finally:
            _close_workers(client)


def _close_workers(client) -> None:
    """Retire the local workers before the scheduler closes, so that none of them is left sending a
    heartbeat to a scheduler that is gone (which prints an error and a traceback at exit)."""
    import contextlib

    with contextlib.suppress(Exception):  # closing anyway: a failure here must not hide the result
        client.retire_workers(close_workers=True, remove=True)


def source_reference(source, src) -> object:
    """What a worker opens the slide from: the path it was given, else the lazy array itself.

    Parameters
    ----------
    source : the ``source`` argument of :func:`digital_stain.slide.run.stain_to_zarr`
    src : Source
        What it opened to.
    """
    from digital_stain.io.images import Source

    if isinstance(source, (str, os.PathLike)):
        return os.fspath(os.path.abspath(source))
    if isinstance(source, Source) and os.path.exists(source.name):  # opened from a file: workers reopen it
        return os.fspath(os.path.abspath(source.name))
    return src.array  # an array from Python: sent to the workers as it is (a dask graph, or the data)


def _worker_model(path: str, checksum: str):
    from digital_stain.stain.model import StainModel

    with _LOCK:
        key = (path, checksum)
        if key not in _MODELS:
            model = StainModel.load(path, device="auto")
            if model.checksum != checksum:
                raise InputError(f"the model file {path} on this worker differs from the client's "
                                 f"(checksum {model.checksum[:12]} against {checksum[:12]}); give every worker the same file.")
            _MODELS.clear()  # one model per worker: a new job's model replaces the last
            _MODELS[key] = model
        return _MODELS[key]


def _worker_source(reference, chunk: int):
    from digital_stain.io.images import open_source

    if not isinstance(reference, str):
        return open_source(reference, chunk=chunk)
    with _LOCK:
        key = (reference, chunk)
        if key not in _SOURCES:
            _SOURCES.clear()
            _SOURCES[key] = open_source(reference, chunk=chunk)
        return _SOURCES[key]


def _level0_unit(process: Callable, model_ref: tuple, source_ref, store_path: str, job,
                 key: tuple[int, int]) -> tuple[int, int]:
    """Task: stain, write and mark level-0 unit ``key`` (runs on a worker).

    ``process`` is :func:`digital_stain.slide.run.process_chunk`, passed in by the client (pickled by
    name): importing it here would make slide and cluster import each other.
    """
    from digital_stain.slide.store import SlideStore

    model = _worker_model(*model_ref)
    array = _worker_source(source_ref, job.grid.chunk).array
    process(model, array, SlideStore(store_path), job, key)
    return key


def _pyramid_unit(store_path: str, level: int, key: tuple[int, int]) -> tuple[int, int]:
    """Task: make unit ``key`` of pyramid ``level`` from the level above (runs on a worker)."""
    from digital_stain.slide.store import SlideStore

    SlideStore(store_path).build_level_unit(level, key)
    return key


class ClusterUnits:
    """Back-end of :func:`digital_stain.slide.units.run_units`: each unit a task on a dask.distributed cluster.

    Level by level, each level's missing units submitted at once (the scheduler spreads them over
    the workers and re-runs a dead worker's tasks); a level starts once the one above is written.

    Parameters
    ----------
    client : distributed.Client
    model : StainModel
        Loaded from a file every worker can read (workers load it by path and checksum).
    source_ref : str or array
        :func:`source_reference`.
    store : SlideStore
    job : SlideJob
    process : callable
        :func:`digital_stain.slide.run.process_chunk`, what a worker calls for a level-0 unit.
    """

    interleave = False
    slots = (math.inf, math.inf)

    def __init__(self, client, model, source_ref, store, job, process: Callable):
        if model.path is None:
            raise InputError("a model staining on a cluster must come from a file the workers can read; save it "
                             "first (StainModel.save) or use a shipped model.")
        self.client, self.job, self.process = client, job, process
        self.model_ref = (os.fspath(model.path), model.checksum)
        self.source_ref = source_ref
        self.store_path = os.fspath(os.path.abspath(store.path))
        self._finished = None

    def __enter__(self) -> ClusterUnits:
        from distributed import as_completed

        # one iterator for the whole run: finished tasks are taken from it as they come, however many are out
        self._finished = as_completed(loop=self.client.loop)
        return self

    def __exit__(self, *exc) -> None:
        self._finished.clear()
        self._finished = None

    def submit(self, level: int, key: tuple[int, int]):
        """Submit unit ``key`` of ``level`` as a task; returns its future."""
        name = f"digital-stain-{self.job.token[:12]}-L{level}-{key[0]}-{key[1]}"
        if level == 0:
            future = self.client.submit(_level0_unit, self.process, self.model_ref, self.source_ref, self.store_path,
                                        self.job, key, key=name, pure=False)
        else:
            future = self.client.submit(_pyramid_unit, self.store_path, level, key, key=name, pure=False)
        self._finished.add(future)
        return future

    def collect(self, handles) -> list:
        """Finished tasks (waits for one at least); ``handles`` are all in the iterator already."""
        return self._finished.next_batch(block=True)

    def cancel(self, handles) -> list:
        """Cancel the tasks of ``handles`` not finished: a stopped or failed run leaves nothing running."""
        pending = [future for future in handles if not future.done()]
        if pending:
            self.client.cancel(pending)
        return pending
