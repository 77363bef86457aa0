"""Staining that survives running out of GPU memory: smaller tiles first, then the CPU.

A GPU with little free memory should cost speed, not the result. On an
out-of-memory error the tile side is halved (down to ``min_tile``) and the
whole-image statistics budget with it, and when even the smallest tile does
not fit the networks move to the CPU. Each step is reported through
``notify`` so the user knows why it got slower.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from digital_stain.core.devices import resolve_device
from digital_stain.stain.settings import StainSettings


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA's ``OutOfMemoryError`` and MPS's "out of memory" RuntimeError."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


def release_memory() -> None:
    """Give cached GPU memory back after an out-of-memory error (outside the ``except`` block)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if hasattr(torch, "mps") and torch.backends.mps.is_available():
        torch.mps.empty_cache()


def stain_with_fallback(model, image, outputs=None, *, settings=None, tile: int | None = None, min_tile: int = 256,
                        stats_pixels: int | None = None, notify: Callable[[str], None] | None = None,
                        **options) -> tuple[dict, dict]:
    """:meth:`StainModel.stain`, retried with smaller tiles and then on the CPU if memory runs out.

    Parameters
    ----------
    model : StainModel
    image, outputs, settings, options
        As for :meth:`StainModel.stain` (``device`` is honoured for the first try).
    tile, min_tile : int
        First tile side (default: the settings'), and the smallest one tried before moving to the CPU.
    stats_pixels : int
        Whole-image statistics budget for the first try (default: the settings'); it shrinks with the tile.
    notify : callable(str), optional
        Told, in one sentence, about every fallback.

    Returns
    -------
    results : dict of str to ndarray
        As :meth:`StainModel.stain` returns them.
    used : dict
        ``tile``, ``stats_pixels`` and ``device`` that finally worked, and ``fallbacks`` (the messages).
    """
    base = settings if settings is not None else StainSettings()
    tile = base.tile if tile is None else tile
    stats_pixels = base.stats_pixels if stats_pixels is None else stats_pixels
    fallbacks: list[str] = []

    def say(message: str) -> None:
        fallbacks.append(message)
        if notify is not None:
            notify(message)

    device = resolve_device(options.pop("device", None) or base.device or model._device)
    while True:
        failed = False
        try:
            results = model.stain(image, outputs, settings=base, tile=tile, stats_pixels=stats_pixels, device=device,
                                  **options)
            return results, {"tile": tile, "stats_pixels": stats_pixels, "device": str(device),
                             "fallbacks": fallbacks}
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
            failed = True  # handled below, once the traceback no longer holds the tensors
        if failed:
            release_memory()
            step = next_step(device, tile, min_tile)
            if step is None:
                raise MemoryError("the computer ran out of memory while staining, even with small tiles; close "
                                  "other programs or stain a smaller region.")
            if step[0] < tile:  # the statistics budget shrinks with the tile
                stats_pixels = max(step[0] * step[0], stats_pixels // 4)
            tile, device, message = step
            say(message)


def next_step(device: torch.device, tile: int, min_tile: int) -> tuple[int, torch.device, str] | None:
    """The one out-of-memory policy of every staining path: a smaller tile, then the CPU, then give up.

    Returns the tile and device to try next and the sentence that says so, or None on a CPU with the
    smallest tile. A path whose tiles are fixed (lazy chunks, slide units) passes ``min_tile=tile``,
    so it moves to the CPU at once (:meth:`digital_stain.stain.lazy.LazyStain._fall_back`).
    """
    if tile > min_tile:
        smaller = max(min_tile, tile // 2)
        return smaller, device, f"{_where(device)} ran out of memory with {tile}-px tiles; retrying with {smaller}-px tiles."
    if device.type != "cpu":
        return tile, torch.device("cpu"), (f"{_where(device)} ran out of memory even with {tile}-px tiles; "
                                           "staining on the CPU instead (slower).")
    return None


def _where(device: torch.device) -> str:
    return "the computer" if device.type == "cpu" else f"the GPU ({device.type})"
