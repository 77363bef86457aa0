"""Fine-tuning through one library function (CLI and napari widget): in-memory data, callbacks, previews, stop.

Real training steps on the tiny random-weight model and the shipped sample tiles.
"""

import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from digital_stain.core.arrays import InputError
from digital_stain.train.data import images_from_arrays, load_rgb_folder
from digital_stain.train.finetune import FineTuneResult, default_output_name, default_size, fine_tune, preview_student
from digital_stain.train.student import StudentConfig, train_student

FAST = dict(disc_width=8, report_every=1)  # fine_tune config_overrides that keep tests quick


def tiny_config(**overrides):
    base = dict(steps=4, batch=1, crop=64, disc_width=8, val_every=2, report_every=1, precision="fp32", device="cpu")
    return StudentConfig.preset("tiny", **{**base, **overrides})


def _folder_arrays(folder):
    paths = sorted(folder.glob("*.png"))
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths], [p.name for p in paths]


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# -- in-memory images ---------------------------------------------------------
def test_arrays_become_the_same_rgb_uint8_as_folder_images(darkfield_dir, tmp_path):
    rgb, names = _folder_arrays(darkfield_dir)
    folder = load_rgb_folder(darkfield_dir, min_side=64, kind="dark-field")
    memory = images_from_arrays(rgb, names, min_side=64)
    assert memory.names == folder.names and memory.folder is None and "in memory" in memory.summary()
    for a, b in zip(memory.images, folder.images):
        assert a.dtype == np.uint8 and np.array_equal(a, b)

    # 16-bit gray, as a file and in memory, ends up the same 8-bit RGB
    gray16 = np.asarray(Image.fromarray(rgb[0]).convert("L")).astype(np.uint16) * 256 + 100
    gray_dir = tmp_path / "gray16"
    gray_dir.mkdir()
    Image.fromarray(gray16).save(gray_dir / "g.png")
    from_file = load_rgb_folder(gray_dir, min_side=64, kind="dark-field").images[0]
    from_memory = images_from_arrays([gray16], min_side=64).images[0]
    assert from_memory.shape == (256, 256, 3) and np.array_equal(from_file, from_memory)

    # a stack gives one image per plane (one scaling for the whole stack); a lone ndarray is one image
    stack = np.stack([rgb[1], rgb[2]])
    planes = images_from_arrays([stack, rgb[0].astype(np.float32) / 255], ["stack", "float"], min_side=64)
    assert planes.names == ["stack [plane 0]", "stack [plane 1]", "float"]
    assert np.array_equal(planes.images[1], rgb[2]) and np.array_equal(planes.images[2], rgb[0])
    assert len(images_from_arrays(stack, min_side=64).images) == 2


def test_arrays_too_small_or_unusable_are_refused_with_what_to_do(darkfield_tile):
    small = [darkfield_tile[:40, :40], darkfield_tile[:50]]
    with pytest.raises(InputError, match=r"no usable dark-field image.*2 smaller than 64 px.*larger images or choose a smaller crop"):
        images_from_arrays(small, min_side=64)
    mixed = images_from_arrays([darkfield_tile[:40], darkfield_tile, np.zeros((80, 80, 5), np.uint8)],
                               ["small", "good", "five"], min_side=64)
    assert mixed.names == ["good"]
    assert mixed.skipped == {"smaller than 64 px": ["small"], "not gray or RGB": ["five"]}
    with pytest.raises(InputError, match="not RGB"):
        images_from_arrays([darkfield_tile[..., 0]], min_side=64, kind="H&E")  # H&E must be colour
    with pytest.raises(InputError, match="NaN"):
        images_from_arrays([np.full((80, 80), np.nan)], min_side=64)
    with pytest.raises(InputError, match="one name per image"):
        images_from_arrays([darkfield_tile], ["a", "b"], min_side=64)
    with pytest.raises(InputError, match="no dark-field images were given"):
        images_from_arrays([], min_side=64)


def test_train_student_refuses_a_list_of_only_small_images(tiny_model, hne_dir, darkfield_tile):
    with pytest.raises(InputError, match="smaller than 64 px"):
        train_student(tiny_model, [darkfield_tile[:32, :32]] * 3, hne_dir, tiny_config())


