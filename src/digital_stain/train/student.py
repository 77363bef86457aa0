"""Training the student ``G`` (unpaired setting, paper section IV-B; paired-but-misaligned, IV-C).

``G(x ‖ z)`` (dark-field RGB + enhanced gray -> stained RGB) is trained with
``L_adv + λ1 L_kd + λ2 L_cyc``: LSGAN against a PatchGAN ``D`` whose patch map
is averaged to one score per image (as in the authors' code), L1 to the
frozen teacher's stain ``G_t(z)``, and the cycle ``F(G(x ‖ z)) ≈ x`` through a
reverse generator ``F`` trained on that cycle only (returned as it ended, in ``TrainResult.parts``,
for the model file: tutorship translates H&E into dark-field with it). An image pool of 50 fakes
feeds ``D``. The teacher is frozen, so its outputs (and the enhanced images)
are computed once per dark-field image, through ``StainModel.stain``, and
cropped together with the dark-field.

Dark-field (and H&E) images come from a folder or from memory (e.g. napari
layers), through :mod:`digital_stain.train.data`; both end up as the same RGB
uint8 images. :func:`digital_stain.train.finetune.fine_tune` wraps this loop
with the choices the CLI and the napari Fine-tune widget share.

Paired-but-misaligned (``StudentConfig(mode="paired")``, Learning to Align after
RegGAN): each dark-field image has a stained adjacent section of the same name and
size (:mod:`digital_stain.train.paired`). Crops are taken at the same place in both;
the sections are the discriminator's real images, and a registration network ``R``
(:class:`~digital_stain.core.nets.registration.RegistrationNet`, identity at the start)
warps the student's output onto its section: ``L_U + λ3 ‖G(x‖z)∘φ − y‖₁ + λ4 L_smoo(φ)``
with ``φ = R(G(x‖z), y)`` and the paper's weights ``λ1 = 2, λ2 = 10, λ3 = 20, λ4 = 10``.
``R`` has its own Adam (as in RegGAN) and is trained jointly with ``G`` on the same loss;
it is saved in checkpoints (so a resumed run is exact) and never in a model file.
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from digital_stain.core.arrays import InputError, to_uint8
from digital_stain.core.devices import autocast, resolve_device, resolve_training_precision
from digital_stain.quality.metrics import lab_pixels, sliced_wasserstein, structure_score
from digital_stain.core.nets import PatchDiscriminator, ResnetGenerator
from digital_stain.core.nets.generator import UPSAMPLING
from digital_stain.core.nets.registration import RegistrationNet, smoothness_loss, warp
from digital_stain.train.selection import BOOTSTRAP_PIXELS, chosen_step, selection_score, style_noise
from digital_stain.stain.tiling import Cancelled
from digital_stain.train.checkpoint import load_checkpoint, save_checkpoint
from digital_stain.train.data import load_images, random_crops, validation_split
from digital_stain.train.events import Meter, Progress, TrainResult, stop_requested
from digital_stain.train.losses import structure_loss
from digital_stain.train.paired import load_pairs
from digital_stain.train.schedule import constant_then_linear, set_lr, snapshot

PRESETS = {
    "full": dict(width=64, blocks=9),  # the paper's generator, 11.4 M parameters: GPU work
    "small": dict(width=32, blocks=6),  # about 4x cheaper: trains usefully on a laptop CPU
    "fast": dict(width=16, blocks=4, reg_width=16),  # for staining whole slides on a CPU (dsd-unpaired-fast)
    "tiny": dict(width=8, blocks=2, reg_width=8),  # tests and smoke runs only
}

MODES = ("unpaired", "paired")
# the paper's loss weights per setting (section V): λ1 (kd) and λ2 (cyc); λ3 (con) and λ4 (smooth) are paired only
PAPER_WEIGHTS = {"unpaired": dict(lambda_kd=5.0, lambda_cyc=80.0), "paired": dict(lambda_kd=2.0, lambda_cyc=10.0)}


@dataclass
class StudentConfig:
    """Student training settings; defaults are the paper's losses and optimiser, with two changes
    that measured better (``docs/models.md``): a weight average (``ema_decay`` 0.999) and
    resize-convolution upsampling (``upsample="bilinear"``). ``ema_decay=0, upsample="transpose"``
    is the paper's training.

    ``mode`` is ``"unpaired"`` (section IV-B) or ``"paired"`` (paired-but-misaligned, IV-C:
    adds the registration network and ``lambda_con``, ``lambda_smooth``). ``lambda_kd`` and
    ``lambda_cyc`` left at ``None`` become the paper's for the mode (5 and 80 unpaired,
    2 and 10 paired). ``registration=False`` (paired only) is a pix2pix-style baseline for
    benchmarks: no ``R`` (the field stays the identity), ``L_con = ‖G(x‖z) − y‖₁``, no ``L_smoo``.

    ``ema_decay`` > 0 keeps an exponential moving average of the student's weights
    (:func:`update_ema`) and validates, chooses and returns that average instead of the live
    weights: a GAN's colours drift from one step to the next, and the average is the steadier
    state to choose from. The live weights are validated too (``live_*`` in the history) and
    train exactly as without the average. 0 is the paper's training.

    ``reg_warmup`` > 0 (paired with ``R`` only; ignored otherwise) first trains ``R`` for that many
    steps to recover known random fields between a training section and its warped copy
    (:func:`digital_stain.train.align_warmup.warm_up_registration`), so that ``R`` can align
    before the student can stain. 0 (the default) is the paper's training.
    """

    width: int = 32
    blocks: int = 6
    disc_width: int = 64
    steps: int = 20000
    batch: int = 1
    crop: int = 128
    lr: float = 1e-4
    lambda_kd: float | None = None
    lambda_cyc: float | None = None
    structure_floor: float = 0.85  # fraction of the teacher's structure a chosen student keeps
    pool_size: int = 50
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    val_fraction: float = 0.1
    val_every: int = 500
    report_every: int = 10
    mode: str = "unpaired"
    lambda_con: float = 20.0  # paired: L1 of the registered output to its stained section
    lambda_smooth: float = 10.0  # paired: isotropic TV of the deformation field
    reg_width: int = 32  # paired: the registration network (training only)
    reg_depth: int = 3
    registration: bool = True  # paired: False = pix2pix-style baseline, L_con on the unregistered output (no R)
    reg_lr_scale: float = 1.0  # paired: R's learning rate as a multiple of lr (1 = the paper's)
    # the generators' 2x upsamplings (nets.generator.UPSAMPLING): bilinear leaves no checkerboard; transpose = the paper's
    upsample: str = "bilinear"
    ema_decay: float = 0.999  # validate, choose and return an EMA of G's weights; 0: off (the paper)
    reg_warmup: int = 0  # paired: steps of R's self-supervised warm-up on warped sections first (0 = the paper's)
    # weight of train.losses.structure_loss (the stain's gray keeps the enhanced gray's gradients); 0 = the paper's
    lambda_structure: float = 0.0
    # steps of distillation before the adversarial loss joins G's loss (D trains throughout); 0 = the paper's
    adversarial_from: int = 0
    # crops mirrored and turned at random (the paper's augmentation); False keeps the microscope's orientation
    turns: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise InputError(f"unknown training mode {self.mode!r}; choose from {', '.join(MODES)}.")
        for key, value in PAPER_WEIGHTS[self.mode].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.reg_warmup < 0:
            raise InputError(f"reg_warmup is a number of steps (0 = none), not {self.reg_warmup}.")
        if self.upsample not in UPSAMPLING:
            raise InputError(f"unknown upsampling {self.upsample!r}; choose from {', '.join(UPSAMPLING)}.")
        if self.adversarial_from < 0:
            raise InputError(f"adversarial_from is a number of steps (0 = from the start), not {self.adversarial_from}.")
        if self.lambda_structure < 0:
            raise InputError(f"lambda_structure is a loss weight (0 = off), not {self.lambda_structure}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise InputError(f"ema_decay must be in [0, 1) (0 = off, e.g. 0.999), not {self.ema_decay}.")

    @property
    def paired(self) -> bool:
        return self.mode == "paired"

    @classmethod
    def preset(cls, name: str, **overrides) -> StudentConfig:
        if name not in PRESETS:
            raise InputError(f"unknown size preset {name!r}; choose from {', '.join(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})


@dataclass
class ImagePool:
    """History of generated images for the discriminator (Shrivastava et al.), deterministic given ``rng``."""

    size: int
    images: list = field(default_factory=list)

    def query(self, fakes: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if self.size == 0:
            return fakes
        out = []
        for fake in fakes.detach():
            if len(self.images) < self.size:
                self.images.append(fake.clone())
                out.append(fake)
            elif rng.random() < 0.5:
                index = int(rng.integers(len(self.images)))
                out.append(self.images[index])
                self.images[index] = fake.clone()
            else:
                out.append(fake)
        return torch.stack(out)


def _generator(cfg: StudentConfig, in_channels: int = 4) -> ResnetGenerator:
    """The student (4 -> 3) or the reverse generator (3 -> 3) of ``cfg``."""
    return ResnetGenerator(in_channels, 3, cfg.width, cfg.blocks, cfg.upsample)


def update_ema(average: torch.nn.Module, live: torch.nn.Module, decay: float, step: int) -> None:
    """``average ← d·average + (1 − d)·live`` for every parameter, with ``d = min(decay, (1 + step) / (10 + step))``.

    The warm-up term lets the average follow the first steps closely, so it does not keep
    the random (or initial) weights for thousands of steps. ``step`` counts from 0.
    """
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for mean, param in zip(average.parameters(), live.parameters()):
            mean.lerp_(param.detach(), 1.0 - d)


def cache_teacher(model, darkfield: list, progress=None, stop: threading.Event | None = None) -> list | None:
    """The student's dark-field input, enhanced and teacher stacked per image: uint8 ``(Y, X, 7)``
    (computed once: the teacher is frozen).

    The model's own preparation, never adapted per image: its enhancer is the training data's,
    and the dark-field channels are those its student receives (mapped onto the distribution
    the student was trained on when the model says so, :attr:`Enhancer.student_inputs`).
    Returns ``None`` if ``stop`` is set before it is done (checked between tiles, so a large
    image does not delay the stop).
    """
    cached = []
    for i, image in enumerate(darkfield):
        if stop_requested(stop):
            return None
        prep = model.preparation(image, adapt="off")
        try:
            outs = model.stain(image, ["enhanced", "teacher"], stop=stop, adapt=prep.adaptation)
        except Cancelled:
            return None
        student_rgb = to_uint8(prep.student_rgb(prep.unit_rgb(image, has_channels=image.ndim == 3)))
        cached.append(np.concatenate([student_rgb, to_uint8(outs["enhanced"])[..., None],
                                      to_uint8(outs["teacher"])], -1))
        if progress:
            progress(Progress(0, 0, message=f"teacher outputs cached: {i + 1}/{len(darkfield)}"))
    return cached


def _signed(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 ``(N, Y, X, C)`` -> float ``(N, C, Y, X)`` in [-1, 1]."""
    return torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _split(batch: np.ndarray, device: torch.device):
    """Cached crops -> (dark-field RGB, enhanced gray, teacher RGB), each in [-1, 1]."""
    t = _signed(batch, device)
    return t[:, :3], t[:, 3:4], t[:, 4:7]


