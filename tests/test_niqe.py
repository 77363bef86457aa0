"""NIQE (Mittal et al. 2013): agreement with BasicSR, behaviour, input handling, shipped model."""

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter
from scipy.special import gamma

import digital_stain
from digital_stain.quality.niqe import aggd_fit, imresize_half, luma, mscn, niqe, pristine_model

SAMPLE_DIR = Path(digital_stain.__file__).parent / "data"

# BasicSR's NIQE on the shipped sample tiles, (stock, float64). Produced (dev only, nothing of it is
# shipped or imported here) from BasicSR commit 8d56e3a045f9fb3e1d8872f92ee4a4f07f886b0a (2024-05-17):
# basicsr/metrics/{niqe.py, metric_util.py, niqe_pris_params.npz} and basicsr/utils/{matlab_functions.py,
# color_util.py} extracted with `git show`, basicsr/utils/__init__.py reduced to
# `from .color_util import bgr2ycbcr`, METRIC_REGISTRY and cv2 stubbed, then per tile
#     bgr = np.asarray(Image.open(path).convert("RGB"))[..., ::-1].copy()
#     calculate_niqe(bgr, crop_border=0, input_order="HWC", convert_to="y")
# - stock: unmodified. It runs in float32 (Y channel, MSCN, torch imresize), we in float64 like MATLAB:
#   stained_1_3 has a pixel whose Y is 185.499988, which float32 rounds to 186; in stained_0_5 the
#   float32 resize moves one AGGD shape by a grid step. Hence the looser tolerance.
# - float64: the same code with every float32 made float64 (astype, torch .double(), DoubleTensor,
#   torch default dtype float64) and, as in our mscn(), |img - mu| < 1e-9 set to 0 before the
#   division. Without that snap, BasicSR-float64 differs on the dark-field tiles by up to 1.6e-4
#   relative (the sign of rounding noise in their flat background); with it, to ~1e-13.
# Cross-check on 18 images (these tiles, DSD_U val tiles, 384 x 320 and 500 x 450 crops, gray):
# max relative difference 3.1e-3 vs stock (all explained by its float32), 1.1e-13 vs float64.
BASICSR = {
    "darkfield_0_0.png": (9.902658023263479, 9.90265711722451),
    "darkfield_0_5.png": (12.290260988633202, 12.290261333339464),
    "darkfield_1_3.png": (6.534602731659788, 6.534606264755087),
    "stained_0_0.png": (9.127376641853003, 9.127389340558429),
    "stained_0_5.png": (8.239370655475275, 8.243177532243504),
    "stained_1_3.png": (8.553478231025727, 8.545043185596725),
}


def _tile(name: str) -> np.ndarray:
    with Image.open(SAMPLE_DIR / name) as im:
        return np.asarray(im.convert("RGB"))


def test_reference_values_cover_the_shipped_tiles():
    assert sorted(p.name for p in SAMPLE_DIR.glob("*.png")) == sorted(BASICSR)


@pytest.mark.parametrize("name", sorted(BASICSR))
def test_matches_basicsr_on_sample_tiles(name):
    stock, float64 = BASICSR[name]
    value = niqe(_tile(name))
    assert value == pytest.approx(stock, rel=1.5e-3)
    assert value == pytest.approx(float64, rel=1e-9)


@pytest.mark.parametrize("name", ["stained_0_0.png", "stained_1_3.png", "darkfield_0_0.png", "darkfield_1_3.png"])
def test_blur_and_noise_raise_niqe(name):
    image = _tile(name) / 255.0
    clean = niqe(image)
    blurred = gaussian_filter(image, sigma=(2, 2, 0))
    noisy = np.clip(image + np.random.default_rng(0).normal(0.0, 0.1, image.shape), 0.0, 1.0)
    # Margins seen: blur +0.7 to +10, noise +3 to +19.
    assert niqe(blurred) > clean + 0.3
    assert niqe(noisy) > clean + 1.0


