"""Tiled, blended inference of fully convolutional networks on images of any size.

Images are padded (reflect) to the size the network needs, never cropped;
equal-sized tiles overlap by ``overlap`` pixels and are blended with a
raised-cosine window, so no tile edge (where convolution padding makes
outputs less reliable) shows. Networks with instance norm get their
statistics recorded once for the whole image
(:func:`digital_stain.core.nets.record_statistics`) and handed to every tile's
call (:mod:`digital_stain.stain.kernel`), so every tile is normalised identically
and there are no colour jumps.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import numpy as np
import torch


class Cancelled(RuntimeError):
    """Raised inside long work when the caller's stop event is set."""


def tile_starts(length: int, tile: int, overlap: int, multiple: int = 1) -> list[int]:
    """Start offsets of equal tiles covering ``[0, length)`` with at least ``overlap`` overlap.

    Offsets are multiples of ``multiple`` (``length`` and ``tile`` must be too),
    so a network's pooling/striding grid is the same in every tile as in one pass.
    """
    if tile >= length:
        return [0]
    step = max((tile - overlap) // multiple * multiple, multiple)
    count = math.ceil((length - tile) / step) + 1
    return sorted({min(i * step, length - tile) for i in range(count)})


def fitted_tile(length: int, tile: int, overlap: int, multiple: int = 1) -> int:
    """The smallest tile side (a multiple of ``multiple``, at most ``tile``) that covers ``length``
    with as few tiles as ``tile`` needs.

    Fewer pixels are computed twice: 4096 px in 1024-px tiles overlapping by 128 takes five
    tiles either way, and 924-px tiles make them overlap by 128 instead of up to 350.
    """
    if tile >= length:
        return tile
    count = len(tile_starts(length, tile, overlap, multiple))
    fitted = math.ceil((length + (count - 1) * overlap) / count)
    fitted += (-fitted) % multiple
    while fitted < tile and len(tile_starts(length, fitted, overlap, multiple)) > count:
        fitted += multiple
    return min(fitted, tile)


def tile_layout(height: int, width: int, tile: int, overlap: int, multiple: int = 8,
                min_size: int = 0) -> tuple[int, int, list[tuple[int, int]]]:
    """Where :func:`tiled_apply` cuts a ``height`` x ``width`` image: tile height, width and origins.

    The origins ``(y, x)`` are in the padded image (:func:`pad_image`), row by row; every tile
    is ``th`` x ``tw``.
    """
    tile = max(multiple, min_size + (-min_size) % multiple, tile - tile % multiple)
    overlap = min(overlap, tile // 2)
    ph, pw = max(height, min_size), max(width, min_size)
    ph, pw = ph + (-ph) % multiple, pw + (-pw) % multiple
    th, tw = fitted_tile(ph, min(tile, ph), overlap, multiple), fitted_tile(pw, min(tile, pw), overlap, multiple)
    ys, xs = tile_starts(ph, th, overlap, multiple), tile_starts(pw, tw, overlap, multiple)
    return th, tw, [(y, x) for y in ys for x in xs]


def spread_tiles(boxes: list[tuple[int, int]], count: int) -> list[tuple[int, int]]:
    """At most ``count`` (at least one) of a row-by-row tile grid's origins, spread evenly over it."""
    ys, xs = sorted({y for y, _ in boxes}), sorted({x for _, x in boxes})
    count = max(1, count)
    # as many rows and columns as fit, in the grid's own proportions
    rows = max(1, min(len(ys), round(math.sqrt(count * len(ys) / len(xs)))))
    cols = max(1, min(len(xs), count // rows))
    rows = max(1, min(len(ys), count // cols))

    def pick(values: list[int], n: int) -> list[int]:
        return sorted({values[min(len(values) - 1, int((i + 0.5) * len(values) / n))] for i in range(n)})

    return [(y, x) for y in pick(ys, rows) for x in pick(xs, cols)]


def ramp(tile: int, overlap: int, lead: bool = True, trail: bool = True) -> np.ndarray:
    """1-D blending weights for a tile edge shared with a neighbour over ``overlap`` pixels.

    The outer quarter of the overlap gets (almost) no weight, so the pixels
    nearest a tile's edge, which saw padding instead of real neighbours, are
    taken from the neighbouring tile; the middle half blends with a raised
    cosine; the rest of the tile has weight 1.
    ``lead``/``trail`` say whether the tile has a neighbour before/after it;
    an edge on the image border keeps full weight.
    """
    weights = np.ones(tile, dtype=np.float32)
    if overlap > 0:
        d = np.arange(overlap, dtype=np.float32) + 0.5
        lo, hi = overlap / 4.0, 3.0 * overlap / 4.0
        edge = 0.5 - 0.5 * np.cos(np.pi * np.clip((d - lo) / (hi - lo), 0.0, 1.0))
        n = min(overlap, tile // 2)
        if lead:
            weights[:n] = edge[:n]
        if trail:
            weights[tile - n :] = np.minimum(weights[tile - n :], edge[:n][::-1])
    return weights


def pad_image(image: np.ndarray, multiple: int, min_size: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """Reflect-pad ``(C, H, W)`` at the bottom/right to multiples of ``multiple`` (and at least ``min_size``).

    Returns the padded image and the original ``(H, W)``.
    """
    _, h, w = image.shape
    th = max(h, min_size)
    tw = max(w, min_size)
    th += (-th) % multiple
    tw += (-tw) % multiple
    if (th, tw) == (h, w):
        return image, (h, w)
    mode = "reflect" if th - h < h and tw - w < w else "symmetric"
    padded = np.pad(image, ((0, 0), (0, th - h), (0, tw - w)), mode=mode)
    if padded.shape[1:] != (th, tw):  # very small images: reflect again until big enough
        padded = np.pad(padded, ((0, 0), (0, th - padded.shape[1]), (0, tw - padded.shape[2])), mode="wrap")
    return padded, (h, w)


# What a caller may ask for (the CLI checks the same at parse time, digital_stain.options).
TILE_RANGE = (32, 4096)  # under 32 px a tile is mostly its overlap; over 4096 px its activations fill memory
OVERLAP_RANGE = (0, 1024)
CHUNK_RANGE = (256, 4096)  # slide units (and the stored chunks): under 256 px the store is mostly metadata


def check_tiling(tile: int, overlap: int) -> None:
    """Refuse a tile side or overlap outside the ranges above, or an overlap over half the tile."""
    from digital_stain.core.arrays import InputError

    if not TILE_RANGE[0] <= tile <= TILE_RANGE[1]:
        raise InputError(f"tile {tile} px is out of range; use {TILE_RANGE[0]}..{TILE_RANGE[1]} (default 1024).")
    if not OVERLAP_RANGE[0] <= overlap <= OVERLAP_RANGE[1] or 2 * overlap > tile:
        raise InputError(f"overlap {overlap} px is out of range for tile {tile}: use 0..{min(OVERLAP_RANGE[1], tile // 2)} "
                         "(at most half the tile; default 128).")


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    image: np.ndarray,
    *,
    out_channels: int,
    tile: int = 512,
    overlap: int = 64,
    multiple: int = 8,
    min_size: int = 0,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    stop: threading.Event | None = None,
    batch: int = 1,
    given: dict[tuple[int, int], np.ndarray | torch.Tensor] | None = None,
) -> np.ndarray:
    """Apply ``fn`` to overlapping tiles, ``batch`` tiles per call, and blend.

    Parameters
    ----------
    fn : callable
        Maps a float32 tensor ``(B, C, h, w)`` on ``device`` to ``(B, out_channels, h, w)``
        (any float dtype), tile by tile independently: ``B`` is at most ``batch``
        and every tile of one image has the same ``(h, w)``.
    image : ndarray, shape (C, H, W), float32
    out_channels : int
    tile, overlap : int
        Tile side and overlap in pixels; ``tile`` is rounded down to ``multiple``.
    multiple, min_size : int
        The network's size multiple and smallest input side; the image is padded to both.
    device : torch.device or str
        Where ``fn`` runs. On CUDA, when the padded image and the blend buffers fit
        in a third of the free GPU memory, tiles are cut, blended and normalised on
        the GPU (no host round trip per tile); otherwise, and on other devices,
        each batch comes back to the host and is blended there.
    progress : callable(done, total), optional
        Called once per tile (``done`` counts tiles, ``total`` is the number of tiles),
        after its batch has been computed.
    stop : threading.Event, optional
        Checked before every batch; when set, :class:`Cancelled` is raised.
    batch : int
        Tiles per ``fn`` call (default 1). The result does not depend on it (within
        float rounding) as long as ``fn`` treats the tiles of a batch independently,
        e.g. a network with frozen norm statistics.
    given : dict, optional
        Tiles already computed, ``(y, x)`` origin (:func:`tile_layout`) to ``(out_channels, th, tw)``:
        blended as they are, ``fn`` is not called for them (the statistics pass's tiles).

    Returns
    -------
    ndarray, shape (out_channels, H, W), float32
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    tile = max(multiple, min_size + (-min_size) % multiple, tile - tile % multiple)
    overlap = min(overlap, tile // 2)
    padded, (h, w) = pad_image(image, multiple, min_size)
    ph, pw = padded.shape[1:]
    th, tw, boxes = tile_layout(h, w, tile, overlap, multiple, min_size)
    given = given or {}
    if not set(given) <= set(boxes):
        raise ValueError(f"given tiles {sorted(set(given) - set(boxes))} are not origins of this layout")
    todo = [box for box in boxes if box not in given]
    groups = [list(given)] * bool(given) + [todo[i : i + batch] for i in range(0, len(todo), batch)]
    device = torch.device(device)

    def window(y: int, x: int) -> np.ndarray:
        return np.outer(ramp(th, overlap, y > 0, y + th < ph), ramp(tw, overlap, x > 0, x + tw < pw)) + 1e-6

    with torch.no_grad():
        if _blend_on_device(padded, out_channels, device):
            return _tiled_apply_on_device(fn, padded, (h, w), (th, tw), groups, window, out_channels, device,
                                          progress, stop, given)
        out = np.zeros((out_channels, ph, pw), dtype=np.float32)
        norm = np.zeros((ph, pw), dtype=np.float32)
        total, done = len(boxes), 0
        for group in groups:
            if stop is not None and stop.is_set():
                raise Cancelled("stopped by the user")
            if group[0] in given:
                result = [torch.as_tensor(given[box]).float().cpu().numpy() for box in group]
            else:
                crops = np.stack([padded[:, y : y + th, x : x + tw] for y, x in group])
                result = fn(torch.from_numpy(crops).to(device)).float().cpu().numpy()
            for (y, x), res in zip(group, result):
                weights = window(y, x)
                out[:, y : y + th, x : x + tw] += res * weights
                norm[y : y + th, x : x + tw] += weights
                done += 1
                if progress is not None:
                    progress(done, total)
    return out[:, :h, :w] / norm[:h, :w]


def whole_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    image: np.ndarray,
    *,
    multiple: int = 8,
    min_size: int = 0,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    stop: threading.Event | None = None,
) -> np.ndarray:
    """Apply ``fn`` to the whole image in one call: :func:`tiled_apply` with a single tile and no blending.

    ``image`` ``(C, H, W)`` float32 is padded as :func:`pad_image` does and the result cropped
    back, ``(out_channels, H, W)`` float32; ``progress`` gets ``(1, 1)`` after the call and
    ``stop`` is checked before it.
    """
    if stop is not None and stop.is_set():
        raise Cancelled("stopped by the user")
    padded, (h, w) = pad_image(image, multiple, min_size)
    with torch.no_grad():
        out = fn(torch.from_numpy(padded[None]).to(torch.device(device)))[0, :, :h, :w].float().cpu().numpy()
    if progress is not None:
        progress(1, 1)
    return out


def _blend_on_device(padded: np.ndarray, out_channels: int, device: torch.device) -> bool:
    """Whether to cut and blend tiles on ``device``: CUDA, when the padded input and the
    blend buffers take at most a third of the free GPU memory."""
    if device.type != "cuda":
        return False
    need = padded.nbytes + (out_channels + 1) * padded.shape[1] * padded.shape[2] * 4
    try:
        free, _ = torch.cuda.mem_get_info(device)
    except (RuntimeError, AssertionError):  # pragma: no cover - no usable CUDA context
        return False
    return need <= free // 3


def _tiled_apply_on_device(fn, padded, size, tile_shape, groups, window, out_channels, device, progress, stop, given):
    """:func:`tiled_apply` with the padded image ``(C, H', W')`` and the blend buffers on ``device``.

    ``groups`` are lists of ``(y, x)`` tile origins, one list per ``fn`` call (or one of ``given``
    tiles, already computed); ``window(y, x)``
    gives a tile's ``(h, w)`` float32 blend weights. On CUDA, batches are queued
    asynchronously and a batch's progress is reported once the GPU has finished it
    (one batch behind), so the GPU always has work queued. Returns ``(out_channels, H, W)``
    float32 (numpy, on the host).
    """
    (h, w), (th, tw) = size, tile_shape
    ph, pw = padded.shape[1:]
    source = torch.from_numpy(np.ascontiguousarray(padded)).to(device)
    out = torch.zeros((out_channels, ph, pw), dtype=torch.float32, device=device)
    norm = torch.zeros((ph, pw), dtype=torch.float32, device=device)
    windows: dict[tuple[bool, ...], torch.Tensor] = {}
    total, done = sum(len(g) for g in groups), 0
    queued: list[tuple[torch.cuda.Event | None, int]] = []

    def report(count: int) -> None:
        nonlocal done
        for _ in range(count):
            done += 1
            if progress is not None:
                progress(done, total)

    for group in groups:
        if stop is not None and stop.is_set():
            raise Cancelled("stopped by the user")
        if group[0] in given:
            result = [torch.as_tensor(given[box]).to(device).float() for box in group]
        else:
            result = fn(torch.stack([source[:, y : y + th, x : x + tw] for y, x in group])).float()
        for (y, x), res in zip(group, result):
            key = (y > 0, y + th < ph, x > 0, x + tw < pw)
            if key not in windows:
                windows[key] = torch.from_numpy(window(y, x)).to(device)
            weights = windows[key]
            out[:, y : y + th, x : x + tw] += res * weights
            norm[y : y + th, x : x + tw] += weights
        event = torch.cuda.Event() if device.type == "cuda" else None
        if event is not None:
            event.record()
        queued.append((event, len(group)))
        if len(queued) > 1:  # wait for the previous batch only: this one keeps the GPU busy meanwhile
            previous, count = queued.pop(0)
            if previous is not None:
                previous.synchronize()
            report(count)
    result = (out[:, :h, :w] / norm[:h, :w]).cpu().numpy()
    for _, count in queued:
        report(count)
    return result


def stats_boxes(height: int, width: int, multiple: int, max_pixels: int, crop: int,
                min_size: int = 0) -> list[tuple[int, int, int]] | None:
    """Where to record instance-norm statistics, as ``(y, x, side)`` crops of the padded image.

    ``None`` means the whole padded image (it has at most ``max_pixels``
    pixels, so the statistics are exactly those of a one-pass run); otherwise
    up to ``max_pixels // crop**2`` square crops on a regular grid spread over
    the image, whose pooled statistics stand for the whole image. Padding is
    :func:`pad_image`'s (bottom/right to ``multiple`` and ``min_size``).
    """
    ph, pw = max(height, min_size), max(width, min_size)
    ph, pw = ph + (-ph) % multiple, pw + (-pw) % multiple
    if ph * pw <= max_pixels:
        return None
    crop = min(crop - crop % multiple, ph - ph % multiple, pw - pw % multiple)
    per_side = max(1, int(math.sqrt(max_pixels // (crop * crop))))
    # crops centred in per_side equal bands: spread over the image, centred when there is one
    ys = [int(np.clip((i + 0.5) * ph / per_side - crop / 2, 0, ph - crop)) for i in range(per_side)]
    xs = [int(np.clip((i + 0.5) * pw / per_side - crop / 2, 0, pw - crop)) for i in range(per_side)]
    return [(y, x, crop) for y in ys for x in xs]


def stats_sample(image: np.ndarray, multiple: int, max_pixels: int, crop: int, min_size: int = 0) -> np.ndarray:
    """What to record instance-norm statistics on, ``(N, C, h, w)``: see :func:`stats_boxes`."""
    padded, _ = pad_image(image, multiple, min_size)
    boxes = stats_boxes(image.shape[1], image.shape[2], multiple, max_pixels, crop, min_size)
    if boxes is None:
        return padded[None]
    return np.stack([padded[:, y : y + side, x : x + side] for y, x, side in boxes])