def _score(d: PatchDiscriminator, images: torch.Tensor) -> torch.Tensor:
    return d(images).float().mean(dim=(1, 2, 3))  # one score per image


def _structure(rgb: torch.Tensor, enhanced: torch.Tensor) -> float:
    """:func:`digital_stain.quality.metrics.structure_score` of a network output and its enhanced input (both in [-1, 1])."""
    stained = ((rgb[0].float().permute(1, 2, 0) + 1) / 2).clamp(0, 1).cpu().numpy()
    return structure_score(stained, ((enhanced[0, 0].float() + 1) / 2).cpu().numpy())


VAL_SIDE = 1024  # validation views larger than this are centre crops (memory and time on whole slides)


def _val_crop(item: np.ndarray) -> np.ndarray:
    """The largest top-left square on the generator's grid; for images over ``VAL_SIDE``, a centred ``VAL_SIDE`` square."""
    side = min(item.shape[:2]) // 4 * 4
    if side > VAL_SIDE:
        y, x = (item.shape[0] - VAL_SIDE) // 2, (item.shape[1] - VAL_SIDE) // 2
        return item[None, y : y + VAL_SIDE, x : x + VAL_SIDE]
    return item[None, :side, :side]


def _val_view(item: np.ndarray, device: torch.device):
    """(dark-field, enhanced, teacher) of :func:`_val_crop`, each in [-1, 1]."""
    return _split(_val_crop(item), device)


