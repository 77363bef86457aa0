"""The student's structure loss (digital_stain.train.losses): its values, its gradient, and a real training step."""

import numpy as np
import pytest
import torch

from digital_stain.core.arrays import InputError
from digital_stain.quality.metrics import structure_score
from digital_stain.train.losses import gradients, structure_loss
from digital_stain.train.student import StudentConfig, train_student


def _enhanced(seed=0, side=48) -> torch.Tensor:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    gray = ndimage.gaussian_filter(rng.random((side, side)), 2)
    gray = (gray - gray.min()) / np.ptp(gray) * 2 - 1
    return torch.from_numpy(gray.astype(np.float32))[None, None]


def test_gradients_of_a_ramp_are_its_slope():
    ramp = torch.arange(32, dtype=torch.float32).repeat(32, 1)[None, None] * 0.1  # rises along x
    d = gradients(ramp, 1.0)[0, :, 8:-8, 8:-8]
    assert torch.allclose(d[1], torch.full_like(d[1], 0.1), atol=1e-4) and d[0].abs().max() < 1e-5


def test_structure_loss_is_zero_for_the_same_edges_whatever_the_gain_and_two_for_inverted():
    z = _enhanced()
    same = (0.5 * z - 0.2).repeat(1, 3, 1, 1)  # gray of a stain that remaps brightness, same edges
    assert structure_loss(same, z).item() == pytest.approx(0.0, abs=1e-5)
    assert structure_loss(-same, z).item() == pytest.approx(2.0, abs=1e-5)
    unrelated = _enhanced(seed=1).repeat(1, 3, 1, 1)
    assert 0.7 < structure_loss(unrelated, z).item() < 1.3


def test_structure_loss_agrees_with_the_validation_score():
    """1 - loss is a correlation of gradients, as metrics.structure_score (a finer scale: sigma 1 against 2)."""
    z = _enhanced(side=64)
    stain = (z + 0.3 * _enhanced(seed=2, side=64)).clamp(-1, 1).repeat(1, 3, 1, 1)
    as_numpy = lambda t: ((t[0].permute(1, 2, 0).numpy() + 1) / 2)  # noqa: E731
    score = structure_score(as_numpy(stain), as_numpy(z)[..., 0])
    assert 1 - structure_loss(stain, z).item() == pytest.approx(score, abs=0.1)


def test_structure_loss_pulls_a_stain_towards_the_enhanced_edges():
    z = _enhanced()
    stain = _enhanced(seed=3).repeat(1, 3, 1, 1).requires_grad_(True)
    optimiser = torch.optim.Adam([stain], lr=0.05)
    before = structure_loss(stain, z).item()
    for _ in range(30):
        optimiser.zero_grad()
        structure_loss(stain, z).backward()
        optimiser.step()
    assert structure_loss(stain, z).item() < before - 0.3


def test_a_negative_weight_is_refused():
    with pytest.raises(InputError, match="lambda_structure"):
        StudentConfig(lambda_structure=-1)


@pytest.mark.slow
def test_training_with_the_structure_loss_reports_it_and_differs(tiny_model, darkfield_dir, hne_dir):
    base = dict(steps=2, batch=1, crop=64, disc_width=8, val_every=2, report_every=1, precision="fp32", device="cpu")
    events = []
    with_loss, _ = train_student(tiny_model, darkfield_dir, hne_dir,
                                 StudentConfig.preset("tiny", lambda_structure=5.0, **base), progress=events.append)
    without, _ = train_student(tiny_model, darkfield_dir, hne_dir, StudentConfig.preset("tiny", **base))
    steps = [e for e in events if e.total and e.losses]
    assert "structure" in steps[-1].losses and 0 <= steps[-1].losses["structure"] <= 2
    assert any(not torch.equal(a, b) for a, b in zip(with_loss.state_dict().values(), without.state_dict().values()))
