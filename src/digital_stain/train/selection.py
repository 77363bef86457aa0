"""Which validated student state to keep: structure first, then colours, with ties judged by their noise.

A student is validated every ``val_every`` steps on held-out dark-field tiles
(:func:`digital_stain.train.student.validation_scores`). Its ``style`` (colour
distance to held-out H&E) is measured on some fifty tiles, so it carries noise:
the same state scores differently on another split. Choosing the lowest style
outright chases that noise and, with a weight average whose colours have
settled, picks an early state by a margin smaller than the noise. The rule here
keeps the *latest* state whose style is within the noise of the best style seen
so far; a later state of a steadily improving or averaged run has had more
training and is at least as good within what the split can tell apart.
"""

from __future__ import annotations

import numpy as np

from digital_stain.quality.metrics import sliced_wasserstein_to

BOOTSTRAP = 8  # resamples of the validation images for the style's noise (about a second in all)
BOOTSTRAP_PIXELS = 20_000  # pixels per resample (the style itself uses up to 200,000): noise between tiles dominates


def selection_score(scores: dict, structure_floor: float) -> float:
    """One number to rank a student state by, higher is better.

    A student must keep the structure (at least ``structure_floor``, 85 % of
    the teacher's, whose lightness is the enhanced image: about 0.85; a
    3-pixel shift of the enhanced image itself scores about 0.64); among those, the most H&E-like colours win. A student
    below the floor ranks under every one above it, by structure.
    """
    if "style" not in scores:
        return scores["structure"]
    if scores["structure"] >= structure_floor:
        return -scores["style"]
    return -1000.0 + scores["structure"]


def style_noise(lab_per_image: list[np.ndarray], reference_lab: np.ndarray, seed: int = 0) -> float:
    """Standard deviation of the style over bootstrap resamples of the validation images.

    Parameters
    ----------
    lab_per_image : list of ndarray, each (n, 3)
        Lab pixels of each validation output (the images are the unit resampled:
        tiles, not pixels, are what another split would change).
    reference_lab : ndarray, shape (m, 3)
        Lab pixels of the held-out real H&E.
    """
    if len(lab_per_image) < 2:
        return 0.0
    rng = np.random.default_rng(seed)  # its own generator: training's random numbers are untouched
    distance = sliced_wasserstein_to(reference_lab, seed=seed)
    values = []
    for _ in range(BOOTSTRAP):
        drawn = np.concatenate([lab_per_image[i] for i in rng.integers(len(lab_per_image), size=len(lab_per_image))])
        if len(drawn) > BOOTSTRAP_PIXELS:
            drawn = drawn[rng.choice(len(drawn), BOOTSTRAP_PIXELS, replace=False)]
        values.append(distance(drawn))
    return float(np.std(values, ddof=1))


def chosen_step(history: list[dict], structure_floor: float) -> int | None:
    """The step of the state to keep, given the validations so far (``history``, in step order).

    Without a style (no held-out H&E) the highest structure wins, the first on
    ties. States below ``structure_floor`` count only if none is above it (then
    the highest structure). Among those above it: the latest state whose style
    is within the noise of the lowest style so far, the noise being the two
    states' bootstrap deviations combined (``style_noise``; 0 where a history
    from an older version lacks it, which makes the rule the lowest style).
    Because the latest validation is always a candidate, the chosen step is
    either the newest one or the one chosen before it: one kept state suffices.
    """
    if not history:
        return None
    above = [h for h in history if h["structure"] >= structure_floor]
    if not above or any("style" not in h for h in history):
        return max(history, key=lambda h: (h["structure"], -h["step"]))["step"]
    lowest = min(above, key=lambda h: (h["style"], h["step"]))
    within = [h for h in above if h["style"] - lowest["style"]
              <= np.hypot(h.get("style_noise", 0.0), lowest.get("style_noise", 0.0))]
    return max(within, key=lambda h: h["step"])["step"]
