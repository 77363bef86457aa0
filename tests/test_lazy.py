"""Lazy staining: dask outputs equal the eager ones, and only what is read is computed."""

import copy
import threading
import time

import dask.array as da
import numpy as np
import pytest
import torch

from digital_stain.core.arrays import InputError
from digital_stain.stain.lazy import LazyStain, chunk_sizes, stain_lazy

FP32 = dict(precision="fp32", device="cpu")


@pytest.fixture
def mosaic(darkfield_tile):
    """A 700 x 650 dark-field image made of real tiles (not a multiple of any chunk)."""
    return np.tile(darkfield_tile, (3, 3, 1))[:700, :650]


def test_chunk_sizes_merge_a_remainder_smaller_than_the_overlap():
    assert chunk_sizes(1000, 256, 64) == (256, 256, 256, 232)
    assert chunk_sizes(1030, 256, 64) == (256, 256, 256, 262)
    assert chunk_sizes(200, 256, 64) == (200,)


def test_lazy_outputs_equal_eager_staining(tiny_model, mosaic):
    eager = tiny_model.stain(mosaic, **FP32)
    lazy = LazyStain(tiny_model, da.from_array(mosaic, chunks=(300, 300, 3)), chunk=256, overlap=64, **FP32)
    assert lazy.network_runs == {"teacher": 0, "student": 0}  # building computes no chunk
    for name, array in lazy.arrays.items():
        assert isinstance(array, da.Array) and array.dtype == np.float32
        assert array.shape == eager[name].shape
        out = array.compute()
        np.testing.assert_allclose(out, eager[name], atol=1 / 255, err_msg=name)
    np.testing.assert_array_equal(lazy.arrays["enhanced"].compute(), eager["enhanced"])
    assert lazy.network_runs == {"teacher": 9, "student": 9}  # 3 x 3 chunks of 256


def test_reading_again_hits_the_cache(tiny_model, mosaic):
    lazy = LazyStain(tiny_model, mosaic, ["student"], chunk=256, overlap=64, **FP32)
    first = lazy.arrays["student"][:100, :100].compute()
    assert lazy.network_runs["student"] == 1
    again = lazy.arrays["student"][:100, :100].compute()
    assert lazy.network_runs["student"] == 1 and np.array_equal(first, again)
    lazy.arrays["student"][300:310, 300:310].compute()
    assert lazy.network_runs["student"] == 2


def test_large_dask_image_returns_at_once_and_computes_only_what_is_read(tiny_model, darkfield_tile):
    big = da.tile(da.from_array(darkfield_tile, chunks=(256, 256, 3)), (32, 32, 1))  # 8192 x 8192, never in memory
    assert big.shape == (8192, 8192, 3)
    lazy = LazyStain(tiny_model, big, chunk=1024, overlap=128, **FP32)
    view = {name: array[4200:4400, 5200:5500] for name, array in lazy.arrays.items()}
    assert lazy.network_runs == {"teacher": 0, "student": 0}
    for name, region in view.items():
        assert region.compute().shape[:2] == (200, 300)
    assert lazy.network_runs == {"teacher": 1, "student": 1}  # the view lies inside one 1024 chunk


