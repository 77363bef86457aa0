"""Nuclei of an image too large to segment at once, chunk by chunk, with labels that agree across chunks.

Two things make the chunks agree with one another (and make a resumed or a re-run chunk give the
same labels):

* **One threshold for the whole image.** Otsu's threshold is taken once, on the smoothed
  hematoxylin density of the tissue of crops spread over the image (:func:`global_threshold`;
  glass left out, as :func:`~digital_stain.nuclei.segment.segment_nuclei` does), not per chunk,
  so a chunk with few nuclei is not thresholded into its background.
* **Labels named by where the nucleus is.** Each chunk is segmented with a margin of its
  neighbours around it; every nucleus found gets the label ``cy * width + cx + 1`` from its
  centroid ``(cy, cx)`` in the whole image (rounded), and only the chunk's own pixels are kept.
  A nucleus across a chunk border is found whole by both chunks, with the same centroid, so its two
  halves carry one label. Each nucleus is counted by the chunk its centroid falls in, once. (Nearly
  always: a watershed that splits a border nucleus differently in two chunks gives it two names;
  on the sample H&E in 128-px chunks the count moved by 1 in 400.)

Labels are uint32 (an image of up to 65,536 x 65,536 px; larger ones use uint64) and not numbered
1..N: :func:`digital_stain.nuclei.segment.segment_nuclei` numbers one image's nuclei from 1.
The margin must exceed the largest nucleus (default 32 px against the DSD's 10-15 px).
"""

from __future__ import annotations

import numpy as np

from digital_stain.nuclei.segment import (NucleiSettings, nuclei_foreground, smoothed_density, split_instances,
                                          tissue_density)

MARGIN = 32  # px of neighbours around a chunk: more than a nucleus is wide
THRESHOLD_CROPS = 16  # chunks spread over an image whose tissue gives its one Otsu threshold


def spread(count: int, most: int = THRESHOLD_CROPS) -> np.ndarray:
    """Indices of up to ``most`` of ``count`` items (chunks in raster order), spread evenly over them."""
    return np.unique(np.linspace(0, count - 1, min(most, count)).round().astype(int))


def with_margin(box: tuple[int, int, int, int], shape: tuple[int, int]):
    """A chunk ``(y0, y1, x0, x1)`` grown by :data:`MARGIN` px (within ``shape``): ``(region, core)``,
    the region to read and the chunk's own pixels in the region's coordinates."""
    y0, y1, x0, x1 = box
    top, left = max(y0 - MARGIN, 0), max(x0 - MARGIN, 0)
    bottom, right = min(y1 + MARGIN, shape[0]), min(x1 + MARGIN, shape[1])
    return (top, bottom, left, right), (y0 - top, y1 - top, x0 - left, x1 - left)


def label_dtype(shape: tuple[int, int]) -> np.dtype:
    """uint32 when every centroid label fits (up to 65,536 x 65,536 px), else uint64."""
    return np.dtype(np.uint32) if shape[0] * shape[1] < np.iinfo(np.uint32).max else np.dtype(np.uint64)


def global_threshold(crops: list, settings: NucleiSettings) -> float:
    """Otsu's threshold of the smoothed density of ``crops`` (float RGB regions) pooled; a fixed
    ``settings.threshold`` is returned as it is."""
    from skimage.filters import threshold_otsu

    if settings.threshold != "otsu":
        return float(settings.threshold)
    pooled = np.concatenate([tissue_density(crop, smoothed_density(crop, settings), settings) for crop in crops])
    return float(threshold_otsu(pooled)) if np.ptp(pooled) > 1e-6 else float("inf")


def segment_block(rgb: np.ndarray, origin: tuple[int, int], core: tuple[int, int, int, int],
                  image_shape: tuple[int, int], settings: NucleiSettings, threshold: float) -> tuple[np.ndarray, int]:
    """Labels of one chunk, named by their centroids, and how many nuclei have their centroid in it.

    Parameters
    ----------
    rgb : ndarray (h, w, 3) float in [0, 1]
        The chunk with its margins.
    origin : (int, int)
        Where ``rgb[0, 0]`` lies in the whole image.
    core : (y0, y1, x0, x1)
        The chunk's own pixels, in ``rgb``'s coordinates.
    image_shape : (int, int)
        The whole image's (Y, X).
    """
    y0, y1, x0, x1 = core
    if not np.isfinite(threshold):
        return np.zeros((y1 - y0, x1 - x0), label_dtype(image_shape)), 0
    local = split_instances(nuclei_foreground(smoothed_density(rgb, settings), threshold, settings), settings)
    return name_block(local, origin, core, image_shape)


