"""The ``digital-stain`` command line, run in-process through ``digital_stain.cli.main``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from digital_stain.core.arrays import to_uint8
from digital_stain.cli import main
from digital_stain.stain.model import StainModel
from digital_stain.io.outputs import MARKER

FAST = ["--device", "cpu", "--precision", "fp32", "-q"]


def run(capsys, *args) -> tuple[int, str]:
    """Run the CLI in-process; return (exit code, stderr)."""
    capsys.readouterr()
    code = main(["stain", *map(str, args), *FAST])
    return code, capsys.readouterr().err


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def visible(folder: Path) -> list[str]:
    """What a user sees in a folder (our hidden marker and lock files aside)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".partial" in p.name]


@pytest.fixture
def crop(darkfield_tile) -> np.ndarray:
    return np.ascontiguousarray(darkfield_tile[64:128, 96:160])  # 64 x 64 RGB uint8


@pytest.fixture
def small_png(tmp_path, crop) -> Path:
    path = tmp_path / "in" / "small tile.png"
    path.parent.mkdir()
    Image.fromarray(crop).save(path)
    return path


def expected(model_file: Path, image: np.ndarray, outputs=None) -> dict[str, np.ndarray]:
    results = StainModel.load(model_file).stain(image, outputs, precision="fp32", device="cpu")
    return {k: to_uint8(v) for k, v in results.items()}


# -- help ------------------------------------------------------------------
def test_console_script_help():
    script = Path(sys.executable).parent / "digital-stain"
    exe = str(script) if script.exists() else shutil.which("digital-stain")
    assert exe, "the digital-stain console script is not installed"
    done = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "stain" in done.stdout and "train-teacher" in done.stdout


