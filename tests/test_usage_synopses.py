"""Every command synopsis in docs/usage.md against the command line itself, so that they cannot drift apart:
each documented option exists, each option of ``--help`` is documented, and listed choices are the real ones."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from digital_stain.cli import build_parser

USAGE = Path(__file__).resolve().parents[1] / "docs" / "usage.md"
SUBCOMMANDS = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def _synopses(command: str) -> str:
    """Every synopsis of ``command`` in usage.md (a line ``digital-stain COMMAND ...`` and its indented lines)."""
    text = USAGE.read_text()
    found = re.findall(rf"^digital-stain {command} .*(?:\n {{10,}}.*)*", text, re.M)
    assert found, f"usage.md has no synopsis of {command}"
    return "\n".join(found)


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_the_synopses_name_every_option_and_only_real_ones(command):
    options = {o: a for a in SUBCOMMANDS[command]._actions for o in a.option_strings if o.startswith("--")}
    options.pop("--help")
    documented = set(re.findall(r"--[a-z][a-z0-9-]*", _synopses(command)))
    assert documented - set(options) == set(), "documented but not an option"
    assert set(options) - documented == set(), "an option the synopses leave out"
    for option, values in re.findall(r"(--[a-z][a-z0-9-]*) ([a-z0-9]+(?:\|[a-z0-9]+)+)", _synopses(command)):
        assert set(values.split("|")) == set(map(str, options[option].choices)), option
