"""dead_latents: a planted dead latent is dead under both definitions; the batching of the stream."""

from __future__ import annotations

import pytest

from gsae.evals import dead_latents, scalars
from gsae.metrics import DeadLatentTracker
from tests.evals.helpers import HOOK, build_tokens, build_topk, plant_dead_latent


def test_planted_dead_latent_is_dead_under_both_definitions(tiny_lm):
    toks = build_tokens(8, 32)
    healthy = dead_latents.run(build_topk(d_sae=16, k=8), tiny_lm, HOOK, toks, batch_tokens=40)
    assert healthy["n_dead_batches"] == healthy["n_dead_tokens"] == healthy["n_never_fired"] == 0
    sae = plant_dead_latent(build_topk(d_sae=16, k=8), i=3)
    r = dead_latents.run(sae, tiny_lm, HOOK, toks, batch_size=3, batch_tokens=40)
    assert r["n_tokens"] == 240 and r["batch_tokens"] == 40  # 8·31 unmasked tokens -> 6 full batches of 40
    assert r["n_dead_batches"] == r["n_dead_tokens"] == r["n_never_fired"] == 1
    assert r["dead_fraction_batches"] == r["dead_fraction_tokens"] == 1 / 16
    assert r["alive_fraction"] == 15 / 16
    assert sum(r["log10_density_hist"]["counts"]) == 15
    assert r["density_cdf"]["fraction"][-1] == 1.0


def test_dead_sets_match_a_naive_tracker(tiny_lm):
    """The streamed, batch-split computation equals feeding per-batch fired masks by hand."""
    sae, toks = plant_dead_latent(build_topk(d_sae=256, k=2), i=0), build_tokens(6, 32)
    r = dead_latents.run(sae, tiny_lm, HOOK, toks, batch_size=4, batch_tokens=30, dead_batches=2, window_tokens=90)
    x = tiny_lm.activations(toks, HOOK)[:, 1:].reshape(-1, 64)  # drop BOS, stream order
    dense = sae.encode(x) != 0  # (186, d_sae)
    ref = DeadLatentTracker(256, 2, 90)
    for a in range(0, 180, 30):
        ref.update(dense[a : a + 30].any(0), 30)
    assert r["n_dead_batches"] == int(ref.dead_by_batches().sum())
    assert r["n_dead_tokens"] == int(ref.dead_by_tokens().sum())
    assert bool(ref.dead_by_batches()[0]) and bool(ref.dead_by_tokens()[0])
    assert r["median_density"] == pytest.approx(float((dense[:180].double().mean(0)).median()))


def test_short_stream_keeps_4096_token_batches_and_says_so(tiny_lm):
    sae = plant_dead_latent(build_topk(d_sae=16, k=8), 0)
    r = dead_latents.run(sae, tiny_lm, HOOK, build_tokens(2, 16), dead_batches=5, batch_size=1)
    assert r["batch_tokens"] == 4096 and r["n_tokens"] == 30  # every token still counts for densities
    assert r["dead_fraction_batches"] is None and "20480 tokens" in r["note"] and "n_seqs" in r["note"]
    assert "dead_fraction_batches" not in scalars(r)  # no misleading TensorBoard scalar
    assert r["n_never_fired"] >= 1 and r["dead_fraction_tokens"] == pytest.approx(r["n_dead_tokens"] / 16)


def test_result_does_not_depend_on_batch_size(tiny_lm):
    toks, sae = build_tokens(8, 32), build_topk(d_sae=16, k=2)
    a = dead_latents.run(sae, tiny_lm, HOOK, toks, batch_size=1, batch_tokens=40)
    b = dead_latents.run(sae, tiny_lm, HOOK, toks, batch_size=8, batch_tokens=40)
    assert a == b


def test_figures(tiny_lm):
    r = dead_latents.run(build_topk(), tiny_lm, HOOK, build_tokens(2, 16))
    assert set(dead_latents.figures(r)) == {"density_histogram", "density_cdf"}


def test_deterministic(tiny_lm):
    toks = build_tokens(4, 32)
    a = dead_latents.run(build_topk(), tiny_lm, HOOK, toks, seed=1)
    b = dead_latents.run(build_topk(), tiny_lm, HOOK, toks, seed=1)
    assert a == b


