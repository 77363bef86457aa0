"""``benchmarks/soak.py``: a few cases of every kind run through the real command line, none of them unclean."""

from pathlib import Path

import numpy as np
from benchmark_scripts import load


def test_every_kind_of_case_runs_clean(monkeypatch, tmp_path):
    soak = load("soak", monkeypatch)
    model = soak.resolve_model_path("dsd-unpaired-fast")
    rng = np.random.default_rng(7)
    results = []
    for i, kind in enumerate(soak.KINDS * 2):
        work = tmp_path / f"{i}"
        work.mkdir()
        results.append(soak.run_case(kind, rng, work, model))
    assert {r["kind"] for r in results} == set(soak.KINDS)
    assert all(r["code"] in (0, 1, 2, 130) for r in results), [(r["what"], r["code"]) for r in results]
    assert not [r for r in results if r["traceback"] or r["half_written"]], results
    assert any(r["code"] == 2 and r["message"].startswith("digital-stain: error:") for r in results)
    assert Path(soak.SAMPLE).is_file()
