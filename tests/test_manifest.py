"""The npe2 manifest: valid, and every contribution points at something importable of the right kind."""

import importlib

from npe2 import PluginManifest


def _resolve(python_name: str):
    module, attr = python_name.split(":")
    return getattr(importlib.import_module(module), attr)


def test_manifest_is_valid_and_complete():
    manifest = PluginManifest.from_distribution("napari-digital-stain")
    assert manifest.name == "napari-digital-stain"
    assert manifest.icon == "digital_stain:icon.png" and {"Image Processing", "IO"} <= set(manifest.categories)
    widgets = {w.display_name: w.command for w in manifest.contributions.widgets}
    assert set(widgets) == {"Digitally stain", "Fine-tune"}
    commands = {c.id: c.python_name for c in manifest.contributions.commands}
    for command in widgets.values():
        widget_class = _resolve(commands[command])
        assert "napari_viewer" in widget_class.__init__.__code__.co_varnames  # napari injects the viewer by name
    (writer,) = manifest.contributions.writers  # stained layers, lazy pyramids included, to OME-Zarr
    assert writer.layer_types == ["image+"] and writer.filename_extensions == [".zarr"]
    assert callable(_resolve(commands[writer.command]))
    for sample in manifest.contributions.sample_data:
        layers = _resolve(commands[sample.command])()
        assert layers and all(kind == "image" for _, _, kind in layers)
