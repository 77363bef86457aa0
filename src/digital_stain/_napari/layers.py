"""Layers in and out: which layers can be stained, how outputs are added, and the side-by-side view.

Everything here runs in the GUI thread (it touches the viewer). Checks
raise :class:`InputError` with a message for the user; the widgets turn it
into a notification.
"""

from __future__ import annotations

import math

import numpy as np

from digital_stain.core.arrays import InputError, check_plane_shape, split_planes

PLUGIN = "napari-digital-stain"
LAZY_ABOVE_PIXELS = 4096 * 4096  # numpy planes larger than this are stained as they are viewed


def image_source(layer, viewer=None):
    """The data to stain from a layer, checked: ``(data, multiscale)``.

    ``data`` is the layer's array (numpy or dask), or its list of levels when
    the layer is multiscale. Refuses, with what to do instead: non-image
    layers, volumes shown in 3-D, and shapes that are not a gray/RGB plane or
    a stack of them.
    """
    from napari.layers import Image

    if layer is None:
        raise InputError("no image layer to stain: open a dark-field image (File > Open, or "
                         "File > Open Sample > Digital Stain).")
    if not isinstance(layer, Image):
        kind = type(layer).__name__.lower()
        raise InputError(f"{layer.name!r} is a {kind} layer; only image layers can be stained. "
                         "Choose the dark-field image layer as input.")
    if viewer is not None and viewer.dims.ndisplay == 3 and layer.ndim >= 3:
        raise InputError(f"{layer.name!r} is shown as a 3-D volume; the stain works on 2-D planes. "
                         "Switch the viewer to 2-D (the 2D/3D button) and it is stained plane by plane.")
    data = list(layer.data) if layer.multiscale else layer.data
    shape = tuple((data[0] if layer.multiscale else data).shape)
    if layer.rgb and shape[-1] not in (3, 4):
        raise InputError(f"{layer.name!r} has {shape[-1]} colour channels; dark-field images are gray or RGB.")
    _, plane = split_planes(shape)
    check_plane_shape(plane)
    return data, bool(layer.multiscale)


def is_stack(shape: tuple) -> bool:
    return len(split_planes(tuple(shape))[0]) > 0


def should_stain_lazily(data, multiscale: bool) -> bool:
    """Lazily for pyramids, dask (or other non-numpy) arrays, stacks and planes over :data:`LAZY_ABOVE_PIXELS`."""
    if multiscale or not isinstance(data, np.ndarray):
        return True
    stack, plane = split_planes(data.shape)
    return bool(stack) or plane[0] * plane[1] > LAZY_ABOVE_PIXELS


def as_rgb(output: str, array):
    """Outputs as RGB: the enhanced gray is repeated into three channels so every output shows alike."""
    if output != "enhanced":
        return array
    if isinstance(array, np.ndarray):
        return np.repeat(array[..., None], 3, axis=-1)
    import dask.array as da

    return da.stack([array] * 3, axis=-1)


def output_name(source, output: str) -> str:
    return f"{source.name} {output}"


def show_output(viewer, source, output: str, data, metadata: dict, *, multiscale: bool, position: int = 0):
    """Add (or update, if it exists) the layer ``<source> <output>``, ``position + 1`` places above ``source``.

    The layer gets the source's scale, translation, units and axis labels, so
    it lies exactly over it; values are float RGB in [0, 1] and shown as such.
    """
    name = output_name(source, output)
    levels = [as_rgb(output, level) for level in data] if multiscale else as_rgb(output, data)
    if name in viewer.layers and is_output(viewer.layers[name]):  # never a user's own layer of that name
        layer = viewer.layers[name]
        if bool(layer.multiscale) == multiscale and layer.rgb:
            layer.data = levels
            layer.metadata = metadata
            layer.contrast_limits = (0.0, 1.0)
            _place(viewer, layer, source, position)
            return layer
        viewer.layers.remove(layer)
    layer = viewer.add_image(
        levels, name=name, rgb=True, multiscale=multiscale, contrast_limits=(0.0, 1.0), cache=False,
        scale=source.scale, translate=source.translate, units=source.units, axis_labels=source.axis_labels,
        metadata=metadata,
    )
    _place(viewer, layer, source, position)
    return layer


