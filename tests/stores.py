"""Comparing OME-Zarr stores written by ``digital_stain.slide.run`` (shared by the whole-slide tests)."""

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


def write_ome_zarr(path, levels: list[np.ndarray], axes: str, *, zarr_format: int = 2, scale=None, translation=None,
                   units: dict | None = None, name: str | None = None, wide_scale=None) -> None:
    """A hand-made OME-Zarr image (NGFF 0.4, or 0.5 with ``zarr_format=3``): ``levels`` as datasets ``0``, ``1``, ...

    ``scale``/``translation`` are level 0's (per axis of ``axes``); each level doubles the Y/X scale.
    ``wide_scale`` is a multiscale-wide scale, applied after the datasets' transforms.
    """
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    kinds = {"y": "space", "x": "space", "z": "space", "c": "channel", "t": "time"}
    datasets = []
    for index, data in enumerate(levels):
        array = group.create_array(str(index), shape=data.shape, chunks=tuple(min(64, s) for s in data.shape),
                                   dtype=data.dtype)
        array[:] = data
        transforms = []
        if scale is not None:
            transforms.append({"type": "scale", "scale": [s * (2**index if a in "yx" else 1)
                                                          for s, a in zip(scale, axes)]})
        if translation is not None:
            transforms.append({"type": "translation", "translation": list(translation)})
        datasets.append({"path": str(index), **({"coordinateTransformations": transforms} if transforms else {})})
    entry = {"version": "0.5" if zarr_format == 3 else "0.4", "datasets": datasets,
             "axes": [{"name": a, "type": kinds[a], **({"unit": units[a]} if units and a in units else {})}
                      for a in axes]}
    if name is not None:
        entry["name"] = name
    if wide_scale is not None:
        entry["coordinateTransformations"] = [{"type": "scale", "scale": list(wide_scale)}]
    if zarr_format == 3:  # OME-Zarr 0.5 keeps its metadata under "ome"
        group.attrs["ome"] = {"version": "0.5", "multiscales": [entry]}
    else:
        group.attrs["multiscales"] = [entry]
