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
    # The LM inputs: 3 batches of 2 contexts (loss_added's 2 are the first 2 of them), computed once per kind (plain
    # for TopK, with ∇ₓL for the g-SAEs: one normaliser, and decoder_geometry's ∇ₓL: another), then reused by every
    # benchmark and member: each reuse is one LM pass that the unshared evaluation ran. Steering's prompts (chosen
    # by each SAE's latents) are per-SAE work, run either way.
    assert cache.misses == 3 * 3 and cache.hits > 3 * 3 * len(saes)
    saved = {k: passes_alone[k] - counter.counts[k] for k in passes_alone}
    assert saved["activations"] + saved["activations_and_grads"] == cache.hits
    # loss_added: 2 batches, clean + ablated once for all four (the TopK's and the g-SAEs' activations are equal);
    # sensitive_directions: the activation directions' sweep once for all four, 3 batches of one reference pass and
    # one forward of its 5 types x 2 lengths
    assert counter.suffix(saved) == 2 * 2 * (len(saes) - 1) + 3 * 2 * (len(saes) - 1)


def test_loss_added_run_many_shares_the_clean_and_ablated_passes(tiny_lm, monkeypatch):
    saes, tokens = members(), build_tokens(6, 32)
    alone = {m: loss_added.run(sae.eval(), tiny_lm, HOOK, tokens, batch_size=2) for m, sae in saes.items()}
    counter = PassCounter(tiny_lm, monkeypatch)
    with shared_harvests() as cache:
        many = loss_added.run_many(saes, tiny_lm, HOOK, tokens, batch_size=2)
    same(many, alone)
    # the TopK members share one clean activation tensor per batch, the g-SAEs another (taken with ∇ₓL), of equal
    # values: one clean and one ablated pass per batch for all four
    batches, kinds = 3, 2
    assert counter.suffix() == batches * (2 + len(saes))  # alone: batches * 3 * len(saes)
    assert counter.counts["activations"] == batches and counter.counts["activations_and_grads"] == batches
    assert cache.misses == batches * kinds and cache.hits == batches * (len(saes) - kinds)


def test_without_a_shared_cache_nothing_is_kept(tiny_lm, monkeypatch):
    """Every SAE's activations are taken again; equal ones still share the clean and ablated passes."""
    saes, tokens = members(), build_tokens(4, 32)
    counter = PassCounter(tiny_lm, monkeypatch)
    many = loss_added.run_many(saes, tiny_lm, HOOK, tokens, batch_size=2)
    assert counter.counts["activations"] + counter.counts["activations_and_grads"] == 2 * len(saes)
    assert counter.suffix() == 2 * (2 + len(saes))
    same(many, {m: loss_added.run(sae.eval(), tiny_lm, HOOK, tokens, batch_size=2) for m, sae in saes.items()})


def test_loss_added_members_with_different_activations_do_not_share_passes(tiny_lm, monkeypatch):
    """SAEs at two hooks (different activations) get their own clean and ablated passes, as alone."""
    saes, tokens = members(), build_tokens(4, 32)
    real = loss_added.sae_on_tokens
    shift = {m: i % 2 for i, m in enumerate(saes)}  # half the SAEs see activations moved off the others'

    def moved(sae, lm, hook, tok):
        r = real(sae, lm, hook, tok)
        m = next(k for k, v in saes.items() if v is sae)
        return r._replace(x=r.x + shift[m]) if shift[m] else r

    monkeypatch.setattr(loss_added, "sae_on_tokens", moved)
    counter = PassCounter(tiny_lm, monkeypatch)
    loss_added.run_many(saes, tiny_lm, HOOK, tokens, batch_size=2)
    assert counter.suffix() == 2 * (2 * 2 + len(saes))  # 2 batches: 2 groups' clean + ablated, and each SAE's


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


#: a sweep over layers on random-tiny: a residual point, an MLP output after it and the last residual point
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]


