"""Nuclei of a dark-field image, found by translation: stain it, then segment the virtual H&E (adaptation).

Boschet et al.'s "adaptation" (U -> L): the model translates the dark-field into H&E, where a
segmenter made for H&E (:func:`digital_stain.nuclei.segment.segment_nuclei`) finds the nuclei. No
dark-field image was ever annotated for it. The stain is the same one :meth:`StainModel.stain`
gives, with the same settings and adaptation to another microscope, so the labels lie on the
nuclei the user sees in the stained layers.

Which stain: the teacher's by default (``stain="auto"``), the student's when asked, or when the
model has no teacher. Measured on synthetic dark-field of H&E with nuclei masks
(``benchmarks/nuclei.py``, ``docs/benchmarks.md``), the teacher's stain gave the better nuclei for
both DSD_U models at both magnifications tried (Dice 0.70-0.72 against the students' 0.60-0.70),
as it did on the held-back tissues of issue 18 (0.61 against 0.51). ``dsd-paired``, whose teacher
learnt DSD_P's pinker H&E, is the exception at full size (student 0.70, teacher 0.57): choose
``stain="student"`` for it.

Their "tutorship" (L -> U: a segmenter trained on H&E translated into dark-field,
:mod:`digital_stain.nuclei.tutor`) runs when the model file holds such a segmenter
(``digital-stain train-nuclei``); it reads the enhanced gray of the input.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from digital_stain.core.arrays import InputError
from digital_stain.nuclei.segment import NucleiSettings, segment_nuclei

METHODS = ("auto", "adaptation", "tutorship")
STAINS = ("auto", "teacher", "student")


@dataclass
class Nuclei:
    """What :func:`find_nuclei` found.

    Attributes
    ----------
    labels : ndarray, shape (Y, X), uint16
        0 background, 1..count the nuclei.
    count : int
    method : str
        ``adaptation`` or ``tutorship``.
    source : str
        The output segmented: ``teacher`` or ``student`` (adaptation), ``enhanced`` (tutorship).
    stained : ndarray, shape (Y, X, 3) or (Y, X), float32, or None
        That output, as :meth:`StainModel.stain` gave it (None when found chunk by chunk).
    adaptation : dict
        The stain's adaptation to another microscope (what was decided, the distance), for provenance.
    notes : list of str
    """

    labels: np.ndarray
    count: int
    method: str
    source: str
    stained: np.ndarray | None
    adaptation: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def choose_method(model, method: str) -> str:
    """The method ``method`` means for ``model``: ``auto`` is tutorship when the model holds a segmenter, else adaptation."""
    if method not in METHODS:
        raise InputError(f"nuclei method {method!r} is not known; use one of {', '.join(METHODS)}.")
    has_segmenter = getattr(model, "segmenter", None) is not None
    if method == "tutorship" and not has_segmenter:
        raise InputError(f"model {model.name} has no nuclei segmenter, which tutorship needs; train one into a "
                         "model file with digital-stain train-nuclei, or use --method adaptation "
                         "(method='adaptation'): stain, then segment the virtual H&E.")
    if method == "auto":
        return "tutorship" if has_segmenter else "adaptation"
    return method


def stain_source(model, stain: str = "auto") -> str:
    """The output to segment: ``stain``, or for ``auto`` the teacher where the model has one (its nuclei
    measured better; module docstring), else the student."""
    if stain not in STAINS:
        raise InputError(f"stain {stain!r} is not known; use one of {', '.join(STAINS)}.")
    if stain != "auto":
        model.check_outputs([stain])  # says plainly when the model has no such output
        return stain
    for name in ("teacher", "student"):
        if name in model.outputs:
            return name
    raise InputError(f"model {model.name} has neither a teacher nor a student, so it makes no H&E to find "
                     "nuclei in; choose a model with a stain (e.g. dsd-unpaired).")


def find_nuclei(model, darkfield, *, method: str = "auto", stain: str = "auto", nuclei: NucleiSettings | None = None,
                settings=None, adapt=None, progress: Callable[[int, int], None] | None = None,
                stop: threading.Event | None = None) -> Nuclei:
    """Nuclei of one dark-field plane as instance labels, by translation.

    Parameters
    ----------
    model : StainModel
        The model that stains (:meth:`StainModel.load`).
    darkfield : array-like, shape (Y, X) or (Y, X, C)
        One gray or RGB dark-field plane; uint8, uint16 or float (``docs/architecture.md``).
    method : ``auto|adaptation|tutorship``
        ``adaptation``: stain, then segment the virtual H&E. ``auto`` chooses tutorship for a model
        that holds a nuclei segmenter, else adaptation.
    stain : ``auto|teacher|student``
        Adaptation: the stain to segment; ``auto``: the teacher where the model has one, else the student.
    nuclei : NucleiSettings, optional
        The H&E segmenter's parameters.
    settings : StainSettings, optional
        How to stain (as for :meth:`StainModel.stain`).
    adapt : str or Adaptation, optional
        Adaptation to another microscope, as for :meth:`StainModel.stain` (e.g. decided once for a folder).
    progress, stop
        As for :meth:`StainModel.stain` (the stain is nearly all of the time).

    Returns
    -------
    Nuclei

    Raises
    ------
    InputError
        An unknown method, a model that cannot do it, or an input that is not one plane.
    """
    chosen = choose_method(model, method)
    plane = np.asarray(darkfield) if not hasattr(darkfield, "dask") else darkfield
    if plane.ndim not in (2, 3) or plane.ndim == 3 and plane.shape[-1] not in (1, 3, 4):
        raise InputError(f"nuclei are found in one dark-field plane, (Y, X) or (Y, X, 3); this image has shape "
                         f"{tuple(plane.shape)}. Give one plane of a stack at a time.")
    source = stain_source(model, stain) if chosen == "adaptation" else "enhanced"
    if adapt is None:
        adapt = settings.adapt if settings is not None else "auto"
    adaptation = model.adaptation(plane, adapt)  # decided once, and recorded with the labels
    stained = model.stain(plane, [source], settings=settings, adapt=adaptation, progress=progress, stop=stop)[source]
    if chosen == "tutorship":
        from digital_stain.nuclei.tutor import segment_enhanced

        labels = segment_enhanced(model.segmenter, stained, nuclei)
    else:
        labels = segment_nuclei(stained, nuclei)
    return Nuclei(labels=labels, count=int(labels.max()), method=chosen, source=source, stained=stained,
                  adaptation=adaptation.describe())