def test_sum_positive_activity_test_is_smol_sae_s(tiny_lm):
    """activity_test sum_positive (smol-sae: a batch fires a latent if x_hid.sum(0) > 0) against a hand-fed tracker;
    a latent TopK keeps only with negative values fires under the default nonzero test and not under smol-sae's."""
    import torch

    sae, toks = build_topk(d_sae=16, k=16), build_tokens(6, 32)  # k = d_sae: every pre-activation is kept
    with torch.no_grad():
        sae.b_enc[5] = -50.0  # kept on every token, always negative
    kw = dict(batch_size=4, batch_tokens=30, dead_batches=2, window_tokens=90)
    nonzero = dead_latents.run(sae, tiny_lm, HOOK, toks, **kw)
    smol = dead_latents.run(sae, tiny_lm, HOOK, toks, activity_test="sum_positive", **kw)
    x = tiny_lm.activations(toks, HOOK)[:, 1:].reshape(-1, 64)
    acts = sae.encode(x).double()  # (186, 16) dense, raw kept values
    ref = DeadLatentTracker(16, 2, 90)
    for a in range(0, 180, 30):
        ref.update(acts[a : a + 30].sum(0) > 0, 30)
    assert smol["n_dead_batches"] == int(ref.dead_by_batches().sum()) >= 1
    assert smol["n_dead_tokens"] == int(ref.dead_by_tokens().sum())
    assert nonzero["n_dead_batches"] == 0 and bool(ref.dead_by_batches()[5])
    assert smol["median_density"] == nonzero["median_density"]  # densities count nonzero activations either way
    with pytest.raises(ValueError, match="activity_test"):
        dead_latents.run(sae, tiny_lm, HOOK, toks, activity_test="positive", **kw)


def test_dead_by_tokens_counts_a_short_streams_last_partial_batch_by_its_tokens(tiny_lm):
    from gsae.evals import dead_latents
    from gsae.metrics import DeadLatentTracker
    from tests.evals.helpers import HOOK, build_tokens, build_topk

    sae, toks = build_topk(d_sae=256, k=2), build_tokens(6, 32)
    r = dead_latents.run(sae, tiny_lm, HOOK, toks, batch_size=4, batch_tokens=40, dead_batches=10, window_tokens=30)
    assert r["n_tokens"] == 186 and r["dead_fraction_batches"] is None  # short: 4 batches of 40, then 26
    x = tiny_lm.activations(toks, HOOK)[:, 1:].reshape(-1, 64)
    dense = sae.encode(x) != 0
    ref = DeadLatentTracker(256, 10, 30)
    for a in range(0, 186, 40):
        ref.update(dense[a : a + 40].any(0), min(40, 186 - a))
    assert r["n_dead_tokens"] == int(ref.dead_by_tokens().sum())


def test_density_summary_of_known_densities():
    """The density numbers of hand-picked fire counts over 10⁶ tokens (densities 0, 0, 2e-6, 5e-6, 1.5e-4, 1.5e-3,
    0.02, 0.2, 1): never-fired latents apart, densities below ``log10_min`` in the first bin, a latent firing on every
    token in the last bin and under the CDF's last point, medians over all and over alive latents, the 1% / 10%
    fractions; a bin width that does not divide ``log10_min`` still reaches density 1 (log10 = 0)."""
    import torch

    counts = torch.tensor([0, 0, 2, 5, 150, 1500, 20_000, 200_000, 1_000_000])
    tracker = DeadLatentTracker(9, 5, 100)
    r = dead_latents._summary(tracker, counts, 1_000_000, 4096, 5, 100, -5.0, 1.0)
    assert r["n_never_fired"] == 2 and r["alive_fraction"] == 7 / 9
    assert r["log10_density_hist"]["edges"] == pytest.approx([-5, -4, -3, -2, -1, 0])
    assert r["log10_density_hist"]["counts"] == [2, 1, 1, 1, 2]
    assert r["density_cdf"]["fraction"] == pytest.approx([4 / 9, 4 / 9, 5 / 9, 6 / 9, 7 / 9, 1.0])
    assert r["median_density"] == pytest.approx(1.5e-4, rel=1e-12)  # density = count / n_tokens, exactly
    assert r["median_density_alive"] == pytest.approx(1.5e-3, rel=1e-12)
    assert r["frac_density_above_1pct"] == pytest.approx(3 / 9)
    assert r["frac_density_above_10pct"] == pytest.approx(2 / 9)
    odd = dead_latents._summary(tracker, counts, 1_000_000, 4096, 5, 100, -5.0, 0.75)
    edges = odd["log10_density_hist"]["edges"]
    assert edges[0] == -5.0 and edges[-1] >= 0.0 and edges[1] - edges[0] == pytest.approx(0.75)
    assert sum(odd["log10_density_hist"]["counts"]) == 7 and odd["density_cdf"]["fraction"][-1] == 1.0


