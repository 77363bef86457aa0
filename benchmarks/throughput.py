"""Staining throughput: megapixels per second and peak memory of the shipped models, CPU or GPU.

For each shipped model (``--models``, default ``dsd-unpaired,dsd-unpaired-fast``) and each
network path (``teacher``, ``student``; ``enhanced`` is numpy and is timed once per model),
``StainModel.stain(image, outputs=[path], ...)`` is timed on a realistic dark-field mosaic
(``--side`` x ``--side`` uint8 RGB, built from real dark-field tiles: the DSD_U validation
tiles in ``../shared/data/dsd`` when present, else the package's sample tiles, each placed
with a random flip/rotation) in several configurations:

* the baseline, measured in the same run: ``fp32`` eager, batch 1, tile 512 (on CUDA,
  PyTorch's default lets cuDNN use TF32 for fp32 convolutions);
* faster paths. On CUDA: bf16 autocast (fp16 where the GPU has no bf16) with batched tiles
  (batch 8 at tile 512 and batch 4 at tile 1024; without ``--quick`` also batch 1 and 16 at
  tile 512, batch 8 at tile 1024, and that with ``cudnn.benchmark``, with channels_last
  weights, and with ``torch.compile``). On the CPU: batch 4 (bf16 where the CPU has native
  bf16, else fp32), and without ``--quick`` ``torch.compile`` (the fastest CPU path in
  ``docs/benchmarks.md``).

Every call includes the whole library path: value scaling, the enhancer, the student's
instance-norm statistics pass, tiling, host/GPU copies and blending. Each configuration gets a
warm-up call first (the same image on CUDA and for compile; a small one otherwise), then
timed calls until ``--config-s`` seconds are used (at least one, at most ``--repeats``); the
best is reported. On CUDA the device is synchronised around every call. The whole run is
bounded by ``--budget-s``: configurations that would start after it are skipped (and say so).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the timed calls; on the CPU
the process's peak resident set (``VmHWM``, reset before each configuration through
``/proc/self/clear_refs``), which includes the interpreter, torch and the input (the
``idle RSS`` line gives that floor).

Projected time for 50,000 x 50,000 pixels (2500 MP): 2500 / MP/s of the configuration; for
the whole model (all three outputs), the sum of the enhancer's time and the best teacher
and student times per megapixel.

Examples (from the repository root)::

    python benchmarks/throughput.py --quick --device cpu
    PYTHONPATH=src python3 benchmarks/throughput.py --device cuda --out throughput-gpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from digital_stain import hostmem

hostmem.own_process()  # as the CLI does: before torch allocates (docs/benchmarks.md, host memory)

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "src"))  # run from a checkout without installing

from digital_stain.core.devices import cpu_has_fast_bf16, resolve_device  # noqa: E402
from digital_stain.stain import kernel as kernel_module  # noqa: E402
from digital_stain.stain.model import StainModel, available_models  # noqa: E402

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "dsd"
SAMPLE_DIR = REPO_ROOT / "src" / "digital_stain" / "data"
WHOLE_SLIDE_MP = 50_000 * 50_000 / 1e6
PATHS = ("teacher", "student")
SCRIPT_NAME = "benchmarks/throughput.py"
COMPILE_RESERVE_S = 100.0  # a compiled configuration starts only with this much budget left
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[throughput {time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass
class Config:
    label: str
    precision: str = "fp32"
    batch: int = 1
    tile: int = 512
    compile: bool = False
    channels_last: bool = False
    cudnn_benchmark: bool = False  # torch.backends.cudnn.benchmark for this configuration only
    quick: bool = True  # run with --quick too

    @property
    def is_baseline(self) -> bool:
        return self.label == "baseline"


def configs_for(device: torch.device, quick: bool) -> list[Config]:
    """The configurations, baseline first, in the order they are run."""
    base = Config("baseline")
    if device.type == "cuda":
        low = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        extra = [
            Config(f"{low}", low, 1, 512, quick=False),
            Config(f"{low} batch 8", low, 8, 512),
            Config(f"{low} batch 16", low, 16, 512, quick=False),
            Config(f"{low} batch 4, tile 1024", low, 4, 1024),
            Config(f"{low} batch 8, tile 1024", low, 8, 1024, quick=False),
            Config(f"{low} batch 8, tile 1024, cudnn.benchmark", low, 8, 1024, cudnn_benchmark=True, quick=False),
            Config(f"{low} batch 8, tile 1024, channels_last", low, 8, 1024, channels_last=True, quick=False),
            Config(f"{low} batch 8, tile 1024, compile", low, 8, 1024, compile=True, quick=False),
        ]
    else:
        low = "bf16" if cpu_has_fast_bf16() else "fp32"
        extra = [Config(f"{low} batch 4", low, 4, 512)]
        if low == "bf16":
            extra.append(Config("bf16", "bf16", 1, 512))
        extra.append(Config(f"{low} compile", low, 1, 512, compile=True, quick=False))
    return [base] + [c for c in extra if c.quick or not quick]


@dataclass
class Row:
    model: str
    path: str
    config: Config
    seconds: float | None = None
    tiled_seconds: float | None = None
    calls: int = 0
    peak_bytes: int | None = None
    diff: float | None = None
    note: str = ""
    ratio: float | None = field(default=None)


# -- input --------------------------------------------------------------------
def dark_tiles(data: Path) -> tuple[list[np.ndarray], str]:
    """Real dark-field tiles, uint8 RGB, and where they came from."""
    from PIL import Image

    folder = data / "DSD_U" / "val" / "darkfield"
    files = sorted(folder.glob("*.png")) if folder.is_dir() else []
    source = f"DSD_U validation dark-field tiles ({folder})"
    if not files:
        files = sorted(SAMPLE_DIR.glob("darkfield_*.png"))
        source = f"the package's dark-field sample tiles ({SAMPLE_DIR})"
    tiles = []
    for path in files:
        with Image.open(path) as im:
            tiles.append(np.asarray(im.convert("RGB")))
    side = min(min(t.shape[:2]) for t in tiles)
    return [np.ascontiguousarray(t[:side, :side]) for t in tiles], f"{len(tiles)} {source}"


def mosaic(tiles: list[np.ndarray], side: int, seed: int = 0) -> np.ndarray:
    """A ``side`` x ``side`` uint8 RGB mosaic of the tiles, each randomly flipped/rotated."""
    rng = np.random.default_rng(seed)
    t = tiles[0].shape[0]
    n = -(-side // t)
    rows = []
    for _ in range(n):
        row = []
        for _ in range(n):
            tile = np.rot90(tiles[rng.integers(len(tiles))], k=int(rng.integers(4)))
            row.append(tile[:, ::-1] if rng.integers(2) else tile)
        rows.append(np.concatenate(row, axis=1))
    return np.ascontiguousarray(np.concatenate(rows, axis=0)[:side, :side])


# -- memory -------------------------------------------------------------------
def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux); False where it cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib * 1024


# -- timing -------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


TILED_S = [0.0]  # seconds spent inside tiled_apply/whole_apply (networks, copies, blending) during the last call


def _timed(apply):
    def timed(*args, **kwargs):
        device = torch.device(kwargs.get("device", "cpu"))
        sync(device)
        t0 = time.perf_counter()
        try:
            return apply(*args, **kwargs)
        finally:
            sync(device)
            TILED_S[0] += time.perf_counter() - t0

    return timed


# the kernel's networks run through these two (tiles, or the one pass): time them apart
kernel_module.tiled_apply = _timed(kernel_module.tiled_apply)
kernel_module.whole_apply = _timed(kernel_module.whole_apply)


def stain_once(model: StainModel, image: np.ndarray, outputs, config: Config, overlap: int) -> tuple[float, dict]:
    sync(model._device)
    TILED_S[0] = 0.0
    t0 = time.perf_counter()
    out = model.stain(image, outputs=outputs, precision=config.precision, tile=config.tile, overlap=overlap,
                      batch=config.batch, compile=config.compile)
    sync(model._device)
    return time.perf_counter() - t0, out


def set_channels_last(model: StainModel, on: bool) -> None:
    fmt = torch.channels_last if on else torch.contiguous_format
    for net in (model.teacher, model.student):
        if net is not None:
            net.to(memory_format=fmt)
    model.forget_networks()  # the device copies are made again from these (on a CPU always channels-last)


def run_config(model: StainModel, name: str, path: str, image: np.ndarray, config: Config, args,
               reference: np.ndarray | None) -> tuple[Row, np.ndarray | None]:
    row = Row(name, path, config)
    device = model._device
    out = None
    try:
        set_channels_last(model, config.channels_last)
        torch.backends.cudnn.benchmark = config.cudnn_benchmark
        if config.compile:
            torch._dynamo.reset()
            model.forget_networks()  # the device copies and their compiled twins
        warm = image if (device.type == "cuda" or config.compile) else image[: min(256, image.shape[0]),
                                                                             : min(256, image.shape[1])]
        log(f"{name} {path} [{config.label}]: warm-up on {warm.shape[0]}x{warm.shape[1]} ...")
        first, _ = stain_once(model, warm, [path], config, args.overlap)
        if config.compile:
            row.note = f"first call (compiles) {first:.1f} s"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        elif not reset_peak_rss():
            row.note = (row.note + "; " if row.note else "") + "peak RSS since process start (could not reset)"
        times, tiled = [], []
        while True:
            seconds, result = stain_once(model, image, [path], config, args.overlap)
            times.append(seconds)
            tiled.append(TILED_S[0])
            out = result[path]
            del result
            if len(times) >= args.repeats or sum(times) >= args.config_s:
                break
        row.seconds, row.calls = min(times), len(times)
        row.tiled_seconds = tiled[times.index(row.seconds)]
        row.peak_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
        if reference is not None:
            row.diff = float(np.abs(out - reference).max())
        log(f"    best {row.seconds:.3f} s of {row.calls} ({image.shape[0] * image.shape[1] / 1e6 / row.seconds:.3g} MP/s)")
    except Exception as err:  # one failing configuration must not lose the rest
        text = str(err).splitlines()[0][:200] if str(err) else ""
        row.note = f"failed: {type(err).__name__}: {text}"
        log(f"    {row.note}")
        out = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    finally:
        set_channels_last(model, False)
        torch.backends.cudnn.benchmark = False
        model.forget_networks()  # the device copies and their compiled twins
    return row, out


def time_enhancer(model: StainModel, image: np.ndarray, args) -> float:
    """Best time of the ``enhanced`` output alone (numpy on the host)."""
    times = []
    stain_once(model, image[:256, :256], ["enhanced"], Config("baseline"), args.overlap)
    while True:
        seconds, _ = stain_once(model, image, ["enhanced"], Config("baseline"), args.overlap)
        times.append(seconds)
        if len(times) >= args.repeats or sum(times) >= args.config_s:
            return min(times)


# -- report -------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    name = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {name} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()})"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def fmt_s(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 100 else f"{seconds:.1f} s"


def report(rows: list[Row], enhancer_s: dict[str, float], args, device: torch.device, source: str,
           idle_rss: int | None, skipped: list[str], whole: dict[str, str]) -> str:
    mp = args.side * args.side / 1e6
    lines = [
        f"## Staining throughput ({'GPU' if device.type == 'cuda' else 'CPU'})",
        "",
        f"- device: {device_name(device)}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.system()} {platform.machine()}",
        f"- input: {args.side} x {args.side} uint8 RGB mosaic ({mp:.1f} MP) of {source}; overlap {args.overlap}",
        f"- timing: warm-up call, then the best of up to {args.repeats} calls within {args.config_s:g} s per "
        f"configuration; budget {args.budget_s:g} s for the whole run",
    ]
    if device.type == "cpu" and idle_rss is not None:
        lines.append(f"- idle RSS (interpreter, torch, models, input) before timing: {fmt_bytes(idle_rss)}")
    if device.type == "cuda":
        lines.append(f"- cuDNN TF32 for fp32 convolutions: {torch.backends.cudnn.allow_tf32}; "
                     "cudnn.benchmark off except where a configuration says so")
    lines += [
        "",
        "| model | output | configuration | precision | batch | tile | s per image | of which tiled | MP/s | "
        f"vs baseline | peak {'GPU memory' if device.type == 'cuda' else 'RSS'} | 50k x 50k projected | "
        "max abs diff vs baseline | note |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        c = r.config
        mps = mp / r.seconds if r.seconds else None
        lines.append(
            f"| {r.model} | {r.path} | {c.label} | {c.precision}{' + compile' if c.compile else ''}"
            f"{' + channels_last' if c.channels_last else ''}{' + cudnn.benchmark' if c.cudnn_benchmark else ''} | {c.batch} | {c.tile} | "
            f"{'—' if r.seconds is None else f'{r.seconds:.3f}'} | "
            f"{'—' if r.tiled_seconds is None else f'{r.tiled_seconds:.3f}'} | {'—' if mps is None else f'{mps:.3g}'} | "
            f"{'—' if r.ratio is None else f'{r.ratio:.2f}x'} | {fmt_bytes(r.peak_bytes)} | "
            f"{'—' if mps is None else fmt_s(WHOLE_SLIDE_MP / mps)} | {'—' if r.diff is None else f'{r.diff:.2g}'} | "
            f"{r.note} |")
    lines += ["", "Whole model (enhanced + teacher + student, each output's fastest configuration above), "
              "projected for 50,000 x 50,000 (2500 MP):", ""]
    lines += ["| model | enhanced MP/s | best teacher | best student | all three MP/s | 50k x 50k projected |",
              "|---|---:|---|---|---:|---:|"]
    for name, text in whole.items():
        lines.append(text)
    lines += ["", "of which tiled: seconds inside `tiling.tiled_apply` (the network on tiles, copies to and from the "
              "device, blending); the rest is host work (value scaling, the enhancer, the student's input and norm "
              "statistics, output layout). MP/s: megapixels of input per second of the best call. vs baseline: baseline seconds / this "
              "row's seconds (same model and output, same run; > 1 is faster). Projected: 2500 MP / MP/s, "
              "assuming throughput stays linear in pixels. max abs diff: outputs are in [0, 1]."]
    for note in skipped:
        lines.append(f"\n{note}")
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, args.script, *args.argv])
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda (default auto)")
    parser.add_argument("--models", default="dsd-unpaired,dsd-unpaired-fast",
                        help="comma-separated shipped model names or model files")
    parser.add_argument("--paths", default=",".join(PATHS), help="teacher,student (default both)")
    parser.add_argument("--side", type=int, default=0,
                        help="image side in pixels (default 4096 on CUDA, 2048 on the CPU; --quick: 2048 / 1024)")
    parser.add_argument("--quick", action="store_true", help="fewer configurations and a smaller default side")
    parser.add_argument("--overlap", type=int, default=128, help="tile overlap (default 128, as StainModel.stain)")
    parser.add_argument("--repeats", type=int, default=3, help="at most this many timed calls per configuration")
    parser.add_argument("--config-s", type=float, default=0.0,
                        help="stop repeating once a configuration's timed calls used this many seconds "
                             "(default 5 on CUDA, 1 on the CPU: one call)")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="skip configurations that would start after this many seconds "
                             "(default 200 on CUDA, 600 on the CPU, 240 with --quick on the CPU)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="DSD data root, for real dark-field tiles")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the markdown report to this file")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.script = sys.argv[0] if argv is None else SCRIPT_NAME

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if not args.side:
        args.side = (2048 if args.quick else 4096) if cuda else (1024 if args.quick else 2048)
    if not args.config_s:
        args.config_s = 5.0 if cuda else 1.0
    if not args.budget_s:
        args.budget_s = 200.0 if cuda else (240.0 if args.quick else 600.0)
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):  # record/frozen norm, tile and batch shapes
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, 64)

    names = [m.strip() for m in args.models.split(",") if m.strip()]
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    configs = configs_for(device, args.quick)
    tiles, source = dark_tiles(args.data.expanduser())
    image = mosaic(tiles, args.side, args.seed)
    log(f"device {device_name(device)}; image {image.shape}; models {names}; shipped {available_models()}")
    mp = args.side * args.side / 1e6

    models = {name: StainModel.load(name, device=device) for name in names}
    reset_peak_rss()
    idle_rss = peak_rss_bytes() if not cuda else None
    rows: list[Row] = []
    skipped: list[str] = []
    enhancer_s = {name: time_enhancer(model, image, args) for name, model in models.items()}
    for name, seconds in enhancer_s.items():
        log(f"{name} enhanced: {seconds:.3f} s ({mp / seconds:.3g} MP/s)")

    # baselines and the --quick configurations of every model first, the rest while the budget lasts
    order = sorted(configs, key=lambda c: (not c.quick,))
    references: dict[tuple[str, str], np.ndarray] = {}
    for config in order:
        for name, model in models.items():
            for path in paths:
                if getattr(model, path) is None:
                    continue
                left = args.budget_s - (time.perf_counter() - T0)
                if left <= 0 or (config.compile and left < COMPILE_RESERVE_S):
                    skipped.append(f"skipped {name} {path} [{config.label}]: --budget-s {args.budget_s:g} "
                                   f"{'used' if left <= 0 else f'leaves {left:.0f} s, too little to compile'}")
                    log(skipped[-1])
                    continue
                row, out = run_config(model, name, path, image, config, args, references.get((name, path)))
                rows.append(row)
                if config.is_baseline and out is not None:
                    references[(name, path)] = out
    rows.sort(key=lambda r: (names.index(r.model), paths.index(r.path), configs.index(r.config)))
    base = {(r.model, r.path): r.seconds for r in rows if r.config.is_baseline and r.seconds}
    for r in rows:
        if r.seconds and (r.model, r.path) in base:
            r.ratio = base[(r.model, r.path)] / r.seconds

    whole: dict[str, str] = {}
    for name in names:
        best: dict[str, Row] = {}
        for r in rows:
            if r.model == name and r.seconds and (r.path not in best or r.seconds < best[r.path].seconds):
                best[r.path] = r
        if not all(p in best for p in paths if getattr(models[name], p) is not None):
            continue
        total = enhancer_s[name] + sum(r.seconds for r in best.values())
        cells = [f"{best[p].config.label} ({mp / best[p].seconds:.3g} MP/s)" if p in best else "—" for p in PATHS]
        whole[name] = (f"| {name} | {mp / enhancer_s[name]:.3g} | {cells[0]} | {cells[1]} | {mp / total:.3g} | "
                       f"{fmt_s(WHOLE_SLIDE_MP * total / mp)} |")

    text = report(rows, enhancer_s, args, device, source, idle_rss, skipped, whole)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
