"""Our OME-Zarr against other people's code: ome-zarr-models validates every group we write, ome-zarr-py
reads our stores with their placement, and stores ome-zarr-py writes (NGFF 0.4 and 0.5, pyramids) stain
as their arrays do."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from ome_zarr.format import FormatV04, FormatV05
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from ome_zarr.writer import write_image
from ome_zarr_models.v04 import Image as ImageV04
from ome_zarr_models.v05 import Image as ImageV05

from digital_stain.io.calibration import Calibration
from digital_stain.io.images import read_calibration
from digital_stain.slide.export import save_stains
from digital_stain.slide.run import stain_to_zarr

SMALL = {"chunk": 256, "overlap": 32, "precision": "fp32", "device": "cpu"}


@pytest.fixture
def slide(darkfield_tile) -> np.ndarray:
    return np.ascontiguousarray(np.tile(darkfield_tile, (3, 3, 1))[:600, :700])


def _ours(tmp_path, tiny_model, slide, ngff: str = "0.4") -> list:
    """A store from each of our writers: the whole-slide run (from an OME-Zarr with a placement) and save_stains."""
    source = tmp_path / "slide.ome.zarr"
    write_image(np.moveaxis(slide, -1, 0), zarr.open_group(str(source), mode="w", zarr_format=2), axes="cyx",
                fmt=FormatV04(), scale_factors=(2,), scale={"y": 0.345, "x": 0.345},
                axes_units={"y": "micrometer", "x": "micrometer"})
    stained = tmp_path / "stained.ome.zarr"
    assert stain_to_zarr(tiny_model, source, stained, ["enhanced", "teacher", "student"], ngff=ngff, **SMALL).complete
    saved = save_stains(tmp_path / "saved.ome.zarr", {"student": np.full((300, 400, 3), 0.5, np.float32)},
                        calibration=Calibration((0.25, 0.25), "micrometer", (5.0, 7.0)), chunk=256, ngff=ngff)
    return [stained, saved]


@pytest.mark.parametrize(("ngff", "zarr_format", "image"), [("0.4", 2, ImageV04), ("0.5", 3, ImageV05)],
                         ids=["ngff-0.4", "ngff-0.5"])
def test_every_group_we_write_is_valid_ngff(tiny_model, slide, tmp_path, ngff, zarr_format, image):
    for store in _ours(tmp_path, tiny_model, slide, ngff):
        root = zarr.open_group(str(store), mode="r")
        assert root.metadata.zarr_format == zarr_format
        groups = [root] + [root[name] for name in root.group_keys()]
        for group in groups:
            parsed = image.from_zarr(group)  # raises on anything this NGFF version does not allow
            assert len(parsed.ome_attributes.multiscales[0].datasets) >= 1, group.path


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_ome_zarr_py_reads_our_stores_with_their_placement(tiny_model, slide, tmp_path, ngff):
    for store in _ours(tmp_path, tiny_model, slide, ngff):
        calibration = read_calibration(store)
        for name in [n for n in zarr.open_group(str(store), mode="r").group_keys()]:
            (node, *_) = Reader(parse_url(str(store / name)))()
            ours = zarr.open_group(str(store / name), mode="r")
            assert [level.shape for level in node.data] == [ours[str(i)].shape for i in range(len(node.data))]
            for level, transforms in enumerate(node.metadata["coordinateTransformations"]):
                scale, translation = (t[t["type"]] for t in transforms)
                np.testing.assert_allclose(scale[-2:], calibration.level(level)[0])
                np.testing.assert_allclose(translation[-2:], calibration.level(level)[1])


@pytest.mark.parametrize(("fmt", "zarr_format"), [(FormatV04(), 2), (FormatV05(), 3)], ids=["ngff-0.4", "ngff-0.5"])
def test_a_slide_ome_zarr_py_wrote_stains_as_its_array_does(tiny_model, slide, tmp_path, fmt, zarr_format):
    source = tmp_path / "theirs.ome.zarr"
    write_image(np.moveaxis(slide, -1, 0), zarr.open_group(str(source), mode="w", zarr_format=zarr_format),
                axes="cyx", fmt=fmt, scale_factors=(2, 4), scale={"y": 0.5, "x": 0.5},
                axes_units={"y": "micrometer", "x": "micrometer"})
    from_store, from_array = tmp_path / "from-store.ome.zarr", tmp_path / "from-array.ome.zarr"
    stain_to_zarr(tiny_model, source, from_store, ["student"], **SMALL)
    stain_to_zarr(tiny_model, slide, from_array, ["student"], **SMALL)
    stored = zarr.open_group(str(from_store), mode="r")["student"]["0"][:]
    np.testing.assert_array_equal(stored, zarr.open_group(str(from_array), mode="r")["student"]["0"][:])
    assert np.allclose(read_calibration(from_store).pixel_size, 0.5)  # its pixel size came along
