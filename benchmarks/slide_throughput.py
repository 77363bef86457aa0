"""Whole-slide throughput: ``stain_to_zarr`` end to end (read, stain, write, pyramid), and 50,000² projected.

`throughput.py` times ``StainModel.stain`` on one image in memory. A slide is different: its
statistics pass is made once, and each 1024-px unit is read from a store, stained with 128 px
borrowed from its neighbours, rounded to uint8, compressed and written, then the pyramid is built.
This script stains a generated ``--side`` x ``--side`` OME-Zarr slide (a mosaic of the shipped
dark-field samples, written chunk by chunk, ``slide_memory.make_slide``) into a store, once per
``--chunk`` value (the unit's side; each unit borrows ``--overlap`` px on every side, so larger
units compute fewer pixels twice), ``--threads`` value (units worked on at once in the process) and
``--compile`` setting; the first combination is the baseline, measured in the same run, after an
untimed warm-up on a 2048² slide.

From the times at which level-0 units finish (``slide.process_chunk`` is wrapped to note them:
with several threads, pyramid units are built in between) it reports:

* ``first unit``: from the call to the first finished level-0 unit (model on the device, the
  statistics pass, one unit);
* ``level 0 MP/s``: level-0 megapixels per second between the first and the last level-0 unit;
* ``pyramid s``: what is left after the last level-0 unit (the pyramid units not built meanwhile);
* the projection for 50,000 x 50,000 (2500 MP): first unit + 2500 MP at the level-0 rate + the
  pyramid scaled by area. The statistics pass does not grow with the slide, so it is counted once.

    PYTHONPATH=src python3 benchmarks/slide_throughput.py --device cuda --side 8192 --threads 1,4,8 --compile both
    python benchmarks/slide_throughput.py --device cpu --side 8192 --model dsd-unpaired-fast --threads 1 --chunk 1024,2048
    OMP_NUM_THREADS=1 python benchmarks/slide_throughput.py --device cpu --side 2048 --model dsd-unpaired-fast

The table goes to stdout (markdown) and ``--out``; progress to stderr.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from digital_stain import hostmem

hostmem.own_process()  # as the CLI does: before torch allocates (docs/benchmarks.md, host memory)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slide_memory import command_line, emit, make_slide  # noqa: E402

TARGET_MP = 50_000 * 50_000 / 1e6


def _log(message: str) -> None:
    print(f"[slide-throughput] {message}", file=sys.stderr, flush=True)


def run_once(model, slide: Path, out: Path, args, threads: int, compile: bool = False, chunk: int = 1024) -> dict:
    """Stain ``slide`` into ``out``; return the timings of its level-0 units."""
    import digital_stain.slide.run as slide_module

    stamps: list[float] = []
    lock = threading.Lock()
    real = slide_module.process_chunk

    def timed(*args, **kwargs):  # level-0 units only: pyramid units are SlideStore.build_level_unit
        real(*args, **kwargs)
        with lock:
            stamps.append(time.perf_counter())

    if args.device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    slide_module.process_chunk = timed
    try:
        start = time.perf_counter()
        result = slide_module.stain_to_zarr(model, slide, out, args.outputs.split(","), chunk=chunk,
                                            overlap=args.overlap, device=None, precision=args.precision,
                                            threads=threads, compile=compile)
        end = time.perf_counter()
    finally:
        slide_module.process_chunk = real
    assert result.complete, result
    level0 = len(result_units(result, chunk)[0])
    assert len(stamps) == level0, (len(stamps), level0)
    side = result.levels[0][0]
    first, last0 = stamps[0], stamps[-1]
    level0_mp = side * result.levels[0][1] / 1e6
    per_unit_mp = level0_mp / level0
    # between the first and the last unit; a one-unit slide (only the warm-up) counts from the call
    rate = (level0 - 1) * per_unit_mp / max(last0 - first, 1e-9) if level0 > 1 else per_unit_mp / (last0 - start)
    pyramid = end - last0
    row = {"chunk": chunk, "threads": threads, "compile": compile, "first": first - start, "rate": rate, "pyramid": pyramid,
           "total": end - start, "units": result.units_total, "mp": level0_mp}
    row["projected"] = row["first"] + TARGET_MP / rate + pyramid * TARGET_MP / level0_mp
    if args.device == "cuda":
        import torch

        row["gpu_peak"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def computed(chunk: int, overlap: int) -> float:
    """Network pixels per stored pixel of an inner unit: it borrows ``overlap`` px on every side."""
    return ((chunk + 2 * overlap) / chunk) ** 2


def result_units(result, chunk: int) -> list[list]:
    """Level-0 unit keys of a finished run's grid (rows x columns of ``chunk``-px units)."""
    height, width = result.levels[0]
    rows, cols = -(-height // chunk), -(-width // chunk)
    return [[(r, c) for r in range(rows) for c in range(cols)]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="dsd-unpaired")
    parser.add_argument("--outputs", default="student", help="comma-separated (default student: the paper's output)")
    parser.add_argument("--side", type=int, default=None, help="slide side in px (default 8192 on CUDA, 2048 else)")
    parser.add_argument("--chunk", default="1024",
                        help="comma-separated unit (and stored chunk) sides; the first is the baseline")
    parser.add_argument("--overlap", type=int, default=128)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--threads", default="1,4", help="comma-separated; the first is the baseline")
    parser.add_argument("--compile", choices=("off", "on", "both"), default="off",
                        help="torch.compile the networks; both: each --threads value eager, then compiled")
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from digital_stain.core.devices import resolve_device
    from digital_stain.stain.model import StainModel

    device = resolve_device(args.device)
    args.device = device.type
    side = args.side or (8192 if device.type == "cuda" else 2048)
    threads = [int(t) for t in args.threads.split(",")]
    chunks = [int(c) for c in args.chunk.split(",")]
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    model = StainModel.load(args.model, device=device)
    work = Path(tempfile.mkdtemp(prefix="slide-throughput-", dir=args.workdir))
    rows = []
    try:
        if not args.no_warmup:
            warm = work / "warm.ome.zarr"
            make_slide(warm, min(side, 2048), chunk=chunks[0])
            run_once(model, warm, work / "warm-out.ome.zarr", args, threads[-1], chunk=chunks[0])
            _log("warm-up done")
        for chunk in chunks:  # the slide is stored in the chunks it is stained in, as a scanner's export would be
            slide = work / f"slide-{chunk}.ome.zarr"
            t0 = time.perf_counter()
            make_slide(slide, side, chunk=chunk)
            _log(f"wrote a {side}x{side} slide in chunks of {chunk} in {time.perf_counter() - t0:.1f} s")
            for n in threads:
                for compile in compiles:  # a compiled run's first unit includes its compile
                    out = work / f"out-{chunk}-{n}-{compile}.ome.zarr"
                    row = run_once(model, slide, out, args, n, compile, chunk)
                    rows.append(row)
                    _log(f"chunk {chunk}, threads {n}, compile {compile}: {row}")
                    shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(slide, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'x86_64'})"
    lines = [
        f"## Whole-slide throughput ({device.type})", "",
        f"- device: {name}; torch {torch.__version__}, Python {platform.python_version()}",
        f"- model `{args.model}`, outputs {args.outputs}, precision {args.precision}; slide {side} x {side} "
        f"({rows[0]['mp']:.1f} MP) of the shipped samples, overlap {args.overlap}",
        "",
        "| chunk | inner unit computes | units | threads | compile | first unit (statistics + 1 unit) | level 0 MP/s | vs baseline | pyramid | total | "
        + ("peak GPU memory | " if device.type == "cuda" else "") + "50k x 50k projected |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|" + ("---:|" if device.type == "cuda" else "") + "---:|",
    ]
    for row in rows:
        gpu = f" {row['gpu_peak']:.2f} GiB |" if device.type == "cuda" else ""
        lines.append(f"| {row['chunk']} | {computed(row['chunk'], args.overlap):.2f}x | {row['units']} | {row['threads']} | {'yes' if row['compile'] else 'no'} | {row['first']:.2f} s | {row['rate']:.3g} | "
                     f"{row['rate'] / rows[0]['rate']:.2f}x | {row['pyramid']:.2f} s | {row['total']:.1f} s |{gpu} "
                     f"{row['projected']:.0f} s |")
    lines += ["", "Inner unit computes: network pixels per stored pixel of a unit with neighbours on all four "
              "sides, ((chunk + 2 overlap) / chunk)^2; nearly every unit of a large slide is one.",
              "", "Projected: first unit + 2500 MP at the level-0 rate + the pyramid scaled by area. A compiled "
              "run compiles at its first inner unit (inside the level-0 time) and runs its edge units eagerly, "
              "so a small slide understates what compiling gains on a large one.", "",
              f"Command: `{command_line()}`", ""]
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
