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
