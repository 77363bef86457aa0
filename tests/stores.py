"""Comparing OME-Zarr stores written by ``digital_stain.slide`` (shared by the whole-slide tests)."""

import numpy as np
import zarr


def store_arrays(path) -> dict[str, np.ndarray]:
    """Every stored image array of a store, by ``output/level`` (the progress record left out)."""
    group = zarr.open_group(str(path), mode="r")
    return {f"{name}/{level}": group[name][level][:] for name in group.group_keys() if name != "progress"
            for level in group[name].array_keys()}


def assert_same_store(a, b) -> None:
    """Two stores hold the same outputs and levels, pixel for pixel."""
    left, right = store_arrays(a), store_arrays(b)
    assert sorted(left) == sorted(right) and left
    for key in left:
        np.testing.assert_array_equal(left[key], right[key], err_msg=key)
