"""Shared fixtures: the shipped sample tiles and a tiny random-weight model.

The tiny model exercises the machinery (tiling, files, CLI); its weights are
random, so its "stains" mean nothing and are never presented as such.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import digital_stain

SAMPLE_DIR = Path(digital_stain.__file__).parent / "data"


def _copy_samples(pattern: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(SAMPLE_DIR.glob(pattern))
    assert found, f"no {pattern} in {SAMPLE_DIR}"
    for path in found:
        shutil.copy2(path, dest / path.name)
    return dest


@pytest.fixture
def sample_dir() -> Path:
    """The package's sample tiles (darkfield_*.png and stained_*.png, 256x256 RGB uint8)."""
    return SAMPLE_DIR


@pytest.fixture
def darkfield_tile(sample_dir) -> np.ndarray:
    """One dark-field sample tile, (256, 256, 3) uint8."""
    with Image.open(sample_dir / "darkfield_0_0.png") as im:
        tile = np.asarray(im.convert("RGB"))
    assert tile.shape == (256, 256, 3) and tile.dtype == np.uint8
    return tile


@pytest.fixture
def darkfield_dir(tmp_path) -> Path:
    """A tmp folder with copies of the dark-field sample tiles."""
    return _copy_samples("darkfield_*.png", tmp_path / "darkfield")


@pytest.fixture
def hne_dir(tmp_path) -> Path:
    """A tmp folder with copies of the H&E (stained) sample tiles."""
    return _copy_samples("stained_*.png", tmp_path / "stained")


def make_tiny_model(darkfield_dir: Path, hne_dir: Path):
    from digital_stain.core.enhance import Enhancer
    from digital_stain.stain.model import StainModel
    from digital_stain.core.nets import ColorizationUNet, ResnetGenerator

    enhancer = Enhancer.from_folders(darkfield_dir, hne_dir)
    torch.manual_seed(0)
    teacher = ColorizationUNet(width=4, depth=2)
    student = ResnetGenerator(4, 3, width=8, n_blocks=2)
    meta = {"name": "tiny-test", "description": "random weights, for tests only (not a stain)"}
    return StainModel(enhancer, teacher, student, meta)


@pytest.fixture
def tiny_model(darkfield_dir, hne_dir):
    """A StainModel with a fitted enhancer and tiny random-weight teacher and student."""
    return make_tiny_model(darkfield_dir, hne_dir)


class DarkSpots(torch.nn.Module):
    """A fixed tutorship segmenter for tests (no training, so its nuclei are known): a nucleus wherever the
    lightness, averaged over 5 x 5 px, is below -0.4 of [-1, 1] (about a tenth of a sample tile's
    enhanced gray); no boundaries. It takes what :class:`~digital_stain.core.nets.unet.NucleiUNet` does."""

    size_multiple, min_size = 4, 8

    def forward(self, lightness: torch.Tensor) -> torch.Tensor:
        mean = torch.nn.functional.avg_pool2d(lightness, 5, stride=1, padding=2, count_include_pad=False)
        return torch.cat([20.0 * (-0.4 - mean), torch.full_like(mean, -10.0)], dim=1)


@pytest.fixture
def tutored_model(tiny_model):
    """``tiny_model`` holding the :class:`DarkSpots` segmenter: ``method="auto"`` means tutorship for it."""
    from digital_stain.stain.model import StainModel

    return StainModel(tiny_model.enhancer, tiny_model.teacher, tiny_model.student,
                      {**tiny_model.metadata, "name": "tiny-tutored"}, segmenter=DarkSpots())


@pytest.fixture
def tiny_model_file(tiny_model, tmp_path) -> Path:
    """``tiny_model`` saved to a .safetensors model file."""
    path = tmp_path / "models" / "tiny.safetensors"
    path.parent.mkdir()
    tiny_model.save(path)
    return path


@pytest.fixture
def sections_dir(tmp_path, darkfield_dir, hne_dir) -> Path:
    """One stained tile per dark-field tile, saved under the dark-field tile's name (paired sections)."""
    folder = tmp_path / "sections"
    folder.mkdir()
    for dark, stained in zip(sorted(darkfield_dir.glob("*.png")), sorted(hne_dir.glob("*.png"))):
        shutil.copy2(stained, folder / dark.name)
    return folder


@pytest.fixture(autouse=True)
def _private_settings(tmp_path_factory, monkeypatch):
    """Every test gets its own settings and models folders (never the user's)."""
    root = tmp_path_factory.mktemp("user")
    monkeypatch.setenv("DIGITAL_STAIN_CONFIG_DIR", str(root / "config"))
    monkeypatch.setenv("DIGITAL_STAIN_DATA_DIR", str(root / "data"))


@pytest.fixture(autouse=True)
def _stop_plugin_workers():
    """After a widget test, stop and await its background jobs (so no thread outlives its viewer)."""
    yield
    import sys

    worker = sys.modules.get("digital_stain._napari.worker")
    if worker is not None and worker.running():
        worker.stop_all()
    lazy = sys.modules.get("digital_stain.stain.lazy")
    if lazy is not None:
        lazy.close_all()  # background chunk workers of lazily stained layers


@pytest.fixture
def tiny_stain_widget(make_napari_viewer, tiny_model_file):
    """A real viewer with the Digitally stain widget set to ``tiny_model_file``: ``(viewer, widget)``."""
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-digital-stain", "Digitally stain")
    widget.model.set_value(str(tiny_model_file))
    return viewer, widget
