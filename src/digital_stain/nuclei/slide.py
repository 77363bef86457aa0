"""Nuclei of a whole slide: stained into an OME-Zarr store, then labelled chunk by chunk into its NGFF ``labels``.

``digital-stain nuclei SLIDE -o OUT.ome.zarr`` stains the slide as ``stain`` does
(:func:`digital_stain.slide.run.stain_to_zarr`: bounded memory, resumable; only the stain that is
segmented, :func:`~digital_stain.nuclei.find.stain_source`: the teacher by default), then segments the stored stain unit by unit
(:mod:`digital_stain.nuclei.chunked`: one threshold for the slide, labels named by centroid, so
chunks agree) and writes an NGFF label image beside it. By tutorship (a model with a segmenter)
the store holds the enhanced gray instead, and the segmenter labels it unit by unit::

    OUT.ome.zarr/
      teacher/0, 1, ...          the stain segmented (as stain writes it)
      labels/                    "labels": ["nuclei"]
        nuclei/0, 1, ...         uint32 (Y, X), level k + 1 every other pixel of level k;
                                 "image-label" (source "../../"), the stain's scale and translation

The root's ``digital_stain`` record gets ``nuclei``: the count, the method, the threshold and the
segmenter's settings. Labels are written after the stain is complete; a run stopped while
labelling leaves the stain complete and no labels (``labels`` is written under a temporary name
and renamed when whole), and ``--resume`` then labels it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from digital_stain.core.arrays import InputError
from digital_stain.nuclei.chunked import MARGIN, global_threshold, label_block, label_dtype, spread, with_margin
from digital_stain.nuclei.find import choose_method, stain_source
from digital_stain.nuclei.segment import NucleiSettings

LABELS = "nuclei"
STAGING = ".labels.partial"
METHOD = "digital_stain.nuclei.slide.label_store"  # recorded in our labels' metadata: how we know them


@dataclass
class SlideNuclei:
    """What :func:`find_nuclei_slide` did: ``count`` nuclei (None when stopped), the staining's result."""

    output: Path
    count: int | None
    stained: object
    threshold: float | None = None
    notes: list = field(default_factory=list)

    @property
    def stopped(self) -> bool:
        return self.count is None


def find_nuclei_slide(model, source, output: str | os.PathLike, *, method: str = "auto", stain: str = "auto",
                      nuclei: NucleiSettings | None = None, resume: bool = False, overwrite: bool = False,
                      progress: Callable[[int, int], None] | None = None, stop: threading.Event | None = None,
                      **staining) -> SlideNuclei:
    """Stain a whole slide into an OME-Zarr store and label its nuclei there (module docstring).

    Parameters
    ----------
    model : StainModel
    source : path-like, array or Source
        The dark-field slide, as for :func:`~digital_stain.slide.run.stain_to_zarr`.
    output : path-like
        The store (``*.ome.zarr``).
    method : ``auto|adaptation|tutorship``
        As for :func:`~digital_stain.nuclei.find.find_nuclei` (``auto``: tutorship when the model holds
        a segmenter). Tutorship stores the enhanced gray and segments it with the model's segmenter.
    stain : ``auto|teacher|student``
        Adaptation: the stain stored and segmented, as for :func:`~digital_stain.nuclei.find.find_nuclei`.
    nuclei : NucleiSettings, optional
    resume, overwrite, progress, stop, **staining
        As for :func:`~digital_stain.slide.run.stain_to_zarr` (``chunk``, ``overlap``, ``device``,
        ``precision``, ``adapt``, ``ngff``, ...); ``progress`` counts the stain's units, then the labels'.

    Returns
    -------
    SlideNuclei
    """
    from digital_stain.slide.run import stain_to_zarr

    chosen = choose_method(model, method)
    nuclei = nuclei or NucleiSettings()
    source_output = stain_source(model, stain) if chosen == "adaptation" else "enhanced"
    stained = stain_to_zarr(model, source, output, [source_output], resume=resume, overwrite=overwrite,
                            progress=progress, stop=stop, **staining)
    result = SlideNuclei(Path(output), None, stained, notes=list(stained.notes))
    if stained.stopped:
        return result
    count, threshold = label_store(Path(output), source_output, nuclei, progress=progress, stop=stop,
                                   done_before=stained.units_total,
                                   segmenter=model.segmenter if chosen == "tutorship" else None)
    result.count, result.threshold = count, threshold
    return result


