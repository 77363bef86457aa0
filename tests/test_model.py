"""StainModel: outputs, input conventions, refusals, files, progress and cancel."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch

from digital_stain.core.arrays import InputError
from digital_stain.stain.model import StainModel, available_models
from digital_stain.stain.tiling import Cancelled

FAST = dict(precision="fp32", device="cpu")


@pytest.fixture
def small(darkfield_tile):
    """A 64 x 64 crop of the dark-field sample (uint8 RGB)."""
    return np.ascontiguousarray(darkfield_tile[96:160, 64:128])


def _check_outputs(outputs, shape):
    assert set(outputs) == {"enhanced", "teacher", "student"}
    assert outputs["enhanced"].shape == shape
    for name in ("teacher", "student"):
        assert outputs[name].shape == (*shape, 3), name
    for name, array in outputs.items():
        assert array.dtype == np.float32, name
        assert np.isfinite(array).all(), name
        assert array.min() >= 0.0 and array.max() <= 1.0, name


def test_stain_outputs_shapes_types_ranges(tiny_model, small):
    assert tiny_model.outputs == ("enhanced", "teacher", "student")
    out = tiny_model.stain(small, **FAST)
    _check_outputs(out, (64, 64))
    assert out["enhanced"].std() > 0.01, "enhanced image should carry the tissue's structure"
    # the enhancer reverses dark-field: bright (scattering) pixels become dark
    gray = small.astype(np.float32).mean(axis=-1)
    assert np.corrcoef(gray.ravel(), out["enhanced"].ravel())[0, 1] < -0.5


def test_stain_selected_outputs_only(tiny_model, small):
    out = tiny_model.stain(small, ["teacher"], **FAST)
    assert list(out) == ["teacher"]
    out = tiny_model.stain(small, [" Student ", "enhanced", "student"], **FAST)  # normalised, deduplicated
    assert sorted(out) == ["enhanced", "student"]


def test_non_multiple_size_comes_back_same_size(tiny_model, darkfield_tile):
    image = np.tile(darkfield_tile, (1, 2, 1))[3:253, 7:308]
    assert image.shape == (250, 301, 3)
    out = tiny_model.stain(image, **FAST)
    _check_outputs(out, (250, 301))
    # padding, never cropping: the top-left part is what a larger image gives there
    bigger = tiny_model.stain(np.tile(darkfield_tile, (1, 2, 1))[3:259, 7:315], ["enhanced"], **FAST)
    np.testing.assert_array_equal(bigger["enhanced"][:250, :301], out["enhanced"])


@pytest.mark.parametrize("shape", [(8, 8), (9, 13), (8, 70), (70, 11)])
def test_smallest_and_odd_sizes(tiny_model, darkfield_tile, shape):
    """Down to the 8 x 8 minimum, every output comes back at the input's size (padding, never cropping)."""
    out = tiny_model.stain(darkfield_tile[: shape[0], : shape[1]], tile=32, overlap=8, **FAST)
    _check_outputs(out, shape)


def test_uint16_and_float_inputs(tiny_model, small):
    reference = tiny_model.stain(small, **FAST)
    as16 = tiny_model.stain(small.astype(np.uint16) * 257, **FAST)  # the same values on the 16-bit scale
    asfloat = tiny_model.stain(small.astype(np.float32) / 255.0, **FAST)  # floats in [0, 1] taken as they are
    for out in (as16, asfloat):
        _check_outputs(out, (64, 64))
        # equal up to the rounding of luma to 8-bit levels that only 8-bit input gets
        for name in ("enhanced", "teacher"):
            assert np.abs(out[name] - reference[name]).mean() < 0.05, name
            assert np.corrcoef(out[name].ravel(), reference[name].ravel())[0, 1] > 0.9, name


