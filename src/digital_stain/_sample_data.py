"""napari sample data: real dark-field tiles from the DSD data set (Xu et al.; see data/README.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).parent / "data"
PIXEL_SIZE_UM = 88.4 / 256  # DSD tiles: 256 px over 88.4 um
CITATION = (
    "DSD data set: Xu et al., 'Digital Staining with Knowledge Distillation: A Unified Framework for "
    "Unpaired and Paired-But-Misaligned Data'"
)


def sample_paths(kind: str = "darkfield") -> list[Path]:
    """Shipped sample tiles of one kind (``darkfield`` or ``stained``), sorted."""
    return sorted(DATA_DIR.glob(f"{kind}_*.png"))


def _read(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _layer(path: Path, name: str) -> tuple:
    kind = "H&E" if path.name.startswith("stained") else "dark-field"  # the Fine-tune widget reads this
    meta = {"name": name, "rgb": True, "scale": (PIXEL_SIZE_UM, PIXEL_SIZE_UM), "units": "um",
            "metadata": {"source": path.name, "kind": kind, "citation": CITATION}}
    return (_read(path), meta, "image")


def darkfield_sample() -> list[tuple]:
    """One unstained dark-field tile of breast tissue (256 x 256 RGB)."""
    path = sample_paths("darkfield")[0]
    return [_layer(path, "dark-field sample")]


def darkfield_tiles() -> list[tuple]:
    """All shipped dark-field tiles, one layer each."""
    return [_layer(p, f"dark-field {p.stem.split('_', 1)[1]}") for p in sample_paths("darkfield")]


def stained_reference() -> list[tuple]:
    """One real H&E bright-field tile (other tissue, for the staining style)."""
    path = sample_paths("stained")[0]
    return [_layer(path, "H&E reference")]
