"""Paired-but-misaligned student training (Learning to Align): pairing, refusals, real steps on tiny networks.

Pairs are made from the shipped sample tiles: each dark-field tile gets a stained tile saved under its
name (the tissue differs, which does not matter for the machinery tested here).
"""

import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from digital_stain.core.arrays import InputError
from digital_stain.io.modelfile import load_bundle
from digital_stain.core.nets.registration import RegistrationNet, smoothness_loss, warp
from digital_stain.train.finetune import fine_tune
from digital_stain.train.paired import load_pairs, pair_key
from digital_stain.train.student import StudentConfig, train_student

FAST = dict(disc_width=8, report_every=1)


def paired_config(**overrides):
    base = dict(steps=4, batch=1, crop=64, disc_width=8, val_every=2, report_every=1, precision="fp32",
                device="cpu", mode="paired")
    return StudentConfig.preset("tiny", **{**base, **overrides})


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# -- configuration --------------------------------------------------------------
def test_paper_weights_per_mode():
    unpaired, paired = StudentConfig(), StudentConfig(mode="paired")
    assert (unpaired.mode, unpaired.lambda_kd, unpaired.lambda_cyc) == ("unpaired", 5.0, 80.0)
    assert (paired.lambda_kd, paired.lambda_cyc, paired.lambda_con, paired.lambda_smooth) == (2.0, 10.0, 20.0, 10.0)
    assert StudentConfig.preset("full", mode="paired", lambda_kd=0.0).lambda_kd == 0.0  # an explicit weight wins
    assert StudentConfig.preset("tiny", mode="paired").reg_width == 8
    with pytest.raises(InputError, match="unknown training mode 'aligned'"):
        StudentConfig(mode="aligned")
    with pytest.raises(TypeError, match="paired=True"):
        fine_tune("dsd-unpaired", "a", "b", config_overrides={"mode": "paired"})


# -- pairing and refusals ----------------------------------------------------------
def test_pairs_by_name_without_extension(darkfield_dir, sections_dir, tmp_path):
    pairs = load_pairs(darkfield_dir, sections_dir, min_side=64)
    assert pairs.darkfield.names == sorted(p.name for p in darkfield_dir.glob("*.png"))
    for name, section in zip(pairs.darkfield.names, pairs.stained):
        assert np.array_equal(section, np.asarray(Image.open(sections_dir / name).convert("RGB")))
    assert "3 dark-field/stained pair(s)" in pairs.summary()
    assert pair_key("a.b.png") == "a.b" and pair_key("x.ome.tif") == "x" and pair_key("layer 1") == "layer 1"

    # a gray dark-field (as elsewhere in the package) and a TIFF section pair with PNGs of the same stem
    gray_dir, tif_dir = tmp_path / "gray", tmp_path / "tif"
    gray_dir.mkdir()
    tif_dir.mkdir()
    for path in sorted(darkfield_dir.glob("*.png")):
        Image.open(path).convert("L").save(gray_dir / path.name)
        Image.open(sections_dir / path.name).save(tif_dir / f"{path.stem}.tif")
    mixed = load_pairs(gray_dir, tif_dir, min_side=64)
    assert len(mixed.stained) == 3 and all(im.shape == (256, 256, 3) for im in mixed.darkfield.images)

    # in-memory dark-field (e.g. napari layers named after their files) with a folder of sections
    arrays = [np.asarray(Image.open(p)) for p in sorted(darkfield_dir.glob("*.png"))]
    layers = load_pairs(arrays, sections_dir, [p.stem for p in sorted(darkfield_dir.glob("*.png"))], min_side=64)
    assert layers.darkfield.names == [p.stem for p in sorted(darkfield_dir.glob("*.png"))]

    # pairs smaller than the crop are skipped together; none left is refused
    with pytest.raises(InputError, match="no usable pair: all 3 are smaller than 300 x 300 px"):
        load_pairs(darkfield_dir, sections_dir, min_side=300)


def test_refuses_unequal_numbers_of_images(darkfield_dir, sections_dir, tiny_model):
    (sections_dir / "darkfield_1_3.png").unlink()
    message = (r"one stained section per dark-field image, but dark-field folder .* has 3 image\(s\) and stained "
               r"folder .* 2: 1 dark-field image\(s\) have no stained image of the same name \(e.g. darkfield_1_3.png\)")
    with pytest.raises(InputError, match=message):
        load_pairs(darkfield_dir, sections_dir, min_side=64)
    with pytest.raises(InputError, match="one stained section per dark-field image"):  # through the training API
        train_student(tiny_model, darkfield_dir, sections_dir, paired_config())


