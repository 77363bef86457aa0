"""Choosing a student state: structure first, then colours, ties within the style's noise to the later state."""

import numpy as np
import pytest
from PIL import Image

from digital_stain._sample_data import sample_paths
from digital_stain.quality.metrics import lab_pixels
from digital_stain.train.selection import chosen_step, selection_score, style_noise

FLOOR = 0.9


def _state(step, style, structure=0.95, noise=0.3):
    return {"step": step, "structure": structure, "style": style, "style_noise": noise}


def test_selection_keeps_structure_first_then_prefers_hne_colours():
    floor = 0.9
    keeps_structure_gray = {"structure": 0.95, "style": 12.0}
    keeps_structure_hne = {"structure": 0.92, "style": 4.0}
    loses_structure = {"structure": 0.5, "style": 1.0}  # H&E colours on the wrong places
    ranked = sorted([loses_structure, keeps_structure_gray, keeps_structure_hne],
                    key=lambda s: selection_score(s, floor), reverse=True)
    assert ranked == [keeps_structure_hne, keeps_structure_gray, loses_structure]
    assert selection_score({"structure": 0.6}, floor) > selection_score({"structure": 0.5}, floor)


def test_a_later_state_within_the_noise_of_the_best_is_kept():
    history = [_state(500, 2.12), _state(1000, 2.34)]
    assert chosen_step(history, FLOOR) == 1000  # 0.22 apart, the noise of a difference is 0.42
    history.append(_state(1500, 3.5))  # clearly worse: the earlier state stays
    assert chosen_step(history, FLOOR) == 1000
    history.append(_state(2000, 2.5))  # within the noise of the best (2.12), later
    assert chosen_step(history, FLOOR) == 2000
    history.append(_state(2500, 1.0))  # clearly better
    assert chosen_step(history, FLOOR) == 2500
    history.append(_state(3000, 1.3, structure=0.5))  # below the structure floor: not a candidate
    assert chosen_step(history, FLOOR) == 2500


def test_without_noise_or_style_the_rule_is_the_old_one():
    no_noise = [{"step": s, "structure": 0.95, "style": v} for s, v in ((500, 2.0), (1000, 2.1), (1500, 1.9))]
    assert chosen_step(no_noise[:2], FLOOR) == 500 and chosen_step(no_noise, FLOOR) == 1500
    no_style = [{"step": 500, "structure": 0.8}, {"step": 1000, "structure": 0.9}, {"step": 1500, "structure": 0.9}]
    assert chosen_step(no_style, FLOOR) == 1000  # the highest structure, the first of equals
    below = [_state(500, 2.0, structure=0.7), _state(1000, 1.0, structure=0.8)]
    assert chosen_step(below, FLOOR) == 1000  # none keeps the structure: the one that keeps most
    assert chosen_step([], FLOOR) is None


def test_the_chosen_state_is_always_the_newest_or_the_one_chosen_before():
    # what lets training keep a single state: a new validation never makes an older, discarded state the choice
    rng = np.random.default_rng(0)
    for _ in range(200):
        history, chosen = [], None
        for step in range(500, 6001, 500):
            history.append(_state(step, float(rng.uniform(1, 4)), float(rng.uniform(0.85, 1.0)),
                                  float(rng.uniform(0, 0.6))))
            now = chosen_step(history, FLOOR)
            assert now in (step, chosen)
            chosen = now


def _tiles(kind):
    return [np.asarray(Image.open(p).convert("RGB")) for p in sample_paths(kind)]


def test_style_noise_is_the_spread_between_resampled_validation_sets():
    hne = _tiles("stained")
    reference = lab_pixels(np.stack(hne))
    alike = [lab_pixels(im[None], max_pixels=5000) for im in hne]
    gray = [np.repeat(im.mean(-1, keepdims=True), 3, -1).astype(np.uint8) for im in hne]
    mixed = alike + [lab_pixels(im[None], max_pixels=5000) for im in gray]
    assert style_noise(mixed, reference) > 1.2 * style_noise(alike, reference) > 0
    assert style_noise(mixed, reference) == style_noise(mixed, reference)  # its own seeded generator
    assert style_noise(alike[:1], reference) == 0.0  # one image: nothing to resample
