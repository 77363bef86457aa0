"""Student training (unpaired KD): real steps on tiny networks and the shipped sample tiles."""

import threading

import numpy as np
import pytest
import torch

from digital_stain.core.arrays import InputError
from digital_stain.train.student import ImagePool, StudentConfig, train_student


def tiny_config(**overrides):
    base = dict(steps=4, batch=1, crop=64, disc_width=8, val_every=2, report_every=1, precision="fp32", device="cpu")
    return StudentConfig.preset("tiny", **{**base, **overrides})


def test_presets_and_paper_loss_weights():
    full = StudentConfig.preset("full")
    assert (full.width, full.blocks) == (64, 9)
    assert (full.lambda_kd, full.lambda_cyc, full.lr) == (5.0, 80.0, 1e-4)
    with pytest.raises(InputError, match="preset"):
        StudentConfig.preset("huge")


def test_image_pool_keeps_history_and_is_deterministic():
    fakes = [torch.full((1, 3, 2, 2), float(i)) for i in range(10)]
    outs = []
    for _ in range(2):
        pool, rng = ImagePool(3), np.random.default_rng(0)
        outs.append(torch.cat([pool.query(f, rng) for f in fakes]))
    assert torch.equal(outs[0], outs[1])
    assert len(pool.images) == 3
    assert not torch.equal(outs[0], torch.cat(fakes))  # some queries returned older fakes


@pytest.mark.slow
def test_training_steps_progress_validation_and_same_seed_same_result(tiny_model, darkfield_dir, hne_dir):
    events = []
    net1, result = train_student(tiny_model, darkfield_dir, hne_dir, tiny_config(), progress=events.append)
    net2, _ = train_student(tiny_model, darkfield_dir, hne_dir, tiny_config())
    assert result.steps_done == 4 and not result.cancelled
    assert [h["step"] for h in result.history] == [2, 4]
    assert all(-1 <= h["structure"] <= 1 for h in result.history)
    steps = [e for e in events if e.total]
    assert steps[-1].step == 4 and {"adv", "kd", "cyc", "d"} <= set(steps[-1].losses)
    for a, b in zip(net1.state_dict().values(), net2.state_dict().values()):
        assert torch.equal(a, b)
    assert not net1.training


@pytest.mark.slow
def test_resume_equals_straight_run(tiny_model, darkfield_dir, hne_dir, tmp_path):
    # a pool of 2 fills before the stop and validations run before it, so pool, best state and history must all survive
    config = tiny_config(steps=6, val_every=1, pool_size=2)
    straight, straight_result = train_student(tiny_model, darkfield_dir, hne_dir, config)
    ckpt = tmp_path / "s.ckpt.safetensors"
    stop = threading.Event()

    def stop_at_3(p):
        if p.step >= 3:
            stop.set()

    _, partial = train_student(tiny_model, darkfield_dir, hne_dir, config, checkpoint=ckpt, progress=stop_at_3, stop=stop)
    assert partial.cancelled and partial.steps_done == 3 and ckpt.exists()
    resumed, result = train_student(tiny_model, darkfield_dir, hne_dir, config, checkpoint=ckpt, resume=True)
    assert result.steps_done == 6
    assert result.history == straight_result.history and result.best_step == straight_result.best_step
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(InputError, match="other settings.*crop 64 -> 32"):
        train_student(tiny_model, darkfield_dir, hne_dir, tiny_config(steps=6, val_every=1, pool_size=2, crop=32),
                      checkpoint=ckpt, resume=True)


def test_refuses_model_without_teacher_and_empty_folders(tiny_model, darkfield_dir, hne_dir, tmp_path):
    from digital_stain.stain.model import StainModel

    no_teacher = StainModel(tiny_model.enhancer)
    with pytest.raises(InputError, match="no teacher"):
        train_student(no_teacher, darkfield_dir, hne_dir, tiny_config())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no image files"):
        train_student(tiny_model, empty, hne_dir, tiny_config())


@pytest.mark.slow
def test_cli_train_writes_a_model_with_a_student(tiny_model_file, darkfield_dir, hne_dir, tmp_path, capsys):
    from digital_stain.cli import main
    from digital_stain.stain.model import StainModel

    output = tmp_path / "student.safetensors"
    argv = ["train", "--darkfield", str(darkfield_dir), "--stained", str(hne_dir), "--output", str(output),
            "--init", str(tiny_model_file), "--size", "tiny", "--steps", "2", "--crop", "64",
            "--precision", "fp32", "--device", "cpu", "-q"]
    assert main(argv) == 0, capsys.readouterr().err
    model = StainModel.load(output)
    assert model.outputs == ("enhanced", "teacher", "student")
    assert model.metadata["provenance"]["command"].startswith("digital-stain train --darkfield")
    assert model.metadata["provenance"]["student"]["steps"] == 2
    out = model.stain(np.zeros((64, 64, 3), np.uint8), ["student"], precision="fp32")["student"]
    assert out.shape == (64, 64, 3)
    assert main(argv) == 2  # the output exists now: refused without --overwrite


