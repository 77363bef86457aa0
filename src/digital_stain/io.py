"""Reading and writing images: PNG/JPEG, TIFF, OME-Zarr; atomic writes.

Readers return numpy arrays with channels last, ``(..., Y, X[, C])``;
``read_image(..., lazy=True)`` returns a dask array for TIFF and OME-Zarr so
that whole slides are not loaded into memory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .arrays import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
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


def read_image(path: str | os.PathLike, *, lazy: bool = False):
    """Read one image.

    Parameters
    ----------
    path : path-like
        PNG/JPEG/BMP (via Pillow), TIFF (tifffile) or OME-Zarr (level 0).
    lazy : bool
        Return a dask array for TIFF and OME-Zarr instead of loading them.

    Returns
    -------
    ndarray or dask array, channels last.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist.")
    name = path.name.lower()
    try:
        if path.is_dir() or name.endswith(ZARR_SUFFIXES):
            return _read_zarr(path, lazy=lazy)
        if name.endswith((".tif", ".tiff")):
            return _read_tiff(path, lazy=lazy)
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


def _refuse_16bit_colour_png(path: Path) -> None:
    """Pillow reads 16-bit RGB(A) PNGs as 8-bit, silently; refuse them rather than lose the low byte."""
    with open(path, "rb") as fh:
        head = fh.read(26)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and head[24] == 16 and head[25] in (2, 6):
        raise InputError(
            f"{path} is a 16-bit colour PNG, which cannot be read here without losing its low 8 bits; "
            "save it as a 16-bit TIFF instead."
        )


def _read_tiff(path: Path, *, lazy: bool):
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes = series.axes
        if not lazy:
            data = series.asarray()
    if lazy:
        import dask.array as da
        import zarr

        store = tifffile.imread(path, aszarr=True)
        node = zarr.open(store, mode="r")
        data = da.from_zarr(node if hasattr(node, "shape") else node["0"])
    return _channels_last(data, axes)


def _channels_last(data, axes: str):
    """Move a leading 'C'/'S' axis of a TIFF to the end so RGB is (Y, X, 3)."""
    if "S" in axes or "C" not in axes:
        return data
    c = axes.index("C")
    if data.shape[c] in (3, 4) and c < len(axes) - 1:
        return np.moveaxis(data, c, -1) if isinstance(data, np.ndarray) else data.transpose(
            [i for i in range(data.ndim) if i != c] + [c]
        )
    return data


def _read_zarr(path: Path, *, lazy: bool):
    import dask.array as da
    import zarr

    try:
        group = zarr.open(str(path), mode="r")
    except Exception as err:
        raise InputError(f"{path} is not a readable Zarr store ({err}).") from err
    if hasattr(group, "shape"):  # a bare array
        array, axes = group, None
    else:
        multiscales = group.attrs.get("multiscales") or group.attrs.get("ome", {}).get("multiscales")
        if not multiscales:
            raise InputError(f"{path} is a Zarr group without OME-Zarr 'multiscales' metadata; write it as OME-Zarr.")
        first = multiscales[0]
        array = group[first["datasets"][0]["path"]]
        axes = "".join(a["name"] if isinstance(a, dict) else a for a in first.get("axes", [])).upper() or None
    data = da.from_zarr(array)
    if axes and "C" in axes:
        data = _channels_last(data, axes)
    return data if lazy else data.compute()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; move it into place only if the block succeeds.

    Works for files and folders. On any error the temporary is removed and
    ``target`` is untouched.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise InputError(f"{target} already exists; choose another output path or pass --overwrite.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    staged = tmp / target.name
    try:
        yield staged
        if not staged.exists():
            raise RuntimeError(f"nothing was written for {target}")
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


def _default_permissions(path: Path) -> None:
    """Give a staged result the permissions a plain new file/folder would have (mkdtemp makes them private)."""
    umask = os.umask(0)
    os.umask(umask)
    for entry in [path, *path.rglob("*")] if path.is_dir() else [path]:
        entry.chmod((0o777 if entry.is_dir() else 0o666) & ~umask)


def write_image(path: str | os.PathLike, image: np.ndarray, *, overwrite: bool = False, rgb: bool | None = None) -> Path:
    """Write an image atomically; format from the suffix.

    Parameters
    ----------
    image : ndarray
        ``(Y, X)`` gray or ``(Y, X, 3)`` RGB; for TIFF also stacks ``(Z, Y, X)`` /
        ``(Z, Y, X, 3)``, written one page per plane.
    rgb : bool, optional
        Whether the last axis is colour; default: it has length 3 or 4.
    """
    path = Path(path)
    rgb = image.shape[-1] in (3, 4) if rgb is None else rgb
    suffix = path.suffix.lower()
    with atomic_path(path, overwrite=overwrite) as tmp:
        if suffix in (".tif", ".tiff"):
            import tifffile

            tifffile.imwrite(tmp, image, photometric="rgb" if rgb else "minisblack")
        elif suffix in (".png", ".jpg", ".jpeg", ".bmp"):
            from PIL import Image

            if image.ndim != (3 if rgb else 2):
                raise InputError(f"a {image.shape} array cannot be written as one {suffix} image; use .tif for stacks.")
            Image.fromarray(np.asarray(image)).save(tmp)
        else:
            raise InputError(f"unknown output format {suffix!r}; use .png or .tif.")
    return path
