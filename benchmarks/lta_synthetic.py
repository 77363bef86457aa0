"""Is alignment learned? Learning to Align vs unpaired vs pix2pix-style L1 on synthetic misaligned pairs.

Data (all from real H&E, so every answer is known):

* **training pairs**: ``--train-pairs`` H&E tiles of ``DSD_U/train/stained`` (a seeded choice by
  name), each turned into a dark-field image by the enhancer's inverse exactly as
  ``compare_methods.py`` does (``digital_stain.quality.synth``: blur σ 1 px, noise 0.003, 8-bit, tinted like
  ``DSD_U/train/darkfield``). The dark-field stays where it is; its H&E *reference* is then warped by
  a known random deformation ψ: a smooth field (a 4 x 4 grid of random control vectors, at most
  ``--max-shift`` px, upsampled bicubically) plus a small rigid motion (shift up to
  ``--max-translate`` px per axis, rotation up to ``--max-rotate`` degrees about the centre).
  ``y = warp(aligned, ψ)``, i.e. ``y(p) = aligned(p + ψ(p))``, in the pixel convention of
  :func:`digital_stain.core.nets.registration.warp` (channel 0 x, channel 1 y).
* **test pairs**: the ``--test-pairs`` H&E tiles of ``DSD_U/val/stained`` (never seen by the teacher or
  any student), dark-field made the same way (the very set of ``compare_methods.py``'s synthetic
  benchmark), references **left aligned**: PSNR, SSIM and nuclei Dice of each stain against them.
* **end-point error**: the same test tiles, references warped by fresh deformations drawn the same
  way; the registration network ``R`` of the Learning-to-Align run (from its checkpoint) predicts
  ``φ = R(ŷ, y)`` from the stain ``ŷ`` and the warped reference ``y``. ``ŷ∘φ ≈ y`` with
  ``ŷ ≈ aligned`` means the ideal ``φ`` is ψ itself, so EPE = mean ``‖φ − ψ‖`` in pixels over the
  interior (a ``--margin`` px border is left out: there the warped reference repeats its edge and
  nothing can be matched). Baselines: the identity field (EPE = mean ``‖ψ‖``) and, for scale, the
  best single translation (the mean of ψ, an oracle: it knows the answer).

Three students, same data, seed, size preset, crop and steps, all new (``from_scratch``: same
initial weights), all with the enhancer and frozen teacher of ``--base`` (``dsd-unpaired``):

* **LtA**: ``StudentConfig(mode="paired")``, the paper's paired weights (λ_kd 2, λ_cyc 10, λ_con 20,
  λ_smooth 10) with the registration network ``R``;
* **no LtA (unpaired)**: ``mode="unpaired"`` (λ_kd 5, λ_cyc 80) on the same dark-field images, with
  the same misaligned H&E as unpaired references;
* **pix2pix-style L1**: ``mode="paired", registration=False``: the same losses as LtA but ``L_con``
  compares the unregistered stain with the misaligned reference (no ``R``, no smoothness).

Examples (from the repository root; torch with one thread is much faster on a busy 2-core CPU)::

    OMP_NUM_THREADS=1 python benchmarks/lta_synthetic.py --steps 1200 --size fast --crop 96
    OMP_NUM_THREADS=1 python benchmarks/lta_synthetic.py --steps 4 --size tiny --train-pairs 12 --test-pairs 4 \\
        --workdir /tmp/lta-smoke --out /tmp/lta-smoke.md                      # a smoke run

Trained students are kept in ``--workdir`` (``<label>.safetensors`` and its checkpoint) and reused
if present: delete the folder to train again.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

METHODS = {  # label -> (mode, StudentConfig overrides)
    "lta": ("paired", {}),
    "unpaired": ("unpaired", {}),
    "pix2pix": ("paired", {"registration": False}),
}
LABELS = {
    "lta": "student, paired + LtA (R, λ_con 20, λ_smooth 10)",
    "unpaired": "student, no LtA (unpaired mode, same images)",
    "pix2pix": "student, pix2pix-style L1 on the misaligned pairs (no R)",
}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- deformations (pure functions, tested in tests/test_benchmarks_lta.py) -------------------------
def smooth_deformation(shape: tuple[int, int], rng: np.random.Generator, max_shift: float,
                       grid: int = 4) -> np.ndarray:
    """A random smooth displacement field ``(2, H, W)`` float32, in pixels, each vector at most ``max_shift`` long.

    ``grid x grid`` control vectors, uniform in ``[-max_shift, max_shift]`` per component, upsampled
    bicubically over the whole image (corners on corners); vectors longer than ``max_shift`` (the
    uniform square's corners, bicubic overshoot) are shortened to it.
    """
    h, w = shape
    control = torch.from_numpy(rng.uniform(-max_shift, max_shift, (1, 2, grid, grid)).astype(np.float32))
    field = torch.nn.functional.interpolate(control, size=(h, w), mode="bicubic", align_corners=True)[0].numpy()
    length = np.sqrt((field**2).sum(0, keepdims=True))
    scale = np.minimum(1.0, max_shift / np.maximum(length, 1e-12))
    return (field * scale).astype(np.float32)


def rigid_displacement(shape: tuple[int, int], shift_xy: tuple[float, float], angle_deg: float) -> np.ndarray:
    """The displacement ``(2, H, W)`` of a rotation by ``angle_deg`` about the image centre plus a shift ``(dx, dy)``.

    ``p + d(p) = Rot(p - c) + c + shift`` for every pixel ``p = (x, y)``.
    """
    h, w = shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    a = math.radians(angle_deg)
    u, v = xs - cx, ys - cy
    dx = math.cos(a) * u - math.sin(a) * v + cx + shift_xy[0] - xs
    dy = math.sin(a) * u + math.cos(a) * v + cy + shift_xy[1] - ys
    return np.stack([dx, dy]).astype(np.float32)


def random_deformation(shape: tuple[int, int], rng: np.random.Generator, max_shift: float = 4.0,
                       max_translate: float = 4.0, max_rotate: float = 2.0) -> np.ndarray:
    """Smooth field plus rigid motion (shift up to ``max_translate`` px per axis, angle up to ``max_rotate`` deg)."""
    smooth = smooth_deformation(shape, rng, max_shift)
    shift = rng.uniform(-max_translate, max_translate, 2)
    angle = rng.uniform(-max_rotate, max_rotate)
    return smooth + rigid_displacement(shape, (float(shift[0]), float(shift[1])), float(angle))


def warp_image(image: np.ndarray, displacement: np.ndarray) -> np.ndarray:
    """``image(p + displacement(p))`` for a uint8 ``(H, W, C)`` image (bilinear, edges repeated), uint8.

    Uses :func:`digital_stain.core.nets.registration.warp`, the resampler of training.
    """
    from digital_stain.core.nets.registration import warp

    t = torch.from_numpy(np.array(image, np.float64)).permute(2, 0, 1)[None]
    d = torch.from_numpy(np.array(displacement, np.float64))[None]
    out = warp(t, d)[0].permute(1, 2, 0).numpy()
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def end_point_error(predicted: np.ndarray, true: np.ndarray, margin: int = 0) -> float:
    """Mean distance in pixels between two displacement fields ``(2, H, W)``, ``margin`` px borders left out."""
    diff = np.asarray(predicted, np.float64) - np.asarray(true, np.float64)
    if margin:
        diff = diff[:, margin:-margin, margin:-margin]
    return float(np.sqrt((diff**2).sum(0)).mean())


# -- data ------------------------------------------------------------------------------------------
def make_pairs(stained: list, enhancer, tint, seed: int, stream: int, deform: dict | None):
    """Synthetic dark-field of each H&E tile and its reference (warped by a fresh deformation if ``deform``).

    Returns (darkfield, references, fields): ``fields[i]`` is ψ (``None`` when left aligned). The
    dark-field noise of tile ``i`` uses ``default_rng([seed, i])`` for ``stream`` 0 (exactly as
    ``compare_methods.py``), ``[seed, stream, i]`` otherwise; deformations ``[seed, stream, i, 1]``.
    """
    from digital_stain.quality.synth import synthesize_darkfield

    dark, refs, fields = [], [], []
    for i, y in enumerate(stained):
        noise = np.random.default_rng([seed, i] if stream == 0 else [seed, stream, i])
        dark.append(synthesize_darkfield(y, enhancer, tint, blur_sigma=1.0, noise_std=0.003, rng=noise))
        if deform is None:
            refs.append(y)
            fields.append(None)
        else:
            psi = random_deformation(y.shape[:2], np.random.default_rng([seed, stream, i, 1]), **deform)
            refs.append(warp_image(y, psi))
            fields.append(psi)
    return dark, refs, fields


class CachedTeacher:
    """The base model for ``train_student`` with its (frozen) teacher's outputs memoised per image.

    The three runs stain the same dark-field images: the teacher runs once per image instead of
    three times. Results are exactly those of ``model.stain``.
    """

    def __init__(self, model):
        self.model, self.teacher, self.name, self._memo = model, model.teacher, model.name, {}

    def stain(self, image, outputs, **kwargs):
        key = (hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest(), image.shape, tuple(outputs))
        if key not in self._memo:
            self._memo[key] = self.model.stain(image, outputs, **kwargs)
        return self._memo[key]


# -- training --------------------------------------------------------------------------------------
def train_method(label: str, cached, pair_dir: Path, workdir: Path, args):
    """Train (or reuse) one student; returns (StainModel with it, its config, TrainResult or None, seconds)."""
    from digital_stain.stain.model import StainModel
    from digital_stain.train.events import TrainResult
    from digital_stain.train.student import StudentConfig, train_student

    mode, extra = METHODS[label]
    if mode == "paired" and extra.get("registration", True):
        if args.lambda_smooth is not None:
            extra = {**extra, "lambda_smooth": args.lambda_smooth}
        if args.reg_lr_scale != 1.0:
            extra = {**extra, "reg_lr_scale": args.reg_lr_scale}
        if args.reg_warmup:
            extra = {**extra, "reg_warmup": args.reg_warmup}
    cfg = StudentConfig.preset(args.size, mode=mode, steps=args.steps, crop=args.crop, seed=args.seed,
                               device=args.device, precision=args.precision, val_every=max(1, args.steps // 5),
                               report_every=max(1, args.steps // 20), **extra)
    path, ckpt = workdir / f"{label}.safetensors", workdir / f"{label}.ckpt.safetensors"
    base = cached.model
    if path.exists():
        _log(f"{path} exists, reusing it (and the step and seconds its training recorded)")
        model = StainModel.load(path, device="cpu")
        saved = model.metadata.get("provenance", {})
        if saved.get("config", {}).get("steps") != cfg.steps or saved.get("config", {}).get("crop") != cfg.crop:
            raise SystemExit(f"{path} was trained with other settings; delete {workdir} or choose another --workdir")
        result = TrainResult(None, saved["config"]["steps"], False, saved.get("best_step"), None,
                             saved.get("history", []))
        return model, cfg, result, float(saved.get("seconds", float("nan")))

    def progress(p):
        if p.message.startswith("teacher outputs cached"):
            done, total = p.message.rsplit(" ", 1)[-1].split("/")
            if int(done) % 50 and done != total:
                return
        if p.message or (p.total and p.step % cfg.report_every == 0):
            losses = ", ".join(f"{k} {v:.3f}" for k, v in (p.losses or {}).items())
            _log(f"  [{label}] step {p.step}/{p.total} {p.message} {losses}")

    _log(f"training {label}: mode {mode} {extra or ''}, {args.size}, {args.steps} steps, crop {args.crop}, "
         f"seed {args.seed}, validation every {cfg.val_every}")
    t0 = time.time()
    student, result = train_student(cached, pair_dir / "darkfield", pair_dir / "stained", cfg, checkpoint=ckpt,
                                    resume=True, progress=progress)
    seconds = time.time() - t0
    _log(f"  [{label}] done in {seconds:.0f} s, chosen at step {result.best_step}")
    meta = {"name": f"lta-synthetic-{label}", "provenance": {"benchmark": "lta_synthetic", "config": vars(cfg),
                                                             "best_step": result.best_step, "history": result.history,
                                                             "seconds": round(seconds, 1)}}
    model = StainModel(base.enhancer, base.teacher, student, meta)
    model.save(path, overwrite=True)
    return model, cfg, result, seconds


# -- scoring ---------------------------------------------------------------------------------------
def score(stains: list, references: list, enhanced: list) -> dict:
    from digital_stain.quality import metrics
    from digital_stain.quality.evaluate import as_rgb_uint8

    rows = {"psnr": [], "ssim": [], "nuclei_dice": [], "structure": []}
    for out, ref, enh in zip(stains, references, enhanced):
        out = as_rgb_uint8(out)
        rows["psnr"].append(metrics.psnr(out, ref))
        rows["ssim"].append(metrics.ssim(out, ref))
        rows["nuclei_dice"].append(metrics.nuclei_dice(out, ref))
        rows["structure"].append(metrics.structure_score(out, enh))
    return {k: float(np.nanmean(v)) for k, v in rows.items()}


def registration_fields(ckpt: Path, cfg, base, darkfield: list, references: list) -> tuple[list, list]:
    """``φ = R(ŷ, y)`` for each pair, with ``R`` and the student as they were at the end of the run (its checkpoint).

    Returns the fields ``(2, H, W)`` and the stains ``ŷ`` (float [0, 1]).
    """
    from digital_stain.stain.model import StainModel
    from digital_stain.io.modelfile import load_bundle
    from digital_stain.core.nets import ResnetGenerator
    from digital_stain.core.nets.registration import RegistrationNet

    tensors, _ = load_bundle(ckpt)

    def part(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    reg = RegistrationNet(6, cfg.reg_width, cfg.reg_depth)
    reg.load_state_dict(part("registration."))
    reg.eval()
    student = ResnetGenerator(4, 3, cfg.width, cfg.blocks)
    student.load_state_dict(part("student."))  # the last step's student, which R was trained with
    final = StainModel(base.enhancer, None, student, {"name": "final"})
    fields, stains = [], []
    with torch.no_grad():
        for x, y in zip(darkfield, references):
            y_hat = final.stain(x, ["student"], precision="fp32")["student"]
            moving = torch.from_numpy(y_hat).permute(2, 0, 1)[None].float() * 2 - 1
            fixed = torch.from_numpy(y).permute(2, 0, 1)[None].float() / 127.5 - 1
            fields.append(reg(moving, fixed)[0].numpy())
            stains.append(y_hat)
    return fields, stains


def sign_check(stains: list, references: list, fields: list, margin: int) -> tuple[float, float, float]:
    """Mean L1 (on [0, 1]) of ``warp(ŷ, ψ)``, ``ŷ`` and ``warp(ŷ, −ψ)`` to the warped references, interior only.

    If the convention is right (``ŷ∘ψ ≈ y``), the first is the smallest.
    """
    out = np.zeros(3)
    for y_hat, y, psi in zip(stains, references, fields):
        ref = y.astype(np.float64) / 255
        u8 = np.clip(np.rint(y_hat * 255), 0, 255).astype(np.uint8)
        for j, moved in enumerate((warp_image(u8, psi), u8, warp_image(u8, -psi))):
            diff = np.abs(moved.astype(np.float64) / 255 - ref)
            out[j] += diff[margin:-margin, margin:-margin].mean() / len(stains)
    return tuple(float(v) for v in out)


def objective_terms(stains: list, references: list, candidates: dict, margin: int) -> dict:
    """Mean ``L_con`` (L1 on the network's [-1, 1] scale, interior) and ``L_smoo`` of candidate fields, per candidate.

    ``candidates``: name -> list of fields ``(2, H, W)``, one per pair.
    """
    from digital_stain.core.nets.registration import smoothness_loss, warp

    out = {}
    for name, fields in candidates.items():
        con, smooth = [], []
        for y_hat, y, phi in zip(stains, references, fields):
            moving = torch.from_numpy(np.array(y_hat, np.float32)).permute(2, 0, 1)[None] * 2 - 1
            fixed = torch.from_numpy(np.array(y, np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
            field = torch.from_numpy(np.array(phi, np.float32))[None]
            with torch.no_grad():
                con.append((warp(moving, field) - fixed)[..., margin:-margin, margin:-margin].abs().mean().item())
                smooth.append(smoothness_loss(field).item())
        out[name] = (float(np.mean(con)), float(np.mean(smooth)))
    return out


def format_rows(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/dsd/DSD_U")
    parser.add_argument("--base", default="dsd-unpaired", help="model with the enhancer and teacher")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--size", default="fast", help="student preset (full, small, fast, tiny)")
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--train-pairs", type=int, default=200)
    parser.add_argument("--test-pairs", type=int, default=40, help="at most 40 (DSD_U/val/stained)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shift", type=float, default=4.0, help="smooth part of the deformation, px")
    parser.add_argument("--max-translate", type=float, default=4.0, help="rigid shift per axis, px")
    parser.add_argument("--max-rotate", type=float, default=2.0, help="rigid rotation, degrees")
    parser.add_argument("--margin", type=int, default=16, help="border left out of the end-point error, px")
    parser.add_argument("--methods", default="lta,unpaired,pix2pix")
    parser.add_argument("--device", default="cpu", help="training device (scoring runs on the CPU)")
    parser.add_argument("--precision", default="fp32", help="training precision (auto, fp32, bf16)")
    parser.add_argument("--lambda-smooth", type=float, default=None,
                        help="weight of the field's smoothness loss for lta (default the paper's 10)")
    parser.add_argument("--reg-lr-scale", type=float, default=1.0,
                        help="R's learning rate as a multiple of the generators' (default 1, the paper's)")
    parser.add_argument("--reg-warmup", type=int, default=0,
                        help="steps of R's self-supervised warm-up on warped training sections before lta "
                             "(digital_stain.train.align_warmup; default 0, the paper's)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs/lta-synthetic")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/lta-synthetic.md")
    args = parser.parse_args(argv)
    if args.lambda_smooth is not None or args.reg_lr_scale != 1.0 or args.reg_warmup:  # the table says what ran
        LABELS["lta"] = (f"student, paired + LtA (R, λ_con 20, λ_smooth {args.lambda_smooth or 10:g}"
                         + (f", R's lr x{args.reg_lr_scale:g}" if args.reg_lr_scale != 1.0 else "")
                         + (f", R warmed up {args.reg_warmup} steps" if args.reg_warmup else "") + ")")
    started = time.time()

    from digital_stain.stain.model import StainModel
    from digital_stain.quality.synth import darkfield_tint
    from digital_stain.train.data import load_rgb_folder
    from PIL import Image

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    deform = dict(max_shift=args.max_shift, max_translate=args.max_translate, max_rotate=args.max_rotate)
    base = StainModel.load(args.base, device="cpu")
    tint = darkfield_tint(load_rgb_folder(args.data / "train/darkfield", min_side=1, kind="dark-field").images)
    train_hne = load_rgb_folder(args.data / "train/stained", min_side=1, kind="H&E")
    chosen = sorted(np.random.default_rng(args.seed).permutation(len(train_hne.names))[: args.train_pairs])
    train_names = [Path(train_hne.names[i]).stem for i in chosen]
    test_hne = load_rgb_folder(args.data / "val/stained", min_side=1, kind="H&E")
    test_ref = test_hne.images[: args.test_pairs]

    _log(f"making {len(train_names)} misaligned training pairs and {len(test_ref)} test pairs")
    train_dark, train_ref, train_fields = make_pairs([train_hne.images[i] for i in chosen], base.enhancer, tint,
                                                     args.seed, 1, deform)
    test_dark, _, _ = make_pairs(test_ref, base.enhancer, tint, args.seed, 0, None)
    _, epe_ref, epe_fields = make_pairs(test_ref, base.enhancer, tint, args.seed, 2, deform)
    pair_dir = args.workdir / "pairs"
    for sub in ("darkfield", "stained"):
        (pair_dir / sub).mkdir(parents=True, exist_ok=True)
    for name, x, y in zip(train_names, train_dark, train_ref):
        Image.fromarray(x).save(pair_dir / "darkfield" / f"{name}.png")
        Image.fromarray(y).save(pair_dir / "stained" / f"{name}.png")
    np.savez_compressed(args.workdir / "train-fields.npz", **dict(zip(train_names, train_fields)))
    magnitude = [float(np.sqrt((f**2).sum(0)).mean()) for f in train_fields]
    peak = [float(np.sqrt((f**2).sum(0)).max()) for f in train_fields]
    _log(f"true displacement of the training references: mean {np.mean(magnitude):.2f} px, "
         f"largest {np.max(peak):.1f} px")
    _log(f"plan: {len(methods)} runs x {args.steps} steps ({args.size}, crop {args.crop}, seed {args.seed}), "
         f"validation every {max(1, args.steps // 5)} steps on ~10 % of the pairs; torch threads "
         f"{torch.get_num_threads()}")

    cached = CachedTeacher(base)
    trained, train_info = {}, {}
    for label in methods:
        model, cfg, result, seconds = train_method(label, cached, pair_dir, args.workdir, args)
        trained[label] = (model, cfg)
        train_info[label] = (result, seconds)

    _log(f"scoring on {len(test_ref)} aligned test pairs")
    outs = [base.stain(x, ["enhanced", "teacher"], precision="fp32") for x in test_dark]
    enhanced = [o["enhanced"] for o in outs]
    rows = {"enhancer only (gray)": score(enhanced, test_ref, enhanced),
            "teacher (frozen, distilled from)": score([o["teacher"] for o in outs], test_ref, enhanced)}
    for label in methods:
        model = trained[label][0]
        stains = [model.stain(x, ["student"], precision="fp32")["student"] for x in test_dark]
        rows[LABELS[label]] = score(stains, test_ref, enhanced)
    # the misalignment itself, for scale: a perfect stain scored against the warped H&E
    scale = score(epe_ref, test_ref, enhanced)

    header = ["method", "PSNR ↑ (dB)", "SSIM ↑", "nuclei Dice ↑", "structure ↑", "chosen at step", "train s"]
    table = []
    for name, s in rows.items():
        label = next((k for k, v in LABELS.items() if v == name), None)
        result, seconds = train_info.get(label, (None, float("nan")))
        step = "" if label is None else (result.best_step if result is not None else "reused")
        secs = "" if label is None or math.isnan(seconds) else f"{seconds:.0f}"
        table.append([name, f"{s['psnr']:.2f}", f"{s['ssim']:.3f}", f"{s['nuclei_dice']:.3f}",
                      f"{s['structure']:.3f}", step, secs])

    epe_table = sign = objective_table = None
    if "lta" in methods:
        _log("end-point error of the learned field")
        model, cfg = trained["lta"]
        ckpt = args.workdir / "lta.ckpt.safetensors"
        held_fields, held_stains = registration_fields(ckpt, cfg, base, test_dark, epe_ref)
        k = min(len(train_names), len(test_ref))
        seen_fields, seen_stains = registration_fields(ckpt, cfg, base, train_dark[:k], train_ref[:k])
        m = args.margin
        epe_rows = []
        for name, fields, truth in ((f"held-out tissue ({len(test_ref)} DSD_U/val tiles, fresh ψ)", held_fields,
                                     epe_fields),
                                    (f"training pairs (first {k}, ψ seen in training)", seen_fields,
                                     train_fields[:k])):
            zero = np.mean([end_point_error(np.zeros_like(t), t, m) for t in truth])
            rigid = np.mean([end_point_error(np.broadcast_to(t[:, m:-m, m:-m].mean((1, 2))[:, None, None], t.shape),
                                             t, m) for t in truth])
            learned = np.mean([end_point_error(f, t, m) for f, t in zip(fields, truth)])
            median = np.median([end_point_error(f, t, m) for f, t in zip(fields, truth)])
            epe_rows.append([name, f"{zero:.2f}", f"{rigid:.2f}", f"{learned:.2f}", f"{median:.2f}",
                             f"{100 * (1 - learned / zero):.0f} %"])
        epe_table = format_rows(["pairs", "identity field (no registration)", "best single translation (oracle)",
                                 "R of the LtA run", "R, median over pairs", "error removed by R"], epe_rows)
        sign = sign_check(held_stains, epe_ref, epe_fields, m)
        truth = train_fields[:k]
        translation = [np.broadcast_to(t[:, m:-m, m:-m].mean((1, 2))[:, None, None], t.shape) for t in truth]
        terms = objective_terms(seen_stains, train_ref[:k], {
            "identity (no registration)": [np.zeros_like(t) for t in truth],
            "R of the LtA run": seen_fields,
            "true ψ": truth,
            "ψ's mean translation only (oracle)": translation}, m)
        objective_table = format_rows(
            ["field φ", "L_con ↓", "L_smoo ↓",
             f"λ_con L_con + λ_smooth L_smoo ({cfg.lambda_con:g}, {cfg.lambda_smooth:g}) ↓"],
            [[name, f"{c:.4f}", f"{sm:.4f}", f"{cfg.lambda_con * c + cfg.lambda_smooth * sm:.3f}"]
             for name, (c, sm) in terms.items()])

    command = f"python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:] if argv is None else argv)}"
    wall = time.time() - started
    lines = [f"Command: `{command.strip()}`", "",
             f"{len(train_names)} misaligned training pairs (DSD_U/train/stained, synthetic dark-field), references "
             f"warped by smooth fields up to {args.max_shift:g} px plus shifts up to ±{args.max_translate:g} px and "
             f"rotations up to ±{args.max_rotate:g}° (true displacement: mean {np.mean(magnitude):.2f} px, largest "
             f"{np.max(peak):.1f} px). Students: preset `{args.size}`, crop {args.crop}, {args.steps} steps, seed "
             f"{args.seed}, enhancer and teacher of `{args.base}`. Wall time of this invocation {wall / 60:.1f} min"
             + (" (students reused from the work folder; their training seconds are in the table)."
                if any(math.isnan(s) or r is not None and r.best_score is None for r, s in train_info.values())
                else "."), "",
             f"### Aligned test pairs: {len(test_ref)} synthetic dark-field images from DSD_U/val/stained", "",
             format_rows(header, table), "",
             f"For scale, the warped H&E itself scored against the aligned H&E (what the misalignment costs a "
             f"perfect stain): PSNR {scale['psnr']:.2f} dB, SSIM {scale['ssim']:.3f}, nuclei Dice "
             f"{scale['nuclei_dice']:.3f}."]
    if epe_table:
        lines += ["", f"### End-point error of the learned field (px, mean over the interior: {args.margin} px "
                      "borders left out)", "", epe_table, "",
                  f"Sign check (held-out pairs, mean L1 on [0, 1] to the warped H&E): ŷ∘ψ {sign[0]:.4f}, ŷ "
                  f"{sign[1]:.4f}, ŷ∘(−ψ) {sign[2]:.4f} (the first must be the smallest: then ψ, in the "
                  "convention of `warp`, is the field R should find).", "",
                  f"### What the paired loss prefers (first {k} training pairs, the LtA run's last student ŷ, "
                  f"interior of the tiles)", "", objective_table]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    _log(f"written to {args.out}; wall time {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
