"""``StainSettings``: how to stain, one frozen object carried by every staining path.

The eager (:meth:`StainModel.stain`), lazy (:class:`~digital_stain.stain.lazy.LazyStain`) and
whole-slide (:func:`~digital_stain.slide.run.stain_to_zarr`) paths, the CLI and the napari
widget all take their defaults from here and check them here, once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from digital_stain.core.adapt import Adaptation, check_mode
from digital_stain.core.arrays import InputError
from digital_stain.core.devices import DEVICES, PRECISIONS
from digital_stain.stain.tiling import OVERLAP_RANGE, TILE_RANGE, check_tiling

CHUNK_MAX = 16384  # a lazy chunk or slide unit over this is most of a slide in memory at once

STATS_RANGE = (1, 2**31)


@dataclass(frozen=True)
class StainSettings:
    """What a stain is computed with, beyond the model and the input.

    Parameters
    ----------
    tile, overlap : int
        Eager staining of an image larger than the statistics pass: the largest tile side
        (tiles are shrunk to fit the image with as few of them) and the overlap of
        neighbouring tiles, in pixels (memory against recomputed pixels).
    chunk : int
        Lazy and whole-slide staining: the side of a chunk (a unit of a slide), in pixels;
        each is computed with ``overlap`` pixels borrowed from its neighbours.
    precision : ``auto|fp32|bf16|fp16``
        ``auto``: what is measured fastest on the device (:meth:`StainModel.precision_for`).
    stats_pixels, stats_crop : int
        Images up to ``stats_pixels`` get the student's exact whole-image statistics (and
        are stained eagerly in that one pass); larger ones get statistics pooled over a
        spread of their own tiles (eager, at most ``stats_pixels`` in all, their stains
        kept) or of crops of ``stats_crop`` pixels (lazy and slide planes).
    compile : bool
        Run the networks through ``torch.compile`` (pays over many tiles or chunks).
    batch : int
        Tiles per network call in eager staining (a GPU likes 4-16).
    device : ``auto|cpu|cuda|mps`` or None
        Where the networks run; None: where the model is.
    adapt : ``auto|on|off`` or Adaptation
        Adaptation to another microscope's dark-field (:mod:`digital_stain.core.adapt`).
    """

    tile: int = 1024
    overlap: int = 128
    chunk: int = 1024
    precision: str = "auto"
    stats_pixels: int = 2048 * 2048
    stats_crop: int = 512
    compile: bool = False
    batch: int = 1
    device: str | None = None
    adapt: str | Adaptation = "auto"

    def __post_init__(self) -> None:
        # the overlap against the tile is the eager path's own check (StainModel.stain): lazy chunks and
        # slide units round chunk and overlap to the stride grid instead (chunks.grid_sizes)
        check_tiling(self.tile, min(self.overlap, self.tile // 2))
        if not OVERLAP_RANGE[0] <= self.overlap <= OVERLAP_RANGE[1]:
            raise InputError(f"overlap {self.overlap} px is out of range; use {OVERLAP_RANGE[0]}..{OVERLAP_RANGE[1]} "
                             "(default 128).")
        if not TILE_RANGE[0] <= self.chunk <= CHUNK_MAX:
            raise InputError(f"chunk {self.chunk} px is out of range; use {TILE_RANGE[0]}..{CHUNK_MAX} px (default 1024).")
        if str(self.precision).lower() not in PRECISIONS:
            raise InputError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}.")
        object.__setattr__(self, "precision", str(self.precision).lower())
        if not STATS_RANGE[0] <= self.stats_pixels <= STATS_RANGE[1]:
            raise InputError(f"statistics pixels {self.stats_pixels} out of range; use {STATS_RANGE[0]}..{STATS_RANGE[1]}.")
        if not 64 <= self.stats_crop <= 4096:
            raise InputError(f"statistics crop {self.stats_crop} px out of range; use 64..4096 (default 512).")
        if isinstance(self.batch, bool) or not float(self.batch).is_integer() or self.batch < 1:
            raise InputError(f"batch must be a whole number of at least 1, got {self.batch!r}.")
        object.__setattr__(self, "batch", int(self.batch))
        if self.device is not None and str(self.device).split(":")[0] not in DEVICES:
            raise InputError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}.")
        if not isinstance(self.adapt, Adaptation):
            object.__setattr__(self, "adapt", check_mode(self.adapt))

    def replace(self, **changes) -> StainSettings:
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(cls, settings: StainSettings | None = None, **changes) -> StainSettings:
        """``settings`` (default: the defaults) with the keyword ``changes`` that are not None."""
        base = settings if settings is not None else cls()
        changes = {key: value for key, value in changes.items() if value is not None}
        return base.replace(**changes) if changes else base

    def describe(self) -> dict:
        """The settings as plain values, for provenance (an Adaptation as its mode)."""
        values = dataclasses.asdict(self)
        if isinstance(self.adapt, Adaptation):
            values["adapt"] = self.adapt.mode
        return values
