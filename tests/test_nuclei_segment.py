"""digital_stain.nuclei.segment: H&E nuclei as instance labels (colour deconvolution, threshold, watershed)."""

from __future__ import annotations

import numpy as np
import pytest

from digital_stain.core.arrays import InputError
from digital_stain.nuclei.segment import NucleiSettings, segment_nuclei

PINK = np.array([0.92, 0.70, 0.85])  # eosin background
PURPLE = np.array([0.30, 0.20, 0.55])  # hematoxylin nuclei


def he_image(centres, radius=7.0, shape=(128, 160), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic H&E: purple disks on pink, with noise; returns (RGB float, true instance labels)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    truth = np.zeros(shape, np.int32)
    for index, (cy, cx) in enumerate(centres, start=1):
        truth[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = index
    rgb = np.where(truth[..., None] > 0, PURPLE, PINK)
    rgb = rgb + np.random.default_rng(seed).normal(0, 0.02, rgb.shape)
    return np.clip(rgb, 0, 1).astype(np.float32), truth


def test_separate_nuclei_are_found_one_label_each():
    centres = [(20, 20), (20, 70), (60, 40), (100, 120), (90, 20), (40, 130)]
    rgb, truth = he_image(centres)
    labels = segment_nuclei(rgb)
    assert labels.dtype == np.uint16 and labels.shape == truth.shape
    assert labels.max() == len(centres)
    for index in range(1, len(centres) + 1):  # each true nucleus is covered by one label, mostly
        found = labels[truth == index]
        assert np.mean(found == np.bincount(found).argmax()) > 0.9 and np.bincount(found).argmax() > 0
    overlap = np.logical_and(labels > 0, truth > 0).sum() / np.logical_or(labels > 0, truth > 0).sum()
    assert overlap > 0.85


def test_two_touching_nuclei_are_split_by_the_watershed():
    rgb, _ = he_image([(64, 70), (64, 82)])  # radius 7, centres 12 apart: one blob with a waist
    assert segment_nuclei(rgb).max() == 2
    assert segment_nuclei(rgb, NucleiSettings(min_distance=20)).max() == 1  # seeds kept further apart: one


def test_uint8_input_equals_float_input():
    rgb, _ = he_image([(30, 30), (80, 100)])
    as_uint8 = np.round(rgb * 255).astype(np.uint8)
    np.testing.assert_array_equal(segment_nuclei(as_uint8), segment_nuclei(as_uint8.astype(np.float32) / 255))


def test_specks_under_min_area_are_dropped():
    rgb, _ = he_image([(30, 30), (90, 120)], radius=1.5)  # specks of about 13 px once smoothed and thresholded
    assert segment_nuclei(rgb, NucleiSettings(min_area=20)).max() == 0
    assert segment_nuclei(rgb, NucleiSettings(min_area=5)).max() == 2


def test_a_flat_image_has_no_nuclei():
    assert segment_nuclei(np.full((64, 64, 3), 0.8, np.float32)).max() == 0


def test_a_fixed_threshold_finds_only_what_is_denser():
    rgb, _ = he_image([(30, 30), (90, 120)])
    assert segment_nuclei(rgb, NucleiSettings(threshold=10.0)).max() == 0  # no H&E is that dense


@pytest.mark.parametrize("image, words", [
    (np.zeros((64, 64), np.float32), "RGB H&E plane"),
    (np.zeros((64, 64, 4), np.float32), "RGB H&E plane"),
    (np.zeros((64, 64, 3), np.int32), "dtype int32"),
])
def test_what_is_not_an_rgb_plane_is_refused(image, words):
    with pytest.raises(InputError, match=words):
        segment_nuclei(image)


@pytest.mark.parametrize("bad", [dict(threshold="mean"), dict(min_distance=0), dict(sigma=-1.0)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(InputError):
        NucleiSettings(**bad)
