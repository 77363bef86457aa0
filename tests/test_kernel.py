"""The staining kernel and its settings: one way to stain, and a model that staining never changes."""

from __future__ import annotations

import threading

import dask.array as da
import numpy as np
import pytest
import torch

from digital_stain.core.arrays import InputError
from digital_stain.stain.kernel import StainKernel
from digital_stain.stain.lazy import LazyStain
from digital_stain.stain.settings import StainSettings

from conftest import make_tiny_model

FP32 = dict(precision="fp32", device="cpu")


def _state(model) -> dict:
    """Everything a stain could change in a model: its weights, buffers, devices and modes."""
    state = {}
    for role in ("teacher", "student"):
        net = getattr(model, role)
        state.update({f"{role}.{k}": v.detach().clone() for k, v in net.state_dict().items()})
        state[f"{role}.training"] = net.training
        state[f"{role}.device"] = str(next(net.parameters()).device)
        state[f"{role}.attrs"] = sorted((name, repr(value)) for module in net.modules()
                                        for name, value in vars(module).items() if not name.startswith("_"))
    return state


def _assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key
        else:
            assert value == after[key], key


# -- settings ---------------------------------------------------------------------------------------


def test_settings_have_one_set_of_defaults_and_are_checked_once():
    settings = StainSettings()
    assert (settings.tile, settings.overlap, settings.chunk, settings.stats_pixels, settings.stats_crop) == \
        (1024, 128, 1024, 2048 * 2048, 512)
    assert settings.precision == "auto" and settings.adapt == "auto" and settings.device is None
    assert StainSettings(precision="FP32").precision == "fp32"
    with pytest.raises(AttributeError):
        settings.tile = 256  # frozen
    for bad, match in ((dict(tile=8), "tile 8"), (dict(overlap=2000), "overlap 2000"),
                       (dict(precision="fp8"), "unknown precision"), (dict(batch=0), "batch"),
                       (dict(device="tpu"), "unknown device"), (dict(adapt="maybe"), "maybe"),
                       (dict(chunk=16), "chunk 16"), (dict(stats_crop=16), "statistics crop")):
        with pytest.raises(InputError, match=match):
            StainSettings(**bad)


def test_the_overlap_is_checked_against_the_tile_only_where_tiles_are_used(tiny_model, darkfield_tile):
    settings = StainSettings(chunk=2048, overlap=600)  # lazy and slide: rounded to the stride grid
    lazy = LazyStain(tiny_model, darkfield_tile, ["enhanced"], settings=settings)
    assert (lazy.chunk, lazy.overlap) == (2048, 608)
    assert StainSettings(batch=np.int64(2)).batch == 2
    with pytest.raises(InputError, match="overlap 600 px is out of range for tile 1024"):
        tiny_model.stain(darkfield_tile, settings=settings)  # eager: at most half the tile


def test_settings_of_changes_only_what_is_given():
    base = StainSettings(tile=256, overlap=64)
    changed = StainSettings.of(base, tile=None, overlap=32, precision=None)
    assert changed == StainSettings(tile=256, overlap=32) and StainSettings.of(base) is base
    assert StainSettings.of(None, batch=4) == StainSettings(batch=4)


def test_eager_and_lazy_stains_take_the_same_settings_object(tiny_model, darkfield_tile):
    settings = StainSettings(chunk=128, overlap=32, **FP32)
    image = darkfield_tile[:200, :220]
    eager = tiny_model.stain(image, ["student"], settings=settings)["student"]
    lazy = LazyStain(tiny_model, image, ["student"], settings=settings)
    assert lazy.settings is settings and lazy.precision == "fp32"
    np.testing.assert_allclose(lazy.arrays["student"].compute(), eager, atol=1 / 255)


# -- the model is never changed -----------------------------------------------------------------------


def test_networks_are_read_only_copies_made_once_per_device_and_again_after_the_weights_change(tiny_model):
    nets = tiny_model.networks("cpu")
    assert tiny_model.networks("cpu") is nets and nets.student is not tiny_model.student
    assert not any(p.requires_grad for p in nets.student.parameters()) and not nets.student.training
    with torch.no_grad():
        next(tiny_model.student.parameters()).add_(1.0)  # changed in place (e.g. weights loaded into it)
    again = tiny_model.networks("cpu")
    assert again is not nets
    assert torch.equal(next(again.student.parameters()), next(tiny_model.student.parameters()))