def test_refuses_names_that_do_not_pair(darkfield_dir, hne_dir):
    with pytest.raises(InputError, match=r"do not pair by name: 3 dark-field image\(s\) have no stained image of the "
                                         r"same name \(e.g. darkfield_0_0.png, darkfield_0_5.png, darkfield_1_3.png\); "
                                         r"3 stained image\(s\) have no dark-field image .*\(e.g. stained_0_0.png"):
        load_pairs(darkfield_dir, hne_dir, min_side=64)


def test_refuses_names_used_twice(darkfield_dir, sections_dir):
    Image.open(sections_dir / "darkfield_0_0.png").save(sections_dir / "darkfield_0_0.tif")
    with pytest.raises(InputError, match=r"differ only in extension \(darkfield_0_0.png, darkfield_0_0.tif\)"):
        load_pairs(darkfield_dir, sections_dir, min_side=64)


def test_refuses_pairs_of_different_sizes(darkfield_dir, sections_dir):
    section = np.asarray(Image.open(sections_dir / "darkfield_0_5.png"))
    Image.fromarray(section[:200]).save(sections_dir / "darkfield_0_5.png")
    with pytest.raises(InputError, match=r"1 pair\(s\) differ in size \(darkfield_0_5.png: dark-field 256 x 256, "
                                         r"stained 256 x 200\).*crop or resample one"):
        load_pairs(darkfield_dir, sections_dir, min_side=64)


def test_refuses_a_stained_section_that_is_not_rgb(darkfield_dir, sections_dir, tiny_model):
    # the channel counts of a pair may differ only on the dark-field side (gray is fine there, see above)
    Image.open(sections_dir / "darkfield_0_0.png").convert("L").save(sections_dir / "darkfield_0_0.png")
    message = r"1 stained image\(s\) not RGB \(darkfield_0_0.png\).*must be an RGB H&E image"
    with pytest.raises(InputError, match=message):
        load_pairs(darkfield_dir, sections_dir, min_side=64)
    paths = sorted(sections_dir.glob("*.png"))
    sections = [np.asarray(Image.open(p)) for p in paths]
    assert sections[0].ndim == 2
    with pytest.raises(InputError, match=r"1 stained image\(s\) not RGB \(darkfield_0_0\)"):  # in memory too
        train_student(tiny_model, darkfield_dir, sections, paired_config(), stained_names=[p.stem for p in paths])


