"""Reference-free stain-style measure: distances between colour distributions."""

import numpy as np
import pytest
from PIL import Image

from digital_stain._sample_data import sample_paths
from digital_stain.metrics import lab_pixels, sliced_wasserstein, stain_style_distance


def test_sliced_wasserstein_zero_for_same_cloud_and_grows_with_shift():
    rng = np.random.default_rng(0)
    cloud = rng.normal(size=(5000, 3))
    assert sliced_wasserstein(cloud, cloud) == pytest.approx(0.0, abs=1e-9)
    near = sliced_wasserstein(cloud, cloud + [0.5, 0, 0])
    far = sliced_wasserstein(cloud, cloud + [2.0, 0, 0])
    assert 0 < near < far
    # a pure shift along one axis: the mean |projection| of the shift over random unit directions (~0.5 per unit in 3-D)
    assert far / near == pytest.approx(4.0, rel=0.05)


def test_lab_pixels_accepts_uint8_and_float_alike():
    rgb = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_allclose(lab_pixels(rgb), lab_pixels(rgb / 255.0), atol=1e-3)
    assert lab_pixels(rgb, max_pixels=100).shape == (100, 3)


def test_real_hne_is_closer_to_real_hne_than_its_gray_is():
    tiles = [np.asarray(Image.open(p).convert("RGB")) for p in sample_paths("stained")]
    reference, others = np.stack(tiles[:1]), np.stack(tiles[1:])
    gray = np.repeat((others.astype(np.float32) @ [0.299, 0.587, 0.114])[..., None], 3, -1).astype(np.uint8)
    assert stain_style_distance(others, reference) < 0.5 * stain_style_distance(gray, reference)
