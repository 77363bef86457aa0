"""The whole-slide unit scheduler (digital_stain.slide.units): bookkeeping, order, stop, errors, and no import cycle.

A real SlideStore on disk with a 3 x 4 unit level 0 and three pyramid levels; level-0 units write a
constant per unit (what staining writes does not matter here), pyramid units are the store's own.
End-to-end runs through :func:`digital_stain.slide.run.stain_to_zarr` are in test_slide.py and test_cluster.py.
"""

from __future__ import annotations

import ast
import math
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from digital_stain.core.arrays import InputError
from digital_stain.slide.store import Grid, SlideStore, level_shapes
from digital_stain.slide.run import SlideResult
from digital_stain.slide.units import ThreadUnits, run_units

SOURCE = Path(__file__).resolve().parents[1] / "src" / "digital_stain"
GRID = Grid(256, (256,) * 3, (256,) * 4, level_shapes((768, 1024), 128))  # units: 12, 4, 1, 1


@pytest.fixture
def store(tmp_path) -> SlideStore:
    return SlideStore.create(tmp_path / "units.ome.zarr", {"grid": GRID.as_dict(), "complete": False,
                                                           "settings": {"outputs": ["enhanced"]}})


def _result() -> SlideResult:
    return SlideResult(Path("x"), ("enhanced",), [], sum(len(GRID.units(level)) for level in range(len(GRID.levels))))


def _level0(store: SlideStore, before=None):
    """A level-0 unit: ``before(key)`` (may wait or fail), then a constant chunk written and marked done."""

    def unit(key):
        if before is not None:
            before(key)
        y0, y1, x0, x1 = GRID.box(0, key)
        store.write("enhanced", 0, (y0, y1, x0, x1), np.full((y1 - y0, x1 - x0), 10 * key[0] + key[1], np.uint8))
        store.mark_done(0, key)

    return unit


def _sources(level: int, key: tuple[int, int]) -> list[tuple[int, int]]:
    """The units of ``level - 1`` that pyramid unit ``key`` of ``level`` is made from."""
    return [unit for unit in GRID.units(level - 1) if key in GRID.parents(level - 1, unit)]


class _Watched:
    """Pyramid units that record, as they start, whether their sources (and the whole level above) are written,
    and how many units of each kind run at once."""

    def __init__(self, store: SlideStore):
        self.store, self.lock = store, threading.Lock()
        self.starts, self.running, self.most = [], {0: 0, 1: 0}, {0: 0, 1: 0}

    def enter(self, kind: int) -> None:
        with self.lock:
            self.running[kind] += 1
            self.most[kind] = max(self.most[kind], self.running[kind])

    def leave(self, kind: int) -> None:
        with self.lock:
            self.running[kind] -= 1

    def level0(self, before=None):
        write = _level0(self.store, before)

        def unit(key):
            self.enter(0)
            try:
                time.sleep(0.01)  # long enough for units to overlap
                write(key)
            finally:
                self.leave(0)

        return unit

    def pyramid(self, level: int, key: tuple[int, int]) -> None:
        self.enter(1)
        try:
            done = self.store.done(level - 1)
            self.starts.append((level, all(done[s] for s in _sources(level, key)), bool(done.all()),
                                int(self.store.done(0).sum())))
            self.store.build_level_unit(level, key)
        finally:
            self.leave(1)


# -- bookkeeping ---------------------------------------------------------------------------------
def test_every_unit_is_written_in_order_and_the_store_marked_complete(store):
    seen, result = [], _result()
    run_units(ThreadUnits(_level0(store), store.build_level_unit), store, GRID, result,
              progress=lambda done, total: seen.append((done, total)))
    assert result.complete and not result.stopped and result.units_done == result.units_total == 18
    assert seen == [(n, 18) for n in range(1, 19)]
    assert store.state["complete"] and "finished" in store.state
    assert not (store.path / "progress").exists()
    level1 = np.asarray(store.array("enhanced", 1)[:])
    assert level1[0, 0] == 0 and level1[-1, -1] == 23  # unit (2, 3)'s constant, downsampled


