"""**Find nuclei** in the Digitally stain widget: the input's nuclei as a Labels layer ``<input> nuclei``.

The job calls :func:`digital_stain.nuclei.find.find_nuclei` (stain with the widget's model, device,
tile and adapt, then segment the virtual H&E) in a worker thread; the layer lies exactly over the
input (its scale, translation and units) and its metadata records how it was made.
"""

from __future__ import annotations

import numpy as np

from digital_stain import __version__
from digital_stain.core.arrays import InputError


def nuclei_name(source) -> str:
    return f"{source.name} nuclei"


def nuclei_work(data, used: dict):
    """The job for :func:`digital_stain._napari.worker.start_job`: find the nuclei of one plane."""
    from digital_stain._napari.models import load_model
    from digital_stain.nuclei.find import find_nuclei
    from digital_stain.stain.settings import StainSettings

    def work(bridge, stop):
        model = load_model(used["model"], used["device"])  # shared, never changed by staining
        found = find_nuclei(model, np.asarray(data), settings=StainSettings(tile=used["tile"], device=used["device"]),
                            adapt=used["adapt"], progress=bridge.progress.emit, stop=stop)
        return model, found

    return work


def check_plane(layer, data, multiscale: bool) -> None:
    """Refuse what Find nuclei cannot do yet, saying what to do instead."""
    from digital_stain._napari import layers as L

    if multiscale or L.is_stack(data.shape) or not isinstance(data, np.ndarray):
        what = "a pyramid" if multiscale else "a stack" if L.is_stack(data.shape) else "a lazily read (dask) image"
        raise InputError(f"{layer.name!r} is {what}; Find nuclei works on one plane held in memory. Open one "
                         "plane or a region of it, or write tiles and run `digital-stain nuclei TILES -o LABELS`.")


def show_nuclei(viewer, source, found, used: dict):
    """Add (or replace) the Labels layer ``<source> nuclei`` over ``source``; returns it."""
    name = nuclei_name(source)
    metadata = {"digital_stain": {"nuclei": True, "method": found.method, "stained_by": found.source,
                                  "count": found.count, "model": used["model"], "source_layer": source.name,
                                  "adaptation": found.adaptation, "version": __version__}}
    if name in viewer.layers and "digital_stain" in viewer.layers[name].metadata:  # ours: replace, never a user's
        viewer.layers.remove(viewer.layers[name])
    return viewer.add_labels(found.labels, name=name, scale=source.scale[-2:], translate=source.translate[-2:],
                             units=source.units[-2:], metadata=metadata, opacity=0.5)