@pytest.mark.slow
def test_in_memory_arrays_train_like_the_folder(tiny_model, darkfield_dir, hne_dir, darkfield_tile):
    rgb, names = _folder_arrays(darkfield_dir)
    from_folder, folder_result = train_student(tiny_model, darkfield_dir, hne_dir, tiny_config(steps=2))
    from_memory, memory_result = train_student(tiny_model, rgb, hne_dir, tiny_config(steps=2), darkfield_names=names)
    assert _same_weights(from_folder, from_memory) and folder_result.history == memory_result.history

    # mixed dtypes and a stack: uint8 RGB, uint16 gray, a 2-plane uint8 stack
    gray16 = rgb[1].mean(-1).astype(np.uint16) * 257
    _, result = train_student(tiny_model, [rgb[0], gray16, np.stack([rgb[2], darkfield_tile])], hne_dir,
                              tiny_config(steps=2))
    assert result.steps_done == 2 and not result.cancelled and result.best_step is not None


# -- callback and preview -----------------------------------------------------
@pytest.mark.slow
def test_callback_every_step_and_preview_do_not_change_training(tiny_model, darkfield_dir, hne_dir, darkfield_tile):
    from digital_stain.core.nets import record_statistics

    plain, _ = train_student(tiny_model, darkfield_dir, hne_dir, tiny_config())
    steps, previews, modes = [], [], []
    crop = darkfield_tile[:64, :48]
    probe = torch.rand(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1  # not the global RNG

    def callback(step, student):
        modes.append(student.training)  # the live student is in training mode when handed over
        steps.append(step)
        previews.append(preview_student(tiny_model.enhancer, student, crop))
        # a careless callee: records norm statistics on the live student (which keeps nothing of them) and
        # leaves eval mode and no grad behind; train_student restores those
        student.eval()
        assert len(record_statistics(student, probe)) > 0
        torch.set_grad_enabled(False)

    watched, result = train_student(tiny_model, darkfield_dir, hne_dir, tiny_config(), callback=callback)
    assert torch.is_grad_enabled()
    assert steps == [1, 2, 3, 4] and all(modes) and result.steps_done == 4
    for image in previews:
        assert image.shape == (64, 48, 3) and image.dtype == np.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
    assert not np.array_equal(previews[0], previews[-1])  # it shows the student as it learns
    assert _same_weights(plain, watched)  # same seed, with and without previews: identical student


def test_preview_leaves_the_student_as_it_was(tiny_model, darkfield_tile):
    student = tiny_model.student.train()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    attributes = [(name, {k: v for k, v in vars(m).items() if not k.startswith("_")}, list(m._buffers))
                  for name, m in student.named_modules()]
    probe = torch.rand(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        plain = student(probe)  # no statistics: each image by its own
    out = preview_student(tiny_model.enhancer, student, darkfield_tile[:40, :56, 0].astype(np.uint16) * 200)
    assert out.shape == (40, 56, 3) and 0.0 <= out.min() and out.max() <= 1.0
    assert student.training and all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    # nothing kept on the student (no statistics, no new attributes or buffers), and a plain call is as before
    assert attributes == [(name, {k: v for k, v in vars(m).items() if not k.startswith("_")}, list(m._buffers))
                          for name, m in student.named_modules()]
    with torch.no_grad():
        assert torch.equal(student(probe), plain)
    expected = tiny_model.stain(darkfield_tile[:40, :56, 0].astype(np.uint16) * 200, ["student"], precision="fp32")
    assert np.allclose(out, expected["student"], atol=1e-6)  # the same staining as the model's


# -- fine_tune ------------------------------------------------------------------
@pytest.mark.slow
def test_fine_tune_returns_a_model_with_provenance(tiny_model, tiny_model_file, darkfield_dir, hne_dir, tmp_path):
    from digital_stain.stain.model import StainModel

    rgb, names = _folder_arrays(darkfield_dir)
    events = []
    tuned = fine_tune(tiny_model, rgb, hne_dir, size="fast", steps=2, crop=64, device="cpu", precision="fp32",
                      darkfield_names=[f"layer {n}" for n in names], command="napari Fine-tune widget",
                      progress=events.append, config_overrides=dict(FAST, val_every=1), teacher_steps=0)
    assert isinstance(tuned, FineTuneResult) and tuned.model is not None and tuned.seconds >= 0
    assert tuned.notes == ["fine-tuning the student of tiny-test (width 8, 2 blocks) (--size fast ignored); "
                           "--from-scratch starts a new one"]
    assert any(e.message == tuned.notes[0] for e in events)  # without on_note, notes go to progress
    assert tuned.summary.startswith(f"chosen at step {tuned.result.best_step}: ") and "structure" in tuned.summary
    meta = tuned.model.metadata
    assert meta["name"] == "tiny-test-finetuned"
    student = meta["provenance"]["student"]
    assert meta["provenance"]["command"] == "napari Fine-tune widget"
    assert [d["name"] for d in student["darkfield"]["in_memory"]] == [f"layer {n}" for n in names]
    assert student["darkfield"]["in_memory"][0]["shape"] == [256, 256, 3]
    assert student["stained"] == str(hne_dir) and student["init"] == str(tiny_model_file)  # saved there by the fixture
    assert student["steps"] == 2 and student["best_step"] == tuned.result.best_step in (1, 2)
    assert [h["step"] for h in student["history"]] == [1, 2] and student["config"]["width"] == 8
    out = tuned.model.stain(rgb[0][:64, :64], ["student"], precision="fp32")["student"]
    assert out.shape == (64, 64, 3)
    assert tuned.model.student is not tiny_model.student and tuned.model.teacher is tiny_model.teacher
    path = tmp_path / "tuned.safetensors"
    tuned.model.save(path)
    loaded = StainModel.load(path)
    assert loaded.metadata["provenance"]["student"]["best_step"] == tuned.result.best_step
    # the reverse generator F that trained beside the student is kept (tutorship translates with it)
    assert loaded.reverse is not None and loaded.reverse.config["in_channels"] == 3
    for key, value in tuned.result.parts["reverse"].state_dict().items():
        torch.testing.assert_close(loaded.reverse.state_dict()[key], value, msg=key)

    # a model file as init, a folder of data, from scratch: the asked size, notes to on_note
    said = []
    fresh = fine_tune(str(tiny_model_file), darkfield_dir, hne_dir, size="tiny", from_scratch=True, steps=1, crop=64,
                      device="cpu", precision="fp32", name="mine", on_note=said.append, config_overrides=FAST,
                      teacher_steps=4)
    assert fresh.model.name == "mine" and fresh.notes == said == []
    record = fresh.model.metadata["provenance"]["fine_tune"]
    assert record["teacher"]["steps"] == 4 and "passed" in record["check"] and "darkfield" in record["enhancer"]
    assert record["enhancer"]["student_inputs"] == "the training dark-field's own"  # a new student: no mapping
    provenance = fresh.model.metadata["provenance"]["student"]
    assert provenance["darkfield"] == str(darkfield_dir) and provenance["init"] == str(tiny_model_file)
    assert (provenance["config"]["width"], provenance["config"]["blocks"]) == (8, 2)


@pytest.mark.slow
def test_stop_at_a_step_returns_the_chosen_state(tiny_model, darkfield_dir, hne_dir):
    stop = threading.Event()
    states, stopped_at = {}, []

    def callback(step, student):
        states[step] = {k: v.detach().clone() for k, v in student.state_dict().items()}
        if step == 3:
            stop.set()
            stopped_at.append(time.perf_counter())

    tuned = fine_tune(tiny_model, darkfield_dir, hne_dir, steps=1000, crop=64, device="cpu", precision="fp32",
                      stop=stop, callback=callback, config_overrides=dict(FAST, val_every=2), teacher_steps=0)
    # within a step (here: no further step at all), then the chosen state is checked on the held-out image
    assert time.perf_counter() - stopped_at[0] < 15.0
    assert tuned.result.cancelled and tuned.result.steps_done == 3 and sorted(states) == [1, 2, 3]
    assert tuned.result.best_step == 2 and tuned.model is not None  # the validated step 2, not step 3
    chosen = tuned.model.student.state_dict()
    assert all(torch.equal(chosen[k], v) for k, v in states[2].items())
    assert tuned.model.metadata["provenance"]["student"]["cancelled"] is True


@pytest.mark.slow
def test_stop_before_the_first_validation_or_while_caching_gives_no_model(tiny_model, darkfield_dir, hne_dir):
    common = dict(steps=1000, crop=64, device="cpu", precision="fp32", config_overrides=dict(FAST, val_every=500),
                  teacher_steps=0)
    stop = threading.Event()
    tuned = fine_tune(tiny_model, darkfield_dir, hne_dir, stop=stop,
                      callback=lambda step, student: step == 2 and stop.set(), **common)
    assert tuned.result.cancelled and tuned.result.steps_done == 2 and tuned.result.best_step is None
    assert tuned.model is None and "before the first validation" in tuned.summary

    stop = threading.Event()

    def stop_while_caching(p):
        if p.message.startswith("teacher outputs cached: 1/"):
            stop.set()

    started = time.perf_counter()
    tuned = fine_tune(tiny_model, darkfield_dir, hne_dir, stop=stop, progress=stop_while_caching, **common)
    assert tuned.model is None and tuned.result.cancelled and tuned.result.steps_done == 0
    stop = threading.Event()
    stop.set()  # before it starts: returns without loading anything
    tuned = fine_tune("no-such-model", darkfield_dir, hne_dir, stop=stop, **common)
    assert tuned.model is None and tuned.result.cancelled and time.perf_counter() - started < 30


@pytest.mark.slow
def test_stop_during_validation_is_prompt_and_resume_makes_it_up(tiny_model, darkfield_dir, hne_dir, tmp_path,
                                                                 monkeypatch):
    import digital_stain.train.student as student_module

    config = tiny_config(steps=4, val_every=2, pool_size=2)
    straight, straight_result = train_student(tiny_model, darkfield_dir, hne_dir, config)
    real = student_module.validation_scores
    stop = threading.Event()

    def stop_inside(student, items, device, reference_lab=None, stop_event=None):
        stop.set()  # as if the user pressed Stop while the held-out images are being stained
        return real(student, items, device, reference_lab, stop_event)

    monkeypatch.setattr(student_module, "validation_scores", stop_inside)
    ckpt = tmp_path / "s.ckpt.safetensors"
    _, partial = train_student(tiny_model, darkfield_dir, hne_dir, config, checkpoint=ckpt, stop=stop)
    assert partial.cancelled and partial.steps_done == 2 and partial.best_step is None and partial.history == []
    monkeypatch.setattr(student_module, "validation_scores", real)
    resumed, result = train_student(tiny_model, darkfield_dir, hne_dir, config, checkpoint=ckpt, resume=True)
    assert result.history == straight_result.history and result.best_step == straight_result.best_step
    assert _same_weights(straight, resumed)


# -- helpers ----------------------------------------------------------------------
def test_default_output_name_and_size():
    assert default_output_name("dsd-unpaired") == "dsd-unpaired-finetuned"
    assert default_output_name("models/dsd-unpaired.safetensors") == "dsd-unpaired-finetuned"
    assert default_output_name("dsd-unpaired-finetuned") == "dsd-unpaired-finetuned-2"
    assert default_output_name("dsd-unpaired-finetuned-2") == "dsd-unpaired-finetuned-3"
    assert default_size("cpu") == "small"


def test_fine_tune_refuses_a_model_without_teacher(tiny_model, darkfield_dir, hne_dir):
    from digital_stain.stain.model import StainModel

    with pytest.raises(InputError, match="no teacher"):
        fine_tune(StainModel(tiny_model.enhancer), darkfield_dir, hne_dir, size="tiny", steps=1, crop=64,
                  device="cpu", precision="fp32")


def test_fine_tune_checks_overridden_settings_before_any_work(tiny_model, darkfield_dir, hne_dir):
    with pytest.raises(InputError, match="ema_decay must be in"):
        fine_tune(tiny_model, darkfield_dir, hne_dir, size="tiny", steps=1, crop=64, device="cpu",
                  config_overrides={"ema_decay": 1.5})


# -- the stages: enhancer, teacher, student, check --------------------------------------------
def _brighter(folder, tmp_path, gain=6):
    """A copy of a dark-field folder as another, brighter microscope would see it."""
    out = tmp_path / f"{folder.name}-x{gain}"
    out.mkdir()
    for path in sorted(folder.glob("*.png")):
        image = np.asarray(Image.open(path).convert("RGB")).astype(np.float64) * gain
        Image.fromarray(np.clip(np.round(image), 0, 255).astype(np.uint8)).save(out / path.name)
    return out


@pytest.mark.slow
def test_every_stage_adapts_its_part_in_order(tiny_model, darkfield_dir, hne_dir, tmp_path):
    from digital_stain.core.enhance import Enhancer
    from digital_stain.train.finetune import STAGES

    bright = _brighter(darkfield_dir, tmp_path)
    events, told = [], []
    tuned = fine_tune(tiny_model, bright, hne_dir, steps=2, crop=64, device="cpu", precision="fp32",
                      teacher_steps=6, progress=events.append, config_overrides=dict(FAST, val_every=2),
                      on_enhancer=told.append)
    stages = [e.stage for e in events if e.stage]
    assert [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s] == list(STAGES)  # each once, in order
    teacher_steps = [e.step for e in events if e.stage == "teacher" and e.total]
    assert teacher_steps[-1] == 6 and all(e.total == 6 for e in events if e.stage == "teacher" and e.total)
    assert [e.step for e in events if e.stage == "check"] == [1, 2]
    model = tuned.model
    # 1. the enhancer: both CDFs refitted on the lab's images; the student keeps the inputs it knows
    fitted = Enhancer.from_folders(bright, hne_dir)
    assert model.enhancer.darkfield.same_as(fitted.darkfield)
    np.testing.assert_array_equal(model.enhancer.brightfield_counts, fitted.brightfield_counts)
    assert model.enhancer.student_inputs.same_as(tiny_model.enhancer.darkfield)
    assert told == [model.enhancer]  # what previews need, told once the stage is done
    # 2. the teacher: fine-tuned from the init's, which is left as it was
    assert not _same_weights(model.teacher, tiny_model.teacher)
    assert tuned.teacher_result.steps_done == 6 and tuned.teacher_result.best_step is not None
    # 3. the student's inputs: the lab's bright channels, mapped onto the dim ones it was trained on
    image = np.asarray(Image.open(sorted(bright.glob("*.png"))[0]).convert("RGB"))
    prep = model.preparation(image, adapt="auto")
    assert not prep.adaptation.applied and prep.maps is not None  # its own microscope now, mapped all the same
    assert prep.student_rgb(prep.unit_rgb(image, True)).mean() < 0.5 * prep.unit_rgb(image, True).mean()
    # 4. the check, and everything in the provenance
    record = model.metadata["provenance"]["fine_tune"]
    assert tuned.accepted and record["check"]["passed"] and record["teacher"]["steps"] == 6
    assert record["enhancer"]["darkfield"]["refitted"] and record["enhancer"]["mode"] == "auto"
    assert record["enhancer"]["brightfield"]["refitted"]  # c_b goes with the teacher, which was fine-tuned
    assert record["enhancer"]["student_inputs"] == "mapped onto the starting student's"
    assert "checked on 1 held-out image(s)" in tuned.summary
    from digital_stain.stain.model import StainModel

    path = tmp_path / "tuned.safetensors"
    model.save(path)
    again = StainModel.load(path)
    assert again.enhancer.student_inputs.same_as(model.enhancer.student_inputs)
    np.testing.assert_array_equal(again.preparation(image).maps, prep.maps)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["enhancer", "teacher", "check"])
def test_stop_in_any_stage_ends_it_without_a_model(tiny_model, darkfield_dir, hne_dir, stage):
    stop = threading.Event()
    seen = []

    def progress(p):
        seen.append(p.stage)
        if p.stage == stage and (stage != "teacher" or p.step >= 3) and (stage != "check" or p.step == 1):
            stop.set()

    tuned = fine_tune(tiny_model, darkfield_dir, hne_dir, steps=2, crop=64, device="cpu", precision="fp32",
                      teacher_steps=20, progress=progress, stop=stop, config_overrides=dict(FAST, val_every=2))
    assert tuned.model is None and not tuned.accepted
    later = {"enhancer": "teacher", "teacher": "student", "check": None}[stage]
    assert later is None or later not in seen
    assert {"enhancer": "while fitting the enhancer", "teacher": "while fine-tuning the teacher (step 3 of 20)",
            "check": "while checking the tuned model"}[stage] in tuned.summary


@pytest.mark.slow
def test_a_fine_tune_stopped_in_the_teacher_stage_resumes_it_exactly(tiny_model, darkfield_dir, hne_dir, tmp_path):
    from digital_stain.train.finetune import teacher_checkpoint

    common = dict(steps=2, crop=64, device="cpu", precision="fp32", teacher_steps=8,
                  config_overrides=dict(FAST, val_every=2))
    straight = fine_tune(tiny_model, darkfield_dir, hne_dir, **common)
    stop = threading.Event()
    checkpoint = tmp_path / "tuned.ckpt.safetensors"
    first = fine_tune(tiny_model, darkfield_dir, hne_dir, checkpoint=checkpoint, stop=stop,
                      progress=lambda p: p.stage == "teacher" and p.step == 5 and stop.set(), **common)
    assert first.model is None and first.teacher_result.steps_done == 5
    assert teacher_checkpoint(checkpoint).is_file() and not checkpoint.exists()
    resumed = fine_tune(tiny_model, darkfield_dir, hne_dir, checkpoint=checkpoint, resume=True, **common)
    assert _same_weights(resumed.model.teacher, straight.model.teacher)
    assert _same_weights(resumed.model.student, straight.model.student)
    assert resumed.result.history == straight.result.history


def test_teacher_steps_are_checked(tiny_model, darkfield_dir, hne_dir):
    with pytest.raises(InputError, match="teacher_steps is a number of steps"):
        fine_tune(tiny_model, darkfield_dir, hne_dir, steps=1, crop=64, device="cpu", teacher_steps=-1)


@pytest.mark.parametrize("paired", [True, False])
def test_the_teacher_learns_from_the_sections_when_trained_paired_and_from_the_h_and_e_alone_otherwise(
        tiny_model, darkfield_dir, sections_dir, monkeypatch, paired):
    from digital_stain.train import finetune

    # the defaults' lengths (1000 and 300 steps) stand for themselves; four and three show which one is taken
    monkeypatch.setattr(finetune, "PAIRED_TEACHER_STEPS", 4)
    monkeypatch.setattr(finetune, "TEACHER_STEPS", 3)
    tuned = fine_tune(tiny_model, darkfield_dir, sections_dir, paired=paired, steps=1, crop=64, device="cpu",
                      precision="fp32", config_overrides=dict(FAST, val_every=1), check=False)
    record = tuned.model.metadata["provenance"]["fine_tune"]["teacher"]
    assert tuned.teacher_result.steps_done == record["steps"] == (4 if paired else 3)
    assert record["learnt_from"] == ("the enhanced dark-field and its adjacent section" if paired else
                                     "the H&E's own gray")


def test_the_enhancer_is_refitted_only_where_the_lab_differs(tiny_model, darkfield_tile, hne_dir, tmp_path):
    from digital_stain.train.data import load_rgb_folder
    from digital_stain.train.finetune import _fit_enhancer

    hne = load_rgb_folder(hne_dir, min_side=64).images
    same, decided = _fit_enhancer(tiny_model.enhancer, [darkfield_tile], hne, "auto", True, teacher_tuned=False)
    assert same is tiny_model.enhancer and not decided["darkfield"]["refitted"]  # its own microscope, its teacher
    assert "darkfield CDF kept" in decided["summary"] and "brightfield CDF kept" in decided["summary"]
    bright = [np.clip(darkfield_tile.astype(int) * 8, 0, 255).astype(np.uint8)]
    fitted, decided = _fit_enhancer(tiny_model.enhancer, bright, hne, "auto", True, teacher_tuned=False)
    assert decided["darkfield"]["refitted"] and not decided["brightfield"]["refitted"]
    assert decided["darkfield"]["distance"] > decided["darkfield"]["threshold"]
    assert fitted.student_inputs.same_as(tiny_model.enhancer.darkfield)
    np.testing.assert_array_equal(fitted.brightfield_counts, tiny_model.enhancer.brightfield_counts)
    # a teacher that learns the lab's H&E takes its c_b along (the gray it colours is that H&E's)
    other_hne = [np.ascontiguousarray(np.clip(im.astype(int) + 40, 0, 255).astype(np.uint8)) for im in hne]
    tuned, decided = _fit_enhancer(tiny_model.enhancer, [darkfield_tile], other_hne, "auto", True, teacher_tuned=True)
    assert not decided["darkfield"]["refitted"] and decided["brightfield"]["refitted"]
    assert not np.array_equal(tuned.brightfield_counts, tiny_model.enhancer.brightfield_counts)
    assert tuned.darkfield.same_as(tiny_model.enhancer.darkfield)
    forced, decided = _fit_enhancer(tiny_model.enhancer, [darkfield_tile], hne, "on", False, teacher_tuned=False)
    assert decided["darkfield"]["refitted"] and decided["brightfield"]["refitted"]
    assert forced.student_inputs is forced.darkfield  # a new student: its own inputs
    kept, _ = _fit_enhancer(tiny_model.enhancer, bright, hne, "off", True, teacher_tuned=True)
    assert kept is tiny_model.enhancer
