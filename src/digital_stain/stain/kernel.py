"""The staining kernel: prepare, statistics, forward and blend, for every staining path.

Eager staining (:meth:`StainModel.stain`), lazy chunks (:class:`~digital_stain.stain.lazy.LazyStain`)
and whole-slide units (:mod:`digital_stain.slide.run`) all stain through a :class:`StainKernel`:
one input's :class:`~digital_stain.core.prepare.Preparation`, a :class:`~digital_stain.stain.settings.StainSettings`
and the model's :class:`Networks` on one device. Nothing here changes the model: the networks
are read-only copies owned by the model's cache (one per device), and the student's norm
statistics are values passed to each call (:mod:`digital_stain.core.nets.norm`), so two threads can
stain two images with one model at once.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable

import numpy as np
import torch

from digital_stain.core.devices import autocast
from digital_stain.core.nets.norm import Statistics, record_statistics
from digital_stain.core.nets.unet import colorize
from digital_stain.core.prepare import Preparation, each_band, row_bands
from digital_stain.stain.settings import StainSettings
from digital_stain.stain.tiling import pad_image, spread_tiles, stats_boxes, tile_layout, tiled_apply, whole_apply

ROLES = ("teacher", "student")


def device_copy(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A read-only copy of ``net`` on ``device``, made without allocating anything on ``net``'s own device.

    In eval mode, without gradients; on a CPU in channels-last memory format, which the CPU's
    convolutions run 1.2-1.5x faster (``benchmarks/official_loop.py``; the values are the same).
    """
    memo = {id(p): torch.nn.Parameter(p.detach().to(device, copy=True), requires_grad=False) for p in net.parameters()}
    memo.update({id(b): b.detach().to(device, copy=True) for b in net.buffers()})
    twin = copy.deepcopy(net, memo).eval()
    if device.type == "cpu":
        twin = twin.to(memory_format=torch.channels_last)
    return twin


class Networks:
    """A model's teacher and student on one device, never changed after they are made.

    Made and kept by :meth:`StainModel.networks` (again when the model's weights change); a
    compiled twin of each is made on first use (:meth:`compiled`), once per instance.
    """

    def __init__(self, teacher: torch.nn.Module | None, student: torch.nn.Module | None, device: torch.device):
        self.device = device
        self.teacher = device_copy(teacher, device) if teacher is not None else None
        self.student = device_copy(student, device) if student is not None else None
        self._compiled: dict[str, torch.nn.Module] = {}
        self._lock = threading.Lock()

    def network(self, role: str) -> torch.nn.Module:
        return self.teacher if role == "teacher" else self.student

    def compiled(self, role: str) -> torch.nn.Module:
        """``torch.compile`` of the teacher or student (static shapes: one graph per input shape)."""
        with self._lock:
            if role not in self._compiled:
                self._compiled[role] = torch.compile(self.network(role), dynamic=False)
            return self._compiled[role]


