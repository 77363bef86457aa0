"""What a careless or unlucky user hands us: each case ends in a clear message and exit code 2,
and nothing of theirs is deleted, replaced or half-written.

Through the real command line (in-process ``digital_stain.cli.main``, or the console script in a
subprocess where a second process is the point).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from digital_stain.core.arrays import InputError
from digital_stain.cli import main
from digital_stain.io.images import read_image
from digital_stain.stain.model import StainModel
from digital_stain.io.modelfile import load_bundle, save_bundle
from digital_stain.io.outputs import lock_path, output_lock
from digital_stain.slide.run import stain_to_zarr
from stores import write_ome_zarr

FAST = ["--device", "cpu", "--precision", "fp32", "-q"]


def cli(capsys, *args) -> tuple[int, str]:
    """Run ``digital-stain ARGS`` in-process; return (exit code, stderr)."""
    capsys.readouterr()
    code = main([*map(str, args)])
    return code, capsys.readouterr().err


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a digest of its bytes: what must be unchanged after a refusal."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def home(tmp_path, darkfield_tile) -> Path:
    """A user's folder: two dark-field images and unrelated files of theirs."""
    data = tmp_path / "home" / "data"
    data.mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.fromarray(np.ascontiguousarray(darkfield_tile[:64, :64])).save(data / name)
    (data / "notes.txt").write_text("lab notes")
    (tmp_path / "home" / "thesis.tex").write_text("three years of work")
    return tmp_path / "home"


# -- data loss --------------------------------------------------------------------------------------
@pytest.mark.parametrize("output, words", [
    ("home/data", "is the input"),                   # stain DIR -o DIR --overwrite
    ("home", "holds the input"),                     # the output folder holds the input folder
    ("home/data/a.png", "is the input"),             # one file: -o names a file of the input folder
])
def test_stain_folder_never_replaces_its_input(capsys, home, tiny_model_file, output, words):
    before = snapshot(home)
    root = home.parent
    code, err = cli(capsys, "stain", root / "home/data", "-o", root / output, "--model", tiny_model_file,
                    "--overwrite", *FAST)
    assert code == 2 and words in err, err
    assert snapshot(home) == before


@pytest.mark.parametrize("output", ["home/data/a.png", "home/data", "home"])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_stain_one_file_never_replaces_it_or_its_folder(capsys, home, tiny_model_file, output, overwrite):
    before = snapshot(home)
    root = home.parent
    code, err = cli(capsys, "stain", root / "home/data/a.png", "-o", root / output, "--model", tiny_model_file,
                    "--outputs", "teacher", *overwrite, *FAST)
    assert code == 2 and ("is the input" in err or "holds the input" in err), err
    assert snapshot(home) == before


def test_overwrite_only_replaces_our_own_output(capsys, home, tiny_model_file, tmp_path):
    theirs = tmp_path / "results"
    theirs.mkdir()
    (theirs / "figure.png").write_bytes(b"a figure")
    code, err = cli(capsys, "stain", home / "data", "-o", theirs, "--model", tiny_model_file, "--overwrite", *FAST)
    assert code == 2 and "did not write" in err and "--overwrite will not replace it" in err
    assert (theirs / "figure.png").read_bytes() == b"a figure"

    single = tmp_path / "figure.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(single)  # a PNG, but not one we wrote
    code, err = cli(capsys, "stain", home / "data/a.png", "-o", single, "--outputs", "teacher",
                    "--model", tiny_model_file, "--overwrite", *FAST)
    assert code == 2 and "did not write" in err
    assert not np.asarray(Image.open(single)).any()

    ours = tmp_path / "stain.png"
    for _ in range(2):  # written, then replaced: it is ours
        code, err = cli(capsys, "stain", home / "data/a.png", "-o", ours, "--outputs", "teacher",
                        "--model", tiny_model_file, "--overwrite", *FAST)
        assert code == 0, err


