"""The CPU allocator tuning (``gsae.allocator``): large tensors are reused instead of re-faulted every step."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys

import pytest

from gsae import allocator
from gsae.cli import main as train_main

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc-only"
)


FAULTS = """
import resource, sys, torch
from gsae import allocator
assert allocator.tune_malloc() == (sys.argv[1] == "1")
x = torch.randn(4096, 768)
W_in, W_out = torch.randn(768, 3072) / 30, torch.randn(3072, 768) / 50
def step():  # the allocation pattern of a transformer forward: fresh (4096, 3072) = 48 MiB activations per layer
    h = x
    for _ in range(2):
        h = h + torch.nn.functional.gelu(h @ W_in) @ W_out
    return float(h.sum())
for _ in range(3):  # the heap grows to the step's peak
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


def faults_per_step(tuning: str) -> float:
    """Minor page faults per steady-state step of a 2-layer MLP forward, in a fresh process (its own heap) with
    ``GSAE_MALLOC_TUNING=tuning``."""
    env = {**os.environ, "GSAE_MALLOC_TUNING": tuning}
    out = subprocess.run([sys.executable, "-c", FAULTS, tuning], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def test_tuning_stops_the_page_faults_of_repeated_large_tensors() -> None:
    pages = (48 << 20) / resource.getpagesize()  # of one (4096, 3072) activation
    untuned, tuned = faults_per_step("0"), faults_per_step("1")
    assert untuned > 2 * pages  # glibc's default: fresh mmaps, every page faulted in again each step
    # Tuned: the heap keeps the blocks and the next step reuses them, so not even one activation is faulted in again.
    # (Not zero: the kernel may fault a few MiB per step of its own accord; CI's machine showed 2,048 faults = 8 MiB
    # where this VM shows 0, so the bound is half an activation and a tenth of the untuned count, not "none".)
    assert tuned < 0.5 * pages and tuned < 0.1 * untuned, (untuned, tuned)


def test_train_py_turns_the_tuning_on() -> None:
    allocator.tune_malloc(False)
    try:
        with pytest.raises(SystemExit):  # LightningCLI's --help exits
            train_main(["--help"])
    finally:
        tuned = allocator.malloc_tuned()
        allocator.tune_malloc(False)
    assert tuned


def test_evaluate_py_turns_the_tuning_on(tmp_path) -> None:
    from gsae.evaluate import main as evaluate_main

    allocator.tune_malloc(False)
    try:
        assert evaluate_main([str(tmp_path / "missing.ckpt")]) == 1  # a one-line error, after the tuning
        tuned = allocator.malloc_tuned()
    finally:
        allocator.tune_malloc(False)
    assert tuned


TRIM = """
import ctypes, sys
from gsae import allocator
allocator.tune_malloc(sys.argv[1] == "1")
libc = ctypes.CDLL("libc.so.6")
try:
    mallinfo2 = libc.mallinfo2
except AttributeError:  # glibc < 2.33
    print("skip")
    sys.exit()
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
mallinfo2.restype = Info
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
p = libc.malloc(3 << 29)  # 1.5 GiB at the top of the heap (reserved, never touched)
libc.free(p)
if not p:  # no room to reserve it (strict overcommit)
    print("skip")
    sys.exit()
print(mallinfo2().arena >> 20)
"""


def test_a_large_free_is_kept_in_the_heap_up_to_two_gib() -> None:
    """More than 1 GiB freed at once (``loss_added``'s logit tensors) stays in the heap for the next step rather than
    going back to the kernel, which glibc's defaults (and a trim threshold of 1 GiB) do."""
    env = {k: v for k, v in os.environ.items() if k != "GSAE_MALLOC_TUNING"}
    held = {}
    for tuning in ("1", "0"):
        out = subprocess.run([sys.executable, "-c", TRIM, tuning], env=env, capture_output=True, text=True, check=True)
        if out.stdout.strip() == "skip":
            pytest.skip("mallinfo2 needs glibc >= 2.33, and 1.5 GiB of address space")
        held[tuning] = int(out.stdout.strip().splitlines()[-1])  # MiB of heap after the free
    assert held["1"] >= 1536 > 256 > held["0"], held


@pytest.mark.parametrize("value", ["0", "off", "OFF", " False ", "no"])
def test_any_spelling_of_off_turns_the_tuning_off(monkeypatch, value) -> None:
    monkeypatch.setenv("GSAE_MALLOC_TUNING", value)
    try:
        assert allocator.tune_malloc() is False and not allocator.malloc_tuned()
        monkeypatch.setenv("GSAE_MALLOC_TUNING", "1")
        assert allocator.tune_malloc() is True and allocator.malloc_tuned()
    finally:
        allocator.tune_malloc(False)


def test_settings_glibc_refuses_are_not_reported_as_tuned(monkeypatch) -> None:
    """Every setting is tried and all must take; a process that never tuned is not tuned."""

    class Libc:
        def __init__(self, refused):
            self.refused, self.calls = refused, []

        def mallopt(self, param, value):
            self.calls.append(param)
            return 0 if param in self.refused else 1

    monkeypatch.setattr(allocator, "_STATE", {})
    assert allocator.malloc_tuned() is False
    libc = Libc(refused={allocator.M_TRIM_THRESHOLD})
    monkeypatch.setattr(allocator, "_libc", lambda: libc)
    assert allocator.tune_malloc(True) is False and allocator.malloc_tuned() is False
    assert set(libc.calls) == {allocator.M_MMAP_MAX, allocator.M_TRIM_THRESHOLD}
    libc = Libc(refused=set())
    assert allocator.tune_malloc(True) is True and allocator.malloc_tuned() is True
    assert allocator.tune_malloc(False) is False and allocator.malloc_tuned() is False
    monkeypatch.setattr(allocator, "_libc", lambda: None)  # off glibc: a no-op
    assert allocator.tune_malloc(True) is False and allocator.malloc_tuned() is False
