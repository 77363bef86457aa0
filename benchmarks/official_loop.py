"""The student through the official code's loop and through ``StainModel.stain``, side by side in one run.

    python benchmarks/official_loop.py [--models dsd-unpaired-fast,dsd-unpaired] [--side 1024] [--repeats 3]

The official code's way (the baseline, measured in this run): eager fp32, batch 1, tiles of
``--tile`` (256) pixels side by side with no overlap, each tile normalised by its own instance-norm
statistics (so its stain has seams). Ours: ``StainModel.stain(image, outputs=["student"])`` with its
defaults (seam-free: whole-image statistics, and for an image that fits the statistics pass one
pass; larger ones in overlapping tiles), and, for comparison, ``precision="fp32"``. Both start from
the same prepared input (value scaling, enhancer and student channels are numpy and cheap; ours
includes them, the loop gets them for free). The input is a ``--side`` x ``--side`` mosaic of real
dark-field tiles (DSD_U/val in ``../shared/data/dsd`` when present, else the package's samples).
Calls are interleaved, the first round warms up and is dropped, the best of ``--repeats`` counts.
Prints megapixels per second, the ratio to the official loop and what ``precision="auto"`` chose
(on a CPU with fast bf16 flags, timed per network: ``StainModel.precision_for``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

from digital_stain import hostmem

hostmem.own_process()  # as the CLI does: before torch allocates (docs/benchmarks.md, host memory)

import numpy as np
import torch

from digital_stain.core.devices import cpu_has_fast_bf16
from digital_stain.stain.model import StainModel

sys.path.insert(0, str(Path(__file__).parent))
from throughput import dark_tiles, mosaic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def official_network(model: StainModel) -> torch.nn.Module:
    """The student as the official code builds it: the same weights, PyTorch's own ``nn.InstanceNorm2d``."""
    from digital_stain.core.nets import TileStableInstanceNorm

    net = copy.deepcopy(model.student).eval()
    for module in list(net.modules()):
        for name, child in module.named_children():
            if isinstance(child, TileStableInstanceNorm):
                native = torch.nn.InstanceNorm2d(child.weight.numel(), eps=child.eps, affine=True)
                native.load_state_dict(child.state_dict())
                setattr(module, name, native)
    return net


def official_loop(net: torch.nn.Module, student_in: np.ndarray, tile: int) -> np.ndarray:
    """The student tile by tile, side by side, fp32, batch 1, per-tile instance norm; ``(Y, X, 3)``."""
    height, width = student_in.shape[1:]
    out = np.zeros((3, height, width), np.float32)
    with torch.no_grad():
        for y in range(0, height, tile):
            for x in range(0, width, tile):
                crop = torch.from_numpy(np.ascontiguousarray(student_in[:, y : y + tile, x : x + tile]))[None]
                out[:, y : y + tile, x : x + tile] = ((net(crop) + 1) / 2)[0].numpy()
    return out.transpose(1, 2, 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="dsd-unpaired-fast,dsd-unpaired")
    parser.add_argument("--side", default="1024", help="image sides, comma-separated (e.g. 1024,4096)")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stain-tiles", default="",
                        help="also time `stain` fp32 with these tile sides (comma-separated, e.g. 512,1024,2048)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/dsd")
    args = parser.parse_args(argv)

    tiles, source = dark_tiles(args.data)
    print(f"mosaics of {source}; CPU, {torch.get_num_threads()} thread(s); "
          f"fast bf16 by the CPU's flags: {cpu_has_fast_bf16()}; best of {args.repeats}\n")
    print("| student | side | official-style loop | `stain` defaults | ours / official | auto chose | `stain` fp32 | "
          "fp32 / official |")
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    for side, name in [(int(side), name) for side in str(args.side).split(",") for name in args.models.split(",")]:
        image = mosaic(tiles, side)
        megapixels = side * side / 1e6
        model = StainModel.load(name, device="cpu")
        baseline = official_network(model)
        student_in = model.preparation(image).plane(image, student=True)[1]
        auto = model.precision_for("auto")  # timed here, once, before the timed calls
        runs = {
            "official": lambda: official_loop(baseline, student_in, args.tile),
            "defaults": lambda: model.stain(image, ["student"]),
            "fp32": lambda: model.stain(image, ["student"], precision="fp32"),
        }
        for tile in [int(t) for t in args.stain_tiles.split(",") if t.strip()]:
            runs[f"fp32, tile {tile}"] = lambda tile=tile: model.stain(image, ["student"], precision="fp32", tile=tile)
        seconds = {key: [] for key in runs}
        for repeat in range(args.repeats + 1):
            for key, call in runs.items():
                start = time.perf_counter()
                call()
                if repeat:
                    seconds[key].append(time.perf_counter() - start)
        rate = {key: megapixels / min(values) for key, values in seconds.items()}
        print(f"| `{name}` | {side} | {rate['official']:.3f} MP/s | {rate['defaults']:.3f} MP/s | "
              f"{rate['defaults'] / rate['official']:.2f}x | {auto} | {rate['fp32']:.3f} MP/s | "
              f"{rate['fp32'] / rate['official']:.2f}x |", flush=True)
        for key in (key for key in rate if key.startswith("fp32, tile")):
            print(f"|   `stain` {key} | {side} | | {rate[key]:.3f} MP/s | {rate[key] / rate['official']:.2f}x | | | |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
