"""Shared LM passes in evaluation: several benchmarks and SAEs (a sweep's members) reuse the SAE-independent LM work
of identical token batches, and every result equals the one the SAE gets when evaluated alone, with nothing shared."""

from __future__ import annotations

import math

import pytest
import torch

from gsae.callbacks.evaluation import DEFAULT_BENCHMARKS
from gsae.evals import BENCHMARKS, loss_added, run_benchmarks_many
from gsae.evals.common import shared_harvests
from gsae.sae import GradTopKSAE, TopKSAE
from tests.evals.helpers import HOOK, build_tokens

OPTIONS = {  # small budgets: the tiny model, 6 contexts of 32 tokens
    "steering": {"n_latents": 3, "n_positions": 2},
    "sensitive_directions": {"lengths": [1.0, 5.0]},
    "latents": {"n_latents": 4},
}


def members() -> dict[str, torch.nn.Module]:
    """A mixed sweep: two TopK SAEs and two g-SAEs (one normaliser), trained a little so results are not trivial."""
    out = {
        "topk-k4": TopKSAE(64, d_sae=128, k=4, seed=1),
        "topk-k8": TopKSAE(64, d_sae=96, k=8, seed=2),
        "gsae-k4": GradTopKSAE(64, d_sae=128, k=4, beta=10.0, seed=3),
        "gsae-k8": GradTopKSAE(64, d_sae=128, k=8, beta=30.0, seed=4),
    }
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for sae in out.values():
            sae.b_enc.add_(torch.randn(sae.d_sae, generator=g) * 0.1)
    return out


def same(a, b, path: str = "") -> None:
    """Exact equality of two nested results (NaN equal to NaN)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, (path, a, b)


class PassCounter:
    """Counts the LM's forward passes: to the hook (``activations``), with ``∇ₓL`` and from the hook on (to the
    logits or to the final hidden state: :meth:`suffix`)."""

    def __init__(self, lm, monkeypatch) -> None:
        self.counts = {"activations": 0, "activations_and_grads": 0, "run_from_hook": 0, "hidden_from_hook": 0}
        self.depth = 0  # a pass made inside another (activations_and_grads' own forward) is not counted again
        for name in self.counts:
            fn = getattr(lm, name)

            def counted(*args, _fn=fn, _name=name, **kw):
                self.counts[_name] += self.depth == 0
                self.depth += 1
                try:
                    return _fn(*args, **kw)
                finally:
                    self.depth -= 1

            monkeypatch.setattr(lm, name, counted)

    def suffix(self, counts: dict | None = None) -> int:
        counts = self.counts if counts is None else counts
        return counts["run_from_hook"] + counts["hidden_from_hook"]


def test_sweep_evaluation_equals_each_member_alone_with_nothing_shared(tiny_lm, monkeypatch):
    saes, tokens = members(), build_tokens(6, 32)
    names = list(DEFAULT_BENCHMARKS)
    per_benchmark = {n: tokens[:4] if n == "loss_added" else tokens for n in names}
    counter = PassCounter(tiny_lm, monkeypatch)
    alone = {}
    for m, sae in saes.items():  # the reference: each benchmark's own run(), no shared cache anywhere
        sae.eval()
        alone[m] = {}
        for n in names:
            with torch.no_grad():
                opts = OPTIONS.get(n, {})
                alone[m][n] = BENCHMARKS[n].run(sae, tiny_lm, HOOK, per_benchmark[n].clone(), seed=0, batch_size=2, **opts)
    passes_alone = dict(counter.counts)
    counter.counts = dict.fromkeys(counter.counts, 0)
    seconds: dict[str, float] = {}
    with shared_harvests() as cache:  # the one run_benchmarks_many uses (nested blocks share the outer cache)
        shared = run_benchmarks_many(
            names, saes, tiny_lm, HOOK, per_benchmark, seed=0, options=OPTIONS, seconds=seconds, batch_size=2
        )
    same(shared, alone)
    assert set(seconds) == {f"{m}/{n}" for m in saes for n in names}
    # The SAE inputs: 3 batches of 2 contexts (loss_added's 2 are the first 2 of them), computed once per kind
    # (plain for TopK, with ∇ₓL for the g-SAEs: one normaliser), then reused by every benchmark and member: each
    # reuse is one LM pass that the unshared evaluation ran. Steering's prompts (chosen by each SAE's latents) and
    # decoder_geometry's own ∇ₓL batches are per-SAE work, run either way.
    assert cache.misses == 3 * 2 and cache.hits > 3 * 2 * len(saes)
    saved = {k: passes_alone[k] - counter.counts[k] for k in passes_alone}
    assert saved["activations"] + saved["activations_and_grads"] == cache.hits
    assert counter.suffix(saved) == 2 * 2 * (len(saes) - 2)  # loss_added: 2 batches, clean + ablated once per kind


def test_loss_added_run_many_shares_the_clean_and_ablated_passes(tiny_lm, monkeypatch):
    saes, tokens = members(), build_tokens(6, 32)
    alone = {m: loss_added.run(sae.eval(), tiny_lm, HOOK, tokens, batch_size=2) for m, sae in saes.items()}
    counter = PassCounter(tiny_lm, monkeypatch)
    with shared_harvests() as cache:
        many = loss_added.run_many(saes, tiny_lm, HOOK, tokens, batch_size=2)
    same(many, alone)
    batches, groups = 3, 2  # the TopK members share one clean activation tensor per batch, the g-SAEs another
    assert counter.suffix() == batches * (2 * groups + len(saes))  # alone: batches * 3 * len(saes)
    assert counter.counts["activations"] == batches and counter.counts["activations_and_grads"] == batches
    assert cache.misses == batches * groups and cache.hits == batches * (len(saes) - groups)


def test_without_a_shared_cache_nothing_is_kept(tiny_lm, monkeypatch):
    saes, tokens = members(), build_tokens(4, 32)
    counter = PassCounter(tiny_lm, monkeypatch)
    loss_added.run_many(saes, tiny_lm, HOOK, tokens, batch_size=2)
    assert counter.counts["activations"] + counter.counts["activations_and_grads"] == 2 * len(saes)
    assert counter.suffix() == 2 * 3 * len(saes)


def test_the_cache_stops_keeping_at_its_budget(tiny_lm):
    tokens = build_tokens(4, 32)
    with shared_harvests(max_bytes=2 * 32 * 64 * 4) as cache:  # one (2, 32, 64) float32 batch of activations
        for _ in range(2):
            loss_added.run(TopKSAE(64, d_sae=128, k=4), tiny_lm, HOOK, tokens, batch_size=2)
    assert cache.bytes == 2 * 32 * 64 * 4
    assert (cache.misses, cache.hits) == (3, 1)  # batch 1 kept and reused; batch 2 computed both times


@pytest.mark.parametrize("nested", [False, True])
def test_nested_blocks_use_the_outer_cache(nested):
    with shared_harvests() as outer:
        if nested:
            with shared_harvests() as inner:
                assert inner is outer
