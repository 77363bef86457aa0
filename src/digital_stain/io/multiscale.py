"""Every image of an OME-Zarr store with all its pyramid levels, lazily: what a viewer shows.

:func:`digital_stain.io.images.open_ome_zarr` gives the stain the one level-0 plane it
reads. A viewer needs more: each image of the store (a stained store written by
:mod:`digital_stain.slide.run` holds one per output, listed in the root's
``multiscales``), every level of it, and where level 0 lies in space.
:func:`read_pyramids` gives that, as dask arrays over the stored chunks, so
nothing is read until a level's region is looked at.

Axis order follows ``docs/architecture.md``: spatial axes in stored order,
colour last. Axes of length 1 other than Y and X (a single time point, plane
or channel) are dropped, so a slide stored as ``TCZYX`` reads as ``YX`` or
``YXC``; three or four colour channels become an RGB(A) image, other channel
counts stay a channel axis (``channel_axis``) for viewers that split them.

>>> from digital_stain.io.multiscale import read_pyramids
>>> [p.name for p in read_pyramids("stained.ome.zarr")]   # doctest: +SKIP
['student', 'teacher', 'enhanced']
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from digital_stain.core.arrays import InputError
from digital_stain.io.calibration import placement
from digital_stain.io.images import ngff_multiscales, open_ome_zarr


@dataclass
class Pyramid:
    """One OME-Zarr image, every level.

    Attributes
    ----------
    name : str
        The multiscale's ``name``, else the store's name without ``.ome.zarr``/``.zarr``.
    levels : list of dask arrays
        Largest first; axes as ``axes`` (colour last when ``rgb``). Stored dtype.
    axes : str
        Upper-case axis names of ``levels``, e.g. ``"YX"``, ``"YXC"``, ``"ZYX"``, ``"CYX"``.
    scale, translate : tuple of float
        Level 0's pixel size and offset for each non-colour axis (``C`` left out), in ``units``.
    units : tuple of str or None
        Each non-colour axis' unit from the metadata (e.g. ``"micrometer"``), None where not given.
    rgb : bool
        Three or four colour channels, last.
    channel_axis : int or None
        Index of ``C`` in ``axes`` when it is kept as separate channels (not 3 or 4 of them).
    complete : bool or None
        For a store written by :mod:`digital_stain.slide.run`, whether every unit is written
        (units not yet written read as 0); None for other stores.
    """

    name: str
    levels: list
    axes: str
    scale: tuple
    translate: tuple
    units: tuple
    rgb: bool
    channel_axis: int | None = None
    complete: bool | None = None


def store_name(path: str | os.PathLike) -> str:
    """``slide`` for ``slide.ome.zarr`` or ``slide.zarr``; the folder's name otherwise."""
    name = Path(path).name
    for suffix in (".ome.zarr", ".zarr"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _images(group) -> list:
    """``(group, multiscale entry)`` for every image: the root's entries, or each bioformats2raw series'."""
    attrs = dict(group.attrs)
    if ngff_multiscales(attrs):
        return [(group, entry) for entry in ngff_multiscales(attrs)]
    if "bioformats2raw.layout" in attrs:  # converted slides: series 0, 1, ... each an image
        series = sorted((key for key in group.group_keys() if key.isdigit()), key=int)
        return [(group[key], entry) for key in series for entry in ngff_multiscales(dict(group[key].attrs))]
    return []


def is_ome_zarr(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Zarr group with OME-Zarr images (reads metadata only; never raises)."""
    path = Path(path)
    if not path.is_dir():
        return False
    try:
        import zarr

        group = zarr.open_group(str(path), mode="r")
        return bool(_images(group))
    except Exception:  # noqa: BLE001 - anything unreadable is simply not ours to read
        return False


def read_pyramids(path: str | os.PathLike) -> list[Pyramid]:
    """Every image of an OME-Zarr store (NGFF 0.4 or 0.5, or bioformats2raw) with all its levels, lazily.

    Parameters
    ----------
    path : path-like
        The store (the folder holding ``.zattrs`` or ``zarr.json``).

    Returns
    -------
    list of Pyramid
        In the order of the store's ``multiscales`` (for a stained store: the
        primary output first, then the others).

    Raises
    ------
    InputError
        Not a Zarr group, no ``multiscales`` metadata, or metadata naming data
        that is not in the store.
    """
    import zarr

    from digital_stain.slide.store import read_state

    path = Path(path)
    open_ome_zarr(path)  # the same checks, and messages, as for staining it
    group = zarr.open_group(str(path), mode="r")
    images = _images(group)
    state = read_state(path)
    complete = None if state is None else bool(state.get("complete"))
    return [_pyramid(image_group, entry, path, complete) for image_group, entry in images]


def _axis_names(entry: dict, ndim: int) -> list[dict]:
    axes = [a if isinstance(a, dict) else {"name": a} for a in entry.get("axes", [])]
    if len(axes) != ndim:  # NGFF 0.1-0.3 had no axes: TCZYX, the last ndim of them
        axes = [{"name": name} for name in "tczyx"[-ndim:]]
    return axes


def _pyramid(group, entry: dict, path: Path, complete: bool | None) -> Pyramid:
    import dask.array as da

    try:
        arrays = [group[d["path"]] for d in entry["datasets"]]
    except (KeyError, TypeError) as err:
        raise InputError(f"{path}: its OME-Zarr metadata names data that is not in the store ({err}).") from err
    ndim = len(arrays[0].shape)
    axes = _axis_names(entry, ndim)
    names = [a["name"].upper() for a in axes]
    shape = arrays[0].shape
    keep = [i for i, n in enumerate(names) if n in ("Y", "X") or shape[i] != 1]  # drop length-1 T, Z, C
    rgb = "C" in names and names.index("C") in keep and shape[names.index("C")] in (3, 4)
    order = [i for i in keep if names[i] != "C"] + [names.index("C")] if rgb else keep  # colour last
    index = tuple(slice(None) if i in keep else 0 for i in range(ndim))
    transpose = [keep.index(i) for i in order]

    def arrange(array):
        data = da.from_zarr(array)[index]
        return data.transpose(transpose) if transpose != sorted(transpose) else data

    spatial = [i for i in order if names[i] != "C"]
    scale, translate = placement(entry, ndim)
    final_axes = "".join(names[i] for i in order)
    return Pyramid(
        name=entry.get("name") or store_name(path),
        levels=[arrange(array) for array in arrays],
        axes=final_axes,
        scale=tuple(scale[i] for i in spatial),
        translate=tuple(translate[i] for i in spatial),
        units=tuple(axes[i].get("unit") for i in spatial),
        rgb=rgb,
        channel_axis=final_axes.index("C") if "C" in final_axes and not rgb else None,
        complete=complete,
    )