def test_units_found_done_are_skipped_counted_and_reported_once(store):
    write = _level0(store)
    for key in GRID.units(0)[:5]:
        write(key)
    seen, result, made = [], _result(), []
    run_units(ThreadUnits(lambda key: (made.append(key), write(key)), store.build_level_unit, threads=2), store,
              GRID, result, progress=lambda done, total: seen.append(done))
    assert result.units_skipped == 5 and result.units_done == 13 and result.complete
    assert seen == list(range(5, 19)) and sorted(made) == GRID.units(0)[5:]


def test_a_complete_store_runs_nothing(store):
    run_units(ThreadUnits(_level0(store), store.build_level_unit), store, GRID, _result())
    state, seen, result = store.state, [], _result()
    run_units(ThreadUnits(lambda key: pytest.fail("ran a done unit"), store.build_level_unit), store, GRID, result,
              progress=lambda done, total: seen.append(done))
    assert result.complete and result.units_done == 0 and result.units_skipped == 18 and seen == [18]
    assert store.state == state  # not finished a second time


# -- stop and errors -------------------------------------------------------------------------------
@pytest.mark.parametrize("threads", [1, 3])
def test_stop_leaves_a_resumable_store_that_resumes_to_complete(store, threads):
    stop, result = threading.Event(), _result()
    run_units(ThreadUnits(_level0(store), store.build_level_unit, threads=threads), store, GRID, result,
              progress=lambda done, total: done >= 3 and stop.set(), stop=stop)
    assert result.stopped and not result.complete
    assert 3 <= result.units_done < 18 and (result.units_done == 3 if threads == 1 else True)
    written = sum(int(store.done(level).sum()) for level in range(len(GRID.levels)))
    assert written == result.units_done  # the units in flight at the stop were finished and counted
    assert store.state["complete"] is False and (store.path / "progress").exists()
    again = _result()
    run_units(ThreadUnits(_level0(store), store.build_level_unit, threads=threads), store, GRID, again)
    assert again.complete and again.units_skipped == result.units_done and again.units_done == 18 - written


def test_a_stop_after_the_last_unit_still_completes(store):
    stop, result = threading.Event(), _result()
    run_units(ThreadUnits(_level0(store), store.build_level_unit), store, GRID, result,
              progress=lambda done, total: done == total and stop.set(), stop=stop)
    assert result.complete and not result.stopped and store.state["complete"]


def test_a_unit_s_error_ends_the_run_once_the_units_in_flight_are_settled(store):
    watched, result = _Watched(store), _result()

    def fail_one(key):
        if key == (1, 1):
            raise RuntimeError("injected failure")

    with pytest.raises(RuntimeError, match="injected"):
        run_units(ThreadUnits(watched.level0(fail_one), watched.pyramid, threads=3), store, GRID, result)
    assert watched.running == {0: 0, 1: 0}  # raised only after every running unit finished
    assert not result.complete and not store.state["complete"]
    written = sum(int(store.done(level).sum()) for level in range(len(GRID.levels)))
    assert written == result.units_done < 18 and not store.done(0)[1, 1]
    again = _result()
    run_units(ThreadUnits(_level0(store), store.build_level_unit, threads=3), store, GRID, again)
    assert again.complete and again.units_skipped == written


# -- order -------------------------------------------------------------------------------------------
def test_threads_interleave_pyramid_units_once_their_sources_are_written(store):
    """threads > 1: a pyramid unit starts as soon as its sources are written, before level 0 is finished; the
    slots hold (threads level-0 units, threads // 2 pyramid units)."""
    watched, pyramid_started = _Watched(store), threading.Event()

    def last_waits(key):  # the last level-0 unit waits for a pyramid unit: without interleaving, a timeout
        if key == GRID.units(0)[-1]:
            assert pyramid_started.wait(30), "no pyramid unit started while level 0 was unfinished"

    def pyramid(level, key):
        pyramid_started.set()
        watched.pyramid(level, key)

    result = _result()
    run_units(ThreadUnits(watched.level0(last_waits), pyramid, threads=4), store, GRID, result)
    assert result.complete and len(watched.starts) == 6
    assert all(sources_written for _, sources_written, _, _ in watched.starts)
    assert min(level0 for _, _, _, level0 in watched.starts) < 12
    assert watched.most[0] <= 4 and watched.most[1] <= 2


