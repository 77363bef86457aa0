"""Tiled, blended inference: tile layout, blending weights, padding, and seam-free results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from digital_stain.core.arrays import to_unit_rgb
from digital_stain.core.color import luma
from digital_stain.core.enhance import on_input_grid
from digital_stain.stain.tiling import (
    fitted_tile,
    pad_image,
    ramp,
    spread_tiles,
    stats_sample,
    tile_layout,
    tile_starts,
    tiled_apply,
)


# -- tile_starts ---------------------------------------------------------
@pytest.mark.parametrize(
    "length, tile, overlap",
    [(768, 256, 96), (1000, 256, 64), (257, 256, 0), (300, 128, 127), (513, 512, 64), (4096, 512, 64), (50, 16, 8)],
)
def test_tile_starts_cover_with_equal_tiles_and_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts == sorted(set(starts)), "starts are sorted and distinct"
    assert starts[0] == 0
    assert starts[-1] + tile == length, "last tile ends exactly at the end (equal tiles, no overhang)"
    assert all(0 <= s <= length - tile for s in starts), "every tile lies inside [0, length)"
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()
    for a, b in zip(starts, starts[1:]):
        assert a + tile - b >= overlap, f"neighbours {a}, {b} overlap by less than {overlap}"


@pytest.mark.parametrize("length", [1, 100, 256])
def test_tile_starts_single_tile_when_tile_covers_length(length):
    assert tile_starts(length, 256, 64) == [0]


def test_tile_starts_known_layout():
    assert tile_starts(768, 256, 96) == [0, 160, 320, 480, 512]


# -- ramp ----------------------------------------------------------------
def test_ramp_interior_tile_fades_at_both_edges():
    w = ramp(256, 96)
    assert w.shape == (256,) and w.dtype == np.float32
    assert np.all((w >= 0) & (w <= 1))
    np.testing.assert_allclose(w, w[::-1], atol=1e-6)  # symmetric
    assert np.all(w[96:160] == 1.0), "full weight away from the overlaps"
    assert np.all(w[:24] < 1e-6), "outer quarter of the overlap gets (almost) no weight"
    assert np.all(np.diff(w[:96]) >= 0), "weights rise monotonically into the tile"


def test_ramp_complementary_over_overlap():
    # Two neighbours overlapping by exactly `overlap`: weights sum to 1 in the shared strip.
    overlap = 64
    w = ramp(192, overlap)
    np.testing.assert_allclose(w[-overlap:] + w[:overlap], 1.0, atol=1e-6)


def test_ramp_border_edges_keep_full_weight():
    assert np.all(ramp(128, 32, lead=False, trail=False) == 1.0)
    w = ramp(128, 32, lead=False, trail=True)
    assert np.all(w[:96] == 1.0) and w[-1] < 1e-6
    w = ramp(128, 32, lead=True, trail=False)
    assert w[0] < 1e-6 and np.all(w[32:] == 1.0)
    assert np.all(ramp(64, 0) == 1.0)


# -- pad_image -----------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 250, 301), (1, 8, 8), (4, 17, 5), (2, 1, 1), (3, 3, 40), (1, 64, 64)])
@pytest.mark.parametrize("multiple, min_size", [(4, 0), (8, 0), (16, 32)])
def test_pad_image_pads_to_multiples_and_never_crops(shape, multiple, min_size):
    rng = np.random.default_rng(0)
    image = rng.random(shape, dtype=np.float32)
    padded, (h, w) = pad_image(image, multiple, min_size)
    assert (h, w) == shape[1:]
    ph, pw = padded.shape[1:]
    assert padded.shape[0] == shape[0]
    assert ph % multiple == 0 and pw % multiple == 0
    assert ph >= max(h, min_size) and pw >= max(w, min_size)
    assert ph - max(h, min_size) < multiple and pw - max(w, min_size) < multiple, "pads no more than needed"
    np.testing.assert_array_equal(padded[:, :h, :w], image)  # original kept, top-left


def test_pad_image_reflects():
    image = np.arange(6 * 7, dtype=np.float32).reshape(1, 6, 7)
    padded, _ = pad_image(image, 4)
    assert padded.shape == (1, 8, 8)
    np.testing.assert_array_equal(padded[0, 6], image[0, 4, list(range(7)) + [5]])  # row 6 mirrors row 4
    np.testing.assert_array_equal(padded[0, :6, 7], image[0, :, 5])


def test_pad_image_noop_on_multiples():
    image = np.zeros((3, 32, 48), np.float32)
    padded, size = pad_image(image, 16)
    assert padded is image and size == (32, 48)


# -- tiled_apply on a plain function --------------------------------------
def test_tiled_apply_pointwise_fn_is_exact():
    """A per-pixel function is reproduced exactly by any tiling (weights are normalised)."""
    rng = np.random.default_rng(1)
    image = rng.random((2, 203, 157), dtype=np.float32)
    calls = []

    def fn(x):
        calls.append(tuple(x.shape))
        return torch.cat([x[:, :1] * 2.0 + x[:, 1:], x[:, 1:] ** 2], dim=1)

    out = tiled_apply(fn, image, out_channels=2, tile=64, overlap=16, multiple=8)
    assert out.shape == (2, 203, 157) and out.dtype == np.float32
    expected = np.stack([image[0] * 2 + image[1], image[1] ** 2])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert len(set(calls)) == 1 and calls[0] == (1, 2, 64, 64), "equal tiles of the rounded tile size"
    assert len(calls) == len(tile_starts(208, 64, 16)) * len(tile_starts(160, 64, 16))


def test_tiled_apply_min_size_pads_small_images():
    image = np.random.default_rng(5).random((1, 9, 13), dtype=np.float32)
    shapes = []

    def fn(x):
        shapes.append(tuple(x.shape[-2:]))
        return x * 3.0

    out = tiled_apply(fn, image, out_channels=1, tile=8, overlap=4, multiple=4, min_size=16)
    assert out.shape == (1, 9, 13)
    np.testing.assert_allclose(out, image * 3.0, rtol=1e-6)
    assert shapes and all(h >= 16 and w >= 16 and h % 4 == 0 and w % 4 == 0 for h, w in shapes)


# -- stats_sample ----------------------------------------------------------
def test_stats_sample_whole_image_when_small():
    rng = np.random.default_rng(2)
    image = rng.random((4, 250, 301), dtype=np.float32)
    sample = stats_sample(image, 4, max_pixels=252 * 304, crop=128)
    padded, _ = pad_image(image, 4)
    assert sample.shape == (1, 4, 252, 304)
    np.testing.assert_array_equal(sample[0], padded)


def test_stats_sample_grid_crops_when_large():
    rng = np.random.default_rng(3)
    image = rng.random((4, 300, 400), dtype=np.float32)
    crop, max_pixels = 64, 9 * 64 * 64
    sample = stats_sample(image, 4, max_pixels=max_pixels, crop=crop)
    assert sample.shape == (9, 4, crop, crop)
    assert sample.shape[0] * crop * crop <= max_pixels
    # crops are centred in a regular 3x3 grid of equal bands spread over the whole image
    ys = [int((i + 0.5) * 300 / 3 - crop / 2) for i in range(3)]
    xs = [int((i + 0.5) * 400 / 3 - crop / 2) for i in range(3)]
    for i, (y, x) in enumerate((y, x) for y in ys for x in xs):
        np.testing.assert_array_equal(sample[i], image[:, y : y + crop, x : x + crop])


def test_stats_sample_single_crop_is_centred_not_top_left():
    """With room for one crop only, it must stand for the image: centred, not the top-left corner."""
    image = np.zeros((1, 3000, 3000), np.float32)
    image[:, 1500:, 1500:] = 1.0  # bottom-right quarter bright: the true mean is 0.25
    sample = stats_sample(image, 4, max_pixels=2048 * 2048, crop=2048)
    assert sample.shape == (1, 1, 2048, 2048)
    assert abs(float(sample.mean()) - 0.25) < 0.05


# -- the key test: tiled student == one pass, no seams --------------------
def _border_mask(length: int, starts: list[int], tile: int, width: int = 2) -> np.ndarray:
    """Mask over the ``length - 1`` pixel-to-pixel steps that lie at (or next to) a tile edge."""
    mask = np.zeros(length - 1, bool)
    for edge in {e for s in starts for e in (s, s + tile) if 0 < e < length}:
        mask[max(edge - width, 0) : edge + width - 1] = True  # steps edge-w .. edge+w-2 (straddling the edge)
    return mask


def _step_energy(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean |d/dy| per row step and mean |d/dx| per column step of a (Y, X, C) image."""
    gy = np.abs(np.diff(image, axis=0)).mean(axis=(1, 2))
    gx = np.abs(np.diff(image, axis=1)).mean(axis=(0, 2))
    return gy, gx


