"""What a careless or unlucky user does in napari: each case ends in a clear message, a status line that
says what happened, and nothing raised into Qt (on a real viewer, under Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest
from napari.utils.notifications import NotificationSeverity, notification_manager

from digital_stain._napari.worker import running, stop_all

PLUGIN = "napari-digital-stain"


@pytest.fixture
def viewer_and_widget(make_napari_viewer, tiny_model_file):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Digitally stain")
    widget.device.setCurrentText("cpu")
    return viewer, widget


def _errors(start: int) -> list[str]:
    return [str(n.message) for n in notification_manager.records[start:] if n.severity == NotificationSeverity.ERROR]


def test_a_refused_model_goes_back_to_the_previous_choice_and_says_so(viewer_and_widget, tmp_path):
    viewer, widget = viewer_and_widget
    widget.model.set_value("dsd-unpaired-fast")
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a model")
    start = len(notification_manager.records)
    widget.model.set_value(str(bad))
    assert widget.model.value == "dsd-unpaired-fast"  # the user's previous choice, not the default
    assert any("broken.safetensors" in m and "Back to dsd-unpaired-fast" in m for m in _errors(start)), _errors(start)


def test_a_refused_input_ends_with_a_status_that_says_so(viewer_and_widget, qtbot, darkfield_tile):
    viewer, widget = viewer_and_widget
    image = darkfield_tile[:64, :64].astype(np.float32) / 255
    image[5, 5] = np.nan
    viewer.add_image(image, rgb=True, name="holes")
    start = len(notification_manager.records)
    assert widget.stain(viewer.layers["holes"]) is True  # refused in the worker, where the pixels are read
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    assert any("NaN" in m for m in _errors(start))
    assert widget.status.text().startswith("not stained:") and "NaN" in widget.status.text()
    assert not widget.status.text().endswith("…")  # no longer "staining 'holes'…"


def test_restaining_with_fewer_outputs_labels_the_earlier_ones(viewer_and_widget, qtbot, darkfield_tile,
                                                                tiny_model_file):
    viewer, widget = viewer_and_widget
    viewer.add_image(darkfield_tile[:64, :64], rgb=True, name="df")
    widget.model.set_value(str(tiny_model_file))
    widget.stain(viewer.layers["df"])
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    assert {"df enhanced", "df teacher", "df student"} <= {layer.name for layer in viewer.layers}
    widget.model.set_value("dsd-unpaired-fast")
    for name, box in widget.output_boxes.items():
        box.setChecked(name == "student")
    widget.stain(viewer.layers["df"])
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    names = {layer.name for layer in viewer.layers}
    assert "df student" in names
    assert viewer.layers["df student"].metadata["digital_stain"]["model"] == "dsd-unpaired-fast"
    assert {"df enhanced (earlier, tiny-test)", "df teacher (earlier, tiny-test)"} <= names, names
    assert "df enhanced" not in names and "df teacher" not in names


def test_closing_the_viewer_while_a_stain_runs_raises_nothing(make_napari_viewer, qtbot, darkfield_tile):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Digitally stain")
    widget.device.setCurrentText("cpu")
    viewer.add_image(np.tile(darkfield_tile, (3, 3, 1)), rgb=True, name="big")
    assert widget.stain(viewer.layers["big"]) is True
    viewer.close()  # from a script or notebook, mid-stain; qtbot fails the test on any exception raised in Qt
    stop_all()
    qtbot.waitUntil(lambda: running() == 0, timeout=60_000)


def test_closing_the_viewer_while_a_fine_tune_runs_raises_nothing(make_napari_viewer, qtbot, tiny_model_file, hne_dir,
                                                                   darkfield_tile):
    viewer = make_napari_viewer()
    _, tune = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    viewer.add_image(darkfield_tile, rgb=True, name="df")
    tune.model.set_value(str(tiny_model_file))
    tune.stained.set(str(hne_dir))
    tune.device.setCurrentText("cpu")
    tune.teacher_steps.setValue(0)
    tune.steps.setValue(100_000)
    assert tune.start()
    qtbot.waitUntil(lambda: tune.progress.value() >= 2, timeout=120_000)  # training, reporting progress
    viewer.close()  # the job's last reports (progress, done, finished) reach a deleted widget
    stop_all()
    qtbot.waitUntil(lambda: running() == 0, timeout=60_000)
