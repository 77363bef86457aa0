"""``benchmarks/official_loop.py`` on a small mosaic of the package's samples with a tiny model file."""

import numpy as np
import torch

from benchmark_scripts import load
from digital_stain.core.nets import TileStableInstanceNorm


def test_the_loop_and_stain_are_timed_side_by_side(monkeypatch, capsys, tiny_model_file, tmp_path):
    bench = load("official_loop", monkeypatch)
    assert bench.main(["--models", str(tiny_model_file), "--side", "96", "--tile", "32", "--repeats", "1",
                       "--data", str(tmp_path / "none")]) == 0  # no DSD data there: the package's samples
    out = capsys.readouterr().out
    assert "package's dark-field sample tiles" in out and "fast bf16 by the CPU's flags" in out
    row = next(line for line in out.splitlines() if line.startswith(f"| `{tiny_model_file}`"))
    assert row.count("MP/s") == 3 and row.count("x |") == 2 and ("| fp32 |" in row or "| bf16 |" in row)


def test_the_official_loop_normalises_each_tile_alone(monkeypatch, tiny_model):
    """Its tiles are independent one-pass stains (the seams the library avoids)."""
    bench = load("official_loop", monkeypatch)
    student_in = np.random.default_rng(0).random((4, 64, 96), dtype=np.float32) * 2 - 1
    baseline = bench.official_network(tiny_model)
    assert not any(isinstance(m, TileStableInstanceNorm) for m in baseline.modules())  # PyTorch's own norm
    out = bench.official_loop(baseline, student_in, 32)
    with torch.no_grad():
        corner = ((tiny_model.student(torch.from_numpy(student_in[None, :, 32:, 64:])) + 1) / 2)[0]
    assert out.shape == (64, 96, 3)
    np.testing.assert_allclose(out[32:, 64:], corner.permute(1, 2, 0).numpy(), atol=1e-5)