def seam_ratio(difference: np.ndarray, starts: list[int], tile: int) -> float:
    """Gradient energy of a difference image at tile edges relative to elsewhere (max of y and x)."""
    ratios = []
    for g in _step_energy(difference):
        mask = _border_mask(g.size + 1, starts, tile)
        ratios.append(g[mask].mean() / max(g[~mask].mean(), 1e-12))
    return max(ratios)


def border_gradient_change(tiled: np.ndarray, one_pass: np.ndarray, starts: list[int], tile: int) -> float:
    """Largest relative change of the output's gradient at any tile edge, tiled vs one pass."""
    change = 0.0
    for gt, go in zip(_step_energy(tiled), _step_energy(one_pass)):
        mask = _border_mask(gt.size + 1, starts, tile)
        change = max(change, float(np.max(np.abs(gt[mask] / go[mask] - 1.0))))
    return change


def test_seam_detector_sees_a_seam():
    """Sanity of the detector itself: a 0.01 colour step at a tile edge is flagged."""
    rng = np.random.default_rng(4)
    reference = rng.random((768, 768, 3), dtype=np.float32) * 0.5
    starts = tile_starts(768, 256, 96)
    noisy = reference + rng.normal(0, 1e-6, reference.shape).astype(np.float32)
    assert seam_ratio(noisy - reference, starts, 256) < 1.5
    seamed = reference.copy()
    seamed[:, 256:] += 0.01
    assert seam_ratio(seamed - reference, starts, 256) > 10


