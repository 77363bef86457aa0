"""What resize-convolution upsampling costs: the same student size with transposed vs bilinear/nearest upsampling.

    OMP_NUM_THREADS=1 python benchmarks/upsample_cost.py [--side 512] [--width 16 --blocks 4] [--repeats 5]

Random weights (speed only): one ``ResnetGenerator`` per upsampling mode, fp32 on the CPU, the
torch threads of the process, passes interleaved so that drift of the machine hits all modes
alike; prints the median seconds per pass and the ratio to ``transpose`` measured in the run.
"""

from __future__ import annotations

import argparse
import sys
import time

from digital_stain import hostmem

hostmem.own_process()  # as the CLI does: before torch allocates (docs/benchmarks.md, host memory)

import numpy as np
import torch

from digital_stain.core.nets.generator import UPSAMPLING, ResnetGenerator


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    nets = {mode: ResnetGenerator(4, 3, args.width, args.blocks, mode).eval() for mode in UPSAMPLING}
    image = torch.rand(1, 4, args.side, args.side) * 2 - 1
    seconds = {mode: [] for mode in nets}
    with torch.no_grad():
        for repeat in range(args.repeats + 1):  # the first round warms up and is dropped
            for mode, net in nets.items():
                start = time.perf_counter()
                net(image)
                if repeat:
                    seconds[mode].append(time.perf_counter() - start)
    base = float(np.median(seconds["transpose"]))
    print(f"ResnetGenerator width {args.width}, {args.blocks} blocks, {args.side}² input, "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats}\n")
    print("| upsampling | s per pass | vs transpose |\n|---|---:|---:|")
    for mode, values in seconds.items():
        print(f"| {mode} | {np.median(values):.3f} | {np.median(values) / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
