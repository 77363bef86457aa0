"""Training images: folders or in-memory arrays, with clear refusals, and random augmented crops."""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from digital_stain.core.arrays import InputError, split_planes, to_uint8, to_unit_rgb, value_scaling
from digital_stain.io.images import list_images, read_image


@dataclass
class ImageSet:
    """RGB uint8 images loaded from a folder (or given in memory: ``folder`` None), with what was skipped and why."""

    folder: Path | None
    images: list = field(default_factory=list)
    names: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)  # reason -> list of names

    def skip(self, reason: str, name: str) -> None:
        self.skipped.setdefault(reason, []).append(name)

    def skipped_note(self, kind: str) -> str | None:
        """A sentence naming the files that were skipped and why (None if none were)."""
        return skipped_note(self.skipped, kind, self.folder)

    def summary(self) -> str:
        parts = [f"{len(self.images)} image(s) " + (f"from {self.folder}" if self.folder is not None else "in memory")]
        parts += [f"skipped {len(v)} ({k})" for k, v in self.skipped.items()]
        return "; ".join(parts)


def skipped_note(skipped: dict, kind: str, folder=None, shown: int = 10) -> str | None:
    """``skipped`` (reason -> names) as one sentence that names the files (the first ``shown`` per reason)."""
    if not skipped:
        return None
    parts = []
    for reason, names in skipped.items():
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        parts.append(f"{reason}: {', '.join(names[:shown])}{more}")
    where = f" in {folder}" if folder is not None else ""
    total = sum(len(v) for v in skipped.values())
    return f"skipped {total} {kind} file(s){where}, not used for training ({'; '.join(parts)})."


