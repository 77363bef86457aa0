"""What may be replaced, and one writer at a time (``digital_stain.io.outputs``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image

from digital_stain.core.arrays import InputError
from digital_stain.io.images import atomic_path, write_image
from digital_stain.io.outputs import (MARKER, check_not_input, check_replaceable, is_ours, lock_path, output_lock,
                                   software)

RGB = np.random.default_rng(0).integers(0, 256, (16, 20, 3), dtype=np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_images_we_write_are_ours_and_the_same_image_from_elsewhere_is_not(tmp_path, suffix):
    assert is_ours(write_image(tmp_path / f"ours{suffix}", RGB))
    theirs = tmp_path / f"theirs{suffix}"
    if suffix == ".png":
        Image.fromarray(RGB).save(theirs)
    else:
        tifffile.imwrite(theirs, RGB, software="ImageJ")
    assert not is_ours(theirs)


def test_folders_models_and_json(tmp_path, tiny_model_file):
    with atomic_path(tmp_path / "out") as staging:
        staging.mkdir()
    assert is_ours(tmp_path / "out") and (tmp_path / "out" / MARKER).is_file()
    (tmp_path / "plain").mkdir()
    assert not is_ours(tmp_path / "plain")
    assert is_ours(tiny_model_file)
    (tmp_path / "scores.json").write_text(json.dumps({"written_by": software(), "scores": {}}))
    (tmp_path / "other.json").write_text(json.dumps({"scores": {}}))
    assert is_ours(tmp_path / "scores.json") and not is_ours(tmp_path / "other.json")


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n broken", b"II*\x00garbage", b"{not json", b"\x00" * 64])
def test_unreadable_or_truncated_files_are_not_ours(tmp_path, content):
    path = tmp_path / "x.png"
    path.write_bytes(content)
    assert not is_ours(path)


def test_a_link_to_our_output_is_not_replaced(tmp_path):
    ours = write_image(tmp_path / "ours.png", RGB)
    link = tmp_path / "link.png"
    link.symlink_to(ours)
    assert not is_ours(link)
    with pytest.raises(InputError, match="link that digital-stain did not write"):
        check_replaceable(link, overwrite=True)


def test_check_replaceable(tmp_path):
    check_replaceable(tmp_path / "new.png", overwrite=False)  # nothing there: fine
    ours = write_image(tmp_path / "ours.png", RGB)
    with pytest.raises(InputError, match="already exists"):
        check_replaceable(ours, overwrite=False)
    check_replaceable(ours, overwrite=True)
    (tmp_path / "thesis").mkdir()
    with pytest.raises(InputError, match="folder that digital-stain did not write"):
        check_replaceable(tmp_path / "thesis", overwrite=True)


def test_check_not_input(tmp_path):
    data = tmp_path / "home" / "data"
    data.mkdir(parents=True)
    image = data / "x.png"
    image.write_bytes(b"")
    store = tmp_path / "in.ome.zarr"
    store.mkdir()
    for output, inputs, words in [(image, [image], "is the input"),
                                  (data, [data, image], "is the input"),
                                  (tmp_path / "home", [image], "holds the input"),
                                  (data / ".." / "data" / "x.png", [image], "is the input"),
                                  (store, [store], "is the input"),
                                  (store / "x.ome.zarr", [store], "inside the input store")]:
        with pytest.raises(InputError, match=words):
            check_not_input(output, inputs)
    check_not_input(data / "stained", [data, image])  # an output folder inside the input folder is fine
    check_not_input(tmp_path / "elsewhere", [image])


def test_lock_is_exclusive_and_removed(tmp_path):
    target = tmp_path / "out"
    with output_lock(target) as lock:
        assert lock == lock_path(target) and lock.is_file()
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(InputError, match=r"is being written by process \d+ .* delete"):
            with output_lock(target):
                pass
        assert lock.is_file()  # the refused second writer leaves the first one's lock alone
    assert not lock.exists()


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    target = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    lock_path(target).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with output_lock(target):
        assert json.loads(lock_path(target).read_text())["pid"] == os.getpid()
    assert not lock_path(target).exists()


def test_lock_of_another_host_or_unreadable_is_respected(tmp_path):
    target = tmp_path / "out"
    lock_path(target).write_text(json.dumps({"pid": 1, "host": "another-machine"}))
    with pytest.raises(InputError, match="another-machine"):
        with output_lock(target):
            pass
    lock_path(target).write_text("garbage")
    with pytest.raises(InputError, match="another process"):
        with output_lock(target):
            pass
    assert lock_path(target).read_text() == "garbage"
