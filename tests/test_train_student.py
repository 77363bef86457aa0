"""Student training (unpaired KD): real steps on tiny networks and the shipped sample tiles."""

import threading

import numpy as np
import pytest
import torch

from digital_stain.arrays import InputError
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
    straight, _ = train_student(tiny_model, darkfield_dir, hne_dir, tiny_config(val_every=4))
    ckpt = tmp_path / "s.ckpt.safetensors"
    stop = threading.Event()

    def stop_at_2(p):
        if p.step >= 2:
            stop.set()

    _, partial = train_student(tiny_model, darkfield_dir, hne_dir, tiny_config(val_every=4), checkpoint=ckpt,
                               progress=stop_at_2, stop=stop)
    assert partial.cancelled and partial.steps_done == 2 and ckpt.exists()
    resumed, result = train_student(tiny_model, darkfield_dir, hne_dir, tiny_config(val_every=4), checkpoint=ckpt,
                                    resume=True)
    assert result.steps_done == 4
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_refuses_model_without_teacher_and_empty_folders(tiny_model, darkfield_dir, hne_dir, tmp_path):
    from digital_stain.model import StainModel

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
    from digital_stain.model import StainModel

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
