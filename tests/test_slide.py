"""Whole slides to OME-Zarr (digital_stain.slide.run, digital_stain.slide.store): layout, metadata, resume, bad inputs.

Real stores on disk (tmp_path), real dask arrays and a real BigTIFF; the
tiny random-weight model of conftest (its "stains" mean nothing; the
machinery is what is tested) and, once, the shipped dsd-unpaired-fast model.
"""

from __future__ import annotations

import errno
import json
import logging
import pickle
import threading

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr

from digital_stain.core.arrays import InputError, to_uint8
from digital_stain.io.images import read_image
from digital_stain.io.multiscale import read_pyramids
from digital_stain.stain.lazy import LazyStain
from digital_stain.stain.model import StainModel
from digital_stain.slide.store import SlideStore, downsample, level_shapes
from digital_stain.slide.run import (BlockCache, DiskFullError, SlideJob, open_source, process_chunk, stain_chunk,
                                 stain_to_zarr)
from stores import assert_same_store, store_arrays

SMALL = dict(chunk=256, overlap=32, min_side=128, device="cpu", precision="fp32")


@pytest.fixture
def slide(darkfield_tile) -> np.ndarray:
    """A 600 x 700 dark-field mosaic of the sample tile (flipped copies, so no two chunks are alike)."""
    rows = [np.concatenate([darkfield_tile, darkfield_tile[:, ::-1], darkfield_tile[::-1]], axis=1)]
    rows.append(rows[0][::-1, ::-1])
    rows.append(np.rot90(rows[0], 2))
    return np.ascontiguousarray(np.concatenate(rows, axis=0)[:600, :700])


@pytest.fixture
def reference(tiny_model, slide, tmp_path):
    """An uninterrupted run: the store every interrupted-and-resumed run must equal bit for bit."""
    path = tmp_path / "reference.ome.zarr"
    result = stain_to_zarr(tiny_model, slide, path, **SMALL)
    assert result.complete and not result.stopped
    return path


# -- what is written ---------------------------------------------------------------------------
def test_level0_equals_lazy_stain_in_uint8(tiny_model, slide, reference):
    lazy = LazyStain(tiny_model, slide, chunk=256, overlap=32, precision="fp32")
    group = zarr.open_group(str(reference), mode="r")
    for name in ("enhanced", "teacher", "student"):
        stored = group[name]["0"][:]
        assert stored.dtype == np.uint8
        if name != "enhanced":
            assert stored.shape == (3, 600, 700)
            stored = stored.transpose(1, 2, 0)
        else:
            assert stored.shape == (600, 700)
        np.testing.assert_array_equal(stored, to_uint8(lazy.arrays[name].compute()), err_msg=name)


def test_ngff_metadata_and_provenance(tiny_model, reference):
    group = zarr.open_group(str(reference), mode="r", zarr_format=2)
    assert sorted(group.group_keys()) == ["enhanced", "student", "teacher"]  # no progress record once complete
    root = dict(group.attrs)
    assert [m["name"] for m in root["multiscales"]] == ["student", "teacher", "enhanced"]
    student = root["multiscales"][0]
    assert [a["name"] for a in student["axes"]] == ["c", "y", "x"]
    assert [a["type"] for a in student["axes"]] == ["channel", "space", "space"]
    assert [d["path"] for d in student["datasets"]] == ["student/0", "student/1", "student/2", "student/3"]
    assert student["datasets"][2]["coordinateTransformations"][0]["scale"] == [1.0, 4.0, 4.0]
    assert [c["color"] for c in root["omero"]["channels"]] == ["FF0000", "00FF00", "0000FF"]
    enhanced = dict(group["enhanced"].attrs)["multiscales"][0]
    assert [a["name"] for a in enhanced["axes"]] == ["y", "x"] and enhanced["datasets"][0]["path"] == "0"
    state = root["digital_stain"]
    assert state["complete"] is True and state["finished"]
    assert state["model"]["name"] == "tiny-test" and "checksum" in state["model"]
    assert state["package"].startswith("napari-digital-stain ")
    assert state["settings"] == {"outputs": ["enhanced", "teacher", "student"], "chunk": 256, "overlap": 32,
                                 "precision": "fp32", "device": "cpu", "min_side": 128,
                                 "stats_pixels": 2048 * 2048, "stats_crop": 512, "compile": False, "adapt": "auto",
                                 "ngff": "0.4"}
    assert state["adaptation"]["mode"] == "auto" and not state["adaptation"]["applied"]  # its own microscope
    assert state["source"]["shape"] == [600, 700, 3] and state["source"]["dtype"] == "uint8"
    assert state["scaling"]["scale"] == 255.0
    assert state["statistics"] == "norm_statistics.json"  # not in the attributes every reader prints
    statistics = json.loads((reference / state["statistics"]).read_text())
    assert len(statistics) > 0 and all(len(m) == len(v) for m, v in statistics)
    assert dict(group["teacher"].attrs)["digital_stain"]["output"] == "teacher"
    # our own reader opens the store as its primary output, channels last
    assert read_image(reference).shape == (600, 700, 3)
    np.testing.assert_array_equal(read_image(reference), group["student"]["0"][:].transpose(1, 2, 0))


