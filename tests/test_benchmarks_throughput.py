"""Smoke test of ``benchmarks/throughput.py`` on a tiny image (CPU), plus its mosaic input."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["throughput"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("throughput", None)


def test_mosaic_of_real_tiles(throughput, darkfield_tile):
    tiles = [darkfield_tile, darkfield_tile[::-1]]
    image = throughput.mosaic(tiles, 600, seed=1)
    assert image.shape == (600, 600, 3) and image.dtype == np.uint8 and image.flags.c_contiguous
    assert np.array_equal(image, throughput.mosaic(tiles, 600, seed=1))
    assert image.std() > 1


def test_report_on_a_tiny_image(throughput, tmp_path, capsys):
    out = tmp_path / "report.md"
    code = throughput.main(["--device", "cpu", "--quick", "--side", "96", "--models", "dsd-unpaired-fast",
                            "--repeats", "1", "--out", str(out)])
    assert code == 0
    text = out.read_text()
    assert text.strip() in capsys.readouterr().out
    for words in ("| dsd-unpaired-fast | teacher | baseline |", "| dsd-unpaired-fast | student | baseline |",
                  "1.00x", "50k x 50k projected", "Command: `", "device: CPU"):
        assert words in text, words
    assert "failed" not in text


def test_slide_throughput_report(tmp_path, capsys):
    """``benchmarks/slide_throughput.py`` end to end on a 512² slide: one row per thread count, a projection."""
    spec = importlib.util.spec_from_file_location("slide_throughput", SCRIPT.parent / "slide_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "slide.md"
    code = module.main(["--device", "cpu", "--side", "512", "--chunk", "256", "--model", "dsd-unpaired-fast",
                        "--threads", "1,2", "--no-warmup", "--workdir", str(tmp_path), "--out", str(out)])
    assert code == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 256 |")]  # chunk, then threads 1, 2
    assert len(rows) == 2 and "1.00x" in rows[0]
    assert all(float(row.split("|")[-2].split()[0]) > 0 for row in rows)  # projected seconds
    assert list(tmp_path.iterdir()) == [out]  # the generated slide and stores are removed
