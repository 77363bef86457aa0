"""Fine-tuning a model's student on new dark-field images: the one function the CLI and napari share.

``digital-stain train`` and the napari Fine-tune widget both call :func:`fine_tune`, so
they choose the student's size, start from the same weights, train the same way and
record the same provenance. :func:`fine_tune` writes no model file (the CLI saves with
its ``--half``/``--overwrite`` handling, the widget with :meth:`StainModel.save`).

>>> result = fine_tune("dsd-unpaired", [layer.data], "he_folder", steps=500)   # doctest: +SKIP
>>> result.model.save("mine.safetensors")                                       # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from ..devices import resolve_device
from ..model import StainModel, provenance
from .data import is_folder_source
from .events import Progress, TrainResult, stop_requested
from .student import StudentConfig, train_student


@dataclass
class FineTuneResult:
    """What :func:`fine_tune` produced.

    Attributes
    ----------
    model : StainModel or None
        The init model's enhancer and teacher with the chosen student (the best validated
        state; on the init model's device), with name, description and provenance; ``None``
        when it stopped before the first validation (nothing validated to keep).
    result : TrainResult
        Steps done, whether it was stopped, the chosen step and score, the validation history.
    seconds : float
        Wall time of the training, as recorded in the provenance.
    summary : str
        One line, e.g. ``"chosen at step 500: kd_l1 0.081, structure 0.953, style 3.214"``.
    notes : list of str
        What the caller should tell the user (e.g. that the init model's student is
        fine-tuned and a size choice ignored).
    """

    model: StainModel | None
    result: TrainResult
    seconds: float
    summary: str
    notes: list = field(default_factory=list)


def default_size(device: str | torch.device = "auto") -> str:
    """The paper's student on a CUDA GPU; the CPU preset elsewhere (a laptop trains it in hours, not weeks)."""
    return "full" if resolve_device(device).type == "cuda" else "small"


def default_output_name(init_name: str) -> str:
    """A name for the fine-tuned model: ``dsd-unpaired`` -> ``dsd-unpaired-finetuned`` -> ``dsd-unpaired-finetuned-2``."""
    base = os.path.basename(str(init_name).rstrip("/\\")) or "model"
    if base.lower().endswith(".safetensors"):
        base = base[: -len(".safetensors")]
    numbered = re.fullmatch(r"(.*-finetuned)(?:-(\d+))?", base)
    if numbered is None:
        return f"{base}-finetuned"
    return f"{numbered.group(1)}-{int(numbered.group(2) or 1) + 1}"


def _describe_data(source, names: Sequence[str] | None) -> str | dict:
    """A folder's path, or for in-memory images their names, shapes and dtypes (for the provenance)."""
    if is_folder_source(source):
        return str(source)
    arrays = [source] if hasattr(source, "shape") and hasattr(source, "dtype") else list(source)
    names = list(names) if names is not None else [f"image {i}" for i in range(len(arrays))]
    return {"in_memory": [{"name": str(n), "shape": list(np.shape(a)), "dtype": str(getattr(a, "dtype", ""))}
                          for n, a in zip(names, arrays)]}


def _init_description(init, model: StainModel) -> str:
    if isinstance(init, StainModel):
        return str(model.path) if model.path is not None else model.name
    return str(init)