def test_contexts_for_window_is_the_fewest_contexts_holding_the_batches(tiny_lm):
    """``contexts_for_window`` against a count by hand (31 counted tokens per BOS-first context of 32): the fewest leading
    contexts holding ``dead_batches × batch_tokens`` tokens; with exactly that many tokens ``run`` computes the batches
    definition, with one context fewer it says the stream is short."""
    toks = build_tokens(6, 32)
    for dead_batches, batch_tokens in ((2, 31), (3, 40), (1, 186)):
        need, held, want = dead_batches * batch_tokens, 0, None
        for i in range(6):
            held += 31
            if held >= need:
                want = i + 1
                break
        n = dead_latents.contexts_for_window(tiny_lm, toks, dead_batches=dead_batches, batch_tokens=batch_tokens)
        assert n == want, (dead_batches, batch_tokens)
    sae = build_topk(d_sae=16, k=8)
    exact = dead_latents.run(sae, tiny_lm, HOOK, toks[:2], batch_tokens=31, dead_batches=2)  # 62 tokens: exactly enough
    assert exact["dead_fraction_batches"] is not None and exact["n_tokens"] == 62
    short = dead_latents.run(sae, tiny_lm, HOOK, toks[:1], batch_tokens=31, dead_batches=2)
    assert short["dead_fraction_batches"] is None
    assert dead_latents.contexts_for_window(tiny_lm, toks, dead_batches=7, batch_tokens=31) == 6  # never enough: all


def test_sum_positive_of_a_dense_sae_sums_its_negative_latents_too(tiny_lm):
    """A dense SAE's latents (here the identity: the activation's coordinates, of both signs) under ``sum_positive``:
    a latent fired in a batch iff its summed activation is > 0, against a hand-fed tracker. A latent that never fires
    sums to exactly 0, which is not > 0: dead under ``sum_positive`` as under ``nonzero``."""
    from tests.evals.helpers import IdentitySAE

    toks = build_tokens(6, 32)
    kw = dict(batch_size=4, batch_tokens=30, dead_batches=2, window_tokens=90)
    r = dead_latents.run(IdentitySAE(64), tiny_lm, HOOK, toks, activity_test="sum_positive", **kw)
    x = tiny_lm.activations(toks, HOOK)[:, 1:].reshape(-1, 64).double()
    ref = DeadLatentTracker(64, 2, 90)
    for a in range(0, 180, 30):
        ref.update(x[a : a + 30].sum(0) > 0, 30)
    assert r["n_dead_batches"] == int(ref.dead_by_batches().sum()) >= 1
    assert r["n_dead_tokens"] == int(ref.dead_by_tokens().sum())
    planted = plant_dead_latent(build_topk(d_sae=16, k=4), i=3)
    p = dead_latents.run(planted, tiny_lm, HOOK, toks, activity_test="sum_positive", **kw)
    acts = planted.encode(x.float()).double()  # dense, zeros where a latent was not kept
    ref = DeadLatentTracker(16, 2, 90)
    for a in range(0, 180, 30):
        ref.update(acts[a : a + 30].sum(0) > 0, 30)
    assert bool(ref.dead_by_batches()[3]) and bool(ref.dead_by_tokens()[3])
    assert p["n_dead_batches"] == int(ref.dead_by_batches().sum())
    assert p["n_dead_tokens"] == int(ref.dead_by_tokens().sum())
