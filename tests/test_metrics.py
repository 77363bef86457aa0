"""Reference-free stain-style measure: distances between colour distributions."""

import numpy as np
import pytest
from PIL import Image

from digital_stain._sample_data import sample_paths
from digital_stain.quality.metrics import lab_pixels, sliced_wasserstein, stain_style_distance


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


# -- scores against a reference ------------------------------------------------------------


from scipy import ndimage  # noqa: E402

from digital_stain.quality.metrics import (  # noqa: E402
    checkerboard,
    dice,
    hematoxylin,
    nuclei_dice,
    nuclei_mask,
    psnr,
    ssim,
    structure_score,
)


@pytest.fixture
def hne_tile():
    return np.asarray(Image.open(sample_paths("stained")[0]).convert("RGB"))


def test_psnr_known_value_and_identity():
    reference = np.full((8, 8, 3), 100, np.uint8)
    off_by_ten = reference + np.uint8(10)  # mse = (10/255)^2
    assert psnr(off_by_ten, reference) == pytest.approx(20 * np.log10(255 / 10), rel=1e-9)
    assert psnr(reference, reference) == float("inf")
    assert psnr(off_by_ten / 255.0, reference) == pytest.approx(psnr(off_by_ten, reference))
    assert psnr(off_by_ten.astype(np.uint16) * 257, reference) == pytest.approx(psnr(off_by_ten, reference))


def test_ssim_is_one_for_identity_and_drops_with_blur_and_noise(hne_tile):
    assert ssim(hne_tile, hne_tile) == pytest.approx(1.0)
    blurred = ndimage.gaussian_filter(hne_tile.astype(float), (2, 2, 0)).astype(np.uint8)
    noisy = np.clip(hne_tile + np.random.default_rng(0).normal(0, 40, hne_tile.shape), 0, 255).astype(np.uint8)
    assert 0.3 < ssim(blurred, hne_tile) < 0.9
    assert ssim(noisy, hne_tile) < 0.5
    slightly = ndimage.gaussian_filter(hne_tile.astype(float), (0.7, 0.7, 0)).astype(np.uint8)
    assert ssim(slightly, hne_tile) > ssim(blurred, hne_tile)
    with pytest.raises(ValueError, match="same size"):
        ssim(hne_tile[:100], hne_tile)


def test_hematoxylin_is_high_on_purple_nuclei_and_low_on_pink_stroma():
    purple = np.array([[[80, 50, 140]]], np.uint8)  # hematoxylin-like
    pink = np.array([[[235, 160, 200]]], np.uint8)  # eosin-like
    assert hematoxylin(purple)[0, 0] > hematoxylin(pink)[0, 0] + 0.05


def test_nuclei_dice_is_one_on_itself_and_falls_when_nuclei_move(hne_tile):
    mask = nuclei_mask(hne_tile)
    assert 0.01 < mask.mean() < 0.9  # a real tile has nuclei and background
    assert nuclei_dice(hne_tile, hne_tile) == 1.0
    shifted = np.roll(hne_tile, (9, 9), axis=(0, 1))
    assert nuclei_dice(shifted, hne_tile) < 0.8
    assert dice(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0


# -- structure without a reference --------------------------------------------------------------


def test_structure_score_rewards_kept_edges_ignores_brightness_and_flags_inversion(hne_tile):
    gray = hne_tile.astype(np.float64) @ [0.299, 0.587, 0.114] / 255.0
    assert structure_score(hne_tile, gray) == pytest.approx(1.0, abs=1e-6)
    brighter = np.clip(hne_tile * 0.7 + 60, 0, 255).astype(np.uint8)  # a linear remap keeps every edge
    assert structure_score(brighter, gray) > 0.99
    assert structure_score(255 - hne_tile, gray) < -0.99  # background and cells swapped (the CycleGAN failure)
    moved = np.roll(hne_tile, (5, 5), axis=(0, 1))
    assert structure_score(moved, gray) < 0.5


# -- artefacts ----------------------------------------------------------------------------------


def test_checkerboard_is_low_on_real_hne_and_finds_a_faint_two_or_four_pixel_grid(hne_tile):
    clean = checkerboard(hne_tile)
    assert clean[2] < 30 and clean[4] < 3
    rows, cols = np.indices(hne_tile.shape[:2])
    def plus(pattern):  # 3 gray levels: invisible at 1:1, as a student's grid is until one zooms in
        return np.clip(hne_tile + 3.0 * pattern[..., None], 0, 255).astype(np.uint8)
    two = checkerboard(plus((rows + cols) % 2))
    assert two[2] > 100 * clean[2] and two[4] == pytest.approx(clean[4], rel=0.01)
    four = checkerboard(plus((cols % 4 < 2) + (rows % 4 < 2)))
    assert four[4] > 100 * clean[4] and four[2] == pytest.approx(clean[2], rel=0.01)
    assert checkerboard(hne_tile.astype(np.float32) / 255) == pytest.approx(clean, rel=1e-3)  # float in [0, 1] alike


def test_checkerboard_refuses_what_it_cannot_measure(hne_tile):
    with pytest.raises(ValueError, match="at least 32 x 32"):
        checkerboard(hne_tile[:20, :20])
    with pytest.raises(ValueError, match=r"\(Y, X, 3\) RGB"):
        checkerboard(hne_tile[..., :2])


@pytest.mark.parametrize("size", [1, 2, 999, 20_000])
def test_sliced_wasserstein_equals_its_definition_with_np_quantile(size):
    """The sorted-projection quantiles are numpy's linear-method quantiles, not an approximation of them."""
    rng = np.random.default_rng(size)
    cloud, reference = rng.normal(size=(size, 3)), rng.normal(0.3, 1.2, size=(5_000, 3))
    directions = np.random.default_rng(7).normal(size=(128, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    quantiles = np.linspace(0.0, 1.0, 1001)
    by_definition = np.abs(np.quantile(cloud @ directions.T, quantiles, axis=0)
                           - np.quantile(reference @ directions.T, quantiles, axis=0)).mean()
    assert sliced_wasserstein(cloud, reference, seed=7) == pytest.approx(by_definition, rel=1e-12, abs=1e-12)


def test_aggregated_jaccard_on_known_cases():
    from digital_stain.quality.metrics import aggregated_jaccard

    truth = np.zeros((20, 20), np.int32)
    truth[2:6, 2:6] = 1  # 16 px
    truth[10:14, 10:14] = 7  # 16 px
    assert aggregated_jaccard(truth, truth) == 1.0
    assert aggregated_jaccard(truth * 3, truth) == 1.0  # names do not matter
    missed = np.where(truth == 7, 0, truth)
    assert aggregated_jaccard(missed, truth) == pytest.approx(16 / 32)  # the missed nucleus' area is union
    invented = truth.copy()
    invented[16:18, 16:18] = 9  # 4 px more, matched to nothing
    assert aggregated_jaccard(invented, truth) == pytest.approx(32 / 36)
    merged = np.where(truth > 0, 1, 0)  # both true nuclei matched to one predicted: 16 / 48 + 16 / 48
    assert aggregated_jaccard(merged, truth) == pytest.approx(32 / 64)
    assert aggregated_jaccard(np.zeros_like(truth), np.zeros_like(truth)) == 1.0
    assert aggregated_jaccard(np.zeros_like(truth), truth) == 0.0