def test_float_outside_unit_range_is_stretched(tiny_model, small):
    raw = small.astype(np.float64) * 3.0 - 100.0  # negative and > 1: stretched from its own [min, max]
    unit = ((raw - raw.min()) / (raw.max() - raw.min())).astype(np.float32)
    out = tiny_model.stain(raw, **FAST)
    _check_outputs(out, (64, 64))
    expected = tiny_model.stain(unit, **FAST)
    for name in out:
        np.testing.assert_allclose(out[name], expected[name], atol=1e-5, err_msg=name)


def test_uint16_uses_full_range(tiny_model, small):
    """uint16 is scaled by 65535, never clipped to 8 bits on the way in."""
    low = tiny_model.stain(small.astype(np.uint16), ["enhanced"], **FAST)["enhanced"]  # values 0..255 of 65535
    high = tiny_model.stain(small.astype(np.uint16) * 257, ["enhanced"], **FAST)["enhanced"]
    assert not np.allclose(low, high)


def test_gray_input(tiny_model, small):
    gray = small[..., 1]
    out = tiny_model.stain(gray, **FAST)
    _check_outputs(out, (64, 64))
    # a gray image is the same as RGB with equal channels
    rgb = tiny_model.stain(np.repeat(gray[..., None], 3, axis=-1), **FAST)
    for name in out:
        np.testing.assert_allclose(out[name], rgb[name], atol=1e-6)
    one_channel = tiny_model.stain(gray[..., None], **FAST)
    for name in out:
        np.testing.assert_allclose(out[name], one_channel[name], atol=1e-6)


def test_rgba_alpha_dropped(tiny_model, small):
    rgba = np.concatenate([small, np.full((64, 64, 1), 7, np.uint8)], axis=-1)
    out = tiny_model.stain(rgba, ["enhanced", "teacher"], **FAST)
    ref = tiny_model.stain(small, ["enhanced", "teacher"], **FAST)
    for name in out:
        np.testing.assert_allclose(out[name], ref[name], atol=1e-6)


def test_gray_stack_stained_plane_by_plane(tiny_model, darkfield_tile):
    stack = np.stack([darkfield_tile[:48, :40, c] for c in range(3)])  # (3, Y, X) gray planes
    assert stack.shape == (3, 48, 40)
    out = tiny_model.stain(stack, **FAST)
    assert out["enhanced"].shape == (3, 48, 40)
    assert out["teacher"].shape == out["student"].shape == (3, 48, 40, 3)
    for i in range(3):
        alone = tiny_model.stain(stack[i], **FAST)
        for name in out:
            np.testing.assert_allclose(out[name][i], alone[name], atol=1e-6, err_msg=f"{name} plane {i}")


def test_rgb_stack_stained_plane_by_plane(tiny_model, darkfield_tile):
    stack = np.stack([darkfield_tile[:40, :56], darkfield_tile[100:140, 150:206]])  # (2, Y, X, 3)
    out = tiny_model.stain(stack, **FAST)
    assert out["enhanced"].shape == (2, 40, 56)
    assert out["teacher"].shape == out["student"].shape == (2, 40, 56, 3)
    for i in range(2):
        alone = tiny_model.stain(stack[i], **FAST)
        for name in out:
            np.testing.assert_allclose(out[name][i], alone[name], atol=1e-6, err_msg=f"{name} plane {i}")
    assert not np.allclose(out["student"][0], out["student"][1])


def test_model_without_student_refuses_student(tiny_model, small, tmp_path):
    no_student = StainModel(tiny_model.enhancer, tiny_model.teacher, None, {"name": "teacher-only"})
    path = tmp_path / "teacher-only.safetensors"
    no_student.save(path)
    loaded = StainModel.load(path)
    assert loaded.outputs == ("enhanced", "teacher")
    assert loaded.student is None
    with pytest.raises(InputError) as info:
        loaded.stain(small, ["student"], **FAST)
    message = str(info.value)
    assert "no student" in message
    assert "enhanced, teacher" in message
    out = loaded.stain(small, **FAST)  # default: only what it has
    assert sorted(out) == ["enhanced", "teacher"]


