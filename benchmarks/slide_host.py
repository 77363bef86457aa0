"""Whole slides: how much of a unit's time is host work, and how much is the network.

On a fast GPU the network of a 1024-px unit takes tens of milliseconds, so the
host work around it (reading the chunk and its margins, value scaling, the
enhancer, the network input, the uint8 output, compressing and writing) decides
the slide's throughput unless enough units are worked on at once. This script
measures the two apart, on the real pipeline: it stains the level-0 units of a
generated ``--side`` x ``--side`` OME-Zarr slide one after another in this
thread (``slide.process_chunk``, what every worker thread runs), timing each
unit and, inside it, each network call (``ChunkStainer._forward``, synchronised on
a GPU, so it includes the copies to and from the device). Host work is the
rest. Store writes (``SlideStore.write`` and ``mark_done``, with their fsyncs)
are timed too.

It prints milliseconds per unit and the host work's ceiling: the megapixels per
second one thread's host work allows (``threads`` units in flight allow at most
that many times as much, less what they contend for), and the mean time of a pyramid
unit (levels 1 and below: reading the level above, 2 x 2 means, writing; host work
only). The network calls are also
split into inner units (margins on all four sides) and edge units; with
``--compile`` the inner ones run compiled, as ``stain_to_zarr(compile=True)`` runs
them, and each network's first inner call (the compile) is reported on its own.

    OMP_NUM_THREADS=1 python benchmarks/slide_host.py --device cpu --side 4096 [--compile]
    PYTHONPATH=src python3 benchmarks/slide_host.py --device cuda --side 8192 --compile

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


class Timer:
    """Wraps a method of a class so each call's seconds are added up (restored by ``close``).

    ``label(args)`` names each call (e.g. by its input's shape); ``calls`` keeps ``(label, seconds)``.
    """

    def __init__(self, owner, name: str, sync=None, label=lambda args: None):
        self.owner, self.name, self.seconds, self.calls = owner, name, 0.0, []
        self.original = getattr(owner, name)
        original = self.original

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if sync is not None:
                    sync()
                seconds = time.perf_counter() - start
                self.seconds += seconds
                self.calls.append((label(args), seconds))

        setattr(owner, name, timed)

    def close(self) -> None:
        setattr(self.owner, self.name, self.original)


def started_store(model, slide: Path, out: Path, outputs: list[str], chunk: int, compile: bool):
    """A store ``stain_to_zarr`` created and stopped after its first unit (statistics and job recorded)."""
    from digital_stain.slide.store import SlideStore
    from digital_stain.slide.run import SlideJob, stain_to_zarr

    stop = threading.Event()
    stain_to_zarr(model, slide, out, outputs, chunk=chunk, device=None, threads=1, stop=stop, compile=compile,
                  progress=lambda done, total: stop.set())
    store = SlideStore(out)
    return store, SlideJob.from_store(store)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="dsd-unpaired")
    parser.add_argument("--outputs", default="student", help="comma-separated (default student)")
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--compile", action="store_true",
                        help="compile the networks (inner units only, as stain_to_zarr(compile=True) does)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from digital_stain.core.devices import resolve_device
    from digital_stain.stain.chunks import ChunkStainer
    from digital_stain.stain.model import StainModel
    from digital_stain.slide.store import SlideStore
    from digital_stain.slide.run import open_source, process_chunk

    device = resolve_device(args.device)
    model = StainModel.load(args.model, device=device)
    outputs = args.outputs.split(",")
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    work = Path(tempfile.mkdtemp(prefix="slide-host-", dir=args.workdir))
    try:
        slide = work / "slide.ome.zarr"
        make_slide(slide, args.side, chunk=args.chunk)
        store, job = started_store(model, slide, work / "out.ome.zarr", outputs, args.chunk, args.compile)
        array = open_source(slide, chunk=args.chunk).array
        keys = job.grid.units(0)
        process_chunk(model, array, store, job, keys[0])  # warm-up (allocator, lazy imports)
        network = Timer(ChunkStainer, "_forward", sync, label=lambda call: tuple(call[2][0].shape[1:]))
        writes = [Timer(SlideStore, "write"), Timer(SlideStore, "mark_done")]
        start = time.perf_counter()
        for key in keys:
            process_chunk(model, array, store, job, key)
        total = time.perf_counter() - start
        for timer in [network, *writes]:
            timer.close()
        print(f"[slide-host] {len(keys)} units in {total:.1f} s", file=sys.stderr)
        pyramid_units = [(level, key) for level in range(1, len(job.grid.levels)) for key in job.grid.units(level)]
        start = time.perf_counter()
        for level, key in pyramid_units:  # host work only: read the level above, 2 x 2 means, write
            store.build_level_unit(level, key)
        pyramid = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)

    units = len(keys)
    unit_mp = args.side * args.side / 1e6 / units
    inner_shape = (args.chunk + 2 * 128,) * 2  # margins on all four sides: what compile=True compiles
    inner = [seconds for shape, seconds in network.calls if shape == inner_shape]
    edge = [seconds for shape, seconds in network.calls if shape != inner_shape]
    calls_per_unit = len(network.calls) // units
    first_inner = []
    if args.compile and inner:  # each network's first inner call compiles it
        first_inner, inner = inner[:calls_per_unit], inner[calls_per_unit:]
    breakdown = []
    for what, times in ((f"network call, inner unit ({inner_shape[0]}² input)", inner),
                        ("network call, edge unit", edge),
                        ("first inner call of each network (includes the compile)", first_inner)):
        if times:
            breakdown.append(f"| {what}, mean of {len(times)} | {1000 * sum(times) / len(times):.1f} |")
    host = total - network.seconds
    write = sum(timer.seconds for timer in writes)
    ms = 1000 / units
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'x86_64'})"
    lines = [
        f"## Whole-slide unit: host work and network ({device.type})", "",
        f"- device: {name}; torch {torch.__version__}, Python {platform.python_version()}",
        f"- model `{args.model}`, outputs {args.outputs}; slide {args.side} x {args.side}, "
        f"{units} level-0 units of {unit_mp:.2f} MP ({args.chunk} px, overlap 128), one at a time; "
        f"compile {'on' if args.compile else 'off'}", "",
        "| per unit | ms |", "|---|---:|",
        f"| whole unit | {total * ms:.1f} |",
        f"| network (`_forward`, {calls_per_unit} per unit) | {network.seconds * ms:.1f} |",
        f"| host work (the rest) | {host * ms:.1f} |",
        f"| of which store writes and progress marks (with fsync) | {write * ms:.1f} |", *breakdown,
        f"| pyramid unit (host only), mean of {len(pyramid_units)} | "
        f"{1000 * pyramid / max(len(pyramid_units), 1):.1f} |",
        "",
        f"Host work allows at most **{unit_mp * units / host:.1f} MP/s** per thread; "
        f"the network alone {unit_mp * units / max(network.seconds, 1e-9):.1f} MP/s.", "",
        f"Command: `{command_line()}`", "",
    ]
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
