"""Command-line option types: every numeric and path option is checked at parse time, in one place.

Each function here is an ``argparse`` ``type=``: it returns the parsed value or raises
``argparse.ArgumentTypeError`` with what was wrong and what is accepted, which argparse prints
with the usage line and exit code 2, before any model is loaded or any file is read.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from pathlib import Path

from digital_stain.stain.tiling import OVERLAP_RANGE, TILE_RANGE


def integer(low: int, high: int | None = None, what: str = "a number") -> Callable[[str], int]:
    """An integer in ``[low, high]`` (no upper bound when ``high`` is None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give {what}") from None
        if value < low or (high is not None and value > high):
            span = f"{low}..{high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{value} is out of range; give {what} ({span})")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def number(low: float, high: float | None = None, *, above: bool = False,
           what: str = "a number") -> Callable[[str], float]:
    """A finite float ``>= low`` (``> low`` with ``above``) and ``<= high``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; give {what}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number; give {what}")
        if value < low or (above and value == low) or (high is not None and value > high):
            span = (f"{'above' if above else 'from'} {low:g}" + (f" to {high:g}" if high is not None else ""))
            raise argparse.ArgumentTypeError(f"{value:g} is out of range; give {what} ({span})")
        return value

    parse.__name__ = "number"
    return parse


def model(text: str) -> str:
    """A shipped model's name or a model file's path; not empty, not a folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the model is empty; give a shipped model's name or a .safetensors file")
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a model file (.safetensors) or a shipped "
                                         "model's name")
    return text


_ADDRESS = re.compile(r"^(tcp|tls|inproc|ucx|ws|wss)://[^\s/:]+(:\d{1,5})?/?$|^[^\s/:]+:\d{1,5}$")


def scheduler(text: str) -> str:
    """A dask.distributed scheduler address: ``tcp://host:8786`` (or ``host:8786``)."""
    if not _ADDRESS.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a scheduler address; give one like tcp://host:8786")
    return text


def tile(text: str) -> int:
    return integer(*TILE_RANGE, what="a tile side in pixels")(text)


def overlap(text: str) -> int:
    return integer(*OVERLAP_RANGE, what="a tile overlap in pixels")(text)


tile.__name__, overlap.__name__ = "tile", "overlap"
