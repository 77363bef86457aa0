"""**Find nuclei** in the Digitally stain widget: the input's nuclei as a Labels layer ``<input> nuclei``.

The job runs in a worker thread with the widget's model, device, tile and adapt. A plane in memory
goes through :func:`digital_stain.nuclei.find.find_nuclei` (stain, then segment the virtual H&E;
tutorship when the model holds a segmenter); a dask plane, a large one or a pyramid's level 0
through :func:`digital_stain.nuclei.chunked.find_nuclei_chunked`, chunk by chunk (only a few
stained chunks in memory; the labels are one uint32 array, so planes are limited to
:data:`MAX_PIXELS`). The layer lies exactly over the input (its scale, translation and units) and
its metadata records how it was made.
"""

from __future__ import annotations

import numpy as np

from digital_stain import __version__
from digital_stain.core.arrays import InputError


def nuclei_name(source) -> str:
    return f"{source.name} nuclei"


MAX_PIXELS = 16384 * 16384  # the labels of a larger plane (4 bytes a pixel) belong on disk: the CLI's slide mode


def plane_of(data, multiscale: bool):
    """The plane to find nuclei in: the layer's data, or a pyramid's level 0."""
    return data[0] if multiscale else data


def nuclei_work(data, multiscale: bool, used: dict):
    """The job for :func:`digital_stain._napari.worker.start_job`: find the nuclei of one plane."""
    from digital_stain._napari import layers as L
    from digital_stain._napari.models import load_model
    from digital_stain.nuclei.chunked import find_nuclei_chunked
    from digital_stain.nuclei.find import Nuclei, find_nuclei, stain_source
    from digital_stain.stain.settings import StainSettings

    plane = plane_of(data, multiscale)

    def work(bridge, stop):
        model = load_model(used["model"], used["device"])  # shared, never changed by staining
        settings = StainSettings(tile=used["tile"], chunk=used["tile"], device=used["device"])
        if not L.should_stain_lazily(plane, False):
            found = find_nuclei(model, np.asarray(plane), settings=settings, adapt=used["adapt"],
                                progress=bridge.progress.emit, stop=stop)
            return model, found
        labels, count, _, adaptation = find_nuclei_chunked(model, plane, settings=settings, adapt=used["adapt"],
                                                           progress=bridge.progress.emit, stop=stop)
        return model, Nuclei(labels=labels, count=count, method="adaptation", source=stain_source(model),
                             stained=None, adaptation=adaptation.describe(), notes=["found chunk by chunk"])

    return work


def check_plane(layer, data, multiscale: bool) -> None:
    """Refuse what Find nuclei cannot do, saying what to do instead."""
    from digital_stain._napari import layers as L

    plane = plane_of(data, multiscale)
    if L.is_stack(plane.shape):
        raise InputError(f"{layer.name!r} is a stack; Find nuclei works on one plane. Open one plane of it, or "
                         "write the planes as images and run `digital-stain nuclei PLANES -o LABELS`.")
    height, width = plane.shape[:2]
    if height * width > MAX_PIXELS:
        raise InputError(f"{layer.name!r} is {width} x {height} px, more than Find nuclei keeps labels of in memory "
                         "(16384 x 16384); label the whole slide on disk with `digital-stain nuclei SLIDE -o "
                         "OUT.ome.zarr` and open the store.")


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
