"""Fine-tuning a model to a lab's own microscope and H&E: the one function the CLI and napari share.

``digital-stain train`` and the napari Fine-tune widget both call :func:`fine_tune`, so they
adapt the same parts, train the same way and record the same provenance. A fine-tune runs
in four stages, each reported through ``progress`` with its :attr:`Progress.stage`:

1. ``enhancer``: the dark-field CDF ``c_d`` is refitted on the user's dark-field and the
   bright-field CDF ``c_b`` on the user's H&E, each when the user's images are far from the
   model's (the distance and threshold of :mod:`digital_stain.core.adapt`; ``refit``);
2. ``teacher``: the init model's teacher is fine-tuned on the user's H&E, as
   ``train-teacher`` trains it (input noise, held-out validation; ``teacher_steps``, 0 keeps it);
   trained paired, on the adjacent sections instead: the enhanced gray of each dark-field image
   in, the chroma of its section out (:func:`digital_stain.train.teacher.train_teacher`);
3. ``student``: the student is distilled towards that teacher. A student being fine-tuned
   keeps the inputs it was trained on: the user's dark-field channels are mapped onto its
   original distribution (:mod:`digital_stain.core.adapt`), and the model file records the mapping;
4. ``check``: the tuned model and the starting one stain the dark-field images the training
   held out, and the tuned one must not be broken or worse (:mod:`digital_stain.train.check`).

:func:`fine_tune` writes no model file (the CLI saves with its ``--half``/``--overwrite``
handling, the widget with :meth:`StainModel.save`); a model that fails the check is
returned with ``accepted`` False, for the caller to keep aside, never to offer as chosen.

>>> result = fine_tune("dsd-unpaired", [layer.data], "he_folder")   # doctest: +SKIP
>>> if result.accepted: result.model.save("mine.safetensors")       # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from digital_stain.core.adapt import check_mode, distance, threshold
from digital_stain.core.arrays import InputError
from digital_stain.core.devices import resolve_device
from digital_stain.core.enhance import Enhancer, luma_histogram_of
from digital_stain.core.histograms import Distribution, arrays_distribution
from digital_stain.quality.metrics import lab_pixels
from digital_stain.stain.model import StainModel, provenance
from digital_stain.train.check import Check, compare
from digital_stain.train.data import is_folder_source, load_images, skipped_note, validation_split
from digital_stain.train.events import Progress, TrainResult, stop_requested
from digital_stain.train.paired import load_pairs, pair_sets
from digital_stain.train.pairing import Pairing, detect_pairs
from digital_stain.train.student import StudentConfig, _carve_reference, train_student
from digital_stain.train.teacher import TeacherConfig, train_teacher

STAGES = ("enhancer", "teacher", "student", "check")
# Defaults sized for a laptop when a student is fine-tuned (docs/usage.md, "Your own microscope"):
FINE_TUNE_STEPS = 500  # student steps (a new student: its preset's 20000); chosen on a dev split (docs/benchmarks.md)
FINE_TUNE_EMA = 0.99  # a fine-tuned student is validated, chosen and returned as this moving average of its weights
# a fine-tune trained paired: R's learning rate x10 and lambda_smooth 1 (the paper's: x1, 10), with which R
# learnt the alignment in the LtA benchmark and the student found more nuclei on the dev split, and lambda_con 60
# (the paper's 20), which raised PSNR and SSIM on the dev split with the same nuclei Dice (docs/benchmarks.md)
FINE_TUNE_ALIGNMENT = {"reg_lr_scale": 10.0, "lambda_smooth": 1.0, "lambda_con": 60.0}
# ... and its crops keep the microscope's orientation (no mirrors or turns): one lab's dark-field keeps it, and
# the student found more nuclei on the dev split (0.412 against 0.392) with the same colour style
FINE_TUNE_PAIRED_CROPS = {"turns": False}
TEACHER_STEPS = 300  # teacher steps (batch 8, 128 px crops) on the lab's H&E alone
# trained paired, the teacher learns from the adjacent sections (enhanced gray in, the section's chroma out), which
# keeps improving its nuclei longer: on the DSD_P dev split nuclei Dice 0.41 at 300 steps, 0.45 at 1000 (docs/benchmarks.md)
PAIRED_TEACHER_STEPS = 1000
VALIDATIONS = 6  # a student is validated about this often per run (every 50 to 500 steps)


@dataclass
class FineTuneResult:
    """What :func:`fine_tune` produced.

    Attributes
    ----------
    model : StainModel or None
        The refitted enhancer, tuned teacher and chosen student (the best validated state; on
        ``device``), with name, description and provenance; ``None`` when it
        stopped before a student was validated, or while checking it.
    result : TrainResult
        The student's training: steps done, whether it was stopped, the chosen step and score,
        the validation history.
    seconds : float
        Wall time of the whole fine-tune, as recorded in the provenance.
    summary : str
        One line, e.g. ``"chosen at step 500: kd_l1 0.081, structure 0.953, style 3.214"``.
    notes : list of str
        What the caller should tell the user (e.g. that the init model's student is
        fine-tuned and a size choice ignored).
    teacher_result : TrainResult or None
        The teacher's fine-tuning (``None`` when it was kept).
    check : Check or None
        The comparison with the starting model (``None`` when not run).
    """

    model: StainModel | None
    result: TrainResult
    seconds: float
    summary: str
    notes: list = field(default_factory=list)
    teacher_result: TrainResult | None = None
    check: Check | None = None

    @property
    def accepted(self) -> bool:
        """A model was produced and it passed the check (or no check was asked for)."""
        return self.model is not None and (self.check is None or self.check.passed)


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


def rejected_path(output: str | os.PathLike) -> Path:
    """Where a model that failed the check is kept aside: ``NAME.rejected.safetensors`` beside ``output``."""
    output = Path(output)
    return output.with_name(output.name.removesuffix(".safetensors") + ".rejected.safetensors")


def teacher_checkpoint(checkpoint: str | os.PathLike | None) -> Path | None:
    """Where the teacher stage keeps its checkpoint, beside the student's: ``X.ckpt.safetensors`` -> ``X.ckpt.teacher.safetensors``."""
    if checkpoint is None:
        return None
    path = Path(checkpoint)
    stem = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name
    return path.with_name(stem + ".teacher.safetensors")


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
    paired: bool | str = "auto",
    teacher_steps: int | None = None,
    refit: str = "auto",
    check: bool = True,
    on_enhancer: Callable[[Enhancer], None] | None = None,
) -> FineTuneResult:
    """Adapt ``init`` to a lab's dark-field and H&E: enhancer, teacher, then student, then a check.

    Parameters
    ----------
    init : StainModel, or a shipped model name or model file path
        The starting model (it needs a teacher). Its student, if it has one, is fine-tuned
        (its width and blocks win over ``size``) unless ``from_scratch``. A name or path is
        loaded onto ``device``; a StainModel is not modified (not moved either: its networks are
        copied where they must run on another device).
    darkfield : folder path or sequence of arrays
        Dark-field images: a folder, or in-memory ``(Y, X)`` / ``(Y, X, C)`` arrays (stacks are
        split into planes), e.g. napari layers' data; see :func:`train_student`.
    stained_dir : folder path (or sequence of RGB arrays)
        Unpaired real H&E images; with ``paired``, the stained adjacent section of each
        dark-field image, of the same name (without extension) and size.
    size : ``full|small|fast|tiny``, optional
        Student preset for a new student; default :func:`default_size` of ``device``.
    steps, crop, batch, lambda_kd : optional
        Override the preset. ``steps`` defaults to ``FINE_TUNE_STEPS`` (500) when a student is
        fine-tuned, else the preset's 20000. ``lambda_kd=0``: the paper's CycleGAN ablation;
        default the paper's weight for the mode, 5 unpaired, 2 paired. A student that is
        fine-tuned is judged as a moving average of its weights (``ema_decay`` ``FINE_TUNE_EMA``,
        0.99, unless ``config_overrides`` say otherwise), and every run is validated about
        ``VALIDATIONS`` (6) times, every 50 to 500 steps (``config_overrides["val_every"]`` wins).
    seed, device, precision : as for :class:`StudentConfig` (and the teacher's :class:`TeacherConfig`).
    from_scratch : bool
        Start a new student of ``size`` even if ``init`` has one (it then learns the lab's own
        dark-field channels directly, with no mapping).
    checkpoint, resume : optional
        The student's checkpoint, written at every validation and on a stop; the teacher's is
        beside it (:func:`teacher_checkpoint`). ``resume`` continues both.
    name : str, optional
        The new model's name (default :func:`default_output_name` of the init model's name).
    command : str, optional
        What made it, for the provenance (the CLI's command line; e.g. ``"napari Fine-tune widget"``).
    progress, stop, callback : see :func:`train_student`
        ``progress`` receives every stage's reports (:attr:`Progress.stage`); ``stop`` is
        honoured in every stage: before loading, while fitting, at every teacher and student
        step, while caching the teacher (between tiles), between validation and check images.
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
    paired : ``"auto"``, True or False
        True: paired-but-misaligned training (paper section IV-C, Learning to Align):
        ``darkfield`` and ``stained_dir`` are paired by name
        (:func:`digital_stain.train.paired.load_pairs`) and a registration network, used in
        training only, aligns the student's output with each section. Same progress, stop,
        callback, checkpoint and result as unpaired. ``"auto"`` (default) trains paired when the
        H&E images are found to be the adjacent sections of the dark-field images (same names
        and sizes, and tissue that agrees: :func:`digital_stain.train.pairing.detect_pairs`),
        says so in a note and records it in the provenance; False always trains unpaired. A
        student fine-tuned paired gets ``FINE_TUNE_ALIGNMENT`` (R's learning rate x10,
        ``lambda_smooth`` 1, ``lambda_con`` 60) unless ``config_overrides`` say otherwise.
    teacher_steps : int, optional
        Steps of the teacher's fine-tuning (default ``TEACHER_STEPS``, 300, on the H&E alone;
        ``PAIRED_TEACHER_STEPS``, 1000, on the adjacent sections when trained paired); 0 keeps
        the init model's teacher as it is.
    refit : ``auto|on|off``
        Refit the enhancer's CDFs on the given images: ``auto`` (default) refits ``c_d`` when the
        dark-field is far from the model's, as staining adapts (:func:`digital_stain.core.adapt.decide`,
        on all the dark-field images pooled), and ``c_b`` when the H&E's gray is far from the
        model's by the same measure; a few images of the model's own microscope are better served
        by the model's CDFs, fitted on many more. ``on`` always refits both, ``off`` keeps the init
        model's enhancer (and its mapping of the student's inputs).
    check : bool
        Compare the tuned model with ``init`` on the held-out dark-field images (default).
    on_enhancer : callable(Enhancer), optional
        Told, after the enhancer stage, the enhancer the student is trained with (what
        :func:`preview_student` needs to show the student as it learns).

    Returns
    -------
    FineTuneResult
        Nothing is written but the checkpoints; save ``result.model`` yourself when
        ``result.accepted``.
    """
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        if on_note is not None:
            on_note(text)
        elif progress is not None:
            progress(Progress(0, 0, message=text))

    def staged(stage: str):
        if progress is None:
            return None
        return lambda p: progress(replace(p, stage=stage))

    started = time.time()
    if stop_requested(stop):
        return _stopped_early(TrainResult(None, 0, True), started, notes)
    model = init if isinstance(init, StainModel) else StainModel.load(init, device=device)
    if model.teacher is None:
        raise InputError(f"model {model.name!r} has no teacher to distil from; train one with "
                         "`digital-stain train-teacher`.")
    fine_tuning = model.student is not None and not from_scratch
    if isinstance(paired, str) and paired != "auto":
        raise InputError(f"paired is True, False or 'auto', not {paired!r}.")
    auto = paired == "auto"
    paired = "auto" if auto else bool(paired)
    cfg = _student_config(model, size, steps, crop, batch, lambda_kd, seed, device, precision, paired is True,
                          config_overrides, fine_tuning)
    if fine_tuning:
        ignored = f" (--size {size} ignored)" if size else ""
        note(f"fine-tuning the student of {model.name} (width {cfg.width}, {cfg.blocks} blocks){ignored}; "
             "--from-scratch starts a new one")
    if stop_requested(stop):
        return _stopped_early(TrainResult(None, 0, True), started, notes)

    # the data, loaded once for every stage
    pairing = None
    if paired is True:
        pairs = load_pairs(darkfield, stained_dir, darkfield_names, None, min_side=cfg.crop)
    else:
        dark = load_images(darkfield, darkfield_names, min_side=cfg.crop, kind="dark-field")
        hne = load_images(stained_dir, min_side=cfg.crop, kind="H&E")
        if auto:
            pairing = detect_pairs(dark, hne)
            paired = pairing.paired
            if pairing.names_pair:  # otherwise plainly unpaired: nothing to say
                note(_pairing_note(pairing))
            if paired:
                pairs = pair_sets(dark, hne, min_side=cfg.crop)
                cfg = _student_config(model, size, steps, crop, batch, lambda_kd, seed, device, precision, True,
                                      config_overrides, fine_tuning)
    if paired:
        dark_images, dark_names = pairs.darkfield.images, pairs.darkfield.names
        hne_images, hne_names = pairs.stained, list(pairs.darkfield.names)
        skipped = {"pairs": pairs.skipped}
    else:
        dark_images, dark_names, hne_images, hne_names = dark.images, dark.names, hne.images, hne.names
        skipped = {"darkfield": dark.skipped, "stained": hne.skipped}
    for kind, reasons in skipped.items():  # said, and recorded in the provenance
        text = skipped_note(reasons, {"pairs": "pair", "darkfield": "dark-field", "stained": "H&E"}[kind])
        if text is not None:
            note(text)

    # 1. enhancer
    if teacher_steps is None:
        teacher_steps = PAIRED_TEACHER_STEPS if paired else TEACHER_STEPS
    teacher_steps = int(teacher_steps)
    if teacher_steps < 0:
        raise InputError(f"teacher_steps is a number of steps (0 keeps the teacher), not {teacher_steps}.")
    enhancer, refitted = _fit_enhancer(model.enhancer, dark_images, hne_images, check_mode(refit), fine_tuning,
                                       teacher_tuned=teacher_steps > 0)
    say = staged("enhancer")
    if say:
        say(Progress(1, 1, message=refitted["summary"]))
    if on_enhancer is not None:
        on_enhancer(enhancer)
    if stop_requested(stop):
        return _stopped_early(TrainResult(None, 0, True), started, notes, "while fitting the enhancer")

    # 2. teacher
    teacher, teacher_result = model.teacher, None
    if teacher_steps > 0:
        tcfg = TeacherConfig(width=model.teacher.config["width"], depth=model.teacher.config["depth"],
                             steps=teacher_steps, seed=seed, device=device, precision=precision,
                             val_every=max(50, teacher_steps // 4), crop=min(TeacherConfig.crop, cfg.crop),
                             report_every=max(1, min(10, teacher_steps // 20)))
        # paired: the teacher learns to colour this enhancer's gray of each dark-field image as its section is coloured
        enhanced = [enhancer(image) for image in dark_images] if paired else None
        teacher, teacher_result = train_teacher(hne_images, tcfg, names=hne_names, enhanced=enhanced,
                                                checkpoint=teacher_checkpoint(checkpoint),
                                                resume=resume, init_state=model.teacher.state_dict(),
                                                progress=staged("teacher"), stop=stop)
        if teacher_result.cancelled:
            return FineTuneResult(None, TrainResult(None, 0, True), round(time.time() - started, 1),
                                  f"stopped while fine-tuning the teacher (step {teacher_result.steps_done} of "
                                  f"{teacher_steps}): no model", notes, teacher_result)
    # stains (the student's teacher targets, the check) run where training runs; the init model is not moved
    stain_device = resolve_device(device)
    if teacher is model.teacher and stain_device != model._device:
        teacher = copy.deepcopy(teacher)
    teacher.to(stain_device)

    # 3. student
    base = StainModel(enhancer, teacher, None, {"name": model.name}).to(stain_device)
    init_state = ({k: v.detach().cpu() for k, v in model.student.state_dict().items()} if fine_tuning else None)
    student, result = train_student(base, dark_images, hne_images, cfg, darkfield_names=dark_names,
                                    stained_names=hne_names, checkpoint=checkpoint, resume=resume,
                                    init_state=init_state, progress=staged("student"), stop=stop, callback=callback)
    if result.best_step is None:
        summary = f"stopped at step {result.steps_done}, before the first validation: no validated student"
        return FineTuneResult(None, result, round(time.time() - started, 1), summary, notes, teacher_result)
    # the reverse generator F goes into the file too: tutorship translates H&E into dark-field with it
    tuned = StainModel(enhancer, teacher, student, {}, reverse=result.parts.get("reverse")).to(stain_device)

    # 4. check
    verdict = None
    if check:
        held_dark, reference = _held_out(dark_images, dark_names, hne_images, hne_names, cfg)
        # a Stop pressed before the check (to end the training) still gets its best state checked, which is
        # quick; one pressed during the check ends it, and nothing unchecked is handed on
        during = None if stop_requested(stop) else stop
        verdict = compare(model, tuned, held_dark, reference, progress=staged("check"), stop=during,
                          device=stain_device)
        if verdict is None:
            return FineTuneResult(None, result, round(time.time() - started, 1),
                                  "stopped while checking the tuned model: no model (the training is kept in the "
                                  "checkpoint; --resume runs the check again)", notes, teacher_result)
    seconds = round(time.time() - started, 1)
    tuned.metadata = _metadata(model, init, tuned, name, command, darkfield, darkfield_names, stained_dir, cfg,
                               result, teacher_result, verdict, paired, refitted, seconds, skipped, pairing)
    chosen = next((h for h in result.history if h["step"] == result.best_step), {})
    scores = ", ".join(f"{k} {v:.3f}" for k, v in chosen.items() if k != "step")
    summary = f"chosen at step {result.best_step}: {scores}"
    if verdict is not None:
        summary += f"; {verdict.summary()}"
    return FineTuneResult(tuned, result, seconds, summary, notes, teacher_result, verdict)


def _fit_enhancer(start: Enhancer, dark_images: list, hne_images: list, refit: str, fine_tuning: bool,
                  teacher_tuned: bool) -> tuple[Enhancer, dict]:
    """The fine-tuned model's enhancer, and what was decided for each CDF (for the progress line and provenance).

    ``c_d`` is refitted when the dark-field is far from the model's (``auto``). ``c_b`` goes with the
    teacher: the gray the teacher colours must be distributed as the gray of the H&E it learnt from,
    so ``c_b`` is refitted on the lab's H&E exactly when the teacher is fine-tuned on it (``auto``;
    a kept teacher keeps its ``c_b``).
    """
    dark = arrays_distribution(dark_images)
    bright = Distribution(luma_histogram_of(hne_images))
    decided = {}
    for side, mine, theirs in (("darkfield", dark, start.darkfield), ("brightfield", bright,
                                                                          Distribution(start.brightfield_counts))):
        far, limit = distance(mine, theirs), threshold(mine.pixels)
        auto = far > limit if side == "darkfield" else teacher_tuned
        decided[side] = {"refitted": refit == "on" or refit == "auto" and auto,
                         "distance": round(far, 4), "threshold": round(limit, 4)}
    refit_dark, refit_bright = decided["darkfield"]["refitted"], decided["brightfield"]["refitted"]
    if not (refit_dark or refit_bright):
        enhancer = start
    else:
        darkfield = dark if refit_dark else start.darkfield
        enhancer = Enhancer(darkfield.luma, bright.luma if refit_bright else start.brightfield_counts,
                            darkfield.channels, start.student_inputs if fine_tuning else None)
    words = {True: "refitted on yours", False: "kept"}
    summary = "; ".join(f"{side} CDF {words[d['refitted']]} (distance {d['distance']:.2f}, threshold "
                        f"{d['threshold']:.2f})" for side, d in decided.items())
    return enhancer, {**decided, "mode": refit, "summary": f"enhancer: {summary}"}


def _student_config(model, size, steps, crop, batch, lambda_kd, seed, device, precision, paired,
                    config_overrides, fine_tuning) -> StudentConfig:
    """The student's settings, every override checked by the :class:`StudentConfig` constructor before any work."""
    if steps is None and fine_tuning:
        steps = FINE_TUNE_STEPS
    overrides = {k: v for k, v in dict(steps=steps, crop=crop, batch=batch, lambda_kd=lambda_kd).items() if v is not None}
    extra = dict(config_overrides or {})
    unknown = set(extra) - {f.name for f in fields(StudentConfig)}
    if unknown:
        raise TypeError(f"unknown StudentConfig field(s): {', '.join(sorted(unknown))}")
    if "mode" in extra:
        raise TypeError("choose the training mode with fine_tune(..., paired=True), not config_overrides['mode']")
    mode = "paired" if paired else "unpaired"
    defaults = dict(seed=seed, device=device, precision=precision, mode=mode)
    if fine_tuning:  # a short run from good weights: the average is the steadier state to judge
        defaults["ema_decay"] = FINE_TUNE_EMA
        if paired:  # ... in which R must learn the alignment quickly
            defaults.update(FINE_TUNE_ALIGNMENT, **FINE_TUNE_PAIRED_CROPS)
    # config_overrides win over the arguments, and the constructor checks them all
    settings = {**defaults, **overrides, **extra}
    cfg = StudentConfig.preset(size or default_size(device), **settings)
    if "val_every" not in extra:
        cfg.val_every = min(500, max(50, cfg.steps // VALIDATIONS))
    if fine_tuning:
        cfg.width, cfg.blocks = model.student.config["width"], model.student.config["n_blocks"]
        built = model.student.config["upsample"]  # every ResnetGenerator records it (old files: transpose)
        if cfg.upsample != built and "upsample" in extra:
            raise InputError(f"the student being fine-tuned upsamples by {built!r}, not {cfg.upsample!r}: an "
                             "architecture is fixed once trained. Train a new student (from_scratch, CLI "
                             "--from-scratch) to change it.")
        cfg.upsample = built
    return cfg


def _held_out(dark_images, dark_names, hne_images, hne_names, cfg: StudentConfig):
    """The dark-field images the student's training held out, and the Lab pixels of held-out H&E (or None)."""
    held = validation_split(dark_names, cfg.val_fraction)
    if not held.any() or held.all():  # as train_student falls back
        held = np.zeros(len(dark_names), bool)
        held[-1] = True
    darkfield = [im for im, h in zip(dark_images, held) if h]
    if cfg.paired:  # the held-out pairs' sections, as in training
        return darkfield, lab_pixels(np.concatenate([s.reshape(-1, 3) for s, h in zip(hne_images, held) if h]))
    return darkfield, _carve_reference(hne_images, hne_names, cfg.val_fraction)[1]


def _metadata(model, init, tuned, name, command, darkfield, darkfield_names, stained_dir, cfg, result,
              teacher_result, verdict, paired, refitted, seconds, skipped, pairing) -> dict:
    aligned = " (paired-but-misaligned sections, Learning to Align)" if paired else ""
    student = dict(mode=cfg.mode, darkfield=_describe_data(darkfield, darkfield_names),
                   stained=_describe_data(stained_dir, None), init=_init_description(init, model),
                   steps=result.steps_done, best_step=result.best_step, selection_score=result.best_score,
                   seconds=seconds, cancelled=result.cancelled, config=vars(cfg), history=result.history)
    extra = {"enhancer": {**{k: v for k, v in refitted.items() if k != "summary"},
                          "student_inputs": ("mapped onto the starting student's" if
                                             not tuned.enhancer.student_inputs.same_as(tuned.enhancer.darkfield)
                                             else "the training dark-field's own")}}
    if teacher_result is not None:
        extra["teacher"] = dict(steps=teacher_result.steps_done, best_step=teacher_result.best_step,
                                val_l1_ab=teacher_result.best_score, cancelled=teacher_result.cancelled,
                                stained=_describe_data(stained_dir, None),
                                learnt_from=("the enhanced dark-field and its adjacent section" if paired else
                                             "the H&E's own gray"))
    if verdict is not None:
        extra["check"] = verdict.as_dict()
    if pairing is not None:
        extra["pairing"] = pairing.as_dict()
    if any(skipped.values()):
        extra["skipped"] = {kind: reasons for kind, reasons in skipped.items() if reasons}
    return {
        "name": name or default_output_name(model.name),
        "description": f"histogram-matching enhancer + colorization teacher + distilled student{aligned}",
        "provenance": {**model.metadata.get("provenance", {}),
                       **provenance(command=command, student=student, fine_tune=extra)},
    }


def _pairing_note(pairing: Pairing) -> str:
    """What ``paired="auto"`` decided, as the user reads it."""
    numbers = (f" (edge agreement {pairing.agreement:.2f} on {pairing.pairs} pair(s), against {pairing.baseline:.2f} "
               "for the same images half a turn apart)" if pairing.agreement is not None else "")
    if pairing.paired:
        return (f"paired sections: {pairing.reason}{numbers}, so each H&E image is taken as the adjacent section of "
                "its dark-field image and the student trains paired-but-misaligned, with Learning to Align "
                "(to train unpaired: --unpaired, or Pairing 'unpaired' in napari)")
    return f"unpaired training: {pairing.reason}{numbers}"


def _stopped_early(result: TrainResult, started: float, notes: list, when: str = "before training started") -> FineTuneResult:
    return FineTuneResult(None, result, round(time.time() - started, 1), f"stopped {when}: no validated student", notes)


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
        out = model.stain(darkfield_crop, outputs=["student"], device=device, precision="fp32", adapt="off")["student"]
    return out