def test_staining_from_threads_changes_neither_model(darkfield_dir, hne_dir, darkfield_tile):
    """Two models, each stained from two threads at once (eager and lazy, two devices when there are two)."""
    devices = ["cpu", "cuda" if torch.cuda.is_available() else "cpu"]
    models = [make_tiny_model(darkfield_dir, hne_dir) for _ in devices]
    with torch.no_grad():  # two different models
        next(models[1].student.parameters()).mul_(-1.0)
    images = [darkfield_tile[:160, :200], np.flip(darkfield_tile, 1)[:180, :150]]
    before = [_state(model) for model in models]
    def stain(m: int, i: int, how: str) -> dict:
        if how == "lazy":
            lazy = LazyStain(models[m], da.from_array(images[i], chunks=(96, 96, 3)), chunk=64, overlap=16,
                             precision="fp32", device=devices[m])
            return {k: v.compute() for k, v in lazy.arrays.items()}
        # tiled, with statistics from crops: the longest use of the networks
        return models[m].stain(images[i], precision="fp32", device=devices[m], tile=64, overlap=16,
                               stats_pixels=64 * 64)

    alone = {(m, i, how): stain(m, i, how) for m in range(2) for i in range(2) for how in ("eager", "lazy")}
    together, errors = {}, []
    start = threading.Barrier(8)

    def work(m: int, i: int, how: str) -> None:
        try:
            start.wait()
            for _ in range(2):
                together[(m, i, how)] = stain(m, i, how)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(m, i, how)) for m in range(2) for i in range(2)
               for how in ("eager", "lazy")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert errors == []
    for m in range(2):
        _assert_same_state(before[m], _state(models[m]))
        assert models[m]._device == torch.device("cpu")  # staining on another device did not move it
    for key, expected in alone.items():
        for output, value in expected.items():  # each stain as it is alone: no statistics or state shared
            np.testing.assert_allclose(together[key][output], value, atol=1e-5, err_msg=f"{key} {output}")
    assert np.abs(alone[(0, 0, "eager")]["student"] - alone[(1, 0, "eager")]["student"]).max() > 0.05


def test_a_kernel_on_the_cpu_after_running_out_of_memory_keeps_preparation_and_settings(tiny_model, darkfield_tile):
    prep = tiny_model.preparation(darkfield_tile)
    kernel = StainKernel(tiny_model, prep, StainSettings(compile=True, precision="auto"))
    cpu = kernel.on_cpu()
    assert cpu.prep is prep and cpu.device.type == "cpu" and cpu.precision == "fp32" and not cpu.settings.compile
    assert cpu.settings.replace(compile=True) == kernel.settings


# -- the statistics pass of a large plane is part of its tiles -----------------------------------------


def test_a_large_plane_takes_its_statistics_from_its_own_tiles_and_reuses_their_stains(tiny_model, darkfield_tile):
    """The tiles that make the statistics pass are not run again, and their stains are what a run with
    those statistics gives (so reusing them changes nothing)."""
    from digital_stain.stain.kernel import to_yxc
    from digital_stain.stain.tiling import pad_image, spread_tiles, tile_layout, tiled_apply

    image = np.tile(darkfield_tile, (2, 2, 1))[:500, :460]
    settings = StainSettings(tile=128, overlap=32, stats_pixels=4 * 128 * 128, **FP32)
    kernel = StainKernel(tiny_model, tiny_model.preparation(image), settings)
    student_in = kernel.prep.plane(image, student=True)[1]
    net = tiny_model.student
    th, tw, boxes = tile_layout(500, 460, 128, 32, net.size_multiple, net.min_size)
    chosen = spread_tiles(boxes, settings.stats_pixels // (th * tw))
    assert 1 < len(chosen) < len(boxes)

    calls = []
    runner = kernel.runner

    def counting_runner(role, statistics=None, compiled=False):
        run = runner(role, statistics, compiled)
        return lambda x: calls.append(x.shape[0]) or run(x)

    kernel.runner = counting_runner
    stained = kernel.stain_plane("student", student_in)
    assert sum(calls) == len(boxes) - len(chosen), "every statistics tile was computed once, in that pass only"

    padded, _ = pad_image(student_in, net.size_multiple, net.min_size)
    sample = np.stack([padded[:, y : y + th, x : x + tw] for y, x in chosen])
    statistics = kernel.statistics(sample)
    recomputed = to_yxc(tiled_apply(runner("student", statistics), student_in, out_channels=3, tile=128, overlap=32,
                                    multiple=net.size_multiple, min_size=net.min_size), clip=True)
    assert stained.shape == (500, 460, 3) and stained.std() > 0.01
    np.testing.assert_allclose(stained, recomputed, atol=1e-5)
