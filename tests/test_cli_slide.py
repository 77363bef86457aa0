"""``digital-stain stain INPUT -o OUT.ome.zarr``: whole slides through digital_stain.slide.run, from the command line.

In-process through ``digital_stain.cli.main``, except the interruption tests,
which run the real console entry in a subprocess and stop it (Ctrl-C) or kill it.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
import zarr

from digital_stain.cli import main
from digital_stain.slide.run import stain_to_zarr
from stores import assert_same_store as assert_same, store_arrays as stored

FAST = ["--device", "cpu", "--precision", "fp32", "-q"]
SETTINGS = ["--chunk", "256", "--overlap", "32"]
LIBRARY = dict(chunk=256, overlap=32, device="cpu", precision="fp32")


def run(capsys, *args) -> tuple[int, str]:
    """Run ``digital-stain stain ...`` in-process; return (exit code, stderr)."""
    capsys.readouterr()
    code = main(["stain", *map(str, args), *FAST])
    return code, capsys.readouterr().err


@pytest.fixture
def slide_tif(tmp_path, darkfield_tile):
    """A 768 x 1024 tiled BigTIFF mosaic of the sample tile (12 chunks of 256 px)."""
    tiles = [darkfield_tile, darkfield_tile[::-1], darkfield_tile[:, ::-1], np.rot90(darkfield_tile, 2)]
    rows = [np.concatenate([tiles[(i + j) % 4] for j in range(4)], axis=1) for i in range(3)]
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, np.concatenate(rows, axis=0), bigtiff=True, tile=(256, 256), photometric="rgb")
    return path


@pytest.fixture
def reference(tiny_model_file, slide_tif, tmp_path):
    path = tmp_path / "reference.ome.zarr"
    assert stain_to_zarr(tiny_model_file, slide_tif, path, **LIBRARY).complete
    return path


def test_help_lists_the_slide_options(capsys):
    with pytest.raises(SystemExit):
        main(["stain", "--help"])
    out = capsys.readouterr().out
    for option in ("--resume", "--chunk", ".zarr"):
        assert option in out


def test_stain_to_ome_zarr_equals_the_library(capsys, tiny_model_file, slide_tif, reference, tmp_path):
    out = tmp_path / "out.ome.zarr"
    code, err = run(capsys, slide_tif, "-o", out, "--model", tiny_model_file, *SETTINGS)
    assert code == 0, err
    assert f"wrote {out}" in err and "levels 768x1024 384x512" in err
    assert_same(out, reference)


def test_ngff_0_5_output_holds_the_same_pixels(capsys, tiny_model_file, slide_tif, reference, tmp_path):
    out = tmp_path / "v05.ome.zarr"
    code, err = run(capsys, slide_tif, "-o", out, "--model", tiny_model_file, *SETTINGS, "--ngff", "0.5")
    assert code == 0, err
    root = zarr.open_group(str(out), mode="r")
    assert root.metadata.zarr_format == 3 and root.attrs["ome"]["version"] == "0.5"
    assert_same(out, reference)


def test_one_output_and_default_chunk(capsys, tiny_model_file, slide_tif, tmp_path):
    out = tmp_path / "teacher.ome.zarr"
    code, err = run(capsys, slide_tif, "-o", out, "--model", tiny_model_file, "--outputs", "teacher")
    assert code == 0, err
    group = zarr.open_group(str(out), mode="r")
    assert sorted(group.group_keys()) == ["teacher"]
    assert group["teacher"]["0"].chunks == (3, 1024, 1024)
    assert dict(group.attrs)["digital_stain"]["settings"]["chunk"] == 1024


def test_existing_store_is_refused_then_resumed_or_overwritten(capsys, tiny_model_file, slide_tif, reference):
    before = stored(reference)
    code, err = run(capsys, slide_tif, "-o", reference, "--model", tiny_model_file, *SETTINGS)
    assert code == 2 and "already exists" in err and "--resume" in err and "--overwrite" in err
    code, err = run(capsys, slide_tif, "-o", reference, "--model", tiny_model_file, *SETTINGS, "--resume")
    assert code == 0 and "already complete; nothing to do" in err
    code, err = run(capsys, slide_tif, "-o", reference, "--model", tiny_model_file, *SETTINGS, "--overwrite",
                    "--outputs", "enhanced")
    assert code == 0, err
    assert sorted(stored(reference)) != sorted(before)


def test_resume_with_other_settings_is_refused(capsys, tiny_model_file, slide_tif, reference):
    code, err = run(capsys, slide_tif, "-o", reference, "--model", tiny_model_file, "--resume", "--chunk", "512",
                    "--overlap", "32")
    assert code == 2 and "cannot resume" in err and "chunk: stored 256, now 512" in err
    code, err = run(capsys, slide_tif, "-o", reference, "--model", tiny_model_file, "--resume", "--compile", *SETTINGS)
    assert code == 2 and "compile: stored False, now True" in err  # --compile reaches the slide path


@pytest.mark.parametrize("extra, words", [
    (["--resume"], "--resume is for OME-Zarr output"),
    (["--chunk", "512"], "--chunk is for OME-Zarr output"),
    (["--ngff", "0.5"], "--ngff is for OME-Zarr output"),
])
def test_slide_options_without_zarr_output_are_refused(capsys, tiny_model_file, slide_tif, tmp_path, extra, words):
    code, err = run(capsys, slide_tif, "-o", tmp_path / "out", "--model", tiny_model_file, *extra)
    assert code == 2 and words in err
    assert not (tmp_path / "out").exists()


def test_bad_inputs_for_zarr_output(capsys, tiny_model_file, tmp_path, slide_tif):
    folder = tmp_path / "tiles"
    folder.mkdir()
    code, err = run(capsys, folder, "-o", tmp_path / "a.ome.zarr", "--model", tiny_model_file)
    assert code == 2 and "folder of images" in err
    plain = tmp_path / "plain.zarr"
    zarr.create_array(str(plain), shape=(300, 300), dtype=np.uint8)
    code, err = run(capsys, plain, "-o", tmp_path / "b.ome.zarr", "--model", tiny_model_file)
    assert code == 2 and "not OME-Zarr" in err
    code, err = run(capsys, slide_tif, "-o", tmp_path / "c.ome.zarr", "--model", tiny_model_file, "--format", "png")
    assert code == 2 and "--format png does not apply" in err
    code, err = run(capsys, slide_tif, "-o", tmp_path / "d.ome.zarr", "--model", tiny_model_file, "--chunk", "100")
    assert code == 2 and "256..4096" in err
    assert not any(tmp_path.glob("?.ome.zarr"))


def test_strip_tiff_note(capsys, tiny_model_file, tmp_path, darkfield_tile):
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, np.tile(darkfield_tile, (2, 2, 1)), rowsperstrip=4, photometric="rgb")
    code, err = run(capsys, path, "-o", tmp_path / "out.ome.zarr", "--model", tiny_model_file, "--chunk", "256",
                    "--outputs", "enhanced")
    assert code == 0, err
    assert "note:" in err and "chunks of 4 x 512 px" in err and "256-px pieces" in err


def test_disk_full_exits_with_a_resumable_store(capsys, tiny_model_file, slide_tif, reference, tmp_path,
                                                monkeypatch):
    import zarr.storage._local as local

    real_put, count = local._put, [0]

    def put(target, value, exclusive=False):
        if "teacher" in target.parts and not target.name.startswith("."):
            count[0] += 1
            if count[0] > 7:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(target, value, exclusive=exclusive)

    out = tmp_path / "full.ome.zarr"
    monkeypatch.setattr(local, "_put", put)
    code, err = run(capsys, slide_tif, "-o", out, "--model", tiny_model_file, *SETTINGS)
    assert code == 2 and "is full" in err and "--resume" in err and "7 of" in err
    monkeypatch.setattr(local, "_put", real_put)
    code, err = run(capsys, slide_tif, "-o", out, "--model", tiny_model_file, *SETTINGS, "--resume")
    assert code == 0 and "7 were done before" in err
    assert_same(out, reference)


def _start(slide_tif, out, model_file) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [sys.executable, "-m", "digital_stain.cli", "stain", str(slide_tif), "-o", str(out), "--model",
               str(model_file), *SETTINGS, *FAST]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_units(process: subprocess.Popen, out, count: int) -> None:
    """Until ``count`` level-0 units are marked done (the progress record's chunk files)."""
    deadline = time.monotonic() + 120
    progress = out / "progress" / "0"
    while time.monotonic() < deadline:
        if progress.exists() and sum(1 for p in progress.rglob("*") if p.is_file() and not p.name.startswith(".")) >= count:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.005)
    pytest.fail("the run did not get going")


