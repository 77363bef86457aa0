"""``benchmarks/paired_teacher.py`` on a miniature of its data: the three real DSD_P pairs and the tiny model."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from benchmark_scripts import load

DSD_P = Path(__file__).parent / "data" / "dsd_p"


def test_each_way_of_training_the_teacher_prints_its_row(monkeypatch, capsys, tmp_path, tiny_model_file):
    bench = load("paired_teacher", monkeypatch)
    monkeypatch.setattr(sys.modules["transfer"], "HELD_OUT", 0.0)  # nothing held out for transfer.py's test ...
    monkeypatch.setattr(sys.modules["finetune_defaults"], "DEV", 0.3)  # ... and one pair of three in the dev split
    root = tmp_path / "dsd"
    shutil.copytree(DSD_P, root / "DSD_P" / "train")
    configs = '[{"steps": 0}, {"steps": 2, "align": true, "mix": 1.0}, {"steps": 2, "align": false}]'
    args = [str(tiny_model_file), configs, "--data", str(root), "--workdir", str(tmp_path / "work")]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "trained by the bare loop on 2 DSD_P pairs; scored on the 1 dev pairs" in out, out
    rows = [line for line in out.splitlines() if line.startswith("| {")]
    assert [row.split(" | ")[0] for row in rows] == ['| {"steps": 0}', '| {"steps": 2, "align": true, "mix": 1.0}',
                                                     '| {"steps": 2, "align": false}']
    assert rows[0] != rows[1]  # two steps changed the teacher's stain
    assert bench.main(args[:1] + ['[{"steps": 2}]', "--library"] + args[2:]) == 0
    assert "trained by `train_teacher(enhanced=...)`" in capsys.readouterr().out


def test_the_shift_of_a_section_is_found():
    import numpy as np
    from scipy import ndimage

    from benchmark_scripts import BENCHMARKS

    sys.path.insert(0, str(BENCHMARKS))
    try:
        from paired_teacher import section_shift
    finally:
        sys.path.remove(str(BENCHMARKS))
    gray = ndimage.gaussian_filter(np.random.default_rng(0).random((128, 128)), 3).astype(np.float32)
    gray = (gray - gray.min()) / np.ptp(gray)
    section = np.repeat((np.roll(1 - gray, (3, -5), axis=(0, 1)) * 255).astype(np.uint8)[..., None], 3, axis=-1)
    assert section_shift(gray, section) == (3, -5)
