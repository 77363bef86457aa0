"""Staining another microscope's dark-field: whether an input is far from the model's, and what adapting does.

A model's enhancer CDF ``c_d`` and its student were fitted on one microscope's dark-field.
On a brighter set-up ``1 - c_d(x)`` is about 0 for nearly every pixel (a black enhanced
image and teacher), and the student sees raw RGB far outside anything it was trained on.
Adapting, decided once for a whole input (an image, a folder, a slide), does two things:

* ``c_d`` is refitted on the input's own luma histogram (dataset-level, as the paper's
  enhancer is: one table for the whole input), keeping the model's bright-field ``c_b``;
* each raw colour channel the student receives is mapped onto the distribution its
  student was trained on (histogram matching, one table per channel).

Both are per-pixel look-up tables fixed for the input, so a tile, a lazy chunk and a
slide unit all get the same mapping (no seams; a resumed slide gives the same bytes).

When (``adapt="auto"``): the distance is the largest Kolmogorov-Smirnov distance between
the input's and the model's CDFs, over the luma and the three channels. It is the largest
error, in quantiles, of the enhanced image that the model's own ``c_d`` would make on the
input. Tissue alone moves it too: a single 256 px DSD_U tile lies up to 0.65 from the
DSD_U training set, a folder of 32 of them 0.15 (``benchmarks/transfer.py`` measures
this), so the threshold falls with the amount of input, in 256^2 fields of view:
``0.2 + 0.5 / sqrt(fields)``, with at most 64 fields counted (floor 0.2625). It lies above
every same-microscope input we measured of each size, and below every DSD_P input and
every x4 gain (0.94 and 0.71 for folders).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from digital_stain.core.arrays import InputError
from digital_stain.core.enhance import BINS
from digital_stain.core.histograms import Distribution

ADAPT_MODES = ("auto", "on", "off")
FIELD_PIXELS = 256 * 256  # one training tile: the unit in which the amount of input is counted
THRESHOLD_FLOOR, THRESHOLD_SPREAD, MAX_FIELDS = 0.2, 0.5, 64


def check_mode(mode: str) -> str:
    """``auto``, ``on`` or ``off`` (case-insensitive); anything else is refused."""
    text = str(mode).strip().lower()
    if text not in ADAPT_MODES:
        raise InputError(f"unknown adaptation {mode!r}; choose auto (adapt when the input is far from the model's "
                         "dark-field), on or off.")
    return text


def _cdf(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    if total <= 0:
        raise InputError("cannot compare an empty histogram; the input has no pixels.")
    return np.cumsum(counts, dtype=np.float64) / total


def distance(measured: Distribution, reference: Distribution) -> float:
    """Largest Kolmogorov-Smirnov distance between the CDFs of the luma and of each channel (0..1).

    Channels count only when both distributions have them (model files from before they
    were recorded compare on luma alone).
    """
    pairs = [(measured.luma, reference.luma)]
    if measured.channels is not None and reference.channels is not None:
        pairs += list(zip(measured.channels, reference.channels))
    return float(max(np.abs(_cdf(a) - _cdf(b)).max() for a, b in pairs))


def threshold(pixels: int) -> float:
    """The distance above which ``auto`` adapts an input of ``pixels`` pixels (see the module docstring)."""
    fields = min(max(pixels / FIELD_PIXELS, 1.0), MAX_FIELDS)
    return THRESHOLD_FLOOR + THRESHOLD_SPREAD / float(np.sqrt(fields))


def match_table(source: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Histogram matching as a table over the ``BINS`` bins: source value -> reference value with the same quantile.

    Mid-point CDFs on both sides (half of a bin's own pixels below it), so a level keeps its
    rank among the others; the reference's quantile function interpolates linearly between
    the centres of its occupied bins. Returns float32 ``(BINS,)`` values in [0, 1], non-decreasing.
    """
    centres = (np.arange(BINS) + 0.5) / BINS
    source_mid = _cdf(source) - np.asarray(source, np.float64) / (2 * source.sum())
    reference_mid = _cdf(reference) - np.asarray(reference, np.float64) / (2 * reference.sum())
    occupied = np.asarray(reference) > 0
    return np.interp(source_mid, reference_mid[occupied], centres[occupied]).astype(np.float32)


