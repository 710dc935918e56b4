"""Synthetic activations (SPEC §4.3): sparsity neighbourhoods, swaps that keep values, cosine matching, N(μ, Σ)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gsae.evals import synthetic_activations as syn
from tests.evals.helpers import build_topk


def density_of(counts: list[int] | torch.Tensor, n_tokens: int = 1000) -> syn.LatentDensity:
    return syn.latent_density(torch.as_tensor(counts), n_tokens)


@pytest.fixture(scope="module")
def big():
    """A random TopK SAE with many latents, all alive with random densities, and codes of random inputs."""
    g = torch.Generator().manual_seed(0)
    sae = build_topk(d_in=64, d_sae=4096, k=8)
    code = syn.sparse_code(sae(torch.randn(32, 64, generator=g)))
    dens = density_of(torch.randint(1, 500, (4096,), generator=g), 10_000)
    return sae, code, dens


def test_sparse_code_of_topk_and_dense_outputs():
    sae = build_topk(d_in=16, d_sae=32, k=3)
    out = sae(torch.randn(5, 16))
    code = syn.sparse_code(out)
    assert code.idx.shape == (5, 3)
    torch.testing.assert_close(syn.decode(sae, code), out.x_hat)
    dense = out._replace(top_idx=None, top_acts=None, latents=sae.densify(out))
    code_d = syn.sparse_code(dense)
    torch.testing.assert_close(syn.decode(sae, code_d), out.x_hat)
    assert syn.count_active(code, 32).sum() == (code.vals != 0).sum()


def test_sparsity_neighbours_by_hand():
    # log10 densities: 0:-1, 1:-1.3, 2:-1.32, 3:-2, 4:-2.05, 5: dead (→ floor 0.5/1000), 6:-3, 7:-0.7
    dens = density_of([100, 50, 48, 10, 9, 0, 1, 200])
    nb = syn.sparsity_neighbours(dens, 2, seed=0)
    assert set(nb[1].tolist()) == {2, 0}
    assert set(nb[3].tolist()) == {4, 2}
    assert set(nb[7].tolist()) == {0, 1}
    assert set(nb[5].tolist()) == {6, 4}  # a dead latent's neighbours are the sparsest alive ones
    assert not (nb == 5).any() and not (nb == torch.arange(8)[:, None]).any()  # never dead, never itself


def test_sparsity_neighbours_are_the_nearest_by_brute_force(big):
    _, _, dens = big
    nb = syn.sparsity_neighbours(dens, 10, seed=3)
    for i in torch.randint(0, 4096, (50,)).tolist():
        d = (dens.log10 - dens.log10[i]).abs()
        d[i] = math.inf
        best = d.sort().values[:10]
        torch.testing.assert_close(d[nb[i]].sort().values, best)


def test_synthetic_baseline_keeps_values_and_swaps_within_the_neighbourhood(big):
    _, code, dens = big
    nb = syn.sparsity_neighbours(dens, 10, seed=0)
    new = syn.synthetic_baseline(code, nb, seed=0)
    assert torch.equal(new.vals, code.vals)
    active = code.vals != 0
    assert (new.idx != code.idx)[active].all()  # a latent is never "swapped" for itself
    in_nb = (nb[code.idx] == new.idx[..., None]).any(-1)
    assert in_nb[active].all()
    assert torch.equal(syn.synthetic_baseline(code, nb, seed=0).idx, new.idx)  # seeded
    assert not torch.equal(syn.synthetic_baseline(code, nb, seed=1).idx, new.idx)


def test_synthetic_random_keeps_values_picks_distinct_alive_latents():
    counts = torch.zeros(64, dtype=torch.long)
    counts[::2] = 5  # odd latents are dead
    code = syn.SparseCode(torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]), torch.tensor([[3.0, 2.0, 1.0, 0.0], [1.0] * 4]))
    new = syn.synthetic_random(code, density_of(counts), seed=0)
    assert torch.equal(new.vals, code.vals)
    assert (new.idx[code.vals != 0] % 2 == 0).all()
    for row, act in zip(new.idx, code.vals != 0):
        assert row[act].unique().numel() == int(act.sum())
    assert new.idx[0, 3] == 4  # the inactive entry is left alone
    assert torch.equal(syn.synthetic_random(code, density_of(counts), seed=0).idx, new.idx)  # seeded
    assert not torch.equal(syn.synthetic_random(code, density_of(counts), seed=1).idx, new.idx)


def test_synthetic_structured_matches_cosines(big):
    sae, code, dens = big
    nb = syn.sparsity_neighbours(dens, 100, seed=0)
    target = 0.1  # within reach of 100 random directions in 64 dims (cos sd ≈ 0.125)
    s = syn.synthetic_structured(code, sae.W_dec, dens, nb, target, seed=0)
    chunked = syn.synthetic_structured(code, sae.W_dec, dens, nb, target, seed=0, chunk=5)  # 32 rows: 7 chunks
    assert torch.equal(chunked.code.idx, s.code.idx) and torch.equal(chunked.top_synth, s.top_synth)
    W = F.normalize(sae.W_dec.detach(), dim=-1)
    assert torch.equal(s.code.vals, code.vals)
    for r in range(code.idx.shape[0]):
        cand = nb[s.top_base[r]]
        cos_c = W[cand] @ W[s.top_base[r]]
        assert s.top_synth[r] in cand
        assert (s.top_cos[r] - target).abs() == pytest.approx(float((cos_c - target).abs().min()), abs=1e-6)
        assert abs(float(s.top_cos[r]) - target) < 0.05
        order = code.vals[r].argsort(descending=True)
        assert s.code.idx[r, order[0]] == s.top_synth[r]
        pool_cos = W @ W[s.top_synth[r]]  # every latent is alive here
        pool_cos[s.top_synth[r]] = math.inf  # already used
        j = order[1]  # the first latent matched: only top_synth is taken, so it is the exact argmin
        want = W[code.idx[r, j]] @ W[s.top_base[r]]
        assert s.code.idx[r, j] == (pool_cos - want).abs().argmin()
        for j in order[1:]:
            want = W[code.idx[r, j]] @ W[s.top_base[r]]
            got = W[s.code.idx[r, j]] @ W[s.top_synth[r]]
            if abs(want) < 0.25:  # where random directions are dense enough to match closely
                assert abs(float(got - want)) < 0.01
        assert s.code.idx[r].unique().numel() == code.idx.shape[1]


def test_synthetic_structured_hits_a_planted_target_cosine():
    g = torch.Generator().manual_seed(1)
    w0 = F.normalize(torch.randn(64, generator=g), dim=0)
    W = torch.randn(512, 64, generator=g)
    W = F.normalize(W - (W @ w0)[:, None] * w0, dim=-1)  # every latent ⟂ latent 0 ...
    W[0] = w0
    W[5] = 0.42 * w0 + math.sqrt(1 - 0.42**2) * W[7]  # ... but latent 5, at cos 0.42
    counts = torch.full((512,), 400)
    counts[:101] = 3  # latents 1..100 are exactly the 100-neighbourhood of latent 0
    dens = density_of(counts, 10_000)
    nb = syn.sparsity_neighbours(dens, 100, seed=0)
    assert set(nb[0].tolist()) == set(range(1, 101))
    code = syn.SparseCode(torch.tensor([[9, 0]]), torch.tensor([[1.0, 5.0]]))
    s = syn.synthetic_structured(code, W, dens, nb, 0.42, seed=0)
    assert s.top_base.item() == 0 and s.top_synth.item() == 5
    assert s.top_cos.item() == pytest.approx(0.42, abs=1e-5)
    assert s.code.idx[0, 1] == 5 and s.code.idx[0, 0] != 5
    s0 = syn.synthetic_structured(code, W, dens, nb, 0.0, seed=0)  # the closest available to 0: any ⟂ latent
    assert s0.top_synth.item() != 5 and abs(s0.top_cos.item()) < 1e-5
    # decoder rows of other norms (SAELens SAEs need not normalise them): cosines, not dot products, are matched
    scaled = W * (0.2 + 3 * torch.rand(512, 1, generator=g))
    s1 = syn.synthetic_structured(code, scaled, dens, nb, 0.42, seed=0)
    assert s1.top_synth.item() == 5 and s1.top_cos.item() == pytest.approx(0.42, abs=1e-5)


def test_structured_without_cos_draws_from_the_neighbourhood(big):
    sae, code, dens = big
    nb = syn.sparsity_neighbours(dens, 100, seed=0)
    s = syn.synthetic_structured(code, sae.W_dec, dens, nb, None, seed=0)
    assert all(s.top_synth[r] in nb[s.top_base[r]] for r in range(code.idx.shape[0]))


def test_fit_gaussian_singular_and_full_rank():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=g)  # 5 rows in 16 dims: rank 4
    gauss = syn.fit_gaussian(x)
    s = syn.sample_gaussian(gauss, 20000, seed=0, key="t")
    assert torch.isfinite(s).all()
    torch.testing.assert_close(s.mean(0), x.mean(0), atol=0.05, rtol=0)
    cov = (x - x.mean(0)).T @ (x - x.mean(0)) / 5
    torch.testing.assert_close(gauss.scale @ gauss.scale.T, cov, atol=1e-5, rtol=0)
    assert gauss.min_eig < 1e-5  # rank deficient
    y = torch.randn(400, 4, generator=g) @ torch.tensor([[2.0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 3, 0], [0, 0, 1, 0.5]])
    gy = syn.fit_gaussian(y, jitter=0.0)
    sy = syn.sample_gaussian(gy, 50000, seed=1, key="t")
    torch.testing.assert_close(torch.cov(sy.T), torch.cov(y.T, correction=0), atol=0.15, rtol=0.05)


def test_sample_other_avoids_the_base():
    pool = torch.tensor([[0.0, 0], [0, 0], [1, 0]])
    t = syn.sample_other(pool, torch.tensor([0, 1, 0, 1] * 5), seed=0, key="k")
    assert (t == 2).all()  # rows 0 and 1 are identical: only row 2 is far enough
    with pytest.raises(ValueError, match="no real activation"):
        syn.sample_other(torch.zeros(3, 2), torch.tensor([0]), seed=0, key="k")


def test_estimate_target_cos_brute_force():
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(30, 8, generator=g) + 2
    b = torch.randn(8, generator=g)
    u = F.normalize(pool - b, dim=-1)
    c = u @ u.T
    want = float((c.sum() - c.diagonal().sum()) / (30 * 29))
    assert syn.estimate_target_cos(pool, b, seed=0) == pytest.approx(want, abs=1e-6)


def test_sparse_code_of_dense_latents_keeps_every_nonzero_latent():
    """Dense SAEs: rows of different L0, negative values (kept as they are): every nonzero latent of every row is in
    the code (padded with value 0 to the largest L0), and the code decodes to the SAE's reconstruction."""
    from gsae.sae.base import SAEOutput

    sae = build_topk(d_in=16, d_sae=32, k=3)
    lat = torch.zeros(3, 32)
    lat[0, [1, 5, 9, 20]] = torch.tensor([2.0, -3.0, 0.5, 1.0])
    lat[1, 7] = -0.25
    lat[2, [3, 4]] = torch.tensor([1.5, 4.0])
    zero = torch.zeros(())
    with torch.no_grad():
        out = SAEOutput(lat @ sae.W_dec + sae.b_dec, None, None, lat, lat, zero, zero)
        code = syn.sparse_code(out)
        assert code.idx.shape == (3, 4)
        assert torch.equal(torch.zeros(3, 32).scatter_add_(1, code.idx, code.vals), lat)
        torch.testing.assert_close(syn.decode(sae, code), out.x_hat)