def label_block(method: str, image: np.ndarray, origin: tuple[int, int], core: tuple[int, int, int, int],
                image_shape: tuple[int, int], settings: NucleiSettings, threshold: float | None = None,
                segmenter=None) -> tuple[np.ndarray, int]:
    """One chunk's labels by ``method``, named by their centroids, and how many have their centroid in it.

    ``adaptation``: ``image`` is the stain (float RGB), segmented with the one ``threshold``
    (:func:`segment_block`). ``tutorship``: ``image`` is the enhanced gray (float (h, w)), and the
    model's ``segmenter`` finds the nuclei (:func:`digital_stain.nuclei.tutor.segment_enhanced`).
    Other parameters as for :func:`segment_block`.
    """
    if method != "tutorship":
        return segment_block(image, origin, core, image_shape, settings, threshold)
    from digital_stain.nuclei.tutor import segment_enhanced

    return name_block(segment_enhanced(segmenter, image, settings), origin, core, image_shape)


def name_block(local: np.ndarray, origin: tuple[int, int], core: tuple[int, int, int, int],
               image_shape: tuple[int, int]) -> tuple[np.ndarray, int]:
    """A chunk's instance labels ``local`` (1..N, of the chunk with its margins) renamed by their centroids
    in the whole image, cut to the chunk's own pixels; and how many have their centroid there."""
    dtype = label_dtype(image_shape)
    y0, y1, x0, x1 = core
    local = local.astype(np.int64)
    count = int(local.max())
    if count == 0:
        return np.zeros((y1 - y0, x1 - x0), dtype), 0
    cy, cx = _centroids(local, count)
    names = np.zeros(count + 1, np.uint64)
    names[1:] = (cy + origin[0]) * image_shape[1] + (cx + origin[1]) + 1
    own = int(np.sum((cy >= y0) & (cy < y1) & (cx >= x0) & (cx < x1)))
    return names[local[y0:y1, x0:x1]].astype(dtype), own


def _centroids(local: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Rounded centroid (row, column) of labels 1..count of ``local``."""
    yy, xx = np.indices(local.shape)
    flat = local.ravel()
    area = np.bincount(flat, minlength=count + 1)[1:].astype(np.float64)
    cy = np.bincount(flat, weights=yy.ravel(), minlength=count + 1)[1:] / area
    cx = np.bincount(flat, weights=xx.ravel(), minlength=count + 1)[1:] / area
    return np.floor(cy + 0.5).astype(np.int64), np.floor(cx + 0.5).astype(np.int64)


def find_nuclei_chunked(model, darkfield, *, method: str = "auto", stain: str = "auto",
                        nuclei: NucleiSettings | None = None, settings=None, adapt="auto", progress=None,
                        stop=None) -> tuple[np.ndarray, int, float | None, object]:
    """Nuclei of one large dark-field plane (numpy or dask), stained and segmented chunk by chunk.

    Staining goes through :class:`~digital_stain.stain.lazy.LazyStain` (the same chunks, margins
    and statistics as the lazy layers and whole slides), so only a few stained chunks are in memory
    at a time; the labels, uint32 (:func:`label_dtype`), are the one whole array. ``method`` as for
    :func:`~digital_stain.nuclei.find.find_nuclei` (tutorship segments the enhanced gray with the
    model's segmenter, chunk by chunk). The same chunks, one at a time and in the order a viewer
    asks for them: :class:`digital_stain.nuclei.lazy.LazyNuclei`.

    Returns
    -------
    (labels, count, threshold, adaptation)
        ``threshold`` is None for tutorship.

    Raises
    ------
    digital_stain.stain.tiling.Cancelled
        ``stop`` was set; nothing is returned.
    """
    from digital_stain.nuclei.lazy import LazyNuclei

    found = LazyNuclei(model, darkfield, method=method, stain=stain, nuclei=nuclei, settings=settings,
                       adapt=adapt)
    count = found.sweep(progress=progress, stop=stop)
    return found.labels(), count, found.threshold, found.adaptation