def _messy_folders(tmp_path, darkfield_dir, hne_dir):
    """RGBA H&E of mixed sizes plus a broken file; gray dark-field of mixed sizes plus a text file."""
    from PIL import Image

    stained, dark = tmp_path / "messy-hne", tmp_path / "messy-dark"
    stained.mkdir()
    dark.mkdir()
    for i, path in enumerate(sorted(hne_dir.glob("*.png"))):
        rgb = np.asarray(Image.open(path).convert("RGB"))[: 256 - 40 * i, : 200 + 20 * i]
        Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).save(stained / f"{i}.png")
    (stained / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    for i, path in enumerate(sorted(darkfield_dir.glob("*.png"))):
        gray = np.asarray(Image.open(path).convert("L"))[: 240 - 30 * i]
        Image.fromarray(gray).save(dark / f"{i}.png")
    (dark / "notes.txt").write_text("not an image")
    return dark, stained


@pytest.mark.slow
def test_rgba_gray_mixed_sizes_and_broken_files_train(tiny_model, darkfield_dir, hne_dir, tmp_path):
    from digital_stain.train.data import load_rgb_folder

    dark, stained = _messy_folders(tmp_path, darkfield_dir, hne_dir)
    loaded = load_rgb_folder(stained, min_side=64)
    assert len(loaded.images) == 3 and loaded.skipped == {"unreadable": ["broken.png"]}
    assert all(im.shape[-1] == 3 for im in loaded.images)  # alpha dropped
    assert "skipped 1 (unreadable)" in loaded.summary()
    _, result = train_student(tiny_model, dark, stained, tiny_config(steps=2, crop=128))
    assert result.steps_done == 2
    with pytest.raises(InputError, match="smaller than 300 px"):
        train_student(tiny_model, dark, stained, tiny_config(crop=300))


@pytest.mark.slow
def test_stop_returns_within_a_step_with_a_usable_student(tiny_model, darkfield_dir, hne_dir):
    import time

    stop = threading.Event()
    stopped_at = []

    def stop_at_3(p):
        if p.total and p.step >= 3 and not stop.is_set():
            stop.set()
            stopped_at.append(time.perf_counter())

    net, result = train_student(tiny_model, darkfield_dir, hne_dir, tiny_config(steps=1000, val_every=2),
                                progress=stop_at_3, stop=stop)
    returned = time.perf_counter()
    assert result.cancelled and result.steps_done == 3
    assert returned - stopped_at[0] < 5.0  # no further step, no waiting for the schedule
    assert result.best_step == 2  # the last validated state, not the unvalidated step 3
    out = net(torch.zeros(1, 4, 64, 64))
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


@pytest.mark.slow
def test_cli_ablation_flag_reaches_the_config(tiny_model_file, darkfield_dir, hne_dir, tmp_path, capsys):
    from digital_stain.cli import main
    from digital_stain.stain.model import StainModel

    output = tmp_path / "nokd.safetensors"
    # the tiny init model has a (width 8) student: --from-scratch must start a new one of the asked size
    assert main(["train", "--darkfield", str(darkfield_dir), "--stained", str(hne_dir), "--output", str(output),
                 "--init", str(tiny_model_file), "--size", "fast", "--from-scratch", "--steps", "2", "--crop", "64",
                 "--lambda-kd", "0", "--ema", "0.99", "--upsample", "bilinear", "--lambda-structure", "2",
                 "--device", "cpu", "-q"]) == 0
    written = StainModel.load(output)
    config = written.metadata["provenance"]["student"]["config"]
    assert config["lambda_kd"] == 0.0 and (config["width"], config["blocks"]) == (16, 4)
    assert config["ema_decay"] == 0.99 and config["upsample"] == "bilinear" and config["lambda_structure"] == 2.0
    assert written.student.config["upsample"] == "bilinear"  # the network built from the file is the trained one
    assert "chosen at step" in capsys.readouterr().err
    # a fine-tuned student keeps its architecture: asking for another upsampling is refused before any work
    assert main(["train", "--darkfield", str(darkfield_dir), "--stained", str(hne_dir), "--output",
                 str(tmp_path / "other.safetensors"), "--init", str(output), "--upsample", "nearest", "--steps", "2",
                 "--crop", "64", "--device", "cpu", "-q"]) == 2
    err = capsys.readouterr().err
    assert "upsamples by 'bilinear', not 'nearest'" in err and "--from-scratch" in err and "Traceback" not in err
    assert not (tmp_path / "other.safetensors").exists()
    tuned = tmp_path / "tuned.safetensors"
    assert main(["train", "--darkfield", str(darkfield_dir), "--stained", str(hne_dir), "--output", str(tuned),
                 "--init", str(tiny_model_file), "--size", "fast", "--steps", "2", "--crop", "64",
                 "--device", "cpu", "-q"]) == 0
    config = StainModel.load(tuned).metadata["provenance"]["student"]["config"]
    assert config["width"] == 8 and config["ema_decay"] == 0.99  # a fine-tune averages its weights (FINE_TUNE_EMA)
    assert "fine-tuning the student" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_stop_before_first_validation_writes_nothing_and_resume_finishes(
        tiny_model_file, darkfield_dir, hne_dir, tmp_path, capsys, monkeypatch):
    import digital_stain.train.student as student_module
    from digital_stain.cli import main
    from digital_stain.stain.model import StainModel

    output = tmp_path / "s.safetensors"
    argv = ["train", "--darkfield", str(darkfield_dir), "--stained", str(hne_dir), "--output", str(output),
            "--init", str(tiny_model_file), "--from-scratch", "--size", "tiny", "--steps", "4", "--crop", "64",
            "--device", "cpu", "-q"]
    real_cache = student_module.cache_teacher

    def cache_then_stop(model, darkfield, progress=None, stop=None):
        cached = real_cache(model, darkfield, progress, stop)
        stop.set()  # as a Ctrl-C right after the teacher outputs are cached
        return cached

    monkeypatch.setattr(student_module, "cache_teacher", cache_then_stop)
    assert main(argv) == 130
    assert "nothing written" in capsys.readouterr().err and not output.exists()
    monkeypatch.setattr(student_module, "cache_teacher", real_cache)
    assert main(argv + ["--resume"]) == 0
    assert StainModel.load(output).metadata["provenance"]["student"]["steps"] == 4


def test_default_size_is_the_cpu_preset_without_cuda():
    from digital_stain.cli import _default_size

    assert _default_size("cpu") == "small"


def test_update_ema_follows_early_then_averages():
    from digital_stain.train.student import update_ema

    live, average = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    for p in live.parameters():
        p.data.fill_(1.0)
    for p in average.parameters():
        p.data.fill_(0.0)
    update_ema(average, live, 0.999, step=0)  # warm-up: d = 1/10, so it moves 90 % of the way
    assert torch.allclose(average.weight, torch.full((2, 2), 0.9))
    update_ema(average, live, 0.5, step=10_000)  # past the warm-up the decay is the one asked for
    assert torch.allclose(average.weight, torch.full((2, 2), 0.95))
    with pytest.raises(InputError, match="ema_decay"):
        StudentConfig(ema_decay=1.0)
    with pytest.raises(InputError, match="reg_warmup is a number of steps"):
        StudentConfig(mode="paired", reg_warmup=-1)


@pytest.mark.slow
def test_ema_changes_only_the_judged_weights_and_resumes_exactly(tiny_model, darkfield_dir, hne_dir, tmp_path):
    config = tiny_config(steps=6, val_every=1, ema_decay=0.9)
    live_net, live = train_student(tiny_model, darkfield_dir, hne_dir, tiny_config(steps=6, val_every=1, ema_decay=0.0))
    averaged_net, averaged = train_student(tiny_model, darkfield_dir, hne_dir, config)
    # the same live training (the average draws no random numbers), judged on other weights
    assert [h["step"] for h in averaged.history] == [h["step"] for h in live.history]
    assert averaged.history[0]["kd_l1"] != live.history[0]["kd_l1"]
    for with_average, without in zip(averaged.history, live.history):  # live scores are recorded alongside
        assert with_average["live_kd_l1"] == without["kd_l1"]
        assert with_average["live_structure"] == without["structure"]
    assert any(not torch.equal(a, b) for a, b in zip(live_net.state_dict().values(), averaged_net.state_dict().values()))

    ckpt = tmp_path / "ema.ckpt.safetensors"
    stop = threading.Event()
    _, partial = train_student(tiny_model, darkfield_dir, hne_dir, config, checkpoint=ckpt, stop=stop,
                               progress=lambda p: p.step >= 3 and stop.set())
    assert partial.cancelled
    resumed_net, resumed = train_student(tiny_model, darkfield_dir, hne_dir, config, checkpoint=ckpt, resume=True)
    assert resumed.history == averaged.history and resumed.best_step == averaged.best_step
    for a, b in zip(averaged_net.state_dict().values(), resumed_net.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(InputError, match="ema_decay 0.9 -> 0.0"):
        train_student(tiny_model, darkfield_dir, hne_dir, tiny_config(steps=6, val_every=1, ema_decay=0.0),
                      checkpoint=ckpt, resume=True)


@pytest.mark.slow
def test_adversarial_from_leaves_the_discriminator_out_of_the_students_first_steps(tiny_model, darkfield_dir, hne_dir):
    # D trains (and its image pool fills) from the first step either way; before adversarial_from, G does not
    # learn from D, so a different pool (which changes only what D learns) cannot change G
    def student(**overrides):
        net, _ = train_student(tiny_model, darkfield_dir, hne_dir, tiny_config(steps=6, val_every=6, ema_decay=0.0,
                                                                                 **overrides))
        return list(net.state_dict().values())

    distilled = [student(adversarial_from=6, pool_size=pool) for pool in (0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(*distilled))
    adversarial = [student(adversarial_from=1, pool_size=pool) for pool in (0, 1)]
    assert any(not torch.equal(a, b) for a, b in zip(*adversarial))
    with pytest.raises(InputError, match="adversarial_from"):
        StudentConfig(adversarial_from=-1)