def test_latent_density_is_log10_of_the_firing_fraction_and_dead_latents_get_half_a_token():
    d = density_of([0, 1, 10, 1000], 1000)
    assert d.alive.tolist() == [False, True, True, True] and d.n_tokens == 1000
    want = torch.tensor([math.log10(0.5 / 1000), -3.0, -2.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(d.log10, want)


def test_sparsity_neighbours_with_fewer_alive_latents_than_asked_are_all_the_others():
    dens = density_of([5, 0, 7, 0, 9, 0, 0, 11])  # 4 alive: 0, 2, 4, 7
    nb = syn.sparsity_neighbours(dens, 10, seed=0)
    assert nb.shape == (8, 3)
    for i in (0, 2, 4, 7):
        assert set(nb[i].tolist()) == {0, 2, 4, 7} - {i}
    for i in (1, 3, 5, 6):  # dead: the 3 sparsest alive latents
        assert set(nb[i].tolist()) == {0, 2, 4}


def test_tied_sparsity_neighbourhoods_are_drawn_at_random_not_by_latent_id():
    """Ties broken by a seeded random order (module docstring): over seeds, tied neighbours are spread over all
    ids, not always the lowest ones."""
    dens = density_of(torch.full((400,), 7))  # every latent equally sparse
    picked = torch.cat([syn.sparsity_neighbours(dens, 10, seed=s).flatten() for s in range(20)])
    assert picked.unique().numel() > 100
    assert 150 < picked.float().mean() < 250  # ids 0..399: by id the mean would be about 5


def test_synthetic_baseline_draws_every_neighbour_uniformly():
    dens = density_of(torch.arange(1, 65))  # distinct densities
    nb = syn.sparsity_neighbours(dens, 10, seed=0)
    code = syn.SparseCode(torch.full((2000, 1), 30), torch.ones(2000, 1))
    new = syn.synthetic_baseline(code, nb, seed=0)
    freq = torch.bincount(new.idx.flatten(), minlength=64)[nb[30]] / 2000
    assert freq.sum() == pytest.approx(1.0)
    assert (freq - 0.1).abs().max() < 0.03  # binomial sd 0.0067


def test_structured_top_latent_is_the_largest_value_not_the_largest_magnitude(big):
    """§4.3 step 1: the base's active latent with the highest activation (a negative value, kept by TopK without
    ReLU, is not the top however large)."""
    sae, _, dens = big
    nb = syn.sparsity_neighbours(dens, 100, seed=0)
    code = syn.SparseCode(torch.tensor([[3, 17, 40]]), torch.tensor([[-9.0, 2.0, 1.0]]))
    s = syn.synthetic_structured(code, sae.W_dec, dens, nb, 0.1, seed=0)
    assert s.top_base.item() == 17 and s.code.idx[0, 1] == s.top_synth[0]


def test_synthetic_structured_never_reuses_the_new_top_latent():
    """A base latent almost parallel to the top one would match the new top latent itself (cos 1): it is taken, so
    the next closest latent is used."""
    g = torch.Generator().manual_seed(1)
    w0 = F.normalize(torch.randn(64, generator=g), dim=0)
    W = torch.randn(512, 64, generator=g)
    W = F.normalize(W - (W @ w0)[:, None] * w0, dim=-1)  # every latent ⟂ latent 0 ...
    W[0] = w0
    W[5] = 0.42 * w0 + math.sqrt(1 - 0.42**2) * W[7]  # ... but latent 5, at cos 0.42 (cos(5, 7) = 0.907)
    W[9] = 0.99 * w0 + math.sqrt(1 - 0.99**2) * W[11]  # and latent 9, at cos 0.99
    counts = torch.full((512,), 400)
    counts[:101] = 3
    dens = density_of(counts, 10_000)
    nb = syn.sparsity_neighbours(dens, 100, seed=0)
    code = syn.SparseCode(torch.tensor([[9, 0]]), torch.tensor([[1.0, 5.0]]))
    s = syn.synthetic_structured(code, W, dens, nb, 0.42, seed=0)
    assert s.top_synth.item() == 5
    cos5 = W @ W[5]
    cos5[5] = math.inf  # taken by the top
    assert s.code.idx[0, 0] == (cos5 - W[9] @ W[0]).abs().argmin() == 7


def test_fit_gaussian_jitter_and_exact_zero_eigenvalues():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=g)  # rank 4
    cov = (x - x.mean(0)).T @ (x - x.mean(0)) / 5
    gj = syn.fit_gaussian(x, jitter=0.5)
    torch.testing.assert_close(gj.scale @ gj.scale.T, cov + 0.5 * torch.eye(16), atol=1e-5, rtol=0)
    # an exactly diagonal covariance with an exact 0: already PSD, nothing negative to clamp
    e = torch.tensor([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0]])
    ge = syn.fit_gaussian(e)
    assert ge.n_clamped == 0 and ge.min_eig == 0.0
    torch.testing.assert_close(ge.scale @ ge.scale.T, torch.diag(torch.tensor([0.5, 0.5, 0.0])))


