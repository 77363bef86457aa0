"""``benchmarks/upsample_cost.py`` on a small input: every upsampling mode timed against the transposed one."""

from benchmark_scripts import load


def test_every_mode_is_timed_against_transpose(monkeypatch, capsys):
    bench = load("upsample_cost", monkeypatch)
    assert bench.main(["--side", "64", "--width", "4", "--blocks", "1", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "| transpose |" in out and "| 1.00x |" in out
    assert "| bilinear |" in out and "| nearest |" in out