def test_pyramid_levels_are_2x2_means_of_the_level_above(reference):
    group = zarr.open_group(str(reference), mode="r")
    assert [group["student"][str(k)].shape[1:] for k in range(4)] == [(600, 700), (300, 350), (150, 175), (75, 88)]
    for name in ("enhanced", "student"):
        for level in (1, 2, 3):
            above, here = group[name][str(level - 1)][:], group[name][str(level)][:]
            if name == "student":
                above, here = above.transpose(1, 2, 0), here.transpose(1, 2, 0)
            np.testing.assert_array_equal(here, downsample(above))


def test_downsample_rounds_half_up_and_keeps_odd_edges():
    block = np.array([[0, 1, 10], [1, 1, 20], [255, 255, 7]], dtype=np.uint8)
    np.testing.assert_array_equal(downsample(block), [[1, 15], [255, 7]])
    assert downsample(np.zeros((5, 4, 3), np.uint8)).shape == (3, 2, 3)
    rgb = np.random.default_rng(2).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    np.testing.assert_array_equal(downsample(rgb.transpose(2, 0, 1).copy(), axes=(1, 2)),
                                  downsample(rgb).transpose(2, 0, 1))  # the stored (3, h, w) layout
    assert level_shapes((600, 700), 128) == ((600, 700), (300, 350), (150, 175), (75, 88))
    assert level_shapes((100, 5000), 512)[-1] == (13, 625)  # no side under 8 px


def test_shipped_fast_model_matches_lazy_stain(slide, tmp_path):
    model = StainModel.load("dsd-unpaired-fast", device="cpu")
    image = slide[:512, :512]
    result = stain_to_zarr(model, image, tmp_path / "fast.ome.zarr", ["student"], chunk=256, device="cpu",
                           precision="fp32")
    assert result.complete and result.levels == [[512, 512]]
    lazy = LazyStain(model, image, ["student"], chunk=256, precision="fp32")
    stored = zarr.open_group(str(tmp_path / "fast.ome.zarr"))["student"]["0"][:].transpose(1, 2, 0)
    np.testing.assert_array_equal(stored, to_uint8(lazy.arrays["student"].compute()))
    state = dict(zarr.open_group(str(tmp_path / "fast.ome.zarr")).attrs)["digital_stain"]
    assert state["model"]["name"] == model.name and state["model"]["checksum"] == model.checksum


# -- resume --------------------------------------------------------------------------------------
def test_stop_then_resume_equals_uninterrupted(tiny_model, slide, reference, tmp_path):
    path = tmp_path / "stopped.ome.zarr"
    stop = threading.Event()
    seen = []

    def progress(done, total):
        seen.append((done, total))
        if done == 4:
            stop.set()

    first = stain_to_zarr(tiny_model, slide, path, progress=progress, stop=stop, **SMALL)
    assert first.stopped and not first.complete and first.units_done == 4
    assert seen[-1] == (4, first.units_total)
    assert "progress" in zarr.open_group(str(path), mode="r").group_keys()
    assert dict(zarr.open_group(str(path)).attrs)["digital_stain"]["complete"] is False
    second = stain_to_zarr(tiny_model, slide, path, resume=True, **SMALL)
    assert second.complete and second.units_skipped == 4 and second.units_done == first.units_total - 4
    assert_same_store(path, reference)