@pytest.mark.parametrize("inside", [False, True])
def test_slide_output_is_never_the_input_store(capsys, tiny_model_file, darkfield_tile, tmp_path, inside):
    source = tmp_path / "in.ome.zarr"
    stain_to_zarr(tiny_model_file, np.tile(darkfield_tile, (2, 2, 1)), source, ["enhanced"], chunk=256,
                  overlap=32, device="cpu", precision="fp32")
    before = snapshot(source)
    output = source / "x.ome.zarr" if inside else source
    code, err = cli(capsys, "stain", source, "-o", output, "--model", tiny_model_file, "--overwrite",
                    "--chunk", "256", *FAST)
    assert code == 2 and ("inside the input store" if inside else "is the input") in err, err
    assert snapshot(source) == before


def test_slide_overwrite_keeps_a_store_we_did_not_write(capsys, tiny_model_file, darkfield_tile, tmp_path):
    theirs = tmp_path / "theirs.ome.zarr"
    theirs.mkdir()
    (theirs / ".zattrs").write_text("{}")
    (theirs / "data.bin").write_bytes(b"their slide")
    image = tmp_path / "in.png"
    Image.fromarray(darkfield_tile).save(image)
    code, err = cli(capsys, "stain", image, "-o", theirs, "--model", tiny_model_file, "--overwrite",
                    "--chunk", "256", *FAST)
    assert code == 2 and "did not write" in err, err
    assert (theirs / "data.bin").read_bytes() == b"their slide"


@pytest.fixture
def evaluate_args(tiny_model_file, darkfield_dir, hne_dir):
    return ["evaluate", "--darkfield", darkfield_dir, "--stained", hne_dir, "--model", tiny_model_file,
            "--device", "cpu", "-q"]


def test_evaluate_json_never_replaces_a_folder_or_a_file_of_theirs(capsys, evaluate_args, tmp_path):
    folder = tmp_path / "scores"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    code, err = cli(capsys, *evaluate_args, "--json", folder, "--overwrite")
    assert code == 2 and "folder that digital-stain did not write" in err
    assert (folder / "keep.txt").read_text() == "keep"

    theirs = tmp_path / "theirs.json"
    theirs.write_text('{"mine": 1}')
    for extra in ([], ["--overwrite"]):
        code, err = cli(capsys, *evaluate_args, "--json", theirs, *extra)
        assert code == 2 and ("already exists" in err if not extra else "did not write" in err), err
        assert theirs.read_text() == '{"mine": 1}'


def test_evaluate_json_replaces_its_own_file_only_with_overwrite(capsys, evaluate_args, tmp_path):
    scores = tmp_path / "scores.json"
    assert cli(capsys, *evaluate_args, "--json", scores)[0] == 0
    assert "scores" in json.loads(scores.read_text())
    code, err = cli(capsys, *evaluate_args, "--json", scores)
    assert code == 2 and "already exists" in err
    assert cli(capsys, *evaluate_args, "--json", scores, "--overwrite")[0] == 0


def test_a_second_writer_is_refused(capsys, home, tiny_model_file, tmp_path):
    out = tmp_path / "out"
    with output_lock(out):  # a run in progress (this process, as if another run)
        code, err = cli(capsys, "stain", home / "data", "-o", out, "--model", tiny_model_file, *FAST)
        assert code == 2 and "is being written by process" in err, err
        assert not out.exists()
        code, err = cli(capsys, "stain", home / "data/a.png", "-o", out.with_suffix(".ome.zarr"),
                        "--model", tiny_model_file, "--chunk", "256", *FAST)
        assert code == 0, err  # another output is free
    assert cli(capsys, "stain", home / "data", "-o", out, "--model", tiny_model_file, *FAST)[0] == 0
    assert not lock_path(out).exists()


def test_a_second_process_on_the_same_store_is_refused(capsys, tiny_model_file, darkfield_tile, tmp_path):
    """Two whole-slide runs on one store: the second is told who is writing, and the first's store is intact."""
    image = tmp_path / "in.png"
    Image.fromarray(darkfield_tile).save(image)
    store = tmp_path / "out.ome.zarr"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from digital_stain.io.outputs import output_lock\n"
        f"with output_lock({str(store)!r}):\n    print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = cli(capsys, "stain", image, "-o", store, "--model", tiny_model_file, "--chunk", "256", *FAST)
        assert code == 2 and f"process {holder.pid}" in err, err
        assert not store.exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock is stale, and the next run takes it over
    time.sleep(0.1)
    code, err = cli(capsys, "stain", image, "-o", store, "--model", tiny_model_file, "--chunk", "256", *FAST)
    assert code == 0, err
    assert not lock_path(store).exists()


