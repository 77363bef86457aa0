"""Tests of digital_stain.io.modelfile: the safetensors model bundle, its checks, and pickle refusal."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from digital_stain.core.arrays import InputError
from digital_stain.io.modelfile import (
    FORMAT,
    FORMAT_VERSION,
    ModelFileError,
    checksum,
    file_checksum,
    load_bundle,
    numpy_state,
    save_bundle,
    torch_state,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "enhancer.darkfield_counts": torch.arange(4096, dtype=torch.int64),
        "enhancer.brightfield_counts": torch.arange(4096, dtype=torch.int64).flip(0),
        "teacher.head.weight": torch.randn(2, 8, 1, 1, generator=g),
        "teacher.head.bias": torch.randn(2, generator=g),
        "student.model.1.weight": torch.randn(3, 4, 7, 7, generator=g).to(torch.bfloat16),
        "student.flag": torch.tensor([True, False, True]),
        "student.scalar": torch.tensor(3.5, dtype=torch.float64),
        "student.empty": torch.zeros(0, 3),
    }


METADATA = {"architecture": {"width": 8, "n_blocks": 2}, "provenance": {"data": "DSD", "steps": 12}, "note": "ü ✓"}


def _header_len(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


@pytest.fixture
def bundle(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    save_bundle(path, _tensors(), METADATA)
    return path


def _assert_no_leftovers(folder: Path, *expected: str):
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)


# ---------------------------------------------------------------- round trip


def test_save_load_round_trip(tmp_path):
    path = tmp_path / "model.safetensors"
    digest = save_bundle(path, _tensors(), METADATA)
    assert isinstance(digest, str) and len(digest) == 64
    tensors, metadata = load_bundle(path)
    assert metadata == METADATA
    expected = _tensors()
    assert set(tensors) == set(expected)
    for name, value in expected.items():
        assert tensors[name].dtype == value.dtype, name
        assert tensors[name].shape == value.shape, name
        assert torch.equal(tensors[name], value), name
    assert file_checksum(path) == digest
    _assert_no_leftovers(tmp_path, "model.safetensors")


def test_save_bundle_accepts_non_contiguous_and_grad_tensors(tmp_path):
    w = torch.randn(4, 5, requires_grad=True)
    path = tmp_path / "m.safetensors"
    save_bundle(path, {"student.w": w.t()}, {})
    tensors, metadata = load_bundle(path)
    assert torch.equal(tensors["student.w"], w.detach().t())
    assert metadata == {}


def test_save_bundle_overwrites_by_default_and_can_refuse(bundle):
    save_bundle(bundle, {"a": torch.ones(2)}, {"v": 2})
    assert load_bundle(bundle)[1] == {"v": 2}
    with pytest.raises(InputError, match="already exists"):
        save_bundle(bundle, {"a": torch.zeros(2)}, {"v": 3}, overwrite=False)
    assert load_bundle(bundle)[1] == {"v": 2}


def test_checksum_depends_on_names_values_shapes_and_metadata():
    base = {"a": torch.arange(6.0)}
    ref = checksum(base, "{}")
    assert checksum({"a": torch.arange(6.0)}, "{}") == ref
    assert checksum({"b": torch.arange(6.0)}, "{}") != ref
    assert checksum({"a": torch.arange(6.0).reshape(2, 3)}, "{}") != ref
    assert checksum({"a": torch.arange(6.0).double()}, "{}") != ref
    changed = torch.arange(6.0)
    changed[3] += 1
    assert checksum({"a": changed}, "{}") != ref
    assert checksum(base, '{"x": 1}') != ref


def test_numpy_and_torch_state_strip_prefix(bundle):
    tensors, _ = load_bundle(bundle)
    enh = numpy_state(tensors, "enhancer")
    assert set(enh) == {"darkfield_counts", "brightfield_counts"}
    assert isinstance(enh["darkfield_counts"], np.ndarray)
    student = torch_state(tensors, "student")
    assert set(student) == {"model.1.weight", "flag", "scalar", "empty"}
    assert student["model.1.weight"].dtype == torch.float32  # bf16 widened for loading
    assert student["flag"].dtype == torch.bool
    assert "head.weight" in torch_state(tensors, "teacher")
    assert torch_state(tensors, "stud") == {}  # prefix must be followed by a dot


# ---------------------------------------------------------------- damage


def test_flipped_byte_in_tensor_data_fails_checksum(bundle):
    data = bytearray(bundle.read_bytes())
    start = 8 + _header_len(bundle)
    assert start < len(data)
    position = start + (len(data) - start) // 2
    data[position] ^= 0x01
    bundle.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum"):
        load_bundle(bundle)


def test_flipped_byte_in_last_tensor_byte_fails_checksum(bundle):
    data = bytearray(bundle.read_bytes())
    data[-1] ^= 0x80
    bundle.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum"):
        load_bundle(bundle)


def test_changed_metadata_with_stale_checksum_fails(tmp_path, bundle):
    from safetensors import safe_open

    with safe_open(str(bundle), framework="pt") as fh:
        header = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    meta = json.loads(header["metadata"])
    meta["provenance"]["steps"] = 999999
    header["metadata"] = json.dumps(meta, sort_keys=True)
    tampered = tmp_path / "tampered.safetensors"
    save_file(tensors, str(tampered), metadata=header)
    with pytest.raises(ModelFileError, match="checksum"):
        load_bundle(tampered)


@pytest.mark.parametrize("keep", ["header_part", "half", "all_but_one"])
def test_truncated_file_is_refused(bundle, keep):
    data = bundle.read_bytes()
    n = {"header_part": 8 + _header_len(bundle) // 2, "half": len(data) // 2, "all_but_one": len(data) - 1}[keep]
    bundle.write_bytes(data[:n])
    with pytest.raises(ModelFileError):
        load_bundle(bundle)


@pytest.mark.parametrize("size", [0, 3, 7])
def test_empty_or_tiny_file_is_refused(tmp_path, size):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x01" * size)
    with pytest.raises(ModelFileError, match="empty or truncated"):
        load_bundle(path)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        load_bundle(tmp_path / "nope.safetensors")


def test_model_file_error_is_an_input_error():
    assert issubclass(ModelFileError, InputError)


# ---------------------------------------------------------------- pickles


def test_torch_save_pickle_is_refused_saying_pickle(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"a": torch.zeros(2)}, path)
    with pytest.raises(ModelFileError, match="pickle") as info:
        load_bundle(path)
    assert str(path) in str(info.value)


def test_legacy_torch_save_pickle_is_refused_saying_pickle(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"a": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(ModelFileError, match="pickle"):
        load_bundle(path)


class _CreatesMarker:
    """Unpickling this object creates ``marker`` (like a malicious model file would run code)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, protocol):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"state": _CreatesMarker(str(marker))}, protocol=protocol)
    # positive control: unpickling this payload really does run code
    handle = pickle.loads(payload)["state"]
    handle.close()
    assert marker.exists()
    marker.unlink()

    path = tmp_path / "model.pth"
    path.write_bytes(payload)
    with pytest.raises(ModelFileError, match="pickle"):
        load_bundle(path)
    assert not marker.exists()


