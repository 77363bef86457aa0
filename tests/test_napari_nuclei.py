"""**Find nuclei** in the Digitally stain widget, on a real viewer: a Labels layer over the input, and a count."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from napari.layers import Labels
from napari.utils.notifications import NotificationSeverity, notification_manager

from digital_stain.nuclei.find import find_nuclei
from digital_stain.stain.model import StainModel


@pytest.fixture
def widget(tiny_stain_widget):
    _, widget = tiny_stain_widget
    widget.device.setCurrentText("cpu")
    widget.adapt.setCurrentIndex(widget.adapt.findData("off"))
    return widget


def _messages(start: int, severity) -> list[str]:
    return [str(n.message) for n in notification_manager.records[start:] if n.severity == severity]


def test_find_nuclei_adds_a_labels_layer_over_the_input_with_the_count(widget, qtbot, darkfield_tile,
                                                                       tiny_model_file):
    viewer = widget.viewer
    source = viewer.add_image(darkfield_tile, name="tissue", rgb=True, scale=(0.5, 0.5), translate=(10.0, 20.0))
    widget.input_layer = source
    start = len(notification_manager.records)
    assert widget.find_nuclei()
    assert widget.running
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    layer = viewer.layers["tissue nuclei"]
    assert isinstance(layer, Labels) and layer.data.dtype == np.uint16
    assert layer.data.shape == darkfield_tile.shape[:2]
    np.testing.assert_allclose(layer.scale, (0.5, 0.5))
    np.testing.assert_allclose(layer.translate, (10.0, 20.0))
    expected = find_nuclei(StainModel.load(tiny_model_file, device="cpu"), darkfield_tile, adapt="off")
    np.testing.assert_array_equal(layer.data, expected.labels)  # the library's labels, nothing else
    count = expected.count
    assert layer.metadata["digital_stain"]["count"] == count
    assert f"{count} nuclei in 'tissue'" in widget.status.text()
    assert any(f"{count} nuclei" in m for m in _messages(start, NotificationSeverity.INFO))
    # again: the layer is replaced, not doubled; the input is not offered as a stain input twice
    assert widget.find_nuclei(source)
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    assert [layer.name for layer in viewer.layers] == ["tissue", "tissue nuclei"]


def test_a_dask_layer_is_labelled_chunk_by_chunk_as_the_library_does(widget, qtbot, darkfield_tile,
                                                                     tiny_model_file):
    from digital_stain.nuclei.chunked import find_nuclei_chunked
    from digital_stain.stain.settings import StainSettings

    mosaic = np.concatenate([darkfield_tile, darkfield_tile[::-1]], axis=1)  # 256 x 512
    lazy = widget.viewer.add_image(da.from_array(mosaic, chunks=(256, 256, 3)), name="lazy", rgb=True)
    widget.tile.setValue(256)
    assert widget.find_nuclei(lazy)
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    layer = widget.viewer.layers["lazy nuclei"]
    expected, count, _, _ = find_nuclei_chunked(StainModel.load(tiny_model_file, device="cpu"), mosaic, adapt="off",
                                                settings=StainSettings(tile=256, chunk=256, device="cpu"))
    np.testing.assert_array_equal(layer.data, expected)
    assert layer.data.dtype == np.uint32 and f"{count} nuclei in 'lazy'" in widget.status.text()


def test_a_large_layer_shows_its_labels_at_once_filled_in_as_found_and_counted_at_the_end(widget, qtbot,
                                                                                            darkfield_tile):
    from digital_stain.nuclei.chunked import find_nuclei_chunked
    from digital_stain.stain.settings import StainSettings

    viewer = widget.viewer
    widget.model.set_value("dsd-unpaired-fast")  # a trained stain: there are nuclei to show
    widget.tile.setValue(512)
    big = da.tile(da.from_array(darkfield_tile, chunks=(256, 256, 3)), (4, 4, 1))  # 1024 x 1024, 4 chunks
    source = viewer.add_image(big, rgb=True, name="big")
    # Stop once the layer is there: what was segmented stays shown, nothing is counted
    assert widget.find_nuclei(source)
    qtbot.waitUntil(lambda: "big nuclei" in viewer.layers, timeout=120_000)
    layer = viewer.layers["big nuclei"]
    assert widget.running and layer.multiscale and [level.shape for level in layer.data] == [(1024, 1024),
                                                                                            (512, 512)]
    assert layer.metadata["digital_stain"]["count"] is None
    widget.stop()
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    assert "chunks labelled and shown; not counted" in widget.status.text() and "big nuclei" in viewer.layers
    # again, to the end: the same labels as the library's chunk-by-chunk call, and the count
    assert widget.find_nuclei(source)
    qtbot.waitUntil(lambda: not widget.running, timeout=300_000)
    layer = viewer.layers["big nuclei"]
    expected, count, _, _ = find_nuclei_chunked(StainModel.load("dsd-unpaired-fast", device="cpu"), big,
                                                adapt="off", settings=StainSettings(tile=512, chunk=512, device="cpu"))
    np.testing.assert_array_equal(np.asarray(layer.data[0]), expected)
    np.testing.assert_array_equal(np.asarray(layer.data[1]), expected[::2, ::2])
    assert count > 100 and layer.metadata["digital_stain"]["count"] == count
    assert f"{count} nuclei in 'big'" in widget.status.text()
    assert [layer.name for layer in viewer.layers] == ["big", "big nuclei"]
    # what napari draws was read again as chunks came in (added empty, it would stay empty otherwise)
    assert np.asarray(layer._slice.image.raw).any()  # napari's own (private) slice of the layer


def test_a_stack_or_a_plane_too_large_for_memory_is_refused_with_a_notification(widget, darkfield_tile):
    viewer = widget.viewer
    stack = viewer.add_image(np.stack([darkfield_tile] * 2), name="stack", rgb=True)
    # a pyramid, so napari reads only a coarse level to show it; Find nuclei would label level 0
    huge = viewer.add_image([da.zeros((20000, 20000, 3), dtype=np.uint8, chunks=(4096, 4096, 3)),
                             da.zeros((625, 625, 3), dtype=np.uint8)], name="huge", rgb=True, multiscale=True)
    for layer, words in ((stack, "is a stack"), (huge, "digital-stain nuclei SLIDE -o OUT.ome.zarr")):
        start = len(notification_manager.records)
        assert not widget.find_nuclei(layer)
        errors = _messages(start, NotificationSeverity.ERROR)
        assert any(words in m for m in errors), errors
    assert not any(layer.name.endswith("nuclei") for layer in viewer.layers)
