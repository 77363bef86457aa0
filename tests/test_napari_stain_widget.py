"""The Digitally stain dock widget on a real napari viewer (under Xvfb)."""

from __future__ import annotations

import copy

import dask.array as da
import numpy as np
import pytest
import torch
from napari.utils.notifications import NotificationSeverity, notification_manager

from digital_stain._napari import settings
from digital_stain._napari.models import load_model
from digital_stain._napari.stain_widget import StainWidget

PLUGIN = "napari-digital-stain"


@pytest.fixture
def viewer_and_widget(make_napari_viewer):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Digitally stain")
    return viewer, widget


class Messages:
    """Notifications posted from now on."""

    def __init__(self):
        self.start = len(notification_manager.records)

    def of(self, severity) -> list[str]:
        return [str(n.message) for n in notification_manager.records[self.start:] if n.severity == severity]

    @property
    def errors(self) -> list[str]:
        return self.of(NotificationSeverity.ERROR)

    @property
    def warnings(self) -> list[str]:
        return self.of(NotificationSeverity.WARNING)


def _finish(qtbot, widget, timeout=120_000):
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)


def test_the_manifest_offers_the_widget(viewer_and_widget):
    viewer, widget = viewer_and_widget
    assert isinstance(widget, StainWidget)
    assert "Digitally stain (napari-digital-stain)" in viewer.window.dock_widgets
    assert widget.run_button.text() == "Digitally stain"


@pytest.mark.parametrize(("window", "shape"), [((1500, 950), (2, 2)), ((900, 950), (4, 1))],
                         ids=["landscape canvas", "narrow canvas"])
def test_side_by_side_chooses_the_grid_from_the_canvas(viewer_and_widget, window, shape):
    """Four images share the canvas in the grid that shows them largest, not always in one row."""
    from qtpy.QtWidgets import QApplication

    from digital_stain._napari.layers import canvas_size

    viewer, widget = viewer_and_widget
    for index in range(4):
        viewer.add_image(np.zeros((256, 256), np.float32), name=f"panel {index}")
    viewer.window._qt_window.showNormal()
    viewer.window._qt_window.resize(*window)
    for _ in range(20):  # let the canvas take its new size
        QApplication.processEvents()
    if widget.side_by_side.isChecked():
        widget.side_by_side.click()
    widget.side_by_side.click()
    assert viewer.canvas.grid.enabled and tuple(viewer.canvas.grid.shape) == shape, canvas_size(viewer)
    height, width = canvas_size(viewer)
    rows, columns = shape  # each panel shows the image larger than in a single row or column would
    zoom = min(height / rows, width / columns) / 256
    assert zoom >= max(min(height, width / 4), min(height / 4, width)) / 256


def test_grid_shape_fills_the_canvas():
    from digital_stain._napari.layers import grid_shape

    assert grid_shape(4, (700, 1200), (256, 256)) == (2, 2)
    assert grid_shape(4, (400, 1600), (256, 256)) == (1, 4)
    assert grid_shape(4, (1600, 400), (256, 256)) == (4, 1)
    assert grid_shape(3, (800, 1200), (1000, 500)) == (1, 3)  # tall images side by side
    assert grid_shape(2, None, (256, 256)) == (1, 2)  # unknown canvas: one row