def channel_maps(source: Distribution, reference: Distribution) -> np.ndarray | None:
    """Per-channel tables ``(3, BINS)`` mapping ``source``'s channels onto ``reference``'s; ``None`` when identical.

    Without channel histograms on either side, the luma table is used for all three channels
    (it corrects gain and gamma, not a tint).
    """
    if source.same_as(reference):
        return None
    if source.channels is not None and reference.channels is not None:
        return np.stack([match_table(s, r) for s, r in zip(source.channels, reference.channels)])
    return np.repeat(match_table(source.luma, reference.luma)[None], 3, axis=0)


@dataclass(frozen=True, eq=False)
class Adaptation:
    """What was decided for one input (an image, a folder, a slide).

    Attributes
    ----------
    mode : str
        What was asked: ``auto``, ``on`` or ``off``.
    applied : bool
        Whether ``c_d`` is refitted on the input and its channels mapped onto the student's.
    distance, threshold : float or None
        The measured distance from the model's dark-field, and ``auto``'s threshold for an input
        of this size (``None`` with ``off``: nothing was measured).
    measured : Distribution or None
        The input's histograms (what ``c_d`` and the channel maps are refitted on).
    """

    mode: str
    applied: bool
    distance: float | None = None
    threshold: float | None = None
    measured: Distribution | None = None

    def describe(self) -> dict:
        """For provenance (layer metadata, store attributes): no histograms."""
        return {"mode": self.mode, "applied": self.applied,
                "distance": None if self.distance is None else round(self.distance, 4),
                "threshold": None if self.threshold is None else round(self.threshold, 4),
                "measure": "largest Kolmogorov-Smirnov distance of luma and R, G, B CDFs from the model's dark-field",
                "pixels_measured": None if self.measured is None else self.measured.pixels}

    def message(self, model_name: str) -> str:
        """One sentence for the user (CLI line, napari notification)."""
        if self.mode == "off":
            return f"adaptation off: staining with {model_name}'s own dark-field CDF."
        far = (f"distance {self.distance:.2f} from {model_name}'s dark-field, threshold {self.threshold:.2f}"
               if self.distance is not None else "")
        if self.applied:
            why = "asked for" if self.mode == "on" else "the input looks unlike the model's microscope"
            return (f"adapted to this input ({why}; {far}): its dark-field CDF is refitted and the student's "
                    "input channels mapped onto the model's.")
        return f"no adaptation needed ({far})."

    def as_dict(self) -> dict:
        """Everything needed to rebuild it exactly (a resumed slide, a cluster worker)."""
        return {**self.describe(), "histograms": None if self.measured is None else self.measured.as_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> Adaptation:
        measured = data.get("histograms")
        return cls(data["mode"], bool(data["applied"]), data.get("distance"), data.get("threshold"),
                   None if measured is None else Distribution.from_dict(measured))


OFF = Adaptation("off", False)


def decide(reference: Distribution, measured: Distribution | None, mode: str) -> Adaptation:
    """Adapt or not, for an input whose histograms are ``measured``, to a model whose dark-field is ``reference``.

    ``measured`` may be ``None`` only with ``mode="off"``.
    """
    mode = check_mode(mode)
    if mode == "off":
        return OFF
    if measured is None or measured.pixels == 0:
        raise InputError("cannot decide on adaptation without measuring the input.")
    far, limit = distance(measured, reference), threshold(measured.pixels)
    applied = mode == "on" or far > limit
    return Adaptation(mode, applied, far, limit, measured)
