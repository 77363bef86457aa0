"""R's self-supervised warm-up: known fields between shipped H&E tiles and their warped copies."""

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from digital_stain.io.modelfile import load_bundle
from digital_stain.core.nets.registration import RegistrationNet, warp
from digital_stain.train.align_warmup import MAX_SMOOTH, MAX_TRANSLATE, random_fields, warm_up_registration
from digital_stain.train.finetune import fine_tune


def _tiles(sample_dir):
    return [np.array(Image.open(p).convert("RGB")) for p in sorted(sample_dir.glob("stained_*.png"))]


def test_random_fields_are_smooth_bounded_and_repeatable():
    a = random_fields(3, 64, np.random.default_rng(0))
    b = random_fields(3, 64, np.random.default_rng(0))
    assert a.shape == (3, 2, 64, 64) and a.dtype == torch.float32 and torch.equal(a, b)
    # bicubic overshoot stays small; a 3 x 3 grid over 64 px changes by well under a pixel per pixel
    assert a.abs().max() <= 1.2 * MAX_SMOOTH + MAX_TRANSLATE
    assert (a[..., 1:] - a[..., :-1]).abs().max() < 1.0
    assert a.flatten(1).std(1).min() > 0.5  # not a constant: every field moves


def _held_out_error(net, tiles, side=96):
    """Mean end-point error (px) of R on fresh warps of the tiles' centres, and the identity's."""
    rng = np.random.default_rng(123)
    crops = torch.stack([torch.from_numpy(t[80 : 80 + side, 80 : 80 + side]) for t in tiles])
    section = crops.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    field = random_fields(len(tiles), side, rng)
    with torch.no_grad():
        predicted = net(section, warp(section, field))
    inner = (slice(None), slice(None), slice(16, -16), slice(16, -16))
    error = (predicted - field)[inner].pow(2).sum(1).sqrt().mean().item()
    identity = field[inner].pow(2).sum(1).sqrt().mean().item()
    return error, identity


@pytest.mark.slow
def test_warm_up_teaches_r_fields_it_has_not_seen(sample_dir):
    # about 45 s: R sits on a plateau for its first 1000 steps or so (only its zero-initialised last layer
    # gets a gradient at first), then learns; after 3000 steps it removes about 80 % of the error
    tiles = _tiles(sample_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: threads only add overhead on a busy CPU
    try:
        torch.manual_seed(0)
        net = RegistrationNet(width=8, depth=3)
        messages = []
        losses = warm_up_registration(net, tiles, steps=1500, crop=64, device=torch.device("cpu"), seed=0,
                                      progress=lambda p: messages.append(p.message))
    finally:
        torch.set_num_threads(threads)
    assert len(losses) == 1500 and np.mean(losses[-100:]) < 0.75 * np.mean(losses[:100])
    assert len(messages) == 10 and messages[-1].startswith("registration warm-up: step 1500/1500")
    error, identity = _held_out_error(net, tiles)
    assert error < 0.75 * identity, (error, identity)  # the identity field is 3.3 px off on average


def test_warm_up_is_repeatable_and_stops(sample_dir):
    tiles = _tiles(sample_dir)
    nets = []
    for _ in range(2):
        torch.manual_seed(0)
        nets.append(RegistrationNet(width=4, depth=2))
        warm_up_registration(nets[-1], tiles, steps=3, crop=32, device=torch.device("cpu"), seed=5)
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()):
        assert torch.equal(a, b)
    stop = threading.Event()
    stop.set()
    assert warm_up_registration(RegistrationNet(width=4, depth=2), tiles, 3, 32, torch.device("cpu"), stop=stop) is None


@pytest.mark.slow
def test_paired_training_warms_r_up_once_and_resume_checks_it(tiny_model, darkfield_dir, sections_dir, tmp_path):
    from digital_stain.core.arrays import InputError

    common = dict(paired=True, size="tiny", from_scratch=True, crop=64, device="cpu", precision="fp32", teacher_steps=0)
    fast = dict(disc_width=8, report_every=1, val_every=1)
    plain, warmed = tmp_path / "plain.ckpt.safetensors", tmp_path / "warmed.ckpt.safetensors"
    messages = []
    fine_tune(tiny_model, darkfield_dir, sections_dir, steps=1, checkpoint=plain, config_overrides=fast, **common)
    fine_tune(tiny_model, darkfield_dir, sections_dir, steps=1, checkpoint=warmed,
              config_overrides=dict(fast, reg_warmup=20), progress=lambda p: messages.append(p.message), **common)
    assert any(m.startswith("registration warm-up: step 20/20") for m in messages)
    r_plain = {k: v for k, v in load_bundle(plain)[0].items() if k.startswith("registration.")}
    r_warmed, meta = load_bundle(warmed)
    assert meta["meta"]["config"]["reg_warmup"] == 20
    assert any(not torch.equal(v, r_warmed[k]) for k, v in r_plain.items())
    with pytest.raises(InputError, match=r"reg_warmup 20 -> 0"):
        fine_tune(tiny_model, darkfield_dir, sections_dir, steps=2, resume=True, checkpoint=warmed,
                  config_overrides=fast, **common)