def test_staining_the_sample_adds_three_registered_layers_side_by_side(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    viewer.open_sample(PLUGIN, "darkfield")
    source = viewer.layers["dark-field sample"]
    assert widget.input.currentText() == source.name
    widget.run_button.click()
    _finish(qtbot, widget)
    names = [layer.name for layer in viewer.layers]
    assert names == [source.name] + [f"{source.name} {o}" for o in ("enhanced", "teacher", "student")]
    for output in ("enhanced", "teacher", "student"):
        layer = viewer.layers[f"{source.name} {output}"]
        assert layer.rgb and layer.data.shape == (256, 256, 3) and layer.data.dtype == np.float32
        assert 0.0 <= layer.data.min() and layer.data.max() <= 1.0
        np.testing.assert_allclose(layer.scale, source.scale)
        np.testing.assert_allclose(layer.translate, source.translate)
        assert layer.units == source.units
        info = layer.metadata["digital_stain"]
        assert info["model"] == "dsd-unpaired" and len(info["checksum"]) == 64
        assert info["output"] == output and info["tile"] == widget.tile.value() and info["mode"] == "now"
    # the same as the library's own staining
    expected = load_model("dsd-unpaired", "cpu").stain(source.data, ["teacher"], tile=widget.tile.value())
    np.testing.assert_allclose(viewer.layers[f"{source.name} teacher"].data, expected["teacher"], atol=1e-5)
    assert viewer.canvas.grid.enabled and widget.side_by_side.isChecked()
    widget.side_by_side.click()
    assert not viewer.canvas.grid.enabled
    assert widget.progress.value() == 100


def test_staining_again_updates_the_layers_in_place(viewer_and_widget, qtbot, darkfield_tile):
    viewer, widget = viewer_and_widget
    viewer.add_image(darkfield_tile, name="df", rgb=True)
    widget.output_boxes["student"].setChecked(False)
    widget.output_boxes["teacher"].setChecked(False)
    widget.run_button.click()
    _finish(qtbot, widget)
    first = viewer.layers["df enhanced"]
    widget.run_button.click()
    _finish(qtbot, widget)
    assert [layer.name for layer in viewer.layers] == ["df", "df enhanced"]
    assert viewer.layers["df enhanced"] is first


def test_stop_returns_promptly_and_the_viewer_stays_usable(viewer_and_widget, qtbot, darkfield_tile):
    viewer, widget = viewer_and_widget
    viewer.add_image(np.tile(darkfield_tile, (8, 8, 1)), name="big", rgb=True)  # 2048 x 2048: many tiles
    widget.tile.setValue(256)
    widget.mode.setCurrentIndex(widget.mode.findData("now"))
    widget.run_button.click()
    qtbot.waitUntil(lambda: widget.progress.value() > 0, timeout=60_000)  # some tiles done, more to come
    widget.stop_button.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=10_000)
    assert [layer.name for layer in viewer.layers] == ["big"]
    assert "stopped" in widget.status.text()
    assert widget.run_button.isEnabled() and not widget.stop_button.isEnabled()
    viewer.add_image(darkfield_tile, name="small", rgb=True)
    widget.input_layer = viewer.layers["small"]
    widget.run_button.click()
    _finish(qtbot, widget)
    assert "small student" in viewer.layers


def test_labels_points_and_volumes_are_refused_with_a_notification(viewer_and_widget, darkfield_tile):
    viewer, widget = viewer_and_widget
    labels = viewer.add_labels(np.zeros((64, 64), np.uint8), name="mask")
    points = viewer.add_points([[1, 1]], name="spots")
    assert widget.input.count() == 0  # only image layers are offered
    for layer, kind in ((labels, "labels"), (points, "points")):
        messages = Messages()
        assert widget.stain(layer) is False
        assert any(f"is a {kind} layer" in m for m in messages.errors), messages.errors
    volume = viewer.add_image(np.random.default_rng(0).integers(0, 255, (16, 64, 64), dtype=np.uint8), name="vol")
    viewer.dims.ndisplay = 3
    messages = Messages()
    assert widget.stain(volume) is False
    assert any("3-D volume" in m and "2-D" in m for m in messages.errors)
    assert not widget.running and len(viewer.layers) == 3


def test_no_image_layer_and_no_output_are_explained(viewer_and_widget, darkfield_tile):
    viewer, widget = viewer_and_widget
    messages = Messages()
    assert widget.stain() is False
    assert any("no image layer" in m for m in messages.errors)
    viewer.add_image(darkfield_tile, rgb=True, name="df")
    for box in widget.output_boxes.values():
        box.setChecked(False)
    assert widget.stain() is False
    assert any("no output is ticked" in m for m in messages.errors)


def test_a_corrupt_model_file_is_reported_when_picked(viewer_and_widget, tmp_path):
    viewer, widget = viewer_and_widget
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"this is not a model file at all")
    messages = Messages()
    widget.model.set_value(str(bad))
    assert any("cannot use this model" in m and "broken.safetensors" in m for m in messages.errors), messages.errors
    assert widget.model.value == "dsd-unpaired"  # back to a usable model
    assert widget.model.combo.findData(str(bad)) == -1