def test_tiled_student_equals_one_pass_without_seams(tiny_model, darkfield_tile):
    """Tiles normalised with the whole image's statistics, blended: the one-pass stain, no seams."""
    from digital_stain.stain.kernel import StainKernel, to_yxc
    from digital_stain.stain.settings import StainSettings

    image = np.tile(darkfield_tile, (3, 3, 1))  # 768 x 768, a 3 x 3 tiling of the sample
    assert image.shape == (768, 768, 3)
    tile, overlap = 256, 96
    net = tiny_model.student

    one_pass = tiny_model.stain(image, ["student"], overlap=overlap, precision="fp32")["student"]
    kernel = StainKernel(tiny_model, tiny_model.preparation(image), StainSettings(precision="fp32"), "cpu")
    student_in = kernel.prep.plane(image, student=True)[1]
    statistics = kernel.statistics(pad_image(student_in, net.size_multiple, net.min_size)[0][None])
    calls = []

    def frozen(x):
        calls.append(x.shape[0])
        return kernel.runner("student", statistics)(x)

    tiled = to_yxc(tiled_apply(frozen, student_in, out_channels=3, tile=tile, overlap=overlap,
                               multiple=net.size_multiple, min_size=net.min_size), clip=True)
    th, tw, boxes = tile_layout(768, 768, tile, overlap, net.size_multiple, net.min_size)
    assert len(calls) == len(boxes) == 25, "the student must really be tiled for the comparison to mean anything"
    assert tiled.shape == one_pass.shape == (768, 768, 3)
    assert tiled.dtype == np.float32
    assert one_pass.std() > 0.01, "the random student must produce structure for the comparison to mean anything"

    frozen_diff = float(np.abs(tiled - one_pass).max())
    assert frozen_diff < 2e-3, f"tiled result differs from one pass by {frozen_diff}"

    starts = sorted({y for y, _ in boxes})
    assert th == tw and len(starts) == 5  # really tiled: 5 x 5 tiles
    ratio = seam_ratio(tiled - one_pass, starts, th)
    assert ratio < 1.5, f"difference image has {ratio:.2f}x more gradient at tile edges than elsewhere"
    change = border_gradient_change(tiled, one_pass, starts, th)
    assert change < 0.10, f"output gradient at a tile edge changed by {100 * change:.1f}% vs one pass"

    # Would the comparison catch un-normalised tiles? Run the same tiling with the
    # student's instance norm NOT frozen (each tile normalised by its own statistics).
    model = tiny_model
    rgb = to_unit_rgb(image)
    gray = np.clip(on_input_grid(luma(rgb), image.dtype), 0.0, 1.0)
    student_in = np.concatenate([rgb.transpose(2, 0, 1), model.enhancer.enhance_gray(gray)[None]], axis=0) * 2 - 1

    def instance_mode(x: torch.Tensor) -> torch.Tensor:
        out = model.student(x)  # no statistics given: every tile normalised by its own
        assert x.shape[0] == 1  # so recording (pooled over the batch) is that tile's own statistics
        torch.testing.assert_close(out, model.student(x, record=[]), atol=1e-6, rtol=1e-6)
        return (out + 1.0) / 2.0

    def run(tile_size):
        out = tiled_apply(instance_mode, student_in, out_channels=3, tile=tile_size, overlap=overlap,
                          multiple=model.student.size_multiple, min_size=model.student.min_size)
        return np.clip(out, 0.0, 1.0).transpose(1, 2, 0)

    # one pass in instance mode is the one-pass stain (the whole image is one "tile")
    np.testing.assert_allclose(run(1024), one_pass, atol=1e-5)
    unfrozen_diff = float(np.abs(run(tile) - one_pass).max())
    assert unfrozen_diff > 10 * max(frozen_diff, 1e-6), (
        f"unfrozen tiling differs by {unfrozen_diff}, frozen by {frozen_diff}: the check could not tell them apart"
    )
    assert unfrozen_diff > 2e-3, "the max-difference test above would have failed for unfrozen statistics"


