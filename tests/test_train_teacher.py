"""Teacher training: results, progress, determinism, checkpoint/resume, stop, refusals and the CLI."""

from __future__ import annotations

import math
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import digital_stain
from digital_stain.core.arrays import InputError
from digital_stain.cli import main
from digital_stain.core.enhance import Enhancer
from digital_stain.stain.model import StainModel
from digital_stain.io.modelfile import load_bundle
from digital_stain.core.nets import ColorizationUNet
from digital_stain.train import Progress, TeacherConfig, TrainResult, train_teacher

SAMPLES = Path(digital_stain.__file__).parent / "data"


def config(**changes) -> TeacherConfig:
    base = dict(width=4, depth=2, steps=6, batch=2, crop=64, val_every=3, report_every=1, precision="fp32", device="cpu")
    return TeacherConfig(**{**base, **changes})


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def checkpoint_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    tensors, _ = load_bundle(path)
    return {k: v for k, v in tensors.items() if k.startswith(prefix)}


class StopAt:
    """A progress callback that sets a stop event once training reaches ``step``."""

    def __init__(self, step: int):
        self.step, self.stop, self.events = step, threading.Event(), []

    def __call__(self, p: Progress) -> None:
        self.events.append(p)
        if p.step >= self.step:
            self.stop.set()