def test_sample_other_redraws_at_min_dist_and_uniformly():
    pool = torch.tensor([[0.0, 0.0], [0.5, 0.0], [3.0, 0.0]])
    t = syn.sample_other(pool, torch.zeros(50, dtype=torch.long), seed=0, key="k", min_dist=0.5)
    assert (t == 2).all()  # ‖T − A‖ ≤ min_dist is redrawn (the draft code): the row at exactly 0.5 too
    pool = torch.tensor([[0.0], [0.0], [1.0], [2.0]])
    t = syn.sample_other(pool, torch.zeros(4000, dtype=torch.long), seed=0, key="k")
    freq = torch.bincount(t, minlength=4) / 4000
    assert freq[:2].sum() == 0 and abs(float(freq[2]) - 0.5) < 0.04  # a fresh uniform draw, not the next row


@pytest.fixture(scope="module")
def readable():
    """A TopK SAE whose 48 decoder rows are orthonormal (a decoded code reads back exactly), a pool of 40 activations,
    their codes and reconstructions, and densities with distinct values."""
    g = torch.Generator().manual_seed(0)
    sae = build_topk(d_in=64, d_sae=48, k=4)
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(64, 48, generator=g))
        sae.W_dec.copy_(q.T)
        sae.b_dec.copy_(0.5 * torch.randn(64, generator=g))
        pool = 3 * torch.randn(40, 64, generator=g)
        out = sae(pool)
    dens = density_of(torch.randperm(300, generator=g)[:48] + 1, 1000)
    return sae, pool, out.x_hat, syn.sparse_code(out), dens