def test_an_ngff_0_5_store_stops_resumes_keeping_its_version_and_reads_as_0_4_does(tiny_model, slide, reference,
                                                                                     tmp_path):
    path = tmp_path / "v05.ome.zarr"
    stop = threading.Event()
    first = stain_to_zarr(tiny_model, slide, path, ngff="0.5", stop=stop,
                          progress=lambda done, total: done == 3 and stop.set(), **SMALL)
    assert first.stopped and (path / "zarr.json").exists() and not (path / ".zgroup").exists()
    with pytest.raises(InputError, match="ngff: stored 0.5, now 0.4"):
        stain_to_zarr(tiny_model, slide, path, resume=True, ngff="0.4", **SMALL)
    second = stain_to_zarr(tiny_model, slide, path, resume=True, **SMALL)  # no ngff given: the store's
    assert second.complete and second.units_skipped == 3
    root = zarr.open_group(str(path), mode="r")
    assert root.metadata.zarr_format == 3 and root.attrs["ome"]["version"] == "0.5"
    assert list(root["student"]["0"].metadata.dimension_names) == ["c", "y", "x"]
    assert_same_store(path, reference)  # the same bytes as the 0.4 store
    pyramids = {p.name: p for p in read_pyramids(path)}
    assert sorted(pyramids) == ["enhanced", "student", "teacher"] and all(p.complete for p in pyramids.values())
    np.testing.assert_array_equal(pyramids["student"].levels[1].compute(),
                                  zarr.open_group(str(reference))["student"]["1"][:].transpose(1, 2, 0))


def test_an_ngff_version_we_cannot_write_is_refused(tiny_model, slide, tmp_path):
    with pytest.raises(InputError, match="NGFF version 0.6 cannot be written; choose one of 0.4, 0.5"):
        stain_to_zarr(tiny_model, slide, tmp_path / "x.ome.zarr", ngff="0.6", **SMALL)
    assert not (tmp_path / "x.ome.zarr").exists()


def test_units_in_threads_write_the_same_bytes(tiny_model, slide, reference, tmp_path):
    """threads > 1 (the GPU default): reading and writing overlap the network; the bytes do not change."""
    path = tmp_path / "threads.ome.zarr"
    seen = []
    result = stain_to_zarr(tiny_model, slide, path, threads=3, progress=lambda d, t: seen.append(d), **SMALL)
    assert result.complete and result.units_done == result.units_total
    assert seen == list(range(1, result.units_total + 1))
    assert_same_store(path, reference)


