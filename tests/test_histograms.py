"""digital_stain.core.histograms: what an input looks like, measured whole (numpy, dask, folders, samples of slides)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from digital_stain.core.arrays import InputError, ValueScaling, scaling_of, value_scaling
from digital_stain.core.enhance import BINS, Enhancer, bin_index, histogram, luma_unit
from digital_stain.core.histograms import (
    SAMPLE_GRID, Distribution, arrays_distribution, folder_distribution, measure, sample_boxes,
)


def test_luma_counts_are_the_enhancers_and_channels_are_each_channel(darkfield_tile):
    measured = measure(darkfield_tile, value_scaling(darkfield_tile))
    assert measured.pixels == 256 * 256
    np.testing.assert_array_equal(measured.luma, histogram(luma_unit(darkfield_tile)))
    for c in range(3):
        expected = np.bincount(bin_index(darkfield_tile[..., c] / np.float32(255)).ravel(), minlength=BINS)
        np.testing.assert_array_equal(measured.channels[c], expected)


def test_gray_input_has_its_gray_in_every_channel(darkfield_tile):
    gray = darkfield_tile[..., 1].astype(np.uint16) * 257
    measured = measure(gray, value_scaling(gray))
    assert all(np.array_equal(measured.channels[c], measured.luma) for c in range(3))


def test_numpy_dask_stacks_and_pieces_pool_to_the_same_counts(darkfield_tile, monkeypatch):
    import digital_stain.core.histograms as histograms

    stack = np.stack([darkfield_tile, darkfield_tile[::-1]])
    scaling = value_scaling(stack)
    whole = measure(stack, scaling)
    one, two = measure(stack[0], scaling), measure(stack[1], scaling)
    pooled = one + two
    assert whole.same_as(pooled) and whole.pixels == 2 * 256 * 256
    lazy = measure(da.from_array(stack, chunks=(1, 100, 90, 3)), scaling)
    assert lazy.same_as(whole)
    monkeypatch.setattr(histograms, "PIECE", 48)  # regions read in small pieces: the same counts
    assert measure(stack, scaling).same_as(whole)


def test_large_dask_inputs_are_sampled_on_crops_spread_over_the_plane():
    boxes = sample_boxes(100, 120, 100 * 120)
    assert boxes == [(0, 0, 100, 120)]
    boxes = sample_boxes(4000, 3000, 640_000)
    assert len(boxes) == SAMPLE_GRID**2 and {b[2] for b in boxes} == {100}
    assert min(b[0] for b in boxes) == 0 and max(b[0] + b[2] for b in boxes) == 4000  # corner to corner
    assert min(b[1] for b in boxes) == 0 and max(b[1] + b[3] for b in boxes) == 3000

    rng = np.random.default_rng(0)
    image = da.from_array(rng.integers(0, 256, (2000, 1000, 3), dtype=np.uint8), chunks=512)
    sampled = measure(image, scaling_of(image), max_pixels=64 * 50 * 50)
    assert sampled.pixels == 64 * 50 * 50
    whole = measure(image, scaling_of(image), max_pixels=None)
    assert whole.pixels == 2_000_000
    # a sample of uniform noise has the same distribution (the CDFs agree to a few percent)
    cdf = lambda c: np.cumsum(c) / c.sum()  # noqa: E731
    assert np.abs(cdf(sampled.luma) - cdf(whole.luma)).max() < 0.05
    assert isinstance(measure(np.asarray(image), scaling_of(image), max_pixels=100).pixels, int)
    assert measure(np.asarray(image), scaling_of(image), max_pixels=100).pixels == 2_000_000  # numpy: always whole


def test_a_stack_on_dask_is_sampled_plane_by_plane():
    image = da.zeros((20, 300, 300), dtype=np.uint8, chunks=(1, 300, 300))
    sampled = measure(image, ValueScaling(0.0, 255.0, "uint8"), max_pixels=8 * 64 * 30 * 30)
    assert sampled.pixels == 8 * 64 * 30 * 30 and sampled.luma[0] == sampled.pixels


def test_as_dict_round_trips_compactly(darkfield_tile):
    measured = measure(darkfield_tile, value_scaling(darkfield_tile))
    data = measured.as_dict()
    assert len(str(data)) < 4000  # a few kB in store attributes, not 4 x 4096 numbers
    assert Distribution.from_dict(data).same_as(measured)
    luma_only = Distribution(measured.luma)
    assert Distribution.from_dict(luma_only.as_dict()).same_as(luma_only)
    assert not luma_only.same_as(measured) and not measured.same_as(None)
    with pytest.raises(ValueError, match="bins"):
        Distribution.from_dict({**data, "bins": 256})


def test_bad_histograms_are_refused():
    with pytest.raises(ValueError, match="4096"):
        Distribution(np.zeros(10))
    with pytest.raises(ValueError, match="non-negative"):
        Distribution(np.full(BINS, -1))
    with pytest.raises(ValueError, match="channel"):
        Distribution(np.ones(BINS), np.ones((2, BINS)))


def test_folders_pool_their_readable_images(darkfield_dir, tmp_path):
    (darkfield_dir / "broken.png").write_bytes(b"not a png")
    measured, count = folder_distribution(darkfield_dir)
    assert count == 3 and measured.pixels == 3 * 256 * 256
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no readable image"):
        folder_distribution(empty)


def test_enhancer_fits_record_the_channels(darkfield_dir, hne_dir, darkfield_tile):
    fitted = Enhancer.from_folders(darkfield_dir, hne_dir)
    measured, _ = folder_distribution(darkfield_dir)
    assert fitted.darkfield.same_as(measured) and fitted.student_inputs is fitted.darkfield
    from_arrays = Enhancer.from_arrays([darkfield_tile], [darkfield_tile])
    assert from_arrays.darkfield.same_as(arrays_distribution([darkfield_tile]))
    # refitting the dark-field keeps what the student was trained on
    refitted = fitted.with_darkfield(darkfield_tile * 4)
    assert refitted.student_inputs.same_as(fitted.darkfield) and not refitted.darkfield.same_as(fitted.darkfield)
    restored = Enhancer.from_state(refitted.state())
    assert restored.darkfield.same_as(refitted.darkfield) and restored.student_inputs.same_as(fitted.darkfield)
    # a model file from before the channels were recorded: luma only
    old = Enhancer.from_state({k: v for k, v in fitted.state().items() if k != "darkfield_channel_counts"})
    assert old.darkfield.channels is None and "darkfield_channel_counts" not in old.state()