def test_killed_process_resumes_to_the_same_bytes(capsys, tiny_model_file, slide_tif, reference, tmp_path):
    out = tmp_path / "killed.ome.zarr"
    process = _start(slide_tif, out, tiny_model_file)
    _wait_for_units(process, out, 3)
    process.kill()
    process.wait(30)
    state = dict(zarr.open_group(str(out), mode="r").attrs)["digital_stain"]
    assert state["complete"] is False
    code, err = run(capsys, slide_tif, "-o", out, "--model", tiny_model_file, *SETTINGS, "--resume")
    assert code == 0, err
    assert "were done before" in err
    assert_same(out, reference)


def test_ctrl_c_stops_cleanly_and_resumes(capsys, tiny_model_file, slide_tif, reference, tmp_path):
    out = tmp_path / "interrupted.ome.zarr"
    process = _start(slide_tif, out, tiny_model_file)
    _wait_for_units(process, out, 2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "stopped:" in err and "--resume" in err
    code, err = run(capsys, slide_tif, "-o", out, "--model", tiny_model_file, *SETTINGS, "--resume")
    assert code == 0, err
    assert_same(out, reference)


def test_view_opens_the_finished_store_beside_an_ome_zarr_slide(capsys, monkeypatch, tiny_model_file, darkfield_tile,
                                                                tmp_path):
    import napari

    from digital_stain._napari.layers import grid_of
    from stores import write_ome_zarr

    seen = {}

    def instead_of_the_event_loop():  # what the user would see, then close (napari.run would wait for them)
        viewer = napari.current_viewer()
        seen["layers"], seen["grid"] = [layer.name for layer in viewer.layers], grid_of(viewer).enabled
        seen["placed"] = {(tuple(layer.scale[-2:]), tuple(layer.translate[-2:])) for layer in viewer.layers}
        viewer.close()

    monkeypatch.setattr(napari, "run", instead_of_the_event_loop)
    slide = tmp_path / "darkfield.ome.zarr"
    write_ome_zarr(slide, [np.moveaxis(np.tile(darkfield_tile, (2, 2, 1)), -1, 0)], "cyx", scale=(1.0, 0.5, 0.5),
                   translation=(0.0, 40.0, 80.0), units={"y": "micrometer", "x": "micrometer"})
    out = tmp_path / "out.ome.zarr"
    code, err = run(capsys, slide, "-o", out, "--model", tiny_model_file, "--outputs", "enhanced,student",
                    "--chunk", "256", "--view")
    assert code == 0, err
    assert seen == {"layers": ["darkfield", "out enhanced", "out student"], "grid": True,
                    "placed": {((0.5, 0.5), (40.0, 80.0))}}  # the stain lies exactly on the slide
