"""The OME-Zarr store of a stained slide: layout, NGFF metadata, per-chunk progress, pyramid levels.

Written with ``zarr`` alone (no ome-zarr package), by default as OME-Zarr (NGFF) 0.4
on Zarr format 2, which every OME-Zarr reader opens (this plugin's napari reader,
:mod:`digital_stain.io.multiscale`, ome-zarr-py and napari-ome-zarr, QuPath,
Fiji/MoBIE, vizarr, neuroglancer). Asked for (``ngff="0.5"``, ``--ngff 0.5``), it is
NGFF 0.5 on Zarr format 3: the same groups and arrays, each described by a
``zarr.json`` instead of ``.zgroup``/``.zarray``/``.zattrs``, the NGFF metadata under
the attributes' ``"ome"`` key (``{"ome": {"version": "0.5", "multiscales": ...}}``),
the arrays with ``dimension_names`` and chunk files under ``c/``. Readers that do not
know 0.5 yet (older QuPath, Fiji, vizarr) cannot open that; hence 0.4 stays the default::

    OUT.ome.zarr/                 root group
      .zattrs                     "multiscales": one entry per output, the primary first
                                  (student, else teacher, else enhanced), paths "student/0", ...;
                                  "omero": colour rendering of the primary;
                                  "digital_stain": provenance, settings, progress state
      norm_statistics.json        the student's norm statistics (resuming uses them)
      student/                    one complete NGFF image per output
        .zattrs                   "multiscales" (paths "0", "1", ...), "omero" (R, G, B), "digital_stain"
        0/ 1/ 2/ ...              uint8 (3, Y, X), (3, Y/2, X/2), ...; chunks (3, chunk, chunk); Blosc zstd
      teacher/                    the same
      enhanced/0/ 1/ ...          uint8 (Y, X) gray; chunks (chunk, chunk)
      progress/0, progress/1 ...  only while unfinished: uint8, one element (and one file) per work unit

Why this layout:

* **One store, one group per output.** A single path to name, resume and
  move, with one provenance record and one progress record, while each
  output stays a self-contained NGFF image: ``OUT.ome.zarr/teacher`` opens
  in any OME-Zarr viewer. The root's ``multiscales`` lists every output with
  paths into the groups, so readers that open the store itself show the
  primary output, the most H&E-like one (ome-zarr-py,
  :func:`digital_stain.io.images.read_image`), or every output (this plugin's napari
  reader: one layer each). Separate stores per output would need names
  invented beside the one the user gave, and three resume records.
* **(C, Y, X), not (Y, X, C).** In memory a stained plane is ``(Y, X, 3)``
  (channels last, as everywhere in this package), but NGFF orders axes
  time, channel, space, and ome-zarr-py refuses channel-last metadata.
  Chunks hold all three channels of a region, so reading a region is one
  file per chunk; :func:`digital_stain.io.images.read_image` moves the channels back
  last.
* **uint8.** The stained outputs are float32 in [0, 1]; a stain is looked at
  and measured in 8-bit colour (PNG output is rounded the same way:
  :func:`digital_stain.core.arrays.to_uint8`), and uint8 is a quarter of float32
  on disk. ``omero`` windows are 0..255.
* **Pyramid.** Level ``k + 1`` is the 2 x 2 mean of level ``k`` (integer
  mean, rounded half up; an odd last row or column is averaged with itself,
  so each level has ``ceil(side / 2)`` pixels), until the longer side is at
  most ``min_side``. Levels are built from the stored level above, chunk by
  chunk, so memory stays bounded.
* **Progress.** A work unit (a level-0 chunk of every output, or one chunk
  of a lower level) counts as done only when its element of
  ``progress/<level>`` is 1. That element is written after the unit's data,
  and both are fsynced first, so a crash, a kill or a full disk at any moment
  leaves every unit either marked and complete or unmarked (and redone on
  resume). Each unit owns its chunk files and its progress file, so units
  may be written by separate processes. ``progress`` is removed when the
  store is complete (``digital_stain.complete`` is then true).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from digital_stain.io.calibration import Calibration

RGB_OUTPUTS = ("teacher", "student")
PRIMARY_ORDER = ("student", "teacher", "enhanced")  # the root's first multiscale: the most H&E-like output
NGFF_VERSION = "0.4"  # the default: every reader opens it
NGFF_VERSIONS = ("0.4", "0.5")
ZARR_FORMATS = {"0.4": 2, "0.5": 3}
FORMAT = "digital-stain-slide"
FORMAT_VERSION = 1
CHANNELS = (("red", "FF0000"), ("green", "00FF00"), ("blue", "0000FF"))


@dataclass(frozen=True)
class Grid:
    """Where the work units of every level lie.

    Attributes
    ----------
    chunk : int
        Chunk side of every stored array (pixels).
    rows, cols : tuple of int
        Level-0 unit heights and widths: ``chunk`` each, but the last one may
        be longer (a remainder thinner than the staining overlap is merged into
        it), so every level-0 unit covers whole stored chunks.
    levels : tuple of (int, int)
        ``(Y, X)`` of each pyramid level, level 0 first.
    """

    chunk: int
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    levels: tuple[tuple[int, int], ...]

    def counts(self, level: int) -> tuple[int, int]:
        """Units along Y and X on ``level``."""
        if level == 0:
            return len(self.rows), len(self.cols)
        height, width = self.levels[level]
        return math.ceil(height / self.chunk), math.ceil(width / self.chunk)

    def units(self, level: int) -> list[tuple[int, int]]:
        """Every unit key ``(i, j)`` of ``level``, row by row."""
        ny, nx = self.counts(level)
        return [(i, j) for i in range(ny) for j in range(nx)]

    def box(self, level: int, key: tuple[int, int]) -> tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)`` of unit ``key`` on ``level``, in that level's pixels."""
        i, j = key
        if level == 0:
            y0, x0 = sum(self.rows[:i]), sum(self.cols[:j])
            return y0, y0 + self.rows[i], x0, x0 + self.cols[j]
        height, width = self.levels[level]
        c = self.chunk
        return i * c, min((i + 1) * c, height), j * c, min((j + 1) * c, width)

    def parents(self, level: int, key: tuple[int, int]) -> list[tuple[int, int]]:
        """Keys of the units of ``level + 1`` made (in part) from unit ``key`` of ``level``.

        One, except for a level-0 unit with a merged remainder that reaches into a second parent.
        """
        y0, y1, x0, x1 = self.box(level, key)
        span = 2 * self.chunk  # a unit of the level above covers this many pixels of this level
        rows, cols = self.counts(level + 1)
        return [(i, j) for i in range(y0 // span, min((y1 - 1) // span + 1, rows))
                for j in range(x0 // span, min((x1 - 1) // span + 1, cols))]

    def as_dict(self) -> dict:
        return {"chunk": self.chunk, "rows": list(self.rows), "cols": list(self.cols),
                "levels": [list(level) for level in self.levels]}

    @classmethod
    def from_dict(cls, data: dict) -> Grid:
        return cls(int(data["chunk"]), tuple(data["rows"]), tuple(data["cols"]),
                   tuple(tuple(level) for level in data["levels"]))


def level_shapes(shape: tuple[int, int], min_side: int) -> tuple[tuple[int, int], ...]:
    """``(Y, X)`` of level 0 and each halving (rounded up) until the longer side is at most ``min_side``.

    No level gets a side under 8 pixels.
    """
    levels = [tuple(shape)]
    while max(levels[-1]) > min_side and min(levels[-1]) >= 16:
        levels.append(tuple(math.ceil(side / 2) for side in levels[-1]))
    return tuple(levels)


def downsample(block: np.ndarray, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """2 x 2 mean of a uint8 block over its two spatial ``axes``, rounded half up; odd edges averaged with themselves.

    ``axes`` (0, 1) for ``(h, w)`` or ``(h, w, 3)``; (1, 2) for ``(3, h, w)``, the stored layout.
    """
    y, x = (axis % block.ndim for axis in axes)
    pad = [(0, 0)] * block.ndim
    pad[y], pad[x] = (0, block.shape[y] % 2), (0, block.shape[x] % 2)
    wide = (np.pad(block, pad, mode="edge") if any(after for _, after in pad) else block).astype(np.uint16)

    def every_other(dy: int, dx: int) -> np.ndarray:
        index = [slice(None)] * block.ndim
        index[y], index[x] = slice(dy, None, 2), slice(dx, None, 2)
        return wide[tuple(index)]

    total = every_other(0, 0) + every_other(1, 0) + every_other(0, 1) + every_other(1, 1)
    total += 2
    total //= 4
    return total.astype(np.uint8)


def _fsync(paths: list[Path]) -> None:
    """Flush files and then their folders to disk, so a power cut cannot undo what a later marker claims."""
    folders = []
    for path in paths:
        if path.exists():  # zarr stores no file for a chunk that is all fill value
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if path.parent not in folders:
            folders.append(path.parent)
    for folder in folders:
        if folder.exists():
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def read_state(path: str | os.PathLike) -> dict | None:
    """The ``digital_stain`` attributes of a store this package started, or None (no such store or not ours)."""
    import zarr

    path = Path(path)
    if not ((path / ".zgroup").exists() or (path / "zarr.json").exists()):
        return None
    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:  # unreadable metadata: not a store we can resume
        return None
    state = attrs.get("digital_stain")
    return state if isinstance(state, dict) and state.get("format") == FORMAT else None


def looks_like_zarr(path: Path) -> bool:
    """Whether ``path`` is a Zarr store (format 2 or 3), i.e. safe to delete on --overwrite."""
    return any((path / name).exists() for name in (".zgroup", ".zarray", "zarr.json"))


def prepare_output(output: Path, *, resume: bool, overwrite: bool) -> dict | None:
    """Check what is at ``output``: the stored record when resuming a store, else None (``output`` is then free).

    Refuses an existing output without ``resume`` or ``overwrite``, a resume
    of something this package did not start, and deleting anything but a Zarr
    store or an empty folder.
    """
    from digital_stain.core.arrays import InputError

    if not output.exists():
        return None
    if resume:
        stored = read_state(output)
        if stored is None:
            raise InputError(f"{output} exists but is not a store this tool started (no digital_stain record), "
                             "so there is nothing to resume; choose another output or pass --overwrite.")
        return stored
    if not overwrite:
        raise InputError(f"{output} already exists; pass --resume (resume=True) to finish it, --overwrite "
                         "(overwrite=True) to replace it, or choose another output.")
    if output.is_dir() and not output.is_symlink() and (read_state(output) is not None or not any(output.iterdir())):
        shutil.rmtree(output)  # only a store this package wrote, or an empty folder
        return None
    what = "Zarr store" if looks_like_zarr(output) else "folder" if output.is_dir() else "file"
    raise InputError(f"{output} is a {what} that digital-stain did not write; --overwrite only replaces a stained "
                     "store this tool wrote, so it is not deleted. Choose another output.")


class SlideStore:
    """The OME-Zarr store of one stained slide (see the module docstring for the layout).

    Open an existing store with ``SlideStore(path)``; make one with
    :meth:`create`. Only the path is pickled, so a store can be handed to
    other processes; each opens the arrays it writes.

    Parameters
    ----------
    path : path-like
        The store's folder (``*.ome.zarr``).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._group = None
        self._arrays: dict = {}

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    # -- opening and creating ---------------------------------------------------
    @property
    def group(self):
        if self._group is None:
            import zarr

            self._group = zarr.open_group(str(self.path), mode="r+")  # format 2 (NGFF 0.4) or 3 (0.5)
        return self._group

    @property
    def state(self) -> dict:
        """The root's ``digital_stain`` attributes (provenance, settings, statistics, progress state)."""
        return dict(self.group.attrs["digital_stain"])

    @property
    def grid(self) -> Grid:
        return Grid.from_dict(self.state["grid"])

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(self.state["settings"]["outputs"])

    @classmethod
    def create(cls, path: str | os.PathLike, state: dict, calibration: Calibration | None = None) -> SlideStore:
        """Make (or complete, after a crash during creation) the store's groups, arrays and metadata.

        ``state`` is the root's ``digital_stain`` record; it must hold
        ``grid`` (:meth:`Grid.as_dict`) and ``settings.outputs``; ``settings.ngff``
        (``"0.4"``, the default, or ``"0.5"``) chooses the NGFF version and with it the
        Zarr format. Its ``statistics`` (a list) go to ``norm_statistics.json`` and the
        record names that file. ``calibration`` is the input's, given to every level.
        Arrays that exist are kept, so calling this on a half-made store is safe.
        """
        import zarr

        path = Path(path)
        version = ngff_version(state)
        root = zarr.open_group(str(path), mode="a", zarr_format=ZARR_FORMATS[version])
        grid = Grid.from_dict(state["grid"])
        outputs = tuple(state["settings"]["outputs"])
        primary = sorted(outputs, key=PRIMARY_ORDER.index)
        if isinstance(state.get("statistics"), list):  # 48 KB that every reader would print: a file beside
            state = {**state, "statistics": _write_statistics(path, state["statistics"])}
        # the record goes first: a store with it is resumable; arrays missing after a crash are made below
        root.attrs.update({"digital_stain": state})
        summary = {key: state[key] for key in ("package", "model", "settings") if key in state}
        for output in primary:
            group = root.require_group(output)
            rgb = output in RGB_OUTPUTS
            for level, (height, width) in enumerate(grid.levels):
                require_array(group, str(level), (3, height, width) if rgb else (height, width),
                               (3, grid.chunk, grid.chunk) if rgb else (grid.chunk, grid.chunk), compress=True,
                               dimensions=("c", "y", "x") if rgb else ("y", "x"))
            group.attrs.update({**_ngff(version, [multiscale_entry(output, grid, calibration, prefix="", version=version)],
                                        _omero(output, version) if rgb else None),
                                "digital_stain": {**summary, "output": output}})
        progress = root.require_group("progress")
        for level in range(len(grid.levels)):
            require_array(progress, str(level), grid.counts(level), (1, 1), compress=False)
        root.attrs.update(_ngff(
            version, [multiscale_entry(output, grid, calibration, prefix=f"{output}/", version=version) for output in primary],
            _omero(primary[0], version) if primary[0] in RGB_OUTPUTS else None))
        return cls(path)

    def update_state(self, **changes) -> None:
        """Change entries of the root's ``digital_stain`` record (one rewrite of ``.zattrs`` or ``zarr.json``)."""
        self.group.attrs.update({"digital_stain": {**self.state, **changes}})

    def clean_partial_files(self) -> int:
        """Remove temporary files a killed zarr write left behind (``*.partial``); returns how many."""
        removed = 0
        for partial in self.path.rglob("*.partial"):
            partial.unlink(missing_ok=True)
            removed += 1
        return removed

    # -- units ------------------------------------------------------------------
    def array(self, output: str, level: int):
        key = (output, level)
        if key not in self._arrays:
            # every chunk is written, an all-black one too: zarr's check for chunks equal to the fill
            # value (write_empty_chunks=False) costs 14 ms per 1024-px RGB chunk, half of the write
            self._arrays[key] = self.group[f"{output}/{level}"].with_config({"write_empty_chunks": True})
        return self._arrays[key]

    def read(self, output: str, level: int, box: tuple[int, int, int, int]) -> np.ndarray:
        """A stored region ``(y0, y1, x0, x1)``: uint8 ``(h, w)`` for enhanced, ``(h, w, 3)`` otherwise."""
        y0, y1, x0, x1 = box
        array = self.array(output, level)
        if array.ndim == 3:
            return np.ascontiguousarray(array[:, y0:y1, x0:x1].transpose(1, 2, 0))
        return array[y0:y1, x0:x1]

    def write(self, output: str, level: int, box: tuple[int, int, int, int], data: np.ndarray) -> None:
        """Store uint8 ``data`` (``(h, w)`` or ``(h, w, 3)``) at ``box`` and flush its chunk files to disk.

        ``box`` must cover whole stored chunks (or reach the array's edge), as
        every unit of :class:`Grid` does, so no other unit shares its files.
        """
        y0, y1, x0, x1 = box
        array = self.array(output, level)
        if array.ndim == 3:
            array[:, y0:y1, x0:x1] = data.transpose(2, 0, 1)
        else:
            array[y0:y1, x0:x1] = data
        c = array.chunks[-1]
        lead = (0,) * (array.ndim - 2)
        files = [self.path / array.path / array.metadata.encode_chunk_key((*lead, i, j))
                 for i in range(y0 // c, math.ceil(y1 / c)) for j in range(x0 // c, math.ceil(x1 / c))]
        _fsync(files)

    def done(self, level: int) -> np.ndarray:
        """bool ``(units Y, units X)``: which units of ``level`` are written (all True once the store is complete)."""
        if self.state.get("complete"):
            return np.ones(self.grid.counts(level), dtype=bool)
        return self.group[f"progress/{level}"][:] > 0

    def mark_done(self, level: int, key: tuple[int, int]) -> None:
        """Record unit ``key`` of ``level`` as written (call after :meth:`write` returned for every output)."""
        array = self.group[f"progress/{level}"]
        array[key] = 1
        _fsync([self.path / array.path / array.metadata.encode_chunk_key(key)])

    def build_level_unit(self, level: int, key: tuple[int, int]) -> None:
        """Make unit ``key`` of pyramid ``level`` (>= 1) from the stored level above, write it and mark it done."""
        grid = self.grid
        y0, y1, x0, x1 = grid.box(level, key)
        height, width = grid.levels[level - 1]
        above = (2 * y0, min(2 * y1, height), 2 * x0, min(2 * x1, width))
        for output in self.outputs:
            # in the stored layout, (3, h, w) for colour: transposing to (h, w, 3) and back took
            # two thirds of a unit's time
            array = self.array(output, level - 1)
            stored = array[..., above[0] : above[1], above[2] : above[3]]
            small = downsample(stored, axes=(-2, -1))
            self.write(output, level, (y0, y1, x0, x1), small.transpose(1, 2, 0) if small.ndim == 3 else small)
        self.mark_done(level, key)

    def finish(self, **changes) -> None:
        """Mark the store complete and remove the progress record (readers then see only the images)."""
        self.update_state(complete=True, **changes)
        shutil.rmtree(self.path / "progress", ignore_errors=True)


def ngff_version(state: dict) -> str:
    """The NGFF version a store's record asks for (stores written before the choice: 0.4)."""
    return str(state.get("settings", {}).get("ngff", NGFF_VERSION))


def require_array(group, name: str, shape: tuple, chunks: tuple, *, compress: bool, dimensions: tuple = (),
                  dtype="uint8"):
    """The array ``name`` of ``group``, made (zero-filled, Blosc zstd when ``compress``) if it is not there."""
    if name in group:
        return group[name]
    # zstd level 1: within 2 % of level 5's size on stained tiles, and 4-5x faster to write (11 ms
    # against 49 ms per 1024-px RGB chunk on the development CPU), which a GPU would otherwise wait for
    if group.metadata.zarr_format == 2:
        import numcodecs

        compressor = numcodecs.Blosc(cname="zstd", clevel=1, shuffle=numcodecs.Blosc.SHUFFLE) if compress else None
        return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                                  compressors=compressor, chunk_key_encoding={"name": "v2", "separator": "/"})
    from zarr.codecs import BloscCodec

    compressor = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle") if compress else None
    # NGFF 0.5 asks each array to name its dimensions as the multiscale's axes do
    return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                              compressors=compressor, dimension_names=dimensions or None)


def ngff_attributes(version: str, metadata: dict) -> dict:
    """NGFF ``metadata`` as a group's attributes: at the top for 0.4, under ``"ome"`` with the version for 0.5."""
    return metadata if version == "0.4" else {"ome": {"version": version, **metadata}}


def _ngff(version: str, multiscales: list, omero: dict | None) -> dict:
    """The NGFF attributes of a group: at the top for 0.4, under ``"ome"`` (with the version once) for 0.5."""
    return ngff_attributes(version, {"multiscales": multiscales, **({"omero": omero} if omero is not None else {})})


def multiscale_entry(output: str, grid: Grid, calibration: Calibration | None, prefix: str, version: str = NGFF_VERSION) -> dict:
    """One NGFF ``multiscales`` entry for ``output``; dataset paths start with ``prefix``.

    0.4 entries carry their ``version``; 0.5 states it once, beside them (:func:`_ngff`).

    Every level has a scale and a translation: the input's pixel size and origin (one pixel at 0
    when it states none), doubled and moved in half a pixel per level (:meth:`Calibration.level`).
    """
    calibration = calibration or Calibration((1.0, 1.0), None)
    unit = {"unit": calibration.unit} if calibration.unit else {}
    rgb = output in RGB_OUTPUTS
    axes = ([{"name": "c", "type": "channel"}] if rgb else []) + [
        {"name": name, "type": "space", **unit} for name in ("y", "x")]
    datasets = []
    for level in range(len(grid.levels)):
        scale, translation = calibration.level(level)
        scale, translation = ([1.0, *scale], [0.0, *translation]) if rgb else (list(scale), list(translation))
        datasets.append({"path": f"{prefix}{level}", "coordinateTransformations": [
            {"type": "scale", "scale": scale}, {"type": "translation", "translation": translation}]})
    return {**({"version": version} if version == "0.4" else {}), "name": output, "axes": axes,
            "datasets": datasets, "type": "mean",
            "metadata": {"description": "2 x 2 mean of the level above, rounded half up; uint8",
                         "method": "digital_stain.slide.store.downsample"}}


STATISTICS_FILE = "norm_statistics.json"


def _write_statistics(path: Path, statistics: list) -> str:
    """Write the student's norm statistics to ``path/norm_statistics.json`` atomically; returns the name."""
    target = path / STATISTICS_FILE
    partial = target.with_name(target.name + ".partial")
    partial.write_text(json.dumps(statistics))
    _fsync([partial])
    os.replace(partial, target)
    _fsync([target])
    return STATISTICS_FILE


def stored_statistics(path: str | os.PathLike, state: dict) -> list | None:
    """The norm statistics a store's record holds: from the file it names, or inline (stores written before the file)."""
    statistics = state.get("statistics")
    if isinstance(statistics, str):
        from digital_stain.core.arrays import InputError

        try:
            return json.loads((Path(path) / statistics).read_text())
        except (OSError, ValueError) as err:
            raise InputError(f"{path}: its norm statistics ({statistics}) cannot be read ({err}); the store cannot "
                             "be resumed. Pass --overwrite (overwrite=True) to start again.") from err
    return statistics


def _omero(output: str, version: str = NGFF_VERSION) -> dict:
    """Rendering settings: the three channels as red, green and blue, 0..255 (so viewers show the colours as stored)."""
    channels = [{"label": label, "color": color, "active": True, "coefficient": 1.0, "family": "linear",
                 "inverted": False, "window": {"start": 0, "end": 255, "min": 0, "max": 255}}
                for label, color in CHANNELS]
    return {**({"version": version} if version == "0.4" else {}), "name": output,
            "rdefs": {"model": "color", "defaultZ": 0, "defaultT": 0}, "channels": channels}