def members_at_hooks() -> dict[str, tuple[torch.nn.Module, str]]:
    """A TopK and a g-SAE at the first hook, a g-SAE at the second, a TopK at the third."""
    saes = members()
    return {"topk-k4": (saes["topk-k4"], HOOKS[0]), "gsae-k4": (saes["gsae-k4"], HOOKS[0]),
            "gsae-k8": (saes["gsae-k8"], HOOKS[1]), "topk-k8": (saes["topk-k8"], HOOKS[2])}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "transformer_lens"])
def test_members_at_several_hooks_share_one_lm_pass_per_batch(fused):
    """A sweep over layers (the callback's evaluation of members at their own hooks): every result equals the member's
    own benchmarks alone with nothing shared, exactly, while each batch's activations (and ``∇ₓL``) at all three hooks
    come from one LM pass per kind, not one per hook."""
    from gsae.evals import run_benchmarks_at
    from gsae.lm import LanguageModel

    lm = LanguageModel("random-tiny", seed=0, fused=fused)
    saes, tokens = members_at_hooks(), build_tokens(6, 32)
    names = list(DEFAULT_BENCHMARKS)
    per_benchmark = {n: tokens[:4] if n == "loss_added" else tokens for n in names}
    alone = {}
    for m, (sae, hook) in saes.items():
        sae.eval()
        with torch.no_grad():
            alone[m] = {n: BENCHMARKS[n].run(sae, lm, hook, per_benchmark[n].clone(), seed=0, batch_size=2,
                                             **OPTIONS.get(n, {})) for n in names}
    planned = []
    with shared_harvests() as cache:
        harvest_planned = cache._harvest_planned
        cache._harvest_planned = lambda *a: planned.append(a[1]) or harvest_planned(*a)
        shared = run_benchmarks_at(names, saes, lm, per_benchmark, seed=0, options=OPTIONS, batch_size=2)
    same(shared, alone)
    assert list(shared) == list(saes)
    # 3 batches × 3 kinds (plain; ∇ₓL with the g-SAEs' normaliser; with decoder_geometry's), each at every hook at once
    assert cache.misses == 3 * 3 and planned == [HOOKS] * 9
    assert len(cache._store) == 3 * 3 * len(HOOKS)


def test_members_at_several_hooks_without_room_for_every_hook_harvest_one_hook_at_a_time(tiny_lm):
    """When one batch at every planned hook does not fit the cache's budget, each hook is harvested alone (as
    without a plan), and the results are the same."""
    from gsae.evals import run_benchmarks_at

    saes, tokens = members_at_hooks(), build_tokens(4, 32)
    names = ["dead_latents", "loss_added"]
    reference = run_benchmarks_at(names, saes, tiny_lm, tokens, batch_size=2)
    batch = 2 * 32 * 64 * 4  # one (2, 32, 64) float32 batch of activations at one hook
    with shared_harvests(max_bytes=2 * batch) as cache:
        results = run_benchmarks_at(names, saes, tiny_lm, tokens, batch_size=2)
    same(results, reference)
    assert cache._plans[id(tiny_lm)] == HOOKS
    assert cache.bytes <= 2 * batch and len(cache._store) == 2  # each hook alone: kept until the budget is spent


def test_a_plan_keeps_only_residual_stream_hooks(tiny_lm):
    from gsae.evals.common import harvest

    with shared_harvests() as cache:
        cache.plan(tiny_lm, ["blocks.0.attn.hook_z", HOOKS[0]])
        assert cache._plans[id(tiny_lm)] == [HOOKS[0]]  # one stream hook: harvested alone, as unplanned
        harvest(tiny_lm, HOOKS[0], build_tokens(2, 32, seed=1))
        assert len(cache._store) == 1
        cache.plan(tiny_lm, [HOOKS[2]])  # added to the plan
        assert cache._plans[id(tiny_lm)] == [HOOKS[0], HOOKS[2]]
        harvest(tiny_lm, HOOKS[2], build_tokens(2, 32, seed=2))
        assert len(cache._store) == 1 + 2