@pytest.mark.parametrize("outputs", [["bogus"], ["teacher", "stained"], []])
def test_unknown_or_no_output_refused(tiny_model, small, outputs):
    with pytest.raises(InputError, match="unknown output|no outputs"):
        tiny_model.stain(small, outputs, **FAST)


@pytest.mark.parametrize(
    "image, words",
    [
        (np.zeros((0, 0), np.uint8), "empty"),
        (np.zeros((0, 0, 3), np.uint8), "empty"),
        (np.zeros((1, 1), np.uint8), "at least"),
        (np.zeros((1, 1, 3), np.uint8), "at least"),
        (np.zeros((64, 4), np.uint8), "at least"),
        (np.zeros((32, 32, 2), np.uint8), "2 channels"),
        (np.zeros((32, 32, 5), np.float32), "5 channels"),
        (np.zeros((32,), np.uint8), "2 dimensions"),
        (np.ones((32, 32), bool), "boolean"),
    ],
    ids=["empty", "empty-rgb", "1px", "1px-rgb", "thin", "2ch", "5ch", "1d", "bool"],
)
def test_bad_shapes_refused(tiny_model, image, words):
    with pytest.raises(InputError, match=words):
        tiny_model.stain(image, **FAST)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_refused(tiny_model, small, bad):
    image = small.astype(np.float32) / 255.0
    image[5, 7, 1] = bad
    with pytest.raises(InputError, match="NaN or infinite"):
        tiny_model.stain(image, **FAST)


def test_save_load_round_trip_identical(tiny_model, small, tmp_path):
    path = tmp_path / "m.safetensors"
    checksum = tiny_model.save(path)
    assert len(checksum) == 64
    loaded = StainModel.load(path)
    assert loaded.checksum == checksum
    assert loaded.outputs == tiny_model.outputs
    assert loaded.metadata["name"] == "tiny-test"
    assert loaded.name == "tiny-test"
    assert loaded.describe() == {"model": "tiny-test", "path": str(path), "checksum": checksum}
    before = tiny_model.stain(small, **FAST)
    after = loaded.stain(small, **FAST)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_save_refuses_to_overwrite(tiny_model, tmp_path):
    path = tmp_path / "m.safetensors"
    tiny_model.save(path)
    size = path.stat().st_size
    with pytest.raises(InputError, match="already exists"):
        tiny_model.save(path)
    assert path.stat().st_size == size
    tiny_model.save(path, overwrite=True)
    assert StainModel.load(path).outputs == tiny_model.outputs


def test_save_half_nearly_identical(tiny_model, small, tmp_path):
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    tiny_model.save(full)
    tiny_model.save(half, half=True)
    assert half.stat().st_size < 0.8 * full.stat().st_size
    before = tiny_model.stain(small, **FAST)
    after = StainModel.load(half).stain(small, **FAST)
    np.testing.assert_array_equal(after["enhanced"], before["enhanced"])  # the enhancer is not halved
    for name in ("teacher", "student"):
        diff = np.abs(after[name] - before[name])
        assert diff.max() < 0.02 and diff.mean() < 0.002, name


def test_stop_event_cancels_promptly(tiny_model, darkfield_tile):
    stop = threading.Event()
    calls = []

    def progress(done, total):
        calls.append(done)
        stop.set()  # ask to stop after the first tile

    with pytest.raises(Cancelled):
        tiny_model.stain(darkfield_tile[:128, :128], ["student"], tile=32, overlap=8, progress=progress, stop=stop,
                         stats_pixels=32 * 32, **FAST)  # statistics from crops: the student is tiled
    assert len(calls) == 1, f"kept going for {len(calls)} tiles after the stop was set"


def test_stop_already_set_cancels_before_any_tile(tiny_model, small):
    stop = threading.Event()
    stop.set()
    calls = []
    with pytest.raises(Cancelled):
        tiny_model.stain(small, ["teacher"], progress=lambda d, t: calls.append(d), stop=stop, **FAST)
    assert calls == []
    assert issubclass(Cancelled, RuntimeError)