def test_a_picked_model_file_is_used_and_remembered(viewer_and_widget, qtbot, tiny_model_file, darkfield_tile,
                                                      make_napari_viewer):
    viewer, widget = viewer_and_widget
    widget.model.set_value(str(tiny_model_file))
    widget.device.setCurrentText("cpu")
    widget.tile.setValue(768)
    viewer.add_image(darkfield_tile, rgb=True, name="df")
    widget.run_button.click()
    _finish(qtbot, widget)
    assert viewer.layers["df student"].metadata["digital_stain"]["model"] == "tiny-test"
    saved = settings.load_settings("stain")
    assert saved["model"] == str(tiny_model_file) and saved["tile"] == 768 and saved["device"] == "cpu"
    again = StainWidget(make_napari_viewer())
    assert again.model.value == str(tiny_model_file) and again.tile.value() == 768
    assert again.device.currentText() == "cpu"


class _OutOfMemoryOverTiles(torch.nn.Module):
    """Fault injection: the real teacher, except that tiles over 256 px raise CUDA's out-of-memory error."""

    def __init__(self, net):
        super().__init__()
        self.net, self.size_multiple, self.min_size, self.config = net, net.size_multiple, net.min_size, net.config

    def forward(self, x):
        if max(x.shape[-2:]) > 256:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
        return self.net(x)


def test_out_of_memory_falls_back_to_smaller_tiles_and_says_so(viewer_and_widget, qtbot, tiny_model_file,
                                                               darkfield_tile):
    viewer, widget = viewer_and_widget
    widget.model.set_value(str(tiny_model_file))
    widget.device.setCurrentText("cpu")
    model = load_model(str(tiny_model_file), "cpu")
    model.teacher = _OutOfMemoryOverTiles(model.teacher)
    viewer.add_image(np.tile(darkfield_tile, (3, 3, 1)), rgb=True, name="df")  # 768 px
    widget.tile.setValue(1024)
    messages = Messages()
    widget.run_button.click()
    _finish(qtbot, widget)
    assert any("ran out of memory with 1024-px tiles" in m for m in messages.warnings), messages.warnings
    info = viewer.layers["df teacher"].metadata["digital_stain"]
    assert info["tile"] == 256 and len(info["fallbacks"]) == 2
    assert viewer.layers["df teacher"].data.shape == (768, 768, 3)


def test_staining_never_touches_the_viewer_from_the_worker_thread(make_napari_viewer_proxy, qtbot, darkfield_tile):
    viewer = make_napari_viewer_proxy()  # raises if a plugin mutates the viewer off the main thread
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Digitally stain")
    viewer.add_image(darkfield_tile, rgb=True, name="df")
    widget.run_button.click()
    _finish(qtbot, widget)
    assert "df student" in viewer.layers


def test_stacks_are_stained_lazily_plane_by_plane(viewer_and_widget, qtbot, tiny_model_file, darkfield_tile):
    viewer, widget = viewer_and_widget
    widget.model.set_value(str(tiny_model_file))
    stack = np.stack([darkfield_tile, darkfield_tile[::-1], darkfield_tile[:, ::-1]])
    source = viewer.add_image(stack, rgb=True, name="timelapse")
    widget.run_button.click()
    _finish(qtbot, widget)
    layer = viewer.layers["timelapse student"]
    assert layer.data.shape == (3, 256, 256, 3) and isinstance(layer.data, da.Array)
    assert layer.metadata["digital_stain"]["mode"] == "lazy"
    assert layer.ndim == source.ndim == 3
    (stain,) = widget.lazy_stains(layer)
    assert stain.wait(60)
    shown = viewer.dims.current_step[0]
    computed = {key[0] for key in stain._cache["student"]}
    assert shown in computed and len(computed) < 3  # napari may touch plane 0 while adding; never all planes
    unseen = next(i for i in range(3) if i not in computed)
    viewer.dims.set_current_step(0, unseen)
    assert stain.wait(60) and unseen in {key[0] for key in stain._cache["student"]}
    np.testing.assert_allclose(
        np.asarray(layer.data[unseen]),
        load_model(str(tiny_model_file), "cpu").stain(stack[unseen], ["student"])["student"],
        atol=2 / 255)