def fine_tune(
    init: StainModel | str | os.PathLike,
    darkfield,
    stained_dir,
    *,
    size: str | None = None,
    steps: int | None = None,
    crop: int | None = None,
    batch: int | None = None,
    lambda_kd: float | None = None,
    seed: int = 0,
    device: str = "auto",
    precision: str = "auto",
    from_scratch: bool = False,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    name: str | None = None,
    command: str | None = None,
    progress: Callable[[Progress], None] | None = None,
    stop: threading.Event | None = None,
    callback: Callable[[int, torch.nn.Module], None] | None = None,
    darkfield_names: Sequence[str] | None = None,
    on_note: Callable[[str], None] | None = None,
    config_overrides: dict | None = None,
    paired: bool = False,
) -> FineTuneResult:
    """Train (or fine-tune) the student of ``init`` by knowledge distillation from its teacher.

    Parameters
    ----------
    init : StainModel, or a shipped model name or model file path
        Its enhancer and frozen teacher are used; its student, if it has one, is fine-tuned
        (its width and blocks win over ``size``) unless ``from_scratch``. A name or path is
        loaded onto ``device``; a StainModel is used where it is (and not modified).
    darkfield : folder path or sequence of arrays
        Dark-field images: a folder, or in-memory ``(Y, X)`` / ``(Y, X, C)`` arrays (stacks are
        split into planes), e.g. napari layers' data; see :func:`train_student`.
    stained_dir : folder path (or sequence of RGB arrays)
        Unpaired real H&E images; with ``paired``, the stained adjacent section of each
        dark-field image, of the same name (without extension) and size.
    size : ``full|small|fast|tiny``, optional
        Student preset for a new student; default :func:`default_size` of ``device``.
    steps, crop, batch, lambda_kd : optional
        Override the preset (``lambda_kd=0``: the paper's CycleGAN ablation; default the paper's
        weight for the mode, 5 unpaired, 2 paired).
    seed, device, precision : as for :class:`StudentConfig`.
    from_scratch : bool
        Start a new student of ``size`` even if ``init`` has one.
    checkpoint, resume : optional
        Checkpoint file written at every validation and on a stop; ``resume`` continues it.
    name : str, optional
        The new model's name (default :func:`default_output_name` of the init model's name).
    command : str, optional
        What made it, for the provenance (the CLI's command line; e.g. ``"napari Fine-tune widget"``).
    progress, stop, callback : see :func:`train_student`
        ``stop`` is honoured at every phase: before loading, while caching the teacher
        (between tiles), before every step and between validation images.
    darkfield_names : sequence of str, optional
        Names of in-memory dark-field images (e.g. layer names): recorded and used for the
        validation split.
    on_note : callable(str), optional
        Receives each note as soon as it is known (the CLI prints them to stderr); without it
        notes go to ``progress`` as messages. They are also in :attr:`FineTuneResult.notes`.
    config_overrides : dict, optional
        Further :class:`StudentConfig` fields (e.g. ``val_every``, ``report_every``,
        ``disc_width``, ``lambda_con``); a fine-tuned student's width and blocks still come from
        ``init``. The mode is chosen by ``paired``, not here.
    paired : bool
        Paired-but-misaligned training (paper section IV-C, Learning to Align): ``darkfield`` and
        ``stained_dir`` are paired by name (:func:`digital_stain.train.paired.load_pairs`) and a
        registration network, used in training only, aligns the student's output with each
        section. Same progress, stop, callback, checkpoint and result as unpaired.

    Returns
    -------
    FineTuneResult
        Nothing is written but the checkpoint; save ``result.model`` yourself.
    """
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        if on_note is not None:
            on_note(text)
        elif progress is not None:
            progress(Progress(0, 0, message=text))

    started = time.time()
    if stop_requested(stop):
        return _stopped_early(TrainResult(None, 0, True), started, notes)
    model = init if isinstance(init, StainModel) else StainModel.load(init, device=device)
    overrides = {k: v for k, v in dict(steps=steps, crop=crop, batch=batch, lambda_kd=lambda_kd).items() if v is not None}
    extra = dict(config_overrides or {})
    unknown = set(extra) - {f.name for f in fields(StudentConfig)}
    if unknown:
        raise TypeError(f"unknown StudentConfig field(s): {', '.join(sorted(unknown))}")
    if "mode" in extra:
        raise TypeError("choose the training mode with fine_tune(..., paired=True), not config_overrides['mode']")
    mode = "paired" if paired else "unpaired"
    # config_overrides win over the arguments, and the constructor checks them all
    settings = {**dict(seed=seed, device=device, precision=precision, mode=mode), **overrides, **extra}
    cfg = StudentConfig.preset(size or default_size(device), **settings)
    init_state = None
    if model.student is not None and not from_scratch:
        cfg.width, cfg.blocks = model.student.config["width"], model.student.config["n_blocks"]
        init_state = {k: v.detach().cpu() for k, v in model.student.state_dict().items()}
        ignored = f" (--size {size} ignored)" if size else ""
        note(f"fine-tuning the student of {model.name} (width {cfg.width}, {cfg.blocks} blocks){ignored}; "
             "--from-scratch starts a new one")
    if stop_requested(stop):
        return _stopped_early(TrainResult(None, 0, True), started, notes)

    t0 = time.time()
    student, result = train_student(model, darkfield, stained_dir, cfg, darkfield_names=darkfield_names,
                                    checkpoint=checkpoint, resume=resume, init_state=init_state,
                                    progress=progress, stop=stop, callback=callback)
    seconds = round(time.time() - t0, 1)
    if result.best_step is None:
        summary = (f"stopped at step {result.steps_done}, before the first validation: "
                   "no validated student")
        return FineTuneResult(None, result, seconds, summary, notes)
    aligned = " (paired-but-misaligned sections, Learning to Align)" if paired else ""
    meta = {
        "name": name or default_output_name(model.name),
        "description": f"histogram-matching enhancer + colorization teacher + distilled student{aligned}",
        "provenance": {
            **model.metadata.get("provenance", {}),
            **provenance(
                command=command,
                student=dict(mode=mode, darkfield=_describe_data(darkfield, darkfield_names),
                             stained=_describe_data(stained_dir, None),
                             init=_init_description(init, model),
                             steps=result.steps_done, best_step=result.best_step, selection_score=result.best_score,
                             seconds=seconds, cancelled=result.cancelled,
                             config=vars(cfg), history=result.history),
            ),
        },
    }
    tuned = StainModel(model.enhancer, model.teacher, student, meta).to(model._device)
    chosen = next((h for h in result.history if h["step"] == result.best_step), {})
    scores = ", ".join(f"{k} {v:.3f}" for k, v in chosen.items() if k != "step")
    return FineTuneResult(tuned, result, seconds, f"chosen at step {result.best_step}: {scores}", notes)