# -- files: the file's own axes, signature and declared size ------------------------------------------
def _tiff(path: Path, data: np.ndarray, **kwargs) -> Path:
    tifffile.imwrite(path, data, **kwargs)
    return path


@pytest.mark.parametrize("make, words", [
    (lambda p: _tiff(p, np.zeros((64, 64, 8), np.uint8), photometric="minisblack", planarconfig="contig"),
     "has 8 channels"),
    (lambda p: _tiff(p, np.zeros((2, 64, 64), np.uint8), photometric="minisblack", metadata={"axes": "CYX"}),
     "has 2 channels"),
    (lambda p: _tiff(p, np.zeros((2, 2, 64, 64), np.uint8), photometric="minisblack", metadata={"axes": "CZYX"}),
     "has 2 channels"),
])
def test_tiff_channels_that_are_not_gray_or_rgb_are_refused(capsys, tiny_model_file, tmp_path, make, words):
    path = make(tmp_path / "odd.tif")
    code, err = cli(capsys, "stain", path, "-o", tmp_path / "out", "--model", tiny_model_file, *FAST)
    assert code == 2 and words in err and "Pick one channel" in err, err
    assert not (tmp_path / "out").exists()


def test_tiff_axes_are_read_from_the_file(tmp_path):
    tzcyx = _tiff(tmp_path / "t.ome.tif", np.zeros((2, 3, 3, 32, 32), np.uint8), metadata={"axes": "TZCYX"})
    assert read_image(tzcyx).shape == (2, 3, 32, 32, 3)  # 6 RGB planes, not 18 gray ones
    planar = np.random.default_rng(0).integers(0, 255, (3, 32, 40), dtype=np.uint8)
    path = _tiff(tmp_path / "planar.tif", planar, photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_image(path), np.moveaxis(planar, 0, -1))
    one_channel = _tiff(tmp_path / "c1.tif", np.zeros((1, 32, 32), np.uint16), metadata={"axes": "CYX"})
    assert read_image(one_channel).shape == (32, 32)


def test_a_tiff_named_png_is_read_as_the_tiff_it_is(tmp_path):
    rgb16 = (np.arange(32 * 32 * 3, dtype=np.uint16).reshape(32, 32, 3) * 20)
    path = _tiff(tmp_path / "looks.png", rgb16, photometric="rgb")
    out = read_image(path)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, rgb16)


def test_a_huge_declared_tiff_is_refused_before_it_is_read(capsys, tiny_model_file, tmp_path):
    path = _tiff(tmp_path / "huge.tif", np.zeros((256, 256), np.uint8), tile=(256, 256))
    with tifffile.TiffFile(path, mode="r+") as tif:  # now it declares 100,000 x 100,000 px in 66 KB
        tif.pages[0].tags["ImageWidth"].overwrite(100_000)
        tif.pages[0].tags["ImageLength"].overwrite(100_000)
    code, err = cli(capsys, "stain", path, "-o", tmp_path / "out", "--model", tiny_model_file, *FAST)
    assert code == 2 and "100000 x 100000" in err and "OME-Zarr" in err, err
    assert not (tmp_path / "out").exists()


# -- values ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("image", [
    np.full((16, 16), 3e38, np.float32) * np.linspace(-1, 1, 16, dtype=np.float32),
    np.linspace(0, 1e300, 256).reshape(16, 16),
])
def test_values_too_wide_to_scale_are_refused(tiny_model, image):
    with pytest.raises(InputError, match="beyond what staining can scale"):
        tiny_model.stain(image, ["enhanced"], device="cpu")