def test_a_dask_8192_layer_returns_at_once_and_stains_only_the_viewed_chunks(make_napari_viewer, qtbot,
                                                                           tiny_model_file, darkfield_tile):
    viewer = make_napari_viewer(show=True)  # napari picks pyramid levels and regions only when it draws
    viewer.window.resize(1400, 900)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Digitally stain")
    widget.model.set_value(str(tiny_model_file))
    widget.tile.setValue(1024)
    big = da.tile(da.from_array(darkfield_tile, chunks=(256, 256, 3)), (32, 32, 1))  # 8192 x 8192, never in memory
    viewer.add_image(big, rgb=True, name="slide")
    widget.run_button.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)  # napari itself reads the whole input plane
    layer = viewer.layers["slide student"]
    assert layer.multiscale and layer.data[0].shape == (8192, 8192, 3)
    assert [level.shape[0] for level in layer.data] == [8192, 4096, 2048, 1024, 512]
    stains = widget.lazy_stains(layer)
    level0 = stains[0]
    coarse = np.asarray(layer.data[-1][:64, :64])  # napari keeps this level once read: it must be stained already
    assert not np.allclose(coarse[..., 0], coarse[..., 1])  # a placeholder would be gray (R = G = B)
    qtbot.waitUntil(lambda: all(s.pending == 0 for s in stains) and stains[-1].network_runs["student"] > 0,
                    timeout=60_000)
    assert level0.network_runs["student"] == 0  # the whole slide on screen: only the coarse level is stained
    for other in ("enhanced", "teacher"):
        viewer.layers[f"slide {other}"].visible = False
    viewer.canvas.grid.enabled = False
    camera = getattr(getattr(viewer, "scene", None), "camera", None) or viewer.camera  # napari >= 0.9 / before
    camera.center = (4100, 5100)
    camera.zoom = 2.0  # a few hundred pixels of level 0
    qtbot.waitUntil(lambda: layer.data_level == 0, timeout=120_000)
    qtbot.waitUntil(lambda: level0.network_runs["student"] > 0 and level0.pending == 0, timeout=60_000)
    assert level0.network_runs["student"] <= 4  # of 64 chunks: only those under the view
    before = level0.network_runs["student"]
    camera.center = (4101, 5101)  # panning within the view: every chunk comes from the cache
    qtbot.wait(300)
    assert level0.network_runs["student"] == before


def test_a_multiscale_layer_is_stained_level_by_level_as_given(viewer_and_widget, qtbot, tiny_model_file,
                                                               darkfield_tile):
    viewer, widget = viewer_and_widget
    widget.model.set_value(str(tiny_model_file))
    mosaic = np.tile(darkfield_tile, (4, 4, 1))  # 1024 px
    pyramid = [mosaic, mosaic[::2, ::2], mosaic[::4, ::4]]
    source = viewer.add_image(pyramid, rgb=True, multiscale=True, name="pyr", scale=(0.5, 0.5), units="um")
    assert widget.stain()
    _finish(qtbot, widget)
    layer = viewer.layers["pyr teacher"]
    assert layer.multiscale and [level.shape for level in layer.data] == [(1024, 1024, 3), (512, 512, 3),
                                                                          (256, 256, 3)]
    np.testing.assert_allclose(layer.scale, source.scale)
    assert layer.units == source.units
    stains = widget.lazy_stains(layer)
    assert len(stains) == 3
    coarse = stains[2]
    np.asarray(layer.data[2][:64, :64])  # read the coarsest level: placeholder at once, then the real one
    assert coarse.wait(60)
    expected = load_model(str(tiny_model_file), "cpu").stain(pyramid[2], ["teacher"])["teacher"]
    np.testing.assert_allclose(np.asarray(layer.data[2]), expected, atol=2 / 255)


def test_closing_an_output_layer_stops_its_background_work(viewer_and_widget, qtbot, tiny_model_file,
                                                           darkfield_tile):
    viewer, widget = viewer_and_widget
    widget.model.set_value(str(tiny_model_file))
    widget.mode.setCurrentIndex(widget.mode.findData("lazy"))
    widget.output_boxes["enhanced"].setChecked(False)
    widget.output_boxes["teacher"].setChecked(False)
    viewer.add_image(darkfield_tile, rgb=True, name="df")
    widget.run_button.click()
    _finish(qtbot, widget)
    layer = viewer.layers["df student"]
    (stain,) = widget.lazy_stains(layer)
    np.asarray(layer.data[:10, :10])  # queues a chunk
    viewer.layers.remove(layer)
    assert widget.lazy_stains(layer) == [] and stain.closed
    assert stain.wait(30) and stain._worker is None  # the worker ended
    runs = stain.network_runs["student"]
    stain.cancel_pending()
    assert stain.network_runs["student"] == runs