def test_progress_reaches_100(tiny_model, darkfield_tile):
    seen = []
    stack = np.stack([darkfield_tile[:64, :64], darkfield_tile[128:192, 128:192]])
    tiny_model.stain(stack, tile=32, overlap=8, progress=lambda d, t: seen.append((d, t)), **FAST)
    assert len(seen) > 4
    assert all(t == 100 for _, t in seen)
    values = [d for d, _ in seen]
    assert values == sorted(values), "progress never goes back"
    assert values[-1] == 100
    assert 0 <= values[0] < 100


def test_load_missing_lists_shipped_models(tmp_path):
    with pytest.raises(InputError) as info:
        StainModel.load("no-such-model-xyz")
    message = str(info.value)
    assert "no-such-model-xyz" in message
    assert "Shipped models" in message
    for name in available_models():
        assert name in message
    if not available_models():
        assert "none" in message


def test_load_refuses_checkpoint(tiny_model, tmp_path):
    from digital_stain.train.checkpoint import save_checkpoint

    path = tmp_path / "run.ckpt.safetensors"
    save_checkpoint(path, {"net": tiny_model.teacher}, {}, {"step": 1})
    with pytest.raises(InputError, match="checkpoint"):
        StainModel.load(path)


@pytest.mark.slow
def test_compiled_staining_equals_eager_and_compiles_once(tiny_model):
    """torch.compile path: same result as eager, and a second image (new statistics) does not recompile."""
    import torch._dynamo

    torch._dynamo.reset()
    rng = np.random.default_rng(0)
    first, second = (rng.integers(0, 255, (96, 96, 3), dtype=np.uint8) for _ in range(2))
    kwargs = dict(tile=64, overlap=16, precision="fp32", device="cpu")
    eager = tiny_model.stain(first, **kwargs)
    compiled = tiny_model.stain(first, compile=True, **kwargs)
    for name in eager:
        np.testing.assert_allclose(compiled[name], eager[name], atol=2e-4)
    from torch._dynamo.utils import counters

    frames = counters["stats"]["unique_graphs"]
    assert frames > 0  # the counter really counts compiled graphs
    again = tiny_model.stain(second, compile=True, **kwargs)
    assert counters["stats"]["unique_graphs"] == frames, "a new image must not recompile"
    np.testing.assert_allclose(again["student"], tiny_model.stain(second, **kwargs)["student"], atol=2e-4)


def test_loaded_model_survives_its_file_being_overwritten_in_place(tiny_model_file, darkfield_tile):
    """Regression: tensors were views into the file's memory map, so `cp new.safetensors old.safetensors`
    under a running process silently changed its enhancer (found when a training run saved garbage counts)."""
    from digital_stain.stain.model import StainModel

    model = StainModel.load(tiny_model_file, device="cpu")
    counts = model.enhancer.darkfield_counts.copy()
    before = model.stain(darkfield_tile, precision="fp32")
    size = tiny_model_file.stat().st_size
    with open(tiny_model_file, "r+b") as fh:  # in place: same inode, as `cp` does
        data_start = 8 + int.from_bytes(fh.read(8), "little")  # safetensors: header length, header, tensor data
        fh.seek(data_start)
        fh.write(b"\x7f" * (size - data_start))
    assert np.array_equal(model.enhancer.darkfield_counts, counts)
    after = model.stain(darkfield_tile, precision="fp32")
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])