@pytest.mark.parametrize("channels", [(3,), ()])
def test_block_cache_regions_equal_dask_slices_and_decode_each_block_about_three_times(channels):
    """Unit regions (chunk + margins) in row order, uneven last chunks, RGB and gray: the same pixels as
    slicing the dask array, and far fewer block reads than the 9 per unit a plain slice makes."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (900, 1000, *channels), dtype=np.uint8)
    array = da.from_array(image, chunks=(256, 300, *channels))
    cache = BlockCache(array, max_bytes=0)  # the floor: 9 blocks kept
    assert cache.max_blocks == 9
    starts_y, starts_x = np.cumsum((0, *array.chunks[0])), np.cumsum((0, *array.chunks[1]))
    units, plain = 0, 0
    for i in range(len(array.chunks[0])):
        for j in range(len(array.chunks[1])):
            rows = slice(max(0, starts_y[i] - 32), min(900, starts_y[i + 1] + 32))
            cols = slice(max(0, starts_x[j] - 32), min(1000, starts_x[j + 1] + 32))
            region = cache.region(rows, cols)
            assert region.dtype == np.uint8
            np.testing.assert_array_equal(region, image[rows, cols])
            units += 1
            plain += (3 - (i in (0, 3))) * (3 - (j in (0, 3)))  # blocks a plain slice reads: 9 inside, fewer at edges
    assert units == 16 and plain == 100
    assert 3 * cache.decoded <= plain, cache.decoded
    np.testing.assert_array_equal(cache.region(slice(5, 7), slice(299, 301)), image[5:7, 299:301])


@pytest.mark.parametrize("threads", [1, 3])
def test_with_threads_the_pyramid_is_built_while_level0_runs(tiny_model, slide, reference, tmp_path, monkeypatch,
                                                             threads):
    """threads > 1: a pyramid unit starts once the units under it are written, not after all of level 0."""
    real, level0_done_at_start = SlideStore.build_level_unit, []

    def recording(self, level, key):
        level0_done_at_start.append(int(self.done(0).sum()))
        return real(self, level, key)

    monkeypatch.setattr(SlideStore, "build_level_unit", recording)
    path = tmp_path / "interleaved.ome.zarr"
    result = stain_to_zarr(tiny_model, slide, path, threads=threads, **SMALL)
    assert result.complete and len(level0_done_at_start) == 4 + 1 + 1  # levels 1, 2 and 3
    if threads == 1:
        assert min(level0_done_at_start) == 9  # level by level
    else:
        assert min(level0_done_at_start) < 9
    assert_same_store(path, reference)


def test_grid_parents_of_units():
    from digital_stain.slide.store import Grid

    grid = Grid(256, (256, 300), (256, 256, 256), ((556, 768), (278, 384), (139, 192)))
    assert grid.parents(0, (0, 0)) == [(0, 0)]
    assert grid.parents(0, (0, 2)) == [(0, 1)]
    assert grid.parents(0, (1, 1)) == [(0, 0), (1, 0)]  # a merged remainder reaching into a second parent row
    assert grid.parents(1, (1, 1)) == [(0, 0)]


def test_stop_with_threads_keeps_a_resumable_store(tiny_model, slide, reference, tmp_path):
    path = tmp_path / "threads-stopped.ome.zarr"
    stop = threading.Event()
    first = stain_to_zarr(tiny_model, slide, path, threads=3, stop=stop,
                          progress=lambda done, total: done >= 2 and stop.set(), **SMALL)
    assert first.stopped and not first.complete and 2 <= first.units_done < first.units_total
    second = stain_to_zarr(tiny_model, slide, path, threads=3, resume=True, **SMALL)
    assert second.complete and second.units_skipped == first.units_done
    assert_same_store(path, reference)


def test_failure_mid_run_then_resume_uses_stored_statistics(tiny_model, slide, reference, tmp_path, monkeypatch):
    import digital_stain.slide.run as slide_module

    path = tmp_path / "failed.ome.zarr"
    real, calls = slide_module.stain_chunk, []

    def failing(*args):
        calls.append(args[-1])
        if len(calls) == 6:
            raise RuntimeError("injected failure")
        return real(*args)

    monkeypatch.setattr(slide_module, "stain_chunk", failing)
    with pytest.raises(RuntimeError, match="injected"):
        stain_to_zarr(tiny_model, slide, path, **SMALL)
    monkeypatch.setattr(slide_module, "stain_chunk", real)
    # a resumed run must use the stored statistics, never record new ones
    monkeypatch.setattr(slide_module._ChunkStain, "record_statistics",
                        lambda self: pytest.fail("statistics recorded again on resume"))
    result = stain_to_zarr(tiny_model, slide, path, resume=True, **SMALL)
    assert result.complete and result.units_skipped == 5
    assert_same_store(path, reference)


def test_resume_with_tampered_statistics_uses_the_stored_ones(tiny_model, slide, tmp_path):
    """The stored statistics really are what a resumed run stains with (changing them changes the pixels)."""
    fresh = tmp_path / "fresh.ome.zarr"
    stain_to_zarr(tiny_model, slide, fresh, ["student"], **SMALL)
    path = tmp_path / "tampered.ome.zarr"
    stop = threading.Event()
    stain_to_zarr(tiny_model, slide, path, ["student"], progress=lambda d, t: stop.set(), stop=stop, **SMALL)
    stored_file = path / dict(zarr.open_group(str(path), mode="r").attrs)["digital_stain"]["statistics"]
    stored_file.write_text(json.dumps([[m, [x * 4.0 for x in v]] for m, v in json.loads(stored_file.read_text())]))
    stain_to_zarr(tiny_model, slide, path, ["student"], resume=True, **SMALL)
    stored = zarr.open_group(str(path), mode="r")["student"]["0"][:]
    expected = zarr.open_group(str(fresh), mode="r")["student"]["0"][:]
    np.testing.assert_array_equal(stored[:, :256, :256], expected[:, :256, :256])  # done before tampering: kept
    assert not np.array_equal(stored[:, 256:, 256:], expected[:, 256:, 256:])  # stained with the stored values


def test_disk_full_stops_cleanly_and_resumes(tiny_model, slide, reference, tmp_path, monkeypatch):
    import zarr.storage._local as local

    path = tmp_path / "full.ome.zarr"
    real_put, written = local._put, []

    def put(target, value, exclusive=False):
        if "student" in target.parts and not target.name.startswith("."):  # a chunk of the student's arrays
            written.append(target)
            if len(written) > 5:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(target, value, exclusive=exclusive)

    monkeypatch.setattr(local, "_put", put)
    with pytest.raises(DiskFullError, match="resume") as info:
        stain_to_zarr(tiny_model, slide, path, **SMALL)
    assert "full" in str(info.value) and "5 of" in str(info.value)
    assert isinstance(info.value, InputError)  # an expected problem: the CLI and widgets show its message
    monkeypatch.setattr(local, "_put", real_put)
    assert not list(path.rglob("*.partial"))
    result = stain_to_zarr(tiny_model, slide, path, resume=True, **SMALL)
    assert result.complete and result.units_skipped == 5
    assert_same_store(path, reference)


def test_stopped_in_the_pyramid_resumes_there(tiny_model, slide, reference, tmp_path):
    path = tmp_path / "pyramid.ome.zarr"
    stop = threading.Event()
    level0 = len(SlideStore(reference).grid.units(0))
    first = stain_to_zarr(tiny_model, slide, path, progress=lambda d, t: d == level0 + 1 and stop.set(),
                          stop=stop, **SMALL)
    assert first.stopped and first.units_done == level0 + 1
    second = stain_to_zarr(tiny_model, slide, path, resume=True, **SMALL)
    assert second.units_skipped == level0 + 1 and second.complete
    assert_same_store(path, reference)


def test_resume_of_complete_store_does_nothing(tiny_model, slide, reference):
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()}
    result = stain_to_zarr(tiny_model, slide, reference, resume=True, **SMALL)
    assert result.complete and result.units_done == 0 and result.units_skipped == result.units_total
    assert before == {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()}


def test_resume_with_other_settings_is_refused_naming_them(tiny_model, slide, reference, tmp_path):
    with pytest.raises(InputError) as info:
        stain_to_zarr(tiny_model, slide, reference, resume=True, **{**SMALL, "chunk": 512, "overlap": 64})
    message = str(info.value)
    assert "chunk: stored 256, now 512" in message and "overlap: stored 32, now 64" in message
    assert "--overwrite" in message
    with pytest.raises(InputError, match="outputs: stored enhanced,teacher,student, now student"):
        stain_to_zarr(tiny_model, slide, reference, ["student"], resume=True, **SMALL)
    with pytest.raises(InputError, match="input fingerprint"):
        stain_to_zarr(tiny_model, slide[:, ::-1], reference, resume=True, **SMALL)


@pytest.mark.slow
def test_compiled_inner_units_match_eager_compile_once_and_resume_keeps_the_setting(tiny_model, slide, reference,
                                                                                   tmp_path):
    """compile=True: one graph per network (the inner unit's shape), compiled in a worker thread (3 units
    in flight, as on a GPU); edge units bit-equal to the eager store, the inner one within 1 gray level;
    a store started compiled is resumed compiled, never mixed."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    path = tmp_path / "compiled.ome.zarr"
    stop = threading.Event()
    graphs = counters["stats"]["unique_graphs"]
    first = stain_to_zarr(tiny_model, slide, path, compile=True, stop=stop, threads=3,
                          progress=lambda done, total: done == 6 and stop.set(), **SMALL)
    assert first.stopped and counters["stats"]["unique_graphs"] - graphs == 2  # teacher and student, unit (1, 1)
    with pytest.raises(InputError, match="compile: stored True, now False"):
        stain_to_zarr(tiny_model, slide, path, resume=True, **SMALL)
    second = stain_to_zarr(tiny_model, slide, path, compile=True, resume=True, threads=3, **SMALL)
    assert second.complete and counters["stats"]["unique_graphs"] - graphs == 2  # no recompile
    compiled, eager = store_arrays(path), store_arrays(reference)
    inner = np.zeros((600, 700), bool)
    inner[256:512, 256:512] = True  # the only unit with margins on all four sides (chunks 256, 256, 88 | 188)
    for name in ("enhanced/0", "teacher/0", "student/0"):
        difference = np.abs(compiled[name].astype(int) - eager[name].astype(int))
        difference = difference.max(axis=0) if difference.ndim == 3 else difference
        assert difference.max() <= 1, name
        assert not difference[~inner].any(), f"{name}: edge units run eagerly, bit for bit"


