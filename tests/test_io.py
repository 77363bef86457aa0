"""Tests of digital_stain.io.images: readers (PNG, TIFF, OME-Zarr), list_images, atomic writes."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

import digital_stain
from digital_stain.core.arrays import InputError
from digital_stain.io.images import atomic_path, list_images, read_image, write_image
from digital_stain.io.outputs import MARKER

DATA = Path(digital_stain.__file__).parent / "data"


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)


# ---------------------------------------------------------------- PNG


def test_read_png_rgb(tmp_path, rgb):
    path = tmp_path / "a.png"
    Image.fromarray(rgb).save(path)
    out = read_image(path)
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)


def test_read_png_gray_and_16_bit_gray(tmp_path):
    gray = np.arange(40 * 48, dtype=np.uint16).reshape(40, 48) * 20  # up to ~38000: needs 16 bits
    Image.fromarray(gray).save(tmp_path / "g16.png")
    out = read_image(tmp_path / "g16.png")
    assert out.shape == (40, 48)
    np.testing.assert_array_equal(out.astype(np.uint16), gray)
    Image.fromarray((gray // 256).astype(np.uint8)).save(tmp_path / "g8.png")
    assert read_image(tmp_path / "g8.png").shape == (40, 48)


def test_read_palette_png_becomes_rgb(tmp_path, rgb):
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    assert out.shape == (40, 48, 3)


def test_read_shipped_tile():
    out = read_image(DATA / "darkfield_0_0.png")
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8


# ---------------------------------------------------------------- TIFF


def test_read_tiff_rgb_eager_and_lazy(tmp_path, rgb):
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, rgb, photometric="rgb")
    eager = read_image(path)
    assert isinstance(eager, np.ndarray)
    np.testing.assert_array_equal(eager, rgb)
    lazy = read_image(path, lazy=True)
    assert isinstance(lazy, da.Array)
    assert lazy.shape == rgb.shape and lazy.dtype == rgb.dtype
    np.testing.assert_array_equal(lazy.compute(), rgb)


def test_read_tiff_zyx_stack_eager_and_lazy(tmp_path):
    stack = np.random.default_rng(1).integers(0, 65535, (5, 32, 24), dtype=np.uint16)
    path = tmp_path / "stack.tiff"
    tifffile.imwrite(path, stack, photometric="minisblack")
    eager = read_image(path)
    assert eager.shape == (5, 32, 24) and eager.dtype == np.uint16
    np.testing.assert_array_equal(eager, stack)
    lazy = read_image(path, lazy=True)
    assert isinstance(lazy, da.Array)
    np.testing.assert_array_equal(lazy.compute(), stack)


def test_read_tiff_channels_first_is_moved_last(tmp_path, rgb):
    path = tmp_path / "cyx.tif"
    tifffile.imwrite(path, np.moveaxis(rgb, -1, 0), photometric="minisblack", metadata={"axes": "CYX"})
    np.testing.assert_array_equal(read_image(path), rgb)
    np.testing.assert_array_equal(read_image(path, lazy=True).compute(), rgb)


# ---------------------------------------------------------------- OME-Zarr


def _write_ome_zarr(path: Path, data: np.ndarray, axes: str, *, zarr_format: int = 2, nested: bool = False):
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    array = group.create_array("0", shape=data.shape, chunks=tuple(min(16, s) for s in data.shape), dtype=data.dtype)
    array[:] = data
    kinds = {"y": "space", "x": "space", "z": "space", "c": "channel", "t": "time"}
    multiscales = [{"version": "0.4", "axes": [{"name": a, "type": kinds[a]} for a in axes], "datasets": [{"path": "0"}]}]
    if nested:  # OME-Zarr 0.5 keeps its metadata under "ome"
        group.attrs["ome"] = {"version": "0.5", "multiscales": multiscales}
    else:
        group.attrs["multiscales"] = multiscales


def test_read_ome_zarr_yxc_eager_and_lazy(tmp_path, rgb):
    path = tmp_path / "image.ome.zarr"
    _write_ome_zarr(path, rgb, "yxc")
    eager = read_image(path)
    assert isinstance(eager, np.ndarray)
    np.testing.assert_array_equal(eager, rgb)
    lazy = read_image(path, lazy=True)
    assert isinstance(lazy, da.Array)
    assert lazy.shape == rgb.shape
    np.testing.assert_array_equal(lazy.compute(), rgb)


def test_read_ome_zarr_v3_channels_first(tmp_path, rgb):
    path = tmp_path / "image.zarr"
    _write_ome_zarr(path, np.moveaxis(rgb, -1, 0), "cyx", zarr_format=3, nested=True)
    np.testing.assert_array_equal(read_image(path), rgb)
    lazy = read_image(path, lazy=True)
    assert isinstance(lazy, da.Array)
    np.testing.assert_array_equal(lazy.compute(), rgb)


def test_read_zarr_group_without_multiscales_is_refused(tmp_path):
    path = tmp_path / "plain.zarr"
    group = zarr.open_group(str(path), mode="w")
    group.create_array("0", shape=(16, 16), dtype=np.uint8)
    with pytest.raises(InputError, match="multiscales"):
        read_image(path)


# ---------------------------------------------------------------- broken inputs


def test_truncated_png_is_refused_with_path(tmp_path, rgb):
    good = tmp_path / "good.png"
    Image.fromarray(rgb).save(good)
    data = good.read_bytes()
    bad = tmp_path / "truncated.png"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as info:
        read_image(bad)
    assert str(bad) in str(info.value)


def test_text_file_named_png_is_refused_with_path(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image\n")
    with pytest.raises(InputError) as info:
        read_image(bad)
    assert str(bad) in str(info.value)


def test_text_file_named_tif_is_refused_with_path(tmp_path):
    bad = tmp_path / "notes.tif"
    bad.write_text("this is not an image either\n")
    with pytest.raises(InputError) as info:
        read_image(bad)
    assert str(bad) in str(info.value)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_image(tmp_path / "nope.png")


# ---------------------------------------------------------------- list_images


def test_list_images_skips_hidden_and_non_image_files(tmp_path, rgb):
    for name in ("b.png", "a.tif", "C.PNG", "d.jpg", ".hidden.png", "notes.txt", "model.safetensors", "png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "inner.png").write_bytes(b"x")
    (tmp_path / "dir.png").mkdir()  # a folder named like an image is not one
    _write_ome_zarr(tmp_path / "slide.ome.zarr", rgb, "yxc")
    (tmp_path / ".hidden.zarr").mkdir()
    names = [p.name for p in list_images(tmp_path)]
    assert names == sorted(["b.png", "a.tif", "C.PNG", "d.jpg", "slide.ome.zarr"])


def test_list_images_refuses_a_non_folder(tmp_path):
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(InputError, match="not a folder"):
        list_images(tmp_path / "f.png")
    with pytest.raises(InputError):
        list_images(tmp_path / "missing")


def test_list_images_on_shipped_data():
    names = [p.name for p in list_images(DATA)]
    assert "darkfield_0_0.png" in names and "stained_1_3.png" in names
    assert "README.md" not in names


# ---------------------------------------------------------------- atomic_path


class _Boom(RuntimeError):
    pass


def test_atomic_path_writes_on_success(tmp_path):
    target = tmp_path / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp != target
        assert tmp.name == target.name
        assert tmp.parent.parent == tmp_path  # beside the target (same file system)
        tmp.write_text("new")
        assert not target.exists()  # not in place before the block ends
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_path_leaves_existing_target_untouched_when_block_raises(tmp_path, rgb):
    target = write_image(tmp_path / "out.png", rgb)
    with pytest.raises(_Boom):
        with atomic_path(target, overwrite=True) as tmp:
            tmp.write_text("half-written")
            raise _Boom
    np.testing.assert_array_equal(read_image(target), rgb)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temporary left behind


def test_atomic_path_creates_nothing_when_block_raises(tmp_path):
    target = tmp_path / "sub" / "new.png"
    with pytest.raises(_Boom):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise _Boom
    assert not target.exists()
    assert list((tmp_path / "sub").iterdir()) == []


def test_atomic_path_folder_target(tmp_path):
    target = tmp_path / "result"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "old").write_text("old")
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "old"]  # a folder we write is marked as ours
    with pytest.raises(_Boom):
        with atomic_path(target, overwrite=True) as tmp:
            tmp.mkdir()
            (tmp / "new").write_text("new")
            raise _Boom
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "old"]
    with atomic_path(target, overwrite=True) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]


def test_atomic_path_refuses_existing_target_without_overwrite(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(InputError, match="already exists"):
        with atomic_path(target) as tmp:
            tmp.write_text("new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_path_overwrite_replaces_our_output_only(tmp_path, rgb):
    ours = write_image(tmp_path / "out.png", rgb)
    with atomic_path(ours, overwrite=True) as tmp:
        tmp.write_text("new")
    assert ours.read_text() == "new"

    theirs = tmp_path / "notes.txt"
    theirs.write_text("precious")
    with pytest.raises(InputError, match="did not write"):
        with atomic_path(theirs, overwrite=True) as tmp:
            tmp.write_text("new")
    assert theirs.read_text() == "precious"
    with atomic_path(theirs, overwrite=True, owned=True) as tmp:  # a caller that knows it is ours (settings)
        tmp.write_text("new")
    assert theirs.read_text() == "new"


def test_atomic_path_block_that_writes_nothing_is_an_error(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError, match="nothing was written"):
        with atomic_path(target):
            pass
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- write_image


@pytest.mark.parametrize("suffix", [".png", ".tif", ".tiff"])
def test_write_image_rgb_round_trip(tmp_path, rgb, suffix):
    path = write_image(tmp_path / f"out{suffix}", rgb)
    assert path == tmp_path / f"out{suffix}"
    np.testing.assert_array_equal(read_image(path), rgb)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"out{suffix}"]


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_write_image_gray_round_trip(tmp_path, suffix):
    gray = np.random.default_rng(2).integers(0, 256, (30, 20), dtype=np.uint8)
    np.testing.assert_array_equal(read_image(write_image(tmp_path / f"g{suffix}", gray)), gray)


def test_write_image_uint16_tiff_round_trip(tmp_path):
    gray = np.random.default_rng(3).integers(0, 65535, (30, 20), dtype=np.uint16)
    out = read_image(write_image(tmp_path / "g16.tif", gray))
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, gray)


def test_write_image_refuses_existing_file_unless_overwrite(tmp_path, rgb):
    path = write_image(tmp_path / "out.png", rgb)
    with pytest.raises(InputError, match="already exists"):
        write_image(path, 255 - rgb)
    np.testing.assert_array_equal(read_image(path), rgb)
    write_image(path, 255 - rgb, overwrite=True)
    np.testing.assert_array_equal(read_image(path), 255 - rgb)


def test_write_image_unknown_suffix_is_refused_and_leaves_nothing(tmp_path, rgb):
    with pytest.raises(InputError, match="unknown output format"):
        write_image(tmp_path / "out.xyz", rgb)
    assert list(tmp_path.iterdir()) == []


def _write_png16(path: Path, array: np.ndarray) -> None:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB)."""
    import struct
    import zlib

    h, w = array.shape[:2]
    color_type = 2 if array.ndim == 3 else 0
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_read_hand_written_16_bit_gray_png(tmp_path):
    gray = np.full((8, 8), 4000, np.uint16)
    gray[0, 0] = 4001
    _write_png16(tmp_path / "g16.png", gray)
    np.testing.assert_array_equal(read_image(tmp_path / "g16.png"), gray)


