"""The pure parts of ``benchmarks/lta_synthetic.py``: deformations, warping, end-point error, sign convention."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digital_stain.core.nets.registration import warp

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lta_synthetic.py"


@pytest.fixture(scope="module")
def lta():
    spec = importlib.util.spec_from_file_location("lta_synthetic", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def he_tile(sample_dir) -> np.ndarray:
    return np.asarray(Image.open(sample_dir / "stained_0_0.png").convert("RGB"))


def test_warp_image_samples_at_identity_plus_displacement(lta, he_tile):
    """A constant ψ = (3, -2) gives y[r, c] = aligned[r - 2, c + 3]: y(p) = aligned(p + ψ), as ``warp`` samples."""
    psi = np.zeros((2, *he_tile.shape[:2]), np.float32)
    psi[0], psi[1] = 3.0, -2.0
    moved = lta.warp_image(he_tile, psi)
    assert moved.dtype == np.uint8 and moved.shape == he_tile.shape
    assert np.array_equal(moved[2:, :-3], he_tile[:-2, 3:])
    assert np.array_equal(lta.warp_image(he_tile, np.zeros_like(psi)), he_tile)


def test_rigid_displacement(lta):
    shift = lta.rigid_displacement((32, 48), (1.5, -2.0), 0.0)
    assert shift.shape == (2, 32, 48) and np.allclose(shift[0], 1.5) and np.allclose(shift[1], -2.0)
    # 90 degrees about the centre (16, 16): (x, y) -> (16 - (y - 16), 16 + (x - 16))
    turn = lta.rigid_displacement((33, 33), (0.0, 0.0), 90.0)
    assert np.allclose(turn[:, 16, 16], 0, atol=1e-5)
    y, x = 16, 26
    assert np.allclose([x + turn[0, y, x], y + turn[1, y, x]], [16, 26], atol=1e-4)
    small = lta.rigid_displacement((256, 256), (0.0, 0.0), 2.0)  # 2 degrees: about 6.3 px at the corners
    assert 6.0 < np.sqrt((small**2).sum(0)).max() < 6.5


def test_smooth_deformation_is_bounded_smooth_and_reproducible(lta):
    field = lta.smooth_deformation((128, 96), np.random.default_rng(3), 4.0)
    assert field.shape == (2, 128, 96) and field.dtype == np.float32
    length = np.sqrt((field**2).sum(0))
    assert length.max() <= 4.0 + 1e-5 and length.mean() > 1.0
    assert np.abs(np.diff(field, axis=1)).max() < 0.5 and np.abs(np.diff(field, axis=2)).max() < 0.5  # smooth
    assert np.array_equal(field, lta.smooth_deformation((128, 96), np.random.default_rng(3), 4.0))
    both = lta.random_deformation((64, 64), np.random.default_rng(0), 4.0, 4.0, 2.0)
    assert both.shape == (2, 64, 64) and np.sqrt((both**2).sum(0)).max() < 4 + 4 * 2**0.5 + 1.6


def test_end_point_error(lta):
    true = np.zeros((2, 20, 20))
    true[0], true[1] = 3.0, 4.0
    assert lta.end_point_error(np.zeros_like(true), true) == pytest.approx(5.0)
    assert lta.end_point_error(true, true) == 0.0
    noisy = true.copy()
    noisy[:, :2] += 100.0  # a bad border is left out by the margin
    assert lta.end_point_error(noisy, true, margin=2) == 0.0 and lta.end_point_error(noisy, true) > 5


def test_the_field_that_registers_the_aligned_image_onto_its_warped_copy_is_psi(lta, he_tile):
    """The ground truth has the direction R learns: minimising ``|warp(aligned, φ) − y|`` gives φ ≈ ψ, not −ψ.

    φ is a 4 x 4 control grid upsampled as ψ's smooth part is, fitted by Adam; this is ``L_con`` with a
    perfect stain ``ŷ = aligned``.
    """
    from scipy import ndimage

    aligned = ndimage.gaussian_filter(he_tile[64:192, 64:192].astype(np.float32), (1.5, 1.5, 0))
    aligned_u8 = np.clip(np.rint(aligned), 0, 255).astype(np.uint8)
    psi = lta.random_deformation((128, 128), np.random.default_rng(1), 3.0, 2.0, 1.0)
    y = torch.from_numpy(lta.warp_image(aligned_u8, psi)).permute(2, 0, 1)[None].float() / 255
    moving = torch.from_numpy(aligned_u8).permute(2, 0, 1)[None].float() / 255
    control = torch.zeros(1, 2, 4, 4, requires_grad=True)
    opt = torch.optim.Adam([control], lr=0.1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(300):
            phi = torch.nn.functional.interpolate(control, size=(128, 128), mode="bicubic", align_corners=True)
            loss = (warp(moving, phi) - y)[..., 12:-12, 12:-12].abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    phi = phi.detach()[0].numpy()
    start = lta.end_point_error(np.zeros_like(psi), psi, 12)
    assert lta.end_point_error(phi, psi, 12) < 0.25 * start, (lta.end_point_error(phi, psi, 12), start)
    assert lta.end_point_error(-phi, psi, 12) > start
