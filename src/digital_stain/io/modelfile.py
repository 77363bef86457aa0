"""The one-file model bundle: safetensors tensors + JSON metadata + checksum.

Layout of a ``.safetensors`` model file:

* tensors ``enhancer.darkfield_counts``, ``enhancer.brightfield_counts``,
  ``teacher.<param>``, ``student.<param>`` (any subset but the enhancer);
* header metadata (strings): ``format`` = ``digital-stain-model``,
  ``format_version``, ``metadata`` (JSON: architecture config, provenance)
  and ``checksum`` (SHA-256 over every tensor's name, dtype, shape and bytes
  and over the metadata JSON).

Files are written atomically (temporary file, fsync, rename). Loading checks
the format and the checksum; a pickle is never loaded: PyTorch ``.pth``/``.pt``
files are recognised and refused with an explanation.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from digital_stain.core.arrays import InputError
from digital_stain.io.images import atomic_path

FORMAT = "digital-stain-model"
FORMAT_VERSION = 1


class ModelFileError(InputError):
    """A model file is missing, corrupt, tampered with, or not ours."""


def checksum(tensors: dict[str, torch.Tensor], metadata_json: str) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest.update(metadata_json.encode())
    return digest.hexdigest()


def save_bundle(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict, *, overwrite: bool = True) -> str:
    """Write a model file atomically; return its checksum."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata_json = json.dumps(metadata, sort_keys=True)
    digest = checksum(tensors, metadata_json)
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "metadata": metadata_json, "checksum": digest}
    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=header)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    return digest


def _sniff(path: Path) -> None:
    """Refuse files that are plainly not safetensors, before parsing them."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if len(head) < 8:
        raise ModelFileError(f"{path} is empty or truncated ({path.stat().st_size} bytes); it is not a model file.")
    looks_like_safetensors = head[8:9] == b"{"  # 8-byte header length, then the JSON header
    is_zip = head.startswith(b"PK\x03\x04")  # torch.save's default container
    is_pickle = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    if not looks_like_safetensors and (is_zip or is_pickle):
        raise ModelFileError(
            f"{path} is a PyTorch pickle (.pth/.pt), not a safetensors model. digital-stain never loads pickles, "
            "because loading one can run arbitrary code. Convert it on a machine where you trust the file: "
            "load it with torch.load(..., weights_only=True) and save a model with digital_stain.stain.model.StainModel.save."
        )
    header_len = int.from_bytes(head[:8], "little")
    if not looks_like_safetensors or header_len <= 0 or header_len > path.stat().st_size - 8:
        raise ModelFileError(f"{path} is truncated or not a safetensors file; it is not a digital-stain model.")


def load_bundle(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify a model file. Returns ``(tensors, metadata)``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist.")
    _sniff(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            mapped = {name: fh.get_tensor(name) for name in fh.keys()}  # views into the file's memory map
    except Exception as err:
        raise ModelFileError(f"{path} is not a readable safetensors file ({err}); it may be truncated.") from err
    if header.get("format") != FORMAT:
        raise ModelFileError(f"{path} is a safetensors file but not a digital-stain model (no '{FORMAT}' header).")
    try:
        version = int(header.get("format_version", "0"))
    except ValueError:
        raise ModelFileError(f"{path} has an unreadable model format version {header.get('format_version')!r}.") from None
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} has model format {version}; this version of napari-digital-stain reads up to {FORMAT_VERSION}. "
            "Upgrade napari-digital-stain."
        )
    metadata_json = header.get("metadata", "{}")
    if checksum(mapped, metadata_json) != header.get("checksum"):  # the bytes as stored (a clone canonicalises bools)
        raise ModelFileError(
            f"{path} failed its checksum: the file was modified or damaged after it was written. "
            "Use the original file, or retrain."
        )
    # copied out of the map: a file overwritten in place later must not change a loaded model
    tensors = {name: tensor.clone() for name, tensor in mapped.items()}
    return tensors, json.loads(metadata_json)


def file_checksum(path: str | os.PathLike) -> str:
    """The checksum recorded in a model file's header (after verifying the file)."""
    from safetensors import safe_open

    load_bundle(path)
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()["checksum"]


def numpy_state(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, np.ndarray]:
    """Tensors under ``prefix.`` as numpy arrays, prefix removed."""
    return {k[len(prefix) + 1 :]: v.numpy() for k, v in tensors.items() if k.startswith(prefix + ".")}


def torch_state(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Tensors under ``prefix.`` as a float32 state dict, prefix removed."""
    return {
        k[len(prefix) + 1 :]: (v.float() if v.is_floating_point() else v)
        for k, v in tensors.items()
        if k.startswith(prefix + ".")
    }
