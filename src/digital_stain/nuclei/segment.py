"""Nuclei of an H&E image as instance labels, with nothing to download: colour deconvolution and a watershed.

The segmenter of the adaptation path (stain the dark-field, then find nuclei on the virtual H&E) and
the ceiling of ``benchmarks/nuclei.py`` (the same segmenter on real H&E). Every step is classical
image processing with its parameters in :class:`NucleiSettings`:

1. **Hematoxylin density** by colour deconvolution (Ruifrok & Johnston, scikit-image's ``rgb2hed``):
   nuclei take up hematoxylin, so they are dense in this channel whatever the eosin around them.
2. **Smoothing** with a Gaussian of ``sigma`` px, so chromatin texture does not split a nucleus.
3. **Threshold**: Otsu's on the image's own smoothed density (each image its own, so a pale or a
   dark stain finds the same nuclei) over its tissue only: pixels brighter than ``glass`` (luma)
   are glass or lumen, where no nucleus lies, and left out, since with them Otsu splits tissue
   from glass instead of nuclei from tissue (on a patch half lumen, Dice 0.35 against 0.78 without
   them). Or a fixed density. Then holes filled, specks under ``min_area`` px removed.
4. **Instances**: the distance transform of the mask, its maxima at least ``min_distance`` px
   apart (and ``h`` px above their surroundings) as seeds, a watershed of the inverted distance
   inside the mask; pieces under ``min_area`` px dropped, labels numbered 1..N.

Labels are uint16 (0 is background), as the CLI writes them; an image with more than 65,535 nuclei
is refused with a message (stain it in parts, or as a whole slide).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from digital_stain.core.arrays import InputError

MAX_LABEL = np.iinfo(np.uint16).max


@dataclass(frozen=True)
class NucleiSettings:
    """How :func:`segment_nuclei` finds nuclei. Sizes are in pixels of the image it is given.

    Attributes
    ----------
    sigma : float
        Gaussian smoothing of the hematoxylin density (px) before the threshold.
    threshold : ``"otsu"`` or float
        ``otsu``: Otsu's threshold of each image's smoothed density; a number: that density
        (``rgb2hed`` units; real H&E nuclei are about 0.05-0.15 above their surroundings).
    min_area : int
        Objects smaller than this (px) are specks, not nuclei.
    min_distance : int
        Seeds of two touching nuclei lie at least this far apart (px); about a nucleus' radius.
    h : float
        A seed's distance maximum must rise this many pixels above the saddle to its neighbour,
        so a dent in one nucleus does not split it.
    glass : float
        Pixels of a higher luma (0..1) are glass or lumen, left out of Otsu's threshold (when
        fewer than 100 pixels are darker, all are used).
    """

    sigma: float = 1.0
    threshold: str | float = "otsu"
    min_area: int = 20
    min_distance: int = 4
    h: float = 1.0
    glass: float = 0.8

    def __post_init__(self):
        if not (isinstance(self.threshold, (int, float)) or self.threshold == "otsu"):
            raise InputError(f"threshold {self.threshold!r}: give 'otsu' or a hematoxylin density (a number).")
        for name, low in (("sigma", 0.0), ("min_area", 0), ("min_distance", 1), ("h", 0.0), ("glass", 0.0)):
            if not getattr(self, name) >= low:
                raise InputError(f"{name} {getattr(self, name)} is below {low}; nuclei settings are sizes in pixels.")


def segment_nuclei(stained, settings: NucleiSettings | None = None) -> np.ndarray:
    """Nuclei of an H&E (or virtual H&E) RGB image as instance labels.

    Parameters
    ----------
    stained : array-like, shape (Y, X, 3)
        RGB, uint8 or float in [0, 1] (a stain from :meth:`StainModel.stain`, or real H&E).
    settings : NucleiSettings, optional
        The segmenter's parameters (defaults sized for the DSD data, whose nuclei are 10-15 px across).

    Returns
    -------
    ndarray, shape (Y, X), uint16
        0 for background, 1..N for the N nuclei found.

    Raises
    ------
    InputError
        Not an RGB plane, or more nuclei than uint16 labels can number.
    """
    rgb = np.asarray(stained)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise InputError(f"nuclei are found in an RGB H&E plane (Y, X, 3); this image has shape {rgb.shape}. "
                         "Stain a dark-field image first (or give the student or teacher output).")
    if rgb.dtype == np.uint8:
        rgb = rgb.astype(np.float32) / 255.0
    elif not np.issubdtype(rgb.dtype, np.floating):
        raise InputError(f"an H&E image of dtype {rgb.dtype} cannot be read as colour; give uint8 or float in [0, 1].")
    return _segment(np.clip(rgb.astype(np.float32), 0.0, 1.0), settings or NucleiSettings())


def hematoxylin_density(rgb: np.ndarray) -> np.ndarray:
    """Hematoxylin optical density of float RGB in [0, 1] (colour deconvolution), ``(Y, X)`` float32."""
    from skimage.color import rgb2hed

    return rgb2hed(rgb)[..., 0].astype(np.float32)


def tissue_density(rgb: np.ndarray, density: np.ndarray, settings: NucleiSettings) -> np.ndarray:
    """The density values of the tissue: pixels no brighter than ``settings.glass`` (all, if under 100 are)."""
    from digital_stain.core.color import luma

    tissue = luma(rgb) <= settings.glass
    return density[tissue] if np.count_nonzero(tissue) >= 100 else density.ravel()


def smoothed_density(rgb: np.ndarray, settings: NucleiSettings) -> np.ndarray:
    """Steps 1 and 2: the hematoxylin density of a float RGB region, smoothed by ``settings.sigma``."""
    from scipy import ndimage

    density = hematoxylin_density(rgb)
    return ndimage.gaussian_filter(density, settings.sigma) if settings.sigma > 0 else density


def nuclei_foreground(density: np.ndarray, level: float, settings: NucleiSettings) -> np.ndarray:
    """Step 3 once the threshold is known: denser than ``level``, holes filled, specks dropped; bool."""
    from scipy import ndimage
    from skimage.measure import label

    return drop_small(label(ndimage.binary_fill_holes(density > level)), settings.min_area) > 0


def _segment(rgb: np.ndarray, settings: NucleiSettings) -> np.ndarray:
    """:func:`segment_nuclei` on a checked float RGB plane."""
    from skimage.filters import threshold_otsu

    density = smoothed_density(rgb, settings)
    if settings.threshold == "otsu":
        tissue = tissue_density(rgb, density, settings)
        if np.ptp(tissue) <= 1e-6:  # flat: no nuclei, and Otsu has nothing to split
            return np.zeros(density.shape, np.uint16)
        level = threshold_otsu(tissue)
    else:
        level = float(settings.threshold)
    return split_instances(nuclei_foreground(density, level, settings), settings)


def drop_small(labels: np.ndarray, min_area: int) -> np.ndarray:
    """``labels`` with the objects of fewer than ``min_area`` pixels set to 0."""
    sizes = np.bincount(labels.ravel())
    small = sizes < min_area
    small[0] = False
    return np.where(small[labels], 0, labels) if small.any() else labels


def split_instances(mask: np.ndarray, settings: NucleiSettings) -> np.ndarray:
    """Step 4: split a foreground mask into nuclei (seeds at distance maxima, watershed of the inverted
    distance), numbered 1..N, uint16."""
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.measure import label
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    if not mask.any():
        return np.zeros(mask.shape, np.uint16)
    distance = ndimage.distance_transform_edt(mask).astype(np.float32)
    regions = label(mask)
    # seeds: maxima that stand h above their saddle, thinned to min_distance apart, one at least per region
    raised = h_maxima(distance, settings.h) if settings.h > 0 else np.ones(mask.shape, bool)
    peaks = peak_local_max(distance, min_distance=settings.min_distance, labels=regions, exclude_border=False)
    seeds = np.zeros(mask.shape, bool)
    seeds[tuple(peaks.T)] = True
    seeds &= raised.astype(bool)
    markers = label(seeds)
    unseeded = np.setdiff1d(np.unique(regions[regions > 0]), np.unique(regions[seeds]))
    if unseeded.size:  # a region whose seeds were all thinned away still is a nucleus
        extra = np.isin(regions, unseeded)
        markers[extra] = regions[extra] + markers.max()
    return numbered(watershed(-distance, markers, mask=mask), settings.min_area)


def numbered(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Watershed ``labels`` as the uint16 image we hand out: pieces under ``min_area`` px dropped, numbered 1..N."""
    from skimage.segmentation import relabel_sequential

    labels, _, _ = relabel_sequential(drop_small(labels, min_area))
    if labels.max() > MAX_LABEL:
        raise InputError(f"{int(labels.max())} nuclei found, more than the {MAX_LABEL} a uint16 label image can "
                         "number; segment the image in parts, or label it as a whole slide (OME-Zarr output).")
    return labels.astype(np.uint16)
