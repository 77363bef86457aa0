"""Reading and writing images: PNG/JPEG, TIFF, OME-Zarr; atomic writes.

Readers return numpy arrays with channels last, ``(..., Y, X[, C])``;
``read_image(..., lazy=True)`` returns a dask array for TIFF and OME-Zarr so
that whole slides are not loaded into memory, and :func:`open_source` opens
one whole-slide plane lazily for :mod:`digital_stain.slide.run`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from digital_stain.core.arrays import InputError, split_planes
from digital_stain.io.calibration import Calibration, from_ngff, from_tiff, tiff_options

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".btf", ".svs", ".ndpi")  # the last: TIFF inside
ZARR_SUFFIXES = (".zarr", ".ome.zarr")


def is_image_path(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(IMAGE_SUFFIXES) or path.is_dir() and name.endswith(ZARR_SUFFIXES)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files (and ``.zarr`` stores) directly in ``folder``, sorted by name; hidden files skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder.")
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and is_image_path(p))


def broken_links(folder: str | os.PathLike) -> list[str]:
    """Names of the links in ``folder`` that lead nowhere (dangling, or a loop): listed, since they are skipped."""
    broken = []
    for entry in sorted(Path(folder).iterdir()):
        if entry.is_symlink() and not entry.name.startswith("."):
            try:
                entry.resolve(strict=True)
            except (OSError, RuntimeError):  # missing target, or a loop
                broken.append(entry.name)
    return broken


def read_image(path: str | os.PathLike, *, lazy: bool = False, chunk: int | None = None,
               notes: list | None = None):
    """Read one image.

    Parameters
    ----------
    path : path-like
        PNG/JPEG/BMP (via Pillow), TIFF/BigTIFF (tifffile) or OME-Zarr (level 0).
    lazy : bool
        Return a dask array for TIFF and OME-Zarr instead of loading them
        (TIFF through tifffile's Zarr store: tiles or strips are read on demand).
    chunk : int, optional
        With ``lazy``: when the stored chunks' Y or X side is outside
        ``GOOD_CHUNK_SIDES`` (256..4096 px), read in ``chunk``-px pieces
        instead, and say so: appended to ``notes`` when given, else logged as
        a warning (``digital_stain.io.images`` logger).

    Returns
    -------
    ndarray or dask array, channels last ``(..., Y, X[, C])``, in the file's own dtype.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist.")
    name = path.name.lower()
    try:
        if path.is_dir() or name.endswith(ZARR_SUFFIXES):
            return _read_zarr(path, lazy=lazy, chunk=chunk, notes=notes)
        if is_tiff(path):  # by the file's signature: a TIFF named .png is still read as the TIFF it is
            return _read_tiff(path, lazy=lazy, chunk=chunk, notes=notes)
        from PIL import Image, UnidentifiedImageError

        _refuse_16bit_colour_png(path)

        try:
            with Image.open(path) as im:
                im.load()
                if im.mode in ("P", "PA", "LA", "CMYK", "YCbCr", "HSV", "1"):
                    im = im.convert("RGBA" if "A" in im.mode else "RGB")
                return np.asarray(im)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise InputError(f"cannot read {path} as an image ({err}); is the file complete and an image?") from err
    except InputError:
        raise
    except Exception as err:  # tifffile/zarr raise many types for broken files
        raise InputError(f"cannot read {path} as an image ({type(err).__name__}: {err}).") from err


TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and Big TIFF, both byte orders


def is_tiff(path: Path) -> bool:
    """Whether the file starts with a TIFF signature (whatever its name says)."""
    with open(path, "rb") as fh:
        return fh.read(4) in TIFF_SIGNATURES


def _refuse_16bit_colour_png(path: Path) -> None:
    """Pillow reads 16-bit RGB(A) PNGs as 8-bit, silently; refuse them rather than lose the low byte."""
    with open(path, "rb") as fh:
        head = fh.read(26)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and head[24] == 16 and head[25] in (2, 6):
        raise InputError(
            f"{path} is a 16-bit colour PNG, which cannot be read here without losing its low 8 bits; "
            "save it as a 16-bit TIFF instead."
        )


def _read_tiff(path: Path, *, lazy: bool, chunk: int | None = None, notes: list | None = None):
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes = series.axes
        order = arrangement(axes, series.shape, path)  # refuses what is not Y, X and gray or RGB, before reading
        _check_decodable(series, path)
        if not lazy:
            check_fits_in_memory(series.shape, order, series.dtype, path)
            data = series.asarray()
    if lazy:
        import zarr

        store = tifffile.imread(path, aszarr=True)
        node = zarr.open(store, mode="r")
        data = _lazy_array(node if hasattr(node, "shape") else node["0"], axes, chunk, path, notes)
    return _arrange(data, order)


def _check_decodable(series, path: Path) -> None:
    """Decode the first stored tile or strip of ``series`` (level 0), so that a compression we cannot
    decode is refused here, by name, rather than as a failure halfway through a slide."""
    page = (series.levels[0] if getattr(series, "levels", None) else series).pages[0]
    page = page.aspage() if hasattr(page, "aspage") else page
    if page is None or int(page.compression) == 1:  # uncompressed
        return
    try:
        next(iter(page.segments()))
    except StopIteration:
        return
    except Exception as err:  # tifffile and imagecodecs raise ValueError, KeyError, RuntimeError or their own
        name = getattr(page.compression, "name", str(page.compression))
        raise InputError(
            f"{path} is compressed as {name}, which cannot be decoded here ({type(err).__name__}: {err}). "
            "LZW, Deflate, Zstandard, JPEG, JPEG 2000 and JPEG XR TIFFs (and SVS and NDPI slides) are read; "
            "convert this one to one of those, or to OME-Zarr (e.g. with QuPath or bfconvert)."
        ) from err


COLOUR_AXES = "SC"  # tifffile: S samples per pixel; OME: C channels


def arrangement(axes: str, shape: tuple[int, ...], path) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """How to bring a file's axes into our order: ``(transpose order, colour axes to drop, colours)``.

    Our order is planes (every other axis, in the file's order), then Y, X, then colour if any
    (:mod:`digital_stain.core.arrays`). A colour axis (``S`` or ``C``) must hold 1 (gray), 3 (RGB) or 4
    (RGBA) values; one of length 1 is dropped. Anything else (2 channels, 8 samples per pixel,
    channels on two axes, no Y or X) is refused with the file's axes in the message.
    """
    axes = axes.upper()
    described = " x ".join(f"{a}={n}" for a, n in zip(axes, shape)) or "none"
    if "Y" not in axes or "X" not in axes:
        raise InputError(f"{path} has no Y and X axes (its axes: {described}); it is not an image this tool stains.")
    colour = [i for i, a in enumerate(axes) if a in COLOUR_AXES and shape[i] > 1]
    if len(colour) > 1:
        raise InputError(f"{path} has colour on two axes ({described}); save it as one gray or RGB image per plane.")
    if colour and shape[colour[0]] not in (3, 4):
        raise InputError(
            f"{path} has {shape[colour[0]]} channels ({described}); dark-field input must be gray (1 channel) or "
            "RGB (3; RGBA's alpha is dropped). Pick one channel, or merge the channels to RGB first.")
    drop = tuple(i for i, a in enumerate(axes) if a in COLOUR_AXES and shape[i] == 1)
    planes = [i for i, a in enumerate(axes) if a not in "YX" and i not in colour and i not in drop]
    return (*planes, axes.index("Y"), axes.index("X"), *colour, *drop), drop, shape[colour[0]] if colour else 1


def _arrange(data, order: tuple):
    """``data`` in our axis order (see :func:`arrangement`); numpy or dask."""
    transpose, drop, _ = order
    if tuple(transpose) != tuple(range(data.ndim)):
        data = data.transpose(transpose)
    if drop:
        data = data[(Ellipsis, *(0,) * len(drop))]  # the dropped length-1 colour axes were moved last
    return data


# An image read whole must leave room to stain it: its float32 RGB copy (what the networks read,
# one of several working arrays) has to fit in the memory available now.
def check_fits_in_memory(shape: tuple[int, ...], order: tuple, dtype, path) -> None:
    """Refuse, from the declared shape and before reading, an image too large to stain in memory.

    ``order`` is :func:`arrangement`'s (its colour axis is not counted as pixels).
    """
    transpose, drop, colours = order
    spatial = [shape[i] for i in transpose[:len(transpose) - len(drop) - (colours > 1)]]
    pixels = float(np.prod(spatial, dtype=np.float64))
    need = pixels * 3 * 4
    available = _available_memory()
    if available is not None and need > available:
        size = " x ".join(map(str, spatial))
        raise InputError(
            f"{path} declares {size} px ({np.dtype(dtype).name}), {need / 2**30:.1f} GiB as the float image staining "
            f"reads, more than the {available / 2**30:.1f} GiB of memory available. Stain it chunk by chunk to "
            f"OME-Zarr instead (-o {Path(path).stem}-stained.ome.zarr), or crop it first.")


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on this platform: do not guess
        return None


# Stored chunks whose sides lie in this range are read as they are; others are read in pieces
# of the caller's chunk (a whole-slide reader needs regions, not one-pixel strips or whole images).
GOOD_CHUNK_SIDES = (256, 4096)


def chunking_note(sides: tuple[int, int], shape: tuple[int, int], chunk: int, what: str) -> str | None:
    """A sentence saying why an input's (Y, X) chunk sides are re-cut into ``chunk``-px pieces, or None if fine.

    ``shape`` is the image's (Y, X): a chunk spanning a whole (short) axis is never "too small".
    """
    low, high = GOOD_CHUNK_SIDES
    small = [s < low and s < n for s, n in zip(sides, shape)]
    large = [s > high for s in sides]
    if not any(small) and not any(large):
        return None
    if any(large):
        why = (f"larger than {high} px: every read decodes a whole stored chunk, so reading is slower and "
               "memory grows with the stored chunk")
    else:
        why = f"smaller than {low} px: each region needs many small reads, which is slow"
    return (f"{what} is stored in chunks of {sides[0]} x {sides[1]} px, {why}; it is read in {chunk}-px pieces. "
            f"Rewrite it with chunks of {low}-{high} px (e.g. 1024) to make this faster.")


def _lazy_array(node, axes: str | None, chunk: int | None, path: Path, notes: list | None = None):
    """A dask array over a zarr array; Y/X re-cut into ``chunk``-px pieces when the stored chunks are out of range.

    The note saying so goes to ``notes`` when given, else to the ``digital_stain.io.images`` log as a warning.
    """
    import dask.array as da

    if chunk is None or not axes or "Y" not in axes or "X" not in axes:
        return da.from_zarr(node)
    y, x = axes.index("Y"), axes.index("X")
    stored = tuple(node.chunks)
    note = chunking_note((stored[y], stored[x]), (node.shape[y], node.shape[x]), chunk, str(path))
    if note is None:
        return da.from_zarr(node)
    if notes is not None:
        notes.append(note)
    else:
        logging.getLogger("digital_stain.io.images").warning(note)
    # whole stored chunks on the other axes (channels, planes); zarr slices each piece out of the stored chunks
    chunks = [chunk if i in (y, x) else stored[i] for i in range(len(stored))]
    return da.from_zarr(node, chunks=tuple(chunks))


def _not_zarr_message(path: Path) -> str:
    return (f"{path} is a folder but not a Zarr store (it has no .zgroup, .zarray or zarr.json); "
            "give the OME-Zarr store itself (the folder holding .zattrs or zarr.json), an image file, "
            "or a folder of image files.")


def ngff_multiscales(attrs: dict) -> list:
    """A group's ``multiscales`` entries: NGFF 0.4 keeps them at the top, 0.5 under ``ome``; [] if none."""
    return attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales") or []


def open_ome_zarr(path: Path):
    """The level-0 array of an OME-Zarr image, its axis names (e.g. ``"CYX"``) and its multiscale entry.

    Accepts NGFF 0.4 (``multiscales`` in the group's attributes) and 0.5
    (under ``ome``), and bioformats2raw stores (the first image, ``0/``).
    A plain Zarr array or a group without ``multiscales`` is refused: nothing
    says which of its axes is Y, X or colour.
    """
    import zarr

    path = Path(path)
    if path.is_dir() and not any((path / name).exists() for name in (".zgroup", ".zarray", "zarr.json")):
        raise InputError(_not_zarr_message(path))
    try:
        group = zarr.open(str(path), mode="r")
    except Exception as err:
        raise InputError(f"{path} is not a readable Zarr store ({type(err).__name__}: {err}).") from err
    if hasattr(group, "shape"):
        raise InputError(
            f"{path} is a plain Zarr array {tuple(group.shape)}, not OME-Zarr: nothing says which axis is Y, X or "
            "colour. Write it as OME-Zarr (a group with 'multiscales' metadata), or open it in Python and pass "
            "dask.array.from_zarr(...) with axes (Y, X[, C])."
        )
    attrs = dict(group.attrs)
    if "bioformats2raw.layout" in attrs and "0" in group:  # a converted slide: its first image
        group = group["0"]
        attrs = dict(group.attrs)
    multiscales = ngff_multiscales(attrs)
    if not multiscales:
        raise InputError(f"{path} is a Zarr group without OME-Zarr 'multiscales' metadata; write it as OME-Zarr.")
    first = multiscales[0]
    try:
        array = group[first["datasets"][0]["path"]]
    except (KeyError, IndexError, TypeError) as err:
        raise InputError(f"{path}: its OME-Zarr metadata names level-0 data that is not in the store ({err}).") from err
    axes = "".join(a["name"] if isinstance(a, dict) else a for a in first.get("axes", [])).upper() or None
    return array, axes, first


def read_calibration(path: str | os.PathLike) -> Calibration | None:
    """The pixel size, unit and origin a file or OME-Zarr store states, or None (see :mod:`digital_stain.io.calibration`).

    Reads metadata only. PNG and JPEG state none that microscopes use.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist.")
    if path.is_dir():
        _, axes, multiscale = open_ome_zarr(path)
        return from_ngff(multiscale, list(axes)) if axes else None
    if not is_tiff(path):
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return from_tiff(tif)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path}: cannot read its TIFF metadata ({err}).") from err


def _read_zarr(path: Path, *, lazy: bool, chunk: int | None = None, notes: list | None = None):
    array, axes, _ = open_ome_zarr(path)
    if axes is not None and len(axes) != array.ndim:
        raise InputError(f"{path}: its OME-Zarr metadata names {len(axes)} axes ({axes}) for a {array.ndim}-D "
                         f"array {tuple(array.shape)}; the store is inconsistent.")
    order = arrangement(axes, tuple(array.shape), path) if axes else None
    hole_note = _missing_chunks_note(array, path)
    if hole_note is not None:  # zarr reads a missing chunk as its fill value, silently: say so
        (notes.append(hole_note) if notes is not None else logging.getLogger("digital_stain.io.images").warning(hole_note))
    if not lazy:
        if order is not None:
            check_fits_in_memory(tuple(array.shape), order, array.dtype, path)
    data = _lazy_array(array, axes, chunk if lazy else None, path, notes)
    if order is not None:
        data = _arrange(data, order)
    return data if lazy else data.compute()


def _missing_chunks_note(array, path: Path) -> str | None:
    try:
        total, stored = int(array.nchunks), int(array.nchunks_initialized)
    except Exception:  # a store that cannot list its keys: nothing to say
        return None
    if stored >= total:
        return None
    return (f"{path}: {total - stored} of {total} stored chunks of the full-resolution image are missing and "
            "are read as empty (fill value): the stain has holes there. Re-export the slide if that is not intended.")


def reading_failed(err: BaseException) -> bool:
    """Whether ``err`` was raised inside a file-format library while decoding the input (a damaged file or
    store), rather than in our own code."""
    import traceback

    libraries = ("zarr", "numcodecs", "tifffile", "imagecodecs", "blosc", "PIL", "zlib")
    modules = [frame.f_globals.get("__name__", "") for frame, _ in traceback.walk_tb(err.__traceback__)]
    return bool(modules) and modules[-1].split(".")[0] in libraries


# -- whole slides -----------------------------------------------------------------
@dataclass
class Source:
    """A lazily read dark-field plane.

    Attributes
    ----------
    array : dask array, shape (Y, X) or (Y, X, C), C in {1, 3, 4}
        Level 0 in its own dtype (uint8, uint16 or float); chunked for reading.
    name : str
        The path it came from, or what kind of array it was (for provenance).
    calibration : Calibration, optional
        Level 0's pixel size, unit and origin from the file's metadata (OME-TIFF,
        SVS, ImageJ or TIFF resolution tags, OME-Zarr), copied to the output.
    notes : list of str
        What was done to read it (e.g. re-cut chunks); also logged as warnings.
    path : Path, optional
        The file or store it was read from (an output must not replace it).
    """

    array: object
    name: str
    calibration: Calibration | None = None
    notes: list[str] = field(default_factory=list)
    path: Path | None = None


def open_source(source, *, chunk: int = 1024) -> Source:
    """Open a dark-field slide lazily.

    Parameters
    ----------
    source : path-like, ndarray, dask array, zarr array or Source
        An OME-Zarr store (level 0; NGFF 0.4/0.5, bioformats2raw), a TIFF or
        BigTIFF (tiles or strips read on demand), a PNG/JPEG (read whole), or
        an array ``(Y, X[, C])`` already in memory or lazy. Leading axes of
        length 1 (OME-Zarr ``t``, ``z``) are dropped.
    chunk : int
        Reading piece for inputs whose stored chunks are under 256 px or over
        4096 px on a side (they are re-cut, with a warning in the
        ``digital_stain.io.images`` log and in ``notes``).

    Returns
    -------
    Source

    Raises
    ------
    InputError
        A path that does not exist, a folder that is not a Zarr store, a Zarr
        store that is not OME-Zarr, a stack of several planes, a plane under
        8 x 8 px, or a pixel type that cannot be stained.
    """
    import dask.array as da

    if isinstance(source, Source):
        return source
    notes: list[str] = []
    calibration = path = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise InputError(f"{path} does not exist.")
        name = str(path)
        array = read_image(path, lazy=True, chunk=chunk, notes=notes)
        calibration = read_calibration(path)
        if isinstance(array, np.ndarray):  # PNG/JPEG: small enough to have been read whole
            array = da.from_array(array, chunks=(chunk, chunk, *array.shape[2:]))
    elif isinstance(source, da.Array):
        array, name = source, "dask array"
    elif hasattr(source, "shape") and hasattr(source, "dtype"):
        name = f"{type(source).__module__.split('.')[0]} array"
        array = da.from_zarr(source) if name == "zarr array" else da.asarray(source)
        if isinstance(source, np.ndarray):
            array = array.rechunk((chunk, chunk, *array.shape[2:]))
    else:
        raise InputError(f"cannot stain a {type(source).__name__}; give a path, a numpy array or a dask array.")
    array = _one_plane(array, name)
    if name in ("dask array", "zarr array"):
        note = chunking_note((max(array.chunks[0]), max(array.chunks[1])), array.shape[:2], chunk, f"the {name}")
        if note is not None:
            notes.append(note)
            array = array.rechunk({0: chunk, 1: chunk})
    for note in notes:
        logging.getLogger("digital_stain.io.images").warning(note)
    return Source(array, name, calibration, notes, path)


def _one_plane(array, name: str):
    stack, _ = split_planes(tuple(array.shape))
    if any(n != 1 for n in stack):
        raise InputError(
            f"{name} is a stack of {int(np.prod(stack))} planes (shape {tuple(array.shape)}); an OME-Zarr output "
            "holds one plane. Pick one plane (e.g. array[0]) or stain the stack to TIFF (--output a folder)."
        )
    return array[(0,) * len(stack)] if stack else array


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, overwrite: bool = False, owned: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; move it into place only if the block succeeds.

    Works for files and folders; a folder is marked as our output
    (:mod:`digital_stain.io.outputs`). On any error the temporary is removed and
    ``target`` is untouched. An existing ``target`` is replaced only with
    ``overwrite`` and only if it is our own output (or ``owned``: the caller
    knows it is, e.g. our settings file).
    """
    from digital_stain.io.outputs import check_replaceable, mark_folder

    target = Path(target)
    if not (owned and overwrite):
        check_replaceable(target, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    # the pid in the name tells a later run whether the writer is gone (killed mid-write)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
    staged = tmp / target.name
    try:
        yield staged
        if not staged.exists():
            raise RuntimeError(f"nothing was written for {target}")
        if staged.is_dir():
            mark_folder(staged)
        _default_permissions(staged)
        if target.is_dir() and not target.is_symlink():
            # a folder cannot be swapped atomically: move the old one aside, put it back if the swap fails
            old = tmp / f"{target.name}.old"
            os.replace(target, old)
            try:
                os.replace(staged, target)
            except OSError:
                os.replace(old, target)
                raise
        else:
            os.replace(staged, target)  # a file (or nothing) at target is replaced in one step
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


STALE_UNKNOWN_WRITER = 24 * 3600  # seconds: a partial file without a pid in its name is stale after a day


def remove_stale_partials(target: Path) -> list[Path]:
    """Remove what killed writes of ``target`` left beside it (``.NAME.partial-PID-*``, PID no longer running)."""
    import glob
    import time

    from digital_stain.io.outputs import process_running

    removed = []
    for partial in target.parent.glob(f".{glob.escape(target.name)}.partial-*"):
        tail = partial.name[len(f".{target.name}.partial-"):]
        pid = tail.split("-", 1)[0]
        try:
            if pid.isdigit() and "-" in tail:
                if process_running(int(pid)):
                    continue
            elif time.time() - partial.lstat().st_mtime < STALE_UNKNOWN_WRITER:
                continue
            shutil.rmtree(partial) if partial.is_dir() and not partial.is_symlink() else partial.unlink()
            removed.append(partial)
        except OSError:
            continue  # another run removing it, or not ours to remove: leave it
    return removed


def _default_permissions(path: Path) -> None:
    """Give a staged result the permissions a plain new file/folder would have (mkdtemp makes them private)."""
    umask = os.umask(0)
    os.umask(umask)
    for entry in [path, *path.rglob("*")] if path.is_dir() else [path]:
        entry.chmod((0o777 if entry.is_dir() else 0o666) & ~umask)


def _short_write(err: OSError, path: Path, needed: int) -> OSError:
    """tifffile reports a short write as a bare ``OSError("N requested and M written")``, without errno
    or path: name the file and, when the disk has less room than the image, say that it is full."""
    import errno
    import shutil

    folder = next((p for p in (path.parent, *path.parents) if p.exists()), Path("."))
    if shutil.disk_usage(folder).free < needed:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return OSError(errno.EIO, f"the write was cut short ({err})", str(path))


def write_image(path: str | os.PathLike, image: np.ndarray, *, overwrite: bool = False, rgb: bool | None = None,
                calibration: Calibration | None = None) -> Path:
    """Write an image atomically; format from the suffix.

    Parameters
    ----------
    image : ndarray
        ``(Y, X)`` gray or ``(Y, X, 3)`` RGB; for TIFF also stacks ``(Z, Y, X)`` /
        ``(Z, Y, X, 3)``, written one page per plane.
    rgb : bool, optional
        Whether the last axis is colour; default: it has length 3 or 4.
    calibration : Calibration, optional
        The pixel size to record (TIFF: resolution tags in centimetres and, for a
        plane or a Z / T x Z stack, OME-XML); PNG and JPEG do not record it.
    """
    from digital_stain.io.outputs import software

    path = Path(path)
    rgb = image.shape[-1] in (3, 4) if rgb is None else rgb
    suffix = path.suffix.lower()
    with atomic_path(path, overwrite=overwrite) as tmp:
        if suffix in (".tif", ".tiff"):
            import tifffile

            try:
                leading = {0: "", 1: "Z", 2: "TZ"}.get(image.ndim - (3 if rgb else 2), "?")  # OME-XML: planes, Z, T x Z
                tifffile.imwrite(tmp, image, photometric="rgb" if rgb else "minisblack", software=software(),
                                 **tiff_options(calibration, leading + "YX" + ("S" if rgb else "")))
            except OSError as err:
                if err.errno is not None:
                    raise
                raise _short_write(err, path, image.nbytes) from None
        elif suffix in (".png", ".jpg", ".jpeg", ".bmp"):
            from PIL import Image, PngImagePlugin

            if image.ndim != (3 if rgb else 2):
                raise InputError(f"a {image.shape} array cannot be written as one {suffix} image; use .tif for stacks.")
            options = {}
            if suffix == ".png":  # the mark that lets --overwrite replace it later (digital_stain.io.outputs)
                options["pnginfo"] = PngImagePlugin.PngInfo()
                options["pnginfo"].add_text("Software", software())
            Image.fromarray(np.asarray(image)).save(tmp, **options)
        else:
            raise InputError(f"unknown output format {suffix!r}; use .png or .tif.")
    return path
