"""Sensitive directions (SPEC §3): direction definitions, the batched sweep against a naive loop, substitution."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gsae.evals import sensitive_directions as sd
from gsae.evals.directions import (
    DIRECTION_TYPES,
    FEATURE_POOLS,
    ActivationStats,
    batch_acts,
    feature_pools,
    fit_activation_stats,
    generator,
    make_direction,
    sample_cov_random,
    sample_real_other,
)
from gsae.metrics import kl_div_per_token
from gsae.sae.base import SAEOutput, SparseAutoencoder
from tests.conftest import build_topk

HOOK = "blocks.1.hook_resid_pre"


class IdentitySAE(SparseAutoencoder):
    """Returns ``x`` exactly; no latent ever fires."""

    def forward(self, x, grad=None, dead_mask=None):
        zero = x.new_zeros(())
        idx = torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)
        return SAEOutput(x, x.new_zeros(x.shape[0], 1), idx, None, x.new_zeros(x.shape[0], self.d_sae), zero, zero)


def build_stats(d: int = 8, n_real: int = 50, seed: int = 0, **kw) -> ActivationStats:
    """Stats with a random mean and a random positive-definite covariance."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g)
    cov = a @ a.T / d + 0.5 * torch.eye(d)
    fields = dict(
        mean=torch.randn(d, generator=g),
        cov=cov,
        chol=torch.linalg.cholesky(cov),
        median_norm=3.0,
        real=torch.randn(n_real, d, generator=g),
        n_rows=n_real,
        fired=None,
    )
    return ActivationStats(**{**fields, **kw})


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def sae():
    return build_topk(d_in=64, d_sae=128, k=4)


def cos(a, b):
    return F.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=-1)


def test_every_direction_has_unit_norm(tiny_lm, tokens, sae):
    (r,) = batch_acts(sae, tiny_lm, HOOK, tokens, batch_size=4)
    stats = fit_activation_stats([r], max_real_pool=1000, seed=0)
    pools = feature_pools(stats, r.fired)
    for kind in DIRECTION_TYPES:
        pool = pools.get(FEATURE_POOLS.get(kind, ""))
        if pool is not None and pool.numel() == 0:
            continue
        u = make_direction(kind, r.x, generator(0, 0, kind), stats, r.x_hat, sae.W_dec, pool)
        assert u.shape == r.x.shape
        torch.testing.assert_close(u.norm(dim=-1), torch.ones(u.shape[:-1]), msg=kind)


def test_mixture_directions_do_not_contain_minus_x():
    stats = build_stats()
    x = 1000.0 * torch.randn(2, 50, 8)  # ‖x‖ ≫ the spread of the reference activations
    mixtures = [make_direction(k, x, generator(0, k), stats) for k in ("cov_random_mixture", "real_mixture")]
    differences = [
        make_direction(k, x, generator(0, k), stats) for k in ("isotropic", "cov_random_difference", "real_difference")
    ]
    for u in mixtures:  # independent of x: cos(u, −x) ~ ±1/√d, not systematically 1
        assert cos(u, -x).abs().mean() < 0.5
    for u in differences:  # t − x ≈ −x
        assert cos(u, -x).min() > 0.95


