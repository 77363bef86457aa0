"""``benchmarks/pairing.py`` on a miniature of its data: the three real DSD_P pairs and same-named sample tiles."""

import shutil
from pathlib import Path

from benchmark_scripts import load

DSD_P = Path(__file__).parent / "data" / "dsd_p"


def test_the_tables_print_and_tell_the_two_kinds_apart(monkeypatch, capsys, tmp_path, darkfield_dir, sections_dir):
    bench = load("pairing", monkeypatch)
    root = tmp_path / "dsd"
    shutil.copytree(DSD_P, root / "DSD_P" / "train")
    shutil.copytree(darkfield_dir, root / "DSD_U" / "train" / "darkfield")
    shutil.copytree(sections_dir, root / "DSD_U" / "train" / "stained")
    assert bench.main(["--data", str(root), "--draws", "3"]) == 0
    out = capsys.readouterr().out
    assert "| DSD_P/train (adjacent sections) | 100% / 100% / 100% / 100% |" in out, out
    assert "| DSD_U/train (same names, other tissue) | 0% / 0% / 0% / 0% |" in out, out
    assert "shifted further" in out