def test_malicious_protocol_0_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_CreatesMarker(str(marker)), protocol=0)
    path = tmp_path / "model.safetensors"
    path.write_bytes(payload)
    with pytest.raises(ModelFileError):
        load_bundle(path)
    assert not marker.exists()


# ---------------------------------------------------------------- not ours / too new


def test_plain_safetensors_without_our_header_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.ones(3)}, str(path))
    with pytest.raises(ModelFileError, match="not a digital-stain model"):
        load_bundle(path)
    save_file({"w": torch.ones(3)}, str(path), metadata={"format": "something-else"})
    with pytest.raises(ModelFileError, match="not a digital-stain model"):
        load_bundle(path)


def _write_with_header(path: Path, version: str) -> None:
    tensors = {"w": torch.ones(3)}
    metadata_json = json.dumps({"a": 1}, sort_keys=True)
    header = {"format": FORMAT, "format_version": version, "metadata": metadata_json, "checksum": checksum(tensors, metadata_json)}
    save_file(tensors, str(path), metadata=header)


def test_newer_format_version_is_refused_saying_upgrade(tmp_path):
    path = tmp_path / "future.safetensors"
    _write_with_header(path, str(FORMAT_VERSION + 1))
    with pytest.raises(ModelFileError, match="(?i)upgrade"):
        load_bundle(path)


def test_current_format_version_written_by_hand_loads(tmp_path):
    path = tmp_path / "now.safetensors"
    _write_with_header(path, str(FORMAT_VERSION))
    tensors, metadata = load_bundle(path)
    assert metadata == {"a": 1}
    assert torch.equal(tensors["w"], torch.ones(3))


# ---------------------------------------------------------------- known bug


def _metadata_giving_header_byte0(tmp_path: Path, byte: int) -> dict:
    """Metadata whose saved file's header length has ``byte`` as its lowest byte."""
    probe = tmp_path / "probe.safetensors"
    for n in range(600):
        meta = {"pad": "x" * n}
        save_bundle(probe, {"w": torch.arange(6, dtype=torch.float32)}, meta)
        if probe.read_bytes()[0] == byte:
            os.remove(probe)
            return meta
    raise AssertionError("no padding found")  # pragma: no cover


def test_valid_bundle_whose_header_length_starts_with_0x80_loads(tmp_path):
    meta = _metadata_giving_header_byte0(tmp_path, 0x80)
    path = tmp_path / "model.safetensors"
    save_bundle(path, {"w": torch.arange(6, dtype=torch.float32)}, meta)
    assert _header_len(path) % 256 == 0x80
    tensors, metadata = load_bundle(path)
    assert metadata == meta


def test_non_numeric_format_version_is_a_model_file_error(tmp_path):
    path = tmp_path / "odd.safetensors"
    _write_with_header(path, "v2")
    with pytest.raises(ModelFileError):
        load_bundle(path)
