"""Loading a script of ``benchmarks/`` as a module in a test (shared by the benchmark smoke tests)."""

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str, monkeypatch):
    """``benchmarks/<name>.py`` as a module; its folder is on ``sys.path`` (for its sibling imports) for the test."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.delitem(sys.modules, "slide_memory", raising=False)  # a fresh sibling per test
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