@pytest.mark.parametrize("dtype, lo, hi", [(np.int8, -100, 100), (np.uint32, 0, 70000), (np.float32, -2.5, 3.0)])
def test_stretched_values_are_noted(capsys, tiny_model_file, tmp_path, dtype, lo, hi):
    image = np.linspace(lo, hi, 64 * 64).reshape(64, 64).astype(dtype)
    path = _tiff(tmp_path / "in.tif", image)
    code, err = cli(capsys, "stain", path, "-o", tmp_path / "out.tif", "--outputs", "enhanced",
                    "--model", tiny_model_file, *FAST)
    assert code == 0, err
    assert f"note: in.tif: values {np.dtype(dtype).name} stretched from" in err


def test_a_masked_array_is_refused_unless_nothing_is_masked(tiny_model, darkfield_tile):
    tile = darkfield_tile[:32, :32]
    masked = np.ma.masked_array(tile, mask=np.zeros(tile.shape, bool))
    plain = tiny_model.stain(tile, ["enhanced"], device="cpu")["enhanced"]
    np.testing.assert_array_equal(tiny_model.stain(masked, ["enhanced"], device="cpu")["enhanced"], plain)
    masked.mask[3, 4] = True
    with pytest.raises(InputError, match="masked array with 3 masked pixel"):
        tiny_model.stain(masked, ["enhanced"], device="cpu")


# -- options, at parse time: exit 2, the option named, nothing read or written ---------------------------
@pytest.mark.parametrize("args, words", [
    (["stain", "IN", "-o", "OUT", "--tile", "0"], "--tile: 0 is out of range"),
    (["stain", "IN", "-o", "OUT", "--tile", "-5"], "--tile: -5 is out of range"),
    (["stain", "IN", "-o", "OUT", "--tile", "7"], "--tile: 7 is out of range"),
    (["stain", "IN", "-o", "OUT", "--tile", "big"], "'big' is not a whole number"),
    (["stain", "IN", "-o", "OUT", "--overlap", "-1"], "--overlap: -1 is out of range"),
    (["stain", "IN", "-o", "OUT.ome.zarr", "--chunk", "100"], "256..4096"),
    (["stain", "IN", "-o", "OUT.ome.zarr", "--workers", "0"], "--workers: 0 is out of range"),
    (["stain", "IN", "-o", "OUT.ome.zarr", "--scheduler", "notanaddress"], "not a scheduler address"),
    (["stain", "IN", "-o", "OUT", "--model", ""], "the model is empty"),
    (["stain", "IN", "-o", "OUT", "--model", "."], "is a folder"),
    (["train", "--darkfield", "D", "--stained", "S", "-o", "M", "--batch", "0"], "--batch: 0 is out of range"),
    (["train", "--darkfield", "D", "--stained", "S", "-o", "M", "--crop", "0"], "--crop: 0 is out of range"),
    (["train", "--darkfield", "D", "--stained", "S", "-o", "M", "--steps", "0"], "--steps: 0 is out of range"),
    (["train", "--darkfield", "D", "--stained", "S", "-o", "M", "--steps", "-4"], "--steps: -4 is out of range"),
    (["train", "--darkfield", "D", "--stained", "S", "-o", "M", "--teacher-steps", "-1"], "out of range"),
    (["train", "--darkfield", "D", "--stained", "S", "-o", "M", "--ema", "1.5"], "--ema: 1.5 is out of range"),
    (["train", "--darkfield", "D", "--stained", "S", "-o", "M", "--lambda-kd", "nan"], "not a finite number"),
    (["train", "--darkfield", "D", "--stained", "S", "-o", "M", "--reg-lr-scale", "0"], "out of range"),
    (["train-teacher", "--stained", "S", "-o", "M", "--input-noise", "-0.1"], "out of range"),
    (["train-teacher", "--stained", "S", "-o", "M", "--width", "0"], "--width: 0 is out of range"),
    (["synth", "--stained", "S", "-o", "O", "--noise", "-1"], "--noise: -1 is out of range"),
    (["synth", "--stained", "S", "-o", "O", "--noise", "nan"], "not a finite number"),
    (["synth", "--stained", "S", "-o", "O", "--blur", "-3"], "--blur: -3 is out of range"),
    (["synth", "--stained", "S", "-o", "O", "--seed", "-1"], "--seed: -1 is out of range"),
])
def test_bad_options_are_refused_at_parse_time(capsys, tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, *args)
    assert code == 2 and words in err and "--help" in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_overlap_over_half_the_tile_is_refused_before_reading(capsys, tmp_path):
    code, err = cli(capsys, "stain", tmp_path / "missing.png", "-o", tmp_path / "out", "--tile", "64",
                    "--overlap", "40")
    assert code == 2 and "at most half the tile" in err, err


