"""Shared test builders with tiny defaults (SAELens ``tests/helpers.py`` style)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)  # tiny test tensors: thread start-up costs more than it saves


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def compile_calls(monkeypatch) -> list[str]:
    """``torch.compile`` replaced by a wrapper that records the name of each compiled function at every call (a real
    CPU compilation of the fused steps takes a minute on 2 cores); the compiled-function caches of ``gsae.lm_fused``
    and ``gsae.lm_chunked`` emptied (monkeypatch restores them afterwards)."""
    from gsae import lm_chunked, lm_fused

    calls: list[str] = []

    def fake_compile(fn, **kw):
        def wrapped(*a):
            calls.append(fn.__name__)
            return fn(*a)

        return wrapped

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(lm_fused, "_COMPILED", None)
    monkeypatch.setattr(lm_chunked, "_COMPILED", {})
    return calls


@pytest.fixture(scope="session")
def tiny_lm():
    """A frozen random-weight 2-layer GPT-2-architecture model (d_model 64, byte vocabulary)."""
    from gsae.lm import LanguageModel

    return LanguageModel("random-tiny", seed=0)


class CallCounter:
    """Counts the calls of ``owner.name`` (patched through ``monkeypatch``; the real function still runs)."""

    def __init__(self, monkeypatch, owner, name: str) -> None:
        self.calls = 0
        inner = getattr(owner, name)

        def counted(*a, **k):
            self.calls += 1
            return inner(*a, **k)

        monkeypatch.setattr(owner, name, counted)


def build_topk(d_in: int = 16, d_sae: int = 64, k: int = 4, **kw):
    from gsae.sae import TopKSAE

    return TopKSAE(d_in, d_sae=d_sae, k=k, **kw)


def quickstart_args(tmp_path, *extra: str, steps: int = 20) -> list[str]:
    """CLI args for a fast offline run under ``tmp_path`` (the root dir alone decides where everything goes)."""
    return [
        "--config", "configs/quickstart/topk.yaml",
        "--trainer.max_steps", str(steps),
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]


def randomize(sae, seed: int = 1):
    """Give every SAE parameter generic values (biases are 0 at init, which would hide bias bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return sae
