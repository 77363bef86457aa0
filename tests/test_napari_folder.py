"""**Stain a folder…** in the Digitally stain widget, on a real viewer: the CLI's folder staining in the background."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from napari.utils.notifications import NotificationSeverity, notification_manager
from PIL import Image

from digital_stain._napari.folder import output_folder


@pytest.fixture
def widget(tiny_stain_widget):
    _, widget = tiny_stain_widget
    widget.device.setCurrentText("cpu")
    return widget


def _messages(start: int, severity) -> list[str]:
    return [str(n.message) for n in notification_manager.records[start:] if n.severity == severity]


def test_a_folder_is_stained_in_the_background_with_a_summary(widget, qtbot, darkfield_dir, tmp_path):
    source = tmp_path / "slides"
    shutil.copytree(darkfield_dir, source)
    (source / "notes.png").write_bytes(b"not an image")  # skipped, with its reason
    output = output_folder(source, tmp_path)
    start = len(notification_manager.records)
    assert widget.stain_folder(source, output)
    assert widget.running and not widget.run_button.isEnabled()  # one job at a time
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    names = sorted(p.name for p in darkfield_dir.glob("*.png"))
    for kind in ("enhanced", "teacher", "student"):
        assert sorted(p.name for p in (output / kind).iterdir()) == names
    with Image.open(output / "student" / names[0]) as image:
        assert image.mode == "RGB" and image.size == (256, 256)
    warnings = _messages(start, NotificationSeverity.WARNING)
    assert any(f"stained {len(names)} image(s) into {output}" in m and "notes.png" in m for m in warnings)
    assert widget.progress.value() == 100 and len(widget.viewer.layers) == 0  # to disk, not to the viewer


def test_stop_leaves_nothing_and_an_existing_output_is_refused(widget, qtbot, darkfield_dir, tmp_path):
    source = tmp_path / "many"
    source.mkdir()
    for copy in range(8):  # 24 images: far more than can be stained before Stop is pressed
        for tile in darkfield_dir.glob("*.png"):
            shutil.copy2(tile, source / f"{copy}-{tile.name}")
    output = tmp_path / "out"
    assert widget.stain_folder(source, output)
    widget.stop()
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    assert widget.status.text() == "stopped; nothing was written." and not output.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging left either
    output.mkdir()
    (output / "mine.txt").write_text("a user's file")
    start = len(notification_manager.records)
    assert widget.stain_folder(darkfield_dir, output)
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    assert any("already exists" in m for m in _messages(start, NotificationSeverity.ERROR))
    assert (output / "mine.txt").read_text() == "a user's file"
