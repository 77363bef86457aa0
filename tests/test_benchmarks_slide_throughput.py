"""Smoke test of ``benchmarks/slide_throughput.py`` (stain_to_zarr end to end, 50,000² projected) on a tiny slide."""

import re

from benchmark_scripts import load


def test_report_times_level0_units_apart_from_the_pyramid_per_chunk_and_threads(tiny_model_file, tmp_path, capsys,
                                                                                  monkeypatch):
    module = load("slide_throughput", monkeypatch)
    out = tmp_path / "throughput.md"
    code = module.main(["--device", "cpu", "--side", "768", "--chunk", "256,384", "--model", str(tiny_model_file),
                        "--threads", "1,3", "--no-warmup", "--workdir", str(tmp_path), "--out", str(out)])
    assert code == 0
    text = out.read_text()
    assert text.strip() in capsys.readouterr().out
    rows = re.findall(r"^\| (\d+) \| ([\d.]+)x \| (\d+) \| (\d) \| no \| ([\d.]+) s \| ([\d.]+) \| ([\d.]+)x \|",
                      text, re.M)
    assert [row[:4] for row in rows] == [("256", "4.00", "13", "1"), ("256", "4.00", "13", "3"),  # overlap 128
                                         ("384", "2.78", "5", "1"), ("384", "2.78", "5", "3")]
    assert float(rows[0][6]) == 1.0  # the first is the baseline
    assert all(float(first) > 0 and float(rate) > 0 for *_, first, rate, _ in rows)
    import digital_stain.slide.run as slide_module

    assert slide_module.process_chunk.__name__ == "process_chunk"  # its timing wrapper is removed
    assert list(tmp_path.glob("slide-throughput-*")) == []
