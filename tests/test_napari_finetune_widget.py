"""The Fine-tune dock widget on a real napari viewer: real training steps on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
from napari.utils.notifications import NotificationSeverity, notification_manager
from qtpy.QtCore import Qt

from digital_stain._napari import settings
from digital_stain._napari.finetune_widget import FineTuneWidget
from digital_stain.stain.model import StainModel

PLUGIN = "napari-digital-stain"


@pytest.fixture
def viewer_and_widgets(make_napari_viewer, tiny_model_file, hne_dir, darkfield_tile):
    viewer = make_napari_viewer()
    _, stain = viewer.window.add_plugin_dock_widget(PLUGIN, "Digitally stain")
    _, tune = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    viewer.add_image(darkfield_tile, rgb=True, name="df a")
    viewer.add_image(darkfield_tile[::-1].copy(), rgb=True, name="df b")
    tune.model.set_value(str(tiny_model_file))
    tune.stained.set(str(hne_dir))
    tune.device.setCurrentText("cpu")
    tune.teacher_steps.setValue(0)  # the teacher stage has its own test
    return viewer, stain, tune


def _errors(start: int) -> list[str]:
    return [str(n.message) for n in notification_manager.records[start:] if n.severity == NotificationSeverity.ERROR]


def test_fine_tuning_a_few_steps_writes_a_model_the_stain_widget_offers(viewer_and_widgets, qtbot):
    viewer, stain, tune = viewer_and_widgets
    assert isinstance(tune, FineTuneWidget)
    assert tune._ticked_names() == ["df a", "df b"]
    viewer.open_sample(PLUGIN, "stained_reference")
    assert tune._ticked_names() == ["df a", "df b"]  # the H&E sample is not dark-field: not ticked
    tune.steps.setValue(6)
    output = tune._output_path()
    assert output.parent == settings.models_dir()
    assert tune.start()
    qtbot.waitUntil(lambda: not tune.running, timeout=120_000)
    assert tune.last_output == output and output.is_file()
    model = StainModel.load(output, device="cpu")
    assert model.student is not None and model.student.config["width"] == 8  # the tiny start's student, tuned
    record = model.metadata["provenance"]["student"]
    assert record["steps"] == 6 and record["best_step"] == 6
    assert [d["name"] for d in record["darkfield"]["in_memory"]][:2] == ["df a", "df b"]
    assert stain.model.combo.findData(str(output)) >= 0  # offered at once
    assert stain.model.value == str(output)
    assert sum(len(v) for v in tune.plot.series.values()) > 0
    assert not tune.preview.pixmap().isNull()
    assert "wrote" in tune.status.text()
    assert not list((settings.data_dir() / "checkpoints").glob("*"))  # the spent checkpoint is gone


def test_stop_returns_within_seconds_and_keeps_the_best_state(viewer_and_widgets, qtbot):
    viewer, stain, tune = viewer_and_widgets
    tune.steps.setValue(100_000)
    tune.val_every = 5  # validate often, so a stop has validated states to choose from
    assert tune.start()
    qtbot.waitUntil(lambda: tune.progress.value() >= 12, timeout=120_000)
    tune.stop_button.click()
    qtbot.waitUntil(lambda: not tune.running, timeout=10_000)
    done = tune.last_result
    assert done.result.cancelled and done.result.best_step is not None and done.result.best_step % 5 == 0
    written = StainModel.load(tune.last_output, device="cpu").metadata["provenance"]["student"]
    assert written["cancelled"] and written["best_step"] == done.result.best_step
    assert written["steps"] == done.result.steps_done < 100_000
    assert "stopped early" in tune.status.text()
    assert tune.start_button.isEnabled()
    assert tune.eta.text() == ""  # no estimate outlives its run


def test_bad_folders_are_explained(viewer_and_widgets, qtbot, tmp_path):
    viewer, stain, tune = viewer_and_widgets
    empty = tmp_path / "empty"
    empty.mkdir()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not an image")
    for folder, expected in ((tmp_path / "missing", "does not exist"), (empty, "has no images"),
                             (notes, "has no images")):
        start = len(notification_manager.records)
        tune.stained.set(str(folder))
        assert tune.start() is False
        assert any(expected in m for m in _errors(start)), _errors(start)
    gray = tmp_path / "gray"
    gray.mkdir()
    from PIL import Image

    Image.fromarray(np.full((200, 200), 128, np.uint8)).save(gray / "g.png")
    tune.stained.set(str(gray))
    start = len(notification_manager.records)
    assert tune.start()  # found only by reading the images: reported from the worker
    qtbot.waitUntil(lambda: not tune.running, timeout=60_000)
    assert any("no usable H&E image" in m for m in _errors(start)), _errors(start)
    assert tune.start_button.isEnabled()


def test_no_layer_ticked_and_existing_output_are_refused(viewer_and_widgets):
    viewer, stain, tune = viewer_and_widgets
    for i in range(tune.layers.count()):
        tune.layers.item(i).setCheckState(Qt.CheckState.Unchecked)
    start = len(notification_manager.records)
    assert tune.start() is False
    assert any("no dark-field layer is ticked" in m for m in _errors(start))
    tune.reset_choices()
    existing = settings.models_dir() / "taken.safetensors"
    existing.parent.mkdir(parents=True)
    existing.write_bytes(b"x")
    tune.output.setText(str(existing))
    tune.layers.item(0).setCheckState(Qt.CheckState.Checked)
    start = len(notification_manager.records)
    assert tune.start() is False
    assert any("already exists" in m for m in _errors(start))


def test_paired_sections_train_with_learning_to_align(viewer_and_widgets, qtbot, hne_dir, darkfield_tile):
    viewer, stain, tune = viewer_and_widgets
    for layer in list(viewer.layers):
        viewer.layers.remove(layer)
    for path in sorted(hne_dir.glob("*.png")):  # dark-field layers named like their adjacent H&E sections
        viewer.add_image(darkfield_tile, rgb=True, name=path.stem)
    tune.pairing.setCurrentText("paired sections (same names)")
    tune.steps.setValue(3)
    assert tune.start()
    qtbot.waitUntil(lambda: not tune.running, timeout=120_000)
    record = StainModel.load(tune.last_output, device="cpu").metadata["provenance"]["student"]
    assert record["mode"] == "paired" and record["steps"] == 3
    viewer.layers[0].name = "not a section"  # now one layer has no section of its name
    start = len(notification_manager.records)
    tune._suggest_output()
    assert tune.start()
    qtbot.waitUntil(lambda: not tune.running, timeout=60_000)
    assert any("pair" in m for m in _errors(start)), _errors(start)


def _warnings(start: int) -> list[str]:
    return [str(n.message) for n in notification_manager.records[start:]
            if n.severity == NotificationSeverity.WARNING]


def test_the_stages_show_their_own_progress_in_order(viewer_and_widgets, qtbot):
    viewer, stain, tune = viewer_and_widgets
    tune.teacher_steps.setValue(6)
    tune.steps.setValue(4)
    tune.val_every = 2
    seen = []
    original = tune._stage_progress

    def watch(p):
        original(p)
        seen.append((p.stage, tune.stages.text()))

    tune._stage_progress = watch
    assert tune.start()
    assert tune.stages.text().startswith("1. enhancer · 2. teacher")  # shown from the start
    qtbot.waitUntil(lambda: not tune.running, timeout=120_000)
    order = [s for i, (s, _) in enumerate(seen) if i == 0 or seen[i - 1][0] != s]
    assert order == ["enhancer", "teacher", "student", "check"]
    teacher_texts = [text for stage, text in seen if stage == "teacher"]
    assert any("<b>2. teacher 3/6</b>" in t for t in teacher_texts) and "1. enhancer ✓" in teacher_texts[-1]
    assert tune.stages.text() == "1. enhancer ✓ · 2. teacher ✓ · 3. student ✓ · 4. check ✓"
    assert tune.last_output is not None and tune.eta.text() == ""
    record = StainModel.load(tune.last_output, device="cpu").metadata["provenance"]["fine_tune"]
    assert record["teacher"]["steps"] == 6 and record["check"]["passed"]


def test_teacher_steps_default_leaves_the_length_to_the_pairing(viewer_and_widgets, qtbot, monkeypatch):
    from digital_stain.train import finetune

    viewer, stain, tune = viewer_and_widgets
    tune.teacher_steps.setValue(tune.teacher_steps.minimum())
    assert tune.teacher_steps.text() == "default" and "1000 on adjacent sections" in tune.teacher_steps.toolTip()
    monkeypatch.setattr(finetune, "TEACHER_STEPS", 2)  # what fine_tune takes for unpaired layers (the real one: 300)
    tune.steps.setValue(2)
    tune.val_every = 2
    assert tune.start()
    qtbot.waitUntil(lambda: not tune.running, timeout=120_000)
    record = StainModel.load(tune.last_output, device="cpu").metadata["provenance"]["fine_tune"]
    assert record["teacher"]["steps"] == 2 and record["teacher"]["learnt_from"] == "the H&E's own gray"


@pytest.mark.parametrize("stage", ["teacher", "student"])
def test_stop_works_in_every_stage(viewer_and_widgets, qtbot, stage):
    viewer, stain, tune = viewer_and_widgets
    tune.teacher_steps.setValue(100_000 if stage == "teacher" else 0)
    tune.steps.setValue(100_000)
    tune.val_every = 3
    assert tune.start()
    qtbot.waitUntil(lambda: tune.stage_state.get(stage, "").count("/") and
                    int(tune.stage_state[stage].split("/")[0]) >= 4, timeout=120_000)
    tune.stop_button.click()
    qtbot.waitUntil(lambda: not tune.running, timeout=30_000)
    assert tune.stage_state[stage] == "stopped" and "3. student" in tune.stages.text()
    assert tune.eta.text() == ""  # no estimate outlives its run
    if stage == "teacher":
        assert tune.last_output is None and "while fine-tuning the teacher" in tune.status.text()
        assert "student" not in tune.stage_state
    else:  # the best validated state, checked and written
        assert tune.last_output is not None and "stopped early" in tune.status.text()
        assert tune.stage_state["check"] == "done"
    assert not list((settings.data_dir() / "checkpoints").glob("*"))


def test_a_broken_fine_tune_is_not_offered_and_the_starting_model_stays(viewer_and_widgets, qtbot, darkfield_dir):
    """The dark-field folder given as the H&E folder by mistake: the teacher learns to stain black."""
    viewer, stain, tune = viewer_and_widgets
    stain.model.set_value("dsd-unpaired-fast")
    tune.model.set_value("dsd-unpaired-fast")
    tune.stained.set(str(darkfield_dir))
    tune.teacher_steps.setValue(30)
    tune.steps.setValue(2)
    output = tune._output_path()
    start = len(notification_manager.records)
    assert tune.start()
    qtbot.waitUntil(lambda: not tune.running, timeout=180_000)
    warnings = _warnings(start)
    assert any("not better than the starting one" in w and "nearly black" in w for w in warnings), warnings
    assert not output.exists() and output.with_name(output.stem + ".rejected.safetensors").is_file()
    assert stain.model.value == "dsd-unpaired-fast"  # the starting model stays selected
    assert stain.model.combo.findData(str(output)) < 0
    assert "4. check failed" in tune.stages.text() and tune.last_output is None


def test_pairing_auto_trains_adjacent_sections_paired_and_says_so(viewer_and_widgets, qtbot):
    from pathlib import Path

    from PIL import Image

    sections = Path(__file__).parent / "data" / "dsd_p"
    viewer, stain, tune = viewer_and_widgets
    for layer in list(viewer.layers):
        viewer.layers.remove(layer)
    for path in sorted((sections / "darkfield").glob("*.png")):  # layers named like their sections' files
        viewer.add_image(np.asarray(Image.open(path).convert("RGB")), rgb=True, name=path.stem)
    tune.stained.set(str(sections / "stained"))
    assert tune.pairing.currentText() == "auto"  # the default
    tune.steps.setValue(2)
    start = len(notification_manager.records)
    assert tune.start()
    qtbot.waitUntil(lambda: not tune.running, timeout=120_000)
    said = [str(n.message) for n in notification_manager.records[start:] if n.severity == NotificationSeverity.INFO]
    assert any(m.startswith("paired sections:") and "Learning to Align" in m for m in said), said
    record = StainModel.load(tune.last_output, device="cpu").metadata["provenance"]
    assert record["student"]["mode"] == "paired" and record["fine_tune"]["pairing"]["pairs"] == 3
