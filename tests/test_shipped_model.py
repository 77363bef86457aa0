"""The default model shipped in the package: loads, is what its card says, and stains like H&E."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digital_stain._sample_data import sample_paths
from digital_stain.core.color import rgb_to_lab
from digital_stain.stain.model import DEFAULT_MODEL, StainModel, available_models


@pytest.fixture(scope="module")
def model():
    return StainModel.load(DEFAULT_MODEL)


def _lab(rgb01: np.ndarray) -> np.ndarray:
    return rgb_to_lab(torch.from_numpy(np.ascontiguousarray(rgb01.transpose(2, 0, 1)))[None].float())[0].numpy()


def _read(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_default_model_is_shipped_with_provenance(model):
    assert DEFAULT_MODEL in available_models()
    assert model.outputs == ("enhanced", "teacher", "student")
    prov = model.metadata["provenance"]
    assert prov["command"].startswith("digital-stain train ") and "--darkfield" in prov["command"]
    assert "DSD_U/train/stained" in prov["stained"]
    assert prov["teacher"]["steps"] > 0 and prov["teacher"]["val_l1_ab"] > 0
    student = prov["student"]
    assert student["steps"] > 0 and student["best_step"] is not None
    assert {"structure", "style", "kd_l1"} <= set(student["history"][-1])
    assert len(model.checksum) == 64


def test_student_keeps_structure_and_stains_like_hne(model):
    """Nuclei where the enhanced image has them (not inverted, not moved) and H&E colours."""
    from digital_stain.quality.metrics import stain_style_distance, structure_score

    real = np.stack([_read(p) for p in sample_paths("stained")])
    outs = [model.stain(_read(p), ["enhanced", "student"]) for p in sample_paths("darkfield")]
    for out in outs:
        assert structure_score(out["student"], out["enhanced"]) > 0.8
    student = np.stack([o["student"] for o in outs])
    gray = np.repeat(np.stack([o["enhanced"] for o in outs])[..., None], 3, -1)
    assert stain_style_distance(student, real) < 0.6 * stain_style_distance(gray, real)
    student_ab = _lab(student.reshape(-1, student.shape[-2], 3)).reshape(3, -1)[1:].mean(axis=1)
    assert student_ab[0] > 5 and student_ab[1] < 0, student_ab  # pink-purple like H&E


def test_enhanced_reverses_darkfield_contrast(model):
    darkfield = _read(sample_paths("darkfield")[0])
    enhanced = model.stain(darkfield, ["enhanced"])["enhanced"]
    luma = darkfield.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    bright = luma > np.quantile(luma, 0.9)
    dark = luma < np.quantile(luma, 0.1)
    assert enhanced[bright].mean() < enhanced[dark].mean() - 0.2


def test_teacher_colours_like_real_hne(model):
    """The teacher's chroma is close to real H&E's (pink/purple: a > 0, b < 0) and far from gray."""
    real = np.concatenate([_lab(_read(p) / 255.0).reshape(3, -1) for p in sample_paths("stained")], axis=1)
    stained = [model.stain(_read(p), ["teacher", "enhanced"]) for p in sample_paths("darkfield")]
    teacher = np.concatenate([_lab(s["teacher"]).reshape(3, -1) for s in stained], axis=1)
    real_ab, teacher_ab = real[1:].mean(axis=1), teacher[1:].mean(axis=1)
    assert real_ab[0] > 10 and real_ab[1] < 0  # sanity: H&E is pink-purple
    assert teacher_ab[0] > 5, teacher_ab  # magenta-leaning like H&E, not gray
    assert np.linalg.norm(teacher_ab - real_ab) < np.linalg.norm(real_ab) * 0.6
    # the teacher keeps the enhanced lightness: structure stays where it was
    for s in stained:
        lightness = _lab(s["teacher"])[0]
        gray_l = _lab(np.repeat(s["enhanced"][..., None], 3, -1))[0]
        assert np.corrcoef(lightness.ravel(), gray_l.ravel())[0, 1] > 0.95


@pytest.mark.parametrize("output", ["teacher", "student"])
def test_shipped_networks_tiled_with_defaults_equal_one_pass(model, output):
    """With the default tile overlap the shipped networks' tiles agree with one pass to under one gray level."""
    mosaic = np.tile(_read(sample_paths("darkfield")[0]), (3, 3, 1))
    # adapt="off": nine copies of one tile count as nine fields, far enough from the training histogram to be
    # adapted, and the adapted (stretched) enhanced image moves the teacher's worst pixel to 1.2 gray levels
    one_pass = model.stain(mosaic, [output], tile=1024, precision="fp32", adapt="off")[output]
    tiled = model.stain(mosaic, [output], tile=256, precision="fp32", adapt="off")[output]
    assert np.abs(tiled - one_pass).max() < 1 / 255


def test_fast_model_is_shipped_smaller_and_keeps_structure():
    from digital_stain.quality.metrics import structure_score

    fast = StainModel.load("dsd-unpaired-fast")
    assert fast.outputs == ("enhanced", "teacher", "student")
    assert fast.student.config["width"] == 16 and fast.student.config["n_blocks"] == 4
    assert fast.metadata["provenance"]["student"]["steps"] == 4000
    for path in sample_paths("darkfield"):
        out = fast.stain(_read(path), ["enhanced", "student"])
        assert structure_score(out["student"], out["enhanced"]) > 0.8


PAIRED_DIR = Path(__file__).parent / "data" / "dsd_p"  # 3 held-out DSD_P pairs (see tests/data/README.md)


def test_paired_model_is_shipped_with_its_provenance():
    model = StainModel.load("dsd-paired", device="cpu")
    assert model.outputs == ("enhanced", "teacher", "student")
    student = model.metadata["provenance"]["student"]
    assert student["mode"] == "paired" and "DSD_P/train/stained" in student["stained"]
    assert student["config"]["width"] == 64 and student["config"]["blocks"] == 9  # the paper's generator
    assert student["config"]["registration"] is True


def test_paired_student_stains_closer_to_the_adjacent_section_than_the_teacher():
    """On held-out pairs: nearer the real H&E of the next section (PSNR despite the misalignment,
    colour distribution) than the teacher, while keeping the dark-field's structure."""
    from digital_stain.quality.metrics import psnr, stain_style_distance, structure_score

    model = StainModel.load("dsd-paired", device="cpu")
    names = sorted((PAIRED_DIR / "darkfield").glob("*.png"))
    assert len(names) == 3
    refs, outs = [], []
    for path in names:
        out = model.stain(_read(path))
        ref = _read(PAIRED_DIR / "stained" / path.name) / 255.0
        assert psnr(out["student"], ref) > psnr(out["teacher"], ref) + 1.0
        assert structure_score(out["student"], out["enhanced"]) > 0.75
        refs.append(ref)
        outs.append(out)
    refs = np.stack(refs)
    student = stain_style_distance(np.stack([o["student"] for o in outs]), refs)
    teacher = stain_style_distance(np.stack([o["teacher"] for o in outs]), refs)
    assert student < 0.6 * teacher