def _stopped_early(result: TrainResult, started: float, notes: list) -> FineTuneResult:
    return FineTuneResult(None, result, round(time.time() - started, 1),
                          "stopped before training started: no validated student", notes)


def preview_student(enhancer, student: torch.nn.Module, darkfield_crop, *, device=None) -> np.ndarray:
    """Stain a small dark-field crop with the student as it is now, without disturbing its training.

    Parameters
    ----------
    enhancer : Enhancer
        The model's enhancer (``StainModel.enhancer``) that makes the student's gray input.
    student : ResnetGenerator
        The live student (e.g. the one a :func:`fine_tune` ``callback`` receives). A deep copy
        is run in eval mode without gradients; the student itself, its mode and the
        training's random state are left as they were.
    darkfield_crop : array, ``(Y, X)`` or ``(Y, X, C)`` (or a stack)
        Any dtype :meth:`StainModel.stain` accepts; keep it small (e.g. 256 x 256): this runs
        in the training thread, between steps.
    device : optional
        Where to run it; default the student's device.

    Returns
    -------
    ndarray, float32 ``(Y, X, 3)`` in [0, 1] (``(..., Y, X, 3)`` for a stack).
    """
    if device is None:
        device = next(student.parameters()).device
    with torch.no_grad():
        net = copy.deepcopy(student)
        net.requires_grad_(False)
        net.eval()
        model = StainModel(enhancer, None, net, {"name": "preview"})
        out = model.stain(darkfield_crop, outputs=["student"], device=device, precision="fp32")["student"]
    return out
