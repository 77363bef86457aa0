"""digital_stain.nuclei.lazy: labels segmented chunk by chunk as a viewer asks for them, each chunk once."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from digital_stain.nuclei.lazy import LazyNuclei
from digital_stain.stain.model import StainModel
from digital_stain.stain.settings import StainSettings
from digital_stain.stain.tiling import Cancelled

SETTINGS = StainSettings(chunk=256, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def model():
    return StainModel.load("dsd-unpaired-fast")  # a trained stain, so that there are nuclei to find


@pytest.fixture
def plane(darkfield_tile) -> np.ndarray:
    """512 x 512 px of real dark-field (the tile, mirrored into four): four chunks of 256."""
    top = np.concatenate([darkfield_tile, darkfield_tile[:, ::-1]], axis=1)
    return np.concatenate([top, top[::-1]], axis=0)


def test_reads_never_segment_and_the_sweep_takes_the_viewed_chunk_first(model, plane):
    found = LazyNuclei(model, plane, settings=SETTINGS, adapt="off")
    assert (found.total, found.done) == (4, 0)
    assert not found.read(0, 512, 0, 512, step=2).any() and found.done == 0  # zoomed out: shows, asks nothing
    assert not found.read(300, 400, 300, 400).any() and found.done == 0  # zoomed in on chunk (1, 1): asks
    firsts = []

    def progress(done, total):
        if done == 1:
            firsts.append((found.read(256, 512, 256, 512).any(), found.read(0, 256, 0, 256).any()))

    count = found.sweep(progress=progress)
    assert firsts == [(True, False)]  # the viewed chunk was segmented first, the others after
    assert count > 50 and found.count == count and found.done == 4
    assert found._stain is None and np.asarray(found.levels()[0]).any()  # stained chunks let go; labels kept


def test_swept_levels_are_the_labels_and_agree_with_the_chunked_call(model, plane):
    from digital_stain.nuclei.chunked import find_nuclei_chunked

    odd = plane[:509, :383]  # sides that do not halve evenly
    found = LazyNuclei(model, odd, settings=SETTINGS, adapt="off")
    count = found.sweep()
    labels = found.labels()
    levels = found.levels(min_side=128)
    assert [level.shape for level in levels] == [(509, 383), (255, 192), (128, 96)]
    for step, level in zip((1, 2, 4), levels):
        assert np.array_equal(np.asarray(level), labels[::step, ::step])
    assert np.array_equal(np.asarray(levels[0][100:300, 50:333]), labels[100:300, 50:333])  # a region across chunks
    expected, expected_count, _, _ = find_nuclei_chunked(model, odd, settings=SETTINGS, adapt="off")
    assert np.array_equal(labels, expected) and count == expected_count and labels.dtype == np.uint32


def test_a_stopped_sweep_keeps_what_it_segmented_and_goes_on_from_there(model, plane):
    found = LazyNuclei(model, plane, settings=SETTINGS, adapt="off")
    stop = threading.Event()
    with pytest.raises(Cancelled):
        found.sweep(progress=lambda done, total: stop.set() if done == 2 else None, stop=stop)
    assert found.done == 2 and np.asarray(found.levels()[0]).any()  # still shown
    partial = found.count
    assert found.sweep() >= partial and found.done == 4
    straight = LazyNuclei(model, plane, settings=SETTINGS, adapt="off")
    assert straight.sweep() == found.count and np.array_equal(straight.labels(), found.labels())


def test_tutorship_chunk_by_chunk_finds_what_the_segmenter_finds_in_the_whole_plane(tutored_model, plane):
    from digital_stain.nuclei.find import find_nuclei

    found = LazyNuclei(tutored_model, plane, settings=SETTINGS, adapt="off")  # auto: the model has a segmenter
    assert (found.method, found.source, found.threshold) == ("tutorship", "enhanced", None)
    count = found.sweep()
    whole = find_nuclei(tutored_model, plane, adapt="off", settings=SETTINGS)
    assert whole.method == "tutorship" and whole.count > 20
    labels = found.labels()
    assert np.mean((labels > 0) == (whole.labels > 0)) > 0.999  # the same nuclei, cut into chunks of 256
    assert abs(count - whole.count) <= 2
    adapted = LazyNuclei(tutored_model, plane, method="adaptation", settings=SETTINGS, adapt="off")
    assert adapted.method == "adaptation" and adapted.source == "teacher" and adapted.threshold is not None
