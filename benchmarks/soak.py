"""Soak check: many random bad or odd inputs through ``digital-stain stain``; count tracebacks and half-written files.

Each case makes one input (or model file) in a fresh folder and runs the real command line in this
process (``digital_stain.cli.main``). A case fails the check when an exception escapes ``main``
(what a user would see as a traceback), when ``Traceback`` appears in what it printed, or when it
leaves something half-written: a temporary ``*.partial*`` file or a lock file, or an output after
a refusal (exit status 2). Exit status 0 (stained), 1 (a folder with some files skipped), 2
(refused with a message) and 130 (stopped) are all fine: what matters is that each is clean.

Kinds of case (``--cases`` in all, spread evenly, seeded):

* ``array``: random shapes (0 to 5 axes, 0 to 300 px), dtypes (bool to complex, int8 to float64)
  and values (NaN, inf, huge, constant, negative), written as TIFF with random axes metadata, or
  as PNG where Pillow can write them;
* ``truncated``: a valid PNG, TIFF or OME-Zarr chunk cut at a random length;
* ``flipped``: a valid PNG or TIFF with random bytes flipped (header or pixels);
* ``model``: the shipped ``dsd-unpaired-fast`` file truncated or with bytes flipped;
* ``named``: a TIFF named ``.png``, a PNG named ``.tif``, text named ``.png``, an empty file;
* ``folder``: a folder mixing good and bad files.

Examples (from the repository root; about 2 minutes on 2 CPU cores)::

    python benchmarks/soak.py
    python benchmarks/soak.py --cases 40 --seed 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from digital_stain.cli import main
from digital_stain.stain.model import resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "src/digital_stain/data/darkfield_0_0.png"
KINDS = ("array", "truncated", "flipped", "model", "named", "folder")
DTYPES = ("bool", "uint8", "uint16", "uint32", "int8", "int16", "int32", "float16", "float32", "float64",
          "complex64")
AXES = ("YX", "YXS", "SYX", "CYX", "ZYX", "TZCYX", "QYX", "YXC", "XY", "CZYX")


def _values(rng, shape, dtype) -> np.ndarray:
    kind = rng.integers(6)
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype == "complex64":
        return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else np.finfo(dtype)
    if kind == 0:  # constant
        return np.full(shape, info.max if rng.integers(2) else 0, dtype)
    if kind == 1 and np.dtype(dtype).kind == "f":  # NaN / inf / huge
        data = rng.random(shape).astype(dtype)
        if data.size:
            data.flat[rng.integers(data.size)] = rng.choice([np.nan, np.inf, -np.inf, float(info.max)])
        return data
    if kind == 2 and np.dtype(dtype).kind in "if":  # negative
        return (-rng.random(shape) * 100).astype(dtype)
    low, high = (0, 1) if np.dtype(dtype).kind == "f" else (max(int(info.min), -1000), min(int(info.max), 70000))
    return (rng.random(shape) * (high - low) + low).astype(dtype)


def make_array(rng, folder: Path) -> tuple[Path, str]:
    ndim = int(rng.integers(0, 6))
    shape = tuple(int(rng.choice([0, 1, 2, 3, 4, 7, 8, 16, 33, 64, 100, 300])) for _ in range(ndim))
    dtype = str(rng.choice(DTYPES))
    data = _values(rng, shape, dtype)
    if rng.integers(3) == 0 and dtype in ("uint8", "uint16") and data.ndim in (2, 3):
        path = folder / "in.png"
        try:
            Image.fromarray(data).save(path)
            return path, f"PNG {shape} {dtype}"
        except Exception:
            pass
    path = folder / "in.tif"
    axes = str(rng.choice(AXES))
    try:
        kwargs = {"metadata": {"axes": axes}} if len(axes) == data.ndim else {}
        tifffile.imwrite(path, data, **kwargs)
    except Exception:
        path.write_bytes(data.tobytes()[:4096])  # tifffile cannot write it: a file of raw bytes named .tif
        return path, f"raw bytes {shape} {dtype}"
    return path, f"TIFF {shape} {dtype} axes {axes if len(axes) == data.ndim else 'default'}"


def _valid_image(rng, folder: Path, name: str = "in") -> Path:
    image = np.asarray(Image.open(SAMPLE))[: int(rng.integers(8, 256)), : int(rng.integers(8, 256))]
    if rng.integers(2):
        path = folder / f"{name}.png"
        Image.fromarray(np.ascontiguousarray(image)).save(path)
    else:
        path = folder / f"{name}.tif"
        tifffile.imwrite(path, image, photometric="rgb", **({"tile": (16, 16)} if rng.integers(2) else {}))
    return path


def make_truncated(rng, folder: Path) -> tuple[Path, str]:
    path = _valid_image(rng, folder)
    data = path.read_bytes()
    cut = int(rng.integers(0, len(data)))
    path.write_bytes(data[:cut])
    return path, f"{path.suffix} cut at {cut} of {len(data)} bytes"


def make_flipped(rng, folder: Path) -> tuple[Path, str]:
    path = _valid_image(rng, folder)
    data = bytearray(path.read_bytes())
    count = int(rng.integers(1, 20))
    where = rng.integers(0, min(len(data), 512) if rng.integers(2) else len(data), count)  # header or anywhere
    for i in where:
        data[i] ^= int(rng.integers(1, 256))
    path.write_bytes(bytes(data))
    return path, f"{path.suffix} with {count} byte(s) flipped"


def make_named(rng, folder: Path) -> tuple[Path, str]:
    choice = int(rng.integers(4))
    if choice == 0:
        path = folder / "in.png"
        tifffile.imwrite(path, (np.asarray(Image.open(SAMPLE))[:64, :64].astype(np.uint16) * 257), photometric="rgb")
        return path, "16-bit TIFF named .png"
    if choice == 1:
        path = folder / "in.tif"
        Image.open(SAMPLE).crop((0, 0, 64, 64)).save(path, format="PNG")
        return path, "PNG named .tif"
    if choice == 2:
        path = folder / "in.png"
        path.write_text("these are notes, not an image")
        return path, "text named .png"
    path = folder / "in.tif"
    path.write_bytes(b"")
    return path, "empty .tif"


def make_folder(rng, folder: Path) -> tuple[Path, str]:
    inputs = folder / "images"
    inputs.mkdir()
    kinds = []
    for i in range(int(rng.integers(1, 5))):
        sub = folder / f"case{i}"
        sub.mkdir()
        maker = [make_array, make_truncated, make_flipped, make_named][int(rng.integers(4))]
        path, what = maker(rng, sub)
        if rng.integers(2):
            path = _valid_image(rng, sub, name="good")
            what = "good"
        path.rename(inputs / f"{i}{path.suffix}")
        kinds.append(what)
    return inputs, "folder: " + "; ".join(kinds)


def run_case(kind: str, rng, work: Path, model: Path) -> dict:
    folder = work / "case"
    folder.mkdir()
    model_arg = "dsd-unpaired-fast"
    if kind == "model":
        path = _valid_image(rng, folder)
        broken = folder / "model.safetensors"
        data = bytearray(model.read_bytes())
        if rng.integers(2):
            data = data[: int(rng.integers(0, len(data)))]
            what = f"model cut at {len(data)} bytes"
        else:
            for i in rng.integers(0, min(len(data), 4096) if rng.integers(2) else len(data), int(rng.integers(1, 8))):
                data[i] ^= int(rng.integers(1, 256))
            what = "model with bytes flipped"
        broken.write_bytes(bytes(data))
        model_arg = str(broken)
    else:
        path, what = {"array": make_array, "truncated": make_truncated, "flipped": make_flipped,
                      "named": make_named, "folder": make_folder}[kind](rng, folder)
    output = work / "out" if rng.integers(2) or kind == "folder" else work / "out.ome.zarr"
    args = ["stain", str(path), "-o", str(output), "--model", model_arg, "--device", "cpu", "-q",
            "--precision", "fp32"]
    stderr = io.StringIO()
    escaped = None
    started = time.perf_counter()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(args)
        except BaseException as err:  # what would reach the user as a traceback
            code, escaped = None, "".join(traceback.format_exception(err))
    printed = stderr.getvalue()
    leftovers = [str(p.relative_to(work)) for p in work.rglob("*") if ".partial" in p.name or p.name.endswith(".lock")]
    half_written = bool(leftovers) or (code == 2 and output.exists())
    return {"kind": kind, "what": what, "code": code, "seconds": time.perf_counter() - started,
            "traceback": escaped is not None or "Traceback" in printed, "half_written": half_written,
            "detail": escaped or (printed if "Traceback" in printed else "") or ", ".join(leftovers),
            "message": printed.strip().splitlines()[-1] if printed.strip() else ""}


def main_soak() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = resolve_model_path("dsd-unpaired-fast")
    rng = np.random.default_rng(args.seed)
    results = []
    started = time.perf_counter()
    for i in range(args.cases):
        kind = KINDS[i % len(KINDS)]
        work = Path(tempfile.mkdtemp(prefix="soak-"))
        try:
            results.append(run_case(kind, rng, work, model))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"  {i + 1}/{args.cases} {kind}: {results[-1]['code']}", file=sys.stderr, flush=True)
    print(f"Command: `python benchmarks/soak.py --cases {args.cases} --seed {args.seed}` "
          f"({time.perf_counter() - started:.0f} s)\n")
    print("| kind | cases | exit 0 | exit 1 | exit 2 | other exit | tracebacks | half-written |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind in KINDS + ("all",):
        rows = [r for r in results if kind in ("all", r["kind"])]
        codes = Counter(r["code"] for r in rows)
        other = sum(n for c, n in codes.items() if c not in (0, 1, 2))
        print(f"| {kind} | {len(rows)} | {codes[0]} | {codes[1]} | {codes[2]} | {other} | "
              f"{sum(r['traceback'] for r in rows)} | {sum(r['half_written'] for r in rows)} |")
    bad = [r for r in results if r["traceback"] or r["half_written"]]
    print(f"\nTracebacks: {sum(r['traceback'] for r in results)} (target 0); "
          f"half-written: {sum(r['half_written'] for r in results)} (target 0).")
    for r in bad:
        print(f"\n- {r['kind']}: {r['what']} (exit {r['code']})\n\n```\n{r['detail'][-3000:]}\n```")
    messages = Counter(re.sub(r"\S*/\S+", "PATH", r["message"])[:110] for r in results if r["code"] == 2)
    print("\nMost common refusals:\n")
    for message, count in messages.most_common(12):
        print(f"- {count} x `{message}`")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main_soak())