def load_rgb_folder(folder: str | os.PathLike, *, min_side: int, kind: str = "H&E") -> ImageSet:
    """Load every RGB image of a folder for training.

    Unreadable files, images smaller than ``min_side`` and (for H&E) gray
    images are skipped and counted; if nothing usable is left the folder is
    refused with the reasons. RGBA loses its alpha channel.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{kind} folder {folder} does not exist or is not a folder.")
    paths = list_images(folder)
    if not paths:
        raise InputError(f"{kind} folder {folder} has no image files (PNG, JPEG, TIFF); point at the folder of images.")
    found = ImageSet(folder)
    for path in paths:
        try:
            image = np.asarray(read_image(path))
        except InputError:
            found.skip("unreadable", path.name)
            continue
        if image.ndim == 3 and image.shape[-1] == 4:
            image = image[..., :3]
        if kind != "H&E" and (image.ndim == 2 or image.ndim == 3 and image.shape[-1] == 1):
            image = np.repeat(image.reshape(*image.shape[:2], 1), 3, axis=-1)  # gray dark-field is fine
        if image.ndim != 3 or image.shape[-1] != 3:
            found.skip("not RGB" if kind == "H&E" else "not gray or RGB", path.name)
            continue
        if min(image.shape[:2]) < min_side:
            found.skip(f"smaller than {min_side} px", path.name)
            continue
        if image.dtype != np.uint8:
            image = (image.astype(np.float32) / np.iinfo(image.dtype).max * 255 + 0.5).astype(np.uint8) \
                if image.dtype.kind == "u" else (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
        found.images.append(np.ascontiguousarray(image))
        found.names.append(path.name)
    if not found.images:
        reasons = ", ".join(f"{len(v)} {k}" for k, v in found.skipped.items())
        raise InputError(f"no usable {kind} image in {folder} ({reasons}). {kind} images must be RGB and at least {min_side} px.")
    return found


def is_folder_source(source) -> bool:
    """True for a folder path (``str`` or path-like), False for in-memory images."""
    return isinstance(source, (str, os.PathLike))


def load_images(source, names: Sequence[str] | None = None, *, min_side: int, kind: str = "H&E") -> ImageSet:
    """A folder path (:func:`load_rgb_folder`) or in-memory images (:func:`images_from_arrays`)."""
    if is_folder_source(source):
        if names is not None:
            raise InputError(f"names are for in-memory {kind} images; a folder's images are named by their files.")
        return load_rgb_folder(source, min_side=min_side, kind=kind)
    return images_from_arrays(source, names, min_side=min_side, kind=kind)


def images_from_arrays(arrays, names: Sequence[str] | None = None, *, min_side: int,
                       kind: str = "dark-field") -> ImageSet:
    """In-memory images (e.g. napari layers) as training images, RGB uint8 as a folder's would be.

    Parameters
    ----------
    arrays : ndarray or sequence of array-like
        Each ``(Y, X)`` or ``(Y, X, C)`` (C in {1, 3, 4}; alpha dropped), uint8, uint16 or
        float, scaled to [0, 1] as :func:`digital_stain.core.arrays.value_scaling` says (one
        scaling per array) and rounded to uint8. A stack ``(..., Y, X[, C])`` gives one image
        per plane. A single ndarray is one image (or one stack), not a list of rows.
    names : sequence of str, optional
        One per array (default ``image 0``, ``image 1``, ...); planes of a stack are named
        ``NAME [plane i]``. Names pick the validation split (by hash), as file names do.
    min_side : int
        Smaller images are skipped (usually the training crop).
    kind : str
        ``"dark-field"`` (gray is repeated to RGB) or ``"H&E"`` (must be RGB).

    Images that cannot be used are skipped and counted (:attr:`ImageSet.skipped`); if none
    is left, :class:`~digital_stain.core.arrays.InputError` says why and what to do.
    """
    if isinstance(arrays, np.ndarray) or hasattr(arrays, "__array__") and hasattr(arrays, "shape"):
        arrays = [arrays]
    arrays = list(arrays)
    if names is None:
        names = [f"image {i}" for i in range(len(arrays))]
    names = [str(n) for n in names]
    if len(names) != len(arrays):
        raise InputError(f"{len(names)} name(s) for {len(arrays)} {kind} image(s); give one name per image.")
    if not arrays:
        raise InputError(f"no {kind} images were given; give at least one image (or a folder of them).")
    found = ImageSet(None)
    for name, array in zip(names, arrays):
        array = np.asarray(array)
        try:
            stack, plane_dims = split_planes(array.shape)
        except InputError:
            found.skip("not RGB" if kind == "H&E" else "not gray or RGB", name)
            continue
        rgb = len(plane_dims) == 3 and plane_dims[-1] in (3, 4)
        if kind == "H&E" and not rgb:
            found.skip("not RGB", name)
            continue
        if min(plane_dims[:2]) < min_side:
            found.skip(f"smaller than {min_side} px", name)
            continue
        try:
            scaling = value_scaling(array)  # one scaling for a whole stack, as staining does
        except InputError:
            found.skip("pixel values not usable (boolean, NaN/inf or not numeric)", name)
            continue
        planes = array.reshape((-1, *plane_dims))
        for i, plane in enumerate(planes):
            found.images.append(np.ascontiguousarray(to_uint8(to_unit_rgb(plane, scaling))))
            found.names.append(f"{name} [plane {i}]" if stack else name)
    if not found.images:
        reasons = ", ".join(f"{len(v)} {k}" for k, v in found.skipped.items())
        need = "RGB" if kind == "H&E" else "gray or RGB"
        raise InputError(f"no usable {kind} image among the {len(arrays)} given ({reasons}). {kind} images must be "
                         f"{need} and at least {min_side} x {min_side} px (the training crop): give larger images "
                         "or choose a smaller crop.")
    return found


def validation_split(names: list[str], fraction: float = 0.1) -> np.ndarray:
    """Deterministic boolean mask of held-out images, by a hash of each name (stable as folders grow)."""
    return np.array([(zlib.crc32(n.encode()) % 1000) < fraction * 1000 for n in names], dtype=bool)


def random_crops(images: list, n: int, size: int, rng: np.random.Generator, turns: bool = True) -> np.ndarray:
    """``n`` random ``size``-square crops, with random flips and 90-degree rotations unless ``turns`` is False.

    Returns uint8 ``(n, size, size, C)``. Without turns the crops draw fewer random numbers, so
    the two settings cut different crops from the same ``rng``.
    """
    out = []
    for _ in range(n):
        image = images[rng.integers(len(images))]
        y = rng.integers(image.shape[0] - size + 1)
        x = rng.integers(image.shape[1] - size + 1)
        crop = image[y : y + size, x : x + size]
        if turns:
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            crop = np.rot90(crop, k=int(rng.integers(4)))
        out.append(crop)
    return np.ascontiguousarray(np.stack(out))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    y = (image.shape[0] - size) // 2
    x = (image.shape[1] - size) // 2
    return image[y : y + size, x : x + size]
