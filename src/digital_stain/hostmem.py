"""Host memory for the large tensors of networks on the CPU: huge pages, and freed blocks kept for reuse.

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
The same processes also keep freed blocks for reuse (:func:`keep_freed_memory`): C's ``malloc``
(glibc) otherwise gives every block over 32 MB back to the kernel on free, so the next layer's
activations are faulted in and zeroed again. Kept, a staining pass reuses memory it already has
(``benchmarks/official_loop.py``: 4096² staining 1.3x faster; the official loop's 1.07x). The
price is memory: the process keeps up to its peak (less up to 1 GB given back at the top of its
heap) until it ends.

``import digital_stain`` leaves the environment alone: inside napari, or a
user's own script, it is theirs to set. PyTorch reads the
variable once, at its first CPU allocation (not at ``import torch``); where
torch has allocated before it is set, or the kernel's transparent huge pages
are ``never``, it changes nothing. Set ``THP_MEM_ALLOC_ENABLE=0`` in the
environment to keep PyTorch's default (a user's setting is always kept).
"""

from __future__ import annotations

import ctypes
import os
import platform

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


# glibc's malloc: blocks up to this size come from the heap, not their own mmap; this much free at the
# top of the heap is kept (its defaults: 128 KiB rising to 32 MiB, and twice that)
KEEP_BYTES = 1 << 30
MALLOC_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def keep_freed_memory() -> bool:
    """Have C's ``malloc`` keep freed blocks of up to 1 GB for reuse instead of unmapping them.

    Only for a process this package owns: it is process-wide, and takes effect at once.
    Where the user set ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_``, or the C library
    is not glibc (macOS, Windows, musl), nothing is changed.

    Returns
    -------
    bool
        Whether freed memory is now kept.
    """
    if any(name in os.environ for name in MALLOC_ENVIRONMENT) or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - glibc always has it
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES) == 1 and mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES) == 1


def own_process() -> None:
    """What a process this package owns asks for first: :func:`request_huge_pages` and :func:`keep_freed_memory`."""
    request_huge_pages()
    keep_freed_memory()


def child_environment() -> dict[str, str]:
    """The variables for a process this package starts (a cluster worker).

    Returns
    -------
    dict
        ``{"THP_MEM_ALLOC_ENABLE": value}``: the user's setting, else ``"1"``; and glibc's
        ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` (:func:`keep_freed_memory`,
        read by the C library when the process starts): the user's, else 1 GB each.
    """
    keep = {name: os.environ.get(name, str(KEEP_BYTES)) for name in MALLOC_ENVIRONMENT}
    if any(name in os.environ for name in MALLOC_ENVIRONMENT):  # the user's malloc settings, as they are
        keep = {name: os.environ[name] for name in MALLOC_ENVIRONMENT if name in os.environ}
    return {ENVIRONMENT: os.environ.get(ENVIRONMENT, "1"), **keep}


def kernel_huge_pages() -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise`` or ``never``); None where unknown."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as fh:
            text = fh.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None
