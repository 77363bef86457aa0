"""digital_stain.core.prepare: one preparation of the input for every path, and adaptation through it."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from digital_stain.core.adapt import OFF
from digital_stain.core.arrays import to_unit_rgb, value_scaling
from digital_stain.core.prepare import Preparation


def _gain(image, gain):
    return np.clip(np.round(image.astype(np.float64) * gain), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", ["uint8-rgb", "uint16-gray", "float-rgba"])
def test_plane_prepared_in_bands_equals_one_pass(tiny_model, darkfield_tile, monkeypatch, kind):
    """Large planes are prepared in row bands on threads; forced here on a small plane: identical results."""
    from digital_stain.core import prepare as prepare_module
    from digital_stain.stain.model import to_yxc

    plane = {"uint8-rgb": darkfield_tile[:250],
             "uint16-gray": darkfield_tile[:250, :, 1].astype(np.uint16) * 257,
             "float-rgba": np.dstack([darkfield_tile[:250] / 97.0, np.ones((250, 256))]).astype(np.float32)}[kind]
    prep = tiny_model.preparation(plane, adapt="off")
    rgb = to_unit_rgb(plane, value_scaling(plane))
    enhanced = prep.enhanced(rgb)
    monkeypatch.setattr(prepare_module, "HOST_BAND_PIXELS", 64 * 64)
    assert len(prepare_module.row_bands(250, 256)) == 3
    banded, banded_in = prep.plane(plane)
    assert np.array_equal(banded, enhanced) and np.array_equal(banded_in, prep.student_input(rgb, enhanced))
    assert prep.plane(plane, student=False)[1] is None
    out = np.random.default_rng(0).random((3, 250, 256), dtype=np.float32) * 1.4 - 0.2
    assert np.array_equal(to_yxc(out, clip=True), np.clip(out, 0, 1).transpose(1, 2, 0))
    assert to_yxc(out).flags.c_contiguous and np.array_equal(to_yxc(out), out.transpose(1, 2, 0))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_integer_fast_path_equals_binning_every_pixel(tiny_model, dtype):
    """The integer fast path (a table over gray levels) gives the values of on_input_grid + the enhancer's bins."""
    from digital_stain.core.color import luma
    from digital_stain.core.enhance import on_input_grid

    top = np.iinfo(dtype).max
    rng = np.random.default_rng(3)
    raw = np.concatenate([rng.integers(0, top + 1, (300, 3)), np.repeat(np.arange(0, top + 1, max(1, top // 4096)), 3)
                          .reshape(-1, 3), [[0, 0, 0], [top, top, top]]]).astype(dtype)
    rgb = (raw.astype(np.float32) / np.float32(top))[None]
    rgb[0, :2] = [[-0.01, 0.0, 0.0], [1.01, 1.0, 1.0]]  # beyond [0, 1]: both paths clip
    enhancer = tiny_model.enhancer
    prep = Preparation.build(enhancer, value_scaling(raw), dtype)
    expected = enhancer.enhance_gray(np.clip(on_input_grid(luma(rgb), dtype), 0.0, 1.0))
    result = prep.enhanced(rgb)
    assert result.dtype == np.float32 and result.shape == rgb.shape[:2]
    np.testing.assert_array_equal(result, expected)
    assert prep._level_table() is prep._level_table()  # made once
    assert prep._level_table().shape == (top + 1,)


def test_off_is_the_models_own_tables_and_raw_channels(tiny_model, darkfield_tile):
    bright = _gain(darkfield_tile, 8)
    prep = tiny_model.preparation(bright, adapt="off")
    assert prep.adaptation is OFF and prep.maps is None and prep.table is tiny_model.enhancer.table
    rgb = to_unit_rgb(bright)
    enhanced, student_in = prep.plane(bright)
    np.testing.assert_array_equal(enhanced, tiny_model.enhancer(bright))  # the enhancer as it always was
    np.testing.assert_array_equal(student_in[:3], rgb.transpose(2, 0, 1) * 2 - 1)
    np.testing.assert_array_equal(student_in[3], enhanced * 2 - 1)


def test_adapted_preparation_refits_cd_and_maps_channels(tiny_model, darkfield_tile):
    bright = _gain(darkfield_tile, 8)
    prep = tiny_model.preparation(bright, adapt="on")
    assert prep.adaptation.applied and prep.maps is not None
    measured = prep.adaptation.measured
    refitted = tiny_model.enhancer.with_darkfield(measured)
    np.testing.assert_array_equal(prep.plane(bright)[0], refitted(bright))  # c_d refitted on the input
    # the mapped channels of the bright tile follow the model's own (dim) channel distribution
    mapped = prep.student_rgb(to_unit_rgb(bright))
    dim = to_unit_rgb(darkfield_tile)
    assert abs(mapped.mean() - dim.mean()) < 0.2 * dim.mean() and to_unit_rgb(bright).mean() > 4 * dim.mean()


def test_a_region_prepared_alone_equals_that_region_of_the_whole(tiny_model, darkfield_tile):
    bright = _gain(np.tile(darkfield_tile, (2, 2, 1)), 6)
    prep = tiny_model.preparation(bright, adapt="on")
    whole_enhanced, whole_in = prep.plane(bright)
    region = bright[100:300, 50:333]
    rgb = prep.unit_rgb(region, has_channels=True)
    enhanced = prep.enhanced(rgb)
    np.testing.assert_array_equal(enhanced, whole_enhanced[100:300, 50:333])
    np.testing.assert_array_equal(prep.student_input(rgb, enhanced), whole_in[:, 100:300, 50:333])


def test_a_model_fine_tuned_with_adapted_inputs_maps_its_own_dark_field(tiny_model, darkfield_tile):
    """A student that kept its original inputs: the model's dark-field is mapped onto them even when not adapting."""
    from digital_stain.core.enhance import Enhancer
    from digital_stain.stain.model import StainModel

    bright = _gain(darkfield_tile, 8)
    fitted = Enhancer.from_arrays([bright], [darkfield_tile])  # a "lab" whose dark-field is 8x brighter
    enhancer = Enhancer(fitted.darkfield_counts, fitted.brightfield_counts, fitted.darkfield.channels,
                        tiny_model.enhancer.student_inputs)
    tuned = StainModel(enhancer, tiny_model.teacher, tiny_model.student)
    prep = tuned.preparation(bright, adapt="auto")
    assert not prep.adaptation.applied and prep.maps is not None  # its own microscope: no adaptation, but mapped
    assert prep.adaptation.distance == 0.0


def test_lazy_and_eager_decide_the_same_on_numpy_and_dask(tiny_model, darkfield_tile):
    from digital_stain.stain.lazy import LazyStain

    bright = _gain(np.tile(darkfield_tile, (2, 2, 1)), 6)
    eager = tiny_model.preparation(bright)
    lazy = LazyStain(tiny_model, da.from_array(bright, chunks=200), chunk=256, overlap=32)
    assert eager.adaptation.applied and lazy.prep.adaptation.applied
    assert lazy.prep.adaptation.measured.same_as(eager.adaptation.measured)
    np.testing.assert_array_equal(lazy.prep.maps, eager.maps)
    np.testing.assert_array_equal(lazy.prep.table, eager.table)
