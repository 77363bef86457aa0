"""Peak memory of whole-slide staining (``digital_stain.slide.run.stain_to_zarr``) against slide size.

For each side in ``--sizes`` (default 2048, 8192, 16384 px):

1. a dark-field slide of that side is generated lazily, written chunk by
   chunk (1024 px, so it is never in memory whole) to an OME-Zarr store in a
   temporary folder: a mosaic of the shipped 256-px sample tiles
   (``src/digital_stain/data/darkfield_*.png``), each placed in one of its 8
   flips and turns, chosen by a seeded random generator, so no two chunks
   are alike;
2. a fresh Python process opens that store with ``open_source``, loads the
   model (default ``dsd-unpaired-fast``) on the CPU and stains it with
   ``stain_to_zarr(outputs=--outputs, chunk=--chunk)`` into a second store,
   pyramid included; it reports its peak resident memory
   (``getrusage(RUSAGE_SELF).ru_maxrss``: the true peak, not a sample), its
   resident memory once torch and the model are loaded (the baseline), the
   seconds and the number of chunks;
3. the temporary stores are deleted (``--keep`` keeps them).

The last lines give the ratio of the largest to the smallest slide's peak
(the target is at most 1.5x: memory must not grow with the slide) and the
whole run's time. Run it with one thread per process, as the numbers in the
docs were made:

    OMP_NUM_THREADS=1 python benchmarks/slide_memory.py [--sizes 2048 8192 16384] [--chunk 1024]
        [--outputs student] [--model dsd-unpaired-fast] [--workdir DIR] [--keep]

The table goes to stdout (markdown), progress to stderr. The generated inputs
and outputs need about 1.5 GB of disk at 16384 px.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from digital_stain import hostmem

hostmem.own_process()  # as the CLI does: before torch allocates (docs/benchmarks.md, host memory)

import numpy as np

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "digital_stain" / "data"
TILE = 256


def command_line(argv=None) -> str:
    """The command that made a report, as it was run (for the report's last line)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return f"python {' '.join([Path(sys.argv[0]).as_posix()] + args)}"


def emit(lines: list[str], out: Path | None) -> None:
    """Print a report (markdown lines) and write it to ``out`` when given."""
    text = "\n".join(lines)
    print(text)
    if out is not None:
        out.write_text(text)


def rss_mb() -> float:
    """Current resident memory of this process in MiB (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def peak_mb() -> float:
    """Peak resident memory of this process so far, MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def make_slide(path: Path, side: int, chunk: int = 1024, seed: int = 0) -> None:
    """Write a ``side``-px dark-field mosaic as OME-Zarr (NGFF 0.4, c/y/x, uint8), one chunk at a time."""
    import zarr
    from PIL import Image

    tiles = []
    for sample in sorted(SAMPLES.glob("darkfield_*.png")):
        with Image.open(sample) as im:
            tile = np.asarray(im.convert("RGB"))
        for turn in range(4):
            tiles += [np.rot90(tile, turn), np.rot90(tile[::-1], turn)]
    rng = np.random.default_rng(seed)
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    array = group.create_array("0", shape=(3, side, side), chunks=(3, chunk, chunk), dtype="uint8",
                               chunk_key_encoding={"name": "v2", "separator": "/"})
    per_chunk = -(-chunk // TILE)  # tiles per chunk side, the last one cut
    for y in range(0, side, chunk):
        for x in range(0, side, chunk):
            h, w = min(chunk, side - y), min(chunk, side - x)
            picks = rng.integers(0, len(tiles), (per_chunk, per_chunk))
            block = np.concatenate([np.concatenate([tiles[k] for k in row], axis=1) for row in picks], axis=0)
            array[:, y : y + h, x : x + w] = block[:h, :w].transpose(2, 0, 1)
    group.attrs["multiscales"] = [{
        "version": "0.4", "name": "darkfield",
        "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}],
    }]


def child(args) -> None:
    """The measured process: load, stain, report JSON on stdout."""
    import torch

    from digital_stain import StainModel
    from digital_stain.slide.run import open_source, stain_to_zarr

    model = StainModel.load(args.model, device="cpu")
    source = open_source(args.input, chunk=args.chunk)
    baseline = rss_mb()
    started = time.perf_counter()
    result = stain_to_zarr(model, source, args.output, args.outputs.split(","), chunk=args.chunk, device="cpu")
    seconds = time.perf_counter() - started
    assert result.complete, result
    print(json.dumps({"peak_mb": peak_mb(), "baseline_mb": baseline, "seconds": seconds,
                      "units": result.units_total, "levels": len(result.levels), "threads": torch.get_num_threads(),
                      "shape": list(source.array.shape)}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--outputs", default="student", help="comma-separated outputs to write (default student)")
    parser.add_argument("--model", default="dsd-unpaired-fast")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temporary stores go (default: tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the generated stores")
    parser.add_argument("--child", nargs=2, metavar=("INPUT", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.input, args.output = args.child
        child(args)
        return 0

    begun = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="slide-memory-", dir=args.workdir))
    rows = []
    try:
        for side in args.sizes:
            source, output = workdir / f"darkfield-{side}.ome.zarr", workdir / f"stained-{side}.ome.zarr"
            t0 = time.perf_counter()
            make_slide(source, side)
            print(f"{side} px: input written in {time.perf_counter() - t0:.0f} s; staining in a fresh process...",
                  file=sys.stderr, flush=True)
            command = [sys.executable, __file__, "--child", str(source), str(output), "--chunk", str(args.chunk),
                       "--outputs", args.outputs, "--model", args.model]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return 1
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append((side, row))
            print(f"{side} px: peak {row['peak_mb']:.0f} MiB, {row['seconds']:.0f} s", file=sys.stderr, flush=True)
            if not args.keep:
                shutil.rmtree(source)
                shutil.rmtree(output)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    total = time.perf_counter() - begun

    print(f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/slide_memory.py "
          f"--sizes {' '.join(map(str, args.sizes))} --chunk {args.chunk} --outputs {args.outputs} "
          f"--model {args.model}`\n")
    print("| slide (px) | megapixels | chunks (all levels) | peak RSS (MiB) | RSS after loading (MiB) | "
          "peak - loaded (MiB) | staining s | s per level-0 MP |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for side, row in rows:
        mp = side * side / 1e6
        print(f"| {side} x {side} | {mp:.1f} | {row['units']} | {row['peak_mb']:.0f} | {row['baseline_mb']:.0f} | "
              f"{row['peak_mb'] - row['baseline_mb']:.0f} | {row['seconds']:.0f} | {row['seconds'] / mp:.2f} |")
    smallest, largest = rows[0][1]["peak_mb"], rows[-1][1]["peak_mb"]
    ratio = largest / smallest
    print(f"\npeak RSS ratio, {rows[-1][0]} px / {rows[0][0]} px: {ratio:.2f}x "
          f"(target <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'}); torch threads {rows[0][1]['threads']}; "
          f"whole run {total / 60:.1f} min")
    return 0 if ratio <= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