def label_store(path: Path, output: str, nuclei: NucleiSettings, *, progress=None, stop=None,
                done_before: int = 0, segmenter=None) -> tuple[int | None, float | None]:
    """Write ``labels/nuclei`` for the stored ``output`` of a complete store; returns (count, threshold),
    (None, None) when stopped (nothing of the labels is left then).

    With a ``segmenter`` (tutorship) ``output`` is ``enhanced`` and the segmenter finds the nuclei
    (no threshold: None); without, the stored stain is segmented with one threshold (adaptation)."""
    from digital_stain.io.images import read_calibration
    from digital_stain.slide.store import SlideStore, ngff_attributes, ngff_version, read_state

    if read_state(path) is None:  # only ever a store this package started (stain_to_zarr checked it too)
        raise InputError(f"{path} is not a stained store this tool wrote; nuclei are labelled only there.")
    store = SlideStore(path)
    state = store.state
    record = state.get("nuclei")
    if record is not None and (path / "labels" / LABELS).exists():  # labelled before: nothing to do
        return int(record["count"]), None if record["threshold"] is None else float(record["threshold"])
    if (path / "labels").exists() and not _our_labels(path / "labels"):
        raise InputError(f"{path / 'labels'} holds labels this tool did not write (another program added them); "
                         "they are not replaced. Move them out of the store, or label into a new store.")
    grid = store.grid
    height, width = grid.levels[0]
    method = "tutorship" if segmenter is not None else "adaptation"
    threshold = global_threshold(_spread_crops(store, output, grid), nuclei) if method == "adaptation" else None
    version = ngff_version(state)
    staging = path / STAGING  # our own name inside our store: what a stopped or crashed labelling left
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(path / "labels", ignore_errors=True)  # ours (checked above): left by a crash before the record
    group = store.group.require_group(staging.name)
    labels = group.require_group(LABELS)
    arrays = _label_arrays(store, labels, grid, label_dtype((height, width)))
    total = done_before + sum(len(grid.units(level)) for level in range(len(grid.levels)))
    done, count = done_before, 0
    for level in range(len(grid.levels)):
        for key in grid.units(level):
            if stop is not None and stop.is_set():
                shutil.rmtree(staging, ignore_errors=True)
                return None, None
            box = grid.box(level, key)
            if level == 0:
                block, own = _label_unit(store, output, box, (height, width), nuclei, threshold, segmenter)
                count += own
            else:
                y0, y1, x0, x1 = box
                block = arrays[level - 1][2 * y0 : 2 * y1 : 2, 2 * x0 : 2 * x1 : 2]  # labels: nearest, never a mean
            arrays[level][box[0] : box[1], box[2] : box[3]] = block
            done += 1
            if progress is not None:
                progress(done, total)
    entry = _labels_multiscale(read_calibration(path), grid, version)
    labels.attrs.update(ngff_attributes(version, {"multiscales": [entry], "image-label": {
        **({"version": version} if version == "0.4" else {}), "source": {"image": "../../"}}}))
    group.attrs.update(ngff_attributes(version, {"labels": [LABELS]}))
    os.replace(staging, path / "labels")
    store.update_state(nuclei={"count": count, "method": method, "source": output, "threshold": threshold,
                               "margin": MARGIN, "settings": dataclasses.asdict(nuclei)})
    return count, threshold


def _our_labels(folder: Path) -> bool:
    """Whether a store's ``labels`` group holds only our nuclei label image (its metadata names our writer)."""
    import zarr

    from digital_stain.io.images import ngff_multiscales

    try:
        group = zarr.open_group(str(folder), mode="r")
        names = sorted(group.group_keys())
        entries = ngff_multiscales(dict(group[LABELS].attrs)) if names == [LABELS] else []
    except Exception:  # noqa: BLE001 - unreadable: not provably ours, so never deleted
        return False
    return bool(entries) and entries[0].get("metadata", {}).get("method") == METHOD


def _spread_crops(store, output: str, grid) -> list:
    """Up to 16 level-0 units (:data:`~digital_stain.nuclei.chunked.THRESHOLD_CROPS`) spread evenly over the
    slide, as float RGB."""
    units = grid.units(0)
    return [store.read(output, 0, grid.box(0, units[i])).astype(np.float32) / 255.0 for i in spread(len(units))]


def _label_arrays(store, labels, grid, dtype) -> list:
    from digital_stain.slide.store import require_array

    return [require_array(labels, str(level), shape, (grid.chunk, grid.chunk), compress=True, dimensions=("y", "x"),
                          dtype=dtype)
            for level, shape in enumerate(grid.levels)]


def _label_unit(store, output: str, box: tuple, shape: tuple, nuclei: NucleiSettings, threshold: float | None,
                segmenter=None):
    """Labels of one level-0 unit, segmented with :data:`MARGIN` px of its neighbours around it."""
    region, core = with_margin(box, shape)
    image = store.read(output, 0, region).astype(np.float32) / 255.0
    return label_block("tutorship" if segmenter is not None else "adaptation", image, (region[0], region[2]), core,
                       shape, nuclei, threshold, segmenter)


def _labels_multiscale(calibration, grid, version: str) -> dict:
    from digital_stain.slide.store import multiscale_entry

    entry = multiscale_entry(LABELS, grid, calibration, prefix="", version=version)
    # level k keeps pixels 0, 2, 4, ... of level k - 1: its first pixel lies where level 0's does (no
    # half-pixel move, unlike a 2 x 2 mean), at the scale of the stain's level k
    first = entry["datasets"][0]["coordinateTransformations"][1]["translation"]
    for dataset in entry["datasets"]:
        dataset["coordinateTransformations"][1]["translation"] = list(first)
    entry.update({"type": "nearest", "metadata": {"description": "every other pixel of the level above; labels",
                                                  "method": METHOD}})
    return entry


def check_slide_input(path: Path) -> None:
    """Refuse a folder for a store output (one store holds one slide)."""
    from digital_stain.slide.store import looks_like_zarr

    if path.is_dir() and not path.name.lower().endswith(".zarr") and not looks_like_zarr(path):
        raise InputError(f"{path} is a folder of images; an OME-Zarr output holds one slide. Give one image or "
                         "OME-Zarr store as INPUT, or write labels for a folder into a folder (-o LABELS/).")