def test_tile_and_overlap_are_checked_in_the_api_too(tiny_model, darkfield_tile):
    for tile, overlap in ((0, 0), (7, 0), (64, -1), (64, 40)):
        with pytest.raises(InputError, match="out of range"):
            tiny_model.stain(darkfield_tile[:64, :64], ["enhanced"], tile=tile, overlap=overlap, device="cpu")


# -- model files: intact (valid checksum) but unusable ---------------------------------------------------
def _rewrite(source: Path, target: Path, change) -> Path:
    """``source``'s tensors and metadata, changed by ``change(tensors, meta)``, saved with a valid checksum."""
    tensors, meta = load_bundle(source)
    change(tensors, meta)
    save_bundle(target, tensors, meta)
    return target


@pytest.mark.parametrize("change, words", [
    (lambda t, m: m["config"]["student"].update(colour=1), "student config"),
    (lambda t, m: m["config"]["student"].update(width=m["config"]["student"]["width"] * 2),
     "student weights do not match its config"),
    (lambda t, m: m["config"]["teacher"].update(depth=m["config"]["teacher"]["depth"] + 1),
     "teacher weights do not match"),
    (lambda t, m: [t.pop(k) for k in [k for k in t if k.startswith("enhancer.")]], "no enhancer tensor"),
    (lambda t, m: t["enhancer.darkfield_counts"].neg_(), "enhancer histograms are unusable"),
    (lambda t, m: t[next(k for k in t if k.startswith("student.") and t[k].is_floating_point())].fill_(float("nan")),
     "NaN or infinite weights"),
    (lambda t, m: m.update(config=[1, 2]), "is not a mapping"),
])
def test_model_files_with_a_bad_config_or_weights_are_refused(capsys, tiny_model_file, darkfield_tile, tmp_path,
                                                               change, words):
    bad = _rewrite(tiny_model_file, tmp_path / "bad.safetensors", change)
    image = tmp_path / "in.png"
    Image.fromarray(darkfield_tile[:64, :64]).save(image)
    code, err = cli(capsys, "stain", image, "-o", tmp_path / "out", "--model", bad, *FAST)
    assert code == 2 and words in err and str(bad) in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


