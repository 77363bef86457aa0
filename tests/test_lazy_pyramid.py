"""Pyramids for multiscale display: lower levels are stained from the downsampled input, on their own."""

import dask.array as da
import numpy as np
import pytest

from digital_stain.core.arrays import InputError, value_scaling
from digital_stain.stain.lazy import LazyStain, input_pyramid, lazy_pyramid

OPTIONS = dict(chunk=128, overlap=32, precision="fp32", device="cpu")


@pytest.fixture
def mosaic(darkfield_tile):
    """A 700 x 650 dark-field image made of real tiles."""
    return np.tile(darkfield_tile, (3, 3, 1))[:700, :650]


def test_levels_halve_until_the_longer_side_fits(tiny_model, mosaic):
    arrays, stains = lazy_pyramid(tiny_model, mosaic, min_side=200, **OPTIONS)
    assert [a.shape for a in arrays["student"]] == [(700, 650, 3), (350, 325, 3), (175, 162, 3)]
    assert [a.shape for a in arrays["teacher"]] == [(700, 650, 3), (350, 325, 3), (175, 162, 3)]
    assert [a.shape for a in arrays["enhanced"]] == [(700, 650), (350, 325), (175, 162)]
    assert all(a.dtype == np.float32 for levels in arrays.values() for a in levels)
    assert [s.input_dtype for s in stains] == [np.uint8] * 3
    assert all(s.network_runs == {"teacher": 0, "student": 0} for s in stains)  # building ran nothing
    stack = lazy_pyramid(tiny_model, da.zeros((2, 100, 1000), np.uint16), ["enhanced"], min_side=300)[0]
    assert [a.shape for a in stack["enhanced"]] == [(2, 100, 1000), (2, 50, 500), (2, 25, 250)]
    assert len(lazy_pyramid(tiny_model, mosaic[:256, :256], min_side=512)[1]) == 1  # small: one level
    assert [a.shape for a in input_pyramid(np.zeros((16, 5000), np.uint8), 512)] == [(16, 5000), (8, 2500)]


def test_a_coarse_level_equals_staining_the_coarsened_input_and_stains_no_level0_chunk(tiny_model, mosaic):
    arrays, stains = lazy_pyramid(tiny_model, mosaic, min_side=400, **OPTIONS)
    assert len(stains) == 2
    coarse = np.round(mosaic.reshape(350, 2, 325, 2, 3).mean(axis=(1, 3))).astype(np.uint8)
    direct = LazyStain(tiny_model, coarse, **OPTIONS).arrays
    for name in arrays:
        np.testing.assert_array_equal(arrays[name][1].compute(), direct[name].compute(), err_msg=name)
    assert stains[1].network_runs == {"teacher": 9, "student": 9}  # 350 x 325 in chunks of 128
    assert stains[0].network_runs == {"teacher": 0, "student": 0} and stains[0]._plane_stats == {}


def test_a_given_pyramid_is_used_as_given(tiny_model, mosaic):
    levels = [mosaic, mosaic[::2, ::2]]
    arrays, stains = lazy_pyramid(tiny_model, levels, ["student"], min_side=10, **OPTIONS)
    assert [a.shape for a in arrays["student"]] == [(700, 650, 3), (350, 325, 3)] and len(stains) == 2
    direct = LazyStain(tiny_model, levels[1], ["student"], **OPTIONS).arrays["student"]
    np.testing.assert_array_equal(arrays["student"][1].compute(), direct.compute())
    with pytest.raises(InputError, match="largest first"):
        lazy_pyramid(tiny_model, levels[::-1])


def test_every_level_keeps_the_level0_value_scaling(tiny_model, darkfield_tile):
    image = darkfield_tile.astype(np.float32) * 3.0  # floats beyond [0, 1] are stretched from their min..max
    image[0, 0] = 1000.0  # one bright pixel, which the 2 x 2 means dilute
    arrays, stains = lazy_pyramid(tiny_model, image, ["enhanced"], min_side=64, **OPTIONS)
    assert len(stains) == 3 and all(s.scaling == value_scaling(image) for s in stains)
    coarse = input_pyramid(image, 64)[1].compute()
    assert coarse.dtype == np.float32 and value_scaling(coarse) != value_scaling(image)  # what it would be alone
