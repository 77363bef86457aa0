"""What we may replace, and who is writing: the rules that keep a user's own files safe.

Everything this package writes is marked as ours, so that ``overwrite`` can
only ever replace our own output:

* a folder (a folder of stains, synthetic dark-field) holds a small
  ``MARKER`` file;
* an OME-Zarr store holds its ``digital_stain`` record (:func:`digital_stain.slide.store.read_state`);
* a PNG or TIFF carries ``Software: napari-digital-stain ...``, a JSON file a
  top-level ``"written_by"`` of the same kind, a model or checkpoint file the
  ``digital-stain-model`` header, an exported ONNX file a ``written_by`` metadata entry and a
  TorchScript export a ``digital_stain.json`` entry saying so (read from the zip; its pickles never).

:func:`check_replaceable` refuses to replace anything else, and
:func:`check_not_input` refuses an output that is an input, holds one, or lies
inside an input store. :func:`output_lock` lets one writer at a time at an
output: a lock file beside it, created exclusively, with the writer's pid and
host so that a lock left by a killed run is recognised as stale.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

from digital_stain.core.arrays import InputError

MARKER = ".digital-stain-output"
SOFTWARE = "napari-digital-stain"
_JSON_LIMIT = 64 * 1024 * 1024  # a JSON file larger than this is not one of our score files


def software() -> str:
    """The ``Software`` text written into every image and JSON file we write."""
    from digital_stain import __version__

    return f"{SOFTWARE} {__version__}"


def mark_folder(folder: Path) -> None:
    """Mark ``folder`` (being written by us) as our output."""
    (folder / MARKER).write_text(json.dumps({"written_by": software()}) + "\n", encoding="utf-8")


def is_ours(path: str | os.PathLike) -> bool:
    """Whether ``path`` is something this package wrote (see the module docstring); never raises."""
    path = Path(path)
    try:
        if path.is_symlink():
            return False  # replacing a link would replace what the user pointed it at
        if path.is_dir():
            if (path / MARKER).is_file():
                return True
            from digital_stain.slide.store import read_state

            return read_state(path) is not None
        if not path.is_file():
            return False
        return _file_is_ours(path)
    except Exception:  # unreadable, truncated, not what its name says: not ours
        return False


def _file_is_ours(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head.startswith(b"\x89PNG"):
        from PIL import Image

        with Image.open(path) as image:  # reads the chunks before the pixels only
            return str(image.info.get("Software", "")).startswith(SOFTWARE)
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        import tifffile

        with tifffile.TiffFile(path) as tif:
            tag = tif.pages[0].tags.get("Software")
            return tag is not None and str(tag.value).startswith(SOFTWARE)
    if head[8:9] == b"{":  # safetensors: 8-byte header length, then the JSON header
        from digital_stain.io.modelfile import FORMAT

        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as fh:
            return (fh.metadata() or {}).get("format") == FORMAT
    if head.startswith(b"PK\x03\x04"):  # a TorchScript export: a zip; its JSON entry, never its pickles
        import zipfile

        with zipfile.ZipFile(path) as archive:
            entries = [name for name in archive.namelist() if name.endswith("extra/digital_stain.json")]
            return bool(entries) and str(json.loads(archive.read(entries[0])).get("written_by", "")).startswith(SOFTWARE)
    if path.suffix.lower() == ".onnx":
        import onnx

        graph = onnx.load(str(path), load_external_data=False)
        return any(p.key == "written_by" and p.value.startswith(SOFTWARE) for p in graph.metadata_props)
    if head.lstrip()[:1] == b"{" and path.stat().st_size <= _JSON_LIMIT:
        value = json.loads(path.read_text(encoding="utf-8"))
        return isinstance(value, dict) and str(value.get("written_by", "")).startswith(SOFTWARE)
    return False


def check_replaceable(target: str | os.PathLike, *, overwrite: bool) -> None:
    """Refuse an existing ``target`` unless ``overwrite`` is given and it is our own output.

    Raises
    ------
    InputError
        ``target`` exists and ``overwrite`` is false, or ``target`` is not
        something this package wrote (a user's file or folder, a link).
    """
    target = Path(target)
    check_writable(target)
    if not (target.exists() or target.is_symlink()):
        return
    if not overwrite:
        raise InputError(f"{target} already exists; choose another output path or pass --overwrite.")
    if not is_ours(target):
        kind = "link" if target.is_symlink() else "folder" if target.is_dir() else "file"
        raise InputError(f"{target} is a {kind} that digital-stain did not write, so --overwrite will not replace "
                         "it (it only replaces its own outputs). Choose another output path, or move it away "
                         "yourself if you are sure.")


def check_writable(target: str | os.PathLike) -> None:
    """Refuse an output whose folder cannot be written (checked before the work, not after it)."""
    target = Path(os.path.abspath(Path(target).expanduser()))
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"cannot write {target}: {folder} is not a folder.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {target}: the folder {folder} is not writable by you. Choose an output "
                         "in a folder you can write to.")


def check_not_input(output: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse an ``output`` that is one of ``inputs``, a folder holding one, or a path inside an input store.

    An output folder inside an input *folder* (``stain DIR -o DIR/stained``) is allowed: it replaces
    nothing of the input.
    """
    out = _resolved(output)
    for given in inputs:
        source = _resolved(given)
        if out == source:
            raise InputError(f"the output {output} is the input {given}; write the stain somewhere else "
                             "(the input would be replaced by its stain).")
        if out in source.parents:
            raise InputError(f"the output {output} holds the input {given}; writing it would replace the input. "
                             "Choose an output path that does not contain your images.")
        if source in out.parents and source.is_dir() and source.name.lower().endswith(".zarr"):
            raise InputError(f"the output {output} is inside the input store {given}; write it somewhere else.")


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of an output: beside it, hidden."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def output_lock(target: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock of ``target`` for the block: one writer at a time.

    The lock file is created with ``O_EXCL`` and records this process's pid
    and host; it is removed when the block ends. A lock whose process no longer
    runs on this host is stale and taken over.

    Raises
    ------
    InputError
        Another process (or another job of this process) is writing ``target``.
    """
    target = Path(target)
    lock = lock_path(target)
    lock.parent.mkdir(parents=True, exist_ok=True)
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
    for attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            if attempt == 0 and holder is not None and _is_stale(holder):
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
                continue
            raise InputError(_busy_message(target, lock, holder)) from None
        with os.fdopen(fd, "w") as fh:
            fh.write(record)
        break
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()


def _holder(lock: Path) -> dict | None:
    try:
        value = json.loads(lock.read_text(encoding="utf-8"))
        return value if isinstance(value, dict) and isinstance(value.get("pid"), int) else None
    except (OSError, ValueError):
        return None  # being written this instant, or not ours: treat as held


def _is_stale(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return False  # another machine's process cannot be asked
    if holder["pid"] == os.getpid():
        return False  # another job in this process
    return not process_running(holder["pid"])


def process_running(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (under any user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it runs, under another user
    return True


def _busy_message(target: Path, lock: Path, holder: dict | None) -> str:
    who = (f"process {holder['pid']} on {holder.get('host')}" if holder is not None else "another process")
    return (f"{target} is being written by {who} (lock file {lock}). Wait for that run to finish or choose "
            f"another output. If no run is writing it any more, delete {lock} and try again.")