def test_store_from_before_the_compile_setting_resumes_uncompiled(tiny_model, slide, reference, tmp_path):
    path = tmp_path / "older.ome.zarr"
    stop = threading.Event()
    stain_to_zarr(tiny_model, slide, path, stop=stop, progress=lambda done, total: stop.set(), **SMALL)
    store = SlideStore(path)
    settings = dict(store.state["settings"])
    del settings["compile"]  # what stores written before the option hold
    store.update_state(settings=settings)
    assert SlideJob.from_store(SlideStore(path)).compile is False
    assert stain_to_zarr(tiny_model, slide, path, resume=True, **SMALL).complete
    assert_same_store(path, reference)
    with pytest.raises(InputError, match="compile: stored False, now True"):
        stain_to_zarr(tiny_model, slide, path, resume=True, compile=True, **SMALL)


def test_resume_with_another_model_is_refused(tiny_model, tiny_model_file, slide, tmp_path):
    path = tmp_path / "model.ome.zarr"
    stop = threading.Event()
    stain_to_zarr(tiny_model_file, slide, path, progress=lambda d, t: stop.set(), stop=stop, **SMALL)
    other = StainModel.load(tiny_model_file, device="cpu")
    torch_param = next(other.student.parameters())
    torch_param.data += 0.01
    other.save(tmp_path / "other.safetensors")
    with pytest.raises(InputError, match="model: stored tiny-test") as info:
        stain_to_zarr(other, slide, path, resume=True, **SMALL)
    assert "checksum" in str(info.value)