def test_16_bit_rgb_png_is_read_at_full_precision_or_refused(tmp_path):
    rgb16 = np.full((8, 8, 3), 4000, np.uint16)
    rgb16[0, 0] = (4001, 300, 65535)
    path = tmp_path / "rgb16.png"
    _write_png16(path, rgb16)
    try:
        out = read_image(path)
    except InputError as err:  # refusing with an explanation is acceptable too
        assert "16" in str(err)
        return
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, rgb16)


# ---------------------------------------------------------------- whole-slide reading


def test_plain_zarr_array_is_refused_saying_what_to_do(tmp_path):
    path = tmp_path / "plain.zarr"
    zarr.create_array(str(path), shape=(16, 16), dtype=np.uint8)
    with pytest.raises(InputError, match="plain Zarr array.*not OME-Zarr") as info:
        read_image(path)
    assert "dask.array.from_zarr" in str(info.value)


def test_folder_that_is_not_zarr_is_refused(tmp_path):
    folder = tmp_path / "images.zarr"
    folder.mkdir()
    (folder / "a.txt").write_text("x")
    with pytest.raises(InputError, match="not a Zarr store.*OME-Zarr store itself"):
        read_image(folder, lazy=True)


def test_bioformats2raw_store_reads_its_first_image(tmp_path, rgb):
    path = tmp_path / "converted.zarr"
    _write_ome_zarr(path / "0", np.moveaxis(rgb, -1, 0), "cyx")
    root = zarr.open_group(str(path), mode="a", zarr_format=2)
    root.attrs["bioformats2raw.layout"] = 3
    np.testing.assert_array_equal(read_image(path), rgb)