def test_stacks_are_stained_plane_by_plane_with_their_own_statistics(tiny_model, darkfield_tile):
    planes = np.stack([darkfield_tile[:200, :220], np.flip(darkfield_tile, 0)[:200, :220] // 2])
    eager = tiny_model.stain(planes, ["student"], **FP32)["student"]
    lazy = stain_lazy(tiny_model, planes, ["student"], chunk=128, overlap=32, **FP32)["student"]
    assert lazy.shape == (2, 200, 220, 3) and lazy.chunksize[0] == 1
    np.testing.assert_allclose(lazy.compute(), eager, atol=1 / 255)


def test_gray_uint16_input(tiny_model, darkfield_tile):
    gray = (darkfield_tile.astype(np.float32) @ [0.299, 0.587, 0.114] * 257).astype(np.uint16)
    eager = tiny_model.stain(gray, **FP32)
    lazy = stain_lazy(tiny_model, da.from_array(gray, chunks=128), chunk=128, overlap=32, **FP32)
    for name in eager:
        np.testing.assert_allclose(lazy[name].compute(), eager[name], atol=1 / 255, err_msg=name)


def test_bad_inputs_are_refused_before_any_work(tiny_model):
    with pytest.raises(InputError, match="boolean mask"):
        LazyStain(tiny_model, da.zeros((64, 64), dtype=bool))
    with pytest.raises(InputError, match="5 channels"):
        LazyStain(tiny_model, da.zeros((64, 64, 5), dtype=np.uint8))
    with pytest.raises(InputError, match="at least 8 x 8"):
        LazyStain(tiny_model, np.zeros((4, 64), np.uint8))


def test_building_runs_no_network(tiny_model, mosaic):
    calls = []
    # on the network the stain runs: the model's read-only copy on the CPU
    hook = tiny_model.networks("cpu").student.register_forward_pre_hook(lambda net, args: calls.append(args[0].shape))
    try:
        lazy = LazyStain(tiny_model, mosaic, chunk=256, overlap=64, **FP32)
        assert calls == [] and lazy._plane_stats == {}
        lazy.arrays["student"][:10, :10].compute()
        assert [shape[-2:] for shape in calls] == [(700, 652), (320, 320)]  # statistics on the plane, then the chunk
    finally:
        hook.remove()


# -- background mode ---------------------------------------------------------------


def _until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def _chunk_reader(lazy, side=256):
    return lambda y, x: lazy.arrays["student"][side * y : side * y + 8, side * x : side * x + 8].compute()


def test_background_reads_return_placeholders_then_the_stained_chunks(tiny_model, mosaic):
    threads = []
    lazy = LazyStain(tiny_model, mosaic, chunk=256, overlap=64, background=True,
                     on_ready=lambda: threads.append(threading.current_thread().name), **FP32)
    view = np.s_[200:400, 150:350]  # 2 x 2 chunks, one of them with margins on all four sides
    with lazy._net_lock:  # holds the worker back, so nothing below races it
        start = time.perf_counter()
        placeholders = {name: lazy.arrays[name][view].compute() for name in ("teacher", "student")}
        assert time.perf_counter() - start < 2.0
        assert lazy.network_runs == {"teacher": 0, "student": 0} and lazy.pending == 8
        assert lazy._plane_stats == {}  # not even the statistics were recorded in this thread
    gray = lazy.arrays["enhanced"][view].compute()
    for name, placeholder in placeholders.items():
        assert placeholder.shape == (200, 200, 3) and placeholder.dtype == np.float32
        np.testing.assert_array_equal(placeholder, np.repeat(gray[..., None], 3, axis=-1), err_msg=name)
    assert lazy.wait(timeout=60)
    assert lazy.pending == 0 and lazy.errors == [] and list(lazy._plane_stats) == [()]
    assert threads == ["LazyStain worker"] * 8 and lazy.network_runs == {"teacher": 4, "student": 4}
    eager = LazyStain(tiny_model, mosaic, chunk=256, overlap=64, **FP32)
    for name in ("teacher", "student"):
        stained = lazy.arrays[name][view].compute()
        np.testing.assert_allclose(stained, eager.arrays[name][view].compute(), atol=1 / 255, err_msg=name)
        assert np.abs(stained - placeholders[name]).max() > 0.05
    assert lazy.network_runs == {"teacher": 4, "student": 4} and lazy.pending == 0  # cache hits, nothing queued
    lazy.close()


def test_background_queue_serves_newest_first_once_each_and_drops_the_oldest(tiny_model, mosaic):
    with LazyStain(tiny_model, mosaic, ["student"], chunk=256, overlap=64, background=True, max_pending=2,
                   **FP32) as lazy:
        read = _chunk_reader(lazy)
        with lazy._net_lock:
            read(0, 0)
            _until(lambda: lazy._running is not None)  # the worker took it and waits for the network
            for y, x in [(0, 1), (1, 0), (1, 1), (1, 0), (0, 0)]:
                read(y, x)
            # (0, 1) dropped (beyond max_pending), (1, 0) asked again is newest, (0, 0) runs already
            assert lazy.pending == 3
        assert lazy.wait(timeout=60)
        assert [key[:2] for key in lazy._cache["student"]] == [(0, 0), (1, 0), (1, 1)]  # in the order computed


def test_close_stops_the_worker_and_later_reads_compute_in_place(tiny_model, mosaic):
    ready = []
    lazy = LazyStain(tiny_model, mosaic, ["student"], chunk=256, overlap=64, background=True,
                     on_ready=lambda: ready.append(1), **FP32)
    read = _chunk_reader(lazy)
    with lazy._net_lock:
        read(0, 0)
        _until(lambda: lazy._running is not None)
        read(0, 1), read(1, 1)
        closer = threading.Thread(target=lazy.close)
        closer.start()
        _until(lambda: lazy.pending == 1)  # the waiting chunks are dropped; the running one is finished
    closer.join(timeout=60)
    assert not closer.is_alive() and lazy._worker is None and lazy.pending == 0
    assert lazy.network_runs["student"] == 1 and ready == []  # no on_ready once closed
    after = read(1, 1)  # computed in this thread now, not a placeholder
    assert lazy.network_runs["student"] == 2 and lazy.pending == 0
    np.testing.assert_array_equal(after, lazy._cache["student"][(1, 1, 0)][:8, :8])


class Faulty(torch.nn.Module):
    """A network that raises ``error`` whenever ``when(x)`` is true (fault injection); otherwise ``net``."""

    def __init__(self, net, error: Exception, when):
        super().__init__()
        self.net, self.error, self.when = net, error, when
        self.size_multiple, self.min_size, self.config = net.size_multiple, net.min_size, net.config

    def forward(self, x, *args, **kwargs):
        if self.when(x):
            raise self.error
        return self.net(x, *args, **kwargs)


def _inject(lazy, role: str, error: Exception, when, device: torch.device | None = None) -> None:
    """Make ``lazy``'s ``role`` network raise ``error`` when ``when(x)``, on ``device`` (as if on a GPU) if given.

    The kernel and its networks are shallow copies: the model's own cached networks stay as they are.
    """
    kernel, nets = copy.copy(lazy.kernel), copy.copy(lazy.kernel.nets)
    setattr(nets, role, Faulty(nets.network(role), error, when))
    if device is not None:
        kernel.device = nets.device = device
    kernel.nets = nets
    lazy.kernel = kernel


def test_a_failed_background_chunk_is_recorded_not_retried_and_the_worker_goes_on(tiny_model, mosaic):
    seen, failures = [], [1]
    lazy = LazyStain(tiny_model, mosaic, ["student"], chunk=256, overlap=64, background=True,
                     on_error=seen.append, **FP32)
    _inject(lazy, "student", ValueError("boom"), lambda x: failures and failures.pop())  # fails once
    read = _chunk_reader(lazy)
    with lazy._net_lock:
        read(0, 0)
        _until(lambda: lazy._running is not None)
        read(1, 1)
    assert lazy.wait(timeout=60)
    assert lazy.errors == ["student chunk (0, 0): ValueError: boom"] and isinstance(seen[0], ValueError)
    assert list(lazy._cache["student"]) == [(1, 1, 0)] and lazy.fallbacks == []
    read(0, 0)  # asked again: not retried on every redraw, the placeholder stays
    assert lazy.pending == 0 and lazy.wait(timeout=60)
    assert lazy.network_runs["student"] == 1 and len(lazy.errors) == 1
    lazy.close()


# -- out of GPU memory -------------------------------------------------------------


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory (test)"),
                                   RuntimeError("MPS backend out of memory (test)")], ids=["cuda", "mps"])
