"""``benchmarks/nuclei.py`` on a miniature: the sample H&E tiles with masks made by the segmenter itself, so the
ceiling row must score exactly 1 and every other row less."""

import re

import numpy as np
import tifffile

from benchmark_scripts import load
from digital_stain.io.images import read_image
from digital_stain.nuclei.segment import segment_nuclei


def test_the_table_prints_with_a_perfect_ceiling_on_self_made_masks(monkeypatch, capsys, tmp_path, hne_dir,
                                                                    darkfield_dir):
    bench = load("nuclei", monkeypatch)
    (tmp_path / "data" / "masks").mkdir(parents=True)
    (tmp_path / "data" / "stained").symlink_to(hne_dir)
    for path in hne_dir.glob("*.png"):
        tifffile.imwrite(tmp_path / "data" / "masks" / f"{path.stem}.tif", segment_nuclei(read_image(path)))
    assert bench.main(["--data", str(tmp_path / "data"), "--models", "dsd-unpaired-fast", "--seeds", "1",
                       "--scale", "1", "--tint-from", str(darkfield_dir)]) == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^\| ([^|]+?) \| ([0-9.]+) \| [0-9.]+ \|", out, re.M))
    assert rows["ceiling: segmenter on the real H&E"] == "1.000"
    others = [float(value) for name, value in rows.items() if not name.startswith("ceiling")]
    assert len(others) == 3 and all(0 < value < 1 for value in others), out  # floor, student, teacher
    assert "3 H&E image(s)" in out and "scale 1.0" in out
    assert np.isfinite(others).all()