@pytest.mark.parametrize("output", ["teacher", "student"])
def test_batched_tiles_stain_the_same(tiny_model, darkfield_tile, output):
    """``stain(batch=4)`` equals one tile at a time (fp32, CPU): tiles are independent."""
    image = darkfield_tile[:200, :232]
    seen = []
    tiled = dict(tile=64, overlap=16, stats_pixels=64 * 64, **FAST)  # statistics from crops: the student is tiled
    one = tiny_model.stain(image, [output], **tiled)[output]
    four = tiny_model.stain(image, [output], batch=4, progress=lambda d, t: seen.append(d), **tiled)[output]
    assert one.std() > 0.01
    np.testing.assert_allclose(four, one, atol=1e-5)
    assert seen[-1] == 100 and seen == sorted(seen)




def test_a_model_whose_student_inputs_are_its_own_histograms_saves(tiny_model, tmp_path):
    """A fine-tuned enhancer may hold the very arrays of its dark-field histograms as the student's inputs;
    saving must not trip over the shared memory (safetensors refuses tensors that share it)."""
    from digital_stain.core.enhance import Enhancer
    from digital_stain.core.histograms import Distribution

    old = tiny_model.enhancer
    channels = np.arange(3 * old.darkfield_counts.size).reshape(3, -1) % 7
    shared = Distribution(old.darkfield_counts, channels)
    enhancer = Enhancer(old.darkfield_counts, old.brightfield_counts, channels, shared)
    model = StainModel(enhancer, tiny_model.teacher, tiny_model.student, tiny_model.metadata)
    model.save(tmp_path / "shared.safetensors")
    loaded = StainModel.load(tmp_path / "shared.safetensors", device="cpu")
    np.testing.assert_array_equal(loaded.enhancer.student_inputs.luma, old.darkfield_counts)


def _count_forwards(net) -> list:
    calls = []
    net.register_forward_hook(lambda module, args, output: calls.append(tuple(args[0].shape)))
    return calls


def test_an_image_that_fits_the_statistics_pass_runs_the_student_once(tiny_model, darkfield_tile):
    """No second, tiled pass: the whole-image pass is the stain (the next test: it equals the tiles)."""
    image = darkfield_tile[:200, :232]
    model = copy.deepcopy(tiny_model)
    calls = _count_forwards(model.networks().student)  # the read-only copy every stain on the CPU runs
    seen = []
    once = model.stain(image, ["student"], tile=64, overlap=32, progress=lambda d, t: seen.append((d, t)),
                       **FAST)["student"]
    assert len(calls) == 1 and calls[0][-2:] == (200, 232), calls  # the whole image, padded to the multiple
    assert seen == [(100, 100)]
    calls.clear()
    model.stain(image, ["student"], tile=64, overlap=32, stats_pixels=100 * 100, **FAST)
    assert len(calls) > 2  # larger than the statistics budget: statistics from crops, then the tiles
    assert once.std() > 0.01


def test_the_one_pass_stain_is_the_former_statistics_then_tiles_stain(tiny_model, darkfield_tile):
    """What the two passes gave: the whole image's statistics frozen, then tiled (here one tile and two)."""
    from digital_stain.core.nets import record_statistics
    from digital_stain.stain.tiling import pad_image, tiled_apply

    image = darkfield_tile[:128, :160]
    once = tiny_model.stain(image, ["student"], **FAST)["student"]
    student_in = tiny_model.preparation(image).plane(image, student=True)[1]
    padded, _ = pad_image(student_in, tiny_model.student.size_multiple, tiny_model.student.min_size)
    for tile, overlap in ((512, 128), (128, 64)):
        statistics = record_statistics(tiny_model.student, torch.from_numpy(padded[None]))
        tiles = tiled_apply(lambda x: (tiny_model.student(x, statistics) + 1) / 2, student_in, out_channels=3,
                            tile=tile, overlap=overlap, multiple=tiny_model.student.size_multiple,
                            min_size=tiny_model.student.min_size)
        np.testing.assert_allclose(once, np.clip(tiles.transpose(1, 2, 0), 0, 1), atol=1e-5 if tile == 512 else 0.05)


def test_stop_set_before_the_one_pass_cancels_it(tiny_model, small):
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        tiny_model.stain(small, ["student"], stop=stop, **FAST)
