"""Scoring a model's outputs: one routine for ``digital-stain evaluate`` and the benchmarks.

Every output (``enhanced``, ``teacher``, ``student``) of every image is scored
with what the data allows: PSNR, SSIM and nuclei Dice when a reference H&E of
the same tissue exists; always NIQE and the structure score (against the
enhanced image) and the checkerboard (the period-2 and period-4 grid peaks,
:func:`digital_stain.quality.metrics.checkerboard`); the stain-style distance when real
H&E is given for its colours. Scores are means over images, except the
checkerboard's, which are medians: one tile of a truly regular texture should
not stand for a whole set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from digital_stain.quality import metrics
from digital_stain.core.arrays import InputError, to_uint8
from digital_stain.quality.niqe import MIN_SIZE as NIQE_MIN_SIDE
from digital_stain.quality.niqe import niqe

SCORES = ("psnr", "ssim", "nuclei_dice", "structure", "niqe", "style", "checkerboard_2", "checkerboard_4")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "nuclei_dice": True, "structure": True, "niqe": False, "style": False,
                    "checkerboard_2": False, "checkerboard_4": False}
MEDIANS = ("checkerboard_2", "checkerboard_4")


def as_rgb_uint8(output: np.ndarray) -> np.ndarray:
    """An output as uint8 RGB ``(Y, X, 3)``: gray (the enhanced image) is repeated over three channels."""
    output = np.asarray(output)
    if output.ndim == 2:
        output = np.repeat(output[..., None], 3, axis=-1)
    return output if output.dtype == np.uint8 else to_uint8(output)


def score_images(
    stained: Sequence[np.ndarray],
    enhanced: Sequence[np.ndarray] | None = None,
    references: Sequence[np.ndarray] | None = None,
    style_reference: np.ndarray | None = None,
) -> dict[str, float]:
    """Mean scores of a set of stained outputs.

    NIQE is averaged over the images it can score (at least 192 px a side,
    not featureless); the other scores over all images.

    Parameters
    ----------
    stained : sequence of (Y, X, 3) RGB, uint8 or float in [0, 1]
    enhanced : sequence of (Y, X) float in [0, 1], optional
        The enhanced image of each input (for the structure score).
    references : sequence of (Y, X, 3) RGB, optional
        Real H&E of the same tissue, pixel-aligned (for PSNR, SSIM, nuclei Dice).
    style_reference : ndarray (n, 3), optional
        Lab pixels of real H&E (:func:`digital_stain.quality.metrics.lab_pixels`), for the style distance.

    Returns
    -------
    dict of score name -> float (only the scores the data allows; the checkerboard for images of at
    least 32 px a side).
    """
    stained = [as_rgb_uint8(s) for s in stained]
    if not stained:
        raise InputError("no images to score.")
    for name, given in (("references", references), ("enhanced images", enhanced)):
        if given is not None and len(given) != len(stained):
            raise InputError(f"{len(stained)} images but {len(given)} {name}; give one per image.")
    scores: dict[str, list] = {k: [] for k in SCORES}
    for i, image in enumerate(stained):
        if references is not None:
            reference = references[i]
            scores["psnr"].append(metrics.psnr(image, reference))
            scores["ssim"].append(metrics.ssim(image, reference))
            scores["nuclei_dice"].append(metrics.nuclei_dice(image, reference))
        if enhanced is not None:
            scores["structure"].append(metrics.structure_score(image, enhanced[i]))
        if min(image.shape[:2]) >= NIQE_MIN_SIDE:
            scores["niqe"].append(niqe(image))
        if min(image.shape[:2]) >= metrics.CHECKERBOARD_MIN_SIDE:
            for period, ratio in metrics.checkerboard(image).items():
                scores[f"checkerboard_{period}"].append(ratio)
    if style_reference is not None:
        pixels = np.concatenate([s.reshape(-1, 3) for s in stained])[None]
        scores["style"].append(metrics.sliced_wasserstein(metrics.lab_pixels(pixels), style_reference))
    # NIQE is nan on featureless images (and skipped under 192 px): the mean is over the images it could score
    return {k: _summary(k, v) for k, v in scores.items() if v}


def _summary(score: str, values: list) -> float:
    if np.isnan(values).all():
        return float("nan")
    return float(np.nanmedian(values) if score in MEDIANS else np.nanmean(values))


def evaluate_model(
    model,
    darkfield: Sequence[np.ndarray],
    outputs: Sequence[str] = ("enhanced", "teacher", "student"),
    references: Sequence[np.ndarray] | None = None,
    style_reference: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
    adapt="auto",
    **stain_options,
) -> dict[str, dict[str, float]]:
    """Stain each dark-field image with ``model`` and score every output.

    Returns ``{output: {score: mean}}``; see :func:`score_images`.
    ``adapt`` (``auto|on|off`` or an :class:`~digital_stain.core.adapt.Adaptation`) is decided once for
    the whole set (:meth:`StainModel.adaptation`, pooled), as a folder is stained.
    ``stain_options`` go to :meth:`StainModel.stain` (device, tile, ...).
    """
    wanted = list(dict.fromkeys(["enhanced", *outputs]))
    produced: dict[str, list] = {name: [] for name in wanted}
    adaptation = model.adaptation(list(darkfield), adapt)
    for i, image in enumerate(darkfield):
        result = model.stain(image, wanted, adapt=adaptation, **stain_options)
        for name in wanted:
            produced[name].append(result[name])
        if progress:
            progress(i + 1, len(darkfield))
    return {
        name: score_images(produced[name], produced["enhanced"], references, style_reference)
        for name in outputs
    }


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table: one row per output (or method), one column per score, arrows saying which way is better."""
    columns = [k for k in SCORES if any(k in r for r in results.values())]
    header = "| | " + " | ".join(f"{k} {'↑' if HIGHER_IS_BETTER[k] else '↓'}" for k in columns) + " |"
    rows = [header, "|---" * (len(columns) + 1) + "|"]
    for name, scores in results.items():
        rows.append(f"| {name} | " + " | ".join(f"{scores[k]:.3f}" if k in scores else "" for k in columns) + " |")
    return "\n".join(rows)