def test_out_of_memory_moves_the_rest_of_the_image_to_the_cpu(tiny_model, mosaic, error):
    messages = []
    lazy = LazyStain(tiny_model, mosaic, chunk=256, overlap=64, on_fallback=messages.append, **FP32)
    # as if on a full GPU: inputs go to a device that is not the CPU, and the student runs out of memory there
    _inject(lazy, "student", error, lambda x: x.device.type != "cpu", torch.device("meta"))
    student = lazy.arrays["student"][:300, :300].compute()
    cpu = torch.device("cpu")
    assert lazy.device == cpu and lazy.precision == "fp32"
    assert messages == lazy.fallbacks == [
        "GPU ran out of memory staining a 256-px chunk; the rest of this image is stained on the CPU"]
    assert lazy.kernel.nets.teacher is not tiny_model.teacher  # a copy: the caller's model is left alone
    for mine, theirs in zip(lazy.kernel.nets.teacher.parameters(), tiny_model.teacher.parameters()):
        assert mine.device == cpu and mine.data_ptr() != theirs.data_ptr() and torch.equal(mine, theirs)
    teacher = lazy.arrays["teacher"][:300, :300].compute()
    eager = LazyStain(tiny_model, mosaic, chunk=256, overlap=64, device="cpu", precision=lazy.precision)
    np.testing.assert_allclose(student, eager.arrays["student"][:300, :300].compute(), atol=1 / 255)
    np.testing.assert_allclose(teacher, eager.arrays["teacher"][:300, :300].compute(), atol=1 / 255)
    assert len(lazy.fallbacks) == 1 and lazy.network_runs == {"teacher": 4, "student": 4}


def test_other_errors_are_not_taken_for_out_of_memory(tiny_model, mosaic):
    lazy = LazyStain(tiny_model, mosaic, ["student"], chunk=256, overlap=64, **FP32)
    _inject(lazy, "student", RuntimeError("expected 4 channels (test)"), lambda x: True, torch.device("meta"))
    with pytest.raises(RuntimeError, match="expected 4 channels"):
        lazy.arrays["student"][:10, :10].compute()
    assert lazy.fallbacks == [] and lazy.device.type == "meta"
