"""Nuclei of a list of image files (a folder) into an output folder: one uint16 label TIFF per input.

As :func:`digital_stain.stain.folder.stain_files` does for stains: one adaptation for all the images
(measured on them pooled), a file that cannot be read is skipped with its reason, names are kept
(``OUTPUT/<name>.tif``, carrying the input's pixel size), and the folder appears only when complete.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from digital_stain.core.arrays import InputError
from digital_stain.nuclei.find import choose_method, find_nuclei, stain_source
from digital_stain.nuclei.segment import NucleiSettings


@dataclass
class NucleiFiles:
    """What :func:`find_nuclei_files` did.

    Attributes
    ----------
    output : Path
    written : list of Path
    counts : dict
        Input name -> nuclei found.
    skipped : list of str
        ``"name: reason"`` for each input that could not be read.
    method : str
    adaptation : Adaptation
    """

    output: Path
    written: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)
    method: str = "adaptation"
    adaptation: object = None


def find_nuclei_files(model, inputs: list, output: str | os.PathLike, *, method: str = "auto", stain: str = "auto",
                      nuclei: NucleiSettings | None = None, settings=None, adapt: str = "auto",
                      overwrite: bool = False, progress: Callable[[int, int], None] | None = None,
                      notify: Callable[[str], None] | None = None,
                      stop: threading.Event | None = None) -> NucleiFiles:
    """Find the nuclei of each image file and write them as label images into the folder ``output``.

    Parameters
    ----------
    model : StainModel
    inputs : list of Path
        Dark-field image files (or OME-Zarr stores), one plane each.
    output : path-like
        The folder to write: ``<input stem>.tif``, uint16 labels the size of the input.
    method, stain, nuclei, settings
        As for :func:`~digital_stain.nuclei.find.find_nuclei`.
    adapt : ``auto|on|off``
        Adaptation to another microscope, decided once for all the images.
    overwrite : bool
        Replace an existing ``output`` (only if this tool wrote it).
    progress : callable, optional
        ``progress(done, total)`` in images.
    notify : callable, optional
        Told what the user should know (the adaptation, one sentence).
    stop : threading.Event, optional
        Set it to stop after the current image: :class:`~digital_stain.stain.tiling.Cancelled` is
        raised and nothing is left at ``output``.

    Returns
    -------
    NucleiFiles

    Raises
    ------
    InputError
        A method the model cannot do, an output that is an input or may not be replaced, or no
        image that can be read.
    """
    from digital_stain.io.images import atomic_path, read_calibration, read_image, write_image
    from digital_stain.io.outputs import check_not_input, check_replaceable, output_lock
    from digital_stain.stain.folder import stainable_images
    from digital_stain.stain.tiling import Cancelled

    output, inputs = Path(output), [Path(p) for p in inputs]
    chosen = choose_method(model, method)  # refused before anything is read
    stain_source(model, stain)
    check_not_input(output, inputs)
    check_replaceable(output, overwrite=overwrite)
    kept: dict = {}
    images = stainable_images(inputs, kept if len(inputs) == 1 else None)
    first = next(images, None) if adapt != "off" else None
    adaptation = model.adaptation(itertools.chain([first], images) if first is not None else None,
                                  adapt if first is not None else "off")
    if notify is not None:
        notify(f"{'folder' if len(inputs) > 1 else 'input'}: {adaptation.message(model.name)}")
    result = NucleiFiles(output, method=chosen, adaptation=adaptation)
    names = []
    with output_lock(output), atomic_path(output, overwrite=overwrite) as staging:
        staging.mkdir(parents=True)
        for index, path in enumerate(inputs):
            if stop is not None and stop.is_set():
                raise Cancelled(f"stopped after {index} of {len(inputs)} image(s); nothing was written.")
            try:
                image = kept.pop(path) if path in kept else np.asarray(read_image(path))
                found = find_nuclei(model, image, method=chosen, stain=stain, nuclei=nuclei, settings=settings,
                                    adapt=adaptation, stop=stop)
            except InputError as err:
                if len(inputs) == 1:
                    raise
                result.skipped.append(f"{path.name}: {err}")
            else:
                stem = path.name[: -len(".ome.zarr")] if path.name.lower().endswith(".ome.zarr") else path.stem
                write_image(staging / f"{stem}.tif", found.labels, overwrite=True, rgb=False,
                            calibration=read_calibration(path))
                names.append(f"{stem}.tif")
                result.counts[path.name] = found.count
            if progress is not None:
                progress(index + 1, len(inputs))
        if len(result.skipped) == len(inputs):
            raise InputError("no image could be read:\n  " + "\n  ".join(result.skipped))
    result.written = [output / name for name in names]
    return result