def test_refuses_an_unreadable_file_of_a_pair(darkfield_dir, sections_dir):
    (sections_dir / "darkfield_1_3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(InputError, match=r"1 stained image\(s\) unreadable \(darkfield_1_3.png\).*remove the pair"):
        load_pairs(darkfield_dir, sections_dir, min_side=64)


# -- the registration network alone ------------------------------------------------
def test_registration_learns_a_known_shift(sample_dir):
    """Only R is optimised (L_con + the paper's λ4/λ3 ratio of L_smoo) on crops of a tile and the same tile shifted."""
    torch.manual_seed(0)
    tile = torch.from_numpy(np.array(Image.open(sample_dir / "stained_0_0.png").convert("RGB")))
    tile = tile.permute(2, 0, 1).float() / 127.5 - 1.0
    shift_x, shift_y, side = 3, -2, 64

    def batch(rng, n=4):  # fixed(p) = moving(p + shift): the field that registers moving onto fixed is the shift
        ys, xs = rng.integers(8, 256 - side - 8, n), rng.integers(8, 256 - side - 8, n)
        moving = torch.stack([tile[:, y : y + side, x : x + side] for y, x in zip(ys, xs)])
        fixed = torch.stack([tile[:, y + shift_y : y + shift_y + side, x + shift_x : x + shift_x + side]
                             for y, x in zip(ys, xs)])
        return moving, fixed

    net = RegistrationNet(width=8, depth=3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.5, 0.999))
    rng = np.random.default_rng(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small gain nothing from threads; a busy CPU makes them 50x slower
    started = time.process_time()  # CPU time: other processes on the machine do not count
    try:
        for step in range(150):
            if step == 100:
                for group in opt.param_groups:
                    group["lr"] = 1e-4
            moving, fixed = batch(rng)
            field = net(moving, fixed)
            loss = (warp(moving, field) - fixed).abs().mean() + 0.5 * smoothness_loss(field)
            opt.zero_grad()
            loss.backward()
            opt.step()
        seconds = time.process_time() - started
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        moving, fixed = batch(np.random.default_rng(1), 8)
        inner = net(moving, fixed)[..., 8:-8, 8:-8]  # borders: content that left the crop cannot be matched
        end_point_error = ((inner[:, 0] - shift_x) ** 2 + (inner[:, 1] - shift_y) ** 2).sqrt().mean().item()
        before = (moving - fixed).abs().mean().item()
        after = (warp(moving, net(moving, fixed)) - fixed)[..., 8:-8, 8:-8].abs().mean().item()
    assert end_point_error < 0.5, end_point_error  # it starts at 3.6 px (identity)
    assert abs(inner[:, 0].mean().item() - shift_x) < 0.3 and abs(inner[:, 1].mean().item() - shift_y) < 0.3
    assert after < 0.5 * before
    assert seconds < 30  # about 5 s on a 2-core CPU


# -- training ------------------------------------------------------------------------
@pytest.mark.slow
def test_paired_steps_train_registration_and_write_a_model_without_it(tiny_model, darkfield_dir, sections_dir,
                                                                      tmp_path):
    from digital_stain.stain.model import StainModel

    ckpt = tmp_path / "p.ckpt.safetensors"
    events, steps = [], []
    tuned = fine_tune(tiny_model, darkfield_dir, sections_dir, paired=True, size="tiny", from_scratch=True, steps=3,
                      crop=64, device="cpu", precision="fp32", checkpoint=ckpt, progress=events.append, teacher_steps=2,
                      callback=lambda step, student: steps.append(step), config_overrides=dict(FAST, val_every=1))
    result = tuned.result
    assert steps == [1, 2, 3] and result.steps_done == 3 and not result.cancelled
    assert any(e.message.startswith("paired training: 3 dark-field/stained pair(s)") for e in events)
    losses = [e.losses for e in events if e.total and e.losses]
    assert {"adv", "kd", "cyc", "d", "con", "smooth"} <= set(losses[-1])
    assert [h["step"] for h in result.history] == [1, 2, 3]
    assert all({"aligned_l1", "aligned_psnr", "structure", "style", "kd_l1"} <= set(h) for h in result.history)

    tensors, meta = load_bundle(ckpt)  # R is in the checkpoint (exact resume) and has left the identity
    assert meta["meta"]["config"]["mode"] == "paired"
    assert tensors["registration.flow.weight"].abs().sum() > 0
    path = tmp_path / "paired.safetensors"
    tuned.model.save(path)
    saved, _ = load_bundle(path)
    assert not any("registration" in k for k in saved)  # R never is in the model file
    assert any(k.startswith("reverse.") for k in saved)  # F is (tutorship translates H&E into dark-field with it)
    loaded = StainModel.load(path)
    student = loaded.metadata["provenance"]["student"]
    assert student["mode"] == "paired" and student["config"]["mode"] == "paired"
    assert (student["config"]["lambda_kd"], student["config"]["lambda_cyc"],
            student["config"]["lambda_con"], student["config"]["lambda_smooth"]) == (2.0, 10.0, 20.0, 10.0)
    assert "paired" in loaded.metadata["description"]
    teacher = loaded.metadata["provenance"]["fine_tune"]["teacher"]
    assert teacher["steps"] == 2 and teacher["learnt_from"] == "the enhanced dark-field and its adjacent section"
    assert loaded.stain(np.zeros((64, 64, 3), np.uint8), ["student"], precision="fp32")["student"].shape == (64, 64, 3)


@pytest.mark.slow
def test_paired_stop_and_resume_equal_a_straight_run_and_the_other_mode_is_refused(
        tiny_model, darkfield_dir, sections_dir, hne_dir, tmp_path):
    config = paired_config(steps=6, val_every=1, pool_size=2)
    straight_ckpt = tmp_path / "straight.ckpt.safetensors"
    straight, straight_result = train_student(tiny_model, darkfield_dir, sections_dir, config, checkpoint=straight_ckpt)
    ckpt = tmp_path / "p.ckpt.safetensors"
    stop = threading.Event()

    def stop_at_3(p):
        if p.total and p.step >= 3:
            stop.set()

    _, partial = train_student(tiny_model, darkfield_dir, sections_dir, config, checkpoint=ckpt,
                               progress=stop_at_3, stop=stop)
    assert partial.cancelled and partial.steps_done == 3 and partial.best_step is not None
    resumed, result = train_student(tiny_model, darkfield_dir, sections_dir, config, checkpoint=ckpt, resume=True)
    assert result.steps_done == 6 and result.history == straight_result.history
    assert result.best_step == straight_result.best_step and _same_weights(straight, resumed)
    a, _ = load_bundle(straight_ckpt)
    b, _ = load_bundle(ckpt)
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("registration."))  # R resumed exactly too

    with pytest.raises(InputError, match="made by paired training and this run is unpaired; resume it with --paired"):
        train_student(tiny_model, darkfield_dir, hne_dir, paired_config(steps=6, val_every=1, pool_size=2,
                                                                         mode="unpaired"),
                      checkpoint=ckpt, resume=True)
    unpaired_ckpt = tmp_path / "u.ckpt.safetensors"
    train_student(tiny_model, darkfield_dir, hne_dir, paired_config(mode="unpaired", steps=1, val_every=1),
                  checkpoint=unpaired_ckpt)
    with pytest.raises(InputError, match="made by unpaired training and this run is paired; resume it without --paired"):
        train_student(tiny_model, darkfield_dir, sections_dir, paired_config(), checkpoint=unpaired_ckpt, resume=True)
    with pytest.raises(InputError, match=r"other settings \(lambda_con 20.0 -> 5.0\)"):
        train_student(tiny_model, darkfield_dir, sections_dir, paired_config(steps=6, val_every=1, pool_size=2,
                                                                             lambda_con=5.0),
                      checkpoint=ckpt, resume=True)


