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


def test_synthetic_structured_matches_cosines(big):
    sae, code, dens = big
    nb = syn.sparsity_neighbours(dens, 100, seed=0)
    target = 0.1  # within reach of 100 random directions in 64 dims (cos sd ≈ 0.125)
    s = syn.synthetic_structured(code, sae.W_dec, dens, nb, target, seed=0)
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
