"""Synthetic dark-field made from H&E by the enhancer's inverse."""

import numpy as np
import pytest
from PIL import Image

from digital_stain._sample_data import sample_paths
from digital_stain.core.color import luma
from digital_stain.core.enhance import Enhancer
from digital_stain.quality.synth import darkfield_tint, synthesize_darkfield


@pytest.fixture
def tiles():
    dark = [np.asarray(Image.open(p).convert("RGB")) for p in sample_paths("darkfield")]
    hne = [np.asarray(Image.open(p).convert("RGB")) for p in sample_paths("stained")]
    return dark, hne


def test_tint_has_unit_luma_and_follows_the_darkfield_colour(tiles):
    dark, _ = tiles
    tint = darkfield_tint(dark)
    assert float(luma(tint)) == pytest.approx(1.0)
    mean = np.concatenate([d.reshape(-1, 3) for d in dark]).mean(0)
    assert np.argmax(tint) == np.argmax(mean)


def test_enhancing_the_synthetic_darkfield_gives_back_the_hne_gray(tiles):
    dark, hne = tiles
    enhancer = Enhancer.from_arrays(dark, hne)
    synthetic = synthesize_darkfield(hne[0], enhancer, darkfield_tint(dark), blur_sigma=0.0, noise_std=0.0)
    assert synthetic.dtype == np.uint8 and synthetic.shape == hne[0].shape
    # dim like real dark-field, bright where the H&E is dark
    gray = luma(hne[0] / 255.0)
    assert abs(synthetic.mean() - np.mean(dark)) < 0.5 * np.mean(dark) + 2
    assert np.corrcoef(luma(synthetic.astype(float)).ravel(), gray.ravel())[0, 1] < -0.8
    recovered = enhancer(synthetic)
    error = np.abs(recovered - gray).mean()
    assert error < 0.02, error  # what is lost is 8-bit quantisation of a dim image
    noisy = synthesize_darkfield(hne[0], enhancer, darkfield_tint(dark), blur_sigma=1.5, noise_std=0.01)
    assert np.abs(enhancer(noisy) - gray).mean() > error  # the degradations do degrade


def test_black_darkfield_has_no_tint():
    from digital_stain.core.arrays import InputError

    with pytest.raises(InputError, match="all black"):
        darkfield_tint([np.zeros((4, 4, 3), np.uint8)])


def test_synthesis_is_reproducible_per_seed(tiles):
    dark, hne = tiles
    enhancer = Enhancer.from_arrays(dark, hne)
    a = synthesize_darkfield(hne[1], enhancer, rng=np.random.default_rng(3))
    b = synthesize_darkfield(hne[1], enhancer, rng=np.random.default_rng(3))
    c = synthesize_darkfield(hne[1], enhancer, rng=np.random.default_rng(4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
