"""Another microscope in napari: the Digitally stain widget's Adapt control, on a real viewer.

The dark-field is a real DSD_P tile (the lab's second, about 9x brighter set-up; tests/data/dsd_p),
stained with the shipped DSD_U model.
"""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from napari.utils.notifications import NotificationSeverity, notification_manager
from PIL import Image

from digital_stain._napari.models import load_model

PLUGIN = "napari-digital-stain"
DSD_P = Path(__file__).parent / "data" / "dsd_p" / "darkfield"


@pytest.fixture
def other_microscope() -> np.ndarray:
    with Image.open(sorted(DSD_P.glob("*.png"))[0]) as im:
        return np.asarray(im.convert("RGB"))


def _infos(start: int) -> list[str]:
    return [str(n.message) for n in notification_manager.records[start:] if n.severity == NotificationSeverity.INFO]


def test_another_microscopes_image_is_adapted_and_says_so(make_napari_viewer, qtbot, other_microscope):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Digitally stain")
    viewer.add_image(other_microscope, rgb=True, name="dsd_p tile")
    widget.model.set_value("dsd-unpaired-fast")
    assert widget.adapt.currentData() == "auto"
    start = len(notification_manager.records)
    widget.run_button.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    teacher = viewer.layers["dsd_p tile teacher"]
    info = teacher.metadata["digital_stain"]["adaptation"]
    assert info["applied"] and info["mode"] == "auto" and info["distance"] > info["threshold"]
    assert any("adapted to this input" in m for m in _infos(start)), _infos(start)
    assert "adapted" in widget.status.text()
    assert teacher.data.mean() > 0.3  # not the near-black stain of the unadapted model
    model = load_model("dsd-unpaired-fast", "cpu")
    expected = model.stain(other_microscope, ["teacher"], adapt="on")["teacher"]
    np.testing.assert_allclose(teacher.data, expected, atol=1e-5)

    widget.adapt.setCurrentIndex(widget.adapt.findData("off"))  # the user's choice wins, and is remembered
    widget.run_button.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    teacher = viewer.layers["dsd_p tile teacher"]
    assert teacher.metadata["digital_stain"]["adaptation"]["mode"] == "off"
    assert teacher.data.mean() < 0.2  # what adaptation prevents
    from digital_stain._napari import settings

    assert settings.load_settings("stain")["adapt"] == "off"


def test_a_lazy_layer_gets_one_mapping_for_every_chunk_and_level(make_napari_viewer, qtbot, other_microscope):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Digitally stain")
    mosaic = np.tile(other_microscope, (4, 4, 1))  # 1024 x 1024, chunks of 256: 16 chunks, 2 levels
    viewer.add_image(da.from_array(mosaic, chunks=(256, 256, 3)), rgb=True, name="slide")
    widget.model.set_value("dsd-unpaired-fast")
    widget.tile.setValue(256)
    widget.output_boxes["student"].setChecked(False)
    widget.output_boxes["enhanced"].setChecked(False)
    widget.run_button.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    layer = viewer.layers["slide teacher"]
    stains = widget.lazy_stains(layer)
    assert len(stains) >= 2 and all(s.prep.adaptation is stains[0].prep.adaptation for s in stains)
    assert stains[0].prep.adaptation.applied and layer.metadata["digital_stain"]["adaptation"]["applied"]
    for stain in stains:
        stain.close()
    level0 = np.asarray(stains[0].arrays["teacher"][:512, :512])  # read synchronously once closed
    eager = load_model("dsd-unpaired-fast", "cpu").stain(mosaic, ["teacher"], adapt=stains[0].prep.adaptation)
    np.testing.assert_allclose(level0, eager["teacher"][:512, :512], atol=0.02)  # chunked = one pass: no seams
