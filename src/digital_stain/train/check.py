"""The fine-tune guard: is the tuned model better than the one it started from, on the user's held-out images?

A fine-tune can fail silently: a teacher taught on the wrong folder, an enhancer fitted on
bright-field by mistake, a GAN that collapsed. Its training scores cannot tell, since they
measure the student against the very teacher that went wrong. :func:`compare` stains the
dark-field images the training held out (never trained on) with both models, each as it
would stain them for the user (adaptation ``auto``), and scores each output (teacher and
student):

* ``structure``: gradient correlation of the stain's gray with the model's enhanced image
  (:func:`digital_stain.quality.metrics.structure_score`);
* ``style``: colour distance to the held-out real H&E (sliced Wasserstein in Lab);
* ``mean_luma``, ``luma_std`` and ``clipped`` (the fraction of pixels with a channel at 0 or
  255): a stain that is black, flat, saturated or unstructured (structure under 0.3, e.g.
  the inverted contrast of CycleGAN without distillation) is broken whatever else it scores.

The tuned model passes when the fine-tune broke no output (a stain broken the same way
before is not held against it) and each keeps at least
``STRUCTURE_KEPT`` of the structure of the start's same output, with colours not further
from the user's H&E than the start's by more than the tolerance (a student where the
start had none is held to the start teacher's structure). Real H&E of both DSD sets has a mean luma of 0.51-0.60 (no
tile under 0.39), a luma spread of 0.14-0.18 and under 0.01 % of clipped pixels; the
failure this guards against (the DSD_U model fine-tuned on DSD_P without adaptation)
stains black and green.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from digital_stain.core.color import luma
from digital_stain.quality.evaluate import as_rgb_uint8
from digital_stain.quality.metrics import lab_pixels, sliced_wasserstein, structure_score
from digital_stain.train.events import Progress, stop_requested

BLACK_LUMA = 0.15  # mean luma under this: a black stain
FLAT_STD = 0.03  # luma spread (over all pixels) under this: one colour everywhere
CLIPPED = 0.5  # more than this fraction of pixels with a channel at 0 or 255: saturated
UNSTRUCTURED = 0.3  # structure under this: edges unrelated to the tissue (students keep 0.9; a 3 px shift 0.64)
STRUCTURE_KEPT = 0.85  # the tuned stain keeps at least this fraction of the start's structure
STYLE_TOLERANCE = (0.1, 0.25)  # the tuned style may exceed the start's by 10 % + 0.25 (validation noise)
MAX_IMAGES, MAX_SIDE = 16, 512  # what is stained: at most this many held-out images, centre crops of this side


@dataclass
class Check:
    """The guard's verdict.

    Attributes
    ----------
    passed : bool
    reasons : list of str
        Why it did not pass (empty when it did), in words for the user.
    start, tuned : dict
        Scores of each model (see the module docstring), and which output was scored.
    images : int
        Held-out images stained.
    """

    passed: bool
    reasons: list = field(default_factory=list)
    start: dict = field(default_factory=dict)
    tuned: dict = field(default_factory=dict)
    images: int = 0

    def summary(self) -> str:
        def scores(s: dict) -> str:
            style = f", style {s['style']:.2f}" if s.get("style") is not None else ""
            return f"structure {s['structure']:.3f}{style}"

        shown = "student" if "student" in self.tuned else "teacher"
        start = self.start.get(shown, self.start.get("teacher"))
        head = (f"checked on {self.images} held-out image(s): tuned {shown} {scores(self.tuned[shown])}; "
                f"start {'student' if shown in self.start else 'teacher'} {scores(start)}")
        return head if self.passed else head + ". Not better than the start: " + "; ".join(self.reasons)

    def as_dict(self) -> dict:
        return {"passed": self.passed, "reasons": list(self.reasons), "start": self.start, "tuned": self.tuned,
                "images": self.images}


def _crop(image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    y, x = max(0, (height - MAX_SIDE) // 2), max(0, (width - MAX_SIDE) // 2)
    return image[y : y + MAX_SIDE, x : x + MAX_SIDE]


def score_model(model, images: list, reference_lab: np.ndarray | None,
                stop: threading.Event | None = None, device=None) -> dict | None:
    """Scores of each network output of ``model`` on ``images``: ``{output: {score: value}}``; ``None`` if stopped."""
    outputs = [o for o in ("teacher", "student") if o in model.outputs]
    adaptation = model.adaptation(images, "auto")  # as the user would stain the folder
    stains: dict[str, list] = {o: [] for o in outputs}
    structures: dict[str, list] = {o: [] for o in outputs}
    for image in images:
        if stop_requested(stop):
            return None
        result = model.stain(image, ["enhanced", *outputs], adapt=adaptation, precision="fp32", device=device)
        for output in outputs:
            stains[output].append(as_rgb_uint8(result[output]))
            structures[output].append(structure_score(stains[output][-1], result["enhanced"]))
    scores = {}
    for output in outputs:
        pixels = np.concatenate([s.reshape(-1, 3) for s in stains[output]])
        gray = luma(pixels.astype(np.float32) / 255.0)
        style = None if reference_lab is None else sliced_wasserstein(lab_pixels(pixels[None]), reference_lab)
        scores[output] = {"structure": float(np.nanmean(structures[output])), "style": style,
                          "mean_luma": float(gray.mean()), "luma_std": float(gray.std()),
                          "clipped": float(((pixels == 0) | (pixels == 255)).any(axis=1).mean()),
                          "adapted": adaptation.applied}
    return scores


def broken(output: str, scores: dict) -> dict[str, str]:
    """The ways an output's stain is broken: ``{check: reason}`` (black, flat, saturated)."""
    found = {}
    if scores["mean_luma"] < BLACK_LUMA:
        found["black"] = f"its {output} stains nearly black (mean lightness {scores['mean_luma']:.2f})"
    if scores["luma_std"] < FLAT_STD:
        found["flat"] = f"its {output} stains flat, one colour everywhere (lightness spread {scores['luma_std']:.3f})"
    if scores["clipped"] > CLIPPED:
        found["saturated"] = f"its {output} stain is saturated ({100 * scores['clipped']:.0f} % of pixels at 0 or 255)"
    if scores["structure"] < UNSTRUCTURED:
        found["unstructured"] = (f"its {output} no longer follows the tissue (structure {scores['structure']:.3f}; "
                                 "inverted or unrelated edges)")
    return found


