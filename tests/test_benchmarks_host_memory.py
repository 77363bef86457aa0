"""Smoke test of ``benchmarks/host_memory.py`` (huge pages on and off, each in a fresh process) on tiny inputs."""

import re

from benchmark_scripts import load


def test_each_setting_runs_each_workload_in_a_fresh_process(tiny_model_file, tmp_path, capsys, monkeypatch):
    module = load("host_memory", monkeypatch)
    out = tmp_path / "host.md"
    code = module.main(["--settings", "0,1", "--model", str(tiny_model_file), "--unit", "256", "--repeats", "1",
                        "--side", "256", "--slide", "512", "--threads", "1", "--workdir", str(tmp_path),
                        "--out", str(out)])
    assert code == 0
    text = out.read_text()
    assert text.strip() in capsys.readouterr().out
    row = r"^\| (\d+)² (\S+) .*?\| ([01]) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x \| (\d+) MiB \| (\d+) MiB \|$"
    rows = re.findall(row, text, re.M)
    assert [(row[1], row[2]) for row in rows] == [("student", "0"), ("student", "1"), ("StainModel.stain", "0"),
                                                  ("StainModel.stain", "1"), ("stain_to_zarr", "0"),
                                                  ("stain_to_zarr", "1")]
    assert all(float(row[5]) == 1.0 for row in rows[::2])  # each workload's first setting is its baseline
    assert all(float(row[3]) > 0 and int(row[6]) >= int(row[7]) > 0 for row in rows)  # peak >= final RSS
    assert list(tmp_path.glob("host-memory-*")) == []  # the slide workload's stores are removed
