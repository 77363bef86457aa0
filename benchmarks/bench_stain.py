"""Staining speed on this machine's CPU: megapixels per second through ``StainModel.stain``.

For square images of each size in ``--sizes``, and in the same run, times

* ``fp32 eager``            (the baseline every ratio refers to),
* ``bf16 autocast``         (``precision="bf16"``),
* ``compile fp32``          (``StainModel.stain(compile=True)``: the library's torch.compile path),
* ``compile + bf16``        (both),

for

(a) the teacher path of a shipped model (``StainModel.load(--model)``; if none
    is shipped, ``--model-file PATH``; otherwise the path is skipped with a
    message, unless ``--random-teacher`` asks for a default-size
    ``ColorizationUNet`` with random weights, speed only), and
(b) ``model-student``: the trained student of that model (when it has one), and
(c) ``student``: a paper-size student network ``ResnetGenerator(4, 3, 64, 9)``
    with random weights, labelled as such: its *speed* is that of a
    paper-size student (what a GPU-trained model would run), its output is
    meaningless.

Every call goes through ``StainModel.stain(image, outputs=[...], precision=...,
tile=..., overlap=...)``, so the enhancer, the instance-norm statistics pass
(student), the tiling and the blending are all included.

Timing: the best of N calls (N=3 for sides < 4096, 1 for 4096 and larger;
``--repeats`` overrides). For torch.compile, dynamo is reset, the network is
compiled afresh (``dynamic=False`` unless ``--compile-dynamic``), and the first call of that size (which compiles, including
the recompiles the norm-statistics pass and the tile shapes cause) is timed
separately and excluded; ``compile s`` is that first call minus the best
timed call (the norm statistics are recorded on the eager module, so only the
tile shape is compiled). If dynamo compiled anything during the timed calls the row is
flagged. The last column is the largest absolute difference of the output
([0, 1]) from the fp32-eager output of the same run.

Slow configurations are bounded: repeats stop once a configuration's timed
calls have used ``--repeat-budget-s`` (default 600 s; the ``calls`` column
says how many were made), and a configuration whose call is predicted from
the previous size (same path and configuration, scaled by pixels) to take
longer than ``--max-call-s`` (default 1800 s) is skipped with a note. Set
either to 0 to disable. This matters on CPUs without native bf16 (AVX2
only): there bf16 convolutions run on ``aten::_slow_conv2d_forward`` instead
of oneDNN, and bf16 autocast is many times slower than fp32.

Progress goes to stderr; the markdown table to stdout.

Examples (from the repository root)::

    python benchmarks/bench_stain.py --quick
    python benchmarks/bench_stain.py                      # 256, 1024, 4096 (long: minutes to hours on 2 cores)
    python benchmarks/bench_stain.py --sizes 256 --repeats 1 --paths student
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from digital_stain import hostmem

hostmem.own_process()  # as the CLI does: before torch allocates (docs/benchmarks.md, host memory)

import numpy as np
import torch

from digital_stain.core.arrays import InputError
from digital_stain.core.devices import cpu_has_fast_bf16
from digital_stain.core.enhance import BINS, Enhancer
from digital_stain.stain.model import StainModel, available_models
from digital_stain.core.nets import ColorizationUNet, ResnetGenerator

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "dsd"
STUDENT_LABEL = "paper-size generator, random weights (speed only)"
CONFIGS = {  # name -> (precision, compile)
    "fp32": ("fp32", False),
    "bf16": ("bf16", False),
    "compile": ("fp32", True),
    "compile+bf16": ("bf16", True),
}
CONFIG_LABELS = {
    "fp32": "fp32 eager",
    "bf16": "bf16 autocast",
    "compile": "compile fp32",
    "compile+bf16": "compile + bf16 autocast",
}


def log(msg: str) -> None:
    print(f"[bench_stain {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- machine ------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    wanted = [f for f in flags if f.startswith(("avx", "amx", "fma"))]
                    return " ".join(sorted(wanted)) or "none of avx/amx/fma"
    except OSError:
        pass
    return "unknown"


def machine_info() -> list[str]:
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return [
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical CPUs visible; flags: {cpu_flags()})",
        f"- torch {torch.__version__}, CPU capability {capability}, "
        f"fast bf16 (AMX/AVX512-BF16): {cpu_has_fast_bf16()}, mkldnn: {torch.backends.mkldnn.is_available()}",
        f"- threads: torch.get_num_threads() = {torch.get_num_threads()}, interop = {torch.get_num_interop_threads()}",
        f"- Python {platform.python_version()}, {platform.system()} {platform.machine()}; "
        f"load average at start: {load}",
    ]


# -- inputs and models --------------------------------------------------------
def make_image(size: int, data: Path, seed: int) -> tuple[np.ndarray, str]:
    """A size x size uint8 RGB dark-field: a real DSD tile repeated if available, else noise."""
    folder = data / "DSD_U" / "val" / "darkfield"
    try:
        from digital_stain.io.images import list_images, read_image

        tile = np.asarray(read_image(list_images(folder)[0]))[..., :3]
        reps = (-(-size // tile.shape[0]), -(-size // tile.shape[1]), 1)
        return np.ascontiguousarray(np.tile(tile, reps)[:size, :size]), f"DSD_U val dark-field tile repeated ({folder})"
    except (InputError, IndexError, OSError):
        rng = np.random.default_rng(seed)
        return rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "uniform random uint8 RGB"


def load_teacher_model(args) -> tuple[StainModel | None, str]:
    """The model for the teacher path, and a label; (None, reason) to skip."""
    try:
        model = StainModel.load(args.model)
        return model, f"teacher of {args.model!r}"
    except InputError as err:
        first = str(err)
    if args.model_file:
        try:
            model = StainModel.load(args.model_file)
            return model, f"teacher of {args.model_file}"
        except InputError as err:
            return None, f"--model-file {args.model_file} cannot be loaded: {err}"
    if args.random_teacher:
        model = StainModel(uniform_enhancer(), teacher=ColorizationUNet())
        return model, f"teacher: ColorizationUNet{tuple(model.teacher.config.values())}, random weights (speed only)"
    shipped = ", ".join(available_models()) or "none"
    return None, (f"teacher path skipped: cannot load model {args.model!r} ({first}). Shipped models: {shipped}. "
                  "Give a model file with --model-file PATH, or --random-teacher to time an untrained teacher.")


def uniform_enhancer() -> Enhancer:
    counts = np.ones(BINS, dtype=np.int64)
    return Enhancer(counts, counts)


# -- timing -------------------------------------------------------------------
def compile_counter() -> int:
    """How many graphs dynamo has compiled so far (to detect recompiles while timing)."""
    from torch._dynamo.utils import counters

    return int(sum(counters["stats"].values())) + int(counters["frames"].get("ok", 0))


def one_call(model: StainModel, output: str, image: np.ndarray, precision: str, args, progress: bool,
             use_compile: bool = False):
    report = None
    if progress:
        last = [-1]

        def report(done, total):
            pct = int(100 * done / total)
            if pct // 10 != last[0] // 10:
                last[0] = pct
                log(f"    {pct}%")

    t0 = time.perf_counter()
    out = model.stain(image, outputs=[output], precision=precision, tile=args.tile, overlap=args.overlap,
                      compile=use_compile, progress=report)[output]
    return time.perf_counter() - t0, out


def bench_path(path_label: str, model: StainModel, output: str, args, sizes, data: Path, rows: list) -> None:
    attr = output  # the StainModel attribute holding the network: "teacher" or "student"
    net = getattr(model, attr)
    per_mp: dict[str, float] = {}  # config -> seconds per megapixel at the largest size measured so far
    for size in sizes:
        image, _ = make_image(size, data, args.seed)
        mp = size * size / 1e6
        repeats = args.repeats or (3 if size < 4096 else 1)
        baseline_s = None
        reference = None
        for config in args.configs:
            precision, use_compile = CONFIGS[config]
            row = {"path": path_label, "size": size, "config": CONFIG_LABELS[config], "seconds": None,
                   "mps": None, "ratio": None, "calls": 0, "first": None, "compile": None, "diff": None, "note": ""}
            rows.append(row)
            if args.max_call_s and config in per_mp:
                predicted = per_mp[config] * mp * (2 if use_compile else 1)
                if predicted > args.max_call_s:
                    row["note"] = f"skipped: predicted {predicted:.0f} s > --max-call-s {args.max_call_s:g}"
                    log(f"{path_label} {size}^2 {config}: {row['note']}")
                    continue
            big = size >= 2048
            try:
                if use_compile:  # the library's own compiled path (StainModel.stain(compile=True))
                    torch._dynamo.reset()
                    model.forget_networks()  # the device copies and their compiled twins
                    if args.compile_dynamic:
                        nets = model.networks()
                        nets._compiled[attr] = torch.compile(nets.network(attr), dynamic=None)
                    log(f"{path_label} {size}^2 {config}: first call (compiles) ...")
                    first, _ = one_call(model, output, image, precision, args, big, use_compile)
                    row["first"] = first
                    log(f"    first call {first:.2f} s")
                before = compile_counter() if use_compile else 0
                times, out = [], None
                for i in range(repeats):
                    log(f"{path_label} {size}^2 {config}: call {i + 1}/{repeats} ...")
                    seconds, out = one_call(model, output, image, precision, args, big, use_compile)
                    times.append(seconds)
                    log(f"    {seconds:.2f} s")
                    if args.repeat_budget_s and sum(times) >= args.repeat_budget_s and i + 1 < repeats:
                        log(f"    stopping after {i + 1} calls: --repeat-budget-s {args.repeat_budget_s:g} used")
                        break
                row["calls"] = len(times)
                if use_compile and compile_counter() != before:
                    row["note"] = "dynamo compiled during the timed calls (time includes compiling)"
            except Exception as err:  # report and go on: one failing configuration must not lose the rest
                row["note"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
                log(f"{path_label} {size}^2 {config}: {row['note']}")
                continue
            finally:
                model.forget_networks()  # the device copies and their compiled twins
            best = min(times)
            row["seconds"], row["mps"] = best, mp / best
            per_mp[config] = best / mp
            if row["first"] is not None:
                row["compile"] = max(row["first"] - best, 0.0)
            if config == "fp32":
                baseline_s, reference = best, out
            elif reference is not None:
                row["diff"] = float(np.abs(out - reference).max())
            del out
        for row in rows:
            if row["path"] == path_label and row["size"] == size and row["seconds"] and baseline_s:
                row["ratio"] = baseline_s / row["seconds"]
        if "fp32" not in args.configs:
            log("fp32 eager not among --configs: no ratios for this size")


def fmt(value, spec: str, missing: str = "—") -> str:
    return missing if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--sizes", default="256,1024,4096", help="comma-separated image sides (default 256,1024,4096)")
    parser.add_argument("--quick", action="store_true", help="sizes 256,1024 (overrides --sizes)")
    parser.add_argument("--model", default="dsd-unpaired", help="shipped model name or model path (default dsd-unpaired)")
    parser.add_argument("--model-file", help="model file for the teacher path if --model is not shipped")
    parser.add_argument("--random-teacher", action="store_true",
                        help="if no model can be loaded, time a default ColorizationUNet with random weights")
    parser.add_argument("--paths", default="teacher,model-student,student",
                        help="which paths: teacher (of --model), model-student (its trained student), "
                             "student (paper-size, random weights); default all three")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated subset of {','.join(CONFIGS)} (default all; fp32 is the ratio baseline)")
    parser.add_argument("--repeats", type=int, default=0, help="timed calls per configuration (default 3, 1 for sides >= 4096)")
    parser.add_argument("--tile", type=int, default=512, help="tile side (default 512, as StainModel.stain)")
    parser.add_argument("--overlap", type=int, default=128, help="tile overlap (default 128, as StainModel.stain)")
    parser.add_argument("--compile-dynamic", action="store_true",
                        help="torch.compile(dynamic=None) (torch's automatic dynamic shapes) instead of the default "
                             "dynamic=False (static shapes: one graph per tile/statistics shape)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--max-call-s", type=float, default=1800.0,
                        help="skip a configuration whose call is predicted (from the previous size) to take longer "
                             "than this many seconds; 0 = never skip (default 1800)")
    parser.add_argument("--repeat-budget-s", type=float, default=600.0,
                        help="stop repeating a configuration once its timed calls have used this many seconds "
                             "(the table says how many calls were made); 0 = always --repeats (default 600)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="DSD data root, for a realistic input tile")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    sizes = [256, 1024] if args.quick else [int(s) for s in args.sizes.split(",") if s.strip()]
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown --configs {unknown}; choose from {list(CONFIGS)}")
    args.configs.sort(key=list(CONFIGS).index)  # fp32 first: it is the baseline
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import torch._dynamo.config as dynamo_config

    # record/frozen norm modes, tile and stats shapes and autocast states each need a graph
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, 64)

    data = args.data.expanduser().resolve()
    _, image_source = make_image(8, data, args.seed)
    info = machine_info()
    for line in info:
        log(line[2:])

    rows: list[dict] = []
    notes: list[str] = []
    teacher_model = None
    if "teacher" in paths:
        teacher_model, label = load_teacher_model(args)
        if teacher_model is None:
            log(label)
            notes.append(label)
        elif teacher_model.teacher is None:
            notes.append(f"teacher path skipped: {label} has no teacher.")
            log(notes[-1])
        else:
            bench_path(label, teacher_model, "teacher", args, sizes, data, rows)
    if "model-student" in paths:
        if teacher_model is None:
            teacher_model, label = load_teacher_model(args)
        if teacher_model is None or teacher_model.student is None:
            notes.append(f"model-student path skipped: {args.model!r} has no trained student.")
            log(notes[-1])
        else:
            params = sum(p.numel() for p in teacher_model.student.parameters()) / 1e6
            config = teacher_model.student.config
            bench_path(f"student of {teacher_model.name!r} (width {config['width']}, {config['n_blocks']} blocks, "
                       f"{params:.1f} M params)", teacher_model, "student", args, sizes, data, rows)
    if "student" in paths:
        enhancer = teacher_model.enhancer if teacher_model is not None else uniform_enhancer()
        student = StainModel(enhancer, student=ResnetGenerator(4, 3, 64, 9))
        params = sum(p.numel() for p in student.student.parameters()) / 1e6
        bench_path(f"student: {STUDENT_LABEL}, {params:.1f} M params", student, "student", args, sizes, data, rows)

    print("## Staining speed (CPU)")
    print()
    print("\n".join(info))
    print(f"- input: {image_source}; tile {args.tile}, overlap {args.overlap}; "
          f"torch.compile(dynamic={None if args.compile_dynamic else False}); "
          f"best of {args.repeats or '3 (1 for sides >= 4096)'} calls, fewer past --repeat-budget-s {args.repeat_budget_s:g}")
    print()
    print("| path | size | precision/compile | seconds | MP/s | vs fp32 eager | calls | first call s | compile s | max abs diff vs fp32 | note |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['path']} | {r['size']}² | {r['config']} | {fmt(r['seconds'], '.2f')} | {fmt(r['mps'], '.3g')} | "
              f"{fmt(r['ratio'], '.2f', '—')}{'x' if r['ratio'] else ''} | {r['calls'] or '—'} | {fmt(r['first'], '.1f')} | "
              f"{fmt(r['compile'], '.1f')} | {fmt(r['diff'], '.2g')} | {r['note']} |")
    print()
    print("vs fp32 eager: fp32-eager seconds / this row's seconds, same path and size, same run (>1 = faster). "
          "seconds: best of `calls` timed calls. compile s: first call minus best timed call. max abs diff: on the [0, 1] output.")
    for note in notes:
        print(f"\n{note}")
    print()
    print("Command: `" + " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]) + "`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