class _LevelByLevel(ThreadUnits):
    """The cluster's order (every ready unit at once, a level once the one above is written), in threads."""

    def __init__(self, level0, pyramid):
        super().__init__(level0, pyramid, threads=12)
        self.interleave, self.slots = False, (math.inf, math.inf)


@pytest.mark.parametrize("backend", [lambda l0, pyr: ThreadUnits(l0, pyr, threads=1), _LevelByLevel],
                         ids=["one-thread", "unbounded"])
def test_without_interleaving_levels_run_one_after_the_other(store, backend):
    watched, result = _Watched(store), _result()
    run_units(backend(watched.level0(), watched.pyramid), store, GRID, result)
    assert result.complete and len(watched.starts) == 6
    assert all(level_above_written for _, _, level_above_written, _ in watched.starts)
    assert [level for level, *_ in watched.starts] == [1, 1, 1, 1, 2, 3]


# -- the cluster back-end ------------------------------------------------------------------------------
def test_a_cluster_needs_a_model_from_a_file():
    from digital_stain.slide.cluster import ClusterUnits

    with pytest.raises(InputError, match="from a file"):
        ClusterUnits(None, SimpleNamespace(path=None, checksum=None), None, None, None, None)


def test_a_worker_s_error_ends_a_cluster_run(tiny_model, tiny_model_file, darkfield_tile, tmp_path):
    """A worker whose model file differs from the client's fails its units: the run ends with that error."""
    import torch

    from digital_stain.slide.cluster import cluster_client
    from digital_stain.stain.model import StainModel
    from digital_stain.slide.run import stain_to_zarr

    model = StainModel.load(tiny_model_file, device="cpu")
    with torch.no_grad():
        next(tiny_model.teacher.parameters()).add_(1.0)
    tiny_model.save(tiny_model_file, overwrite=True)  # what the workers load now: another checksum
    slide = np.concatenate([darkfield_tile, darkfield_tile[::-1]], axis=0)
    with cluster_client(workers=1) as client, pytest.raises(InputError, match="differs from the client's"):
        stain_to_zarr(model, slide, tmp_path / "out.ome.zarr", ["enhanced"], chunk=256, overlap=32,
                      device="cpu", precision="fp32", client=client)
    assert SlideStore(tmp_path / "out.ome.zarr").state["complete"] is False


# -- no import cycle -------------------------------------------------------------------------------------
def _imported(module: str) -> set[str]:
    """Modules of this package that ``module`` (e.g. ``"slide.run"``) imports anywhere in its file, functions included."""
    tree = ast.parse((SOURCE / f"{module.replace('.', '/')}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("digital_stain."):
            names.add(node.module.removeprefix("digital_stain."))
        elif isinstance(node, ast.Import):
            names |= {alias.name.removeprefix("digital_stain.") for alias in node.names
                      if alias.name.startswith("digital_stain.")}
        assert not (isinstance(node, ast.ImportFrom) and node.level), f"{module}: a relative import"
    return names


def test_slide_cluster_and_units_do_not_import_each_other_in_a_cycle():
    slide = {"slide.run", "slide.cluster", "slide.units"}
    imports = {module: _imported(module) & slide for module in slide}
    assert imports["slide.units"] == set()  # the scheduler is below both
    assert imports["slide.cluster"] == set()  # process_chunk reaches the workers as an argument
    assert imports["slide.run"] == {"slide.cluster", "slide.units"}


def test_importing_the_scheduler_or_the_cluster_imports_no_slide():
    code = ("import sys, digital_stain.slide.units, digital_stain.slide.cluster; "
            "print(sorted(m for m in ('digital_stain.slide.run', 'digital_stain.stain.lazy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "[]"
