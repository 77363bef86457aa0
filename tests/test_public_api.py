"""The public API, declared once in ``digital_stain.PUBLIC``: every name resolves, lazily."""

from __future__ import annotations

import subprocess
import sys

import digital_stain


def test_every_public_name_is_its_modules_own():
    import importlib

    for name, module in digital_stain.PUBLIC.items():
        assert getattr(digital_stain, name) is getattr(importlib.import_module(module), name), name
    assert set(digital_stain.__all__) == set(digital_stain.PUBLIC) | {"__version__"}
    assert set(digital_stain.PUBLIC) <= set(dir(digital_stain))


def test_importing_the_package_imports_no_torch_until_a_name_is_used():
    code = ("import sys, digital_stain; before = 'torch' in sys.modules; digital_stain.StainModel; "
            "print(before, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert done.stdout.split() == ["False", "True"]


def test_an_unknown_name_says_so():
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'stain_everything'"):
        digital_stain.stain_everything  # noqa: B018
