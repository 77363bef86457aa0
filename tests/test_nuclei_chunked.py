"""digital_stain.nuclei.chunked: chunk-by-chunk labels agree with one another and with the whole image."""

from __future__ import annotations

import numpy as np
import pytest

from digital_stain.io.images import read_image
from digital_stain.nuclei.chunked import MARGIN, global_threshold, label_dtype, segment_block
from digital_stain.nuclei.segment import NucleiSettings


@pytest.fixture
def mosaic(sample_dir) -> np.ndarray:
    """512 x 768 px of real H&E: the three sample tiles, and below them the same turned half a turn."""
    tiles = [read_image(sample_dir / f"stained_{n}.png").astype(np.float32) / 255 for n in ("0_0", "0_5", "1_3")]
    row = np.concatenate(tiles, axis=1)
    return np.concatenate([row, row[::-1, ::-1]], axis=0)


def _chunked(image, chunk, settings, threshold):
    height, width = image.shape[:2]
    labels, count = np.zeros((height, width), label_dtype((height, width))), 0
    for y in range(0, height, chunk):
        for x in range(0, width, chunk):
            top, left = max(y - MARGIN, 0), max(x - MARGIN, 0)
            bottom, right = min(y + chunk + MARGIN, height), min(x + chunk + MARGIN, width)
            core = (y - top, min(y + chunk, height) - top, x - left, min(x + chunk, width) - left)
            block, own = segment_block(image[top:bottom, left:right], (top, left), core, (height, width), settings,
                                       threshold)
            labels[y : y + chunk, x : x + chunk] = block
            count += own
    return labels, count


@pytest.mark.parametrize("chunk", [128, 200])
def test_chunks_agree_with_the_whole_image_and_count_each_nucleus_once(mosaic, chunk):
    settings = NucleiSettings()
    threshold = global_threshold([mosaic], settings)
    whole, count = segment_block(mosaic, (0, 0), (0, 512, 0, 768), (512, 768), settings, threshold)
    assert count > 300 and len(np.unique(whole)) - 1 == count
    labels, counted = _chunked(mosaic, chunk, settings, threshold)
    assert abs(counted - count) <= 2  # by centroid: a nucleus on a border is counted by one chunk (nearly always)
    assert np.mean(labels == whole) > 0.995  # the same labels, names included, but for a few border pixels
    assert len(np.unique(labels)) - 1 <= count + 5  # a nucleus across a border keeps one name, nearly always


def test_a_label_is_the_centroid_s_place_in_the_image(mosaic):
    settings = NucleiSettings()
    labels, _ = segment_block(mosaic, (0, 0), (0, 512, 0, 768), (512, 768), settings,
                              global_threshold([mosaic], settings))
    name = int(np.unique(labels)[1])
    ys, xs = np.nonzero(labels == name)
    assert name == int(np.floor(ys.mean() + 0.5)) * 768 + int(np.floor(xs.mean() + 0.5)) + 1


def test_a_threshold_from_crops_and_a_blank_image():
    settings = NucleiSettings()
    assert global_threshold([np.full((32, 32, 3), 0.8, np.float32)], settings) == float("inf")
    labels, count = segment_block(np.full((32, 32, 3), 0.8, np.float32), (0, 0), (0, 32, 0, 32), (32, 32), settings,
                                  float("inf"))
    assert count == 0 and not labels.any()
    assert global_threshold([], NucleiSettings(threshold=0.1)) == 0.1
    assert label_dtype((65536, 65535)) == np.uint32 and label_dtype((65536, 65536)) == np.uint64


def test_a_large_plane_is_stained_and_labelled_chunk_by_chunk(tiny_model, darkfield_tile):
    import threading

    import dask.array as da

    from digital_stain.nuclei.chunked import find_nuclei_chunked
    from digital_stain.stain.settings import StainSettings
    from digital_stain.stain.tiling import Cancelled

    plane = np.concatenate([darkfield_tile, darkfield_tile[:, ::-1]], axis=1)  # 256 x 512: two chunks of 256
    settings = StainSettings(chunk=256, device="cpu", precision="fp32")
    seen = []
    labels, count, threshold, adaptation = find_nuclei_chunked(
        tiny_model, da.from_array(plane, chunks=(256, 256, 3)), stain="student", settings=settings, adapt="off",
        progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 2), (2, 2)] and labels.shape == (256, 512) and adaptation.mode == "off"
    stained = tiny_model.stain(plane, ["student"], adapt="off", precision="fp32")["student"]
    whole, whole_count = segment_block(stained, (0, 0), (0, 256, 0, 512), (256, 512), NucleiSettings(), threshold)
    assert np.mean(labels == whole) > 0.98 and abs(count - whole_count) <= 2  # the chunked stain is within 1/255
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        find_nuclei_chunked(tiny_model, plane, settings=settings, adapt="off", stop=stop)