def test_stop_drops_waiting_chunks_but_keeps_lazy_layers_usable(viewer_and_widget, qtbot, tiny_model_file,
                                                                darkfield_tile):
    viewer, widget = viewer_and_widget
    widget.model.set_value(str(tiny_model_file))
    widget.mode.setCurrentIndex(widget.mode.findData("lazy"))
    widget.tile.setValue(256)
    viewer.add_image(np.tile(darkfield_tile, (2, 2, 1)), rgb=True, name="df")  # one level of 2 x 2 chunks
    widget.run_button.click()
    _finish(qtbot, widget)
    layer = viewer.layers["df teacher"]
    (stain,) = widget.lazy_stains(layer)
    with stain._net_lock:  # hold the worker back so chunks are still waiting when Stop is pressed
        np.asarray(layer.data)  # every chunk queued (placeholders returned at once)
        assert stain.pending > 1
        widget.stop()
        assert stain.pending <= 1  # at most the one in progress
    assert stain.wait(60) and not stain.closed
    stain.network_runs["teacher"] = 0
    np.asarray(layer.data[:10, :10])  # looked at again: queued again and stained
    assert stain.wait(60) and stain.network_runs["teacher"] <= 1
    assert np.asarray(layer.data[:10, :10]).shape == (10, 10, 3)


def test_a_users_layer_named_like_an_output_is_never_overwritten(viewer_and_widget, qtbot, darkfield_tile):
    viewer, widget = viewer_and_widget
    viewer.add_image(darkfield_tile, rgb=True, name="df")
    mine = viewer.add_image(np.zeros((256, 256, 3), np.float32), rgb=True, name="df teacher")
    widget.input_layer = viewer.layers["df"]
    assert widget.input.findText("df teacher") >= 0  # still offered as an input: it is not ours
    widget.run_button.click()
    _finish(qtbot, widget)
    assert np.all(mine.data == 0) and "digital_stain" not in mine.metadata
    ours = [layer for layer in viewer.layers if "digital_stain" in layer.metadata
            and layer.metadata["digital_stain"]["output"] == "teacher"]
    assert len(ours) == 1 and ours[0] is not mine


def test_restaining_puts_moved_outputs_back_above_the_input(viewer_and_widget, qtbot, darkfield_tile):
    viewer, widget = viewer_and_widget
    viewer.add_image(darkfield_tile, rgb=True, name="src")
    widget.run_button.click()
    _finish(qtbot, widget)
    viewer.layers.move(viewer.layers.index("src teacher"), 0)  # the user drags one to the bottom
    widget.run_button.click()
    _finish(qtbot, widget)
    assert [layer.name for layer in viewer.layers] == ["src", "src enhanced", "src teacher", "src student"]


class _AlwaysFails(torch.nn.Module):
    """Fault injection: a network that raises (a bug, a broken driver) on every call."""

    def __init__(self, net):
        super().__init__()
        self.size_multiple, self.min_size, self.config = net.size_multiple, net.min_size, net.config
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        raise RuntimeError("injected failure")


def test_a_failing_chunk_is_reported_once_and_not_retried(viewer_and_widget, qtbot, tiny_model_file, darkfield_tile):
    viewer, widget = viewer_and_widget
    widget.model.set_value(str(tiny_model_file))
    widget.output_boxes["enhanced"].setChecked(False)
    widget.output_boxes["student"].setChecked(False)
    viewer.add_image(np.stack([darkfield_tile, darkfield_tile[::-1], darkfield_tile[:, ::-1]]), rgb=True, name="z")
    widget.run_button.click()
    _finish(qtbot, widget)
    layer = viewer.layers["z teacher"]
    (stain,) = widget.lazy_stains(layer)
    assert stain.wait(30)
    seen = {key[0] for key in stain._cache["teacher"]}
    unseen = next(i for i in range(3) if i not in seen)
    # on this layer's kernel alone (shallow copies): the model's own cached networks stay as they are
    kernel, nets = copy.copy(stain.kernel), copy.copy(stain.kernel.nets)
    nets.teacher = failing = _AlwaysFails(nets.teacher)
    kernel.nets = nets
    stain.kernel = kernel
    messages = Messages()
    for plane in (unseen, next(iter(seen)), unseen, next(iter(seen)), unseen):
        viewer.dims.set_current_step(0, plane)
        assert stain.wait(30)
    qtbot.waitUntil(lambda: len(messages.warnings) >= 1, timeout=10_000)
    assert len(messages.warnings) == 1 and "stay gray" in messages.warnings[0]
    assert failing.calls == 1 and len(stain.errors) == 1  # tried once, then shown as the placeholder
    assert np.asarray(layer.data[unseen]).shape == (256, 256, 3)  # the placeholder, at once