# -- training data and resume -----------------------------------------------------------------------------
def test_corrupt_training_files_are_listed_and_recorded(capsys, tiny_model_file, darkfield_dir, hne_dir, tmp_path):
    (darkfield_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (hne_dir / "empty.png").write_bytes(b"")
    out = tmp_path / "tuned.safetensors"
    code, err = cli(capsys, "train", "--init", tiny_model_file, "--darkfield", darkfield_dir, "--stained", hne_dir,
                    "-o", out, "--steps", "2", "--teacher-steps", "0", "--crop", "64", "--no-check", *FAST)
    assert code == 0, err
    assert "skipped 1 dark-field file(s)" in err and "broken.png" in err
    assert "skipped 1 H&E file(s)" in err and "empty.png" in err
    recorded = StainModel.load(out).metadata["provenance"]["fine_tune"]["skipped"]
    assert recorded["darkfield"] == {"unreadable": ["broken.png"]} and recorded["stained"] == {"unreadable": ["empty.png"]}


@pytest.mark.parametrize("command", ["train", "train-teacher"])
def test_resume_without_a_checkpoint_says_so(capsys, tiny_model_file, darkfield_dir, hne_dir, tmp_path, command):
    out = tmp_path / "m.safetensors"
    args = (["train", "--init", tiny_model_file, "--darkfield", darkfield_dir] if command == "train"
            else ["train-teacher", "--init", tiny_model_file])
    code, err = cli(capsys, *args, "--stained", hne_dir, "-o", out, "--steps", "2", "--resume", *FAST)
    assert code == 2 and "there is no checkpoint" in err and "Leave out --resume" in err, err
    assert not any(p.name.startswith("m.") for p in tmp_path.iterdir())


def test_links_that_lead_nowhere_are_listed(capsys, home, tiny_model_file, tmp_path):
    (home / "data" / "gone.png").symlink_to(tmp_path / "missing.png")
    (home / "data" / "loop.png").symlink_to(home / "data" / "loop.png")
    code, err = cli(capsys, "stain", home / "data", "-o", tmp_path / "out", "--outputs", "enhanced",
                    "--model", tiny_model_file, *FAST)
    assert code == 0, err
    assert "skipping 2 link(s)" in err and "gone.png" in err and "loop.png" in err


# -- damaged OME-Zarr input ------------------------------------------------------------------------------
@pytest.fixture
def ome_zarr_input(tmp_path, darkfield_tile) -> Path:
    path = tmp_path / "in.ome.zarr"
    write_ome_zarr(path, [np.moveaxis(np.tile(darkfield_tile, (2, 2, 1)), -1, 0)], "cyx")  # 64-px chunks
    return path


def test_a_corrupt_chunk_in_a_slide_is_a_clear_error(capsys, tiny_model_file, ome_zarr_input, tmp_path):
    chunk = ome_zarr_input / "0" / "0.1.1"
    chunk.write_bytes(b"\x02\x01garbage" + chunk.read_bytes()[10:])
    for output in (tmp_path / "out.ome.zarr", tmp_path / "out"):  # whole-slide mode, then image mode
        chunk = ["--chunk", "256"] if output.suffix == ".zarr" else []
        code, err = cli(capsys, "stain", ome_zarr_input, "-o", output, "--model", tiny_model_file, *chunk, *FAST)
        assert code == 2 and "Traceback" not in err, err
        assert "damaged" in err or "cannot read" in err, err


def test_missing_chunks_of_a_slide_are_said(capsys, tiny_model_file, ome_zarr_input, tmp_path):
    (ome_zarr_input / "0" / "0.2.3").unlink()
    code, err = cli(capsys, "stain", ome_zarr_input, "-o", tmp_path / "out.ome.zarr", "--model", tiny_model_file,
                    "--outputs", "enhanced", "--chunk", "256", *FAST)
    assert code == 0, err
    assert "1 of 64 stored chunks" in err and "holes" in err


# -- signals and what killed runs leave behind -----------------------------------------------------------
def test_partial_files_of_a_killed_writer_are_removed(tmp_path):
    from digital_stain.io.images import atomic_path, write_image

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    target = tmp_path / "model.safetensors"
    stale = tmp_path / f".model.safetensors.partial-{int(dead.stdout)}-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    alive = tmp_path / f".model.safetensors.partial-{os.getpid()}-def456"  # a writer that still runs
    alive.mkdir()
    other = tmp_path / ".notes.txt.partial-1-x"  # another target's: not this write's business
    other.mkdir()
    write_image(tmp_path / "unrelated.png", np.zeros((8, 8), np.uint8))
    assert stale.exists()
    with atomic_path(target) as staging:
        staging.write_bytes(b"model")
    assert not stale.exists() and alive.exists() and other.exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_folder_stain_stops_cleanly(tiny_model_file, darkfield_tile, tmp_path, signum):
    folder = tmp_path / "in"
    folder.mkdir()
    # 80 images of 768 x 768: enough that the tiny model is still staining when the signal comes, even on a fast
    # CPU (an image stains in one pass now: 160 of 256 x 256 once finished before the signal landed)
    mosaic = np.tile(darkfield_tile, (3, 3, 1))
    for i in range(80):
        Image.fromarray(np.roll(mosaic, i, axis=0)).save(folder / f"{i:03d}.png", compress_level=1)
    out = tmp_path / "out"
    script = Path(sys.executable).parent / "digital-stain"
    # a background job (`cmd &` in a script, nohup) starts with SIGINT ignored and its children inherit that, so
    # Ctrl-C's default is restored for the child: what is tested is a terminal's Ctrl-C
    process = subprocess.Popen([str(script), "stain", str(folder), "-o", str(out), "--model", str(tiny_model_file),
                                *FAST], stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.partial-*/*")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)  # staining has begun: the staged folder has its first output
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err and "was not written" in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial files, no lock


# -- writing where nothing can be written ------------------------------------------------------------------
READ_ONLY = Path("/sys")  # a read-only file system, even for root (who passes every permission check)


@pytest.mark.skipif(not READ_ONLY.is_dir(), reason="needs /sys (Linux)")
@pytest.mark.parametrize("command", ["stain", "stain-slide", "train", "synth", "evaluate"])
def test_an_unwritable_output_is_a_clear_error(capsys, tiny_model_file, darkfield_dir, hne_dir, command):
    image = sorted(darkfield_dir.iterdir())[0]
    args = {
        "stain": ["stain", image, "-o", READ_ONLY / "ds-out", "--model", tiny_model_file, *FAST],
        "stain-slide": ["stain", image, "-o", READ_ONLY / "ds-out.ome.zarr", "--model", tiny_model_file, *FAST],
        "train": ["train", "--init", tiny_model_file, "--darkfield", darkfield_dir, "--stained", hne_dir,
                  "-o", READ_ONLY / "ds-model.safetensors", "--steps", "2", *FAST],
        "synth": ["synth", "--stained", hne_dir, "-o", READ_ONLY / "ds-synth", "--model", tiny_model_file],
        "evaluate": ["evaluate", "--darkfield", darkfield_dir, "--model", tiny_model_file, "--device", "cpu", "-q",
                     "--json", READ_ONLY / "ds-scores.json"],
    }[command]
    started = time.monotonic()
    code, err = cli(capsys, *args)
    assert code == 2 and "Traceback" not in err, err
    assert str(READ_ONLY) in err and ("cannot" in err or "not writable" in err), err
    if command == "train":
        assert time.monotonic() - started < 30  # refused before training, not after it


def test_a_huge_declared_ome_zarr_is_refused_in_image_mode_before_reading(capsys, tiny_model_file, tmp_path):
    import zarr

    store = tmp_path / "huge.ome.zarr"
    group = zarr.open_group(str(store), mode="w", zarr_format=2)
    group.create_array("0", shape=(3, 1_000_000, 1_000_000), chunks=(3, 1024, 1024), dtype="uint8")  # no data
    group.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}],
                                   "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"},
                                            {"name": "x", "type": "space"}]}]
    started = time.monotonic()
    code, err = cli(capsys, "stain", store, "-o", tmp_path / "out", "--model", tiny_model_file, *FAST)
    assert code == 2 and "1000000 x 1000000" in err and "OME-Zarr instead" in err, err
    assert time.monotonic() - started < 60 and not (tmp_path / "out").exists()


def _can_mount_tmpfs() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare and a user mount namespace (a small tmpfs)")
@pytest.mark.parametrize("fmt", ["png", "tif"])
def test_a_full_disk_is_a_clear_error_and_leaves_nothing(tiny_model_file, darkfield_tile, tmp_path, fmt):
    """A real full disk: a 256 KiB tmpfs, in a mount namespace of the command's own (no root needed)."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(np.roll(darkfield_tile, 40 * i, axis=1)).save(folder / f"{i}.png")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = Path(sys.executable).parent / "digital-stain"
    command = (f'mount -t tmpfs -o size=256k tmpfs "{disk}" || exit 99; '
               f'"{script}" stain "{folder}" -o "{disk}/out" --format {fmt} --model "{tiny_model_file}" '
               f'--device cpu --precision fp32 -q; echo "exit=$?"; ls -A "{disk}"')
    done = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, timeout=300)
    lines = done.stdout.split()
    assert "exit=2" in lines, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and "No space left" in done.stderr, done.stderr
    assert lines[lines.index("exit=2") + 1:] == []  # the disk is empty again: nothing staged is left