def test_cov_random_samples_reproduce_mean_and_cov():
    stats = build_stats(d=6)
    v = sample_cov_random(stats, 200_000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(v.mean(0), stats.mean, atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(v.T), stats.cov, atol=0.03, rtol=0)


def test_fitted_stats_match_torch_cov_without_position_0(tiny_lm, tokens, sae):
    acts = list(batch_acts(sae, tiny_lm, HOOK, tokens, batch_size=3, with_sae=False))
    stats = fit_activation_stats(acts, max_real_pool=10, seed=0)
    a = tiny_lm.activations(tokens, HOOK)[:, 1:].reshape(-1, 64)
    torch.testing.assert_close(stats.mean, a.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.cov, torch.cov(a.T) + 0.01 * torch.eye(64), atol=1e-4, rtol=1e-4)
    assert stats.real.shape == (10, 64) and stats.n_rows == a.shape[0] and stats.fired is None
    assert (stats.real[:, None] == a[None]).all(-1).any(-1).all()  # the pool holds real rows (position > 0)
    # the pool is a uniform subset that does not depend on how the activations were batched
    again = fit_activation_stats(
        batch_acts(sae, tiny_lm, HOOK, tokens, batch_size=4, with_sae=False), max_real_pool=10, seed=0
    )
    torch.testing.assert_close(again.real, stats.real)
    assert stats.median_norm == pytest.approx(float(a.norm(dim=-1).median()), rel=1e-6)  # position 0 left out too
    # bfloat16 activations: the statistics in float32 (a bfloat16 Σ is too coarse to sample), over the same rows
    half = [r._replace(x=r.x.bfloat16()) for r in acts]
    stats16 = fit_activation_stats(half, max_real_pool=10, seed=0)
    assert stats16.mean.dtype == stats16.cov.dtype == stats16.chol.dtype == stats16.real.dtype == torch.float32
    a16 = torch.cat([r.x[:, 1:].reshape(-1, 64).float() for r in half])
    torch.testing.assert_close(stats16.cov, torch.cov(a16.T) + 0.01 * torch.eye(64), atol=1e-4, rtol=1e-4)
    one = [acts[0]._replace(x=acts[0].x[:1, :2])]  # a single activation at a position > 0: no covariance
    with pytest.raises(ValueError, match="at least 2 activations"):
        fit_activation_stats(one, max_real_pool=10, seed=0)
    with pytest.raises(ValueError, match="at least 2 rows"):
        sample_real_other(stats._replace(real=stats.real[:1]), a[:3], torch.Generator().manual_seed(0))


def test_fired_per_sequence_is_every_latent_nonzero_somewhere_in_the_sequence():
    """Against a loop over the tokens, for a dense SAE's latents and a TopK SAE's (index, value) pairs, where a
    selected latent of value 0 (TopK keeps the k largest, ReLU-ed: some may be 0) did not fire."""
    from gsae.evals.directions import fired_per_sequence

    n_seq, T, d_sae, k = 3, 4, 10, 3
    gen = torch.Generator().manual_seed(0)
    latents = torch.relu(torch.randn(n_seq * T, d_sae, generator=gen)) * (torch.rand(n_seq * T, d_sae, generator=gen) < 0.2)
    latents[:T] = 0  # a sequence where nothing fires
    top_acts, top_idx = latents.topk(k, dim=-1)
    want = torch.zeros(n_seq, d_sae, dtype=torch.bool)
    for row in range(n_seq * T):
        for j in range(d_sae):
            if latents[row, j] != 0:
                want[row // T, j] = True
    assert want.any() and not want[0].any() and not want.all()
    zero = torch.zeros(())
    dense = SAEOutput(latents, None, None, latents, latents, zero, zero)
    topk = SAEOutput(latents, top_acts, top_idx, None, latents, zero, zero)
    assert torch.equal(fired_per_sequence(dense, n_seq, d_sae), want)
    assert torch.equal(fired_per_sequence(topk, n_seq, d_sae), want)
    # the statistics' alive latents: fired in some sequence of any batch (a union over the batches)
    from gsae.evals.directions import BatchActs

    x = torch.randn(2 * n_seq, T, 5, generator=gen)
    batches = [BatchActs(None, x[:n_seq], None, want), BatchActs(None, x[n_seq:], None, want.roll(1, dims=-1))]
    assert torch.equal(fit_activation_stats(batches, max_real_pool=4, seed=0).fired,
                       want.any(0) | want.roll(1, dims=-1).any(0))


def test_length_zero_gives_zero_kl_and_l2(tiny_lm, tokens, sae):
    res = sd.run(
        sae, tiny_lm, HOOK, tokens, lengths=[0, 5], direction_types=["isotropic", "sae_error"], substitution=False
    )
    for c in res["curves"].values():
        assert c["kl"][0] == pytest.approx(0, abs=1e-7) and c["l2"][0] == pytest.approx(0, abs=1e-6)
        assert c["kl"][1] > 0


def test_identity_sae_substitution_is_exact(tiny_lm, tokens):
    res = sd.run(IdentitySAE(64, 64), tiny_lm, HOOK, tokens, lengths=[1.0])
    sub = res["substitution"]
    assert sub["epsilon_mean"] == 0 and sub["n_exact_tokens"] == tokens.shape[0] * (tokens.shape[1] - 1)
    assert all(v == pytest.approx(0, abs=1e-7) for v in sub["kl"].values())
    assert all(v is None for v in sub["ratio"].values())
    assert res["curves"]["sae_error"]["kl"][0] == pytest.approx(0, abs=1e-7)  # no error direction to follow
    assert {"sae_feature_alive", "sae_feature_active"} <= set(res["skipped"])  # empty pools are reported
    assert "sae_feature_dead" in res["curves"]


@torch.no_grad()
def naive_curves(lm, hook, tokens, deltas, lengths, read, final):
    """Reference: one full forward with a TransformerLens patch hook per (direction, length)."""
    clean = {}
    logits_clean = lm.model.run_with_hooks(tokens, fwd_hooks=[(final, lambda a, hook: clean.__setitem__("h", a))])
    out = {}
    for name, delta in deltas.items():
        kls, l2s = [], []
        for length in lengths:
            store = {}
            logits = lm.model.run_with_hooks(
                tokens,
                fwd_hooks=[
                    (hook, lambda a, hook, d=delta, s=length: a + s * d),
                    (final, lambda a, hook, store=store: store.__setitem__("h", a)),
                ],
            )
            kls.append(float(kl_div_per_token(logits_clean, logits)[:, read].mean()))
            l2s.append(float((store["h"] - clean["h"])[:, read].norm(dim=-1).mean()))
        out[name] = (kls, l2s)
    return out


@pytest.mark.parametrize(
    ("hook", "mode"),
    [(HOOK, "all_tokens"), (HOOK, "single_token"), ("blocks.0.hook_mlp_out", "all_tokens")],
)
def test_batched_sweep_equals_naive_full_forward_loop(tiny_lm, tokens, sae, hook, mode):
    kinds, lengths, seed = ["cov_random_mixture", "real_difference", "sae_feature_active"], [1.0, 30.0], 3
    # forward_tokens=60 → 5 sequences per forward, 4 per job: chunks straddle lengths and direction types
    res = sd.run(
        sae,
        tiny_lm,
        hook,
        tokens,
        seed=seed,
        lengths=lengths,
        direction_types=kinds,
        mode=mode,
        position=4,
        n_offsets=5,
        forward_tokens=60,
    )
    (r,) = batch_acts(sae, tiny_lm, hook, tokens, batch_size=64)
    stats = fit_activation_stats([r], max_real_pool=65536, seed=seed)
    pools = feature_pools(stats, r.fired)
    perturb = torch.ones(tokens.shape[1], 1)
    if mode == "single_token":
        perturb = torch.zeros(tokens.shape[1], 1)
        perturb[4] = 1
    deltas = {}
    for k in kinds:  # directions are drawn per sequence, for the positions run: up to the last one read
        x = r.x[:, : 4 + 5] if mode == "single_token" else r.x[:, :-1]
        pool = pools.get(FEATURE_POOLS.get(k, ""))
        u = torch.cat(
            [
                make_direction(k, x[i : i + 1], generator(seed, i, k), stats, r.x_hat[i : i + 1, : x.shape[1]], sae.W_dec, pool)
                for i in range(x.shape[0])
            ]
        )
        deltas[k] = F.pad(u, (0, 0, 0, tokens.shape[1] - x.shape[1])) * perturb
    deltas["sae"] = (r.x_hat - r.x) * perturb
    read = slice(4, 9) if mode == "single_token" else slice(0, -1)
    ref = naive_curves(tiny_lm, hook, tokens, deltas, lengths, read, sd.final_hook(tiny_lm))
    for k in kinds:
        if mode == "single_token":
            got_kl = [sum(row) / len(row) for row in res["curves"][k]["kl_by_offset"]]
            got_l2 = [sum(row) / len(row) for row in res["curves"][k]["l2_by_offset"]]
        else:
            got_kl, got_l2 = res["curves"][k]["kl"], res["curves"][k]["l2"]
        torch.testing.assert_close(torch.tensor(got_kl), torch.tensor(ref[k][0]), rtol=1e-4, atol=1e-6, msg=k)
        torch.testing.assert_close(torch.tensor(got_l2), torch.tensor(ref[k][1]), rtol=1e-4, atol=1e-5, msg=k)
    sub = res["substitution"]  # length 1 · (SAE(x) − x) is the substitution
    got = sub["kl"]["sae"] if mode == "all_tokens" else sum(sub["kl_by_offset"]["sae"]) / 5
    assert got == pytest.approx(ref["sae"][0][0], rel=1e-4, abs=1e-6)


def test_same_seed_same_numbers(tiny_lm, tokens, sae, monkeypatch):
    kw = dict(lengths=[2.0, 10.0], direction_types=["isotropic", "real_mixture", "sae_feature_dead"], batch_size=2)
    a, b = sd.run(sae, tiny_lm, HOOK, tokens, seed=5, **kw), sd.run(sae, tiny_lm, HOOK, tokens, seed=5, **kw)
    c = sd.run(sae, tiny_lm, HOOK, tokens, seed=6, **kw)
    assert a == b
    monkeypatch.setattr(sd, "CACHE_ELEMENTS", 0)  # recompute activations in the second pass: same numbers
    torch.testing.assert_close(sd.run(sae, tiny_lm, HOOK, tokens, seed=5, **kw)["curves"], a["curves"])
    assert a["curves"]["isotropic"]["kl"] != c["curves"]["isotropic"]["kl"]


def test_single_token_mode_leaves_earlier_positions_alone(tiny_lm, tokens, sae):
    res = sd.run(sae, tiny_lm, HOOK, tokens, lengths=[3.0, 20.0], mode="single_token", position=5, n_offsets=4)
    assert res["position"] == 5
    for c in res["curves"].values():
        assert c["kl_before_position"] == [0.0, 0.0]
        assert len(c["kl_by_offset"][0]) == 4 and c["kl_by_offset"][1][0] > 0
        assert c["kl"] == [row[0] for row in c["kl_by_offset"]]
        assert c["n_tokens"] == tokens.shape[0]  # the means at p: one token per sequence
    assert len(res["substitution"]["kl_by_offset"]["sae"]) == 4


def test_result_is_json_and_figures_draw(tiny_lm, tokens, sae):
    import json

    res = sd.run(sae, tiny_lm, HOOK, tokens, lengths=[1.0, 9.0], direction_types=["isotropic", "cov_random_mixture"])
    json.dumps(res, allow_nan=False)
    assert res["lengths"] == [1.0, 9.0] and res["n_tokens"] == tokens.shape[0] * (tokens.shape[1] - 1)
    for kind, c in res["curves"].items():  # the scalar summary is the curve's mean over the lengths
        assert res[f"kl_mean_over_lengths_{kind}"] == pytest.approx((c["kl"][0] + c["kl"][1]) / 2, rel=1e-12), kind
    assert all(math.isfinite(v) for v in res["substitution"]["ratio"].values())
    assert set(sd.figures(res)) == {"kl_vs_length", "l2_vs_length", "substitution_kl"}


def test_default_lengths_and_option_errors(tiny_lm, tokens, sae):
    assert len(sd.DEFAULT_LENGTHS) == 23 and sd.DEFAULT_LENGTHS[0] == 1 and sd.DEFAULT_LENGTHS[-1] == 91
    with pytest.raises(ValueError, match="direction_types"):
        sd.run(sae, tiny_lm, HOOK, tokens, direction_types=["bogus"])
    with pytest.raises(ValueError, match="position"):
        sd.run(sae, tiny_lm, HOOK, tokens, mode="single_token", position=11)


def test_g_sae_and_skip_first(tiny_lm, tokens):
    from gsae.sae import GradTopKSAE

    sae = GradTopKSAE(64, d_sae=128, k=4, beta=10.0)
    res = sd.run(
        sae,
        tiny_lm,
        HOOK,
        tokens,
        lengths=[0.0, 4.0],
        direction_types=["sae_error", "sae_feature_active"],
        skip_first=True,
    )
    assert res["n_tokens"] == tokens.shape[0] * (tokens.shape[1] - 2)
    assert res["curves"]["sae_error"]["kl"][0] == pytest.approx(0, abs=1e-7) and res["kl_sae"] > 0


# ---------------------------------------------------------------------- issue 10 item 7
def test_eps_baselines_have_the_norm_of_the_sae_error(tiny_lm, tokens, sae):
    """``‖ε·u‖ = ‖SAE(x) − x‖`` per token for every ε-baseline, with a non-identity SAE."""
    from gsae.evals.directions import EPS_BASELINES, batch_deltas

    (r,) = batch_acts(sae, tiny_lm, HOOK, tokens, batch_size=4)
    stats = fit_activation_stats([r], max_real_pool=1000, seed=0)
    perturb = torch.ones(tokens.shape[1] - 1, dtype=torch.bool)
    deltas, _ = batch_deltas(
        [], r, stats, sae.W_dec, perturb, seed=0, first_seq=0, block_fired={0: r.fired}, substitution=True
    )
    err = (r.x_hat - r.x)[:, :-1].norm(dim=-1)
    assert err.min() > 0.1  # a real reconstruction error
    torch.testing.assert_close(deltas["sae"].norm(dim=-1), err)
    for name in EPS_BASELINES:
        torch.testing.assert_close(deltas[name].norm(dim=-1), err, rtol=1e-5, atol=1e-5, msg=name)
        assert cos(deltas[name], deltas["sae"]).abs().mean() < 0.5, name  # a different direction
    # each kind draws its own numbers: the ε-baselines are not the sweep's directions of the same sequence scaled by ε
    # (drawn from one generator they would be: the ε-isotropic g is the isotropic g, s·g − x ≈ s·g), and each mixture
    # baseline is its own mixture kind, whose direction does not point away from x
    sweep, _ = batch_deltas(["isotropic", "cov_random_mixture", "real_mixture"], r, stats, sae.W_dec, perturb, seed=0,
                            first_seq=0, block_fired={0: r.fired}, substitution=False)
    assert cos(deltas["eps_isotropic"], sweep["isotropic"]).abs().mean() < 0.5
    for name, kind in {"eps_cov_mixture": "cov_random_mixture", "eps_real_mixture": "real_mixture"}.items():
        torch.testing.assert_close(deltas[name], err[..., None] * sweep[kind], rtol=1e-5, atol=1e-5, msg=name)
    # a sequence's substitution deltas are its own, whichever memory batch it is in (sequences 2-3 as a batch of 2)
    tail = r._replace(tokens=r.tokens[2:], x=r.x[2:], x_hat=r.x_hat[2:], fired=r.fired[2:])
    alone, _ = batch_deltas([], tail, stats, sae.W_dec, perturb, seed=0, first_seq=2, block_fired={0: r.fired},
                            substitution=True)
    for name, v in alone.items():
        torch.testing.assert_close(v, deltas[name][2:], rtol=0, atol=0, msg=name)
    # special tokens (keep False) are left unpatched by the SAE and by every ε-baseline alike; the rest is unchanged
    keep = torch.ones(r.x.shape[:2], dtype=torch.bool)
    keep[:, 0], keep[1, 5] = False, False
    kept, _ = batch_deltas([], r, stats, sae.W_dec, perturb, seed=0, first_seq=0, block_fired={0: r.fired},
                           substitution=True, keep=keep)
    for name in ("sae", *EPS_BASELINES):
        assert not kept[name][~keep[:, :-1]].any(), name
        torch.testing.assert_close(kept[name][keep[:, :-1]], deltas[name][keep[:, :-1]], rtol=0, atol=0, msg=name)


def test_feature_pools_on_a_planted_case():
    """Latents 0-1 fire in the block, 2-3 fire elsewhere only (alive, inactive here), 4-5 never fire (dead)."""
    stats = build_stats(fired=torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool))
    block = torch.tensor([[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)  # per sequence of the block
    pools = feature_pools(stats, block)
    assert pools["active"].tolist() == [0, 1]
    assert pools["alive"].tolist() == [2, 3]
    assert pools["dead"].tolist() == [4, 5]
    # the pools come from 64-sequence blocks, not the memory batch: a direction of a sequence uses only its block
    W = torch.eye(6, 8)
    x = torch.zeros(1, 5, 8)
    u = make_direction("sae_feature_alive", x, generator(0, 0, "a"), stats, W_dec=W, pool=pools["alive"])
    assert set(u.reshape(-1, 8).argmax(-1).tolist()) == {2, 3}  # only the pool's latents, each of them drawn


def _unit(v):
    return v / v.norm()


def test_directions_against_an_independent_per_token_implementation():
    """Each direction type rebuilt token by token from its SPEC §3.2 formula (own Cholesky, own loops),
    consuming the generator in the same order, equals ``make_direction``."""
    stats = build_stats(d=8, n_real=30)
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(9))
    x[0, 0] = stats.real[4]  # a token equal to a real activation: real_difference must redraw for it
    flat = x.reshape(-1, 8)
    n = flat.shape[0]
    L = torch.linalg.cholesky(stats.cov)  # recomputed, not stats.chol
    W = torch.randn(10, 8, generator=torch.Generator().manual_seed(3))
    pool = torch.tensor([1, 4, 7])

    def ref(kind):
        g = generator(0, kind)
        if kind == "isotropic":
            z = torch.randn(n, 8, generator=g)
            return torch.stack([_unit(stats.median_norm * z[i] - flat[i]) for i in range(n)])
        if kind in ("cov_random_difference", "cov_random_mixture"):
            t = torch.stack([stats.mean + L @ zi for zi in torch.randn(n, 8, generator=g)])
            if kind == "cov_random_difference":
                return torch.stack([_unit(t[i] - flat[i]) for i in range(n)])
            t2 = torch.stack([stats.mean + L @ zi for zi in torch.randn(n, 8, generator=g)])
            return torch.stack([_unit(t[i] - t2[i]) for i in range(n)])
        if kind in ("real_difference", "real_mixture"):
            if kind == "real_mixture":
                first = torch.randint(30, (n,), generator=g)
                avoid = stats.real[first]
            else:
                avoid = flat
            idx = torch.randint(30, (n,), generator=g)
            for _ in range(10):
                same = [i for i in range(n) if torch.equal(stats.real[idx[i]], avoid[i])]
                if not same:
                    break
                idx[same] = torch.randint(30, (len(same),), generator=g)
            if kind == "real_mixture":
                return torch.stack([_unit(avoid[i] - stats.real[idx[i]]) for i in range(n)])
            return torch.stack([_unit(stats.real[idx[i]] - flat[i]) for i in range(n)])
        ids = pool[torch.randint(3, (n,), generator=g)]
        return torch.stack([_unit(W[i]) for i in ids])

    for kind in ("isotropic", "cov_random_difference", "cov_random_mixture", "real_difference", "real_mixture",
                 "sae_feature_alive"):
        got = make_direction(kind, x, generator(0, kind), stats, W_dec=W, pool=pool).reshape(n, 8)
        torch.testing.assert_close(got, ref(kind), rtol=1e-4, atol=1e-5, msg=kind)
    got = make_direction("real_difference", x, generator(0, "real_difference"), stats).reshape(n, 8)
    assert (got[0] != 0).any()  # the token equal to a real activation got another one


def test_substitution_leaves_special_tokens_mid_sequence_unpatched_and_uncounted(tiny_lm, tokens, sae):
    from gsae.lm import BYTE_BOS

    toks = tokens.clone()
    toks[:, 0] = BYTE_BOS
    toks[1, 6] = BYTE_BOS  # mid-sequence
    kw = dict(lengths=[1.0], direction_types=["isotropic"])
    res = sd.run(sae, tiny_lm, HOOK, toks, **kw)
    n_read = toks.shape[0] * (toks.shape[1] - 1)
    assert res["substitution"]["n_tokens"] == n_read - toks.shape[0] - 1  # BOS at 0 (×4) and at (1, 6)
    assert res["curves"]["isotropic"]["n_tokens"] == n_read  # the length sweep perturbs every position
    # reference: splice SAE(x) in at the non-special positions with a patch hook; KL mean over them
    (r,) = batch_acts(sae, tiny_lm, HOOK, toks, batch_size=64)
    keep = toks != BYTE_BOS
    x_new = torch.where(keep[..., None], r.x_hat, r.x)
    with torch.no_grad():
        clean = tiny_lm.model(toks)
        patched = tiny_lm.model.run_with_hooks(toks, fwd_hooks=[(HOOK, lambda a, hook: x_new)])
    kl = kl_div_per_token(clean, patched)[:, :-1][keep[:, :-1]].mean()
    assert res["substitution"]["kl"]["sae"] == pytest.approx(float(kl), rel=1e-4)
    assert sd.run(sae, tiny_lm, HOOK, toks, substitution_exclude_special=False, **kw)["substitution"]["n_tokens"] == n_read


def test_substitution_epsilon_and_every_kinds_mean_cover_the_same_non_special_tokens(tiny_lm, tokens, sae, monkeypatch):
    """``epsilon_mean`` is the mean ‖SAE(x) − x‖ over the substituted tokens (the non-special positions run), from the
    LM's activations and the SAE directly; the SAE's and every ε-baseline's mean KL are the per-token KLs (as
    :func:`perturbation_runs` returned them) averaged over those same tokens: a BOS counted in one baseline's mean but
    not in the SAE's biases the ratio."""
    from gsae.evals.directions import EPS_BASELINES
    from gsae.lm import BYTE_BOS

    toks = tokens.clone()
    toks[:, 0] = BYTE_BOS
    toks[1, 6] = BYTE_BOS
    seen = []
    real = sd.perturbation_runs

    def spy(*args, **kwargs):
        res = real(*args, **kwargs)
        seen.append(res.kl)
        return res

    monkeypatch.setattr(sd, "perturbation_runs", spy)
    res = sd.run(sae, tiny_lm, HOOK, toks, lengths=[1.0], direction_types=[], batch_size=64)
    keep = (toks != BYTE_BOS)[:, :-1]
    x = tiny_lm.activations(toks, HOOK)[:, :-1]
    with torch.no_grad():
        err = (sae(x.reshape(-1, 64)).x_hat.reshape(x.shape) - x).norm(dim=-1)
    sub = res["substitution"]
    assert sub["epsilon_mean"] == pytest.approx(float(err[keep].mean()), rel=1e-5)
    assert sub["n_exact_tokens"] == 0 and sub["n_tokens"] == int(keep.sum()) == 4 * 11 - 5
    (kl,) = seen  # one forward group: the jobs are "sae", then the baselines, each at scale 1
    assert kl.shape[0] == 1 + len(EPS_BASELINES)
    for j, kind in enumerate(("sae", *EPS_BASELINES)):
        assert float(kl[j][keep].mean()) > 0
        assert sub["kl"][kind] == pytest.approx(float(kl[j][keep].double().mean()), rel=1e-5), kind


def test_feature_pool_blocks_do_not_depend_on_the_batch_size(tiny_lm, sae):
    """The feature pools are per block of ``pool_seqs`` sequences counted over the whole run, not per memory batch:
    with 2-sequence blocks, batches of 2 or 4 give the feature kinds of one batch of all 6 sequences (where every
    sequence's index in its batch is its index in the run)."""
    tok = torch.randint(0, 256, (6, 12), generator=torch.Generator().manual_seed(4))
    kw = dict(lengths=[3.0], direction_types=["sae_feature_active", "sae_feature_alive"], substitution=False,
              pool_seqs=2)
    ref = sd.run(sae, tiny_lm, HOOK, tok, batch_size=6, **kw)
    assert ref["curves"]["sae_feature_active"]["n_tokens"] == 6 * 11
    for batch_size in (2, 4):
        _close(sd.run(sae, tiny_lm, HOOK, tok, batch_size=batch_size, **kw), ref)


def test_single_token_default_position_is_gurnee_32():
    assert sd.window("single_token", 128, None, 17, False).position == 32
    assert sd.window("single_token", 12, None, 17, False).position == 10  # T − 2 for short contexts


def test_windows_never_read_the_last_position_and_skip_first_leaves_position_0_alone():
    """The positions perturbed and read, by hand: the last position predicts nothing and is never read (nor run);
    ``n_offsets`` past it is cut; ``skip_first`` neither perturbs nor reads position 0."""
    w = sd.window("single_token", 12, None, 17, False)  # p = 10: only position 10 is left to read
    assert (w.t_run, w.read.tolist(), w.perturb.tolist()) == (11, [10], [False] * 10 + [True])
    w = sd.window("single_token", 12, 4, 3, False)
    assert (w.t_run, w.read.tolist(), w.perturb.nonzero().flatten().tolist()) == (7, [4, 5, 6], [4])
    for skip in (False, True):
        w = sd.window("all_tokens", 12, None, 17, skip)
        assert w.t_run == 11 and w.read.tolist() == list(range(int(skip), 11))
        assert w.perturb.tolist() == [not skip] + [True] * 10


def test_sweep_seqs_fits_the_statistics_on_every_context_and_perturbs_the_first(tiny_lm, sae):
    """μ, Σ and the real pool of GPT-2's 768 dimensions need far more tokens than a sweep can perturb (the configs'
    8 contexts of 128 gave a Σ from ~1k tokens; the sweeps' 2, a singular one): ``sweep_seqs`` perturbs the first
    contexts and fits the statistics on all of them."""
    tok = torch.randint(0, 256, (10, 12), generator=torch.Generator().manual_seed(2))
    kw = dict(lengths=[2.0, 8.0], batch_size=4)
    res = sd.run(sae, tiny_lm, HOOK, tok, sweep_seqs=3, **kw)
    alone = sd.run(sae, tiny_lm, HOOK, tok[:3], **kw)
    # the statistics: every context's activations at positions > 0 (against torch.cov of the LM's activations)
    a = tiny_lm.activations(tok, HOOK)[:, 1:].reshape(-1, 64).double()
    stats = res["stats"]
    assert stats["n_rows"] == a.shape[0] == 10 * 11 and stats["real_pool_size"] == 110
    assert stats["cov_trace"] == pytest.approx(float(torch.cov(a.T).trace()) + 0.01 * 64, rel=1e-4)
    assert stats["norm_of_mean"] == pytest.approx(float(a.mean(0).norm()), rel=1e-5)
    assert stats["median_norm"] == pytest.approx(float(a.norm(dim=-1).median()), rel=1e-5)
    assert alone["stats"]["n_rows"] == 3 * 11
    # the sweep: the first 3 contexts, as alone
    assert (res["n_sequences"], res["stats_sequences"], res["n_tokens"]) == (3, 10, alone["n_tokens"])
    # the latents alive: those fired on ANY context (their "alive on the dataset"), against the SAE on the LM's
    # activations; the swept 3 fit in one pool block, so alive-but-silent-there latents come from the other 7 only

    def fired(t):
        out = sae(tiny_lm.activations(t, HOOK).reshape(-1, 64))
        return torch.zeros(128, dtype=torch.bool).index_fill_(0, out.top_idx[out.top_acts != 0], True)

    assert stats["n_alive_latents"] == int(fired(tok).sum()) > alone["stats"]["n_alive_latents"] == int(fired(tok[:3]).sum())
    assert bool((fired(tok) & ~fired(tok[:3])).any()) and "sae_feature_alive" in res["curves"]
    assert "sae_feature_alive" in alone["skipped"]  # three contexts alone: every alive latent fired in the block
    # what does not read the statistics equals the sweep of those contexts alone: the SAE's error and active latents'
    # directions and the substitution itself
    for kind in ("sae_error", "sae_feature_active"):
        assert res["curves"][kind]["kl"] == pytest.approx(alone["curves"][kind]["kl"], rel=1e-5), kind
    assert res["substitution"]["kl"]["sae"] == pytest.approx(alone["substitution"]["kl"]["sae"], rel=1e-5)
    # what is drawn from the statistics changed (isotropic only by its scale, the median norm: a little)
    assert res["curves"]["isotropic"]["kl"] != alone["curves"]["isotropic"]["kl"]
    for kind in ("cov_random_mixture", "real_mixture"):
        assert res["curves"][kind]["kl"] != pytest.approx(alone["curves"][kind]["kl"], rel=1e-3), kind
    # the contexts past the swept ones are read on the grid of batch_size, as the other benchmarks read them (a TopK
    # SAE's dead_latents): [4:8] and [8:10] come from the shared harvests ([3:4] completes the swept ones' batch)
    from gsae.evals.common import batches, harvest, shared_harvests

    with shared_harvests() as cache:
        for t in batches(tok, 4):
            harvest(tiny_lm, HOOK, t)
        hits = cache.hits
        shared = sd.run(sae, tiny_lm, HOOK, tok, sweep_seqs=3, **kw)
    assert cache.hits - hits == 2 and shared == res
    # sweep_seqs at or above the contexts: the plain run; below 1: one line naming the option
    same = sd.run(sae, tiny_lm, HOOK, tok[:3], sweep_seqs=5, **kw)
    assert same["curves"] == alone["curves"] and same["stats_sequences"] == 3
    with pytest.raises(ValueError, match="sweep_seqs must be > 0"):
        sd.run(sae, tiny_lm, HOOK, tok, sweep_seqs=0, **kw)


def test_sweep_seqs_perturbs_only_the_first_contexts_when_the_activations_are_not_kept(tiny_lm, sae, monkeypatch):
    """Above :data:`CACHE_ELEMENTS` (a large evaluation, or a sweep of many SAEs through ``run_many``) pass 2 runs the
    prefix and the SAE again: it ran them on every context, not the ``sweep_seqs`` swept ones, so the length sweep
    and the substitution perturbed all 10 contexts (110 tokens for 33) while ``n_sequences`` said 3. Against the run
    that keeps its activations and the three contexts swept alone."""
    tok = torch.randint(0, 256, (10, 12), generator=torch.Generator().manual_seed(2))
    kw = dict(lengths=[2.0, 8.0], batch_size=4)
    kept = sd.run(sae, tiny_lm, HOOK, tok, sweep_seqs=3, **kw)
    alone = sd.run(sae, tiny_lm, HOOK, tok[:3], **kw)
    monkeypatch.setattr(sd, "CACHE_ELEMENTS", 0)
    again = sd.run(sae, tiny_lm, HOOK, tok, sweep_seqs=3, **kw)
    assert again["n_sequences"] == 3 and again["n_tokens"] == 3 * 11
    assert {k: c["n_tokens"] for k, c in again["curves"].items()} == {k: 3 * 11 for k in kept["curves"]}
    assert again["substitution"]["n_tokens"] == 3 * 11
    _close(again, kept)
    for kind in ("sae_error", "sae_feature_active"):  # what does not read the statistics: the three contexts' alone
        assert again["curves"][kind]["kl"] == pytest.approx(alone["curves"][kind]["kl"], rel=1e-5), kind
    assert again["substitution"]["kl"]["sae"] == pytest.approx(alone["substitution"]["kl"]["sae"], rel=1e-5)


def _close(a, b, where: str = "") -> None:
    """Nested results equal, floats to float32 round-off."""
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: {list(a)} vs {list(b)}"  # the same keys, in the same order
        for k in a:
            _close(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for x, y in zip(a, b):
            _close(x, y, where)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-9), where
    else:
        assert a == b, where


@pytest.mark.parametrize("mode", ["all_tokens", "single_token"])
def test_parts_merged_equal_one_run(tiny_lm, sae, mode):
    """The two parts the evaluation callback may run on two ranks (the activation-drawn directions; the SAE's own and
    the substitution), merged, give one run's result: every draw is seeded per (sequence, kind)."""
    from gsae.sae import GradTopKSAE

    tok = torch.randint(0, 256, (6, 12), generator=torch.Generator().manual_seed(3))
    opts = dict(lengths=[2.0, 8.0], batch_size=4, sweep_seqs=4, mode=mode, position=3 if mode == "single_token" else None,
                n_offsets=4, pool_seqs=2)
    parts = sd.parts(opts)
    assert [p["substitution"] for p in parts] == [False, True]
    assert sorted(parts[0]["direction_types"] + parts[1]["direction_types"]) == sorted(DIRECTION_TYPES)
    whole = sd.run(sae, tiny_lm, HOOK, tok, **opts)
    _close(sd.merge([sd.run(sae, tiny_lm, HOOK, tok, **{**opts, **p}) for p in parts]), whole)
    # a sweep's members (a g-SAE among them) through run_many, as the callback runs a chunk of members
    saes = {"topk": sae, "gsae": GradTopKSAE(64, d_sae=128, k=4, beta=10.0, seed=5).eval()}
    saes["gsae"].grad_normaliser.fill_(40.0)
    many = [sd.run_many(saes, tiny_lm, HOOK, tok, **{**opts, **p}) for p in parts]
    for m in saes:
        _close(sd.merge([r[m] for r in many]), sd.run(saes[m], tiny_lm, HOOK, tok, **opts), m)
    # nothing to cut: the activation-drawn kinds alone, or nothing of the SAE's and no substitution
    assert sd.parts({"direction_types": ["isotropic", "real_mixture"], "substitution": False}) == []
    assert sd.parts({"direction_types": ["sae_error"]}) == []


def test_substitution_ratio_is_the_saes_kl_over_each_baselines(tiny_lm):
    from gsae.evals import sensitive_directions as sd
    from tests.conftest import randomize
    from tests.evals.helpers import build_tokens, build_topk

    sae, tokens = randomize(build_topk(d_in=64, d_sae=128, k=8)), build_tokens(4, 16)
    res = sd.run(sae, tiny_lm, HOOK, tokens, lengths=[1.0, 9.0], direction_types=["isotropic"])
    sub = res["substitution"]
    assert sub["ratio"] and all(v is not None for v in sub["ratio"].values())
    for k, v in sub["ratio"].items():
        assert v == pytest.approx(sub["kl"]["sae"] / sub["kl"][k], rel=1e-12)
        assert res[f"ratio_sae_over_{k}"] == v