class StainKernel:
    """How one input is stained on one device: preparation, statistics, forward pass and blending.

    Parameters
    ----------
    model : StainModel
    prep : Preparation
        The input's value scaling, adaptation and tables (:meth:`StainModel.preparation`).
    settings : StainSettings
    device : torch.device or str, optional
        Default: ``settings.device``, else where the model is.
    precision : str, optional
        An already resolved precision (a slide's stored one); default: resolved from the settings.
    """

    def __init__(self, model, prep: Preparation, settings: StainSettings, device=None, precision: str | None = None):
        self.model, self.prep, self.settings = model, prep, settings
        self.nets = model.networks(device if device is not None else settings.device)
        self.device = self.nets.device
        self.precision = precision or model.precision_for(settings.precision, self.device)

    def on_cpu(self) -> StainKernel:
        """The same stain on the CPU in fp32 (after the device ran out of memory)."""
        return StainKernel(self.model, self.prep, self.settings.replace(compile=False), torch.device("cpu"), "fp32")

    # -- prepare ----------------------------------------------------------------------
    def network_input(self, role: str, rgb: np.ndarray, enhanced: np.ndarray) -> np.ndarray:
        """A network's input ``(C, y, x)`` float32 for a region ``rgb`` ``(y, x, 3)`` in [0, 1] and its enhanced gray."""
        if role == "teacher":
            return np.ascontiguousarray(enhanced[None], dtype=np.float32)
        return self.prep.student_input(rgb, enhanced)

    def padded(self, role: str, x: np.ndarray) -> tuple[np.ndarray, int, int]:
        """``x`` ``(C, y, x)`` padded as the network needs, and its ``(y, x)``."""
        net = self.nets.network(role)
        padded, (h, w) = pad_image(np.ascontiguousarray(x, dtype=np.float32), net.size_multiple, net.min_size)
        return np.ascontiguousarray(padded), h, w

    # -- statistics ----------------------------------------------------------------------
    def statistics(self, sample: np.ndarray) -> Statistics:
        """The student's norm statistics pooled over ``sample`` ``(N, 4, h, w)`` (padded inputs)."""
        with torch.no_grad(), autocast(self.device, self.precision):
            return record_statistics(self.nets.student, self._tensor(sample))

    def statistics_and_stain(self, sample: np.ndarray) -> tuple[Statistics, torch.Tensor]:
        """The student's statistics pooled over ``sample`` ``(N, 4, h, w)``, and the stain of each input.

        Every layer of that pass normalises with the pooled statistics of the whole sample, which
        are the ones returned: its outputs ``(N, 3, h, w)`` (float32, [0, 1], unclipped, on the
        device) are what a later call with those statistics would give, so tiles that were part of
        the sample need not be computed again.
        """
        record: list = []
        with torch.no_grad(), autocast(self.device, self.precision):
            out = self.nets.student(self._tensor(sample), record=record)
        return tuple(record), (out.float() + 1.0) / 2.0

    def stats_boxes(self, height: int, width: int) -> list | None:
        """Where a ``height`` x ``width`` plane's statistics are recorded (:func:`~digital_stain.stain.tiling.stats_boxes`)."""
        student = self.nets.student
        return stats_boxes(height, width, student.size_multiple, self.settings.stats_pixels,
                           self.settings.stats_crop, student.min_size)

    def to_device(self, statistics: Statistics) -> Statistics:
        """``statistics`` (e.g. read back from a store) as float32 tensors on this kernel's device."""
        return tuple((torch.as_tensor(m, dtype=torch.float32).to(self.device),
                      torch.as_tensor(v, dtype=torch.float32).to(self.device)) for m, v in statistics)

    # -- forward ----------------------------------------------------------------------
    def runner(self, role: str, statistics: Statistics | None = None,
               compiled: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
        """The network as a function of a batch ``(N, C, h, w)`` on the device to its stain ``(N, 3, h, w)``.

        The stain is float32, in [0, 1] for the teacher and unclipped for the student (clipped after
        blending). The student normalises with ``statistics`` when given, else each input by its own.
        """
        net = self.nets.compiled(role) if compiled else self.nets.network(role)
        device, precision = self.device, self.precision

        def run(x: torch.Tensor) -> torch.Tensor:
            x = x.contiguous(memory_format=torch.channels_last) if device.type == "cpu" else x
            with torch.no_grad(), autocast(device, precision):
                if role == "teacher":
                    return colorize(net, x).float()
                out = net(x) if statistics is None else net(x, statistics)
                return (out.float() + 1.0) / 2.0

        return run

    def forward(self, role: str, padded: np.ndarray, statistics: Statistics | None = None,
                compiled: bool = False) -> torch.Tensor:
        """One padded input ``(C, y, x)`` through the network: ``(3, y, x)`` float32 in [0, 1], on the device."""
        out = self.runner(role, statistics, compiled)(self._tensor(padded[None]))
        return out[0].clamp(0.0, 1.0)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device)
        return tensor.contiguous(memory_format=torch.channels_last) if self.device.type == "cpu" else tensor

    # -- blend: a whole plane, eagerly ---------------------------------------------------------
    def stain_plane(self, role: str, x: np.ndarray, progress=None, stop: threading.Event | None = None) -> np.ndarray:
        """A whole plane's network input ``(C, Y, X)`` to its stain ``(Y, X, 3)`` float32 in [0, 1].

        The student runs once on an image that fits the statistics pass (that pass is the stain:
        exact, seam-free). A larger image is cut into overlapping tiles
        (:func:`~digital_stain.stain.tiling.tile_layout`); a spread of them, as many as the statistics
        pass holds, is that pass (pooled statistics, and their own stains kept), the others are
        stained with its statistics, and all are blended
        (:func:`~digital_stain.stain.tiling.tiled_apply`): no pixel is computed for the statistics alone.
        The teacher has no instance norm and is always tiled.
        """
        net, settings = self.nets.network(role), self.settings
        statistics, given = None, None
        if role == "student":
            if self.stats_boxes(*x.shape[1:]) is None:
                # eager even when compiling: a compile pays over many tiles, not one pass
                out = whole_apply(self.runner(role), x, multiple=net.size_multiple, min_size=net.min_size,
                                  device=self.device, progress=progress, stop=stop)
                return to_yxc(out, clip=True)
            statistics, given = self._statistics_tiles(x)
        out = tiled_apply(self.runner(role, statistics, settings.compile), x, out_channels=3, tile=settings.tile,
                          overlap=settings.overlap, multiple=net.size_multiple, min_size=net.min_size,
                          device=self.device, progress=progress, stop=stop, batch=settings.batch, given=given)
        return to_yxc(out, clip=role == "student")

    def _statistics_tiles(self, x: np.ndarray) -> tuple[Statistics, dict]:
        """The statistics pass of a plane too large for one: pooled over a spread of its own tiles.

        Returns the statistics and those tiles' stains by origin, for ``tiled_apply(given=...)``.
        """
        net, settings = self.nets.student, self.settings
        th, tw, boxes = tile_layout(*x.shape[1:], settings.tile, settings.overlap, net.size_multiple, net.min_size)
        chosen = spread_tiles(boxes, settings.stats_pixels // (th * tw))
        padded, _ = pad_image(np.ascontiguousarray(x, dtype=np.float32), net.size_multiple, net.min_size)
        statistics, stains = self.statistics_and_stain(np.stack([padded[:, y : y + th, x0 : x0 + tw]
                                                                 for y, x0 in chosen]))
        return statistics, dict(zip(chosen, stains))


def to_yxc(out: np.ndarray, clip: bool = False) -> np.ndarray:
    """``(C, Y, X)`` -> contiguous ``(Y, X, C)`` float32, clipped to [0, 1] when asked (band by band, on threads)."""
    channels, height, width = out.shape
    result = np.empty((height, width, channels), dtype=out.dtype)

    def work(y0: int, y1: int) -> None:
        band = out[:, y0:y1].transpose(1, 2, 0)
        if clip:
            np.clip(band, 0.0, 1.0, out=result[y0:y1])
        else:
            result[y0:y1] = band

    each_band(work, row_bands(height, width))
    return result
