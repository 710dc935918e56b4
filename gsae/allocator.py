"""CPU memory allocator tuning: keep freed tensor memory in the process instead of returning it to the kernel.

PyTorch's CPU tensors come from glibc ``malloc``, which serves every block above ``M_MMAP_THRESHOLD`` (at most
32 MiB) with a fresh ``mmap`` and gives it back with ``munmap`` on free. A training step allocates the same
large tensors every time (GPT-2's (B·T, 3072) MLP activations are 50 MB at B·T = 4096, an SAE's (B·T, d_sae)
pre-activations 200 MB), so every step pays a page fault and a kernel zero-fill per 4 KiB page of each of them:
~230,000 faults and ~0.4 s of system time per step of the 6-block forward in ``benchmarks/train_throughput.py``
(2 cores). With ``M_MMAP_MAX = 0`` large blocks come from the heap like small ones and, with a high
``M_TRIM_THRESHOLD``, freed memory is reused by the next step: the same forward runs ~10% faster (1.76 → 1.58 s)
with ~600 instead of ~230,000 faults per step. (The property is the steady state of a repeated step, tested in
``tests/test_allocator.py``: a lone block freed and requested again at the same size is not always reused, since
PyTorch's aligned allocations ask for a few bytes more than the freed chunk holds.) This is what the jemalloc/tcmalloc ``LD_PRELOAD``
of PyTorch's CPU performance guide buys, done from inside the process. The cost: the heap keeps the peak of the
large allocations of a step (like CUDA's caching allocator), returned to the system only above the trim
threshold.

``train.py``, ``evaluate.py`` and ``benchmarks/train_throughput.py`` call :func:`tune_malloc` at start-up; ``GSAE_MALLOC_TUNING=0``
turns it off. A no-op off glibc (macOS, musl, Windows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

# glibc <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
#: free memory at the top of the heap kept rather than returned to the kernel: the largest value ``mallopt``'s ``int``
#: takes (2 GiB). 1 GiB was too little for evaluation: ``loss_added`` on 8 × 128 GPT-2 tokens holds several
#: (B, T, 50257) logit tensors, frees more than 1 GiB at once, and re-faulted ~700,000 pages (7.9–9.5 s) every run;
#: with 2 GiB, 2 faults and 3.5 s.
TRIM_THRESHOLD = (1 << 31) - 1

_STATE: dict[str, bool] = {}


def _libc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def tune_malloc(enable: bool | None = None) -> bool:
    """Serve large blocks from the heap and keep freed memory (see the module docstring); returns whether the
    tuning is in effect. ``enable=None`` reads ``GSAE_MALLOC_TUNING`` (default on; ``0`` turns it off).

    ``enable=False`` sets glibc's defaults in the steady state they reach on their own: mmap for blocks above
    32 MiB (glibc's dynamic mmap threshold rises to the largest freed block up to that cap, once any ``mallopt``
    call has frozen it) and a trim threshold of twice that: what the tests restore, and
    ``train_throughput.py --malloc default``.
    """
    if enable is None:
        enable = os.environ.get("GSAE_MALLOC_TUNING", "1").strip().lower() not in ("0", "false", "no", "off")
    libc = _libc()
    if libc is None:
        return False
    if enable:
        settings = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: TRIM_THRESHOLD}
    else:
        settings = {M_MMAP_MAX: 65536, M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20}
    ok = all(bool(libc.mallopt(param, value)) for param, value in settings.items())
    if not ok:
        log.debug("mallopt refused the allocator settings %s", settings)
    _STATE["enabled"] = ok and enable
    return _STATE["enabled"]


def malloc_tuned() -> bool:
    """Whether :func:`tune_malloc` is in effect in this process."""
    return _STATE.get("enabled", False)
