"""Stain a list of image files (a folder) into an output folder: the command line's and the napari widget's one way.

One adaptation is decided for all the images that can be stained (measured on them pooled), each
image is stained with the out-of-memory policy of :mod:`digital_stain.stain.oom`, and every result
keeps its input's name (``OUTPUT/<output>/<name>.png``, or straight in ``OUTPUT`` for one output).
A file that cannot be stained is skipped with its reason; the others are written. The folder
appears only when complete (staged beside it, then moved in place), and replaces an existing one
only with ``overwrite`` and only if it is ours.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from digital_stain.core.arrays import InputError, to_uint8


@dataclass
class FolderResult:
    """What :func:`stain_files` did.

    Attributes
    ----------
    output : Path
    written : list of Path
        Every file written, at its final place.
    skipped : list of str
        ``"name: reason"`` for each input that could not be stained.
    adaptation : Adaptation
        The one decision for all the images (:mod:`digital_stain.core.adapt`).
    notes : list of str
        What was done that the user should know (e.g. a stack written as multi-page TIFF).
    """

    output: Path
    written: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    adaptation: object = None
    notes: list = field(default_factory=list)


def stain_files(model, inputs: list, output: str | os.PathLike, outputs=None, *, single_file: bool = False,
                fmt: str = "png", tile: int | None = None, overlap: int | None = None, precision: str = "auto",
                compile: bool = False, adapt: str = "auto", overwrite: bool = False,
                progress: Callable[[int, int], None] | None = None,
                on_image: Callable[[Path, int, int], Callable | None] | None = None,
                notify: Callable[[str], None] | None = None, stop: threading.Event | None = None,
                on_stained: Callable[[Path, np.ndarray, dict], None] | None = None) -> FolderResult:
    """Stain image files into ``output``.

    Parameters
    ----------
    model : StainModel
    inputs : list of Path
        Image files (or OME-Zarr stores), each stained whole.
    output : path-like
        A folder; with ``single_file`` (one input, one output) the file to write.
    outputs : sequence of str, optional
        Which outputs (default: every one the model has).
    fmt : ``"png"`` or ``"tif"``
        Stacks are always written as multi-page TIFF (a note says so). TIFFs carry the input's pixel size.
    tile, overlap, precision, compile, adapt
        As for :meth:`StainModel.stain`; ``adapt`` is decided once for all the images.
    overwrite : bool
        Replace an existing ``output`` (only if it is ours).
    progress : callable, optional
        ``progress(done, total)`` in images, after each one (stained or skipped).
    on_image : callable, optional
        ``on_image(path, index, count)`` before each image; may return a ``progress(done, total)``
        for that image's tiles.
    notify : callable, optional
        Told what the user should know, one sentence at a time (adaptation, fallbacks, notes).
    stop : threading.Event, optional
        Set it to stop after the current image: :class:`~digital_stain.stain.tiling.Cancelled` is
        raised and nothing is left at ``output``.
    on_stained : callable, optional
        ``on_stained(path, image, results)`` after each image (e.g. to show it).

    Returns
    -------
    FolderResult

    Raises
    ------
    InputError
        An output that is an input or may not be replaced, or no image that can be stained.
    """
    from digital_stain.core.arrays import scaling_note, value_scaling
    from digital_stain.io.images import atomic_path, read_calibration, read_image, write_image
    from digital_stain.io.outputs import check_not_input, check_replaceable, output_lock
    from digital_stain.stain.oom import stain_with_fallback
    from digital_stain.stain.tiling import Cancelled

    output, inputs = Path(output), [Path(p) for p in inputs]
    say = notify or (lambda message: None)
    check_not_input(output, inputs)
    check_replaceable(output, overwrite=overwrite)
    wanted = model.check_outputs(list(outputs) if outputs else None)
    kept: dict = {}  # one input is read once; a folder is read again to stain each image
    images = stainable_images(inputs, kept if len(inputs) == 1 else None)
    first = next(images, None) if adapt != "off" else None
    # one decision for all the images that can be stained (if none can, the loop says why for each file)
    adaptation = model.adaptation(itertools.chain([first], images) if first is not None else None,
                                  adapt if first is not None else "off")
    result = FolderResult(output, adaptation=adaptation)
    if first is not None or adapt == "off":
        say(f"{'folder' if len(inputs) > 1 else 'input'}: {adaptation.message(model.name)}")
    staged_files = []
    with output_lock(output), atomic_path(output, overwrite=overwrite) as staging:
        if not single_file:
            staging.mkdir(parents=True)
        for index, path in enumerate(inputs):
            if stop is not None and stop.is_set():
                raise Cancelled(f"stopped after {index} of {len(inputs)} image(s); nothing was written.")
            tiles = on_image(path, index, len(inputs)) if on_image is not None else None
            try:
                image = kept.pop(path) if path in kept else np.asarray(read_image(path))
                # the widget's and the CLI's out-of-memory policy (oom.next_step): smaller tiles, then the CPU
                results, _ = stain_with_fallback(model, image, wanted, tile=tile, overlap=overlap, adapt=adaptation,
                                                 precision=precision, compile=compile, progress=tiles, stop=stop,
                                                 notify=lambda message: say(f"note: {message}"))
                note = scaling_note(value_scaling(image))  # stained, so the values are usable
                if note is not None:
                    say(f"note: {path.name}: {note}")
            except InputError as err:
                if len(inputs) == 1:
                    raise
                result.skipped.append(f"{path.name}: {err}")
                if progress is not None:
                    progress(index + 1, len(inputs))
                continue
            calibration = read_calibration(path)  # TIFF outputs record the input's pixel size
            for name, array in results.items():
                target = _target(staging, path, name, array, single_file, fmt, len(wanted) > 1, result.notes, say)
                target.parent.mkdir(parents=True, exist_ok=True)
                write_image(target, to_uint8(array), overwrite=True, rgb=name != "enhanced", calibration=calibration)
                staged_files.append(target.relative_to(staging) if not single_file else None)
            if on_stained is not None:
                on_stained(path, image, results)
            if progress is not None:
                progress(index + 1, len(inputs))
        if len(result.skipped) == len(inputs):
            raise InputError("no image could be stained:\n  " + "\n  ".join(result.skipped))
    result.written = [output if relative is None else output / relative for relative in staged_files]
    return result


def stainable_images(paths: list, keep: dict | None):
    """The images of ``paths`` that can be stained, read one at a time (and kept in ``keep`` when given);
    the others are left to the staining loop, which reports each with its reason."""
    from digital_stain.core.arrays import check_plane_shape, split_planes, value_scaling
    from digital_stain.io.images import read_image

    for path in paths:
        try:
            image = np.asarray(read_image(path))
            check_plane_shape(split_planes(image.shape)[1])
            value_scaling(image)
        except InputError:
            continue
        if keep is not None:
            keep[path] = image
        yield image


def _target(staging: Path, path: Path, name: str, array: np.ndarray, single_file: bool, fmt: str, several: bool,
            notes: list, say) -> Path:
    """Where one output of one input goes: ``staging`` itself (one file), else by output and input name."""
    if single_file:
        return staging
    is_stack = array.ndim > (2 if name == "enhanced" else 3)
    suffix = ".tif" if fmt == "tif" or is_stack else ".png"
    if is_stack and fmt != "tif":
        note = f"{path.name}: a stack of {array.shape[0]} planes; {name} written as multi-page TIFF."
        notes.append(note)
        say(note)
    stem = path.name[: -len(".ome.zarr")] if path.name.lower().endswith(".ome.zarr") else path.stem
    return (staging / name if several else staging) / f"{stem}{suffix}"
