"""Paired-but-misaligned data (paper section IV-C): dark-field images and their stained adjacent sections.

A dark-field image and its stained reference are paired by name: the file name without its
image extension (``darkfield/0__1.png`` pairs with ``stained/0__1.png`` or ``stained/0__1.tif``;
an in-memory image named ``0__1``, e.g. a napari layer opened from ``0__1.png``, pairs with
the file ``0__1.png``). The two images of a pair must have the same pixel size: the
registration network ``R`` learns the small deformation between adjacent sections, not a
change of scale or a crop. The dark-field may be gray or RGB (as everywhere in the package);
the stained reference must be RGB. Anything else is refused before any work, saying which
files and what to do: a missing partner would silently change what is learnt from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from digital_stain.core.arrays import InputError
from digital_stain.io.images import IMAGE_SUFFIXES, ZARR_SUFFIXES
from digital_stain.train.data import ImageSet, load_images

_SUFFIXES = tuple(sorted({".ome.tif", ".ome.tiff", *ZARR_SUFFIXES, *IMAGE_SUFFIXES}, key=len, reverse=True))


def pair_key(name: str) -> str:
    """The name a pair is matched by: ``name`` without a known image extension (case kept)."""
    lower = name.lower()
    for suffix in _SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _examples(names, n: int = 3) -> str:
    names = list(names)
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _all_names(found: ImageSet) -> list:
    return [*found.names, *(n for names in found.skipped.values() for n in names)]


def _where(found: ImageSet, kind: str) -> str:
    return f"{kind} folder {found.folder}" if found.folder is not None else f"the in-memory {kind} images"


@dataclass
class PairedSet:
    """Dark-field images and their stained references, in the same order, with the same names and sizes."""

    darkfield: ImageSet
    stained: list = field(default_factory=list)  # RGB uint8, stained[i] is the section beside darkfield.images[i]
    skipped: dict = field(default_factory=dict)  # reason -> list of pair names

    def summary(self) -> str:
        where = f" from {self.darkfield.folder}" if self.darkfield.folder is not None else " in memory"
        parts = [f"{len(self.stained)} dark-field/stained pair(s){where}"]
        parts += [f"skipped {len(v)} pair(s) ({k})" for k, v in self.skipped.items()]
        return "; ".join(parts)


def load_pairs(darkfield, stained, darkfield_names=None, stained_names=None, *, min_side: int) -> PairedSet:
    """Load dark-field images and their stained sections and pair them by name, or refuse saying why.

    Parameters
    ----------
    darkfield, stained : folder path, or in-memory images
        As for :func:`digital_stain.train.data.load_images`.
    darkfield_names, stained_names : sequence of str, optional
        Names of in-memory images (default ``image 0``, ``image 1``, ...).
    min_side : int
        Pairs smaller than this (the training crop) are skipped and counted; if none is
        left, the run is refused.

    Refused (:class:`~digital_stain.core.arrays.InputError`, with examples and what to do): different
    numbers of images, names that do not pair, a name used twice on one side, a file that
    cannot be read or used (a stained image that is not RGB, a dark-field image that is
    neither gray nor RGB), and pairs whose two images differ in size.
    """
    dark = load_images(darkfield, darkfield_names, min_side=1, kind="dark-field")
    ref = load_images(stained, stained_names, min_side=1, kind="H&E")
    return pair_sets(dark, ref, min_side=min_side)


def pair_sets(dark: ImageSet, ref: ImageSet, *, min_side: int) -> PairedSet:
    """Pair loaded dark-field and stained images by name, or refuse saying why (see :func:`load_pairs`)."""
    dark_names, ref_names = _all_names(dark), _all_names(ref)
    dark_where, ref_where = _where(dark, "dark-field"), _where(ref, "stained")
    for names, where in ((dark_names, dark_where), (ref_names, ref_where)):
        keys = [pair_key(n) for n in names]
        twice = sorted({n for n, k in zip(names, keys) if keys.count(k) > 1})
        if twice:
            raise InputError(f"{where} has {len(twice)} images whose names differ only in extension "
                             f"({_examples(twice)}); pairs are matched by name without extension: keep one of each.")
    dark_keys, ref_keys = {pair_key(n): n for n in dark_names}, {pair_key(n): n for n in ref_names}
    lonely_dark = [n for k, n in dark_keys.items() if k not in ref_keys]
    lonely_ref = [n for k, n in ref_keys.items() if k not in dark_keys]
    unpaired = []
    if lonely_dark:
        unpaired.append(f"{len(lonely_dark)} dark-field image(s) have no stained image of the same name "
                        f"(e.g. {_examples(lonely_dark)})")
    if lonely_ref:
        unpaired.append(f"{len(lonely_ref)} stained image(s) have no dark-field image of the same name "
                        f"(e.g. {_examples(lonely_ref)})")
    if len(dark_names) != len(ref_names):
        raise InputError(f"paired training needs one stained section per dark-field image, but {dark_where} has "
                         f"{len(dark_names)} image(s) and {ref_where} {len(ref_names)}"
                         + (f": {'; '.join(unpaired)}" if unpaired else "")
                         + ". Give both folders the same images, named alike (NAME.png in each), or train "
                           "without --paired (unpaired).")
    if unpaired:
        raise InputError(f"the dark-field and stained images do not pair by name: {'; '.join(unpaired)}. "
                         f"Pairs are matched by file name without extension ({dark_where}, {ref_where}): "
                         "rename them so each dark-field image and its stained section share a name, or train "
                         "without --paired (unpaired).")
    problems = []
    for reason, names in ref.skipped.items():
        problems.append(f"{len(names)} stained image(s) {reason} ({_examples(names)})")
    for reason, names in dark.skipped.items():
        problems.append(f"{len(names)} dark-field image(s) {reason} ({_examples(names)})")
    if problems:
        raise InputError(f"paired training needs every pair usable: {'; '.join(problems)}. A stained section must be "
                         "an RGB H&E image (a gray or multi-channel one cannot be compared with a stain) and a "
                         "dark-field image gray or RGB: convert the file, or remove the pair from both folders.")
    by_key = {pair_key(n): im for n, im in zip(ref.names, ref.images)}
    partners = [by_key[pair_key(n)] for n in dark.names]
    differ = [f"{n}: dark-field {d.shape[1]} x {d.shape[0]}, stained {s.shape[1]} x {s.shape[0]}"
              for n, d, s in zip(dark.names, dark.images, partners) if d.shape[:2] != s.shape[:2]]
    if differ:
        raise InputError(f"{len(differ)} pair(s) differ in size ({'; '.join(differ[:3])}"
                         + (f"; ... {len(differ) - 3} more" if len(differ) > 3 else "")
                         + "). Both images of a pair must have the same pixel size (the registration learns "
                           "small deformations, not scale or cropping): crop or resample one to match the other.")
    pairs = PairedSet(ImageSet(dark.folder))
    for name, image, partner in zip(dark.names, dark.images, partners):
        if min(image.shape[:2]) < min_side:
            pairs.skipped.setdefault(f"smaller than {min_side} px", []).append(name)
            continue
        pairs.darkfield.images.append(image)
        pairs.darkfield.names.append(name)
        pairs.stained.append(partner)
    pairs.darkfield.skipped = dict(pairs.skipped)
    if not pairs.stained:
        raise InputError(f"no usable pair: all {len(dark.names)} are smaller than {min_side} x {min_side} px "
                         "(the training crop); give larger images or choose a smaller crop.")
    return pairs