def test_gray_rgb_uint8_and_float_inputs_agree():
    rgb = _tile("stained_0_5.png")
    value = niqe(rgb)
    assert niqe(rgb / 255.0) == value
    assert niqe(rgb.astype(np.float32) / 255) == value
    # RGB is scored on its Y channel: passing that channel as a gray image gives the same value.
    y = luma(rgb)
    assert y.min() >= 16 and y.max() <= 235 and np.array_equal(y, np.round(y))
    assert niqe(y.astype(np.uint8)) == value
    assert niqe(y / 255.0) == value
    assert niqe(y.astype(np.uint8)[..., None]) == value


def test_crop_border_crops_each_edge():
    rgb = np.tile(_tile("stained_0_0.png"), (2, 2, 1))[:300, :280]
    assert niqe(rgb, crop_border=10) == niqe(rgb[10:-10, 10:-10])


@pytest.mark.parametrize("shape", [(191, 256), (256, 100), (96, 96)])
def test_too_small_images_are_refused(shape):
    with pytest.raises(ValueError, match="192 x 192"):
        niqe(np.zeros(shape, np.uint8))


def test_crop_border_can_make_an_image_too_small():
    assert np.isfinite(niqe(_tile("stained_0_0.png"), crop_border=32))
    with pytest.raises(ValueError, match="192 x 192"):
        niqe(_tile("stained_0_0.png"), crop_border=33)


def test_bad_shapes_and_dtypes_are_refused():
    with pytest.raises(ValueError, match="shape"):
        niqe(np.zeros((256, 256, 4), np.uint8))
    with pytest.raises(ValueError, match="dtype"):
        niqe(np.zeros((256, 256), np.int32))


def test_flat_image_gives_nan():
    flat = np.full((256, 256), 100, np.uint8)
    assert np.all(mscn(flat.astype(float)) == 0)
    assert np.isnan(niqe(flat))


def test_aggd_shape_is_the_grid_argmin_of_the_reference():
    # The reference scans 0.2:0.001:10 for the minimum of (rho - r)^2; we bisect the monotone grid.
    rng = np.random.default_rng(3)
    sets = np.concatenate([rng.normal(size=(20, 500)), rng.laplace(size=(20, 500)) + 0.3, rng.standard_t(3, (20, 500))])
    alpha, beta_l, beta_r = aggd_fit(sets)
    grid = np.arange(0.2, 10.001, 0.001)
    rho = gamma(2 / grid) ** 2 / (gamma(1 / grid) * gamma(3 / grid))
    for row, a in zip(sets, alpha):
        left, right = np.sqrt(np.mean(row[row < 0] ** 2)), np.sqrt(np.mean(row[row > 0] ** 2))
        g = left / right
        r = np.mean(np.abs(row)) ** 2 / np.mean(row**2) * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
        assert a == pytest.approx(grid[np.argmin((rho - r) ** 2)], abs=1e-12)
    assert np.all(rho[1:] > rho[:-1])
    assert np.all(beta_l > 0) and np.all(beta_r > 0)
    # No negative samples: the left scale is undefined, the shape falls back to 0.2 as in the reference.
    alpha, beta_l, _ = aggd_fit(np.abs(sets[:2]))
    assert np.all(alpha == 0.2) and np.all(np.isnan(beta_l))


def test_imresize_half_keeps_constants_and_halves_the_shape():
    out = imresize_half(np.full((192, 150), 37.0))
    assert out.shape == (96, 75)
    np.testing.assert_allclose(out, 37.0, rtol=0, atol=1e-12)
    # A linear ramp is reproduced exactly away from the (mirrored) edges: cubic kernels keep linear functions.
    ramp = np.tile(np.arange(64, dtype=float), (64, 1))
    half = imresize_half(ramp)
    np.testing.assert_allclose(half[:, 3:-3], np.tile(np.arange(0.5, 64, 2.0), (32, 1))[:, 3:-3], atol=1e-12)


def test_shipped_pristine_model():
    data = json.loads(resources.files("digital_stain").joinpath("data", "niqe_pristine.json").read_text())
    assert "modelparameters.mat" in data["source"]
    mu, cov = np.array(data["mu"]), np.array(data["cov"])
    assert mu.shape == (36,) and cov.shape == (36, 36)
    np.testing.assert_array_equal(cov, cov.T)
    assert np.linalg.eigvalsh(cov).min() > 0
    loaded_mu, loaded_cov = pristine_model()
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_cov, cov)
    assert not loaded_cov.flags.writeable