def test_tiled_teacher_equals_one_pass(tiny_model, darkfield_tile):
    """The teacher (batch norm, eval mode) needs no statistics; tiling still must not change it."""
    image = np.tile(darkfield_tile, (2, 2, 1))[:300, :200]
    one_pass = tiny_model.stain(image, ["teacher"], tile=512, precision="fp32")["teacher"]
    tiled = tiny_model.stain(image, ["teacher"], tile=128, overlap=32, precision="fp32")["teacher"]
    assert tiled.shape == (300, 200, 3)
    assert float(np.abs(tiled - one_pass).max()) < 2e-3


@pytest.mark.parametrize("overlap", [50, 100, 128])
def test_tile_starts_stay_on_the_network_grid(overlap):
    """Offsets are multiples of the network's size multiple, whatever the overlap (pooling grids align)."""
    starts = tile_starts(1008, 256, overlap, multiple=16)
    assert all(s % 16 == 0 for s in starts)
    assert starts[-1] + 256 == 1008
    assert all(b - a <= 256 - overlap for a, b in zip(starts, starts[1:]))


# -- batched tiles -----------------------------------------------------------
@pytest.fixture
def frozen_student():
    """A tiny random ResnetGenerator, a test image (4, 150, 170) and the norm statistics recorded on that image."""
    from digital_stain.core.nets import ResnetGenerator, record_statistics

    torch.manual_seed(0)
    net = ResnetGenerator(4, 3, width=8, n_blocks=2).eval()
    image = np.random.default_rng(0).random((4, 150, 170), dtype=np.float32) * 2 - 1
    padded, _ = pad_image(image, net.size_multiple, net.min_size)
    statistics = record_statistics(net, torch.from_numpy(padded)[None])
    assert len(statistics) > 0
    return net, image, statistics


