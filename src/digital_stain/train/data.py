"""Training images: loading folders with clear refusals, and random augmented crops."""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..arrays import InputError
from ..io import list_images, read_image


@dataclass
class ImageSet:
    """RGB uint8 images loaded from a folder, with what was skipped and why."""

    folder: Path
    images: list = field(default_factory=list)
    names: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)  # reason -> list of names

    def skip(self, reason: str, name: str) -> None:
        self.skipped.setdefault(reason, []).append(name)

    def summary(self) -> str:
        parts = [f"{len(self.images)} image(s) from {self.folder}"]
        parts += [f"skipped {len(v)} ({k})" for k, v in self.skipped.items()]
        return "; ".join(parts)


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


def validation_split(names: list[str], fraction: float = 0.1) -> np.ndarray:
    """Deterministic boolean mask of held-out images, by a hash of each name (stable as folders grow)."""
    return np.array([(zlib.crc32(n.encode()) % 1000) < fraction * 1000 for n in names], dtype=bool)


def random_crops(images: list, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random ``size``-square crops with random flips and 90-degree rotations.

    Returns uint8 ``(n, size, size, C)``.
    """
    out = []
    for _ in range(n):
        image = images[rng.integers(len(images))]
        y = rng.integers(image.shape[0] - size + 1)
        x = rng.integers(image.shape[1] - size + 1)
        crop = image[y : y + size, x : x + size]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = np.rot90(crop, k=int(rng.integers(4)))
        out.append(crop)
    return np.ascontiguousarray(np.stack(out))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    y = (image.shape[0] - size) // 2
    x = (image.shape[1] - size) // 2
    return image[y : y + size, x : x + size]