def test_build_targets_from_the_bases_and_the_pool(readable):
    """Every target of ``build_targets`` read back against its definition (SPEC §4.1–4.3): model-generated = another
    row of the pool, sae_reconstruction = SAE of that row, synthetic = the *base's* code with swapped latents and the
    same values (baseline: within the 10 most similarly sparse), w/o-cos top latent a draw, not the cosine match;
    plateau bases, the fresh random plateau target, N(μ, Σ) of the whole pool, the options and mean distances."""
    sae, pool, recon, code, dens = readable
    n = 30
    t = syn.build_targets(sae, pool, recon, code, dens, n, seed=5, target_cos=0.3)
    A = pool[t.base_idx]
    assert t.base_idx.unique().numel() == n
    mg = t.targets["model_generated"]
    rows = (mg[:, None] == pool[None]).all(-1).float().argmax(-1)
    assert torch.equal(pool[rows], mg) and (rows != t.base_idx).all()
    with torch.no_grad():
        torch.testing.assert_close(t.targets["sae_reconstruction"], sae(mg).x_hat)
    base = torch.zeros(n, 48).scatter_add_(1, code.idx[t.base_idx], code.vals[t.base_idx])
    near10 = (dens.log10[:, None] - dens.log10[None]).abs().fill_diagonal_(math.inf).argsort(-1)[:, :10]
    read = {k: ((t.targets[k] - sae.b_dec) @ sae.W_dec.T).detach() for k in syn.TARGET_TYPES if k.startswith("synth")}
    for k, lat in read.items():
        for r in range(n):
            on, on_base = lat[r].abs() > 1e-4, base[r] != 0
            if k == "synthetic_baseline":  # independent draws: two latents may land on one (their values add up)
                assert set(on.nonzero().flatten().tolist()) <= set(near10[on_base].flatten().tolist())
                assert float(lat[r].sum()) == pytest.approx(float(base[r].sum()), abs=1e-4)
            else:
                got = lat[r][on].sort().values
                torch.testing.assert_close(got, base[r][on_base].sort().values, atol=1e-4, rtol=1e-4)
    tops = {k: read[k].argmax(-1) for k in ("synthetic_structured", "synthetic_structured_no_cos")}
    assert (tops["synthetic_structured"] != tops["synthetic_structured_no_cos"]).float().mean() > 0.5
    assert torch.equal(t.plateau_bases["model_generated"], A)
    for b in ("synthetic_baseline", "synthetic_structured", "random"):
        assert torch.equal(t.plateau_bases[b], t.targets[b])
    assert not (t.plateau_target == t.targets["random"]).all(-1).any()  # a fresh sample: the random base moves
    assert t.info["gaussian"]["n_rows"] == 40  # fitted to every activation of the pool, not to the bases
    assert t.info["target_cos"]["used"] == 0.3 and t.info["target_cos"]["option"] == 0.3
    for k, T in t.targets.items():
        assert t.info["mean_distance"][k] == pytest.approx(float((T - A).norm(dim=-1).mean()), rel=1e-6)
    other = syn.build_targets(sae, pool, recon, code, dens, n, seed=6).targets["model_generated"]
    assert (other != mg).any(-1).float().mean() > 0.5  # the targets are the seed's draws too


def test_latents_of_equal_density_do_not_share_one_neighbourhood():
    """200 latents that each fired once (common for rare latents on few density tokens) and 56 of distinct density:
    each tied latent's 10 nearest are all in the tie, and the tied latents' neighbourhoods spread over the tie rather
    than all being the same 10 or 11 (which would make the synthetic baseline swap every rare latent onto them)."""
    counts = torch.cat([torch.ones(200, dtype=torch.long), torch.arange(2, 58)])
    dens = density_of(counts[torch.randperm(256, generator=torch.Generator().manual_seed(0))])
    tied = (dens.log10 == dens.log10.min()).nonzero().squeeze(-1)
    nb = syn.sparsity_neighbours(dens, 10, seed=0)
    assert torch.isin(nb[tied], tied).all()  # still the nearest: distance 0
    assert nb[tied].unique().numel() > 150
    hits = torch.bincount(nb[tied].flatten(), minlength=256)[tied]
    assert hits.max() <= 25  # 2000 picks over 200: 10 each on average