# -- refusals --------------------------------------------------------------------------------------
def test_existing_output_is_refused_unless_resume_or_overwrite(tiny_model, slide, reference, tmp_path):
    with pytest.raises(InputError, match="already exists.*--resume.*--overwrite"):
        stain_to_zarr(tiny_model, slide, reference, **SMALL)
    result = stain_to_zarr(tiny_model, slide[:300, :300], reference, ["enhanced"], overwrite=True, **SMALL)
    assert result.complete
    assert sorted(zarr.open_group(str(reference), mode="r").group_keys()) == ["enhanced"]
    with pytest.raises(InputError, match="exclude each other"):
        stain_to_zarr(tiny_model, slide, reference, resume=True, overwrite=True, **SMALL)


def test_overwrite_never_deletes_what_is_not_a_zarr_store(tiny_model, slide, tmp_path):
    folder = tmp_path / "notes.zarr"
    folder.mkdir()
    (folder / "thesis.txt").write_text("precious")
    with pytest.raises(InputError, match="did not write.*not deleted"):
        stain_to_zarr(tiny_model, slide, folder, overwrite=True, **SMALL)
    assert (folder / "thesis.txt").read_text() == "precious"
    with pytest.raises(InputError, match="nothing to resume"):
        stain_to_zarr(tiny_model, slide, folder, resume=True, **SMALL)


@pytest.mark.parametrize("chunk", [128, 8192])
def test_chunk_out_of_range_is_refused(tiny_model, slide, tmp_path, chunk):
    with pytest.raises(InputError, match="256..4096"):
        stain_to_zarr(tiny_model, slide, tmp_path / "x.ome.zarr", chunk=chunk)
    assert not (tmp_path / "x.ome.zarr").exists()


def test_output_inside_the_input_is_refused(tiny_model, slide, tmp_path):
    source = tmp_path / "in.ome.zarr"
    stain_to_zarr(tiny_model, slide, source, ["enhanced"], **SMALL)
    with pytest.raises(InputError, match="inside the input store"):
        stain_to_zarr(tiny_model, source, source / "out.ome.zarr", **SMALL)


# -- inputs --------------------------------------------------------------------------------------
def _write_ome_zarr(path, data_cyx, *, scale=(0.5, 0.5), chunks=256, leading=()):
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    data = data_cyx.reshape(*(1,) * len(leading), *data_cyx.shape)
    array = group.create_array("0", shape=data.shape, chunks=(*(1,) * len(leading), 3, chunks, chunks),
                               dtype=data.dtype)
    array[:] = data
    axes = [{"name": a, "type": "time" if a == "t" else "space"} for a in leading]
    axes += [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
             {"name": "x", "type": "space", "unit": "micrometer"}]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [*(1.0,) * len(leading), 1.0, *scale]}]}]}]


def test_ome_zarr_input_keeps_pixel_size_and_drops_single_t_z(tiny_model, slide, reference, tmp_path):
    source = tmp_path / "in.ome.zarr"
    _write_ome_zarr(source, np.moveaxis(slide, -1, 0), leading=("t", "z"))
    opened = open_source(source)
    assert opened.array.shape == (600, 700, 3) and isinstance(opened.array, da.Array)
    assert opened.calibration.pixel_size == (0.5, 0.5) and opened.calibration.unit == "micrometer"
    path = tmp_path / "out.ome.zarr"
    stain_to_zarr(tiny_model, source, path, **SMALL)
    assert_same_store(path, reference)
    student = dict(zarr.open_group(str(path), mode="r")["student"].attrs)["multiscales"][0]
    assert student["axes"][1] == {"name": "y", "type": "space", "unit": "micrometer"}
    assert student["datasets"][1]["coordinateTransformations"][0]["scale"] == [1.0, 1.0, 1.0]
    assert dict(zarr.open_group(str(path)).attrs)["digital_stain"]["source"]["name"] == str(source)


def test_bigtiff_input_is_read_lazily_through_tifffile(tiny_model, slide, reference, tmp_path):
    source = tmp_path / "slide.tif"
    tifffile.imwrite(source, slide, bigtiff=True, tile=(256, 256), photometric="rgb")
    with tifffile.TiffFile(source) as tif:
        assert tif.is_bigtiff
    opened = open_source(source)
    assert isinstance(opened.array, da.Array) and opened.notes == []
    path = tmp_path / "out.ome.zarr"
    stain_to_zarr(tiny_model, source, path, **SMALL)
    assert_same_store(path, reference)


