"""``benchmarks/nuclei.py`` on a miniature: the sample H&E tiles with masks made by the segmenter itself, so the
ceiling row must score exactly 1 and every other row less."""

import re

import numpy as np
import tifffile

from benchmark_scripts import load
from digital_stain.io.images import read_image
from digital_stain.nuclei.segment import segment_nuclei


def test_the_table_prints_with_a_perfect_ceiling_on_self_made_masks(monkeypatch, capsys, tmp_path, hne_dir,
                                                                    darkfield_dir, tiny_model):
    from digital_stain.stain.model import StainModel
    from digital_stain.train.nuclei import NucleiConfig, train_segmenter

    bench = load("nuclei", monkeypatch)
    (tmp_path / "data" / "masks").mkdir(parents=True)
    (tmp_path / "data" / "stained").symlink_to(hne_dir)
    images, masks, names = [], [], []
    for path in sorted(hne_dir.glob("*.png")):
        images.append(read_image(path))
        masks.append(segment_nuclei(images[-1]))
        names.append(path.name)
        tifffile.imwrite(tmp_path / "data" / "masks" / f"{path.stem}.tif", masks[-1])
    net, _ = train_segmenter(tiny_model, images, masks, names, NucleiConfig(steps=2, batch=2, crop=64, width=4,
                                                                            depth=2, translations=1))
    StainModel(tiny_model.enhancer, tiny_model.teacher, None, {"name": "tiny tutor"}, segmenter=net).save(
        tmp_path / "tutor.safetensors")
    assert bench.main(["--data", str(tmp_path / "data"), "--models", "dsd-unpaired-fast", "--seeds", "1",
                       "--scale", "1", "--tint-from", str(darkfield_dir),
                       "--tutorship", str(tmp_path / "tutor.safetensors")]) == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^\| ([^|]+?) \| ([0-9.]+) \| [0-9.]+ \|", out, re.M))
    assert rows["ceiling: segmenter on the real H&E"] == "1.000"
    others = [float(value) for name, value in rows.items() if not name.startswith("ceiling")]
    assert len(others) == 4 and all(0 <= value < 1 for value in others), out  # floor, student, teacher, tutorship
    assert "tutorship: tiny tutor" in rows
    assert "3 H&E image(s)" in out and "scale 1.0" in out
    assert np.isfinite(others).all()


def test_pseudo_masks_are_the_segmenter_s_nuclei_beside_links_to_the_tiles(monkeypatch, capsys, tmp_path, hne_dir):
    bench = load("nuclei_pseudo_masks", monkeypatch)
    out = tmp_path / "pseudo"
    assert bench.main(["--output", str(out), "--stained", str(hne_dir), "--every", "2"]) == 0
    tiles = sorted(hne_dir.glob("*.png"))[::2]
    assert sorted(p.name for p in (out / "stained").iterdir()) == [p.name for p in tiles]
    for tile in tiles:
        np.testing.assert_array_equal(tifffile.imread(out / "masks" / f"{tile.stem}.tif"),
                                      segment_nuclei(read_image(tile)))
    assert bench.main(["--output", str(out), "--stained", str(hne_dir)]) == 2  # never into an existing folder
