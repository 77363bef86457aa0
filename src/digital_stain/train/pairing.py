"""Whether a dark-field folder and an H&E folder are adjacent sections (paired) or unpaired images.

Paired-but-misaligned training (paper section IV-C, Learning to Align) teaches the student far
more than unpaired training, but only when each H&E image really is the stained neighbour of
the dark-field image of the same name. Names alone do not tell: the DSD_U training folders share
every file name and show different tissue. So a pairing is believed when the names and pixel
sizes match *and* the tissue agrees: the edges of each dark-field image and of its partner
correlate, at the best of small shifts (adjacent sections are misaligned by a few pixels), well
above what the same images give against a partner turned half a turn (same image statistics,
unrelated places). Gradient magnitudes are compared, not intensities, because dark-field and
bright-field show the same structures with opposite contrast.

Thresholds (``AGREEMENT``, ``MARGIN``) were set on the DSD data (``benchmarks/pairing.py``,
``docs/benchmarks.md``): DSD_P's adjacent sections against DSD_U's same-named unpaired tiles.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from digital_stain.train.data import ImageSet
from digital_stain.train.paired import pair_key

SAMPLE = 16  # pairs compared (evenly spread over the sorted names)
SIDE = 128  # images are block-averaged to about this side before their edges are compared
REACH = 4  # shifts searched, in pixels of the reduced image (about 3 % of its side each way)
AGREEMENT = 0.15  # the median agreement of the pairs must be at least this ...
MARGIN = 0.10  # ... and exceed the median of the half-turned partners by this


@dataclass(frozen=True)
class Pairing:
    """The verdict of :func:`detect_pairs`, with the numbers behind it (for notes and provenance)."""

    paired: bool
    reason: str
    names_pair: bool = False  # every image has a partner of the same name (the question is worth asking)
    pairs: int = 0  # pairs compared
    agreement: float | None = None  # median edge agreement of the pairs
    baseline: float | None = None  # median edge agreement of the pairs with the partner turned half a turn

    def as_dict(self) -> dict:
        return asdict(self)


def edge_agreement(darkfield: np.ndarray, stained: np.ndarray, reach: int = REACH) -> float:
    """How well the structures of two images of the same size coincide, allowing a small misalignment.

    Parameters
    ----------
    darkfield, stained : ndarray
        ``(Y, X)`` gray or ``(Y, X, 3)`` RGB images of the same height and width, any
        real dtype (each is scaled by its own range).
    reach : int
        Largest shift tried, in pixels of the images reduced to about ``SIDE`` on their
        shorter side.

    Returns
    -------
    float
        The largest normalised correlation of the two images' gradient magnitudes over the
        shifts tried: about 0 for unrelated tissue, 0.2 to 0.4 for adjacent sections of the
        DSD data, 1 for one image compared with itself.
    """
    darkfield, stained = np.asarray(darkfield), np.asarray(stained)
    if darkfield.shape[:2] != stained.shape[:2]:
        raise ValueError(f"the images differ in size: {darkfield.shape[:2]} and {stained.shape[:2]}")
    if min(darkfield.shape[:2]) < 8:
        raise ValueError(f"images of {darkfield.shape[:2]} px are too small to compare (at least 8 x 8)")
    if reach < 0:
        raise ValueError(f"reach is a number of pixels, not {reach}")
    factor = max(1, min(darkfield.shape[:2]) // SIDE)
    return _best_correlation(_edges(darkfield, factor), _edges(stained, factor), reach)


def _edges(image: np.ndarray, factor: int) -> np.ndarray:
    from scipy import ndimage

    gray = image.astype(np.float64)
    gray = gray.mean(axis=-1) if gray.ndim == 3 else gray
    height, width = (gray.shape[0] // factor) * factor, (gray.shape[1] // factor) * factor
    gray = gray[:height, :width].reshape(height // factor, factor, width // factor, factor).mean(axis=(1, 3))
    span = np.ptp(gray)
    gray = (gray - gray.min()) / span if span > 0 else np.zeros_like(gray)
    return np.hypot(ndimage.gaussian_filter(gray, 1.0, order=(0, 1)), ndimage.gaussian_filter(gray, 1.0, order=(1, 0)))


def _best_correlation(a: np.ndarray, b: np.ndarray, reach: int) -> float:
    height, width = a.shape
    reach = min(reach, height // 4, width // 4)
    best = -1.0
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            x = a[max(0, dy): height + min(0, dy), max(0, dx): width + min(0, dx)]
            y = b[max(0, -dy): height + min(0, -dy), max(0, -dx): width + min(0, -dx)]
            x, y = x - x.mean(), y - y.mean()
            norm = np.sqrt((x * x).sum() * (y * y).sum())
            if norm > 0:
                best = max(best, float((x * y).sum() / norm))
    return best


def detect_pairs(darkfield: ImageSet, stained: ImageSet, sample: int = SAMPLE) -> Pairing:
    """Whether ``stained`` holds the adjacent stained section of each image of ``darkfield``.

    Parameters
    ----------
    darkfield, stained : ImageSet
        The loaded training images (:func:`digital_stain.train.data.load_images`).
    sample : int
        At most this many pairs are compared, evenly spread over the sorted names.

    Returns
    -------
    Pairing
        ``paired`` when every image has a partner of the same name (without extension) and
        pixel size, nothing was skipped on either side, and the tissue of the pairs agrees
        (``AGREEMENT``, ``MARGIN``); ``reason`` says which test decided.
    """
    if darkfield.folder is not None and stained.folder is not None \
            and darkfield.folder.resolve() == stained.folder.resolve():
        return Pairing(False, "the dark-field and H&E folders are the same folder")
    everyone = [[*found.names, *(n for names in found.skipped.values() for n in names)] for found in (darkfield, stained)]
    keys = [[pair_key(n) for n in names] for names in everyone]
    if any(len(set(k)) != len(k) for k in keys) or set(keys[0]) != set(keys[1]):
        return Pairing(False, "the file names do not pair one to one")
    if darkfield.skipped or stained.skipped:
        return Pairing(False, "the names pair, but some images were skipped, so not every image has its partner",
                       names_pair=True)
    partners = {pair_key(n): image for n, image in zip(stained.names, stained.images)}
    pairs = [(image, partners[pair_key(n)]) for n, image in sorted(zip(darkfield.names, darkfield.images),
                                                                    key=lambda kv: pair_key(kv[0]))]
    if any(d.shape[:2] != s.shape[:2] for d, s in pairs):
        return Pairing(False, "the names pair, but some pairs differ in pixel size", names_pair=True)
    chosen = [pairs[i] for i in np.unique(np.linspace(0, len(pairs) - 1, min(sample, len(pairs))).round().astype(int))]
    agreement = float(np.median([edge_agreement(d, s) for d, s in chosen]))
    baseline = float(np.median([edge_agreement(d, np.rot90(s, 2)) for d, s in chosen]))
    numbers = dict(names_pair=True, pairs=len(chosen), agreement=round(agreement, 3), baseline=round(baseline, 3))
    if agreement >= AGREEMENT and agreement - baseline >= MARGIN:
        return Pairing(True, "the names and sizes pair and the tissue of the pairs agrees", **numbers)
    return Pairing(False, "the names and sizes pair, but the tissue of the pairs does not agree", **numbers)