def label_earlier_outputs(viewer, source, outputs) -> list[str]:
    """Rename the outputs of an earlier stain of ``source`` that this stain (``outputs``) does not replace,
    so that their names say which model made them; returns their new names."""
    renamed = []
    for output in ("enhanced", "teacher", "student"):
        name = output_name(source, output)
        if output in outputs or name not in viewer.layers or not is_output(viewer.layers[name]):
            continue
        layer = viewer.layers[name]
        model = layer.metadata["digital_stain"].get("model", "an earlier model")
        new, n = f"{name} (earlier, {model})", 2
        while new in viewer.layers:
            new, n = f"{name} (earlier, {model}, {n})", n + 1
        layer.name = new
        renamed.append(new)
    return renamed


def _place(viewer, layer, source, position: int) -> None:
    """Put ``layer`` just above ``source`` (so the grid shows input, enhanced, teacher, student in order)."""
    current = viewer.layers.index(layer)
    others = [other for other in viewer.layers if other is not layer]
    final = min(others.index(source) + 1 + position, len(others))  # its index once moved
    if current != final:
        # napari's move() inserts before the given index as counted before the layer leaves its place
        viewer.layers.move(current, final + 1 if current < final else final)


def is_output(layer) -> bool:
    """Whether a layer is one of our outputs (marked in its metadata, whatever its name)."""
    return "digital_stain" in getattr(layer, "metadata", {})


def grid_of(viewer):
    """The viewer's grid settings (``viewer.canvas.grid`` since napari 0.9, ``viewer.grid`` before)."""
    canvas = getattr(viewer, "canvas", None)
    return getattr(canvas, "grid", None) or viewer.grid


def set_side_by_side(viewer, on: bool, columns: int | None = None) -> None:
    """Grid view, one layer per panel (``on``), or everything overlaid.

    ``columns`` fixes the columns (a row per image); otherwise the grid is the one that shows the
    layers largest on this canvas (:func:`grid_shape`): four square images on a landscape window
    go 2 x 2, on a very wide one in a row.
    """
    grid = grid_of(viewer)
    if on:
        visible = [layer for layer in viewer.layers if layer.visible]
        grid.stride = 1
        if columns:
            grid.shape = (-1, columns)
        else:
            grid.shape = grid_shape(len(visible), canvas_size(viewer), _extent(visible))
    grid.enabled = on


def grid_shape(panels: int, canvas: tuple[float, float] | None, image: tuple[float, float] | None) -> tuple[int, int]:
    """``(rows, columns)`` for ``panels`` images of ``image`` (height, width) on a ``canvas`` (height, width).

    The grid whose panels show the image at the largest zoom (ties: fewer rows); one row when the
    canvas or image size is not known.
    """
    panels = max(1, panels)
    if not canvas or not image or min(canvas) <= 0 or min(image) <= 0:
        return (1, panels)

    def zoom(rows: int) -> float:
        columns = math.ceil(panels / rows)
        return min(canvas[0] / rows / image[0], canvas[1] / columns / image[1])

    rows = max(range(1, panels + 1), key=lambda r: (round(zoom(r), 9), -r))
    return (rows, math.ceil(panels / rows))


def canvas_size(viewer) -> tuple[float, float] | None:
    """The canvas' (height, width) in screen pixels (``viewer.canvas.size`` since napari 0.9)."""
    size = getattr(getattr(viewer, "canvas", None), "size", None) or getattr(viewer, "_canvas_size", None)
    return (float(size[0]), float(size[1])) if size is not None and len(size) == 2 else None


def _extent(layers) -> tuple[float, float] | None:
    """The largest world (height, width) among ``layers``, or None."""
    sides = []
    for layer in layers:
        extent = np.asarray(layer.extent.world, dtype=float)
        if extent.shape[1] >= 2:
            sides.append(extent[1, -2:] - extent[0, -2:])
    return tuple(np.max(sides, axis=0)) if sides else None


def show_slide(viewer, darkfield, stained) -> bool:
    """Open a stained OME-Zarr store side by side with its dark-field slide; False if that is not OME-Zarr.

    Both open through this plugin's reader (:mod:`digital_stain._napari.reader`) as lazy
    pyramids: the dark-field slide first (when it is OME-Zarr), then enhanced, teacher
    and student, the order the **Digitally stain** widget uses.
    """
    from digital_stain.io.multiscale import is_ome_zarr

    shown = is_ome_zarr(darkfield)
    if shown:
        viewer.open(str(darkfield), plugin=PLUGIN)
    viewer.open(str(stained), plugin=PLUGIN)
    set_side_by_side(viewer, True)
    return shown
