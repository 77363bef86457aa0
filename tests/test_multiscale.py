"""Reading every image and level of an OME-Zarr store (digital_stain.io.multiscale): stained stores and others."""

from __future__ import annotations

import threading

import dask.array as da
import numpy as np
import pytest
import zarr

from digital_stain.core.arrays import InputError
from digital_stain.io.multiscale import is_ome_zarr, read_pyramids, store_name
from digital_stain.slide.run import stain_to_zarr
from stores import write_ome_zarr

SMALL = dict(chunk=256, overlap=32, min_side=128, device="cpu", precision="fp32")


@pytest.fixture
def slide(darkfield_tile) -> np.ndarray:
    return np.ascontiguousarray(np.tile(darkfield_tile, (2, 3, 1))[:500, :700])


def test_a_stained_store_reads_as_one_pyramid_per_output_primary_first(tiny_model, slide, tmp_path):
    path = tmp_path / "stained.ome.zarr"
    assert stain_to_zarr(tiny_model, slide, path, **SMALL).complete
    pyramids = read_pyramids(path)
    assert [p.name for p in pyramids] == ["student", "teacher", "enhanced"]
    stored = zarr.open_group(str(path), mode="r")
    for p in pyramids:
        assert p.complete is True and p.scale == (1.0, 1.0) and p.translate == (0.0, 0.0)
        assert p.axes == ("YX" if p.name == "enhanced" else "YXC") and p.rgb == (p.name != "enhanced")
        assert [level.shape[:2] for level in p.levels] == [(500, 700), (250, 350), (125, 175), (63, 88)]
        assert all(isinstance(level, da.Array) and level.dtype == np.uint8 for level in p.levels)
        for index, level in enumerate(p.levels):
            expected = stored[p.name][str(index)][:]
            np.testing.assert_array_equal(level.compute(), expected if p.name == "enhanced"
                                          else np.moveaxis(expected, 0, -1))


def test_an_unfinished_stained_store_says_so(tiny_model, slide, tmp_path):
    path = tmp_path / "stained.ome.zarr"
    stop = threading.Event()
    result = stain_to_zarr(tiny_model, slide, path, ["enhanced"], stop=stop,
                           progress=lambda done, total: stop.set(), **SMALL)
    assert result.stopped and not result.complete
    (pyramid,) = read_pyramids(path)
    assert pyramid.name == "enhanced" and pyramid.complete is False
    assert pyramid.levels[0][-1, -1].compute() == 0  # the last unit is not written yet


def test_ngff_04_drops_length_one_axes_moves_colour_last_and_places_level0(tmp_path, darkfield_tile):
    level0 = np.moveaxis(darkfield_tile, -1, 0)[None, :, None]  # (T=1, C=3, Z=1, Y, X)
    levels = [level0, level0[..., ::2, ::2]]
    path = tmp_path / "slide.ome.zarr"
    write_ome_zarr(path, levels, "tczyx", scale=[1, 1, 2.0, 0.25, 0.5], translation=[0, 0, 0, 10.0, 20.0],
                   units={"y": "micrometer", "x": "micrometer"}, wide_scale=[1, 1, 1, 2.0, 2.0])
    (pyramid,) = read_pyramids(path)
    assert pyramid.name == "slide" and pyramid.axes == "YXC" and pyramid.rgb and pyramid.channel_axis is None
    assert [level.shape for level in pyramid.levels] == [(256, 256, 3), (128, 128, 3)]
    np.testing.assert_array_equal(pyramid.levels[0].compute(), darkfield_tile)
    np.testing.assert_array_equal(pyramid.levels[1].compute(), darkfield_tile[::2, ::2])
    # the multiscale-wide scale applies after the dataset's scale and translation
    assert pyramid.scale == (0.5, 1.0) and pyramid.translate == (20.0, 40.0)
    assert pyramid.units == ("micrometer", "micrometer") and pyramid.complete is None


def test_ngff_05_with_two_channels_keeps_a_channel_axis(tmp_path):
    data = np.arange(2 * 64 * 80, dtype=np.uint16).reshape(2, 64, 80)
    path = tmp_path / "fluo.zarr"
    write_ome_zarr(path, [data], "cyx", zarr_format=3, name="two channels")
    (pyramid,) = read_pyramids(path)
    assert pyramid.name == "two channels" and pyramid.axes == "CYX" and not pyramid.rgb
    assert pyramid.channel_axis == 0 and pyramid.scale == (1.0, 1.0) and pyramid.units == (None, None)
    np.testing.assert_array_equal(pyramid.levels[0].compute(), data)


def test_bioformats2raw_series_each_read_as_an_image(tmp_path, darkfield_tile):
    path = tmp_path / "converted.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    root.attrs["bioformats2raw.layout"] = 3
    write_ome_zarr(path / "0", [darkfield_tile[..., 0]], "yx", name="overview")
    write_ome_zarr(path / "1", [darkfield_tile[:100, :120, 1]], "yx")
    pyramids = read_pyramids(path)
    assert [p.levels[0].shape for p in pyramids] == [(256, 256), (100, 120)]
    assert pyramids[0].name == "overview" and pyramids[1].name == "converted"


def test_what_is_not_ome_zarr_is_recognised_without_error(tmp_path, darkfield_tile):
    plain = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    plain.create_array("0", shape=(8, 8), dtype=np.uint8)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.png").write_bytes(b"not a png")
    for path in ("plain.zarr", "folder", "file.png", "missing.zarr"):
        assert not is_ome_zarr(tmp_path / path), path
    write_ome_zarr(tmp_path / "image.zarr", [darkfield_tile], "yxc")
    assert is_ome_zarr(tmp_path / "image.zarr")
    with pytest.raises(InputError, match="multiscales"):
        read_pyramids(tmp_path / "plain.zarr")


def test_metadata_naming_missing_levels_is_refused(tmp_path, darkfield_tile):
    path = tmp_path / "broken.zarr"
    write_ome_zarr(path, [darkfield_tile, darkfield_tile[::2, ::2]], "yxc")
    group = zarr.open_group(str(path), mode="r+")
    entry = group.attrs["multiscales"][0]
    entry["datasets"].append({"path": "2"})
    group.attrs["multiscales"] = [entry]
    with pytest.raises(InputError, match="not in the store"):
        read_pyramids(path)


def test_store_name():
    assert store_name("a/slide.ome.zarr") == "slide" and store_name("b.ZARR") == "b" and store_name("c") == "c"
