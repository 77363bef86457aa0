"""The napari writer: stained layers saved as one OME-Zarr store (**File > Save Selected Layers...**).

napari's own writers cannot save a multiscale layer, so a lazily stained slide could not be saved
from the viewer. This writer hands the selected stained layers (outputs of **Digitally stain**,
marked in their metadata) to :func:`digital_stain.slide.export.save_stains`: the store the
whole-slide command writes, with the layers' scale, translation and units. A lazy layer is
stained chunk by chunk while it is saved, with a progress bar in napari's activity dock.
"""

from __future__ import annotations

from pathlib import Path

from digital_stain.core.arrays import InputError
from digital_stain.io.calibration import Calibration, unit_name


def write_stains(path: str, layer_data: list[tuple]) -> list[str]:
    """npe2 multi-layer writer: the stained image layers in ``layer_data`` into the store at ``path``.

    What cannot be saved is said in an error notification, and nothing is written (napari would
    otherwise swallow the reason: it treats a ValueError from a writer as "not my format").
    """
    from napari.utils.notifications import show_error

    try:
        return [str(_write(Path(path), layer_data))]
    except InputError as err:
        show_error(f"Not saved: {err}")
        return []


def _write(target: Path, layer_data: list[tuple]) -> Path:
    from napari.utils import progress

    stains, record, calibration = {}, {}, None
    for data, meta, layer_type in layer_data:
        made = (meta.get("metadata") or {}).get("digital_stain")
        if layer_type != "image" or not isinstance(made, dict) or made.get("output") not in ("enhanced", "teacher",
                                                                                            "student"):
            raise InputError(f"{meta.get('name', 'a layer')!r} is not a stained output of Digitally stain; "
                             "select only the enhanced, teacher and student layers of one input to save them as "
                             "OME-Zarr (napari's own writers save other layers).")
        if made["output"] in stains:
            raise InputError(f"two {made['output']} layers are selected; select the outputs of one input.")
        stains[made["output"]] = data[0] if meta.get("multiscale") else data
        record = {key: value for key, value in made.items() if key != "output"}
        calibration = calibration or _calibration(meta)
    with progress(total=0, desc=f"Saving {target.name}") as bar:
        def advance(done: int, total: int) -> None:
            if bar.total != total:
                bar.total = total
            bar.update(done - bar.n)

        # napari has asked before replacing an existing path; only a store we wrote is replaced
        from digital_stain.slide.export import save_stains

        return save_stains(target, stains, calibration=calibration, record=record, overwrite=True, progress=advance)


def _calibration(meta: dict) -> Calibration | None:
    """The layer's placement as a Calibration (scale, translate and units of its last two axes)."""
    scale, translate = meta.get("scale"), meta.get("translate")
    if scale is None:
        return None
    units = meta.get("units") or ()
    unit = unit_name(str(units[-1])) if len(units) else None
    origin = tuple(translate[-2:]) if translate is not None else (0.0, 0.0)
    calibration = Calibration((float(scale[-2]), float(scale[-1])), unit, (float(origin[0]), float(origin[1])))
    return None if calibration == Calibration((1.0, 1.0), None) else calibration
