"""The napari reader for OME-Zarr: a stained store opens as one pyramid layer per output.

napari asks :func:`napari_get_reader` about every ``*.zarr`` folder it is
given; we answer only for Zarr groups with OME-Zarr images (reading their
metadata, nothing else), so napari's other readers get the rest. The layers
are dask pyramids over the stored chunks (:func:`digital_stain.io.multiscale.read_pyramids`):
opening a 50,000 x 50,000 slide reads a few chunks of its coarsest level,
and a dark-field slide opened this way is stained by the **Digitally stain**
widget level by level, only where it is looked at.
"""

from __future__ import annotations

import warnings

from digital_stain.io.multiscale import is_ome_zarr, read_pyramids, store_name


def napari_get_reader(path):
    """:func:`read_ome_zarr` for one OME-Zarr store, else None (napari then asks its other readers)."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    return read_ome_zarr if is_ome_zarr(path) else None


def read_ome_zarr(path) -> list[tuple]:
    """napari layer data for every image of an OME-Zarr store (one layer per output of a stained store).

    Layers are named after the store (``slide`` for ``slide.ome.zarr``), with the
    image's name after it when the store holds several (``stained enhanced``,
    ``stained teacher``, ``stained student``: the store's first image last, so
    it lies on top), and placed by the store's pixel size, offset and units. A
    stained store that is not finished opens too, with ``(unfinished)`` in its
    layers' names: units not yet written show as black.
    """
    if isinstance(path, (list, tuple)):
        path = path[0]
    pyramids = read_pyramids(path)
    store = store_name(path)
    unfinished = any(p.complete is False for p in pyramids)
    if unfinished:
        warnings.warn(f"{path} is not finished: the parts not yet stained show as black. Finish it with "
                      f"digital-stain stain INPUT -o {path} --resume.", stacklevel=2)
    layers = []
    for pyramid in reversed(pyramids):  # the first image (a stained store's student) is added last: on top
        name = store if len(pyramids) == 1 else f"{store} {pyramid.name}"
        kwargs = {
            "name": name + (" (unfinished)" if unfinished else ""),
            "multiscale": len(pyramid.levels) > 1,
            "rgb": pyramid.rgb,
            "scale": pyramid.scale,
            "translate": pyramid.translate,
            "axis_labels": tuple(a.lower() for a in pyramid.axes if a != "C"),
            "metadata": {"ome_zarr": {"path": str(path), "image": pyramid.name, "axes": pyramid.axes,
                                      "complete": pyramid.complete}},
        }
        if any(pyramid.units):
            kwargs["units"] = tuple(unit or "pixel" for unit in pyramid.units)
        if pyramid.channel_axis is not None:
            kwargs["channel_axis"] = pyramid.channel_axis
        if pyramid.complete is not None and not pyramid.rgb:
            kwargs["contrast_limits"] = (0, 255)  # our stored uint8, as stored (not stretched to what is seen)
        data = pyramid.levels if kwargs["multiscale"] else pyramid.levels[0]
        layers.append((data, kwargs, "image"))
    return layers
