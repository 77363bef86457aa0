"""A model's networks exported for other runtimes: ONNX (onnxruntime, VisCy-style deployment) or TorchScript.

What is exported is the network alone, as a function of its prepared input, with everything it
needs inside:

- ``student``: input ``(N, 4, H, W)`` float32 in [-1, 1] (the dark-field RGB, mapped when adapted,
  and the enhanced gray, each ``2 v - 1``), output ``(N, 3, H, W)`` RGB in [0, 1]. Its instance
  norms use **frozen statistics**, recorded on a dark-field image you give (``statistics_from``):
  with them every tile is normalised alike, so a tiled run has no seams, as ours
  (:mod:`digital_stain.stain.tiling`). They stand for the whole image, and they matter: a 1024²
  image stained with statistics from other tissue (the package's sample tiles) differs from its own
  stain by 12.8 gray levels on average, so there is no default; record them on the image itself, or
  one like the ones to be stained.
- ``teacher``: input ``(N, 1, H, W)`` the enhanced gray in [0, 1], output ``(N, 3, H, W)`` RGB in
  [0, 1] (the U-Net and the Lab-to-RGB conversion).

H and W must be multiples of the network's ``size_multiple`` (recorded in the file's metadata;
reflect-pad the input, then crop). The enhancer (a per-dataset look-up table on luma) and value
scaling stay outside: ``docs/usage.md`` ("Export") shows a tiled run with this package preparing
the inputs. bioimage.io is not offered: its model format cannot state a whole-image look-up table
fitted per microscope, nor statistics that must come from the whole image (see the docs).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from digital_stain.core.arrays import InputError
from digital_stain.io.images import atomic_path
from digital_stain.io.outputs import software

FORMATS = ("onnx", "torchscript")
PARTS = ("student", "teacher")
OPSET = 17


class FrozenStudent(torch.nn.Module):
    """The student with its norm statistics as buffers: prepared input in [-1, 1] -> RGB in [0, 1]."""

    def __init__(self, net: torch.nn.Module, statistics) -> None:
        super().__init__()
        self.net = net
        for index, (mean, var) in enumerate(statistics):
            self.register_buffer(f"mean_{index}", mean.detach().float().cpu().clone())
            self.register_buffer(f"var_{index}", var.detach().float().cpu().clone())
        self.count = len(statistics)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        statistics = tuple((getattr(self, f"mean_{i}"), getattr(self, f"var_{i}")) for i in range(self.count))
        return ((self.net(x, statistics) + 1.0) / 2.0).clamp(0.0, 1.0)


class Teacher(torch.nn.Module):
    """The teacher: enhanced gray in [0, 1] -> RGB in [0, 1]."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, gray: torch.Tensor) -> torch.Tensor:
        from digital_stain.core.nets.unet import colorize

        return colorize(self.net, gray).clamp(0.0, 1.0)


def export_model(model, path: str | os.PathLike, *, format: str = "onnx", part: str = "student",
                 statistics_from: np.ndarray | None = None, overwrite: bool = False) -> Path:
    """Write one of ``model``'s networks as an ONNX or TorchScript file.

    Parameters
    ----------
    model : StainModel
    path : path-like
        The file to write (atomically; an existing file only with ``overwrite`` and only if ours).
    format : ``"onnx"`` or ``"torchscript"``
    part : ``"student"`` or ``"teacher"``
    statistics_from : ndarray
        For the student (required): a dark-field image ``(Y, X[, 3])``, the one to be stained or
        one like it, on which its norm statistics are recorded (as :meth:`StainModel.stain` records
        them). Not used for the teacher.
    overwrite : bool

    Returns
    -------
    Path

    Raises
    ------
    InputError
        An unknown format or part, a model without that network, a student export without
        ``statistics_from``, or an output that may not be replaced.
    """
    if format not in FORMATS:
        raise InputError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}.")
    if part not in PARTS:
        raise InputError(f"unknown part {part!r}; choose student or teacher.")
    net = model.student if part == "student" else model.teacher
    if net is None:
        raise InputError(f"model {model.name!r} has no {part} to export.")
    if part == "student" and statistics_from is None:
        raise InputError("the student's norm statistics are frozen into the export and must come from a dark-field "
                         "image like the ones it will stain: give statistics_from (--statistics-from IMAGE).")
    module, example, statistics_note = _module(model, part, statistics_from)
    metadata = {"written_by": software(), "model": model.name, "checksum": model.checksum, "part": part,
                "input": "(N, 4, H, W) float32 in [-1, 1]: dark-field R, G, B (mapped when adapted) and the enhanced "
                         "gray, each 2 v - 1" if part == "student" else "(N, 1, H, W) float32 in [0, 1]: the enhanced gray",
                "output": "(N, 3, H, W) float32 RGB in [0, 1]", "size_multiple": int(net.size_multiple),
                "min_size": int(net.min_size), "statistics": statistics_note}
    with atomic_path(path, overwrite=overwrite) as staged, torch.no_grad():
        if format == "onnx":
            _onnx(module, example, staged, metadata)
        else:
            traced = torch.jit.trace(module, example, check_trace=False)
            torch.jit.save(traced, str(staged), _extra_files={"digital_stain.json": json.dumps(metadata)})
    return Path(path)


def _module(model, part: str, statistics_from) -> tuple[torch.nn.Module, torch.Tensor, str]:
    """The exportable module (a CPU float32 copy, eval), an example input, and where its statistics came from."""
    import copy

    from digital_stain.core.nets.norm import TileStableInstanceNorm

    net = copy.deepcopy(model.student if part == "student" else model.teacher).float().cpu().eval()
    for layer in net.modules():  # writing into the convolution's output (out=) has no ONNX form
        if isinstance(layer, TileStableInstanceNorm):
            layer.inplace = False
    side = max(64, net.size_multiple * 4)
    if part == "teacher":
        return Teacher(net), torch.rand(1, 1, side, side), "none (the teacher has no instance norms)"
    image = np.asarray(statistics_from)
    statistics = _statistics(model, image)
    note = f"recorded on the image given ({image.shape[0]} x {image.shape[1]} px)"
    return FrozenStudent(net, statistics), torch.rand(1, 4, side, side) * 2 - 1, note


def _statistics(model, image: np.ndarray):
    """The student's norm statistics of ``image``, exactly as an eager stain of it records them (fp32, CPU)."""
    from digital_stain.stain.kernel import StainKernel
    from digital_stain.stain.settings import StainSettings
    from digital_stain.stain.tiling import stats_sample

    settings = StainSettings(device="cpu", precision="fp32")
    kernel = StainKernel(model, model.preparation(image), settings)
    student_in = kernel.prep.plane(image, student=True)[1]
    net = model.student
    return kernel.statistics(stats_sample(student_in, net.size_multiple, settings.stats_pixels, settings.stats_crop,
                                          net.min_size))


def _onnx(module: torch.nn.Module, example: torch.Tensor, path: Path, metadata: dict) -> None:
    import warnings

    try:
        import onnx
    except ImportError as err:
        raise InputError("exporting to ONNX needs the onnx package: pip install onnx (or choose torchscript).") from err
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on constant folding, not the user's concern
        torch.onnx.export(module, (example,), str(path), input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": axes, "output": axes}, opset_version=OPSET, dynamo=False)
    graph = onnx.load(str(path))
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=str(value))
    onnx.save(graph, str(path))
