"""Smoke test of ``benchmarks/slide_host.py`` (host work against network per slide unit) on a tiny slide."""

import re

from benchmark_scripts import load


def test_report_splits_unit_time_into_network_and_host(tiny_model_file, tmp_path, capsys, monkeypatch):
    module = load("slide_host", monkeypatch)
    out = tmp_path / "host.md"
    code = module.main(["--device", "cpu", "--side", "512", "--chunk", "256", "--model", str(tiny_model_file),
                        "--workdir", str(tmp_path), "--out", str(out)])
    assert code == 0
    text = out.read_text()
    assert text.strip() in capsys.readouterr().out
    assert "4 level-0 units" in text
    ms = {name: float(value) for name, value in re.findall(r"^\| ([^|]+?) \| ([\d.]+) \|$", text, re.M)}
    whole, network, host = ms["whole unit"], ms["network (`_forward`, 1 per unit)"], ms["host work (the rest)"]
    assert network > 0 and host > 0 and abs(whole - network - host) < 0.2
    assert 0 < ms["of which store writes and progress marks (with fsync)"] < host
    from digital_stain.stain.chunks import ChunkStainer
    from digital_stain.slide.store import SlideStore

    assert ChunkStainer._forward.__name__ == "_forward" and SlideStore.write.__name__ == "write"  # timers removed
    assert list(tmp_path.glob("slide-host-*")) == []  # its temporary slide and store are deleted
