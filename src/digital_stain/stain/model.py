"""``StainModel``: load a model file and stain images. The one way to stain, used by all.

>>> model = StainModel.load("dsd-unpaired")          # doctest: +SKIP
>>> outputs = model.stain(darkfield)                   # doctest: +SKIP
>>> outputs["enhanced"].shape, outputs["teacher"].shape  # doctest: +SKIP
((Y, X), (Y, X, 3))

Outputs are float32 in [0, 1]: ``enhanced`` is gray ``(..., Y, X)``,
``teacher`` and ``student`` are RGB ``(..., Y, X, 3)``; stacks keep their
leading axes. Only outputs the model really has are offered: asking for a
student that was never trained is refused, never faked.
"""

from __future__ import annotations

import datetime
import os
import platform
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from digital_stain import __version__
from digital_stain.core.adapt import Adaptation, check_mode, decide
from digital_stain.core.arrays import InputError, ValueScaling, check_plane_shape, plain_array, scaling_of, split_planes
from digital_stain.core.devices import autocast, faster_cpu_precision, resolve_device, resolve_precision
from digital_stain.core.enhance import Enhancer
from digital_stain.core.histograms import measure
from digital_stain.io.modelfile import ModelFileError, load_bundle, numpy_state, save_bundle, torch_state
from digital_stain.stain.kernel import Networks, StainKernel, to_yxc  # noqa: F401  (to_yxc: its old home, still imported from here)
from digital_stain.core.nets import ColorizationUNet, ResnetGenerator
from digital_stain.core.nets.unet import colorize
from digital_stain.core.prepare import Preparation
from digital_stain.stain.settings import StainSettings
from digital_stain.stain.tiling import check_tiling

OUTPUTS = ("enhanced", "teacher", "student")
WEIGHTS_DIR = Path(__file__).parents[1] / "weights"  # the package's own folder, beside stain/
DEFAULT_MODEL = "dsd-unpaired"
PRECISION_PROBE = 256  # side of the square on which auto precision times fp32 against bf16 (CPU)


def available_models() -> list[str]:
    """Names of the models shipped inside the package."""
    return sorted(p.name[: -len(".safetensors")] for p in WEIGHTS_DIR.glob("*.safetensors"))


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A shipped model's name, or a path to a model file."""
    text = str(name_or_path)
    if text in available_models():
        return WEIGHTS_DIR / f"{text}.safetensors"
    path = Path(text).expanduser()
    if path.exists():
        return path
    shipped = ", ".join(available_models()) or "none"
    raise InputError(f"no model named {text!r} and no such file. Shipped models: {shipped}; or give a path to a .safetensors model.")


def _build_parts(path: Path, tensors: dict, meta: dict):
    """The enhancer and networks of a verified model file; a file whose config and tensors disagree, or
    whose weights are not finite, is refused with what is wrong (its checksum only proves it is intact)."""
    config = meta.get("config", {})
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: its metadata 'config' is not a mapping; the file was not written by digital-stain.")
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ModelFileError(f"{path} has NaN or infinite weights ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}): "
                             "the training that wrote it diverged or the file was altered. Use another model.")
    enhancer_state = numpy_state(tensors, "enhancer")
    try:
        enhancer = Enhancer.from_state(enhancer_state)
    except KeyError as err:
        raise ModelFileError(f"{path} has no enhancer tensor {err}; it is not a complete digital-stain model.") from None
    except (ValueError, TypeError) as err:
        raise ModelFileError(f"{path}: its enhancer histograms are unusable ({err}).") from None
    nets = {}
    for role, kind in (("teacher", ColorizationUNet), ("student", ResnetGenerator)):
        if role not in config:
            nets[role] = None
            continue
        try:
            net = kind(**config[role])
        except (TypeError, ValueError) as err:
            raise ModelFileError(f"{path}: its {role} config {config[role]} is not one this version builds ({err}).") \
                from None
        try:
            net.load_state_dict(torch_state(tensors, role))
        except RuntimeError as err:
            first = str(err).strip().splitlines()
            raise ModelFileError(f"{path}: its {role} weights do not match its config {config[role]} "
                                 f"({' '.join(first[1:3]).strip() or first[0]}).") from None
        nets[role] = net
    return enhancer, nets["teacher"], nets["student"]


def _build_optional(path: Path, tensors: dict, meta: dict, role: str):
    """An optional network of a verified model file, or None: ``segmenter`` (the tutorship nuclei U-Net) or
    ``reverse`` (the student's reverse generator F, H&E -> dark-field)."""
    from digital_stain.core.nets.unet import NucleiUNet

    config = meta.get("config", {}).get(role)
    if config is None:
        return None
    kind = {"segmenter": NucleiUNet, "reverse": ResnetGenerator}[role]
    try:
        net = kind(**config)
        net.load_state_dict(torch_state(tensors, role))
    except (TypeError, ValueError, RuntimeError) as err:
        raise ModelFileError(f"{path}: its {role} network does not match its config {config} "
                             f"({str(err).strip().splitlines()[0]}).") from None
    return net.eval()


