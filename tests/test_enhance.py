"""Tests of digital_stain.core.enhance: the dataset-level histogram-matching enhancer."""

from __future__ import annotations

import shutil
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from PIL import Image

import digital_stain
from digital_stain.core.arrays import InputError
from digital_stain.core.enhance import BINS, Enhancer, bin_index, enhancement_table, histogram, luma_unit, on_input_grid

DATA = Path(digital_stain.__file__).parent / "data"
DARKFIELD_TILES = sorted(DATA.glob("darkfield_*.png"))
STAINED_TILES = sorted(DATA.glob("stained_*.png"))
REC601 = np.array([0.299, 0.587, 0.114])


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def darkfield_tiles() -> list[np.ndarray]:
    assert len(DARKFIELD_TILES) >= 2
    return [_read(p) for p in DARKFIELD_TILES]


@pytest.fixture(scope="module")
def stained_tiles() -> list[np.ndarray]:
    assert len(STAINED_TILES) >= 2
    return [_read(p) for p in STAINED_TILES]


@pytest.fixture(scope="module")
def enhancer(darkfield_tiles, stained_tiles) -> Enhancer:
    return Enhancer.from_arrays(darkfield_tiles, stained_tiles)


@pytest.fixture(scope="module")
def synthetic_enhancer() -> Enhancer:
    """Dark-field mostly dark with some bright cells; bright-field mostly bright."""
    rng = np.random.default_rng(5)
    dark = np.clip(rng.gamma(2.0, 0.08, (64, 64)), 0, 1).astype(np.float32)
    bright = np.clip(1.0 - rng.gamma(2.0, 0.08, (64, 64)), 0, 1).astype(np.float32)
    return Enhancer.from_arrays([dark], [bright])


# ---------------------------------------------------------------- the mapping


def test_bright_darkfield_pixel_becomes_dark_and_dark_pixel_becomes_bright(enhancer):
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    image[:8] = 255  # bright (a cell in dark-field)
    out = enhancer(image)
    assert out.shape == (16, 16)
    bright_in, dark_in = out[0, 0], out[-1, -1]
    assert bright_in < dark_in
    assert bright_in < 0.5 < dark_in
    # the brightest input gets the darkest level of the bright-field data
    assert bright_in == pytest.approx(enhancer.table.min())


def test_output_is_float32_in_unit_range(enhancer, darkfield_tiles):
    out = enhancer(darkfield_tiles[0])
    assert out.dtype == np.float32
    assert out.shape == darkfield_tiles[0].shape[:2]
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out.std() > 0.05  # not a constant image


def test_table_is_float32_unit_range_and_non_increasing(enhancer, synthetic_enhancer):
    for enh in (enhancer, synthetic_enhancer):
        assert enh.table.shape == (BINS,)
        assert enh.table.dtype == np.float32
        assert enh.table.min() >= 0.0 and enh.table.max() <= 1.0
        assert (np.diff(enh.table) <= 0).all()
        assert enh.table[0] > enh.table[-1]


def test_output_is_monotone_non_increasing_in_input_luma(enhancer):
    rng = np.random.default_rng(11)
    rgb = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    out = enhancer(rgb).ravel()
    lum = (rgb.astype(np.float64) @ REC601).ravel()
    order = np.argsort(lum, kind="stable")
    assert (np.diff(out[order]) <= 0).all()
    ramp = np.linspace(0.0, 1.0, 64 * 64, dtype=np.float32).reshape(64, 64)
    assert (np.diff(enhancer(ramp).ravel()) <= 0).all()


def test_enhance_gray_equals_call_on_float_gray(synthetic_enhancer):
    gray = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)
    np.testing.assert_array_equal(synthetic_enhancer.enhance_gray(gray), synthetic_enhancer(gray))


