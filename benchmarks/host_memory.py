"""What huge pages for PyTorch's large CPU blocks (``digital_stain.hostmem``) do on the CPU.

Each ``--settings`` value of ``THP_MEM_ALLOC_ENABLE`` (``0``: PyTorch's default, the baseline,
measured in the same run; ``1``: what ``import digital_stain`` asks for) runs every workload in a
fresh Python process with the variable set, because PyTorch reads it once per process. Workloads, on the CPU:

* ``unit``: the student network alone, eager, on one whole-slide unit's input (``--unit`` px,
  default 1280 = 1024 + 2 x 128), the mean of ``--repeats`` forward passes after one untimed;
* ``stain``: ``StainModel.stain`` (the CLI's and the napari widget's path: tiles of 512 px) on a
  ``--side``-px mosaic of the shipped dark-field tiles, ``--outputs``, after one untimed run;
* ``slide``: ``stain_to_zarr`` of a generated ``--slide``-px OME-Zarr slide (1024-px units, with
  the pyramid), one run.

For each it reports seconds, the speed against the baseline, the process's peak resident memory
(``ru_maxrss``) and its resident memory at the end.

    python benchmarks/host_memory.py [--settings 0,1] [--workloads unit,stain,slide]
        [--model dsd-unpaired-fast] [--threads N]

The table goes to stdout (markdown) and ``--out``; progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slide_memory import SAMPLES, command_line, emit, make_slide, peak_mb, rss_mb  # noqa: E402

WORKLOADS = ("unit", "stain", "slide")


def _log(message: str) -> None:
    print(f"[host-memory] {message}", file=sys.stderr, flush=True)


def mosaic(side: int):
    """A ``side``-px RGB uint8 mosaic of the shipped dark-field tiles (flipped and turned copies)."""
    import numpy as np
    from PIL import Image

    tiles = []
    for path in sorted(SAMPLES.glob("darkfield_*.png")):
        with Image.open(path) as im:
            tile = np.asarray(im.convert("RGB"))
        tiles += [np.rot90(tile, turn) for turn in range(4)]
    n = -(-side // tile.shape[0])
    rows = [np.concatenate([tiles[(r * n + c) % len(tiles)] for c in range(n)], axis=1) for r in range(n)]
    return np.ascontiguousarray(np.concatenate(rows)[:side, :side])


def child(args) -> dict:
    """One workload in this (fresh) process; the setting comes from the environment, as in any process."""
    import torch

    from digital_stain.stain.model import StainModel
    from digital_stain.core.nets import record_statistics

    model = StainModel.load(args.model, device="cpu")
    if args.child == "unit":
        net = model.student
        channels = next(net.parameters()).shape[1]
        generator = torch.Generator().manual_seed(0)
        inputs = torch.rand(1, channels, args.unit, args.unit, generator=generator) * 2 - 1
        with torch.inference_mode():
            statistics = record_statistics(net, inputs[..., :512, :512])
            net(inputs, statistics)
            start = time.perf_counter()
            for _ in range(args.repeats):
                net(inputs, statistics)
            seconds = (time.perf_counter() - start) / args.repeats
        pixels = args.unit**2
    elif args.child == "stain":
        image = mosaic(args.side)
        outputs = args.outputs.split(",")
        model.stain(image[:512, :512], outputs)
        start = time.perf_counter()
        model.stain(image, outputs)
        seconds = time.perf_counter() - start
        pixels = args.side**2
    else:
        from digital_stain.slide.run import stain_to_zarr

        with tempfile.TemporaryDirectory(prefix="host-memory-", dir=args.workdir) as work:
            make_slide(Path(work) / "slide.ome.zarr", args.slide)
            start = time.perf_counter()
            result = stain_to_zarr(model, Path(work) / "slide.ome.zarr", Path(work) / "out.ome.zarr",
                                   args.outputs.split(","), device=None)
            seconds = time.perf_counter() - start
            assert result.complete
        pixels = args.slide**2
    return {"seconds": seconds, "mp_per_s": pixels / seconds / 1e6, "peak": peak_mb(), "end": rss_mb()}


def run_child(argv: list[str], workload: str, setting: str, threads: int | None) -> dict:
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE=setting)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, __file__, *argv, "--child", workload]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{workload} with {setting} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="0,1",
                        help="THP_MEM_ALLOC_ENABLE values, comma-separated; the first is the baseline")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--model", default="dsd-unpaired-fast")
    parser.add_argument("--outputs", default="student")
    parser.add_argument("--unit", type=int, default=1280)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--side", type=int, default=2048)
    parser.add_argument("--slide", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", choices=WORKLOADS, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    import torch

    from digital_stain.hostmem import kernel_huge_pages

    settings = args.settings.split(",")
    workloads = args.workloads.split(",")
    rows = []
    for workload in workloads:
        base = None
        for setting in settings:
            row = {"workload": workload, "setting": setting, **run_child(argv, workload, setting, args.threads)}
            base = base or row
            row["speed"] = base["seconds"] / row["seconds"]
            rows.append(row)
            _log(f"{workload}, {setting}: {row}")
    sizes = {"unit": f"{args.unit}² student forward", "stain": f"{args.side}² StainModel.stain ({args.outputs})",
             "slide": f"{args.slide}² stain_to_zarr ({args.outputs})"}
    lines = [
        "## Huge pages for PyTorch's large CPU blocks (THP_MEM_ALLOC_ENABLE) on the CPU", "",
        f"- CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores, torch "
        f"{torch.__version__}, Python {platform.python_version()}, kernel huge pages "
        f"{kernel_huge_pages() or 'unknown'}; "
        f"model `{args.model}`; torch threads {args.threads or 'default'}", "",
        f"| workload | THP_MEM_ALLOC_ENABLE | seconds | MP/s | vs {settings[0]} | peak RSS | RSS at the end |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {sizes[row['workload']]} | {row['setting']} | {row['seconds']:.2f} | {row['mp_per_s']:.3f} | "
                     f"{row['speed']:.2f}x | {row['peak']:.0f} MiB | {row['end']:.0f} MiB |")
    lines += ["", "Each row is a fresh process: PyTorch reads the variable at its first allocation.", "",
              f"Command: `{command_line(argv)}`", ""]
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