def provenance(**extra) -> dict:
    """Who/what/when made a model: package, torch and Python versions, date, plus ``extra``."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "package": f"napari-digital-stain {__version__}",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        **extra,
    }


class StainModel:
    """Everything needed to stain: enhancer CDFs, teacher, optional student, and their description.

    Parameters
    ----------
    enhancer : Enhancer
    teacher : ColorizationUNet, optional
    student : ResnetGenerator, optional
    metadata : dict, optional
        ``name``, ``description`` and ``provenance`` (data, command, date, versions).
    segmenter : NucleiUNet, optional
        A nuclei segmenter trained by tutorship (:mod:`digital_stain.nuclei.tutor`); kept on the
        CPU, used by :func:`digital_stain.nuclei.find.find_nuclei`.
    reverse : ResnetGenerator, optional
        The reverse generator F that trained beside the student (H&E -> dark-field, signed RGB);
        kept on the CPU, used by tutorship to translate H&E into dark-field.
    """

    def __init__(self, enhancer: Enhancer, teacher=None, student=None, metadata: dict | None = None,
                 segmenter=None, reverse=None):
        self.enhancer = enhancer
        self.segmenter = segmenter.cpu().eval() if segmenter is not None else None
        self.reverse = reverse.cpu().eval() if reverse is not None else None
        self.teacher = teacher.eval() if teacher is not None else None
        self.student = student.eval() if student is not None else None
        self.metadata = dict(metadata or {})
        self.path: Path | None = None
        self.checksum: str | None = None
        self._device = torch.device("cpu")
        self._networks: dict[str, tuple[tuple, Networks]] = {}  # device -> (network state, copies)
        self._networks_lock = threading.Lock()

    def __getstate__(self) -> dict:
        # pickled (dask.distributed workers) or deep-copied: the device copies are made again where needed
        state = dict(self.__dict__)
        state["_networks"], state["_networks_lock"] = {}, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._networks_lock = threading.Lock()

    # -- what it has -----------------------------------------------------
    @property
    def name(self) -> str:
        return self.metadata.get("name") or (self.path.stem if self.path else "unsaved model")

    @property
    def outputs(self) -> tuple[str, ...]:
        """The outputs this model can produce, in display order."""
        have = {"enhanced": True, "teacher": self.teacher is not None, "student": self.student is not None}
        return tuple(o for o in OUTPUTS if have[o])

    def check_outputs(self, outputs: Sequence[str] | None) -> tuple[str, ...]:
        if outputs is None:
            return self.outputs
        outputs = tuple(dict.fromkeys(o.strip().lower() for o in outputs if o.strip()))
        for out in outputs:
            if out not in OUTPUTS:
                raise InputError(f"unknown output {out!r}; choose from {', '.join(OUTPUTS)}.")
            if out not in self.outputs:
                raise InputError(
                    f"model {self.name!r} has no {out}: it was not trained for this model file. "
                    f"Its outputs are: {', '.join(self.outputs)}."
                )
        if not outputs:
            raise InputError("no outputs asked for.")
        return outputs

    # -- files -----------------------------------------------------------
    @classmethod
    def load(cls, name_or_path: str | os.PathLike = DEFAULT_MODEL, device: str | torch.device = "auto") -> StainModel:
        """Load a shipped model by name or a model file by path (checksum verified, no pickle).

        The networks go to ``device`` (``auto``: CUDA when present, then MPS, then the CPU).
        """
        path = resolve_model_path(name_or_path)
        tensors, meta = load_bundle(path)
        if meta.get("kind") == "checkpoint":
            raise InputError(f"{path} is a training checkpoint, not a model; finish or resume the training to get a model.")
        enhancer, teacher, student = _build_parts(path, tensors, meta)
        model = cls(enhancer, teacher, student, meta, segmenter=_build_optional(path, tensors, meta, "segmenter"),
                    reverse=_build_optional(path, tensors, meta, "reverse"))
        model.path = path
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            model.checksum = fh.metadata()["checksum"]
        return model.to(device)

    def save(self, path: str | os.PathLike, *, half: bool = False, overwrite: bool = False) -> str:
        """Write the model file atomically. ``half`` stores network weights as float16 (half the size)."""
        tensors: dict[str, torch.Tensor] = {
            # copies: the student's input histograms may be the very arrays of the enhancer's,
            # and safetensors refuses tensors that share memory
            f"enhancer.{k}": torch.from_numpy(np.array(v, copy=True, order="C")) for k, v in self.enhancer.state().items()
        }
        config = {}
        for role, net in (("teacher", self.teacher), ("student", self.student), ("segmenter", self.segmenter),
                          ("reverse", self.reverse)):
            if net is None:
                continue
            config[role] = net.config
            for key, value in net.state_dict().items():
                value = value.detach().cpu()
                if half and value.is_floating_point():
                    value = value.half()
                tensors[f"{role}.{key}"] = value
        meta = {**self.metadata, "config": config}
        self.checksum = save_bundle(path, tensors, meta, overwrite=overwrite)
        self.path = Path(path)
        return self.checksum

    def describe(self) -> dict:
        """Model identity for layer metadata and output provenance."""
        return {"model": self.name, "path": str(self.path) if self.path else None, "checksum": self.checksum}

    # -- staining --------------------------------------------------------
    def networks(self, device: str | torch.device | None = None) -> Networks:
        """The teacher and student as read-only copies on ``device`` (default: where the model is).

        Made once per device and kept; made again when the model's own networks were replaced or
        changed in place since (a fine-tune's preview model, ``load_state_dict`` into it), so a stain
        runs the weights the model holds now. Writes through ``param.data`` are not seen by
        PyTorch's version counters: call :meth:`forget_networks` after them.
        """
        device = self._device if device is None else resolve_device(device)
        state = self._network_state()
        with self._networks_lock:
            kept = self._networks.get(str(device))
            if kept is None or kept[0] != state:
                kept = (state, Networks(self.teacher, self.student, device))
                self._networks[str(device)] = kept
            return kept[1]

    def forget_networks(self) -> None:
        """Drop the device copies; the next stain makes them again from the model's networks.

        Needed only after writing into the weights in a way PyTorch's version counters do not see
        (through ``param.data``); replacing a network or changing it in place is noticed by itself.
        """
        with self._networks_lock:
            self._networks.clear()

    def _network_state(self) -> tuple:
        """Which tensors the networks hold and how often each was changed in place (PyTorch's version counters)."""
        return tuple((id(net), *((id(t), t._version) for t in (*net.parameters(), *net.buffers())))
                     for net in (self.teacher, self.student) if net is not None)

    def to(self, device: str | torch.device = "auto") -> StainModel:
        """Move the networks to a device (``auto|cpu|cuda|mps``), the default device of every stain; returns self.

        Staining never calls it: it runs copies on the device it is asked for (:meth:`networks`).
        """
        self._device = resolve_device(device)
        for net in (self.teacher, self.student):
            if net is not None:
                net.to(self._device)
        return self

    def precision_for(self, precision: str, device: torch.device | None = None) -> str:
        """The precision a stain on ``device`` (default: where the model is) runs in.

        ``auto``: bf16 on CUDA GPUs that have it (else fp16); on a CPU with fast bf16 (AMX,
        AVX512-BF16) bf16 if it runs this model's slowest network clearly faster than fp32, timed
        once per network shape on a ``PRECISION_PROBE``-pixel square
        (:func:`~digital_stain.core.devices.faster_cpu_precision`); fp32 on other CPUs.
        """
        device = self._device if device is None else device
        resolved = resolve_precision(precision, device)
        if precision.lower() != "auto" or device.type != "cpu" or resolved == "fp32":
            return resolved
        nets = self.networks(device)  # time the copy that will run (its device, its memory format)
        net = nets.student if nets.student is not None else nets.teacher
        if net is None:
            return "fp32"
        side = PRECISION_PROBE + (-PRECISION_PROBE) % net.size_multiple
        channels = 4 if net is nets.student else 1
        probe = torch.rand(1, channels, side, side, device=device)

        def run(candidate: str) -> None:
            with torch.no_grad(), autocast(device, candidate):
                net(probe) if net is nets.student else colorize(net, probe)

        return faster_cpu_precision(run, (type(net).__name__, repr(sorted(net.config.items()))))

    def adaptation(self, image, adapt: str | Adaptation = "auto", *, scaling: ValueScaling | None = None) -> Adaptation:
        """Decide whether to adapt to ``image`` (:mod:`digital_stain.core.adapt`), measuring it whole.

        Parameters
        ----------
        image : array (numpy or dask, ``(..., Y, X[, C])``), or a list or iterator of arrays
            One input; several (e.g. the images of a folder, read one at a time by a generator)
            are pooled into one decision.
        adapt : ``auto|on|off`` or Adaptation
            An Adaptation is returned as it is.
        scaling : ValueScaling, optional
            The input's value scaling, when already decided (e.g. a pyramid's level 0); with a list,
            each array gets its own.
        """
        if isinstance(adapt, Adaptation):
            return adapt
        mode = check_mode(adapt)
        if mode == "off":
            return decide(self.enhancer.darkfield, None, mode)
        single = hasattr(image, "shape") and hasattr(image, "dtype")
        measured = None
        for array in [image] if single else image:
            array = array if hasattr(array, "shape") and hasattr(array, "dtype") else np.asarray(array)
            part = measure(array, scaling if scaling is not None and single else scaling_of(array))
            measured = part if measured is None else measured + part
        if measured is None:
            raise InputError("no images to measure.")
        return decide(self.enhancer.darkfield, measured, mode)

    def preparation(self, image, *, adapt: str | Adaptation = "auto",
                    scaling: ValueScaling | None = None) -> Preparation:
        """How ``image``'s raw pixels become network inputs, decided once for the whole image
        (:class:`~digital_stain.core.prepare.Preparation`: value scaling, adaptation, tables)."""
        scaling = scaling if scaling is not None else scaling_of(image)
        return Preparation.build(self.enhancer, scaling, image.dtype, self.adaptation(image, adapt, scaling=scaling))

    def stain(
        self,
        image,
        outputs: Sequence[str] | None = None,
        *,
        settings: StainSettings | None = None,
        progress: Callable[[int, int], None] | None = None,
        stop: threading.Event | None = None,
        tile: int | None = None,
        overlap: int | None = None,
        device: str | torch.device | None = None,
        precision: str | None = None,
        stats_pixels: int | None = None,
        compile: bool | None = None,
        batch: int | None = None,
        adapt: str | Adaptation | None = None,
    ) -> dict[str, np.ndarray]:
        """Stain a dark-field plane or stack.

        Parameters
        ----------
        image : array-like, shape (..., Y, X[, C])
            Gray or RGB dark-field; uint8, uint16 or float (see ``docs/architecture.md``).
        outputs : sequence of str, optional
            Any of ``enhanced``, ``teacher``, ``student``; default all the model has.
        settings : StainSettings, optional
            How to stain (:class:`~digital_stain.stain.settings.StainSettings`: tile, overlap,
            precision, statistics, compile, batch, device, adapt); default: its defaults. The
            keywords below, when given, change single settings of it.
        progress : callable(done, total), optional
            Called after every tile.
        stop : threading.Event, optional
            Set it to stop; :class:`digital_stain.stain.tiling.Cancelled` is raised.
        tile, overlap, device, precision, stats_pixels, compile, batch, adapt
            Single settings (see :class:`~digital_stain.stain.settings.StainSettings`). An image of at
            most ``stats_pixels`` pixels is stained by the student in one pass (exact, seam-free); a
            larger one in ``tile``-px tiles overlapping by ``overlap`` px, within about 1/255 of one
            pass at the default overlap (``benchmarks/tiling_error.py``). ``adapt`` may be an
            :class:`~digital_stain.core.adapt.Adaptation` decided beforehand (:meth:`adaptation`, e.g.
            once for a whole folder), used as it is.

        Returns
        -------
        dict of output name to float32 array in [0, 1].

        The model is not changed: the networks run as read-only copies on the device
        (:meth:`networks`), and the student's norm statistics are this image's alone.
        """
        settings = StainSettings.of(settings, tile=tile, overlap=overlap, device=None if device is None else str(device),
                                    precision=precision, stats_pixels=stats_pixels, compile=compile, batch=batch,
                                    adapt=adapt)
        wanted = self.check_outputs(outputs)
        check_tiling(settings.tile, settings.overlap)  # eager tiles: the overlap at most half the tile
        image = plain_array(image)
        stack, plane_dims = split_planes(image.shape)
        check_plane_shape(plane_dims)
        kernel = StainKernel(self, self.preparation(image, adapt=settings.adapt), settings)
        planes = image.reshape((-1, *plane_dims))
        nets = sum(o in wanted for o in ("teacher", "student"))
        counter = _ProgressCounter(progress, planes.shape[0] * nets)
        results: dict[str, list] = {o: [] for o in wanted}
        for plane in planes:
            enhanced, student_in = kernel.prep.plane(plane, student="student" in wanted)
            if "enhanced" in wanted:
                results["enhanced"].append(enhanced)
            if "teacher" in wanted:
                results["teacher"].append(kernel.stain_plane("teacher", enhanced[None], counter.part(), stop))
            if "student" in wanted:
                results["student"].append(kernel.stain_plane("student", student_in, counter.part(), stop))
        return {o: np.stack(v).reshape(*stack, *v[0].shape) for o, v in results.items()}


class _ProgressCounter:
    """Turns per-network tile progress into one overall (done, total) in percent."""

    def __init__(self, callback, parts: int):
        self.callback, self.parts, self.finished = callback, max(parts, 1), 0

    def part(self):
        if self.callback is None:
            return None
        index = self.finished
        self.finished += 1

        def report(done: int, total: int) -> None:
            self.callback(int(100 * (index + done / total) / self.parts), 100)

        return report
