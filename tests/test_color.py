"""Tests of digital_stain.core.color: torch Lab conversions against scikit-image, luma."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from skimage import color as skcolor

from digital_stain.core.color import LUMA_WEIGHTS, gray_to_lightness, lab_to_rgb, luma, luma_torch, rgb_to_lab

# Colours at the corners of the RGB cube, grays, and values on both sides of the
# sRGB linear/gamma threshold (0.04045) and of the Lab cube-root threshold.
EDGE_COLOURS = np.array(
    [
        [0.0, 0.0, 0.0],
        [1.0, 1.0, 1.0],
        [1.0, 0.0, 0.0],
        [0.0, 1.0, 0.0],
        [0.0, 0.0, 1.0],
        [0.0, 1.0, 1.0],
        [1.0, 0.0, 1.0],
        [1.0, 1.0, 0.0],
        [0.5, 0.5, 0.5],
        [0.04045, 0.04045, 0.04045],
        [0.0404, 0.0405, 0.0406],
        [0.08, 0.09, 0.1],  # Y just around (6/29)^3
        [1e-6, 0.0, 1e-6],
        [1.0, 1.0 - 1e-6, 1.0],
        [0.2, 0.6, 0.9],
    ],
    dtype=np.float64,
)


def _to_torch(hwc: np.ndarray, dtype=torch.float64) -> torch.Tensor:
    """(H, W, 3) numpy -> (1, 3, H, W) torch."""
    return torch.from_numpy(np.ascontiguousarray(hwc)).to(dtype).permute(2, 0, 1).unsqueeze(0)


def _to_numpy(nchw: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) torch -> (H, W, 3) numpy float64."""
    return nchw.detach()[0].permute(1, 2, 0).double().numpy()


@pytest.fixture
def random_rgb() -> np.ndarray:
    rng = np.random.default_rng(1234)
    return rng.random((17, 23, 3))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rgb_to_lab_matches_skimage_on_random_colours(random_rgb, dtype):
    expected = skcolor.rgb2lab(random_rgb)
    got = _to_numpy(rgb_to_lab(_to_torch(random_rgb, dtype)))
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)


def test_rgb_to_lab_matches_skimage_on_edge_colours():
    rgb = EDGE_COLOURS[None]  # (1, K, 3)
    expected = skcolor.rgb2lab(rgb)
    got = _to_numpy(rgb_to_lab(_to_torch(rgb)))
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)
    # sanity on the reference values themselves: black is L=0, white is L=100
    assert got[0, 0, 0] == pytest.approx(0.0, abs=1e-6)
    assert got[0, 1, 0] == pytest.approx(100.0, abs=1e-3)