@pytest.mark.parametrize("sweep_seqs", [None, 2])
def test_sensitive_directions_run_many_sweeps_the_activation_directions_once(tiny_lm, monkeypatch, sweep_seqs):
    """Sweep members of equal activations (TopK and g-SAE alike) share the statistics and the length sweep of the
    direction types drawn from the activations alone, run once; each member adds its own kinds and substitution.
    Every result equals the member's own run, exactly (also with statistics from more contexts than are swept)."""
    from gsae.evals import sensitive_directions as sd
    from gsae.evals.directions import ACTIVATION_TYPES

    saes, tokens = members(), build_tokens(4, 32)
    opts = dict(lengths=[1.0, 5.0], batch_size=2, pool_seqs=2, sweep_seqs=sweep_seqs)
    counter = PassCounter(tiny_lm, monkeypatch)
    sd.run(saes["topk-k4"].eval(), tiny_lm, HOOK, tokens, direction_types=list(ACTIVATION_TYPES), substitution=False,
           **opts)
    shared_part = counter.counts["hidden_from_hook"]  # the passes of the activation directions, for one SAE
    counter.counts = dict.fromkeys(counter.counts, 0)
    alone = {m: sd.run(sae.eval(), tiny_lm, HOOK, tokens, **opts) for m, sae in saes.items()}
    passes_alone = counter.suffix()
    counter.counts = dict.fromkeys(counter.counts, 0)
    with shared_harvests():
        many = sd.run_many(saes, tiny_lm, HOOK, tokens, **opts)
    same(many, alone)
    assert shared_part > 0 and passes_alone - counter.suffix() == (len(saes) - 1) * shared_part
    assert all(set(ACTIVATION_TYPES) < set(r["direction_types"]) for r in many.values())
    assert len({r["stats"]["n_alive_latents"] for r in many.values()}) > 1  # each SAE's own latents


@pytest.mark.parametrize("kinds,sweep_seqs", [(["cov_random_mixture", "sae_error"], None),
                                              (["isotropic", "sae_feature_alive"], None),
                                              (["real_mixture", "sae_feature_alive"], 3)])
def test_sensitive_directions_run_many_beyond_its_cache_equals_each_run(tiny_lm, monkeypatch, kinds, sweep_seqs):
    """An evaluation set too large to keep for every SAE of a sweep (but not for one): each SAE streams its own
    passes as run() does, and its results (the alive-latent count included) equal run()'s."""
    from gsae.evals import sensitive_directions as sd

    saes, tokens = members(), build_tokens(4, 32)
    swept = tokens[: sweep_seqs or len(tokens)]
    monkeypatch.setattr(sd, "CACHE_ELEMENTS", 2 * swept.numel() * 64)  # one SAE's activations fit, four do not
    opts = dict(lengths=[1.0, 5.0], batch_size=2, pool_seqs=2, direction_types=kinds, sweep_seqs=sweep_seqs)
    kept, group = [], sd._equal_activations  # called only when the activations are kept for pass 2
    monkeypatch.setattr(sd, "_equal_activations", lambda acts: kept.append(len(acts)) or group(acts))
    alone = {m: sd.run(sae.eval(), tiny_lm, HOOK, tokens, **opts) for m, sae in saes.items()}
    assert kept == [1] * len(saes)  # one SAE's fit
    same(sd.run_many(saes, tiny_lm, HOOK, tokens, **opts), alone)
    assert kept == [1] * len(saes)  # four SAEs' did not: streamed (audit Y: a bool times the count kept them all)
    assert all(r["stats"]["n_alive_latents"] is not None for r in alone.values())


def test_sensitive_directions_groups_only_equal_activations(tiny_lm):
    """SAEs at different hooks (activations not equal) are not grouped: each gets its own statistics and sweep."""
    from gsae.evals.directions import BatchActs
    from gsae.evals.sensitive_directions import _equal_activations

    x = torch.randn(2, 4, 8)
    acts = {"a": [BatchActs(None, x, None, None)], "b": [BatchActs(None, x.clone(), None, None)],
            "c": [BatchActs(None, x + 1e-6, None, None)], "d": [BatchActs(None, x, None, None)]}
    assert _equal_activations(acts) == [["a", "b", "d"], ["c"]]


