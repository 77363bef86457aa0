"""``digital-stain nuclei INPUT -o OUT``: one uint16 label image per input, names kept, refusals clear."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from digital_stain.cli import main
from digital_stain.io.images import read_calibration, read_image

FAST = ["--device", "cpu", "--precision", "fp32", "-q"]


def run(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["nuclei", *map(str, args), *FAST])
    return code, capsys.readouterr().err


def test_a_folder_gives_one_label_image_per_input_same_name_and_size(capsys, tiny_model_file, darkfield_dir,
                                                                    tmp_path):
    out = tmp_path / "labels"
    code, err = run(capsys, darkfield_dir, "-o", out, "--model", tiny_model_file)
    assert code == 0, err
    inputs = sorted(darkfield_dir.glob("*.png"))
    assert sorted(p.name for p in out.glob("*.tif")) == sorted(f"{p.stem}.tif" for p in inputs)
    total = 0
    for path in inputs:
        labels = tifffile.imread(out / f"{path.stem}.tif")
        assert labels.dtype == np.uint16 and labels.shape == read_image(path).shape[:2]
        total += len(np.unique(labels)) - 1
    assert f"{total} nuclei" in err and "by adaptation" in err
    assert "folder: " in err  # the one adaptation decision for the folder is said


def test_labels_carry_the_input_s_pixel_size(capsys, tiny_model_file, darkfield_tile, tmp_path):
    from digital_stain.io.calibration import Calibration
    from digital_stain.io.images import write_image

    source = tmp_path / "in" / "slide.tif"
    source.parent.mkdir()
    write_image(source, darkfield_tile, calibration=Calibration((0.5, 0.5), "micrometer"))
    code, err = run(capsys, source, "-o", tmp_path / "labels", "--model", tiny_model_file)
    assert code == 0, err
    assert read_calibration(tmp_path / "labels" / "slide.tif").pixel_size == pytest.approx((0.5, 0.5))


def test_an_existing_output_is_refused_and_a_file_output_too(capsys, tiny_model_file, darkfield_dir, tmp_path):
    out = tmp_path / "labels"
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    code, err = run(capsys, darkfield_dir, "-o", out, "--model", tiny_model_file)
    assert code == 2 and "exists" in err
    assert (out / "mine.txt").read_text() == "the user's"
    code, err = run(capsys, darkfield_dir, "-o", tmp_path / "labels.tif", "--model", tiny_model_file)
    assert code == 2 and "give a folder" in err


def test_tutorship_without_a_segmenter_is_refused_before_reading(capsys, tiny_model_file, darkfield_dir, tmp_path):
    code, err = run(capsys, darkfield_dir, "-o", tmp_path / "labels", "--model", tiny_model_file,
                    "--method", "tutorship")
    assert code == 2 and "no nuclei segmenter" in err and "--method adaptation" in err
    assert not (tmp_path / "labels").exists()


def test_an_unreadable_file_is_skipped_with_its_reason(capsys, tiny_model_file, darkfield_dir, tmp_path):
    (darkfield_dir / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "labels"
    code, err = run(capsys, darkfield_dir, "-o", out, "--model", tiny_model_file)
    assert code == 1 and "skipped broken.png" in err
    assert not (out / "broken.tif").exists() and len(list(out.glob("*.tif"))) == 3


def test_the_segmenter_s_options_change_the_labels(capsys, tiny_model_file, darkfield_dir, tmp_path):
    code, err = run(capsys, darkfield_dir, "-o", tmp_path / "none", "--model", tiny_model_file, "--min-area", "100000")
    assert code == 0, err
    assert all(tifffile.imread(p).max() == 0 for p in (tmp_path / "none").glob("*.tif"))
