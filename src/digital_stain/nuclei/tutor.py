"""Tutorship (Boschet et al.'s L -> U): H&E with nuclei masks translated into dark-field teach a segmenter.

The translation from H&E to dark-field (:func:`translate`) is, as Boschet et al. do it, the reverse
generator F of the cycle (H&E -> dark-field) where the model file keeps it (students trained or
fine-tuned since F is kept), else the model's own enhancer run backwards
(:func:`digital_stain.quality.synth.synthesize_darkfield`: ``x = c_d^-1(1 - c_b(gray(y)))``, blurred,
noisy, 8-bit, in a dark-field tint, as ``digital-stain synth`` makes test data), which every model
has; the shipped models were trained before F was kept. The synthetic dark-field is then enhanced
as any input is, and the segmenter (:class:`~digital_stain.core.nets.unet.NucleiUNet`) learns, from that
enhanced gray, where the masks' nuclei and their boundaries are. At stain time it reads the
enhanced gray of the real dark-field, adapted to another microscope as the stain is.

Labels come from its two maps: nuclei without their boundaries are the seeds, a watershed of the
nucleus probability grows them back to the nucleus area (:func:`labels_from_maps`).
"""

from __future__ import annotations

import numpy as np
import torch

from digital_stain.core.arrays import InputError
from digital_stain.nuclei.segment import NucleiSettings, drop_small, numbered

TILE, MARGIN = 512, 32  # inference in tiles of TILE px, each with MARGIN px of context kept off its edges


TRANSLATORS = ("auto", "reverse", "enhancer")


def translator_of(model, translator: str = "auto") -> str:
    """``reverse`` (the model's F) or ``enhancer`` (its inverse); ``auto``: F where the model file keeps it."""
    if translator not in TRANSLATORS:
        raise InputError(f"translator {translator!r} is not known; use one of {', '.join(TRANSLATORS)}.")
    has_reverse = getattr(model, "reverse", None) is not None
    if translator == "reverse" and not has_reverse:
        raise InputError(f"model {model.name} keeps no reverse generator (models trained before it was kept, the "
                         "shipped ones among them); use --translate enhancer, or fine-tune the model first "
                         "(digital-stain train), which keeps it.")
    return "reverse" if translator == "reverse" or translator == "auto" and has_reverse else "enhancer"


def translate(model, stained: np.ndarray, tint, seed: int, translator: str = "enhancer") -> np.ndarray:
    """An H&E image's enhanced gray as the model would see it from dark-field: (Y, X) float32 in [0, 1].

    ``translator``: ``reverse`` (F; ``tint`` and ``seed`` unused) or ``enhancer`` (its inverse,
    with ``seed``'s noise); see :func:`translator_of`.
    """
    if translator == "reverse":
        darkfield = reverse_translate(model.reverse, stained)
    else:
        from digital_stain.quality.synth import synthesize_darkfield

        darkfield = synthesize_darkfield(stained, model.enhancer, tint, blur_sigma=1.0, noise_std=0.003,
                                         rng=np.random.default_rng(seed))
    return model.stain(darkfield, ["enhanced"], adapt="off")["enhanced"].astype(np.float32)


def reverse_translate(reverse, stained: np.ndarray) -> np.ndarray:
    """Dark-field uint8 (Y, X, 3) of an H&E image by F, which maps signed H&E RGB to the signed dark-field the
    student trained on."""
    rgb = np.asarray(stained)[..., :3]
    signed = torch.from_numpy(rgb.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    height, width = rgb.shape[:2]
    multiple = reverse.size_multiple
    padded = torch.nn.functional.pad(signed, (0, -width % multiple, 0, -height % multiple), mode="reflect")
    with torch.no_grad():
        out = reverse(padded)[0, :, :height, :width].float()
    return np.clip(np.rint((out.permute(1, 2, 0).numpy() + 1.0) * 127.5), 0, 255).astype(np.uint8)


def targets(labels: np.ndarray) -> np.ndarray:
    """(2, Y, X) uint8 of an instance label image: nucleus, and nucleus boundary (inner, 1 px)."""
    from skimage.segmentation import find_boundaries

    labels = np.asarray(labels)
    return np.stack([labels > 0, find_boundaries(labels, mode="inner") & (labels > 0)]).astype(np.uint8)


def check_masks(stained: np.ndarray, labels: np.ndarray, name: str) -> None:
    """Refuse a mask that is not an instance label image the size of its H&E image."""
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{name}: the mask is not an instance label image ((Y, X) integers, 0 = background; "
                         f"it has shape {labels.shape} and dtype {labels.dtype}).")
    if labels.shape != stained.shape[:2]:
        raise InputError(f"{name}: the mask is {labels.shape[1]} x {labels.shape[0]} px but the H&E image is "
                         f"{stained.shape[1]} x {stained.shape[0]}; masks must match their images pixel for pixel.")


def segmenter_maps(segmenter, gray: np.ndarray) -> np.ndarray:
    """The segmenter's probabilities (2, Y, X) float32 for an enhanced gray plane, in overlapping tiles."""
    from digital_stain.core.nets.unet import lightness_input

    height, width = gray.shape
    maps = np.zeros((2, height, width), np.float32)
    step = TILE - 2 * MARGIN
    with torch.no_grad():
        for y in range(0, height, step):
            for x in range(0, width, step):
                top, left = max(y - MARGIN, 0), max(x - MARGIN, 0)
                bottom, right = min(y + step + MARGIN, height), min(x + step + MARGIN, width)
                tile = gray[top:bottom, left:right]
                padded = _pad_to(tile, segmenter.size_multiple, segmenter.min_size)
                logits = segmenter(lightness_input(torch.from_numpy(padded)[None, None]))[0].float()
                probs = torch.sigmoid(logits).numpy()[:, : tile.shape[0], : tile.shape[1]]
                core_y, core_x = y - top, x - left
                h, w = min(step, height - y), min(step, width - x)
                maps[:, y : y + h, x : x + w] = probs[:, core_y : core_y + h, core_x : core_x + w]
    return maps


def _pad_to(tile: np.ndarray, multiple: int, minimum: int) -> np.ndarray:
    height, width = tile.shape
    target = [max(-(-side // multiple) * multiple, minimum) for side in (height, width)]
    return np.pad(tile, ((0, target[0] - height), (0, target[1] - width)), mode="reflect" if min(tile.shape) > 1
                  else "edge").astype(np.float32)


def labels_from_maps(maps: np.ndarray, settings: NucleiSettings | None = None) -> np.ndarray:
    """Instance labels (uint16) from (nucleus, boundary) probabilities: seeds inside boundaries, then a watershed."""
    from skimage.measure import label
    from skimage.segmentation import watershed

    settings = settings or NucleiSettings()
    nucleus = maps[0] > 0.5
    if not nucleus.any():
        return np.zeros(nucleus.shape, np.uint16)
    seeds = drop_small(label(nucleus & (maps[1] < 0.5)), max(settings.min_area // 4, 1))
    return numbered(watershed(-maps[0], seeds, mask=nucleus), settings.min_area)


def segment_enhanced(segmenter, enhanced: np.ndarray, settings: NucleiSettings | None = None) -> np.ndarray:
    """Nuclei labels of an enhanced gray plane (Y, X) in [0, 1] by a tutorship segmenter."""
    return labels_from_maps(segmenter_maps(segmenter, np.asarray(enhanced, np.float32)), settings)
