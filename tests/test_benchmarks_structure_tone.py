"""``benchmarks/structure_tone.py``: structure before and after tone matching, on the shipped sample tiles."""

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "structure_tone.py"


def _load():
    spec = importlib.util.spec_from_file_location("structure_tone", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_teacher_keeps_the_enhanced_edges_and_a_tone_change_is_forgiven(tiny_model, sample_dir):
    bench = _load()
    tiles = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(sample_dir.glob("darkfield_*.png"))]
    raw, matched = bench.scores(tiny_model, tiles, "teacher")
    assert raw > 0.98 and matched > 0.98  # the teacher's lightness is the enhanced image, whatever its weights

    class BentTone:  # a "model" whose output is the enhanced image with its tone curve bent (gamma 3)
        def stain(self, image, outputs):
            enhanced = tiny_model.stain(image, ["enhanced"])["enhanced"]
            return {"enhanced": enhanced, "student": np.repeat((enhanced**3)[..., None], 3, -1)}

    raw, matched = bench.scores(BentTone(), tiles, "student")
    assert matched > raw and matched > 0.98  # a monotone remapping of the gray: matching undoes it
