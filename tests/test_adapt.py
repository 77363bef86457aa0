"""digital_stain.core.adapt: the distance, the threshold, histogram matching and the decision."""

from __future__ import annotations

import numpy as np
import pytest

from digital_stain.core.adapt import (
    ADAPT_MODES, OFF, Adaptation, channel_maps, check_mode, decide, distance, match_table, threshold,
)
from digital_stain.core.arrays import InputError, value_scaling
from digital_stain.core.enhance import BINS, bin_index
from digital_stain.core.histograms import Distribution, measure


def _measure(image):
    return measure(image, value_scaling(image))


def _gain(image, gain):
    return np.clip(np.round(image.astype(np.float64) * gain), 0, 255).astype(np.uint8)


def test_modes_are_checked():
    assert [check_mode(m.upper()) for m in ADAPT_MODES] == list(ADAPT_MODES)
    with pytest.raises(InputError, match="unknown adaptation 'sometimes'.*auto"):
        check_mode("sometimes")


def test_the_threshold_falls_with_the_amount_of_input_to_a_floor():
    assert threshold(256 * 256) == pytest.approx(0.7)
    assert threshold(100) == pytest.approx(0.7)  # less than a field counts as one
    assert threshold(4 * 256 * 256) == pytest.approx(0.45)
    assert threshold(64 * 256 * 256) == threshold(10**9) == pytest.approx(0.2625)
    sizes = [256**2 * n for n in (1, 2, 4, 8, 16, 32, 64, 128)]
    assert all(a >= b for a, b in zip(map(threshold, sizes), map(threshold, sizes[1:])))


def test_distance_is_the_largest_cdf_gap(darkfield_tile):
    same = _measure(darkfield_tile)
    assert distance(same, same) == 0.0
    brighter = _measure(_gain(darkfield_tile, 6))
    assert 0.5 < distance(brighter, same) <= 1.0
    luma_only = Distribution(same.luma)
    assert distance(brighter, luma_only) <= distance(brighter, same)  # channels not compared without them
    # a pure tint leaves the luma's CDF nearly alone but moves a channel's
    tinted = darkfield_tile.copy()
    tinted[..., 2] = _gain(darkfield_tile[..., 2], 3)
    assert distance(_measure(tinted), same) > 2 * distance(Distribution(_measure(tinted).luma), luma_only)


def test_histogram_matching_undoes_a_gain(darkfield_tile):
    source, reference = darkfield_tile[..., 0], _gain(darkfield_tile[..., 0], 5)
    table = match_table(_measure(reference).channels[0], _measure(source).channels[0])
    assert table.dtype == np.float32 and table.shape == (BINS,) and np.all(np.diff(table) >= 0)
    assert 0.0 <= table.min() and table.max() <= 1.0
    mapped = table[bin_index(reference / np.float32(255))]
    unsaturated = reference < 250
    # back on the original levels, to within one 8-bit level (the bins are 1/16 of a level)
    assert np.abs(mapped[unsaturated] * 255 - source[unsaturated]).max() <= 1.0
    same = _measure(darkfield_tile)
    assert channel_maps(same, same) is None  # identical: no mapping at all
    maps = channel_maps(_measure(_gain(darkfield_tile, 5)), same)
    assert maps.shape == (3, BINS)
    luma_maps = channel_maps(_measure(_gain(darkfield_tile, 5)), Distribution(same.luma))
    assert np.array_equal(luma_maps[0], luma_maps[2])  # no channels recorded: the luma table for each


def test_decide_off_on_auto(darkfield_tile):
    model = _measure(darkfield_tile)
    assert decide(model, None, "off") is OFF and OFF.distance is None and not OFF.applied
    near = decide(model, _measure(darkfield_tile[::-1]), "auto")
    assert not near.applied and near.distance < near.threshold
    far = decide(model, _measure(_gain(darkfield_tile, 8)), "auto")
    assert far.applied and far.distance > far.threshold == pytest.approx(0.7)
    forced = decide(model, _measure(darkfield_tile[::-1]), "on")
    assert forced.applied and forced.distance == near.distance
    with pytest.raises(InputError, match="measuring"):
        decide(model, None, "auto")


def test_what_the_user_is_told_and_what_is_stored(darkfield_tile):
    model = _measure(darkfield_tile)
    far = decide(model, _measure(_gain(darkfield_tile, 8)), "auto")
    assert far.message("dsd-unpaired").startswith("adapted to this input (the input looks unlike the model's "
                                                  "microscope; distance 0.")
    assert "refitted" in far.message("m") and "threshold 0.70" in far.message("m")
    near = decide(model, model, "auto")
    assert near.message("m") == "no adaptation needed (distance 0.00 from m's dark-field, threshold 0.70)."
    assert OFF.message("m").startswith("adaptation off")
    described = far.describe()
    assert described["applied"] and described["mode"] == "auto" and described["pixels_measured"] == 65536
    assert "histograms" not in described
    again = Adaptation.from_dict(far.as_dict())
    assert again.applied and again.distance == pytest.approx(far.distance, abs=1e-4)
    assert again.measured.same_as(far.measured)
    assert Adaptation.from_dict(OFF.as_dict()).measured is None


@pytest.mark.slow
def test_a_shifted_input_stains_close_to_the_unshifted_one(darkfield_tile):
    """The shipped model on its own sample tile, and on the same tile through a brighter, tinted microscope."""
    from digital_stain.quality import metrics
    from digital_stain.core.arrays import to_uint8
    from digital_stain.stain.model import StainModel

    model = StainModel.load("dsd-unpaired-fast", device="cpu")
    tiles = [darkfield_tile, np.rot90(darkfield_tile).copy()]
    shifted = [np.clip(np.round((t / 255.0 * 6 * np.array([1.2, 1.0, 0.8])) ** 0.8 * 255), 0, 255).astype(np.uint8)
               for t in tiles]
    decision = model.adaptation(shifted)
    assert decision.applied
    for output in ("teacher", "student"):
        plain = [to_uint8(model.stain(t, [output], adapt="off")[output]) for t in tiles]
        adapted = [to_uint8(model.stain(s, [output], adapt=decision)[output]) for s in shifted]
        unadapted = [to_uint8(model.stain(s, [output], adapt="off")[output]) for s in shifted]
        close = np.mean([metrics.psnr(a, p) for a, p in zip(adapted, plain)])
        far = np.mean([metrics.psnr(u, p) for u, p in zip(unadapted, plain)])
        assert close > 17 and close > far + 5, (output, close, far)  # measured: 19.8 and 5.3 dB (teacher)
        enhanced = [model.stain(t, ["enhanced"], adapt="off")["enhanced"] for t in tiles]
        kept = np.mean([metrics.structure_score(a, e) for a, e in zip(adapted, enhanced)])
        assert kept > 0.8, (output, kept)
