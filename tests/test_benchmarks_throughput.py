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
