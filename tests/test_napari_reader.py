"""The OME-Zarr reader on a real napari viewer: stained stores and dark-field slides open as lazy pyramids."""

from __future__ import annotations

import threading

import dask.array as da
import numpy as np
import pytest
import zarr
from npe2 import PluginManifest

from digital_stain._napari.layers import grid_of, show_slide
from digital_stain._napari.reader import napari_get_reader, read_ome_zarr
from digital_stain.slide.run import stain_to_zarr
from stores import write_ome_zarr

PLUGIN = "napari-digital-stain"
SMALL = dict(chunk=256, overlap=32, min_side=128, device="cpu", precision="fp32")


@pytest.fixture
def slide(darkfield_tile) -> np.ndarray:
    return np.ascontiguousarray(np.tile(darkfield_tile, (2, 3, 1))[:500, :700])


@pytest.fixture
def stained_store(tiny_model, slide, tmp_path):
    path = tmp_path / "stained.ome.zarr"
    assert stain_to_zarr(tiny_model, slide, path, **SMALL).complete
    return path


def test_the_manifest_offers_a_reader_for_zarr_folders():
    manifest = PluginManifest.from_distribution(PLUGIN)
    (reader,) = manifest.contributions.readers
    assert reader.filename_patterns == ["*.zarr"] and reader.accepts_directories


def test_only_ome_zarr_stores_are_claimed(stained_store, tmp_path, darkfield_tile):
    assert napari_get_reader(str(stained_store)) is read_ome_zarr
    assert napari_get_reader([str(stained_store)]) is read_ome_zarr
    assert napari_get_reader([str(stained_store), str(stained_store)]) is None  # one store at a time
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w").create_array("0", shape=(4, 4), dtype=np.uint8)
    assert napari_get_reader(str(tmp_path / "plain.zarr")) is None  # napari's own Zarr reader gets it
    assert napari_get_reader(str(tmp_path / "missing.zarr")) is None


def test_a_stained_store_opens_as_a_lazy_pyramid_per_output(make_napari_viewer, stained_store):
    viewer = make_napari_viewer()
    layers = viewer.open(str(stained_store), plugin=PLUGIN)
    # the store's first image (the student) is added last, so it lies on top when the layers are overlaid
    assert [layer.name for layer in layers] == ["stained enhanced", "stained teacher", "stained student"]
    stored = zarr.open_group(str(stained_store), mode="r")
    for layer in layers:
        output = layer.metadata["ome_zarr"]["image"]
        assert layer.multiscale and len(layer.data) == 4 and isinstance(layer.data[0], da.Array)
        assert layer.rgb == (output != "enhanced")
        expected = stored[output]["1"][:]
        np.testing.assert_array_equal(np.asarray(layer.data[1]),
                                      expected if output == "enhanced" else np.moveaxis(expected, 0, -1))
    assert tuple(viewer.layers["stained enhanced"].contrast_limits) == (0, 255)  # stored values, not stretched


def test_an_unfinished_store_opens_named_unfinished_with_a_warning(make_napari_viewer, tiny_model, slide, tmp_path):
    path = tmp_path / "partial.ome.zarr"
    stop = threading.Event()
    assert stain_to_zarr(tiny_model, slide, path, ["enhanced"], stop=stop,
                         progress=lambda done, total: stop.set(), **SMALL).stopped
    viewer = make_napari_viewer()
    with pytest.warns(UserWarning, match="--resume"):
        (layer,) = viewer.open(str(path), plugin=PLUGIN)
    assert layer.name == "partial (unfinished)"


def test_a_darkfield_slide_opened_here_is_stained_level_by_level_in_place(make_napari_viewer, qtbot, tiny_model_file,
                                                                          darkfield_tile, tmp_path):
    mosaic = np.tile(darkfield_tile, (4, 4, 1))  # 1024 px
    path = tmp_path / "darkfield.ome.zarr"
    write_ome_zarr(path, [np.moveaxis(level, -1, 0) for level in (mosaic, mosaic[::2, ::2])], "cyx",
                   scale=[1, 0.5, 0.5], translation=[0, 100.0, 200.0],
                   units={"y": "micrometer", "x": "micrometer"})
    viewer = make_napari_viewer()
    (source,) = viewer.open(str(path), plugin=PLUGIN)
    assert source.name == "darkfield" and source.multiscale and source.rgb
    assert tuple(source.scale) == (0.5, 0.5) and tuple(source.translate) == (100.0, 200.0)
    assert [str(unit) for unit in source.units] == ["micrometer", "micrometer"]
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Digitally stain")
    widget.model.set_value(str(tiny_model_file))
    widget.input.setCurrentText(source.name)
    assert widget.stain()
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    teacher = viewer.layers["darkfield teacher"]
    assert teacher.multiscale and [level.shape for level in teacher.data] == [(1024, 1024, 3), (512, 512, 3)]
    np.testing.assert_allclose(teacher.scale, source.scale)
    np.testing.assert_allclose(teacher.translate, source.translate)


def test_show_slide_puts_the_darkfield_slide_beside_its_outputs(make_napari_viewer, tiny_model, darkfield_tile,
                                                                 tmp_path):
    path = tmp_path / "darkfield.ome.zarr"
    write_ome_zarr(path, [np.moveaxis(np.tile(darkfield_tile, (2, 2, 1)), -1, 0)], "cyx")
    stained = tmp_path / "out.ome.zarr"
    assert stain_to_zarr(tiny_model, path, stained, ["teacher", "student"], **SMALL).complete
    viewer = make_napari_viewer()
    assert show_slide(viewer, path, stained)
    assert [layer.name for layer in viewer.layers] == ["darkfield", "out teacher", "out student"]
    assert grid_of(viewer).enabled
    other = make_napari_viewer()
    assert not show_slide(other, tmp_path / "slide.tif", stained)  # not OME-Zarr: only the outputs
    assert [layer.name for layer in other.layers] == ["out teacher", "out student"]