def test_strip_tiff_is_rechunked_with_a_warning(tiny_model, slide, reference, tmp_path, caplog):
    source = tmp_path / "strips.tif"
    tifffile.imwrite(source, slide, rowsperstrip=8, photometric="rgb")
    with caplog.at_level(logging.WARNING, logger="digital_stain"):
        opened = open_source(source, chunk=256)
    assert opened.array.chunks[0][0] == 256 and opened.array.chunks[1][0] == 256
    assert "chunks of 8 x 700 px" in opened.notes[0] and "read in 256-px pieces" in opened.notes[0]
    assert any("smaller than 256" in r.getMessage() for r in caplog.records)
    path = tmp_path / "out.ome.zarr"
    result = stain_to_zarr(tiny_model, source, path, **SMALL)
    assert result.notes == opened.notes
    assert_same_store(path, reference)


@pytest.mark.parametrize("chunks, words", [((64, 64, 3), "smaller than 256"), ((600, 5000, 3), "larger than 4096")])
def test_dask_input_with_bad_chunks_is_rechunked_with_a_warning(caplog, chunks, words):
    array = da.zeros((600, 9000, 3), dtype=np.uint8, chunks=chunks)
    with caplog.at_level(logging.WARNING, logger="digital_stain"):
        opened = open_source(array, chunk=512)
    assert words in opened.notes[0] and "512-px pieces" in opened.notes[0]
    assert max(opened.array.chunks[0]) <= 512 and max(opened.array.chunks[1]) == 512
    assert any(words in r.getMessage() for r in caplog.records)
    assert open_source(da.zeros((100, 100), chunks=(100, 100))).notes == []  # one chunk spanning a small image


def test_dask_input_equals_numpy_input(tiny_model, slide, reference, tmp_path):
    path = tmp_path / "dask.ome.zarr"
    stain_to_zarr(tiny_model, da.from_array(slide, chunks=(300, 300, 3)), path, **SMALL)
    assert_same_store(path, reference)


def test_store_that_is_not_ome_zarr_is_refused(tiny_model, tmp_path):
    plain = tmp_path / "plain.zarr"
    zarr.create_array(str(plain), shape=(300, 300), dtype=np.uint8)
    with pytest.raises(InputError, match="plain Zarr array.*not OME-Zarr.*dask.array.from_zarr"):
        stain_to_zarr(tiny_model, plain, tmp_path / "out.ome.zarr", **SMALL)
    group = tmp_path / "group.zarr"
    zarr.open_group(str(group), mode="w").create_array("0", shape=(300, 300), dtype=np.uint8)
    with pytest.raises(InputError, match="without OME-Zarr 'multiscales'"):
        open_source(group)
    folder = tmp_path / "folder.zarr"
    folder.mkdir()
    (folder / "readme.txt").write_text("not zarr")
    with pytest.raises(InputError, match="not a Zarr store"):
        open_source(folder)
    assert not (tmp_path / "out.ome.zarr").exists()


def test_stack_and_tiny_inputs_are_refused(tmp_path):
    with pytest.raises(InputError, match="stack of 2 planes"):
        open_source(da.zeros((2, 300, 300, 3), dtype=np.uint8))
    with pytest.raises(InputError, match="at least 8 x 8"):
        stain_to_zarr("dsd-unpaired-fast", np.zeros((4, 300), np.uint8), tmp_path / "x.ome.zarr", device="cpu")
    with pytest.raises(InputError, match="does not exist"):
        open_source(tmp_path / "missing.ome.zarr")


# -- the unit of work, as a distributed worker would call it -----------------------------------------
def test_units_are_pure_and_picklable(tiny_model_file, slide, tmp_path):
    """A second model instance (a worker's), given the pickled job and store, writes the very same bytes."""
    path = tmp_path / "units.ome.zarr"
    stop = threading.Event()
    stain_to_zarr(tiny_model_file, slide, path, progress=lambda d, t: stop.set(), stop=stop, **SMALL)
    store = pickle.loads(pickle.dumps(SlideStore(path)))
    job = pickle.loads(pickle.dumps(SlideJob.from_store(store)))
    assert job.grid.chunk == 256 and job.precision == "fp32" and job.statistics is not None
    worker_model = StainModel.load(tiny_model_file, device="cpu")
    source = open_source(slide, chunk=256).array
    first = zarr.open_group(str(path), mode="r")["student"]["0"][:, :256, :256].transpose(1, 2, 0)
    np.testing.assert_array_equal(stain_chunk(worker_model, source, job, (0, 0))["student"], first)
    process_chunk(worker_model, source, store, job, (1, 1))
    assert store.done(0)[1, 1] and not store.done(0)[2, 2]
    result = stain_to_zarr(tiny_model_file, slide, path, resume=True, **SMALL)
    assert result.units_skipped == 2
    reference = stain_to_zarr(tiny_model_file, slide, tmp_path / "whole.ome.zarr", **SMALL)
    assert reference.complete
    assert_same_store(path, tmp_path / "whole.ome.zarr")


