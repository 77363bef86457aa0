"""Pixel size, unit and origin read from every kind of file we take, and carried into every output
(digital_stain.io.calibration, through read_calibration, open_source, the slide store and write_image)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr
from stores import write_ome_zarr

from digital_stain.io.calibration import Calibration, unit_name
from digital_stain.io.images import open_source, read_calibration, read_image, write_image


@pytest.fixture
def rgb(darkfield_tile) -> np.ndarray:
    return darkfield_tile[:96, :128]


def _close(found: Calibration | None, size, unit="micrometer", origin=(0.0, 0.0)):
    assert found is not None
    np.testing.assert_allclose(found.pixel_size, size, rtol=1e-6)
    np.testing.assert_allclose(found.origin, origin, rtol=1e-6, atol=1e-12)
    assert found.unit == unit


# -- the arithmetic ---------------------------------------------------------------------------------
def test_each_pyramid_level_doubles_the_size_and_moves_in_half_a_pixel_of_its_own():
    calibration = Calibration((0.25, 0.5), "micrometer", (10.0, 20.0))
    assert calibration.level(0) == ((0.25, 0.5), (10.0, 20.0))
    assert calibration.level(1) == ((0.5, 1.0), (10.125, 20.25))  # the mean of pixels 0 and 1 lies at 0.5
    assert calibration.level(3) == ((2.0, 4.0), (10.875, 21.75))  # of pixels 0..7 at 3.5
    assert Calibration((2.0, 2.0), "nanometer").micrometres() == (0.002, 0.002)
    assert Calibration((2.0, 2.0), None).micrometres() is None


@pytest.mark.parametrize("spelling", ["µm", "um", "micron", "MICROMETER", "μm", "\\u00B5m"])
def test_the_ways_files_spell_micrometre(spelling):
    assert unit_name(spelling) == "micrometer"
    assert unit_name("furlong") is None and unit_name(None) is None


# -- reading ------------------------------------------------------------------------------------------
def test_an_ome_tiff_s_physical_size(tmp_path, rgb):
    path = tmp_path / "slide.ome.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", ome=True,
                     metadata={"axes": "YXS", "PhysicalSizeX": 0.345, "PhysicalSizeXUnit": "µm",
                               "PhysicalSizeY": 345.0, "PhysicalSizeYUnit": "nm"})
    _close(read_calibration(path), (0.345, 0.345))
    _close(open_source(path).calibration, (0.345, 0.345))


def test_an_imagej_tiff_s_unit_and_resolution(tmp_path, rgb):
    path = tmp_path / "imagej.tif"
    tifffile.imwrite(path, rgb[..., 0], imagej=True, resolution=(1 / 0.5, 1 / 0.25), metadata={"unit": "micron"})
    _close(read_calibration(path), (0.25, 0.5))


@pytest.mark.parametrize(("unit", "per_unit"), [("CENTIMETER", 1e4), ("INCH", 25_400.0)])
def test_a_plain_tiff_s_resolution_tags(tmp_path, rgb, unit, per_unit):
    """How NDPI (centimetres) and most other writers (inches) state the pixel size."""
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", resolution=(per_unit / 0.5, per_unit / 0.5), resolutionunit=unit)
    _close(read_calibration(path), (0.5, 0.5))


def test_an_svs_description_s_microns_per_pixel(tmp_path, rgb):
    path = tmp_path / "slide.svs"
    tifffile.imwrite(path, rgb, photometric="rgb", tile=(64, 64),
                     description="Aperio Image Library v12.0.15\n128x96 -> 128x96|AppMag = 40|MPP = 0.2520")
    _close(read_calibration(path), (0.252, 0.252))


def test_files_that_state_no_size_have_none(tmp_path, rgb):
    tifffile.imwrite(tmp_path / "bare.tif", rgb, photometric="rgb")  # resolution unit "none"
    tifffile.imwrite(tmp_path / "zero.tif", rgb, photometric="rgb", resolution=(0, 1), resolutionunit="CENTIMETER")
    write_image(tmp_path / "sample.png", rgb)
    for name in ("bare.tif", "zero.tif", "sample.png"):
        assert read_calibration(tmp_path / name) is None, name
        assert open_source(tmp_path / name).calibration is None, name


@pytest.mark.parametrize("zarr_format", [2, 3], ids=["ngff-0.4", "ngff-0.5"])
def test_an_ome_zarr_s_scale_and_translation_dataset_then_multiscale_wide(tmp_path, rgb, zarr_format):
    path = tmp_path / "slide.ome.zarr"
    write_ome_zarr(path, [np.moveaxis(rgb, -1, 0)], "cyx", zarr_format=zarr_format, scale=(1.0, 0.25, 0.5),
                   translation=(0.0, 100.0, 200.0), units={"y": "micrometer", "x": "micrometer"},
                   wide_scale=(1.0, 2.0, 2.0))
    _close(read_calibration(path), (0.5, 1.0), origin=(200.0, 400.0))  # the wide scale applies to both
    _close(open_source(path).calibration, (0.5, 1.0), origin=(200.0, 400.0))


# -- writing ------------------------------------------------------------------------------------------
def test_a_written_tiff_carries_the_calibration_as_resolution_tags_and_ome_xml(tmp_path, rgb):
    calibration = Calibration((0.345, 0.345), "micrometer")
    for image, name in ((rgb, "rgb.tif"), (rgb[..., 0], "gray.tif"), (np.stack([rgb, rgb]), "stack.tif")):
        path = write_image(tmp_path / name, image, calibration=calibration)
        _close(read_calibration(path), (0.345, 0.345))
        np.testing.assert_array_equal(read_image(path), image)
        with tifffile.TiffFile(path) as tif:
            assert tif.is_ome and tif.pages.first.resolutionunit == 3, name  # centimetres, for ImageJ and QuPath
    nanometres = write_image(tmp_path / "nm.tif", rgb, calibration=Calibration((200.0, 200.0), "nanometer"))
    _close(read_calibration(nanometres), (0.2, 0.2))
    unitless = write_image(tmp_path / "unitless.tif", rgb, calibration=Calibration((2.0, 2.0), None))
    assert read_calibration(unitless) is None  # a size without a unit cannot go into a TIFF


def test_a_stained_store_has_the_input_s_scale_and_origin_at_every_level(tiny_model, tmp_path, darkfield_tile):
    from digital_stain.io.multiscale import read_pyramids
    from digital_stain.slide.run import stain_to_zarr

    slide = np.tile(darkfield_tile, (3, 3, 1))[:600, :700]
    source = tmp_path / "slide.ome.zarr"
    write_ome_zarr(source, [np.moveaxis(slide, -1, 0)], "cyx", scale=(1.0, 0.345, 0.345),
                   translation=(0.0, 1000.0, 2000.0), units={"y": "micrometer", "x": "micrometer"})
    output = tmp_path / "stained.ome.zarr"
    assert stain_to_zarr(tiny_model, source, output, ["enhanced", "student"], chunk=256, overlap=32).complete
    calibration = read_calibration(source)
    for pyramid in read_pyramids(output):
        entry = dict(zarr.open_group(str(output / pyramid.name), mode="r").attrs)["multiscales"][0]
        assert [axis.get("unit") for axis in entry["axes"] if axis["type"] == "space"] == ["micrometer"] * 2
        for level, dataset in enumerate(entry["datasets"]):
            scale, translation = (t[t["type"]] for t in dataset["coordinateTransformations"])
            expected_scale, expected_translation = calibration.level(level)
            np.testing.assert_allclose(scale[-2:], expected_scale)
            np.testing.assert_allclose(translation[-2:], expected_translation)
        # what napari is given: level 0 lies exactly on the dark-field
        np.testing.assert_allclose(pyramid.scale, (0.345, 0.345))
        np.testing.assert_allclose(pyramid.translate, (1000.0, 2000.0))


def test_an_svs_slide_stains_from_the_command_line_with_its_pixel_size(capsys, tiny_model_file, rgb, tmp_path):
    from digital_stain.cli import main

    slide = tmp_path / "slide.svs"
    tifffile.imwrite(slide, np.tile(rgb, (3, 2, 1)), photometric="rgb", tile=(64, 64), compression="jpeg",
                     description="Aperio Image Library v12.0.15\n256x288 -> 256x288|AppMag = 40|MPP = 0.2520")
    out = tmp_path / "out"
    assert main(["stain", str(slide), "-o", str(out), "--model", str(tiny_model_file), "--format", "tif",
                 "--device", "cpu", "--precision", "fp32", "-q"]) == 0, capsys.readouterr().err
    _close(read_calibration(out / "student" / "slide.tif"), (0.252, 0.252))
    store = tmp_path / "slide.ome.zarr"
    assert main(["stain", str(slide), "-o", str(store), "--model", str(tiny_model_file), "--outputs", "enhanced",
                 "--chunk", "256", "--device", "cpu", "--precision", "fp32", "-q"]) == 0, capsys.readouterr().err
    _close(read_calibration(store), (0.252, 0.252))


def test_a_missing_file_is_said_to_be_missing(tmp_path):
    from digital_stain.core.arrays import InputError

    with pytest.raises(InputError, match="does not exist"):
        read_calibration(tmp_path / "nowhere.tif")