def test_stain_help_lists_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["stain", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model", "--outputs", "--tile", "--overlap", "--overwrite", "--precision"):
        assert option in out


# -- staining --------------------------------------------------------------
def test_stain_one_sample_file(capsys, tiny_model_file, sample_dir, tmp_path):
    source = sample_dir / "darkfield_0_0.png"
    out = tmp_path / "out"
    code, err = run(capsys, source, "-o", out, "--model", tiny_model_file)
    assert code == 0, err
    assert "wrote" in err
    want = expected(tiny_model_file, read_png(source))
    assert visible(out) == ["enhanced", "student", "teacher"]
    for name in ("enhanced", "teacher", "student"):
        files = list((out / name).iterdir())
        assert [f.name for f in files] == ["darkfield_0_0.png"], name
        image = read_png(files[0])
        assert image.dtype == np.uint8, name
        assert image.shape == ((256, 256) if name == "enhanced" else (256, 256, 3)), name
        np.testing.assert_array_equal(image, want[name], err_msg=name)
    assert leftovers(tmp_path) == []


def test_folder_input_keeps_names(capsys, tiny_model_file, tmp_path, darkfield_tile):
    folder = tmp_path / "slides"
    folder.mkdir()
    Image.fromarray(darkfield_tile[:64, :80]).save(folder / "alpha.png")
    tifffile.imwrite(folder / "beta 2.tif", darkfield_tile[100:148, 50:114], photometric="rgb")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    code, err = run(capsys, folder, "-o", out, "--model", tiny_model_file, "--outputs", "enhanced,teacher")
    assert code == 0, err
    assert visible(out) == ["enhanced", "teacher"]
    for name in ("enhanced", "teacher"):
        assert sorted(p.name for p in (out / name).iterdir()) == ["alpha.png", "beta 2.png"], name
    assert read_png(out / "teacher" / "alpha.png").shape == (64, 80, 3)
    assert read_png(out / "enhanced" / "beta 2.png").shape == (48, 64)
    assert leftovers(tmp_path) == []


def test_folder_single_output_goes_straight_into_folder(capsys, tiny_model_file, tmp_path, crop):
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("one.png", "two.png"):
        Image.fromarray(crop).save(folder / name)
    out = tmp_path / "out"
    code, err = run(capsys, folder, "-o", out, "--model", tiny_model_file, "--outputs", "enhanced", "--format", "tif")
    assert code == 0, err
    assert visible(out) == ["one.tif", "two.tif"]
    np.testing.assert_array_equal(tifffile.imread(out / "one.tif"), expected(tiny_model_file, crop, ["enhanced"])["enhanced"])


def test_single_output_to_named_file(capsys, tiny_model_file, small_png, tmp_path, crop):
    target = tmp_path / "result" / "x.png"
    code, err = run(capsys, small_png, "-o", target, "--model", tiny_model_file, "--outputs", "teacher")
    assert code == 0, err
    assert [p.name for p in target.parent.iterdir()] == ["x.png"], "exactly that file, nothing else"
    assert target.is_file()
    image = read_png(target)
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
    np.testing.assert_array_equal(image, expected(tiny_model_file, crop, ["teacher"])["teacher"])


def test_single_output_to_named_tiff(capsys, tiny_model_file, small_png, tmp_path):
    target = tmp_path / "result" / "x.tif"
    code, err = run(capsys, small_png, "-o", target, "--model", tiny_model_file, "--outputs", "enhanced")
    assert code == 0, err
    assert [p.name for p in target.parent.iterdir()] == ["x.tif"]
    image = tifffile.imread(target)
    assert image.dtype == np.uint8 and image.shape == (64, 64)


def test_a_tiff_output_keeps_the_input_s_pixel_size(capsys, tiny_model_file, darkfield_tile, tmp_path):
    from digital_stain.io.images import read_calibration

    source = tmp_path / "slide.ome.tif"
    tifffile.imwrite(source, darkfield_tile[:96, :96], photometric="rgb", ome=True,
                     metadata={"axes": "YXS", "PhysicalSizeX": 0.345, "PhysicalSizeY": 0.345})
    code, err = run(capsys, source, "-o", tmp_path / "out", "--model", tiny_model_file, "--format", "tif")
    assert code == 0, err
    for output in ("enhanced", "teacher", "student"):
        found = read_calibration(tmp_path / "out" / output / "slide.ome.tif")
        assert found.unit == "micrometer" and np.allclose(found.pixel_size, 0.345), output


def test_existing_output_refused_then_overwritten(capsys, tiny_model_file, small_png, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = run(capsys, small_png, "-o", out, "--model", tiny_model_file, "--outputs", "enhanced,teacher")
    assert code == 2
    assert "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "precious"
    assert leftovers(tmp_path) == []

    code, err = run(capsys, small_png, "-o", out, "--model", tiny_model_file, "--outputs", "enhanced,teacher",
                    "--overwrite")
    assert code == 2 and "did not write" in err  # --overwrite replaces only our own outputs
    assert (out / "keep.txt").read_text() == "precious"

    ours = tmp_path / "ours"
    assert run(capsys, small_png, "-o", ours, "--model", tiny_model_file, "--outputs", "teacher")[0] == 0
    code, err = run(capsys, small_png, "-o", ours, "--model", tiny_model_file, "--outputs", "enhanced,teacher",
                    "--overwrite")
    assert code == 0, err
    assert visible(ours) == ["enhanced", "teacher"] and (ours / MARKER).is_file()
    assert (ours / "teacher" / "small tile.png").is_file()
    assert leftovers(tmp_path) == []


# -- refusals: exit code 2, a message, nothing left behind -------------------
def _bad_input(kind: str, folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    if kind == "empty-png":
        path = folder / "empty.png"
        path.write_bytes(b"")
    elif kind == "1x1-png":
        path = folder / "dot.png"
        Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(path)
    elif kind == "nan-tiff":
        path = folder / "nan.tif"
        data = np.random.default_rng(0).random((32, 32), dtype=np.float32)
        data[3, 4] = np.nan
        tifffile.imwrite(path, data)
    elif kind == "2-channel-tiff":
        path = folder / "two.tif"
        tifffile.imwrite(path, np.zeros((32, 32, 2), np.uint8), photometric="minisblack", planarconfig="contig")
    elif kind == "text-as-png":
        path = folder / "text.png"
        path.write_text("this is not a PNG at all\n" * 10)
    elif kind == "missing":
        path = folder / "nothing-here.png"
    else:  # pragma: no cover
        raise ValueError(kind)
    return path


@pytest.mark.parametrize(
    "kind, words",
    [
        ("empty-png", "cannot read"),
        ("1x1-png", "1 x 1 pixels"),
        ("nan-tiff", "NaN"),
        ("2-channel-tiff", "2 channels"),
        ("text-as-png", "cannot read"),
        ("missing", "does not exist"),
    ],
)
def test_bad_input_image_refused(capsys, tiny_model_file, tmp_path, kind, words):
    source = _bad_input(kind, tmp_path / "in")
    out = tmp_path / "out"
    code, err = run(capsys, source, "-o", out, "--model", tiny_model_file)
    assert code == 2
    assert "digital-stain: error:" in err
    assert words in err
    if words in ("cannot read", "does not exist"):
        assert source.name in err
    assert not out.exists()
    assert leftovers(tmp_path) == []


def _bad_model(kind: str, good: Path, folder: Path) -> Path:
    data = good.read_bytes()
    if kind == "tampered":
        path = folder / "tampered.safetensors"
        flipped = bytearray(data)
        flipped[-5] ^= 0x01  # one bit of one weight
        path.write_bytes(bytes(flipped))
    elif kind == "truncated":
        path = folder / "truncated.safetensors"
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated-header":
        path = folder / "stub.safetensors"
        path.write_bytes(data[:100])
    elif kind == "empty":
        path = folder / "empty.safetensors"
        path.write_bytes(b"")
    elif kind == "pickle":
        path = folder / "model.pth"
        torch.save({"weight": torch.zeros(3)}, path)
    elif kind == "legacy-pickle":
        path = folder / "old.pt"
        torch.save({"weight": torch.zeros(3)}, path, _use_new_zipfile_serialization=False)
    elif kind == "not-ours":
        from safetensors.torch import save_file

        path = folder / "other.safetensors"
        save_file({"x": torch.zeros(2)}, str(path))
    elif kind == "no-such-name":
        path = Path("no-such-model-xyz")
    else:  # pragma: no cover
        raise ValueError(kind)
    return path


@pytest.mark.parametrize(
    "kind, words",
    [
        ("tampered", "checksum"),
        ("truncated", "truncated"),
        ("truncated-header", "truncated"),
        ("empty", "empty or truncated"),
        ("pickle", "pickle"),
        ("legacy-pickle", "pickle"),
        ("not-ours", "not a digital-stain model"),
        ("no-such-name", "Shipped models"),
    ],
)
def test_bad_model_refused(capsys, tiny_model_file, small_png, tmp_path, kind, words):
    model = _bad_model(kind, tiny_model_file, tmp_path / "models")
    out = tmp_path / "out"
    code, err = run(capsys, small_png, "-o", out, "--model", model)
    assert code == 2
    assert "digital-stain: error:" in err
    assert words in err
    assert "Traceback" not in err
    assert not out.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--outputs", "bogus"], "unknown output"),
        (["--outputs", "student"], None),  # the tiny model has a student: fine
    ],
)
def test_outputs_option(capsys, tiny_model_file, small_png, tmp_path, extra, words):
    out = tmp_path / "out.png"
    code, err = run(capsys, small_png, "-o", out, "--model", tiny_model_file, *extra)
    if words is None:
        assert code == 0, err
        assert read_png(out).shape == (64, 64, 3)
    else:
        assert code == 2 and words in err
        assert not out.exists()


def test_model_without_student_refuses_student_output(capsys, tiny_model, small_png, tmp_path):
    path = tmp_path / "teacher-only.safetensors"
    StainModel(tiny_model.enhancer, tiny_model.teacher, None, {"name": "teacher-only"}).save(path)
    code, err = run(capsys, small_png, "-o", tmp_path / "out", "--model", path, "--outputs", "student")
    assert code == 2
    assert "no student" in err and "enhanced, teacher" in err
    assert not (tmp_path / "out").exists()


def test_folder_without_images_refused(capsys, tiny_model_file, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "readme.txt").write_text("hi")
    code, err = run(capsys, folder, "-o", tmp_path / "out", "--model", tiny_model_file)
    assert code == 2 and "no image files" in err
    assert not (tmp_path / "out").exists()


def test_folder_with_one_bad_file(capsys, tiny_model_file, tmp_path, crop):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(crop).save(folder / "good1.png")
    Image.fromarray(crop[::-1]).save(folder / "good2.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    code, err = run(capsys, folder, "-o", out, "--model", tiny_model_file, "--outputs", "enhanced,teacher")
    assert code == 1
    assert "broken.png" in err and "skipped" in err
    for name in ("enhanced", "teacher"):
        assert sorted(p.name for p in (out / name).iterdir()) == ["good1.png", "good2.png"]
    assert leftovers(tmp_path) == []


def test_folder_with_only_bad_files(capsys, tiny_model_file, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(folder / "b.png")
    out = tmp_path / "out"
    code, err = run(capsys, folder, "-o", out, "--model", tiny_model_file)
    assert code == 2
    assert "no image could be stained" in err and "a.png" in err and "b.png" in err
    assert not out.exists()
    assert leftovers(tmp_path) == []


# -- stacks ----------------------------------------------------------------
@pytest.fixture
def stack_tif(tmp_path, darkfield_tile) -> tuple[Path, np.ndarray]:
    stack = np.stack([darkfield_tile[:48, :64, c] for c in range(3)])  # (Z, Y, X) uint8
    path = tmp_path / "in" / "stack.tif"
    path.parent.mkdir()
    tifffile.imwrite(path, stack, photometric="minisblack")  # a Z stack; tifffile's default would store RGB planes
    return path, stack


def test_stack_stained_plane_by_plane(capsys, tiny_model_file, tmp_path, stack_tif):
    path, stack = stack_tif
    out = tmp_path / "out"
    code, err = run(capsys, path, "-o", out, "--model", tiny_model_file, "--outputs", "enhanced,teacher")
    assert code == 0, err
    assert "multi-page TIFF" in err
    enhanced = tifffile.imread(out / "enhanced" / "stack.tif")
    teacher = tifffile.imread(out / "teacher" / "stack.tif")
    assert enhanced.shape == (3, 48, 64) and enhanced.dtype == np.uint8
    assert teacher.shape == (3, 48, 64, 3) and teacher.dtype == np.uint8
    for z in range(3):
        want = expected(tiny_model_file, stack[z], ["enhanced", "teacher"])
        np.testing.assert_array_equal(enhanced[z], want["enhanced"])
        np.testing.assert_array_equal(teacher[z], want["teacher"])


@pytest.mark.parametrize("planes", [1, 2, 5])
def test_stack_written_as_multipage_tiff(capsys, tiny_model_file, tmp_path, darkfield_tile, planes):
    stack = np.stack([darkfield_tile[16 * z : 16 * z + 48, :64, z % 3] for z in range(planes)])
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack)
    out = tmp_path / "out"
    code, err = run(capsys, path, "-o", out, "--model", tiny_model_file, "--outputs", "enhanced,teacher")
    assert code == 0, err
    with tifffile.TiffFile(out / "enhanced" / "stack.tif") as tif:
        assert len(tif.pages) == planes
        assert tif.pages[0].shape == (48, 64)
    with tifffile.TiffFile(out / "teacher" / "stack.tif") as tif:
        assert len(tif.pages) == planes
        assert tif.pages[0].shape == (48, 64, 3)
        assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.RGB


def test_view_without_display_writes_outputs_and_says_so(capsys, monkeypatch, tiny_model_file, sample_dir, tmp_path):
    for name in ("DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "out"
    code, err = run(capsys, sample_dir / "darkfield_0_0.png", "-o", out, "--model", tiny_model_file, "--view")
    assert code == 0, err
    assert "no display" in err
    assert (out / "teacher" / "darkfield_0_0.png").is_file()


# -- train --paired --------------------------------------------------------------
@pytest.fixture
def paired_dirs(darkfield_dir, sections_dir):
    """The dark-field sample tiles and their 'sections' (conftest's ``sections_dir``)."""
    return darkfield_dir, sections_dir


@pytest.mark.slow
def test_train_paired_end_to_end(capsys, tiny_model_file, paired_dirs, tmp_path):
    from digital_stain.io.modelfile import load_bundle

    darkfield, sections = paired_dirs
    output = tmp_path / "paired.safetensors"
    argv = ["train", "--paired", "--darkfield", str(darkfield), "--stained", str(sections), "--output", str(output),
            "--init", str(tiny_model_file), "--from-scratch", "--size", "tiny", "--steps", "2", "--crop", "64", *FAST,
            "--teacher-steps", "2", "--reg-warmup", "3", "--lambda-smooth", "1", "--reg-lr-scale", "10"]
    # the registration network's settings are for paired training only: refused before any work without --paired
    assert main([a for a in argv if a != "--paired"]) == 2
    assert ("--reg-warmup, --lambda-smooth, --reg-lr-scale set the registration network of paired training"
            in capsys.readouterr().err)
    assert main(argv) == 0, capsys.readouterr().err
    assert "chosen at step" in capsys.readouterr().err
    model = StainModel.load(output)
    student = model.metadata["provenance"]["student"]
    assert student["mode"] == "paired" and student["steps"] == 2 and student["stained"] == str(sections)
    assert (student["config"]["lambda_kd"], student["config"]["lambda_con"]) == (2.0, 20.0)
    assert (student["config"]["reg_warmup"], student["config"]["lambda_smooth"]) == (3, 1.0)
    assert student["config"]["reg_lr_scale"] == 10.0
    assert "aligned_l1" in student["history"][-1]
    assert model.metadata["provenance"]["command"].startswith("digital-stain train --paired")
    tensors, _ = load_bundle(output)
    assert not any("registration" in k for k in tensors)
    checkpoint, _ = load_bundle(output.with_name(output.name + ".ckpt.safetensors"))
    assert any(k.startswith("registration.") for k in checkpoint)
    # the same checkpoints, resumed without --paired: refused, naming the pairing (the teacher's stage comes first;
    # the student's refusal of the other mode is tested in test_train_paired.py)
    unpaired = argv[: argv.index("--reg-warmup")]
    assert main([a for a in unpaired if a != "--paired"] + ["--resume"]) == 2
    assert ("learnt from adjacent sections (a paired run), and this run learns from the H&E images alone"
            in capsys.readouterr().err)


def test_train_paired_refuses_folders_that_do_not_pair(capsys, tiny_model_file, paired_dirs, hne_dir, tmp_path):
    darkfield, sections = paired_dirs
    output = tmp_path / "never.safetensors"
    base = ["train", "--paired", "--darkfield", str(darkfield), "--output", str(output), "--init", str(tiny_model_file),
            "--size", "tiny", "--steps", "1", "--crop", "64", *FAST]
    assert main(base + ["--stained", str(hne_dir)]) == 2
    err = capsys.readouterr().err
    assert "do not pair by name" in err and "darkfield_0_0.png" in err and "without --paired" in err
    Image.fromarray(read_png(sections / "darkfield_0_5.png")[:, :128]).save(sections / "darkfield_0_5.png")
    assert main(base + ["--stained", str(sections)]) == 2
    assert "differ in size (darkfield_0_5.png: dark-field 256 x 256, stained 128 x 256)" in capsys.readouterr().err
    assert not output.exists()


# -- another microscope ------------------------------------------------------------------
DSD_P = Path(__file__).parent / "data" / "dsd_p"


@pytest.mark.slow
def test_train_finds_adjacent_sections_and_unpaired_overrides_it(capsys, tiny_model_file, tmp_path):
    argv = ["train", "--darkfield", str(DSD_P / "darkfield"), "--stained", str(DSD_P / "stained"), "--init",
            str(tiny_model_file), "--steps", "2", "--teacher-steps", "0", "--crop", "64", "--no-check", *FAST]
    assert main(argv + ["--output", str(tmp_path / "auto.safetensors")]) == 0
    err = capsys.readouterr().err
    assert "paired sections: the names and sizes pair and the tissue of the pairs agrees" in err
    assert StainModel.load(tmp_path / "auto.safetensors").metadata["provenance"]["student"]["mode"] == "paired"
    assert main(argv + ["--output", str(tmp_path / "plain.safetensors"), "--unpaired"]) == 0
    assert "paired sections" not in capsys.readouterr().err
    assert StainModel.load(tmp_path / "plain.safetensors").metadata["provenance"]["student"]["mode"] == "unpaired"
    assert main(argv + ["--output", str(tmp_path / "x.safetensors"), "--paired", "--unpaired"]) == 2  # exclusive
    assert "not allowed with argument" in capsys.readouterr().err


def test_stain_adapts_to_another_microscope_and_says_so(capsys, tmp_path):
    """A real DSD_P tile (the lab's 9x brighter set-up) through the shipped DSD_U model."""
    tile = sorted((DSD_P / "darkfield").glob("*.png"))[0]
    code, err = run(capsys, tile, "--output", tmp_path / "auto", "--model", "dsd-unpaired-fast", "--outputs", "teacher")
    assert code == 0, err
    assert "input: adapted to this input (the input looks unlike the model's microscope; distance" in err
    code, err = run(capsys, tile, "--output", tmp_path / "off", "--model", "dsd-unpaired-fast", "--outputs", "teacher",
                    "--adapt", "off")
    assert code == 0 and "adaptation off" in err
    adapted, plain = read_png(tmp_path / "auto" / tile.name), read_png(tmp_path / "off" / tile.name)
    assert adapted.mean() > 80 > 30 > plain.mean()  # the unadapted teacher is nearly black on this microscope


def test_a_folder_is_decided_once_for_all_its_images(capsys, tiny_model_file, darkfield_dir, tmp_path):
    code, err = run(capsys, darkfield_dir, "--output", tmp_path / "out", "--model", tiny_model_file)
    assert code == 0, err
    assert err.count("folder: ") == 1 and "no adaptation needed" in err  # the model's own microscope
    (darkfield_dir / "x.png").write_bytes(b"not an image")  # unreadable files do not spoil the decision
    code, err = run(capsys, darkfield_dir, "--output", tmp_path / "out2", "--model", tiny_model_file, "--adapt", "on")
    assert code == 1 and "folder: adapted to this input (asked for" in err and "x.png" in err


def test_evaluate_records_the_adaptation(capsys, tiny_model_file, tmp_path):
    import json

    out = tmp_path / "scores.json"
    code = main(["evaluate", "--darkfield", str(DSD_P / "darkfield"), "--reference", str(DSD_P / "stained"),
                 "--model", str(tiny_model_file), "--outputs", "teacher", "--json", str(out), "-q", "--device", "cpu"])
    assert code == 0
    assert "folder: adapted to this input" in capsys.readouterr().err
    record = json.loads(out.read_text())
    assert record["adaptation"]["applied"] and record["adaptation"]["mode"] == "auto"


@pytest.mark.slow
def test_train_refuses_to_write_a_fine_tune_that_is_broken(capsys, darkfield_dir, tmp_path):
    """The user gave dark-field images as the H&E folder: the teacher learns to stain black. Nothing is written."""
    output = tmp_path / "mine.safetensors"
    argv = ["train", "--init", "dsd-unpaired-fast", "--darkfield", str(darkfield_dir), "--stained", str(darkfield_dir),
            "--output", str(output), "--steps", "2", "--teacher-steps", "30", "--crop", "64", *FAST]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"is not better than dsd-unpaired-fast on your held-out images, so {output} was not written" in err
    assert "stains nearly black" in err and "not swapped" in err
    assert not output.exists()
    rejected = tmp_path / "mine.rejected.safetensors"
    check = StainModel.load(rejected).metadata["provenance"]["fine_tune"]["check"]
    assert not check["passed"] and check["tuned"]["teacher"]["mean_luma"] < 0.15
