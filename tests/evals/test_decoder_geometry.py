"""decoder_geometry: nearest-neighbour cosine against brute force; the bins; the directional derivative
against autograd on the mean CE."""

from __future__ import annotations

import pytest
import torch

from gsae.evals import decoder_geometry
from gsae.evals.decoder_geometry import nearest_neighbour_cosine
from gsae.lm import next_token_loss
from tests.evals.helpers import HOOK, build_tokens, build_topk


def test_nearest_neighbour_cosine_matches_brute_force():
    w = torch.randn(37, 8) * torch.rand(37, 1)  # rows of different norms
    w[5] = w[9] * 3  # an exact duplicate direction
    fast = nearest_neighbour_cosine(w, chunk=10)
    brute = torch.tensor(
        [
            max(float(torch.nn.functional.cosine_similarity(w[i], w[j], dim=0)) for j in range(37) if j != i)
            for i in range(37)
        ]
    )
    torch.testing.assert_close(fast, brute, atol=1e-6, rtol=0)
    assert fast[5] == pytest.approx(1.0) and fast[9] == pytest.approx(1.0)


def test_bins_are_the_tails_and_middle(tiny_lm):
    sae = build_topk(d_sae=200)
    r = decoder_geometry.run(sae, tiny_lm, HOOK, build_tokens(2, 16), n_per_bin=5, tail_quantile=0.1, grad_batch_size=2)
    nn = nearest_neighbour_cosine(sae.W_dec)
    lo, hi = torch.quantile(nn.double(), torch.tensor([0.1, 0.9], dtype=torch.float64)).tolist()
    assert all(nn[i] <= lo + 1e-9 for i in r["bins"]["left"]["latents"])
    assert all(nn[i] >= hi - 1e-9 for i in r["bins"]["right"]["latents"])
    assert all(len(r["bins"][b]["latents"]) == 5 for b in ("left", "middle", "right"))
    assert sum(r["nn_cos_hist"]["counts"]) == 200
    # the histogram over [-1, 1] in 100 bins, the summary statistics and each bin's mean cosine, by hand
    edges = r["nn_cos_hist"]["edges"]
    assert len(edges) == 101 and edges[0] == -1.0 and edges[-1] == 1.0
    ref = torch.histogram(nn.double(), bins=100, range=(-1.0, 1.0)).hist
    assert r["nn_cos_hist"]["counts"] == [int(c) for c in ref]
    assert r["nn_cos_mean"] == pytest.approx(float(nn.double().mean()), abs=1e-6)
    assert r["nn_cos_median"] == pytest.approx(float(nn.median()), abs=1e-6)
    for b in ("left", "middle", "right"):
        members = r["bins"][b]["latents"]
        assert r["bins"][b]["nn_cos"] == pytest.approx(nn[members].tolist(), abs=1e-6)
        assert r[f"nn_cos_{b}_mean"] == pytest.approx(float(nn[members].double().mean()), abs=1e-6)


def test_directional_derivative_matches_autograd(tiny_lm):
    """With all tokens in one batch of ``grad_batch_size`` sequences, ``|∇L·d|`` uses ∇ of the batch-mean CE."""
    sae, toks = build_topk(d_sae=64), build_tokens(3, 16)
    r = decoder_geometry.run(sae, tiny_lm, HOOK, toks, n_per_bin=2, grad_batch_size=3, batch_size=2)
    x = tiny_lm.activations(toks, HOOK).requires_grad_(True)
    with torch.enable_grad():
        loss = next_token_loss(tiny_lm.run_from_hook(x, HOOK).logits, toks)  # mean over 3·15 predictions
        (g,) = torch.autograd.grad(loss, x)
    g = g[:, 1:-1].reshape(-1, 64)  # BOS and the last position are left out of the token mean
    for b in ("left", "middle", "right"):
        for latent, dd in zip(r["bins"][b]["latents"], r["bins"][b]["mean_abs_dd"]):
            d = sae.W_dec[latent].detach() / sae.W_dec[latent].detach().norm()
            assert dd == pytest.approx(float((g @ d).abs().mean()), rel=1e-4)
        assert r[f"dd_{b}"] == pytest.approx(sum(r["bins"][b]["mean_abs_dd"]) / 2, rel=1e-6)  # the bin's mean


def test_deterministic_and_figures(tiny_lm):
    toks = build_tokens(2, 16)
    a = decoder_geometry.run(build_topk(), tiny_lm, HOOK, toks, seed=2, n_per_bin=4)
    b = decoder_geometry.run(build_topk(), tiny_lm, HOOK, toks, seed=2, n_per_bin=4)
    assert a == b
    assert set(decoder_geometry.figures(a)) == {"nn_cos_histogram", "directional_derivative"}


def test_tail_bins_middle_bin_spans_the_central_tail_quantile():
    from gsae.evals.decoder_geometry import tail_bins

    bins = tail_bins(torch.arange(100) / 100, 1000, 0.1, torch.Generator().manual_seed(0))
    assert bins["left"].tolist() == list(range(0, 10))
    assert bins["middle"].tolist() == list(range(45, 55))
    assert bins["right"].tolist() == list(range(90, 100))


def test_tail_bins_include_their_quantile_edges():
    """``c_i ≤`` the ``tail_quantile`` quantile is in the left tail, ``c_i ≥`` the ``1 − tail_quantile`` one in the
    right, also when the quantile is a cosine itself (11 values: the 0.1 quantile is the second smallest)."""
    from gsae.evals.decoder_geometry import tail_bins

    bins = tail_bins(torch.arange(11) / 10, 1000, 0.1, torch.Generator().manual_seed(0))
    assert bins["left"].tolist() == [0, 1] and bins["right"].tolist() == [9, 10]
    assert bins["middle"].tolist() == [5]  # between the 0.45 and 0.55 quantiles (4.5 and 5.5)


def test_tail_quantile_one_half_is_accepted(tiny_lm):
    """``tail_quantile`` may be 0.5 (each tail half the latents; the middle between the quartiles), not 0 or above."""
    sae, toks = build_topk(d_sae=40), build_tokens(2, 16)
    r = decoder_geometry.run(sae, tiny_lm, HOOK, toks, n_per_bin=100, tail_quantile=0.5, grad_batch_size=2)
    assert len(r["bins"]["left"]["latents"]) == len(r["bins"]["right"]["latents"]) == 20
    assert len(r["bins"]["middle"]["latents"]) == 20
    for bad in (0.0, 0.6):
        with pytest.raises(ValueError, match="tail_quantile"):
            decoder_geometry.run(sae, tiny_lm, HOOK, toks, tail_quantile=bad)