def test_a_planned_gradient_harvest_over_budget_is_done_per_hook(tiny_lm):
    from gsae.data.harvest import loss_gradients
    from gsae.evals.common import harvest, shared_harvests
    from tests.evals.helpers import build_tokens

    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    tokens = build_tokens(2, 32)
    with shared_harvests(max_bytes=2 * 32 * 64 * 4 * 2) as cache:  # one hook's activations and gradients
        cache.plan(tiny_lm, hooks)
        x, g = harvest(tiny_lm, hooks[1], tokens, 60.0)
        assert cache.bytes <= cache.max_bytes
    ref = loss_gradients(tiny_lm, tokens, hooks[1], 60.0)
    assert torch.equal(x, ref[0]) and torch.equal(g, ref[1])


def test_special_token_mask_masks_every_special_id_and_nothing_without_exclude():
    from types import SimpleNamespace

    from gsae.evals.common import special_token_mask

    lm = SimpleNamespace(special_token_ids=[0, 5])
    tokens = torch.tensor([[0, 1, 5, 2], [3, 5, 0, 0]])
    naive = torch.tensor([[t not in (0, 5) for t in row] for row in tokens.tolist()])
    assert torch.equal(special_token_mask(lm, tokens), naive)
    assert special_token_mask(lm, tokens, exclude=False).all()


def test_needs_grad_only_for_saes_with_a_positive_beta():
    from gsae.evals.common import needs_grad

    assert not needs_grad(TopKSAE(64, d_sae=96, k=4))
    assert needs_grad(GradTopKSAE(64, d_sae=96, k=4, beta=1.0))
    assert not needs_grad(GradTopKSAE(64, d_sae=96, k=4, beta=0.0))


def test_a_hook_outside_the_plan_is_harvested_alone(tiny_lm):
    from gsae.evals.common import harvest

    tokens = build_tokens(2, 32, seed=3)
    reference = tiny_lm.activations(tokens, HOOK)  # HOOK is a stream hook the plan leaves out
    with shared_harvests() as cache:
        cache.plan(tiny_lm, [HOOKS[0], HOOKS[2]])
        x, g = harvest(tiny_lm, HOOK, tokens)
        assert torch.equal(x, reference) and g is None
        assert [k[1] for k in cache._store] == [HOOK]  # the planned hooks were not harvested for it


class _Stop(Exception):
    pass