def teacher_structure(cached_val: list, device: torch.device) -> float:
    """The teacher's structure score on the validation images (the floor a student must keep)."""
    scores = []
    for item in cached_val:
        _, z, teacher = _val_view(item, device)
        scores.append(_structure(teacher, z))
    return float(np.nanmean(scores))


def validation_scores(student: ResnetGenerator, cached_val: list, device: torch.device,
                      reference_lab: np.ndarray | None = None, stop: threading.Event | None = None,
                      registration: RegistrationNet | None = None) -> dict | None:
    """Scores of the student on held-out dark-field images (the largest top-left square on its grid, at most ``VAL_SIDE``).

    ``kd_l1``: L1 to the teacher; ``structure``: correlation between the gray
    of the output and the enhanced image (gradient correlation,
    :func:`digital_stain.quality.metrics.structure_score`); ``style`` (with ``reference_lab``,
    Lab pixels of held-out real H&E): sliced Wasserstein distance of the
    output colours to real H&E, lower is more H&E-like.

    With ``registration`` (paired mode; ``cached_val`` items then carry their stained section
    in channels 7-9), also ``aligned_l1`` (the held-out ``L_con``: L1, on the network's
    [-1, 1] scale, of the output registered by ``R`` onto its section) and ``aligned_psnr``
    (PSNR in dB over [0, 1] of the same, averaged over images). They are recorded, not used
    for selection.

    Returns ``None`` if ``stop`` is set before it is done (checked between images).
    The student is back in train mode afterwards.
    """
    student.eval()
    kd, corr, outputs, aligned, aligned_psnr = [], [], [], [], []
    with torch.no_grad():
        for item in cached_val:
            if stop_requested(stop):
                student.train()
                return None
            x, z, teacher = _val_view(item, device)
            out = student(torch.cat([x, z], 1)).float()
            kd.append(F.l1_loss(out, teacher).item())
            corr.append(_structure(out, z))
            outputs.append(((out[0].permute(1, 2, 0) + 1) / 2).clamp(0, 1).reshape(-1, 3).cpu().numpy())
            if registration is not None:
                section = _signed(_val_crop(item), device)[:, 7:10]
                registered = warp(out, registration(out, section).float())
                aligned.append(F.l1_loss(registered, section).item())
                mse = F.mse_loss(registered.clamp(-1, 1), section).item() / 4  # on the [0, 1] scale
                aligned_psnr.append(10 * np.log10(1 / max(mse, 1e-10)))
    student.train()
    if stop_requested(stop):  # the style score below takes a second or more: do not make a stop wait for it
        return None
    scores = {"kd_l1": float(np.mean(kd)), "structure": float(np.nanmean(corr))}
    if registration is not None:
        scores["aligned_l1"] = float(np.mean(aligned))
        scores["aligned_psnr"] = float(np.mean(aligned_psnr))
    if reference_lab is not None:
        scores["style"] = sliced_wasserstein(lab_pixels(np.concatenate(outputs)[None]), reference_lab)
        scores["style_noise"] = style_noise([lab_pixels(o[None], max_pixels=BOOTSTRAP_PIXELS // 2) for o in outputs],
                                            reference_lab)
    return scores


def train_student(
    model,
    darkfield: str | os.PathLike | Sequence | np.ndarray,
    stained: str | os.PathLike | Sequence | np.ndarray,
    config: StudentConfig | None = None,
    *,
    darkfield_names: Sequence[str] | None = None,
    stained_names: Sequence[str] | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    init_state: dict | None = None,
    progress: Callable[[Progress], None] | None = None,
    stop: threading.Event | None = None,
    callback: Callable[[int, torch.nn.Module], None] | None = None,
) -> tuple[ResnetGenerator, TrainResult]:
    """Train a student for ``model`` (a StainModel with an enhancer and a teacher).

    Parameters
    ----------
    model : StainModel
        Its enhancer and frozen teacher make the student's inputs and targets.
    darkfield, stained : folder path, or in-memory images
        A folder of images, or a sequence of arrays ``(Y, X)`` / ``(Y, X, C)`` (a stack is
        split into planes; any dtype :mod:`digital_stain.core.arrays` accepts), brought to RGB
        uint8 as a folder's images are (:func:`digital_stain.train.data.images_from_arrays`).
        Images smaller than the crop are skipped; nothing usable is refused. In paired mode
        (``config.mode == "paired"``) ``stained`` holds each dark-field image's stained
        adjacent section, paired by name and of the same size
        (:func:`digital_stain.train.paired.load_pairs`, which says what it refuses).
    darkfield_names, stained_names : sequence of str, optional
        Names of in-memory images (they choose the validation split, as file names do).
    config : StudentConfig
    checkpoint, resume : written at every validation and on a stop; ``resume`` continues from it.
    init_state : dict, optional
        Student weights to start from (fine-tuning).
    progress : callable(Progress), optional
    stop : threading.Event, optional
        Checked between images while caching the teacher, between validation images and
        before every step: the run returns within one step (or one image) of it being set.
    callback : callable(step, student), optional
        Called in the training thread after every optimisation step (after that step's
        validation and progress report) with the step number and the live student. It may
        run the student (e.g. :func:`digital_stain.train.finetune.preview_student`, which
        uses a copy); train mode, norm modes and grad mode are restored afterwards. It must
        not change the weights. It may set ``stop``.

    Returns the student chosen on the validation split (:func:`digital_stain.train.selection.chosen_step`;
    eval mode, on the CPU) and a :class:`TrainResult`; on ``stop`` it returns within one
    step. ``result.best_step is None`` means no validation ran yet: the
    returned weights are then the current, unvalidated ones. In paired mode the split is
    the same (by the dark-field names; a held-out pair's section is the colour reference and
    is never shown to the discriminator), the selection rule is the same, and the history also
    records ``aligned_l1`` and ``aligned_psnr`` (:func:`validation_scores`). The registration
    network is not returned (it is in the checkpoint).
    """
    cfg = config or StudentConfig()
    if model.teacher is None:
        raise InputError(f"model {model.name!r} has no teacher to distil from; train one with `digital-stain train-teacher`.")
    device = resolve_device(cfg.device)
    precision = resolve_training_precision(cfg.precision, device)
    if cfg.paired:
        pairs = load_pairs(darkfield, stained, darkfield_names, stained_names, min_side=cfg.crop)
        dark = pairs.darkfield
        if progress:
            progress(Progress(0, 0, message=f"paired training: {pairs.summary()}, matched by name"))
    else:
        dark = load_images(darkfield, darkfield_names, min_side=cfg.crop, kind="dark-field")
        stained = load_images(stained, stained_names, min_side=cfg.crop, kind="H&E")
    held_out = validation_split(dark.names, cfg.val_fraction)
    if not held_out.any() or held_out.all():
        held_out = np.zeros(len(dark.names), bool)
        held_out[-1] = True
    cached = cache_teacher(model, dark.images, progress, stop)
    if cached is None:
        return _generator(cfg).eval(), TrainResult(None, 0, True)
    if cfg.paired:  # the section rides along (channels 7-9), so crops, flips and turns are the same in both
        cached = [np.concatenate([c, section], -1) for c, section in zip(cached, pairs.stained)]
    train_items = [c for c, h in zip(cached, held_out) if not h] or cached
    val_items = [c for c, h in zip(cached, held_out) if h]
    if cfg.paired:  # the held-out pairs' sections are the colour reference (the discriminator sees the others)
        stained_train = None
        reference_lab = lab_pixels(np.concatenate([c[..., 7:10].reshape(-1, 3) for c in val_items]))
    else:
        stained_train, reference_lab = _carve_reference(stained.images, stained.names, cfg.val_fraction)
    floor = cfg.structure_floor * teacher_structure(val_items, device) if val_items else 0.0
    if progress and len(dark.images) < 2:
        progress(Progress(0, 0, message="only one dark-field image: it is used for training and for validation"))
    if progress and reference_lab is None:
        progress(Progress(0, 0, message="too few H&E images to hold any out: states are chosen by structure alone"))

    torch.manual_seed(cfg.seed)
    student = _generator(cfg).to(device)
    reverse = _generator(cfg, in_channels=3).to(device)
    disc = PatchDiscriminator(3, cfg.disc_width).to(device)
    if init_state is not None:
        student.load_state_dict(init_state)
    ema = None
    if cfg.ema_decay > 0:  # the judged (validated, chosen, returned) weights; the live ones keep training
        ema = copy.deepcopy(student).requires_grad_(False)  # a copy draws no random numbers: the live run is unchanged
    judged = ema if ema is not None else student
    opt_g = torch.optim.Adam([*student.parameters(), *reverse.parameters()], lr=cfg.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    pool = ImagePool(cfg.pool_size)
    nets = {"student": student, "reverse": reverse, "disc": disc}
    opts = {"g": opt_g, "d": opt_d}
    if ema is not None:
        nets["ema"] = ema
    reg = None
    if cfg.paired and cfg.registration:  # made after the others, so the unpaired networks start as in the unpaired mode
        reg = RegistrationNet(6, cfg.reg_width, cfg.reg_depth).to(device)
        nets["registration"] = reg
        opts["r"] = torch.optim.Adam(reg.parameters(), lr=cfg.lr * cfg.reg_lr_scale, betas=(0.5, 0.999))  # as RegGAN
    resuming = bool(resume and checkpoint and os.path.exists(checkpoint))
    if reg is not None and cfg.reg_warmup > 0 and not resuming:  # a resumed R comes from the checkpoint
        from digital_stain.train.align_warmup import warm_up_registration

        sections = [c[..., 7:10] for c in train_items]
        if warm_up_registration(reg, sections, cfg.reg_warmup, cfg.crop, device, cfg.seed, progress, stop) is None:
            return _generator(cfg).eval(), TrainResult(None, 0, True)
    start, best, best_step, history = 0, -float("inf"), None, []
    due = False  # a validation of the current step is owed (a stop interrupted it)
    best_state = snapshot(judged)
    if resuming:
        holder = _generator(cfg)
        _check_resumable(checkpoint, cfg)
        meta = load_checkpoint(checkpoint, {**nets, "best": holder}, opts)
        start, best, best_step, history = meta["step"], meta["best"], meta["best_step"], meta["history"]
        due = bool(meta.get("validation_due", False))
        best_state = holder.state_dict()
        pool.images = [t.to(device) for t in _load_pool(checkpoint)]


    def save(step: int) -> None:
        if checkpoint:
            holder = _generator(cfg)
            holder.load_state_dict(best_state)
            meta = dict(step=step, best=best, best_step=best_step, history=history, config=asdict(cfg),
                        validation_due=bool(due and val_items))
            save_checkpoint(checkpoint, {**nets, "best": holder, **_pool_modules(pool)}, opts, meta)

    meter = Meter(cfg.steps, start)
    step, cancelled, trained = start, False, False
    while True:
        message = ""
        if due and val_items:  # after a step on the validation grid, or owed by a stop during validation
            extra = {} if reg is None else {"registration": reg}
            scores = validation_scores(judged, val_items, device, reference_lab, stop, **extra)
            if scores is not None and ema is not None:  # the live weights too, to see what the average buys
                live = validation_scores(student, val_items, device, reference_lab, stop, **extra)
                scores = None if live is None else {**scores, **{f"live_{k}": v for k, v in live.items()}}
            if scores is None:  # stopped during validation: owed, and done first on --resume
                cancelled = True
                break
            due = False
            history.append({"step": step, **scores})
            if chosen_step(history, floor) == step:
                best, best_step = selection_score(scores, floor), step
                best_state = snapshot(judged)
            save(step)
            aligned = f", aligned L1 {scores['aligned_l1']:.3f}" if "aligned_l1" in scores else ""
            message = (f"validation structure {scores['structure']:.3f} (floor {floor:.3f}), style "
                       f"{scores.get('style', float('nan')):.2f}, kd {scores['kd_l1']:.3f}{aligned} "
                       f"(best at step {best_step})")
            if ema is not None:
                message += (f"; live weights: structure {scores['live_structure']:.3f}, "
                            f"style {scores.get('live_style', float('nan')):.2f}")
        if progress and (message or trained and (step % cfg.report_every == 0 or step == cfg.steps)):
            progress(meter.report(step, message))
        if callback is not None and trained:
            _call_restoring(callback, step, judged)
        if step >= cfg.steps:
            break
        if stop_requested(stop):
            cancelled = True
            break
        rng = np.random.default_rng([cfg.seed, step])
        if not cfg.paired:
            x, z, teacher = _split(random_crops(train_items, cfg.batch, cfg.crop, rng, cfg.turns), device)
            real = _signed(random_crops(stained_train, cfg.batch, cfg.crop, rng, cfg.turns), device)
        else:  # the stained section of the same crop: the reference of L_con and the discriminator's real image
            crops = _signed(random_crops(train_items, cfg.batch, cfg.crop, rng, cfg.turns), device)
            x, z, teacher, real = crops[:, :3], crops[:, 3:4], crops[:, 4:7], crops[:, 7:10]
        lr = constant_then_linear(cfg.lr, step, cfg.steps)
        set_lr([o for name, o in opts.items() if name != "r"], lr)
        if "r" in opts:
            set_lr([opts["r"]], lr * cfg.reg_lr_scale)
        with autocast(device, precision):
            fake = student(torch.cat([x, z], 1))
            disc.requires_grad_(False)
            adv = ((_score(disc, fake) - 1.0) ** 2).mean()
            kd = F.l1_loss(fake.float(), teacher)
            cyc = F.l1_loss(reverse(fake).float(), x)
            # before adversarial_from, G learns by distillation (and the sections) alone
            loss_g = (adv if step >= cfg.adversarial_from else 0.0) + cfg.lambda_kd * kd + cfg.lambda_cyc * cyc
            if cfg.lambda_structure:
                structure = structure_loss(fake, z)
                loss_g = loss_g + cfg.lambda_structure * structure
            if reg is not None:  # Learning to Align: phi = R(y_hat, y), L_con = |y_hat o phi - y|_1, L_smoo(phi)
                phi = reg(fake, real).float()
                con = F.l1_loss(warp(fake.float(), phi), real)
                smooth = smoothness_loss(phi)
                loss_g = loss_g + cfg.lambda_con * con + cfg.lambda_smooth * smooth
            elif cfg.paired:  # pix2pix-style baseline (registration=False): the identity field, nothing to smooth
                con = F.l1_loss(fake.float(), real)
                smooth = torch.zeros((), device=device)
                loss_g = loss_g + cfg.lambda_con * con
        opt_g.zero_grad(set_to_none=True)
        if reg is not None:
            opts["r"].zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        if reg is not None:
            opts["r"].step()
        if ema is not None:
            update_ema(ema, student, cfg.ema_decay, step)
        disc.requires_grad_(True)
        with autocast(device, precision):
            pooled = pool.query(fake.detach().float(), rng)
            loss_d = 0.5 * (((_score(disc, real) - 1.0) ** 2).mean() + (_score(disc, pooled) ** 2).mean())
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        step += 1
        trained = True
        due = step % cfg.val_every == 0 or step == cfg.steps
        losses = {"adv": adv.item(), "kd": kd.item(), "cyc": cyc.item(), "d": loss_d.item()}
        if cfg.paired:
            losses.update(con=con.item(), smooth=smooth.item())
        if cfg.lambda_structure:
            losses["structure"] = structure.item()
        meter.add(losses, cfg.batch)
    if cancelled:
        save(step)
    result_net = _generator(cfg)
    result_net.load_state_dict(best_state if best_step is not None else judged.state_dict())
    result_net.eval()
    # F as it ended (not at the chosen step: it is kept to translate H&E into dark-field, not judged)
    kept_reverse = _generator(cfg, in_channels=3)
    kept_reverse.load_state_dict({k: v.detach().cpu() for k, v in reverse.state_dict().items()})
    return result_net, TrainResult(None, step, cancelled, best_step, None if best_step is None else best, history,
                                   parts={"reverse": kept_reverse.eval()})


def _call_restoring(callback, step: int, student: torch.nn.Module) -> None:
    """Run ``callback(step, student)`` and put back what it may have changed: train mode and grad mode."""
    grad = torch.is_grad_enabled()
    try:
        callback(step, student)
    finally:
        torch.set_grad_enabled(grad)
        student.train()


def _check_resumable(checkpoint, cfg: StudentConfig) -> None:
    """Refuse a checkpoint made in the other mode or with other networks or data settings, saying which differ."""
    from digital_stain.io.modelfile import load_bundle

    _, metadata = load_bundle(checkpoint)
    saved = metadata.get("meta", {}).get("config", {})
    saved_mode = saved.get("mode", "unpaired")  # checkpoints from before the paired mode are unpaired
    if saved_mode != cfg.mode:
        how = "with --paired (mode='paired')" if saved_mode == "paired" else "without --paired (mode='unpaired')"
        raise InputError(f"checkpoint {checkpoint} was made by {saved_mode} training and this run is {cfg.mode}; "
                         f"resume it {how}, or start afresh without --resume (or with another --checkpoint).")
    # checkpoints from before these options had none of them
    saved = {"ema_decay": 0.0, "reg_warmup": 0, "upsample": "transpose", "lambda_structure": 0.0, "adversarial_from": 0,
             "turns": True, **saved}
    keys = ("width", "blocks", "upsample", "disc_width", "crop", "batch", "steps", "seed", "lambda_kd", "lambda_cyc",
            "lr", "ema_decay", "lambda_structure", "adversarial_from", "turns")
    if cfg.paired:
        keys += ("lambda_con", "lambda_smooth", "reg_width", "reg_depth", "registration", "reg_lr_scale", "reg_warmup")
    differ = [f"{k} {saved[k]} -> {getattr(cfg, k)}" for k in keys if k in saved and saved[k] != getattr(cfg, k)]
    if differ:
        raise InputError(f"checkpoint {checkpoint} was made with other settings ({', '.join(differ)}); "
                         "resume with the same settings, or start afresh without --resume.")


def _carve_reference(images: list, names: list, fraction: float):
    """Hold out real H&E (by file-name hash) as the colour reference for validation.

    Returns the images left for the discriminator and the Lab pixels of the
    held-out ones (``None`` when the folder is too small to spare any).
    """
    held = validation_split(names, fraction)
    if not held.any() or held.all():
        return images, None
    reference = np.concatenate([images[i].reshape(-1, 3) for i in np.flatnonzero(held)])
    return [im for im, h in zip(images, held) if not h], lab_pixels(reference)


class _PoolHolder(torch.nn.Module):
    def __init__(self, images: list):
        super().__init__()
        for i, image in enumerate(images):
            self.register_buffer(f"image{i}", image.detach().cpu())


def _pool_modules(pool: ImagePool) -> dict:
    return {"pool": _PoolHolder(pool.images)}


def _load_pool(path) -> list:
    from digital_stain.io.modelfile import load_bundle

    tensors, _ = load_bundle(path)
    keys = sorted((k for k in tensors if k.startswith("pool.image")), key=lambda k: int(k[len("pool.image"):]))
    return [tensors[k] for k in keys]
