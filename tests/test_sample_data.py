"""The npe2 manifest and the sample-data contribution, in a real napari viewer (under Xvfb)."""

import numpy as np
import pytest

from digital_stain import _sample_data


def test_manifest_is_valid():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-digital-stain")
    assert manifest.name == "napari-digital-stain"
    keys = {s.key for s in manifest.contributions.sample_data}
    assert {"darkfield", "darkfield_tiles", "stained_reference"} <= keys


def test_sample_layers_are_real_tiles_with_scale_and_citation():
    layers = _sample_data.darkfield_tiles()
    assert len(layers) == len(_sample_data.sample_paths("darkfield")) >= 3
    for data, meta, kind in layers:
        assert kind == "image" and data.shape == (256, 256, 3) and data.dtype == np.uint8
        assert meta["scale"] == pytest.approx((88.4 / 256,) * 2)
        assert "Xu et al." in meta["metadata"]["citation"]
        # dark-field: mostly dark background with brighter tissue
        assert np.median(data) < 30 and data.max() > 3 * max(np.median(data), 1)


def test_open_sample_in_viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-digital-stain", "darkfield")
    assert len(viewer.layers) == 1
    layer = viewer.layers[0]
    assert layer.rgb and layer.data.shape == (256, 256, 3)
    assert tuple(layer.scale) == pytest.approx((88.4 / 256,) * 2)
    assert str(layer.units[0]) in ("micrometer", "µm", "um")
