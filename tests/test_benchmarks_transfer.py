"""``benchmarks/transfer.py`` on a miniature of its data: the real DSD_P test pairs and the sample tiles."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmark_scripts import load

DSD_P = Path(__file__).parent / "data" / "dsd_p"


@pytest.fixture
def data(tmp_path, sample_dir):
    """``dsd/`` laid out as the benchmark expects: DSD_P/train (3 real pairs) and DSD_U/val/darkfield (the samples)."""
    root = tmp_path / "dsd"
    for kind in ("darkfield", "stained"):
        shutil.copytree(DSD_P / kind, root / "DSD_P" / "train" / kind)
    (root / "DSD_U" / "val" / "darkfield").mkdir(parents=True)
    for path in sorted(sample_dir.glob("darkfield_*.png")):
        shutil.copy2(path, root / "DSD_U" / "val" / "darkfield" / path.name)
    return root


@pytest.mark.slow
def test_every_part_runs_and_prints_its_table(monkeypatch, capsys, data, tiny_model_file, tmp_path):
    bench = load("transfer", monkeypatch)
    monkeypatch.setattr(bench, "HELD_OUT", 1.0)  # three pairs: hold them all out (the fine-tune then trains on none)
    test, dark_dir, _ = bench.split_pairs(data / "DSD_P" / "train", tmp_path / "work", None)
    assert len(test) == 3 and not list(dark_dir.iterdir())
    monkeypatch.setattr(bench, "HELD_OUT", 0.0)
    test, dark_dir, hne_dir = bench.split_pairs(data / "DSD_P" / "train", tmp_path / "work", None)
    assert test == [] and len(list(dark_dir.iterdir())) == 3 and all(p.is_symlink() for p in hne_dir.iterdir())
    assert bench.held_out("x.png", 1.0) and not bench.held_out("x.png", 0.0)

    monkeypatch.setattr(bench, "HELD_OUT", 0.3)  # two of the three pairs held out, one to fine-tune on
    model = str(tiny_model_file)
    code = bench.main(["--data", str(data), "--models", model, "--paired-model", model, "--workdir",
                       str(tmp_path / "run"), "--steps", "1", "--teacher-steps", "1", "--limit", "2"])
    out = capsys.readouterr().out
    assert code == 0
    for heading in ("Zero-shot on DSD_P", "After `fine_tune`", "Synthetic shift", "auto`'s threshold"):
        assert heading in out
    assert "Held-out DSD_P/train pairs: 2" in out and "train on the other 1 (two folders" in out
    assert "adapt auto, folder" in out and "adapt auto, per image" in out and "(for scale)" in out
    assert "fine-tuned, defaults (trained paired): student" in out  # one real pair: its tissue agrees
    assert "fine-tuned, unpaired (trained unpaired): student" in out
    assert "x10, γ 1.0" in out and "| auto (folder) |" in out
    assert "DSD_P/train/darkfield, each tile" in out
