"""Nuclei labels of a large plane, segmented chunk by chunk in the order a viewer asks for them, each once.

:class:`LazyNuclei` stains (through :class:`~digital_stain.stain.lazy.LazyStain`) and segments one
chunk at a time with :func:`~digital_stain.nuclei.chunked.label_block`: by adaptation, the stain
segmented with one Otsu threshold for the whole plane; by tutorship, the enhanced gray segmented by
the model's segmenter. Labels are named by their centroids, so chunks agree with one another
whatever order they are segmented in. Two kinds of caller share it:

* :meth:`LazyNuclei.sweep` (a worker thread) segments every chunk, those asked for first, and
  counts each nucleus once (by the chunk its centroid falls in);
* :meth:`LazyNuclei.levels` gives a pyramid of dask arrays for a viewer. A read never segments (it
  would stall the viewer for seconds a chunk): it returns the chunks segmented so far, 0 elsewhere,
  and a read of full resolution asks for its missing chunks, which the sweep takes next. Coarser
  levels take every 2nd, 4th, ... pixel of the segmented chunks, so a zoomed-out view fills in as
  the sweep goes.

The segmented chunks are kept (4 bytes a pixel, the size of the whole label image once swept).
"""

from __future__ import annotations

import math
import threading
import uuid
from collections import OrderedDict

import numpy as np

from digital_stain.nuclei.chunked import global_threshold, label_block, label_dtype, spread, with_margin
from digital_stain.nuclei.segment import NucleiSettings