# -- another microscope ------------------------------------------------------------------------
def test_an_adapted_slide_is_decided_once_stored_and_resumed_to_the_same_bytes(tiny_model, slide, tmp_path,
                                                                               monkeypatch):
    import digital_stain.stain.model as model_module
    from digital_stain.core.adapt import Adaptation

    bright = np.clip(slide.astype(np.int32) * 8, 0, 255).astype(np.uint8)  # a brighter microscope
    reference = tmp_path / "bright.ome.zarr"
    straight = stain_to_zarr(tiny_model, bright, reference, **SMALL)
    assert straight.adaptation.applied and straight.adaptation.mode == "auto"
    state = SlideStore(reference).state
    assert state["settings"]["adapt"] == "auto" and state["adaptation"]["applied"]
    stored = Adaptation.from_dict(state["adaptation"])
    assert stored.measured.same_as(straight.adaptation.measured)
    lazy = LazyStain(tiny_model, bright, chunk=256, overlap=32, precision="fp32")  # the napari view decides alike
    assert lazy.prep.adaptation.measured.same_as(stored.measured)
    group = zarr.open_group(str(reference), mode="r")
    np.testing.assert_array_equal(group["teacher"]["0"][:].transpose(1, 2, 0),
                                  to_uint8(lazy.arrays["teacher"].compute()))

    path = tmp_path / "stopped.ome.zarr"
    stop = threading.Event()
    stain_to_zarr(tiny_model, bright, path, stop=stop, progress=lambda done, total: done == 3 and stop.set(), **SMALL)

    def no_measuring(*args, **kwargs):
        raise AssertionError("a resumed slide is measured again")

    monkeypatch.setattr(model_module, "measure", no_measuring)
    assert stain_to_zarr(tiny_model, bright, path, resume=True, **SMALL).complete
    assert_same_store(path, reference)
    with pytest.raises(InputError, match="adapt: stored auto, now off"):
        stain_to_zarr(tiny_model, bright, path, resume=True, adapt="off", **SMALL)


def test_adapt_off_writes_what_stores_wrote_before_adaptation(tiny_model, slide, reference, tmp_path):
    path = tmp_path / "off.ome.zarr"
    result = stain_to_zarr(tiny_model, slide, path, adapt="off", **SMALL)
    assert not result.adaptation.applied and SlideStore(path).state["adaptation"]["mode"] == "off"
    assert_same_store(path, reference)  # the sample is the model's own microscope: auto did not adapt either
    assert not SlideStore(reference).state["adaptation"]["applied"]


def test_store_from_before_adaptation_resumes_without_it(tiny_model, slide, reference, tmp_path):
    path = tmp_path / "older.ome.zarr"
    stop = threading.Event()
    stain_to_zarr(tiny_model, slide, path, stop=stop, progress=lambda done, total: stop.set(), **SMALL)
    store = SlideStore(path)
    state = dict(store.state)
    settings = dict(state["settings"])
    del settings["adapt"]  # what stores written before adaptation hold
    store.update_state(settings=settings, adaptation=None)
    job = SlideJob.from_store(SlideStore(path))
    assert job.adaptation == "off"
    assert stain_to_zarr(tiny_model, slide, path, resume=True, **SMALL).complete
    assert_same_store(path, reference)
    with pytest.raises(InputError, match="adapt: stored off, now auto"):
        stain_to_zarr(tiny_model, slide, path, resume=True, adapt="auto", **SMALL)


def test_a_settings_object_stains_the_same_store_as_the_keywords_and_moves_no_model(tiny_model, slide, reference,
                                                                                   tmp_path):
    """``stain_to_zarr(settings=)``: the same StainSettings the eager and lazy paths take."""
    from digital_stain.stain.settings import StainSettings

    path = tmp_path / "settings.ome.zarr"
    settings = StainSettings(chunk=256, overlap=32, device="cpu", precision="fp32", adapt="auto")
    before = {k: v.clone() for k, v in tiny_model.student.state_dict().items()}
    result = stain_to_zarr(tiny_model, slide, path, settings=settings, min_side=128)
    assert result.complete
    assert_same_store(path, reference)
    assert tiny_model._device.type == "cpu"
    assert all(np.array_equal(v.numpy(), tiny_model.student.state_dict()[k].numpy()) for k, v in before.items())
