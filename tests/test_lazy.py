"""Lazy staining: dask outputs equal the eager ones, and only what is read is computed."""

import dask.array as da
import numpy as np
import pytest

from digital_stain.arrays import InputError
from digital_stain.lazy import LazyStain, chunk_sizes, stain_lazy

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
