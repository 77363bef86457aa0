"""``benchmarks/compare_methods.py`` on a miniature of DSD_U made of the sample tiles, with a tiny model."""

import shutil

from benchmark_scripts import load


def test_the_comparison_prints_every_method_with_its_checkerboard(monkeypatch, capsys, tmp_path, tiny_model_file,
                                                                  darkfield_dir, hne_dir):
    bench = load("compare_methods", monkeypatch)
    data = tmp_path / "DSD_U"
    for split in ("train", "val"):
        shutil.copytree(darkfield_dir, data / split / "darkfield")
        shutil.copytree(hne_dir, data / split / "stained")
    assert bench.main(["--data", str(data), "--base", str(tiny_model_file), "--limit", "2",
                       "--also", f"again={tiny_model_file}"]) == 0
    out = capsys.readouterr().out
    assert "checkerboard_2 ↓" in out and "checkerboard_4 ↓" in out
    for row in ("| enhancer only (gray) |", "| teacher |", "| student of ", "| again |", "| real H&E"):
        assert out.count(row) >= 1, row
    assert "CycleGAN, no distillation" not in out  # no --ablation given: no row for it
