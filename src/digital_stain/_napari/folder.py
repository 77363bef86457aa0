"""**Stain a folder…** in the Digitally stain widget: every image of a folder stained into a new folder, in
the background, by :func:`digital_stain.stain.folder.stain_files` (what ``digital-stain stain FOLDER -o OUT``
calls), with the widget's model, outputs, device, tile and adapt, progress per image, Stop, and a summary.

Nothing is added to the viewer: the stains go to disk, named as their inputs, into
``<chosen folder>/<input folder>-stained`` (a new folder, so nothing of the user's is replaced).
"""

from __future__ import annotations

from pathlib import Path

from digital_stain.core.arrays import InputError


def output_folder(source: str | Path, parent: str | Path) -> Path:
    """Where the stains of folder ``source`` go when the user picks ``parent``: a new ``<source>-stained`` in it."""
    return Path(parent) / f"{Path(source).name}-stained"


def folder_work(source: Path, output: Path, used: dict):
    """The job for :func:`digital_stain._napari.worker.start_job`: stain ``source`` into ``output``."""
    from digital_stain._napari.models import load_model
    from digital_stain.io.images import list_images
    from digital_stain.stain.folder import stain_files

    def work(bridge, stop):
        inputs = list_images(source)
        if not inputs:
            raise InputError(f"{source} has no image files (PNG, JPEG, TIFF, OME-Zarr) to stain.")
        model = load_model(used["model"], used["device"])
        return stain_files(model, inputs, output, used["outputs"], tile=used["tile"], adapt=used["adapt"],
                           progress=bridge.progress.emit, notify=lambda message: bridge.event.emit(message),
                           stop=stop)

    return work


def summary(result) -> str:
    """One message for the user: what was written where, and each file skipped with its reason."""
    stained = len({path.stem for path in result.written})
    text = f"stained {stained} image(s) into {result.output}"
    if result.skipped:
        text += f"; {len(result.skipped)} skipped:\n" + "\n".join(result.skipped)
    return text