def test_rgb_to_lab_shape_and_batch_independence(random_rgb):
    x = _to_torch(random_rgb)
    batch = torch.cat([x, x.flip(-1)], dim=0)
    lab = rgb_to_lab(batch)
    assert lab.shape == batch.shape
    torch.testing.assert_close(lab[0:1], rgb_to_lab(x))
    torch.testing.assert_close(lab[1:2], rgb_to_lab(x.flip(-1)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lab_to_rgb_matches_skimage_on_in_gamut_colours(random_rgb, dtype):
    lab = skcolor.rgb2lab(random_rgb)
    expected = skcolor.lab2rgb(lab)
    got = _to_numpy(lab_to_rgb(_to_torch(lab, dtype)))
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)


def test_lab_to_rgb_matches_skimage_on_random_lab_including_out_of_gamut():
    rng = np.random.default_rng(7)
    lab = np.stack(
        [rng.uniform(0, 100, (31, 29)), rng.uniform(-110, 110, (31, 29)), rng.uniform(-110, 110, (31, 29))], axis=-1
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skimage warns about negative Z values, which it clips
        expected = skcolor.lab2rgb(lab)
    got = _to_numpy(lab_to_rgb(_to_torch(lab)))
    assert got.min() >= 0.0 and got.max() <= 1.0
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)
    # the test exercises the clipping branch, not only in-gamut colours
    assert ((expected == 0.0) | (expected == 1.0)).any()


def test_lab_to_rgb_matches_skimage_on_edge_colours():
    lab = skcolor.rgb2lab(EDGE_COLOURS[None])
    expected = skcolor.lab2rgb(lab)
    got = _to_numpy(lab_to_rgb(_to_torch(lab)))
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_rgb_lab_round_trip(random_rgb, dtype, atol):
    rgb = np.concatenate([random_rgb.reshape(1, -1, 3), EDGE_COLOURS[None]], axis=1)
    x = _to_torch(rgb, dtype)
    back = lab_to_rgb(rgb_to_lab(x))
    assert back.dtype == dtype
    torch.testing.assert_close(back, x, atol=atol, rtol=0)


def test_rgb_to_lab_clamps_out_of_range_input():
    x = torch.tensor([[-0.5, 0.3, 1.7]], dtype=torch.float64).view(1, 3, 1, 1)
    clamped = torch.tensor([[0.0, 0.3, 1.0]], dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(rgb_to_lab(x), rgb_to_lab(clamped))


def test_rgb_to_lab_backward_gives_finite_grads_including_black_and_white(random_rgb):
    rgb = np.concatenate([random_rgb.reshape(1, -1, 3), EDGE_COLOURS[None]], axis=1)
    for dtype in (torch.float32, torch.float64):
        x = _to_torch(rgb, dtype).clone().requires_grad_(True)
        lab = rgb_to_lab(x)
        (lab * torch.tensor([1.0, 0.3, -0.7], dtype=dtype).view(1, 3, 1, 1)).sum().backward()
        assert x.grad is not None
        assert torch.isfinite(x.grad).all()
        assert x.grad.abs().sum() > 0


def test_rgb_to_lab_grad_at_pure_black_and_white_is_finite():
    for value in (0.0, 1.0):
        x = torch.full((1, 3, 2, 2), value, dtype=torch.float32, requires_grad=True)
        rgb_to_lab(x).sum().backward()
        assert torch.isfinite(x.grad).all(), value


def test_lab_to_rgb_backward_gives_finite_grads_including_black_and_white(random_rgb):
    rgb = np.concatenate([random_rgb.reshape(1, -1, 3), EDGE_COLOURS[None]], axis=1)
    lab = rgb_to_lab(_to_torch(rgb, torch.float32)).detach().requires_grad_(True)
    lab_to_rgb(lab).sum().backward()
    assert torch.isfinite(lab.grad).all()
    assert lab.grad.abs().sum() > 0
    for l_value in (0.0, 100.0):
        pure = torch.zeros(1, 3, 2, 2)
        pure[:, 0] = l_value
        pure.requires_grad_(True)
        lab_to_rgb(pure).sum().backward()
        assert torch.isfinite(pure.grad).all(), l_value


def test_lab_conversions_pass_gradcheck_away_from_kinks():
    rng = np.random.default_rng(3)
    # interior colours, away from the clamps and the piecewise thresholds
    rgb = torch.from_numpy(rng.uniform(0.2, 0.8, (1, 3, 2, 3))).requires_grad_(True)
    assert torch.autograd.gradcheck(rgb_to_lab, (rgb,), eps=1e-6, atol=1e-4)
    lab = rgb_to_lab(rgb).detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lab_to_rgb, (lab,), eps=1e-6, atol=1e-4)
    gray = torch.from_numpy(rng.uniform(0.1, 0.9, (1, 1, 2, 3))).requires_grad_(True)
    assert torch.autograd.gradcheck(gray_to_lightness, (gray,), eps=1e-6, atol=1e-4)


def test_gray_to_lightness_equals_skimage_lightness_of_neutral_colour():
    g = np.concatenate([np.linspace(0.0, 1.0, 257), [0.04045, 0.0404, 0.0405, 0.0086, 1e-5]])
    expected = skcolor.rgb2lab(np.repeat(g[None, :, None], 3, axis=-1))[0, :, 0]
    got = gray_to_lightness(torch.from_numpy(g).view(1, 1, 1, -1))
    assert got.shape == (1, 1, 1, g.size)
    np.testing.assert_allclose(got.view(-1).numpy(), expected, atol=1e-3, rtol=0)


def test_gray_to_lightness_equals_rgb_to_lab_lightness_and_is_monotone():
    g = torch.linspace(0.0, 1.0, 101, dtype=torch.float64).view(1, 1, 1, -1)
    lightness = gray_to_lightness(g)
    torch.testing.assert_close(lightness, rgb_to_lab(g.expand(1, 3, 1, -1))[:, 0:1], atol=1e-6, rtol=0)
    assert (lightness.diff(dim=-1) > 0).all()
    assert lightness[..., 0].item() == pytest.approx(0.0, abs=1e-9)
    assert lightness[..., -1].item() == pytest.approx(100.0, abs=1e-6)


def test_gray_to_lightness_clamps_and_backward_is_finite():
    g = torch.tensor([-0.2, 0.0, 0.5, 1.0, 1.3]).view(1, 1, 1, -1).requires_grad_(True)
    lightness = gray_to_lightness(g)
    assert lightness[..., 0].item() == pytest.approx(0.0, abs=1e-5)
    assert lightness[..., -1].item() == pytest.approx(100.0, abs=1e-3)
    lightness.sum().backward()
    assert torch.isfinite(g.grad).all()


def test_luma_uses_rec601_weights_and_keeps_scale():
    assert sum(LUMA_WEIGHTS) == pytest.approx(1.0)
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [200, 200, 200]]], dtype=np.uint8)
    got = luma(rgb)
    assert got.dtype == np.float32
    assert got.shape == (1, 4)
    np.testing.assert_allclose(got[0], [0.299 * 255, 0.587 * 255, 0.114 * 255, 200.0], rtol=1e-6)


def test_luma_and_luma_torch_agree(random_rgb):
    np_luma = luma(random_rgb)
    torch_luma = luma_torch(_to_torch(random_rgb))
    assert torch_luma.shape == (1, 1) + random_rgb.shape[:2]
    assert torch_luma.dtype == torch.float64
    np.testing.assert_allclose(torch_luma[0, 0].numpy(), np_luma, atol=1e-6, rtol=0)
    # batched input: each image's luma separately
    batch = torch.stack([_to_torch(random_rgb)[0], _to_torch(random_rgb[::-1].copy())[0]])
    out = luma_torch(batch)
    np.testing.assert_allclose(out[1, 0].numpy(), luma(random_rgb[::-1]), atol=1e-6, rtol=0)
