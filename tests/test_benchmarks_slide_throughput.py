"""Smoke test of ``benchmarks/slide_throughput.py`` (stain_to_zarr end to end, 50,000² projected) on a tiny slide."""

import re

from benchmark_scripts import load


def test_report_times_level0_units_apart_from_the_pyramid(tiny_model_file, tmp_path, capsys, monkeypatch):
    module = load("slide_throughput", monkeypatch)
    out = tmp_path / "throughput.md"
    code = module.main(["--device", "cpu", "--side", "768", "--chunk", "256", "--model", str(tiny_model_file),
                        "--threads", "1,3", "--no-warmup", "--workdir", str(tmp_path), "--out", str(out)])
    assert code == 0
    text = out.read_text()
    assert text.strip() in capsys.readouterr().out
    rows = re.findall(r"^\| (\d) \| no \| ([\d.]+) s \| ([\d.]+) \| ([\d.]+)x \|", text, re.M)
    assert [row[0] for row in rows] == ["1", "3"] and float(rows[0][3]) == 1.0
    assert all(float(first) > 0 and float(rate) > 0 for _, first, rate, _ in rows)
    import digital_stain.slide as slide_module

    assert slide_module.process_chunk.__name__ == "process_chunk"  # its timing wrapper is removed
    assert list(tmp_path.glob("slide-throughput-*")) == []
