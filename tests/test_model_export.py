"""A model's networks exported to ONNX and TorchScript (digital_stain.io.export, CLI ``export``): onnxruntime
gives our own stain of a real tile, and a tiled run of the export has no seams."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from digital_stain.cli import main
from digital_stain.core.arrays import InputError
from digital_stain.io.export import export_model
from digital_stain.stain.kernel import StainKernel
from digital_stain.stain.settings import StainSettings
from digital_stain.stain.tiling import tiled_apply

TOLERANCE = 1e-4  # in [0, 1]: float32 rounding of two runtimes, 0.03 gray levels


def _prepared(model, image):
    kernel = StainKernel(model, model.preparation(image), StainSettings(device="cpu", precision="fp32"))
    return kernel.prep.plane(image, student=True)  # (enhanced (Y, X), student input (4, Y, X))


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnx_student_and_teacher_stain_a_real_tile_as_we_do(tiny_model, darkfield_tile, tmp_path):
    enhanced, student_in = _prepared(tiny_model, darkfield_tile)
    ours = tiny_model.stain(darkfield_tile, ["teacher", "student"], precision="fp32", device="cpu")
    student = export_model(tiny_model, tmp_path / "student.onnx", statistics_from=darkfield_tile)
    got = _session(student).run(None, {"input": student_in[None]})[0][0].transpose(1, 2, 0)
    np.testing.assert_allclose(got, ours["student"], atol=TOLERANCE)
    teacher = export_model(tiny_model, tmp_path / "teacher.onnx", part="teacher")
    got = _session(teacher).run(None, {"input": enhanced[None, None]})[0][0].transpose(1, 2, 0)
    np.testing.assert_allclose(got, ours["teacher"], atol=TOLERANCE)
    info = {p.key: p.value for p in onnx.load(str(student)).metadata_props}
    assert info["model"] == "tiny-test" and info["part"] == "student" and info["size_multiple"] == "4"
    assert info["statistics"] == "recorded on the image given (256 x 256 px)" and info["written_by"].startswith("napari-digital-stain")


def test_a_tiled_run_of_the_export_equals_the_one_pass_stain(tiny_model, darkfield_tile, tmp_path):
    """The documented recipe: frozen statistics make every tile normalise alike, so tiles blend without seams."""
    image = np.concatenate([darkfield_tile, darkfield_tile[::-1]], axis=0)  # 512 x 256
    _, student_in = _prepared(tiny_model, image)
    session = _session(export_model(tiny_model, tmp_path / "student.onnx", statistics_from=image))

    def run(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"input": batch.numpy()})[0])

    tiled = tiled_apply(run, student_in, out_channels=3, tile=256, overlap=128, multiple=4, min_size=8)
    one_pass = tiny_model.stain(image, ["student"], precision="fp32", device="cpu")["student"]
    assert np.abs(np.clip(tiled.transpose(1, 2, 0), 0, 1) - one_pass).max() < 1 / 255  # the default overlap's bound


def test_torchscript_export_equals_the_onnx_one(tiny_model, darkfield_tile, tmp_path):
    _, student_in = _prepared(tiny_model, darkfield_tile)
    onnx_out = _session(export_model(tiny_model, tmp_path / "s.onnx", statistics_from=darkfield_tile)).run(
        None, {"input": student_in[None]})[0]
    scripted = torch.jit.load(str(export_model(tiny_model, tmp_path / "s.pt", format="torchscript",
                                               statistics_from=darkfield_tile)))  # our own file, just written
    with torch.no_grad():
        np.testing.assert_allclose(scripted(torch.from_numpy(student_in[None])).numpy(), onnx_out, atol=TOLERANCE)


def test_the_command_line_exports_and_replaces_only_its_own_files(capsys, tiny_model_file, sample_dir, tmp_path):
    out = tmp_path / "student.onnx"
    args = ["export", str(tiny_model_file), "-o", str(out), "--statistics-from", str(sorted(sample_dir.glob("*.png"))[0])]
    assert main(args) == 0 and out.is_file()
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert main(["export", str(tiny_model_file), "-o", str(tmp_path / "t.pt"), "--part", "teacher", "-q"]) == 0
    capsys.readouterr()
    assert main(["export", str(tiny_model_file), "-o", str(tmp_path / "no-statistics.onnx")]) == 2
    assert "--statistics-from" in capsys.readouterr().err and not (tmp_path / "no-statistics.onnx").exists()
    theirs = tmp_path / "theirs.onnx"
    theirs.write_text("a user's file")
    assert main(args[:2] + ["-o", str(theirs)] + args[4:] + ["--overwrite", "-q"]) == 2
    assert theirs.read_text() == "a user's file"


def test_what_cannot_be_exported_is_refused(tiny_model, tmp_path):
    with pytest.raises(InputError, match="unknown export format"):
        export_model(tiny_model, tmp_path / "x.bin", format="tflite")
    with pytest.raises(InputError, match="unknown part"):
        export_model(tiny_model, tmp_path / "x.onnx", part="enhancer")
    with pytest.raises(InputError, match="statistics_from"):
        export_model(tiny_model, tmp_path / "x.onnx")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("x.", ".x."))]  # nothing written
