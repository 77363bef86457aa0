"""Stains in hand saved as a stained OME-Zarr store (digital_stain.slide.export.save_stains)."""

from __future__ import annotations

import threading

import dask.array as da
import numpy as np
import pytest
import zarr

from digital_stain.core.arrays import InputError, to_uint8
from digital_stain.io.calibration import Calibration
from digital_stain.io.images import read_calibration
from digital_stain.io.multiscale import read_pyramids
from digital_stain.slide.export import SaveStopped, save_stains
from digital_stain.slide.store import downsample, read_state


@pytest.fixture
def stains() -> dict:
    rng = np.random.default_rng(0)
    gray = rng.random((600, 700), dtype=np.float32)
    return {"enhanced": np.repeat(gray[..., None], 3, axis=-1),  # as napari shows it: gray in three channels
            "student": rng.random((600, 700, 3), dtype=np.float32)}


def test_saved_stains_are_a_stained_store_with_their_pyramid_and_placement(stains, tmp_path):
    path, seen = tmp_path / "saved.ome.zarr", []
    calibration = Calibration((0.345, 0.345), "micrometer", (10.0, 20.0))
    save_stains(path, stains, calibration=calibration, record={"model": "dsd-unpaired"}, chunk=256,
                min_side=128, progress=lambda done, total: seen.append((done, total)))
    state = read_state(path)  # ours: --overwrite may replace it, the reader knows it
    assert state["complete"] and state["made_by"] == {"model": "dsd-unpaired"}
    assert seen[-1][0] == seen[-1][1] == len(seen)
    pyramids = {p.name: p for p in read_pyramids(path)}
    assert sorted(pyramids) == ["enhanced", "student"] and pyramids["student"].complete
    np.testing.assert_array_equal(pyramids["student"].levels[0].compute(), to_uint8(stains["student"]))
    np.testing.assert_array_equal(pyramids["enhanced"].levels[0].compute(), to_uint8(stains["enhanced"][..., 0]))
    for name, pyramid in pyramids.items():
        assert [level.shape[0] for level in pyramid.levels] == [600, 300, 150, 75]  # to 128 px or less
        above = pyramid.levels[0].compute()
        np.testing.assert_array_equal(pyramid.levels[1].compute(), downsample(above))
        np.testing.assert_allclose(pyramid.scale, (0.345, 0.345))
        np.testing.assert_allclose(pyramid.translate, (10.0, 20.0))
    found = read_calibration(path)
    assert found.unit == "micrometer" and np.allclose(found.pixel_size, 0.345)


def test_a_lazy_stain_is_read_chunk_by_chunk(stains, tmp_path):
    blocks = []

    def counted(block, block_info=None):
        blocks.append(block.shape)
        return block

    lazy = da.from_array(stains["student"], chunks=(256, 256, 3)).map_blocks(counted, dtype=np.float32)
    save_stains(tmp_path / "lazy.ome.zarr", {"student": lazy}, chunk=256, min_side=600)
    assert max(shape[0] * shape[1] for shape in blocks) <= 256 * 256  # never the whole plane at once
    stored = zarr.open_group(str(tmp_path / "lazy.ome.zarr"), mode="r")["student"]["0"][:]
    np.testing.assert_array_equal(stored.transpose(1, 2, 0), to_uint8(stains["student"]))


def test_what_cannot_be_saved_is_refused_and_nothing_is_left(stains, tmp_path):
    path = tmp_path / "bad.ome.zarr"
    with pytest.raises(InputError, match="nothing to save"):
        save_stains(path, {})
    with pytest.raises(InputError, match="'darkfield' is not a stained output"):
        save_stains(path, {"darkfield": stains["student"]})
    with pytest.raises(InputError, match="differ in size"):
        save_stains(path, {"student": stains["student"], "enhanced": stains["enhanced"][:300]})
    with pytest.raises(InputError, match=r"expected \(Y, X, 3\)"):
        save_stains(path, {"student": stains["student"][..., 0]})
    stop = threading.Event()
    stop.set()
    with pytest.raises(SaveStopped):
        save_stains(path, stains, stop=stop)
    assert list(tmp_path.iterdir()) == []  # no store, no partial folder
    theirs = tmp_path / "theirs.ome.zarr"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("a user's file")
    with pytest.raises(InputError):
        save_stains(theirs, stains, overwrite=True)
    assert (theirs / "keep.txt").read_text() == "a user's file"