@pytest.fixture(scope="module")
def module_hne(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hne")
    for path in SAMPLES.glob("stained_*.png"):
        shutil.copy2(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def straight(module_hne, tmp_path_factory):
    """Six steps in one go, with a checkpoint; shared by several tests."""
    ckpt = tmp_path_factory.mktemp("straight") / "run.ckpt.safetensors"
    events: list[Progress] = []
    net, result = train_teacher(module_hne, config(), checkpoint=ckpt, progress=events.append)
    return net, result, events, ckpt


@pytest.mark.slow
def test_train_returns_eval_net_and_result(straight):
    net, result, _, ckpt = straight
    assert isinstance(net, ColorizationUNet)
    assert not net.training, "returned in eval mode"
    assert net.config == {"width": 4, "depth": 2}
    assert all(p.device.type == "cpu" for p in net.parameters())
    assert isinstance(result, TrainResult)
    assert result.steps_done == 6 and not result.cancelled
    assert [h["step"] for h in result.history] == [3, 6]
    scores = [h["val_l1_ab"] for h in result.history]
    assert all(math.isfinite(s) and s > 0 for s in scores)
    assert result.best_score == min(scores)
    assert result.best_step == result.history[scores.index(min(scores))]["step"]
    assert ckpt.is_file()
    with torch.no_grad():
        ab = net(torch.zeros(1, 1, 64, 64))
    assert ab.shape == (1, 2, 64, 64) and torch.isfinite(ab).all() and ab.abs().max() <= 1


@pytest.mark.slow
def test_progress_events(straight):
    _, _, events, _ = straight
    assert [p.step for p in events] == [1, 2, 3, 4, 5, 6]
    for p in events:
        assert isinstance(p, Progress)
        assert p.total == 6
        assert set(p.losses) == {"l1"} and math.isfinite(p.losses["l1"]) and p.losses["l1"] >= 0
        assert p.images_per_s > 0
        assert math.isfinite(p.eta_s) and p.eta_s >= 0
    assert events[-1].eta_s == 0
    assert "validation" in events[2].message and "validation" in events[5].message
    assert events[0].message == ""


@pytest.mark.slow
def test_same_seed_same_weights(straight, module_hne):
    net, result, _, _ = straight
    again, again_result = train_teacher(module_hne, config())
    assert same_weights(net, again)
    assert again_result.history == result.history
    other, _ = train_teacher(module_hne, config(seed=1))
    assert not same_weights(other, net), "the seed must matter"


@pytest.mark.slow
def test_checkpoint_resume_equals_straight_run(straight, module_hne, tmp_path):
    """3 steps (stopped, checkpoint) then resume to 6 == 6 steps straight, bit for bit.

    Both runs use config.steps = 6: the learning-rate schedule (constant, then a
    linear decay over the second half) is a function of config.steps, so only a
    run planned for 6 steps and interrupted at 3 can be resumed into the
    straight run; the per-step random streams and the Adam moments are restored.
    """
    net, result, _, straight_ckpt = straight
    ckpt = tmp_path / "resume.ckpt.safetensors"
    stopper = StopAt(3)
    first, first_result = train_teacher(module_hne, config(), checkpoint=ckpt, progress=stopper, stop=stopper.stop)
    assert first_result.cancelled and first_result.steps_done == 3
    assert ckpt.is_file()
    _, meta = load_bundle(ckpt)
    assert meta["kind"] == "checkpoint" and meta["meta"]["step"] == 3

    events: list[Progress] = []
    resumed, resumed_result = train_teacher(module_hne, config(), checkpoint=ckpt, resume=True, progress=events.append)
    assert [p.step for p in events] == [4, 5, 6], "continues where it stopped"
    assert resumed_result.steps_done == 6 and not resumed_result.cancelled
    assert resumed_result.history == result.history
    assert resumed_result.best_step == result.best_step
    assert same_weights(resumed, net)
    # the last state (not only the best one) and the optimiser moments match too
    for prefix in ("net.", "opt."):
        a, b = checkpoint_tensors(ckpt, prefix), checkpoint_tensors(straight_ckpt, prefix)
        assert a.keys() == b.keys() and a
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert not torch.equal(checkpoint_tensors(ckpt, "net.")["net.head.weight"], first.state_dict()["head.weight"])


@pytest.mark.slow
def test_stop_from_progress_returns_usable_net(module_hne, tmp_path):
    stopper = StopAt(2)
    net, result = train_teacher(module_hne, config(), progress=stopper, stop=stopper.stop)
    assert result.cancelled is True
    assert result.steps_done == 2
    assert [p.step for p in stopper.events] == [1, 2]
    assert result.best_step is None and result.best_score is None  # no validation before step 3
    assert isinstance(net, ColorizationUNet) and not net.training
    with torch.no_grad():
        ab = net(torch.linspace(-1, 1, 64 * 64).reshape(1, 1, 64, 64))
    assert ab.shape == (1, 2, 64, 64) and torch.isfinite(ab).all()
    model = StainModel(Enhancer(np.ones(4096, np.int64), np.ones(4096, np.int64)), net)
    out = model.stain(np.zeros((32, 32), np.uint8), ["teacher"], precision="fp32", device="cpu")["teacher"]
    assert out.shape == (32, 32, 3) and np.isfinite(out).all()


def test_stop_before_start(hne_dir):
    stop = threading.Event()
    stop.set()
    net, result = train_teacher(hne_dir, config(), stop=stop)
    assert result.cancelled and result.steps_done == 0
    assert not net.training


# -- refusals ----------------------------------------------------------------
def test_empty_folder_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="has no image files"):
        train_teacher(tmp_path / "empty", config())


def test_missing_folder_refused(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        train_teacher(tmp_path / "nowhere", config())


def test_folder_of_non_images_refused(tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="has no image files"):
        train_teacher(folder, config())
    (folder / "fake.png").write_text("not a png")
    (folder / "empty.tif").write_bytes(b"")
    with pytest.raises(InputError) as info:
        train_teacher(folder, config())
    assert "no usable H&E image" in str(info.value)
    assert "2 unreadable" in str(info.value)


def test_gray_images_refused(tmp_path, hne_dir):
    folder = tmp_path / "gray"
    folder.mkdir()
    for path in hne_dir.glob("*.png"):
        with Image.open(path) as im:
            im.convert("L").save(folder / path.name)
    with pytest.raises(InputError) as info:
        train_teacher(folder, config())
    message = str(info.value)
    assert "no usable H&E image" in message and "3 not RGB" in message and "must be RGB" in message


def test_too_small_images_refused(tmp_path, hne_dir):
    folder = tmp_path / "small"
    folder.mkdir()
    for path in hne_dir.glob("*.png"):
        with Image.open(path) as im:
            im.crop((0, 0, 40, 40)).save(folder / path.name)
    with pytest.raises(InputError, match="smaller than 64 px"):
        train_teacher(folder, config())


# -- CLI -----------------------------------------------------------------
def _cli_args(hne_dir: Path, darkfield_dir: Path, output: Path) -> list[str]:
    return [
        "train-teacher", "--stained", str(hne_dir), "--darkfield", str(darkfield_dir), "--output", str(output),
        "--steps", "4", "--batch", "2", "--crop", "64", "--width", "4", "--depth", "2",
        "--device", "cpu", "--precision", "fp32", "-q",
    ]


@pytest.mark.slow
def test_cli_train_teacher_writes_model(capsys, monkeypatch, hne_dir, darkfield_dir, tmp_path):
    output = tmp_path / "m.safetensors"
    argv = _cli_args(hne_dir, darkfield_dir, output)
    monkeypatch.setattr(sys, "argv", ["digital-stain", *argv])  # what the console script sees
    assert main(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "wrote" in err and "m.safetensors" in err
    model = StainModel.load(output)
    assert model.outputs == ("enhanced", "teacher")
    assert model.teacher.config == {"width": 4, "depth": 2}
    assert model.name == "m"
    prov = model.metadata["provenance"]
    assert prov["command"].startswith("digital-stain train-teacher")
    assert "--steps 4" in prov["command"] and "--crop 64" in prov["command"]
    assert prov["stained"] == str(hne_dir) and prov["darkfield"] == str(darkfield_dir)
    assert prov["teacher"]["steps"] == 4 and prov["teacher"]["cancelled"] is False
    assert prov["teacher"]["config"]["width"] == 4
    for key in ("date", "package", "torch", "python"):
        assert prov[key]
    fitted = Enhancer.from_folders(darkfield_dir, hne_dir)
    np.testing.assert_array_equal(model.enhancer.table, fitted.table)
    assert (tmp_path / "m.safetensors.ckpt.safetensors").is_file()
    out = model.stain(np.zeros((16, 16), np.uint8), precision="fp32", device="cpu")
    assert sorted(out) == ["enhanced", "teacher"]


@pytest.mark.slow
def test_cli_provenance_records_given_argv(capsys, monkeypatch, hne_dir, darkfield_dir, tmp_path):
    output = tmp_path / "m.safetensors"
    argv = _cli_args(hne_dir, darkfield_dir, output)
    monkeypatch.setattr(sys, "argv", ["some-host-program", "--unrelated"])
    assert main(argv) == 0, capsys.readouterr().err
    assert "--steps 4" in StainModel.load(output).metadata["provenance"]["command"]


def test_cli_train_teacher_refuses_existing_output(capsys, hne_dir, darkfield_dir, tmp_path):
    output = tmp_path / "m.safetensors"
    output.write_bytes(b"keep me")
    code = main(_cli_args(hne_dir, darkfield_dir, output))
    err = capsys.readouterr().err
    assert code == 2
    assert "already exists" in err and "--overwrite" in err
    assert output.read_bytes() == b"keep me"
    assert not (tmp_path / "m.safetensors.ckpt.safetensors").exists()


def test_cli_train_teacher_needs_darkfield_or_init(capsys, hne_dir, tmp_path):
    code = main(["train-teacher", "--stained", str(hne_dir), "--output", str(tmp_path / "m.safetensors"), "-q"])
    assert code == 2
    assert "--darkfield" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


def test_cli_train_teacher_bad_stained_folder(capsys, darkfield_dir, tmp_path):
    (tmp_path / "none").mkdir()
    output = tmp_path / "m.safetensors"
    code = main(_cli_args(tmp_path / "none", darkfield_dir, output))
    assert code == 2
    err = capsys.readouterr().err
    assert "digital-stain: error:" in err and str(tmp_path / "none") in err
    assert not output.exists()


def _sections_coloured_by(gray: np.ndarray) -> np.ndarray:
    """RGB sections of one lightness whose redness follows ``gray``: their own gray cannot tell where to colour."""
    from digital_stain.core.color import lab_to_rgb

    lab = torch.zeros(1, 3, *gray.shape)
    lab[0, 0] = 60.0
    lab[0, 1] = torch.from_numpy(60.0 * (0.5 - gray))  # red where the gray is dark, green where it is bright
    return (lab_to_rgb(lab)[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)


def test_paired_teacher_learns_the_colour_the_dark_field_shows_and_the_h_and_e_gray_does_not():
    from scipy import ndimage

    from digital_stain.core.color import rgb_to_lab
    from digital_stain.core.nets.unet import AB_SCALE, lightness_input

    rng = np.random.default_rng(0)
    grays = [ndimage.gaussian_filter(rng.random((96, 96)), 4).astype(np.float32) for _ in range(6)]
    grays = [(g - g.min()) / np.ptp(g) for g in grays]
    sections = [_sections_coloured_by(g) for g in grays]
    names = [f"pair {i}" for i in range(6)]
    settings = config(steps=60, batch=4, lr=3e-3, val_every=30, report_every=10)
    paired, result = train_teacher(sections, settings, names=names, enhanced=grays)
    unpaired, _ = train_teacher(sections, settings, names=names)  # each section's own, nearly flat, gray
    assert result.steps_done == 60 and result.best_score == min(h["val_l1_ab"] for h in result.history)

    def chroma_error(net) -> float:  # mean L1 in Lab units of the chroma it gives each gray against its section's
        errors = []
        with torch.no_grad():
            for gray, section in zip(grays, sections):
                ab = net(lightness_input(torch.from_numpy(gray)[None, None]))[0] * AB_SCALE
                target = rgb_to_lab(torch.from_numpy(section).permute(2, 0, 1)[None].float() / 255)[0, 1:]
                errors.append(float((ab - target).abs().mean()))
        return float(np.mean(errors))

    learnt, not_learnt = chroma_error(paired), chroma_error(unpaired)
    assert learnt < 15 and learnt < 0.3 * not_learnt, (learnt, not_learnt)  # measured: 10 against 65
    with pytest.raises(ValueError, match="got 2 for 6 sections"):
        train_teacher(sections, settings, names=names, enhanced=grays[:2])


def test_resume_refuses_a_checkpoint_that_learnt_from_the_other_kind_of_pair(tmp_path):
    rng = np.random.default_rng(1)
    sections = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(4)]
    grays = [rng.random((64, 64)).astype(np.float32) for _ in range(4)]
    names = [f"pair {i}" for i in range(4)]
    ckpt = tmp_path / "teacher.ckpt.safetensors"
    stopper = StopAt(2)
    _, first = train_teacher(sections, config(), names=names, checkpoint=ckpt, progress=stopper, stop=stopper.stop)
    assert first.cancelled
    with pytest.raises(InputError, match="learnt from the H&E images alone .* learns from adjacent sections"):
        train_teacher(sections, config(), names=names, enhanced=grays, checkpoint=ckpt, resume=True)
    _, resumed = train_teacher(sections, config(), names=names, checkpoint=ckpt, resume=True)  # the same kind goes on
    assert resumed.steps_done == 6 and not resumed.cancelled


def _sections_coloured_by_slope(gray: np.ndarray) -> np.ndarray:
    """Sections of one lightness, red where the gray rises to the right and green where it falls."""
    from digital_stain.core.color import lab_to_rgb

    slope = np.gradient(gray, axis=1)
    lab = torch.zeros(1, 3, *gray.shape)
    lab[0, 0] = 60.0
    lab[0, 1] = torch.from_numpy(40.0 * np.tanh(slope / (np.std(slope) + 1e-6))).float()
    return (lab_to_rgb(lab)[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)


@pytest.mark.slow
def test_paired_teacher_keeps_the_orientation_of_its_pairs():
    # a colour that follows the direction of the gray's slope is learnt only from pairs that are not mirrored or
    # turned (measured: a* error 3.3 Lab units unturned, 22.0 with the H&E crops' mirrors and turns, 21.9 for a
    # teacher that paints no chroma)
    from scipy import ndimage

    from digital_stain.core.color import rgb_to_lab
    from digital_stain.core.nets.unet import AB_SCALE, lightness_input

    rng = np.random.default_rng(0)
    grays = [ndimage.gaussian_filter(rng.random((96, 96)), 4).astype(np.float32) for _ in range(6)]
    grays = [(g - g.min()) / np.ptp(g) for g in grays]
    sections = [_sections_coloured_by_slope(g) for g in grays]
    teacher, _ = train_teacher(sections, config(steps=200, batch=4, lr=3e-3, val_every=100, report_every=10),
                               names=[f"pair {i}" for i in range(6)], enhanced=grays)
    errors, flat = [], []
    with torch.no_grad():
        for gray, section in zip(grays, sections):
            ab = teacher(lightness_input(torch.from_numpy(gray)[None, None]))[0] * AB_SCALE
            target = rgb_to_lab(torch.from_numpy(section).permute(2, 0, 1)[None].float() / 255)[0, 1:]
            errors.append(float((ab[0] - target[0]).abs().mean()))  # a*: the slope's colour
            flat.append(float(target[0].abs().mean()))
    assert np.mean(errors) < 0.3 * np.mean(flat), (np.mean(errors), np.mean(flat))
