"""``benchmarks/eager_statistics.py`` on a small mosaic of the package's samples with a tiny model file."""

from benchmark_scripts import load


def test_both_ways_are_compared_with_the_one_pass_stain(monkeypatch, capsys, tiny_model_file, tmp_path):
    bench = load("eager_statistics", monkeypatch)
    assert bench.main(["--models", str(tiny_model_file), "--side", "700", "--tile", "256",
                       "--stats-pixels", str(160 * 160),
                       "--data", str(tmp_path / "none")]) == 0  # no DSD data there: the package's samples
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith(f"| `{tiny_model_file}`")]
    assert [row[1] for row in rows] == ["the whole image (reference)", "its own tiles, kept (default)",
                                        "16 crops of 512 px (before)"]
    for row in rows[1:]:
        largest, percentile, mean = (float(value) for value in row[3:6])
        assert 0 < mean <= percentile <= largest < 255, out  # tiled with sampled statistics: close, not equal
