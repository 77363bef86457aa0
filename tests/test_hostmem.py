"""Huge pages for PyTorch's large CPU blocks (digital_stain.hostmem): asked for by ``import digital_stain``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from digital_stain import hostmem

LARGE_BLOCK = ("import digital_stain, os, torch; "
               "block = torch.ones(64 << 20, dtype=torch.uint8); "
               "huge = sum(int(line.split()[1]) for line in open('/proc/self/smaps') "
               "if line.startswith('AnonHugePages')); "
               "print(os.environ['THP_MEM_ALLOC_ENABLE'], block.data_ptr() % 4096, huge > 0)")


def _in_a_fresh_process(code: str, **env) -> list[str]:
    environment = {k: v for k, v in os.environ.items() if k != hostmem.ENVIRONMENT}
    done = subprocess.run([sys.executable, "-c", code], env={**environment, **env}, capture_output=True, text=True,
                          check=True, timeout=300)
    return done.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and transparent huge pages are Linux's")
def test_importing_the_package_gives_pytorch_page_aligned_huge_page_blocks():
    asked, offset, huge = _in_a_fresh_process(LARGE_BLOCK)
    assert asked == "1" and offset == "0"  # PyTorch aligns a block to pages only when huge pages are asked for
    if hostmem.kernel_huge_pages() in ("madvise", "always"):
        assert huge == "True"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and transparent huge pages are Linux's")
def test_a_users_setting_is_kept():
    asked, offset, _ = _in_a_fresh_process(LARGE_BLOCK, THP_MEM_ALLOC_ENABLE="0")
    assert asked == "0" and offset != "0"  # PyTorch's own 64-byte alignment inside a page


def test_request_huge_pages_respects_the_environment(monkeypatch):
    monkeypatch.delenv(hostmem.ENVIRONMENT, raising=False)
    assert hostmem.request_huge_pages() and os.environ[hostmem.ENVIRONMENT] == "1"
    monkeypatch.setenv(hostmem.ENVIRONMENT, "0")
    assert not hostmem.request_huge_pages() and os.environ[hostmem.ENVIRONMENT] == "0"


def test_kernel_huge_pages_reads_the_bracketed_mode():
    mode = hostmem.kernel_huge_pages()
    assert mode is None or mode in ("always", "madvise", "never")