def test_enhancement_table_matches_histograms_by_quantiles():
    # dark-field uniform on the lower half; bright-field uniform on the upper half.
    dark = np.zeros(BINS, np.int64)
    dark[: BINS // 2] = 1
    bright = np.zeros(BINS, np.int64)
    bright[BINS // 2 :] = 1
    table = enhancement_table(dark, bright)
    # the median of the dark-field maps to (about) the median of the bright-field
    assert table[BINS // 4] == pytest.approx(0.75, abs=2.0 / BINS)
    # the top of the dark-field maps to the bottom of the bright-field
    assert table[BINS // 2 - 1] == pytest.approx(0.5, abs=2.0 / BINS)


def test_histogram_and_bin_index():
    gray = np.array([0.0, 0.5, 1.0, 1.0 - 1e-7, 0.25])
    idx = bin_index(gray)
    np.testing.assert_array_equal(idx, [0, BINS // 2, BINS - 1, BINS - 1, BINS // 4])
    counts = histogram(gray)
    assert counts.shape == (BINS,) and counts.sum() == gray.size


def test_enhancer_refuses_wrong_histogram_length():
    with pytest.raises(ValueError, match="bins"):
        Enhancer(np.ones(10), np.ones(BINS))


def test_state_round_trip(enhancer):
    again = Enhancer.from_state(enhancer.state())
    np.testing.assert_array_equal(again.table, enhancer.table)


# ------------------------------------------------------------ dataset level


def test_same_table_for_every_tile(enhancer, darkfield_tiles):
    a, b = darkfield_tiles[0], darkfield_tiles[1]
    # a tile alone, inside a stack, and as a crop give the same values
    stacked = enhancer(np.stack([a, b]))
    assert stacked.shape == (2,) + a.shape[:2]
    np.testing.assert_array_equal(stacked[0], enhancer(a))
    np.testing.assert_array_equal(stacked[1], enhancer(b))
    np.testing.assert_array_equal(enhancer(a[40:120, 10:90]), enhancer(a)[40:120, 10:90])
    # a pixel value means the same output wherever it occurs
    value = a[0, 0]
    tile = np.empty_like(b)
    tile[:] = value
    assert np.all(enhancer(tile) == enhancer(a)[0, 0])


def test_with_darkfield_refits_only_the_darkfield_cdf(enhancer, darkfield_tiles):
    other = (255 - darkfield_tiles[0]).copy()
    refitted = enhancer.with_darkfield(other)
    np.testing.assert_array_equal(refitted.brightfield_counts, enhancer.brightfield_counts)
    assert not np.array_equal(refitted.darkfield_counts, enhancer.darkfield_counts)
    assert refitted.darkfield_counts.sum() == other.shape[0] * other.shape[1]


# ------------------------------------------------------------ numpy vs dask


def _inputs():
    rng = np.random.default_rng(21)
    return {
        "uint8_rgb": rng.integers(0, 256, (40, 36, 3), dtype=np.uint8),
        "uint8_rgba": rng.integers(0, 256, (40, 36, 4), dtype=np.uint8),
        "uint16_gray": rng.integers(0, 4000, (40, 36), dtype=np.uint16),
        "uint16_gray_stack": rng.integers(0, 65535, (3, 40, 36), dtype=np.uint16),
        "uint8_rgb_stack": rng.integers(0, 256, (2, 40, 36, 3), dtype=np.uint8),
        "float_unit_rgb": rng.random((40, 36, 3)).astype(np.float32),
        "float_stretched_gray": (rng.normal(size=(40, 36)) * 50 + 10).astype(np.float64),
        "float_stretched_rgb": (rng.normal(size=(40, 36, 3)) * 3).astype(np.float32),
        "gray_one_channel": rng.integers(0, 256, (40, 36, 1), dtype=np.uint8),
    }


@pytest.mark.parametrize("name", list(_inputs()))
def test_numpy_and_dask_give_identical_results(enhancer, name):
    array = _inputs()[name]
    chunks = tuple(1 if i < array.ndim - 2 - (array.shape[-1] in (1, 3, 4)) else 16 for i in range(array.ndim))
    if array.shape[-1] in (1, 3, 4):
        chunks = chunks[:-1] + (1,)  # split the channels too: the enhancer must rejoin them
    lazy_in = da.from_array(array, chunks=chunks)
    assert lazy_in.npartitions > 1
    expected = enhancer(array)
    lazy = enhancer(lazy_in)
    assert isinstance(lazy, da.Array)
    assert lazy.dtype == np.float32
    assert lazy.shape == expected.shape
    result = lazy.compute()
    assert isinstance(result, np.ndarray)
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, expected)


def test_dask_result_is_lazy_until_computed(enhancer):
    calls = []

    def make_block(block):
        if block.size:  # dask probes functions with empty blocks to infer metadata
            calls.append(block.shape)
        return block

    rng = np.random.default_rng(4)
    source = da.from_array(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), chunks=(16, 16, 3))
    tracked = source.map_blocks(make_block, dtype=np.uint8)
    lazy = enhancer(tracked)
    assert isinstance(lazy, da.Array)
    assert calls == []  # nothing was computed to build the lazy result (uint8 needs no min/max)
    lazy.compute()
    assert len(calls) >= 4


def test_dask_float_with_nan_is_refused(enhancer):
    image = np.full((16, 16), 0.5, np.float32)
    image[3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        enhancer(image)
    with pytest.raises(InputError, match="NaN"):
        enhancer(da.from_array(image, chunks=8))


def test_from_arrays_with_dask_equals_with_numpy(darkfield_tiles, stained_tiles):
    eager = Enhancer.from_arrays(darkfield_tiles, stained_tiles)
    lazy = Enhancer.from_arrays(
        [da.from_array(t, chunks=(64, 100, 1)) for t in darkfield_tiles],
        [da.from_array(t, chunks=(100, 64, 3)) for t in stained_tiles],
    )
    np.testing.assert_array_equal(lazy.darkfield_counts, eager.darkfield_counts)
    np.testing.assert_array_equal(lazy.brightfield_counts, eager.brightfield_counts)
    np.testing.assert_array_equal(lazy.table, eager.table)
    mixed = Enhancer.from_arrays([darkfield_tiles[0], da.from_array(darkfield_tiles[1], chunks=50), darkfield_tiles[2]], stained_tiles)
    np.testing.assert_array_equal(mixed.table, eager.table)


def test_from_arrays_counts_every_pixel(darkfield_tiles, stained_tiles):
    enh = Enhancer.from_arrays(darkfield_tiles, stained_tiles)
    assert enh.darkfield_counts.sum() == sum(t.shape[0] * t.shape[1] for t in darkfield_tiles)
    assert enh.brightfield_counts.sum() == sum(t.shape[0] * t.shape[1] for t in stained_tiles)


def test_from_arrays_with_nothing_is_refused():
    with pytest.raises(InputError):
        Enhancer.from_arrays([], [np.zeros((8, 8), np.uint8)])


# ---------------------------------------------------------------- from_folders


@pytest.fixture
def sample_folders(tmp_path) -> tuple[Path, Path]:
    dark, stained = tmp_path / "darkfield", tmp_path / "stained"
    dark.mkdir()
    stained.mkdir()
    for p in DARKFIELD_TILES:
        shutil.copy(p, dark / p.name)
    for p in STAINED_TILES:
        shutil.copy(p, stained / p.name)
    return dark, stained


def test_from_folders_on_shipped_tiles(sample_folders, enhancer, darkfield_tiles):
    dark, stained = sample_folders
    enh = Enhancer.from_folders(dark, stained)
    np.testing.assert_array_equal(enh.table, enhancer.table)
    out = enh(darkfield_tiles[0])
    assert out.shape == (256, 256) and out.dtype == np.float32
    # dark-field background is dark, so most of the enhanced tile is bright
    assert np.median(out) > 0.5


def test_from_folders_skips_unreadable_files(sample_folders, enhancer):
    dark, stained = sample_folders
    (dark / "broken.png").write_text("not an image")
    (dark / "notes.txt").write_text("ignored")
    enh = Enhancer.from_folders(dark, stained)
    np.testing.assert_array_equal(enh.table, enhancer.table)


def test_from_folders_refuses_folder_without_images(tmp_path, sample_folders):
    _, stained = sample_folders
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match="no readable image"):
        Enhancer.from_folders(empty, stained)
    only_broken = tmp_path / "broken"
    only_broken.mkdir()
    (only_broken / "a.png").write_bytes(b"garbage")
    with pytest.raises(InputError, match="no readable image"):
        Enhancer.from_folders(only_broken, stained)


def test_from_folders_refuses_missing_folder(tmp_path, sample_folders):
    _, stained = sample_folders
    with pytest.raises(InputError):
        Enhancer.from_folders(tmp_path / "does-not-exist", stained)


# ----------------------------------------------------------- on_input_grid


def test_uint8_rgb_equals_pil_l_gray_levels_fed_as_float(enhancer):
    rng = np.random.default_rng(99)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    exact = rgb.astype(np.float64) @ REC601
    # keep away from rounding ties (PIL's fixed-point and float32 may break those differently)
    frac = exact - np.floor(exact)
    rgb[np.abs(frac - 0.5) < 0.01] = (10, 20, 30)
    exact = rgb.astype(np.float64) @ REC601
    levels = np.round(exact)
    pil_levels = np.asarray(Image.fromarray(rgb).convert("L"))
    np.testing.assert_array_equal(pil_levels, levels)  # the reference really is PIL's 'L'
    from_rgb = enhancer(rgb)
    from_float = enhancer((pil_levels / 255.0).astype(np.float64))
    np.testing.assert_array_equal(from_rgb, from_float)
    # and the rounding matters: unrounded luma would give other values
    unrounded = enhancer((exact / 255.0).astype(np.float32))
    assert (unrounded != from_rgb).sum() > 0


def test_uint8_rgb_on_shipped_tile_equals_pil_l(enhancer, darkfield_tiles):
    tile = darkfield_tiles[0]
    exact = tile.astype(np.float64) @ REC601
    pil_levels = np.asarray(Image.fromarray(tile).convert("L")).astype(np.float64)
    safe = np.abs(exact - np.floor(exact) - 0.5) >= 0.01
    assert safe.mean() > 0.9
    np.testing.assert_array_equal(enhancer(tile)[safe], enhancer(pil_levels / 255.0)[safe])


def test_on_input_grid_rounds_only_integer_types():
    gray = np.array([0.1, 0.5, 0.9], np.float32)
    np.testing.assert_allclose(on_input_grid(gray, np.uint8), np.round(gray * 255) / 255)
    np.testing.assert_allclose(on_input_grid(gray, np.uint16), np.round(gray * 65535) / 65535)
    np.testing.assert_array_equal(on_input_grid(gray, np.float32), gray)


def test_luma_unit_of_gray_uint16_keeps_full_precision():
    image = np.zeros((8, 8), np.uint16)
    image[0, 0] = 4000
    image[0, 1] = 4001
    unit = luma_unit(image)
    assert unit[0, 0] == pytest.approx(4000 / 65535, rel=1e-6)
    assert unit[0, 1] > unit[0, 0]
