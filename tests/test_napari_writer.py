"""The napari writer (npe2 ``writers``): stained layers, lazy pyramids included, saved as OME-Zarr from a real viewer."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from digital_stain.core.arrays import to_uint8
from digital_stain.io.multiscale import read_pyramids
from digital_stain.slide.store import read_state

PLUGIN = "napari-digital-stain"


@pytest.fixture
def viewer_and_widget(tiny_stain_widget):
    return tiny_stain_widget


def _stain(qtbot, widget, mode: str) -> None:
    widget.mode.setCurrentIndex(widget.mode.findData(mode))
    widget.run_button.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)


def test_the_stains_of_an_image_are_saved_where_they_lie(viewer_and_widget, qtbot, tmp_path):
    viewer, widget = viewer_and_widget
    viewer.open_sample(PLUGIN, "darkfield")  # 256 x 256 at 0.345 um
    source = viewer.layers["dark-field sample"]
    source.translate = (100.0, 50.0)
    _stain(qtbot, widget, "now")
    outputs = [viewer.layers[f"{source.name} {name}"] for name in ("enhanced", "teacher", "student")]
    viewer.layers.selection = set(outputs)
    path = tmp_path / "stained.ome.zarr"
    written = viewer.layers.save(str(path), selected=True, plugin=PLUGIN)
    assert written == [str(path)] and read_state(path)["complete"]
    pyramids = {p.name: p for p in read_pyramids(path)}
    assert sorted(pyramids) == ["enhanced", "student", "teacher"]
    for layer in outputs:
        name = layer.metadata["digital_stain"]["output"]
        expected = to_uint8(layer.data[..., 0] if name == "enhanced" else layer.data)
        np.testing.assert_array_equal(pyramids[name].levels[0].compute(), expected)
        np.testing.assert_allclose(pyramids[name].scale, source.scale)
        np.testing.assert_allclose(pyramids[name].translate, source.translate)
    assert read_state(path)["made_by"]["model"] == "tiny-test"
    # the saved store opens again, through this plugin's reader, on the same place
    viewer.open(str(path), plugin=PLUGIN)
    np.testing.assert_allclose(viewer.layers["stained student"].translate, source.translate)


def test_a_lazily_stained_layer_is_saved_whole(viewer_and_widget, qtbot, darkfield_tile, tmp_path):
    viewer, widget = viewer_and_widget
    widget.tile.setValue(256)
    slide = da.tile(da.from_array(darkfield_tile, chunks=(256, 256, 3)), (3, 2, 1))  # 768 x 512, never stained whole
    viewer.add_image(slide, rgb=True, name="slide")
    _stain(qtbot, widget, "lazy")
    student = viewer.layers["slide student"]
    assert student.multiscale
    viewer.layers.selection = {student}
    path = tmp_path / "lazy.ome.zarr"
    assert viewer.layers.save(str(path), selected=True, plugin=PLUGIN) == [str(path)]
    (saved,) = read_pyramids(path)
    np.testing.assert_array_equal(saved.levels[0].compute(), to_uint8(np.asarray(student.data[0])))


def test_a_layer_that_is_not_a_stain_is_refused_by_name(viewer_and_widget, tmp_path):
    from napari.utils.notifications import NotificationSeverity, notification_manager

    viewer, _ = viewer_and_widget
    viewer.open_sample(PLUGIN, "darkfield")
    viewer.layers.selection = {viewer.layers["dark-field sample"]}
    start = len(notification_manager.records)
    with pytest.warns(UserWarning, match="did not return any written paths"):  # napari's own words after ours
        assert viewer.layers.save(str(tmp_path / "x.ome.zarr"), selected=True, plugin=PLUGIN) == []
    errors = [str(n.message) for n in notification_manager.records[start:] if n.severity == NotificationSeverity.ERROR]
    assert len(errors) == 1 and "not a stained output of Digitally stain" in errors[0]
    assert not [p for p in tmp_path.iterdir() if "x.ome.zarr" in p.name]  # no store, no partial folder