def test_chunking_note_bounds():
    from digital_stain.io.images import chunking_note

    assert chunking_note((1024, 1024), (9000, 9000), 1024, "x") is None
    assert chunking_note((256, 4096), (9000, 9000), 1024, "x") is None
    assert chunking_note((100, 100), (100, 100), 1024, "x") is None  # one chunk spans a small image
    assert "smaller than 256" in chunking_note((64, 1024), (9000, 9000), 1024, "x")
    assert "larger than 4096" in chunking_note((8192, 1024), (9000, 9000), 1024, "x")


def test_lazy_read_recuts_tiny_stored_chunks_and_says_so(tmp_path, caplog):
    import logging

    data = np.random.default_rng(4).integers(0, 256, (3, 600, 500), dtype=np.uint8)
    path = tmp_path / "tiny-chunks.ome.zarr"
    _write_ome_zarr(path, data, "cyx")  # 16-px chunks
    notes: list[str] = []
    lazy = read_image(path, lazy=True, chunk=256, notes=notes)
    assert lazy.chunks[0] == (256, 256, 88) and lazy.chunks[1] == (256, 244) and lazy.shape == (600, 500, 3)
    assert "chunks of 16 x 16 px" in notes[0] and "256-px pieces" in notes[0]
    np.testing.assert_array_equal(lazy.compute(), np.moveaxis(data, 0, -1))
    with caplog.at_level(logging.WARNING, logger="digital_stain.io.images"):
        read_image(path, lazy=True, chunk=256)
    assert any("smaller than 256" in r.getMessage() for r in caplog.records)
    assert read_image(path, lazy=True).chunks[0][0] == 16  # without chunk=: as stored


def test_open_source_from_png_numpy_and_dask(tmp_path, rgb):
    from digital_stain.io.images import open_source

    path = tmp_path / "a.png"
    Image.fromarray(rgb).save(path)
    for source in (path, rgb, da.from_array(rgb)):
        opened = open_source(source, chunk=256)
        assert isinstance(opened.array, da.Array) and opened.array.shape == (40, 48, 3)
        np.testing.assert_array_equal(opened.array.compute(), rgb)
    assert open_source(path).name == str(path) and open_source(rgb).name == "numpy array"
    with pytest.raises(InputError, match="cannot stain a dict"):
        open_source({})
