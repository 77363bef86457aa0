"""The scheduler of a whole slide's work units (:func:`digital_stain.slide.run.stain_to_zarr`), for every back-end.

A slide's units are its level-0 chunks (stained) and the chunks of its pyramid levels (each made
from a few chunks of the level above, :meth:`~digital_stain.slide.store.Grid.parents`). :func:`run_units`
does the bookkeeping the same way wherever the units run: it skips and counts the units a store
already has, starts a pyramid unit only once every unit it is made from is written, stops cleanly
when asked, ends the run on a unit's error, and marks the store complete once every unit is written.

What runs a unit is a small back-end object (:class:`ThreadUnits` here, for threads of this
process; :class:`digital_stain.slide.cluster.ClusterUnits` for a dask.distributed cluster). It is a
context manager around the run and has:

``slots`` : (level-0 units, pyramid units) in flight at most (``math.inf``: no limit).
``interleave`` : bool
    True: a pyramid unit starts as soon as its sources are written, while level 0 is still being
    stained. False: level by level, each level once every unit of the levels above is written.
``submit(level, key)`` : start a unit; returns a handle with ``result()`` (raises the unit's error).
``collect(handles)`` : block until at least one of ``handles`` is finished; return finished handles.
``cancel(handles)`` : drop the handles of units not started or not needed any more; return those dropped.

This module imports neither :mod:`digital_stain.slide.run` nor :mod:`digital_stain.slide.cluster`: both
use it, so it must stay below them (no import cycle).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

__all__ = ["ThreadUnits", "run_units"]


class ThreadUnits:
    """Back-end of :func:`run_units`: units in a thread pool of this process.

    Level-0 units run ``threads`` at once. With one thread the pyramid follows level 0, level by
    level. With more (the GPU default), a pyramid unit starts as soon as the units it is made from
    are written, in up to ``threads // 2`` more threads: the pyramid, host work only, is then built
    while the network stains level 0 instead of after it.

    Parameters
    ----------
    level0 : callable(key)
        Stains, writes and marks level-0 unit ``key``.
    pyramid : callable(level, key)
        Makes, writes and marks unit ``key`` of pyramid ``level`` (>= 1).
    threads : int
        Level-0 units in flight at most.
    """

    def __init__(self, level0: Callable, pyramid: Callable, threads: int = 1):
        self.level0, self.pyramid = level0, pyramid
        threads = max(1, threads)
        self.interleave = threads > 1
        self.slots = (threads, max(1, threads // 2) if self.interleave else threads)
        # interleaved, both kinds run at once; level by level, never more than one level's slots
        self._workers = sum(self.slots) if self.interleave else threads
        self._pool = None

    def __enter__(self) -> ThreadUnits:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="digital-stain-unit")
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True)  # a running unit cannot be interrupted: its thread ends with it
        self._pool = None

    def submit(self, level: int, key: tuple[int, int]):
        """Start unit ``key`` of ``level`` in a thread; returns its future."""
        if level == 0:
            return self._pool.submit(self.level0, key)
        return self._pool.submit(self.pyramid, level, key)

    def collect(self, handles) -> list:
        """The finished ones of ``handles`` (waits for one at least)."""
        from concurrent.futures import FIRST_COMPLETED, wait

        finished, _ = wait(handles, return_when=FIRST_COMPLETED)
        return list(finished)

    def cancel(self, handles) -> list:
        """Those of ``handles`` not started yet, cancelled (a running thread is left to finish)."""
        return [handle for handle in handles if handle.cancel()]


def run_units(backend, store, grid, result, progress: Callable[[int, int], None] | None = None,
              stop: threading.Event | None = None) -> None:
    """Every unit of every level of ``grid`` the store does not have yet, run by ``backend``.

    Parameters
    ----------
    backend : ThreadUnits or ClusterUnits
        Runs the units (see the module's docstring).
    store : SlideStore
        Says which units are done; marked complete at the end.
    grid : Grid
        The slide's units and pyramid levels.
    result : SlideResult
        Filled in: ``units_skipped`` (found done), ``units_done`` (written by this call),
        ``stopped`` (``stop`` was set before every unit was written; the store is resumable),
        ``complete`` (every unit is written).
    progress : callable(done, total), optional
        Called once with the units found done (if any), then after every unit written.
    stop : threading.Event, optional
        Once set, no unit starts; those in flight are finished (threads) or dropped (a cluster).

    Raises
    ------
    Exception
        The first error of a unit, once the units in flight are finished or dropped.
    """
    levels = range(len(grid.levels))
    done = [store.done(level) for level in levels]
    left = [int(flags.size - flags.sum()) for flags in done]  # units of each level not written yet
    result.units_skipped += sum(flags.size for flags in done) - sum(left)
    count = result.units_skipped
    if progress is not None and count:
        progress(count, result.units_total)

    # how many of its source units each pyramid unit still waits for
    waiting: dict[tuple, int] = {}
    for level in levels[1:]:
        for key in grid.units(level - 1):
            if not done[level - 1][key]:
                for parent in grid.parents(level - 1, key):
                    waiting[(level, parent)] = waiting.get((level, parent), 0) + 1
    # units whose sources are written, per level (level 0 has none to wait for)
    ready = [deque(key for key in grid.units(level) if not done[level][key] and not waiting.get((level, key)))
             for level in levels]
    running: dict = {}  # handle -> (level, key)
    error, halted = None, False
    with backend:
        try:
            while True:
                halted = halted or error is not None or (stop is not None and stop.is_set())
                if halted:  # nothing more starts; what can be dropped is
                    for handle in backend.cancel(list(running)):
                        running.pop(handle)
                else:
                    _submit(backend, running, ready, left)
                if not running:
                    break
                for handle in backend.collect(list(running)):
                    if handle not in running:  # dropped meanwhile
                        continue
                    level, key = running.pop(handle)
                    try:
                        handle.result()
                    except Exception as err:  # noqa: BLE001 - kept, raised once the units in flight are settled
                        error = error or err
                        continue
                    result.units_done += 1
                    count += 1
                    done[level][key] = True
                    left[level] -= 1
                    if progress is not None:
                        progress(count, result.units_total)
                    for parent in grid.parents(level, key) if level + 1 < len(grid.levels) else ():
                        waiting[(level + 1, parent)] -= 1
                        if not waiting[(level + 1, parent)] and not done[level + 1][parent]:
                            ready[level + 1].append(parent)
        finally:
            if running:  # an interruption (Ctrl-C) or a failure here: nothing of this run goes on
                backend.cancel(list(running))
    if error is not None:
        raise error
    if any(left):
        if stop is None or not stop.is_set():
            raise RuntimeError("internal error: whole-slide units were left undone without a stop; please report it.")
        result.stopped = True
        return
    if not store.state.get("complete"):
        from digital_stain.stain.model import provenance

        store.finish(finished=provenance()["date"])
    result.complete = True


def _submit(backend, running: dict, ready: list, left: list) -> None:
    """Start the units that ``backend``'s slots and order allow now (see the module's docstring)."""
    in_flight = [level for level, _ in running.values()]
    level0_slots, pyramid_slots = backend.slots
    if backend.interleave:  # every pyramid unit whose sources are written, the levels above first
        pyramid = range(1, len(ready))
    else:  # level by level: only the first level not written yet, once level 0 is
        first = next((level for level, count in enumerate(left) if count), 0)
        pyramid = range(first, first + 1) if first else ()
    _start(backend, running, ready, pyramid, pyramid_slots - (len(in_flight) - in_flight.count(0)))
    _start(backend, running, ready, (0,), level0_slots - in_flight.count(0))


def _start(backend, running: dict, ready: list, levels, free) -> None:
    """Up to ``free`` ready units of ``levels`` (``free`` may be ``math.inf``)."""
    for level in levels:
        while free > 0 and ready[level]:
            key = ready[level].popleft()
            running[backend.submit(level, key)] = (level, key)
            free -= 1
