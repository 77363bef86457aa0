"""Host memory for the large tensors of networks on the CPU: huge pages in the processes this package owns.

A forward pass on the CPU allocates and frees hundreds of megabytes of
activations layer after layer (64 channels x 1280² px of float32 is 420 MB).
Each such block is a fresh ``mmap``, which the kernel faults in, and zeroes,
one 4 KiB page at a time on first touch. With ``THP_MEM_ALLOC_ENABLE=1``
PyTorch page-aligns its large CPU blocks and asks for transparent huge pages
for them (``madvise``), so the kernel faults them in 2 MiB at a time: 512x
fewer faults, about the same memory, given back on free as before. On the
development machine (a 2-core VM) an eager forward pass of the student on a
whole-slide unit went from 1.78 to 1.29 s and a whole slide ran 1.4-1.7x
faster at the same peak memory (``benchmarks/host_memory.py``,
``docs/benchmarks.md``).

The variable is process-wide (every library of the process that uses torch
gets it), so it is set only in processes this package owns: the command line
(on importing :mod:`digital_stain.cli`, before the modules it imports make
their first tensors) and the worker processes of a local cluster
(:func:`digital_stain.slide.cluster.cluster_client`, through their environment).
They leave C's ``malloc`` at its defaults. Having glibc keep freed blocks of up to 1 GB for
reuse (``mallopt``) was tried and dropped: PyTorch asks ``posix_memalign`` for huge-page-aligned
blocks, which glibc serves only from a free chunk 2 MiB larger than the block, so where a small
allocation had landed next to a freed block, the next one of the same size grew the heap instead
(in 13 of 30 fresh processes resident memory grew from 0.74 to 1.25-2.3 GB around a 512-MB block),
and at 4096² staining it measured 1.04x, within the spread of runs. Freed blocks over 32 MB go back
to the system, so a process's memory follows its work.

``import digital_stain`` leaves the environment alone: inside napari, or a
user's own script, it is theirs to set. PyTorch reads the
variable once, at its first CPU allocation (not at ``import torch``); where
torch has allocated before it is set, or the kernel's transparent huge pages
are ``never``, it changes nothing. Set ``THP_MEM_ALLOC_ENABLE=0`` in the
environment to keep PyTorch's default (a user's setting is always kept).
"""

from __future__ import annotations

import os

ENVIRONMENT = "THP_MEM_ALLOC_ENABLE"


def request_huge_pages() -> bool:
    """Ask PyTorch for huge pages in this process unless the environment already says.

    Only for a process this package owns (the command line): it changes ``os.environ`` for the
    whole process, and only counts before torch's first CPU allocation.

    Returns
    -------
    bool
        Whether huge pages are asked for (False where the user set ``THP_MEM_ALLOC_ENABLE=0``).
    """
    return os.environ.setdefault(ENVIRONMENT, "1").strip() == "1"


def own_process() -> None:
    """What a process this package owns asks for first, before torch allocates: :func:`request_huge_pages`."""
    request_huge_pages()


def child_environment() -> dict[str, str]:
    """The variables for a process this package starts (a cluster worker).

    Returns
    -------
    dict
        ``{"THP_MEM_ALLOC_ENABLE": value}``: the user's setting, else ``"1"``.
    """
    return {ENVIRONMENT: os.environ.get(ENVIRONMENT, "1")}


def kernel_huge_pages() -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise`` or ``never``); None where unknown."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as fh:
            text = fh.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None