def _apply(net, image, fn, **kwargs):
    return tiled_apply(fn, image, out_channels=3, tile=64, overlap=16, multiple=net.size_multiple,
                       min_size=net.min_size, **kwargs)


@pytest.mark.parametrize("batch", [2, 4, 7, 100])
def test_batched_tiles_equal_one_tile_at_a_time(frozen_student, batch):
    """A real network with frozen statistics: batching changes the number of calls, not the result."""
    net, image, statistics = frozen_student
    shapes = []

    def fn(x):
        shapes.append(tuple(x.shape))
        return net(x, statistics)

    reference = _apply(net, image, lambda x: net(x, statistics))
    batched = _apply(net, image, fn, batch=batch)
    assert batched.shape == reference.shape == (3, 150, 170) and batched.dtype == np.float32
    assert reference.std() > 0.01
    np.testing.assert_allclose(batched, reference, atol=1e-5)
    th, tw, boxes = tile_layout(150, 170, 64, 16, net.size_multiple, net.min_size)
    tiles = len(boxes)
    assert tiles == len(tile_starts(152, 64, 16, net.size_multiple)) * len(tile_starts(176, 64, 16, net.size_multiple))
    assert len(shapes) == -(-tiles // batch)
    assert [s[0] for s in shapes] == [min(batch, tiles - i * batch) for i in range(len(shapes))]
    assert all(s[1:] == (4, th, tw) for s in shapes) and (th, tw) == (64, 56)  # 176 px: four 56-px tiles do


def test_blending_on_the_device_equals_blending_on_the_host(frozen_student, monkeypatch):
    """The GPU path (tiles cut and blended where the network runs), exercised on the CPU."""
    from digital_stain.stain import tiling

    net, image, statistics = frozen_student

    def frozen(x):
        return net(x, statistics)

    reference = _apply(net, image, frozen)
    seen = []
    monkeypatch.setattr(tiling, "_blend_on_device", lambda *args: True)
    on_device = _apply(net, image, frozen, batch=3, progress=lambda d, t: seen.append((d, t)))
    np.testing.assert_allclose(on_device, reference, atol=1e-5)
    assert [d for d, _ in seen] == list(range(1, len(seen) + 1)) and all(t == len(seen) for _, t in seen)


def test_batched_progress_counts_tiles():
    image = np.random.default_rng(3).random((1, 100, 90), dtype=np.float32)
    seen = []
    out = tiled_apply(lambda x: x * 2.0, image, out_channels=1, tile=32, overlap=8,
                      progress=lambda d, t: seen.append((d, t)), batch=4)
    np.testing.assert_allclose(out, image * 2.0, rtol=1e-6)
    total = len(tile_starts(104, 32, 8, 8)) * len(tile_starts(96, 32, 8, 8))
    assert seen == [(i, total) for i in range(1, total + 1)]


def test_stop_is_checked_between_batches():
    import threading

    from digital_stain.stain.tiling import Cancelled

    image = np.zeros((1, 128, 128), np.float32)
    stop, calls, seen = threading.Event(), [], []

    def fn(x):
        calls.append(x.shape[0])
        return x

    def progress(done, total):
        seen.append(done)
        stop.set()  # ask to stop after the first tile: the rest of its batch is still blended

    with pytest.raises(Cancelled):
        tiled_apply(fn, image, out_channels=1, tile=32, overlap=8, progress=progress, stop=stop, batch=4)
    assert calls == [4] and seen == [1, 2, 3, 4]


def test_batch_must_be_positive():
    with pytest.raises(ValueError, match="batch"):
        tiled_apply(lambda x: x, np.zeros((1, 16, 16), np.float32), out_channels=1, batch=0)


# -- fitted tiles and given tiles ----------------------------------------------
@pytest.mark.parametrize("length, tile, overlap, multiple", [(4096, 1024, 128, 4), (3000, 1024, 128, 4),
                                                             (768, 256, 96, 4), (1008, 256, 100, 16),
                                                             (208, 64, 16, 8), (500, 512, 128, 4)])
def test_fitted_tile_needs_no_more_tiles_and_computes_fewer_pixels(length, tile, overlap, multiple):
    fitted = fitted_tile(length, tile, overlap, multiple)
    assert fitted <= tile and fitted % multiple == 0
    count = len(tile_starts(length, tile, overlap, multiple))
    assert len(tile_starts(length, fitted, overlap, multiple)) == count
    if count > 1:  # one smaller tile would need another tile (or the tile is already the smallest that covers)
        smaller = fitted - multiple
        assert fitted == tile or len(tile_starts(length, smaller, overlap, multiple)) > count


def test_fitted_tiles_of_a_4096_px_side():
    """1024-px tiles overlapping by 128: five tiles either way, 924 px instead of 1024 (19% fewer pixels each)."""
    assert fitted_tile(4096, 1024, 128, 4) == 924
    starts = tile_starts(4096, 924, 128, 4)
    assert len(starts) == len(tile_starts(4096, 1024, 128, 4)) == 5 and starts[-1] + 924 == 4096
    assert all(128 <= a + 924 - b < 200 for a, b in zip(starts, starts[1:]))  # overlaps near 128, not up to 350


def test_tile_layout_is_where_tiled_apply_cuts():
    image = np.random.default_rng(2).random((1, 300, 170), dtype=np.float32)
    seen = []

    def fn(x):
        seen.append(tuple(x.shape[-2:]))
        return x

    tiled_apply(fn, image, out_channels=1, tile=96, overlap=24, multiple=8)
    th, tw, boxes = tile_layout(300, 170, 96, 24, 8)
    assert seen == [(th, tw)] * len(boxes)
    assert boxes == sorted(boxes) and boxes[0] == (0, 0)
    assert max(y for y, _ in boxes) + th == 304 and max(x for _, x in boxes) + tw == 176


@pytest.mark.parametrize("count, rows, cols", [(4, 2, 2), (1, 1, 1), (9, 3, 3), (100, 5, 5), (6, 2, 3), (0, 1, 1)])
def test_spread_tiles_picks_an_even_grid(count, rows, cols):
    grid = [(y, x) for y in range(0, 500, 100) for x in range(0, 500, 100)]  # 5 x 5
    chosen = spread_tiles(grid, count)
    assert len(chosen) == rows * cols <= max(count, 1)
    assert set(chosen) <= set(grid) and len(set(chosen)) == len(chosen)
    if (rows, cols) == (2, 2):
        assert chosen == [(100, 100), (100, 300), (300, 100), (300, 300)]  # spread, not packed in a corner
    if count == 1:
        assert chosen == [(200, 200)]  # one tile: the centre


def test_given_tiles_are_blended_as_they_are_and_not_computed():
    rng = np.random.default_rng(8)
    image = rng.random((2, 130, 140), dtype=np.float32)

    def fn(x):
        return x * 2.0 + 1.0

    reference = tiled_apply(fn, image, out_channels=2, tile=64, overlap=16, multiple=4)
    th, tw, boxes = tile_layout(130, 140, 64, 16, 4)
    padded, _ = pad_image(image, 4)
    chosen = spread_tiles(boxes, 2)
    given = {(y, x): torch.from_numpy(padded[:, y : y + th, x : x + tw] * 2.0 + 1.0) for y, x in chosen}
    calls = []

    def counted(x):
        calls.append(x.shape[0])
        return fn(x)

    progress = []
    out = tiled_apply(counted, image, out_channels=2, tile=64, overlap=16, multiple=4, given=given,
                      progress=lambda d, t: progress.append((d, t)))
    np.testing.assert_allclose(out, reference, rtol=1e-6)  # blended in another order: float rounding only
    assert sum(calls) == len(boxes) - len(given)
    assert progress == [(i, len(boxes)) for i in range(1, len(boxes) + 1)]
    with pytest.raises(ValueError, match="not origins"):
        tiled_apply(fn, image, out_channels=2, tile=64, overlap=16, multiple=4, given={(1, 1): given[chosen[0]]})
