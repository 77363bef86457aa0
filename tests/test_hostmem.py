"""Huge pages for PyTorch's large CPU blocks (digital_stain.hostmem): asked for by the command line and the cluster
workers, the processes the package owns; never by ``import digital_stain`` (napari's process is shared)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from digital_stain import hostmem

# what the `digital-stain` script does first (then main() runs): import the CLI module, which imports torch
CLI = "import digital_stain.cli; "
# a library user's imports: the package, its whole-slide and model modules (they import torch and make tensors)
LIBRARY = "import digital_stain, digital_stain.slide.run, digital_stain.stain.model; "
LARGE_BLOCK = ("import os, torch; "
               "block = torch.ones(64 << 20, dtype=torch.uint8); "
               "huge = sum(int(line.split()[1]) for line in open('/proc/self/smaps') "
               "if line.startswith('AnonHugePages')); "
               "print(os.environ.get('THP_MEM_ALLOC_ENABLE'), block.data_ptr() % 4096, huge > 0)")


# resident memory (MiB) before, during and after a 512-MB block, the last after two blocks came and went
RESIDENT = ("import torch\n"
            "def resident():\n"
            "    return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) >> 10\n"
            "def fill():\n"
            "    block = torch.empty(512 << 20, dtype=torch.uint8); block.fill_(1); during = resident(); del block\n"
            "    return during\n"
            "before = resident(); fill(); during = fill(); print(before, during, resident())\n")


def _in_a_fresh_process(code: str, **env) -> list[str]:
    environment = {k: v for k, v in os.environ.items()
                   if k != hostmem.ENVIRONMENT and not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", code], env={**environment, **env}, capture_output=True, text=True,
                          check=True, timeout=300)
    return done.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and transparent huge pages are Linux's")
def test_the_command_line_gives_pytorch_page_aligned_huge_page_blocks():
    """Set on importing the CLI, before any of its imports makes a tensor (PyTorch reads it at the first)."""
    asked, offset, huge = _in_a_fresh_process(CLI + LARGE_BLOCK)
    assert asked == "1" and offset == "0"  # PyTorch aligns a block to pages only when huge pages are asked for
    if hostmem.kernel_huge_pages() in ("madvise", "always"):
        assert huge == "True"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and transparent huge pages are Linux's")
def test_importing_the_library_leaves_the_environment_alone():
    asked, offset, _ = _in_a_fresh_process(LIBRARY + LARGE_BLOCK)
    assert asked == "None" and offset != "0"  # PyTorch's default: its own 64-byte alignment inside a page


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and transparent huge pages are Linux's")
def test_a_users_setting_is_kept():
    asked, offset, _ = _in_a_fresh_process(CLI + LARGE_BLOCK, THP_MEM_ALLOC_ENABLE="0")
    assert asked == "0" and offset != "0"  # PyTorch's own 64-byte alignment inside a page


def test_the_command_line_entry_point_is_the_module_that_asks():
    """``digital-stain`` runs ``digital_stain.cli:main``: importing that module is what sets the variable."""
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["digital-stain"] == "digital_stain.cli:main"
    show = "print(os.environ.get('THP_MEM_ALLOC_ENABLE')); "
    seen = _in_a_fresh_process("import os, digital_stain; " + show + "import digital_stain.cli; " + show)
    assert seen == ["None", "1"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_the_command_line_gives_freed_blocks_back():
    """Its memory follows its work: a freed 512-MB block leaves the process. (Keeping freed blocks for
    reuse was dropped: with huge-page-aligned blocks it grew the heap at random, docs/architecture.md.)"""
    before, during, after = map(int, _in_a_fresh_process(CLI + RESIDENT))
    assert during - before >= 500  # the block was faulted in
    assert after - before < 64, (before, during, after)


def test_request_huge_pages_respects_the_environment(monkeypatch):
    monkeypatch.delenv(hostmem.ENVIRONMENT, raising=False)
    assert hostmem.request_huge_pages() and os.environ[hostmem.ENVIRONMENT] == "1"
    monkeypatch.setenv(hostmem.ENVIRONMENT, "0")
    assert not hostmem.request_huge_pages() and os.environ[hostmem.ENVIRONMENT] == "0"


def test_child_environment_passes_the_users_setting_or_asks(monkeypatch):
    monkeypatch.delenv(hostmem.ENVIRONMENT, raising=False)
    assert hostmem.child_environment() == {hostmem.ENVIRONMENT: "1"}
    assert hostmem.ENVIRONMENT not in os.environ  # this process's environment is not changed
    monkeypatch.setenv(hostmem.ENVIRONMENT, "0")
    assert hostmem.child_environment() == {hostmem.ENVIRONMENT: "0"}


def test_kernel_huge_pages_reads_the_bracketed_mode():
    mode = hostmem.kernel_huge_pages()
    assert mode is None or mode in ("always", "madvise", "never")