@pytest.mark.slow
def test_pix2pix_baseline_is_lta_with_the_field_held_at_identity(tiny_model, darkfield_dir, sections_dir, tmp_path):
    """``registration=False`` (benchmarks/lta_synthetic.py's baseline): no R, L_con on the unregistered output, no L_smoo.

    R starts at the identity, so the first step of both runs is the same; afterwards only LtA's field moves.
    """
    assert StudentConfig(mode="paired").registration is True  # the default is Learning to Align
    runs = {}
    for registration in (True, False):
        events = []
        ckpt = tmp_path / f"r{registration}.ckpt.safetensors"
        _, result = train_student(tiny_model, darkfield_dir, sections_dir,
                                  paired_config(steps=3, val_every=3, registration=registration),
                                  checkpoint=ckpt, progress=events.append)
        runs[registration] = ([e.losses for e in events if e.total and e.losses], load_bundle(ckpt), result)
    (lta_losses, (lta_tensors, _), _), (base_losses, (tensors, meta), result) = runs[True], runs[False]
    assert result.steps_done == 3 and result.best_step == 3
    assert not any(k.startswith(("registration.", "opt.r.")) for k in tensors)  # R is never built
    assert any(k.startswith("registration.") for k in lta_tensors)
    assert meta["meta"]["config"]["registration"] is False
    assert all(losses["smooth"] == 0.0 and losses["con"] > 0 for losses in base_losses)
    assert base_losses[0]["con"] == pytest.approx(lta_losses[0]["con"], abs=1e-5)  # step 1: identity field in both
    assert "aligned_l1" not in result.history[-1]  # nothing registers the held-out pairs
    with pytest.raises(InputError, match=r"other settings \(registration False -> True\)"):
        train_student(tiny_model, darkfield_dir, sections_dir, paired_config(steps=3, val_every=3), checkpoint=ckpt,
                      resume=True)


@pytest.mark.slow
def test_registration_learning_rate_scale_is_recorded_and_checked_on_resume(tiny_model, darkfield_dir, sections_dir,
                                                                            tmp_path):
    ckpt = tmp_path / "r.ckpt.safetensors"
    common = dict(paired=True, size="tiny", from_scratch=True, crop=64, device="cpu", precision="fp32", teacher_steps=0,
                  checkpoint=ckpt)
    fine_tune(tiny_model, darkfield_dir, sections_dir, steps=2, config_overrides=dict(FAST, reg_lr_scale=10.0),
              **common)
    tensors, meta = load_bundle(ckpt)
    assert meta["meta"]["config"]["reg_lr_scale"] == 10.0
    with pytest.raises(InputError, match=r"reg_lr_scale 10.0 -> 1.0"):
        fine_tune(tiny_model, darkfield_dir, sections_dir, steps=2, resume=True, config_overrides=dict(FAST),
                  **common)
