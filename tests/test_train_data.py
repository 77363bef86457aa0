"""Training data: random crops, with and without mirrors and quarter turns."""

import numpy as np

from digital_stain.train.data import random_crops


def _window_at(image: np.ndarray, crop: np.ndarray):
    """Where ``crop`` lies in ``image`` unturned (every value of ``image`` is unique), else None."""
    y, x = np.argwhere(image[..., 0] == crop[0, 0, 0])[0]
    size = crop.shape[0]
    window = image[y : y + size, x : x + size]
    return (y, x) if window.shape == crop.shape and np.array_equal(window, crop) else None


def test_crops_without_turns_keep_the_orientation_and_with_turns_do_not():
    # unique values in channel 0, so a crop's top-left value says where it came from
    values = np.arange(40 * 40, dtype=np.int64).reshape(40, 40)
    image = np.stack([values, values // 7, values % 5], -1)
    kept = random_crops([image], 32, 8, np.random.default_rng(0), turns=False)
    assert kept.shape == (32, 8, 8, 3)
    assert all(_window_at(image, crop) is not None for crop in kept)
    assert len({_window_at(image, crop) for crop in kept}) > 1  # different places, not one crop again

    turned = random_crops([image], 32, 8, np.random.default_rng(0))
    assert sum(_window_at(image, crop) is None for crop in turned) > 16  # 7 of 8 draws turn or mirror a crop
    for crop in turned:  # every crop is still a window of the image, in one of the 8 orientations
        orientations = [np.rot90(c, k) for c in (crop, crop[:, ::-1]) for k in range(4)]
        assert any(_window_at(image, o) is not None for o in orientations)
