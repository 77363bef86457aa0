"""Stains already in hand (napari layers, lazy pyramids included) saved as a stained OME-Zarr store.

The store is the one :func:`digital_stain.slide.run.stain_to_zarr` writes (:class:`SlideStore`:
one NGFF image per output, uint8, a pyramid of 2 x 2 means down to ``min_side``, the input's
calibration at every level, a ``digital_stain`` record), so the plugin's reader, ome-zarr-py,
QuPath and Fiji open it alike, and ``--overwrite`` may later replace it. Level 0 is read chunk by
chunk from the given arrays: a lazily stained layer is stained here, one chunk at a time, and
never held whole. The store appears only when complete (written beside it, then moved in place).
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from digital_stain.core.arrays import InputError, to_uint8
from digital_stain.io.calibration import Calibration
from digital_stain.io.images import atomic_path
from digital_stain.stain.chunks import chunk_sizes
from digital_stain.slide.store import (FORMAT, FORMAT_VERSION, NGFF_VERSION, NGFF_VERSIONS, PRIMARY_ORDER, RGB_OUTPUTS,
                                      Grid, SlideStore, level_shapes)


class SaveStopped(Exception):
    """Raised by :func:`save_stains` when ``stop`` was set: nothing was written."""


def save_stains(path: str | os.PathLike, stains: dict, *, calibration: Calibration | None = None,
                record: dict | None = None, chunk: int = 1024, min_side: int = 512, overwrite: bool = False,
                progress: Callable[[int, int], None] | None = None,
                stop: threading.Event | None = None, ngff: str = NGFF_VERSION) -> Path:
    """Save stained planes as one OME-Zarr store, as the whole-slide path writes it.

    Parameters
    ----------
    path : path-like
        The store to write (``*.ome.zarr``).
    stains : dict
        Output name (``"enhanced"``, ``"teacher"``, ``"student"``) -> level 0, a numpy or dask array
        ``(Y, X, 3)`` (or ``(Y, X)`` for ``enhanced``), float in [0, 1] or uint8; all the same Y, X.
        ``enhanced`` given in three equal channels (as napari shows it) is stored gray.
    calibration : Calibration, optional
        Pixel size, unit and origin of level 0, written into every level.
    record : dict, optional
        What made the stains (e.g. a layer's ``metadata["digital_stain"]``), kept in the store's
        record under ``made_by``.
    chunk : int
        Stored chunk side, and the piece read from the arrays at a time.
    overwrite : bool
        Replace an existing ``path``, only if it is a store this package wrote.
    progress : callable, optional
        ``progress(done, total)`` after each unit (level 0 chunks, then the pyramid's).
    stop : threading.Event, optional
        Set it to stop: :class:`SaveStopped` is raised and nothing is left at ``path``.
    ngff : ``0.4|0.5``
        The OME-Zarr version: 0.4 on Zarr format 2 (every reader opens it) or 0.5 on Zarr format 3.

    Returns
    -------
    Path

    Raises
    ------
    InputError
        No stains, an unknown output name, planes of different sizes or of another shape, or an
        existing ``path`` that may not be replaced.
    """
    if str(ngff) not in NGFF_VERSIONS:
        raise InputError(f"NGFF version {ngff} cannot be written; choose one of {', '.join(NGFF_VERSIONS)}.")
    planes = _checked(stains)
    height, width = next(iter(planes.values())).shape[:2]
    # units of ``chunk`` px, the last one what remains (no staining overlap to keep clear of here)
    grid = Grid(chunk, chunk_sizes(height, chunk, 0), chunk_sizes(width, chunk, 0), level_shapes((height, width), min_side))
    outputs = sorted(planes, key=PRIMARY_ORDER.index)
    state = {"format": FORMAT, "format_version": FORMAT_VERSION, "token": uuid.uuid4().hex, "complete": False,
             **_provenance(), "settings": {"outputs": outputs, "chunk": chunk, "min_side": min_side,
                                          "ngff": str(ngff)},
             "source": {"name": "saved stains (napari layers or arrays)", "shape": [height, width]},
             "grid": grid.as_dict(), "made_by": record or {}}
    total = sum(len(grid.units(level)) for level in range(len(grid.levels)))
    done = 0
    with atomic_path(path, overwrite=overwrite) as staging:
        store = SlideStore.create(staging, state, calibration)
        for level in range(len(grid.levels)):
            for key in grid.units(level):
                if stop is not None and stop.is_set():
                    raise SaveStopped(f"saving {path} was stopped; nothing was written.")
                if level == 0:
                    box = grid.box(0, key)
                    for output in outputs:
                        store.write(output, 0, box, _unit(planes[output], box))
                    store.mark_done(0, key)
                else:
                    store.build_level_unit(level, key)
                done += 1
                if progress is not None:
                    progress(done, total)
        store.finish()
    return Path(path)


def _checked(stains: dict) -> dict:
    if not stains:
        raise InputError("nothing to save: give at least one stained output (enhanced, teacher or student).")
    planes = {}
    for name, data in stains.items():
        if name not in PRIMARY_ORDER:
            raise InputError(f"{name!r} is not a stained output; a stained store holds {', '.join(PRIMARY_ORDER)}.")
        rgb = name in RGB_OUTPUTS
        shape = tuple(data.shape)
        if rgb and (len(shape) != 3 or shape[2] != 3) or not rgb and not (
                len(shape) == 2 or len(shape) == 3 and shape[2] in (1, 3)):
            raise InputError(f"the {name} stain has shape {shape}; expected (Y, X, 3)"
                             + ("" if rgb else " or (Y, X)") + ": one plane, colour last.")
        planes[name] = data if rgb or len(shape) == 2 else data[..., 0]  # enhanced: gray in every channel
    sizes = {tuple(plane.shape[:2]) for plane in planes.values()}
    if len(sizes) != 1:
        raise InputError(f"the stains differ in size ({', '.join(f'{n}: {tuple(p.shape[:2])}' for n, p in planes.items())}); "
                         "save the outputs of one input together.")
    return planes


def _unit(plane, box: tuple[int, int, int, int]) -> np.ndarray:
    """One unit of a plane as uint8, computed (stained, for a lazy layer) only now."""
    from digital_stain.stain.lazy import stained_when_read

    y0, y1, x0, x1 = box
    with stained_when_read():  # a napari layer's lazy stain: the stain, not its placeholder
        block = np.asarray(plane[y0:y1, x0:x1])
    return block if block.dtype == np.uint8 else to_uint8(block.astype(np.float32))


def _provenance() -> dict:
    from digital_stain.stain.model import provenance

    made = provenance()
    return {"package": made["package"], "torch": made["torch"], "python": made["python"], "saved": made["date"]}