class LazyNuclei:
    """The nuclei of one dark-field plane (numpy or dask), segmented a chunk at a time.

    Parameters
    ----------
    model : StainModel
        Stains the plane; not changed.
    darkfield : array (Y, X) or (Y, X, C)
        The plane, as :class:`~digital_stain.stain.lazy.LazyStain` takes it.
    method : {"auto", "adaptation", "tutorship"}
        As for :func:`~digital_stain.nuclei.find.find_nuclei` (``auto``: tutorship when the model
        holds a segmenter).
    stain : {"auto", "teacher", "student"}
        Adaptation: which stain is segmented (:func:`digital_stain.nuclei.find.stain_source`).
    nuclei, settings, adapt
        The segmenter's settings, the staining settings (its ``chunk`` is the chunk side) and the
        light adaptation, as for :func:`~digital_stain.nuclei.chunked.find_nuclei_chunked`.

    Constructing it by adaptation stains up to 16 chunks (for the threshold): do it in a worker thread.
    """

    def __init__(self, model, darkfield, *, method: str = "auto", stain: str = "auto",
                 nuclei: NucleiSettings | None = None, settings=None, adapt="auto"):
        from digital_stain.nuclei.find import choose_method, stain_source
        from digital_stain.stain.lazy import LazyStain
        from digital_stain.stain.settings import StainSettings

        self.nuclei = nuclei or NucleiSettings()
        self.method = choose_method(model, method)
        self.source = stain_source(model, stain) if self.method == "adaptation" else "enhanced"
        self._segmenter = model.segmenter if self.method == "tutorship" else None
        self._stain = LazyStain(model, darkfield, [self.source], settings=settings or StainSettings(),
                                adapt=adapt, cache_chunks=64)
        self._stained = self._stain.arrays[self.source]
        self.shape = tuple(self._stained.shape[:2])
        self.dtype = label_dtype(self.shape)
        rows, cols = self._stained.chunks[0], self._stained.chunks[1]
        self.chunk = max(rows[0], cols[0])
        starts_y, starts_x = np.cumsum((0,) + rows), np.cumsum((0,) + cols)
        self.boxes = {(i, j): (int(starts_y[i]), int(starts_y[i + 1]), int(starts_x[j]), int(starts_x[j + 1]))
                      for i in range(len(rows)) for j in range(len(cols))}
        self._adaptation = self._stain.prep.adaptation
        self.threshold = self._threshold() if self.method == "adaptation" else None
        self._labels: dict[tuple, np.ndarray] = {}
        self._own: dict[tuple, int] = {}
        self._asked: OrderedDict = OrderedDict()  # the newest last: the sweep takes it first
        self._lock = threading.Lock()

    @property
    def adaptation(self):
        """The light adaptation the stain used (:class:`~digital_stain.core.adapt.Adaptation`)."""
        return self._adaptation

    @property
    def total(self) -> int:
        """How many chunks the plane has."""
        return len(self.boxes)

    @property
    def done(self) -> int:
        """How many chunks are segmented."""
        return len(self._labels)

    @property
    def count(self) -> int:
        """The nuclei whose centroid lies in a segmented chunk (all of them once :meth:`sweep` has run)."""
        with self._lock:
            return sum(self._own.values())

    def _threshold(self) -> float:
        keys = list(self.boxes)
        return global_threshold([self._read_stain(self.boxes[keys[i]]) for i in spread(len(keys))], self.nuclei)

    def _read_stain(self, box) -> np.ndarray:
        y0, y1, x0, x1 = box
        return np.asarray(self._stained[y0:y1, x0:x1])

    def segment(self, key: tuple) -> np.ndarray:
        """The labels of chunk ``key`` (row, column), segmented now unless they already are."""
        with self._lock:
            if key in self._labels:
                return self._labels[key]
        region, core = with_margin(self.boxes[key], self.shape)
        block, own = label_block(self.method, self._read_stain(region), (region[0], region[2]), core, self.shape,
                                 self.nuclei, self.threshold, self._segmenter)
        with self._lock:  # the same chunk segmented twice gives the same labels: keep the first
            self._labels.setdefault(key, block)
            self._own.setdefault(key, own)
            self._asked.pop(key, None)
            return self._labels[key]

    def _next(self) -> tuple | None:
        with self._lock:
            while self._asked:
                key, _ = self._asked.popitem(last=True)
                if key not in self._labels:
                    return key
            return next((key for key in self.boxes if key not in self._labels), None)

    def sweep(self, progress=None, stop=None) -> int:
        """Segment every chunk not yet segmented, asked-for ones first; returns the count of nuclei.

        Raises
        ------
        digital_stain.stain.tiling.Cancelled
            ``stop`` was set; what was segmented is kept (and still shown).
        """
        from digital_stain.stain.tiling import Cancelled

        while (key := self._next()) is not None:
            if stop is not None and stop.is_set():
                raise Cancelled("stopped by the user")
            self.segment(key)
            if progress is not None:
                progress(self.done, self.total)
        # every chunk is segmented: the stain and its cache of stained chunks (up to 64, 12 MB each at
        # 1024 px) are no longer needed, though a viewer keeps this object as long as it shows the labels
        self._stain = self._stained = None
        return self.count

    def labels(self) -> np.ndarray:
        """The whole label image (segments what is missing)."""
        out = np.zeros(self.shape, self.dtype)
        for key, (y0, y1, x0, x1) in self.boxes.items():
            out[y0:y1, x0:x1] = self.segment(key)
        return out

    def read(self, y0: int, y1: int, x0: int, x1: int, step: int = 1) -> np.ndarray:
        """Rows ``y0:y1:step`` and columns ``x0:x1:step`` of the labels segmented so far (0 elsewhere).

        Never segments. At ``step`` 1 (full resolution, what a viewer shows zoomed in) the missing
        chunks are asked for: :meth:`sweep` takes them next.
        """
        out = np.zeros((-(-(y1 - y0) // step), -(-(x1 - x0) // step)), self.dtype)
        with self._lock:
            for key, (by0, by1, bx0, bx1) in self.boxes.items():
                if by1 <= y0 or by0 >= y1 or bx1 <= x0 or bx0 >= x1:
                    continue
                block = self._labels.get(key)
                if block is None:
                    if step == 1:
                        self._asked[key] = True
                        self._asked.move_to_end(key)
                    continue
                first_y, first_x = _first_on_grid(y0, by0, step), _first_on_grid(x0, bx0, step)
                end_y, end_x = min(y1, by1), min(x1, bx1)
                if first_y >= end_y or first_x >= end_x:
                    continue
                part = block[first_y - by0 : end_y - by0 : step, first_x - bx0 : end_x - bx0 : step]
                oy, ox = (first_y - y0) // step, (first_x - x0) // step
                out[oy : oy + part.shape[0], ox : ox + part.shape[1]] = part
        return out

    def levels(self, min_side: int = 512) -> list:
        """A pyramid of dask arrays over :meth:`read`: full resolution, then halved until a side is at most
        ``min_side``; each is read afresh (what is segmented meanwhile shows at the next read)."""
        height, width = self.shape
        steps = [1]
        while max(-(-height // steps[-1]), -(-width // steps[-1])) > min_side:
            steps.append(steps[-1] * 2)
        return [self._level(step) for step in steps]

    def _level(self, step: int):
        import dask.array as da

        height, width = self.shape
        shape = (-(-height // step), -(-width // step))
        chunks = da.core.normalize_chunks((self.chunk, self.chunk), shape)

        def fetch(block_info=None):
            (a, b), (c, d) = block_info[None]["array-location"]
            return self.read(a * step, min(b * step, height), c * step, min(d * step, width), step)

        return da.map_blocks(fetch, chunks=chunks, dtype=self.dtype, name=f"nuclei-{step}-{uuid.uuid4().hex}",
                             meta=np.empty((0, 0), self.dtype))


def _first_on_grid(start: int, box_start: int, step: int) -> int:
    """The first coordinate ``>= box_start`` of the grid ``start, start + step, ...``."""
    return start + max(0, math.ceil((box_start - start) / step)) * step