def verdict(start: dict, tuned: dict) -> list[str]:
    """Why ``tuned`` is broken or worse than ``start`` (per-output scores of :func:`score_model`); empty: it is not.

    A broken stain counts against the tuned model when the fine-tune broke it, i.e. unless the
    start's same output (its teacher, for a student it did not have) was broken the same way;
    nothing is compared with a start that was broken already (there is nothing to keep).
    """
    reasons = []
    for output, mine in tuned.items():
        theirs = start.get(output) or start.get("teacher")
        already = broken(output, theirs) if theirs is not None else {}
        reasons += [reason for check, reason in broken(output, mine).items() if check not in already]
        if theirs is None or already:
            continue
        if mine["structure"] < STRUCTURE_KEPT * theirs["structure"]:
            reasons.append(f"its {output} keeps less of the tissue's structure ({mine['structure']:.3f} against "
                           f"{theirs['structure']:.3f} before)")
        if output in start and mine.get("style") is not None and theirs.get("style") is not None:
            relative, absolute = STYLE_TOLERANCE
            if mine["style"] > theirs["style"] * (1 + relative) + absolute:
                reasons.append(f"its {output}'s colours are further from your H&E (style {mine['style']:.2f} against "
                               f"{theirs['style']:.2f} before; lower is closer)")
    return reasons


def compare(start, tuned, darkfield: list, reference_lab: np.ndarray | None, *, progress=None,
            stop: threading.Event | None = None, device=None) -> Check | None:
    """Stain the held-out ``darkfield`` images with both models and judge the tuned one; ``None`` if stopped.

    Parameters
    ----------
    start, tuned : StainModel
    darkfield : list of arrays
        Held-out dark-field images (at most ``MAX_IMAGES`` are used, centre crops of ``MAX_SIDE``).
    reference_lab : ndarray (n, 3), optional
        Lab pixels of held-out real H&E (:func:`digital_stain.quality.metrics.lab_pixels`); without it,
        colours are not compared.
    progress : callable(Progress), optional
        Told when each model has been scored (stage ``check``).
    """
    images = [_crop(np.asarray(image)) for image in darkfield[:MAX_IMAGES]]
    scored = []
    for i, model in enumerate((start, tuned)):
        scores = score_model(model, images, reference_lab, stop, device)
        if scores is None:
            return None
        scored.append(scores)
        if progress is not None:
            progress(Progress(i + 1, 2, stage="check", message=f"checked the {('starting', 'tuned')[i]} model"))
    reasons = verdict(*scored)
    return Check(not reasons, reasons, scored[0], scored[1], len(images))
