"""Scoring models: the evaluate module and the `evaluate` / `synth` commands (real files, real models)."""

import json

import numpy as np
import pytest
from PIL import Image

from digital_stain.cli import main
from digital_stain.quality.evaluate import as_rgb_uint8, evaluate_model, format_table, score_images
from digital_stain.quality.metrics import lab_pixels
from digital_stain.stain.model import StainModel


def _images(folder):
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]


def test_score_images_gives_what_the_data_allows(hne_dir):
    hne = _images(hne_dir)
    alone = score_images(hne)
    assert set(alone) == {"niqe", "checkerboard_2", "checkerboard_4"}
    full = score_images(hne, [im.mean(-1) / 255 for im in hne], hne, lab_pixels(np.stack(hne)))
    assert set(full) == {"psnr", "ssim", "nuclei_dice", "structure", "niqe", "style", "checkerboard_2",
                         "checkerboard_4"}
    assert full["psnr"] == float("inf") and full["ssim"] == pytest.approx(1.0) and full["nuclei_dice"] == 1.0
    assert full["structure"] > 0.95 and full["style"] < 1.0
    table = format_table({"real": full})
    assert "psnr ↑" in table and "niqe ↓" in table and "checkerboard_2 ↓" in table and "| real |" in table


def test_niqe_mean_skips_featureless_and_small_images_and_lists_must_match(hne_dir):
    hne = _images(hne_dir)
    flat = np.full((256, 256, 3), 128, np.uint8)
    with_flat = score_images(hne + [flat, hne[0][:100, :100]])
    assert with_flat["niqe"] == pytest.approx(score_images(hne)["niqe"])
    from digital_stain.core.arrays import InputError

    with pytest.raises(InputError, match="3 images but 2 references"):
        score_images(hne, references=hne[:2])


def test_gray_output_is_scored_as_rgb():
    gray = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    rgb = as_rgb_uint8(gray)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8 and (rgb[..., 0] == rgb[..., 2]).all()


def test_shipped_teacher_keeps_structure_and_looks_more_like_hne_than_gray(darkfield_dir, hne_dir):
    model = StainModel.load("dsd-unpaired", device="cpu")
    style = lab_pixels(np.stack(_images(hne_dir)))
    results = evaluate_model(model, _images(darkfield_dir), ["enhanced", "teacher"], style_reference=style)
    assert results["teacher"]["structure"] > 0.95  # its lightness is the enhanced image, by construction
    assert results["teacher"]["style"] < 0.6 * results["enhanced"]["style"]


def test_synth_then_evaluate_with_references(capsys, tiny_model_file, hne_dir, darkfield_dir, tmp_path):
    synthetic = tmp_path / "synthetic"
    assert main(["synth", "--stained", str(hne_dir), "--output", str(synthetic), "--model", str(tiny_model_file),
                 "--tint-from", str(darkfield_dir)]) == 0
    made = sorted(p.name for p in synthetic.glob("*.png"))
    assert made == sorted(p.name for p in hne_dir.glob("*.png"))
    first = np.asarray(Image.open(synthetic / made[0]))
    assert first.dtype == np.uint8 and first.shape == (256, 256, 3) and first.mean() < 40  # dim, like dark-field
    out = tmp_path / "scores.json"
    assert main(["evaluate", "--darkfield", str(synthetic), "--reference", str(hne_dir), "--stained", str(hne_dir),
                 "--model", str(tiny_model_file), "--json", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "| teacher |" in printed and "| student |" in printed
    report = json.loads(out.read_text())
    assert report["checksum"] and set(report["scores"]) == {"enhanced", "teacher", "student"}
    assert set(report["scores"]["teacher"]) == {"psnr", "ssim", "nuclei_dice", "structure", "niqe", "style",
                                                 "checkerboard_2", "checkerboard_4"}
    assert main(["synth", "--stained", str(hne_dir), "--output", str(synthetic), "--model", str(tiny_model_file)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_evaluate_refuses_unpaired_reference_names(capsys, tiny_model_file, darkfield_dir, hne_dir):
    # the sample dark-field and H&E tiles have different names: not pairs
    assert main(["evaluate", "--darkfield", str(darkfield_dir), "--reference", str(hne_dir),
                 "--model", str(tiny_model_file), "-q"]) == 2
    err = capsys.readouterr().err
    assert "no reference of the same name" in err and "paired by file name" in err
