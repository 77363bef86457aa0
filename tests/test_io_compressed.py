"""Compressed TIFFs (what Pillow, ImageJ and slide scanners write) read eagerly, lazily and as whole slides,
and a compression we cannot decode refused by name (digital_stain.io.images, through tifffile and imagecodecs)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from digital_stain.core.arrays import InputError
from digital_stain.io.images import open_source, read_image

LOSSLESS = ["lzw", "zlib", "zstd", "packbits", "jpeg2000"]  # zlib is TIFF's Deflate (compression 8)


@pytest.fixture
def rgb(darkfield_tile) -> np.ndarray:
    """A real dark-field tile, brightened so that lossy codecs have something to lose."""
    return np.clip(darkfield_tile.astype(np.int32) * 8, 0, 255).astype(np.uint8)[:200, :232]


def _write(path, rgb, compression, **options):
    extra = {"compressionargs": {"level": 0}} if compression == "jpeg2000" else {}  # level 0: lossless
    tifffile.imwrite(path, rgb, photometric="rgb", compression=compression, **extra, **options)
    return path


@pytest.mark.parametrize("compression", LOSSLESS)
@pytest.mark.parametrize("layout", [{}, {"tile": (64, 64)}], ids=["strips", "tiles"])
def test_lossless_compressed_tiffs_read_exactly_eagerly_and_lazily(tmp_path, rgb, compression, layout):
    path = _write(tmp_path / f"{compression}.tif", rgb, compression, **layout)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].compression.name.lower().startswith(
            {"zlib": "adobe_deflate", "jpeg2000": "jpeg2000"}.get(compression, compression))
    np.testing.assert_array_equal(read_image(path), rgb)
    np.testing.assert_array_equal(open_source(path).array.compute(), rgb)


@pytest.mark.parametrize("layout", [{}, {"tile": (64, 64)}], ids=["strips", "tiles"])
def test_jpeg_tiffs_read_close_to_the_original(tmp_path, rgb, layout):
    path = _write(tmp_path / "jpeg.tif", rgb, "jpeg", **layout)
    eager, lazy = read_image(path), open_source(path).array.compute()
    assert eager.shape == rgb.shape and eager.dtype == np.uint8
    np.testing.assert_array_equal(eager, lazy)
    # JPEG's loss, not a misread: about what the codec's own round trip at tifffile's quality (95) loses
    import imagecodecs

    codec_loss = np.abs(imagecodecs.jpeg_decode(imagecodecs.jpeg_encode(rgb, level=95)).astype(int) - rgb).mean()
    assert np.abs(eager.astype(int) - rgb).mean() < 1.25 * codec_loss + 0.5


def test_a_tiled_jpeg_pyramid_like_an_svs_slide_stains_whole_slide(tiny_model, tmp_path, rgb):
    """Tiled JPEG with reduced-resolution levels (how SVS and NDPI store a slide), through stain_to_zarr."""
    from digital_stain.slide.run import stain_to_zarr

    slide = np.tile(rgb, (2, 2, 1))  # 400 x 464
    path = tmp_path / "slide.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(slide, photometric="rgb", compression="jpeg", tile=(128, 128), subifds=1)
        tif.write(slide[::2, ::2], photometric="rgb", compression="jpeg", tile=(128, 128), subfiletype=1)
    result = stain_to_zarr(tiny_model, path, tmp_path / "slide.ome.zarr", ["enhanced"], chunk=256, overlap=32)
    assert result.complete
    import zarr

    enhanced = np.asarray(zarr.open_group(tmp_path / "slide.ome.zarr", mode="r")["enhanced/0"])
    assert enhanced.shape[-2:] == (400, 464) and enhanced.std() > 1


def _unknown_compression(tmp_path, rgb):
    path = tmp_path / "odd.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", compression="zlib")
    with tifffile.TiffFile(path, mode="r+") as tif:
        tif.pages[0].tags["Compression"].overwrite(50123)  # a code no codec knows
    return path


def test_a_compression_we_cannot_decode_is_refused_by_name_eagerly_and_lazily(tmp_path, rgb):
    path = _unknown_compression(tmp_path, rgb)
    for read in (read_image, open_source):
        with pytest.raises(InputError, match="cannot be decoded here") as info:
            read(path)
        assert str(path) in str(info.value) and "OME-Zarr" in str(info.value)


def test_the_command_line_says_so_and_exits_2(tmp_path, rgb, tiny_model_file, capsys):
    from digital_stain.cli import main

    path = _unknown_compression(tmp_path, rgb)
    for command in (["stain", str(path), "--model", str(tiny_model_file), "--output", str(tmp_path / "out")],
                    ["stain", str(path), "--model", str(tiny_model_file), "--output", str(tmp_path / "s.ome.zarr")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "cannot be decoded here" in err and "Traceback" not in err
