"""Pairing "auto": adjacent sections are recognised by their tissue, not by their names alone (train/pairing.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digital_stain.train.data import load_images
from digital_stain.train.finetune import fine_tune
from digital_stain.train.pairing import AGREEMENT, MARGIN, detect_pairs, edge_agreement

DSD_P = Path(__file__).parent / "data" / "dsd_p"  # three real pairs of adjacent sections
FAST = dict(val_every=1, report_every=1)


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _sets(dark: Path, stained: Path):
    return load_images(dark, min_side=1, kind="dark-field"), load_images(stained, min_side=1, kind="H&E")


def test_edge_agreement_tells_adjacent_sections_from_unrelated_tissue(darkfield_tile):
    assert edge_agreement(darkfield_tile, darkfield_tile) == pytest.approx(1.0)
    shifted = np.roll(darkfield_tile, (5, -3), axis=(0, 1))  # a few pixels of misalignment are searched for
    assert edge_agreement(darkfield_tile, shifted) > 0.9
    for path in sorted((DSD_P / "darkfield").glob("*.png")):
        dark, section = _read(path), _read(DSD_P / "stained" / path.name)
        assert edge_agreement(dark, section) >= AGREEMENT  # opposite contrast, same structures
        assert edge_agreement(dark, np.rot90(section, 2)) < AGREEMENT - 0.05
    assert edge_agreement(darkfield_tile.mean(-1), darkfield_tile) == pytest.approx(1.0)  # gray or RGB


@pytest.mark.parametrize("a, b, words", [((32, 32, 3), (32, 40, 3), "differ in size"), ((4, 4), (4, 4), "too small")])
def test_edge_agreement_checks_its_input(a, b, words):
    with pytest.raises(ValueError, match=words):
        edge_agreement(np.zeros(a), np.zeros(b))


def test_adjacent_sections_are_detected(tmp_path):
    found = detect_pairs(*_sets(DSD_P / "darkfield", DSD_P / "stained"))
    assert found.paired and found.names_pair and found.pairs == 3
    assert found.agreement - found.baseline >= MARGIN and "tissue of the pairs agrees" in found.reason


def test_same_names_with_unrelated_tissue_are_not_pairs(darkfield_dir, sections_dir):
    """DSD_U's folders share every name and show other tissue: names alone would mislead."""
    found = detect_pairs(*_sets(darkfield_dir, sections_dir))
    assert not found.paired and found.names_pair and "does not agree" in found.reason
    assert found.agreement < AGREEMENT


def test_names_sizes_and_folders_decide_before_the_tissue(darkfield_dir, hne_dir, tmp_path):
    found = detect_pairs(*_sets(darkfield_dir, hne_dir))  # darkfield_0_0.png, stained_0_0.png: no pairs
    assert not found.paired and not found.names_pair and found.agreement is None
    assert "same folder" in detect_pairs(*_sets(darkfield_dir, darkfield_dir)).reason
    resized = tmp_path / "resized"
    shutil.copytree(DSD_P / "stained", resized)
    first = sorted(resized.glob("*.png"))[0]
    Image.fromarray(_read(first)[:128]).save(first)
    found = detect_pairs(*_sets(DSD_P / "darkfield", resized))
    assert not found.paired and found.names_pair and "pixel size" in found.reason
    fewer = tmp_path / "fewer"
    shutil.copytree(DSD_P / "stained", fewer)
    first = sorted(fewer.glob("*.png"))[0]
    first.unlink()
    assert not detect_pairs(*_sets(DSD_P / "darkfield", fewer)).names_pair


@pytest.mark.slow
def test_fine_tune_trains_adjacent_sections_paired_by_default_and_says_so(tiny_model):
    said = []
    tuned = fine_tune(tiny_model, DSD_P / "darkfield", DSD_P / "stained", steps=2, crop=64, device="cpu",
                      precision="fp32", config_overrides=FAST, teacher_steps=0, on_note=said.append, check=False)
    record = tuned.model.metadata["provenance"]
    assert record["student"]["mode"] == "paired" and record["fine_tune"]["pairing"]["paired"]
    config = record["student"]["config"]  # a fine-tune's R learns fast enough to align in a short run
    assert (config["reg_lr_scale"], config["lambda_smooth"]) == (10.0, 1.0) and config["lambda_kd"] == 2.0
    assert config["turns"] is False  # one microscope's pairs keep their orientation
    assert any(n.startswith("paired sections:") and "Learning to Align" in n for n in said), said
    plain = fine_tune(tiny_model, DSD_P / "darkfield", DSD_P / "stained", steps=2, crop=64, device="cpu",
                      precision="fp32", config_overrides=FAST, teacher_steps=0, paired=False, check=False)
    assert plain.model.metadata["provenance"]["student"]["mode"] == "unpaired"
    assert plain.model.metadata["provenance"]["student"]["config"]["turns"] is True
    assert "pairing" not in plain.model.metadata["provenance"]["fine_tune"]  # not asked, not recorded
    with pytest.raises(Exception, match="True, False or 'auto'"):
        fine_tune(tiny_model, DSD_P / "darkfield", DSD_P / "stained", paired="yes")