@pytest.fixture
def scripted(monkeypatch):
    """Two scripted benchmarks on a fake clock: ``many`` (a ``run_many`` taking 6 s for all its SAEs, not applicable to
    an SAE with ``skip``, raising for one with ``fail="many"``) and ``single`` (a ``run`` of 2 s per SAE, raising for
    one with ``fail="run"``). ``seen`` records
    each call with the SAEs' training modes and whether autograd was on."""
    import sys
    import types

    from gsae import evals

    clock, seen = [0.0], []

    def run(sae, lm, hook, tokens, *, seed=0, **options):
        clock[0] += 2.0
        sae.options = options
        seen.append(("single", sae.name, sae.training, torch.is_grad_enabled()))
        if sae.fail == "run":
            raise RuntimeError("boom\nits details")
        return {"v": 1.0}

    def run_many(saes, lm, hook, tokens, *, seed=0, **options):
        clock[0] += 6.0
        seen.append(("many", tuple(saes), tuple(s.training for s in saes.values()), torch.is_grad_enabled()))
        if any(s.fail == "many" for s in saes.values()):
            raise RuntimeError("many boom")
        return {m: {"v": 2.0} for m in saes}

    for name, fns in (("single", dict(run=run)), ("many", dict(run=run, run_many=run_many,
                                                              applicable=lambda s, lm, h: "not here" if s.skip else None))):
        module = types.ModuleType(f"tests.evals.scripted_{name}")
        module.__dict__.update(fns)
        monkeypatch.setitem(sys.modules, module.__name__, module)
        monkeypatch.setitem(evals._MODULES, name, module.__name__)
    monkeypatch.setattr(evals, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def sae(name, training=True, skip=False, fail=""):
        module = torch.nn.Linear(1, 1).train(training)
        module.name, module.skip, module.fail = name, skip, fail
        return module

    return sae, seen


def test_a_sweeps_seconds_skips_failures_and_modes(scripted):
    """``run_many``'s time is split between the SAEs it ran on (a skipped one gets 0 s); a single SAE's seconds are
    keyed by the benchmark alone; a failing ``run``/``run_many`` is recorded under ``on_error="record"`` and raises by
    default; every SAE runs in eval mode without autograd, and gets its own training mode back."""
    make, seen = scripted
    saes = {"a": make("a"), "b": make("b", training=False, fail="run"), "c": make("c", skip=True)}
    seconds: dict[str, float] = {}
    res = run_benchmarks_many(["many", "single"], saes, None, "h", torch.zeros(2, 3, dtype=torch.long),
                              seconds=seconds, on_error="record")
    assert res == {"a": {"many": {"v": 2.0}, "single": {"v": 1.0}},
                   "b": {"many": {"v": 2.0}, "single": {"failed": "RuntimeError: boom"}},
                   "c": {"many": {"skipped": "not here"}, "single": {"v": 1.0}}}
    assert seconds == {"a/many": 3.0, "b/many": 3.0, "c/many": 0.0, "a/single": 2.0, "b/single": 2.0, "c/single": 2.0}
    assert seen[0] == ("many", ("a", "b"), (False, False), False)
    assert all(not training and not grad for _, _, training, grad in seen[1:])
    assert [s.training for s in saes.values()] == [True, False, True]
    one: dict[str, float] = {}
    alone = make("a")
    run_benchmarks_many(["single"], {"": alone}, None, "h", torch.zeros(2, 3, dtype=torch.long), seconds=one,
                        options={"single": {"batch_size": 1}}, batch_size=4, top_n=3)
    assert one == {"single": 2.0} and alone.options == {"batch_size": 1, "top_n": 3}  # a benchmark's own option wins
    with pytest.raises(RuntimeError, match="many boom"):
        run_benchmarks_many(["many"], {"a": make("a"), "b": make("b", fail="many")}, None, "h", torch.zeros(1, 2))
    with pytest.raises(RuntimeError, match="boom"):
        run_benchmarks_many(["single"], {"b": make("b", fail="run")}, None, "h", torch.zeros(1, 2))
    assert saes["a"].training


def test_a_stop_check_runs_before_every_benchmark_and_member_and_only_within_its_block(scripted):
    from gsae.evals import stop_check

    make, seen = scripted
    saes = {"a": make("a"), "b": make("b")}

    def stop_after(n):
        def check():
            if len(seen) >= n:
                raise _Stop
        return check

    with stop_check(stop_after(1)), pytest.raises(_Stop):  # between the members of a benchmark
        run_benchmarks_many(["single", "many"], saes, None, "h", torch.zeros(1, 2))
    assert [s[:2] for s in seen] == [("single", "a")]
    seen.clear()
    with stop_check(stop_after(2)), pytest.raises(_Stop):  # before a benchmark run for every member at once
        run_benchmarks_many(["single", "many"], saes, None, "h", torch.zeros(1, 2))
    assert [s[:2] for s in seen] == [("single", "a"), ("single", "b")]
    seen.clear()
    run_benchmarks_many(["single", "many"], saes, None, "h", torch.zeros(1, 2))  # the block is left: no check
    assert len(seen) == 3


def test_saes_at_several_hooks_come_back_in_their_order(scripted, tiny_lm):
    from gsae.evals import run_benchmarks_at

    make, seen = scripted
    saes = {"x": (make("x"), HOOKS[0]), "y": (make("y"), HOOKS[1]), "z": (make("z"), HOOKS[0])}
    res = run_benchmarks_at(["single"], saes, tiny_lm, torch.zeros(1, 2, dtype=torch.long))
    assert list(res) == ["x", "y", "z"] and [s[1] for s in seen] == ["x", "z", "y"]  # run grouped by hook
