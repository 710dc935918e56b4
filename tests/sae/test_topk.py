"""TopK SAE: selection and the sparse backward against naive references, decoder constraints, AuxK,
option validation and the geometric-median ``b_dec`` initialisation."""

from __future__ import annotations

import pytest
import torch
from scipy.optimize import minimize

from gsae.sae import TopKSAE
from gsae.sae.base import SparseDecode, SparsePattern, geometric_median, sse_loss
from gsae.sae.topk import topk_block, topk_indices
from tests.conftest import build_topk, randomize


def naive_topk(sae: TopKSAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: full pre-activation matrix, ``torch.topk``, dense masked latents, dense decode."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # (N, d_sae)
    top = pre.topk(sae.k, dim=-1)
    mask = torch.zeros_like(pre).scatter(-1, top.indices, 1.0)
    latents = pre * mask
    if sae.relu_after_topk:
        latents = latents.relu()
    x_hat = latents @ sae.W_dec + sae.b_dec  # (N, d_in)
    return latents, top.indices, x_hat


@pytest.mark.parametrize("sparse_backward", [True, False])
@pytest.mark.parametrize("relu", [False, True])
def test_forward_matches_naive_reference(sparse_backward: bool, relu: bool) -> None:
    sae = randomize(build_topk(d_in=16, d_sae=64, k=5, sparse_backward=sparse_backward, relu_after_topk=relu))
    x = torch.randn(40, 16)
    out = sae(x)
    ref_latents, ref_idx, ref_x_hat = naive_topk(sae, x)

    assert out.top_idx.shape == (40, 5) and out.top_acts.shape == (40, 5)
    # exactly k distinct latents per token
    assert all(len(set(row.tolist())) == 5 for row in out.top_idx)
    assert [set(r.tolist()) for r in out.top_idx] == [set(r.tolist()) for r in ref_idx]
    torch.testing.assert_close(sae.densify(out), ref_latents)
    torch.testing.assert_close(out.x_hat, ref_x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.encode(x), ref_latents)
    # the sparse decode equals the dense decode of the densified latents
    torch.testing.assert_close(sae.decode(sae.densify(out)), out.x_hat, rtol=1e-5, atol=1e-5)
    # pre-activations are returned detached and complete
    torch.testing.assert_close(out.pre_acts, (x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    assert not out.pre_acts.requires_grad


def _grads(sae: TopKSAE, x: torch.Tensor, w: torch.Tensor, naive: bool) -> dict[str, torch.Tensor]:
    sae.zero_grad()
    if naive:
        _, _, x_hat = naive_topk(sae, x)
    else:
        x_hat = sae(x).x_hat
    # a loss whose gradient differs per output element (plain MSE would be too symmetric to catch index bugs)
    loss = ((x_hat - x).pow(2) * w).sum()
    loss.backward()
    return {n: p.grad.clone() for n, p in sae.named_parameters()}


@pytest.mark.parametrize("relu", [False, True])
def test_sparse_backward_equals_dense_autograd(relu: bool) -> None:
    x = torch.randn(64, 16)
    w = torch.rand(64, 16)
    sparse = randomize(build_topk(d_in=16, d_sae=48, k=6, relu_after_topk=relu, sparse_backward=True))
    dense = randomize(build_topk(d_in=16, d_sae=48, k=6, relu_after_topk=relu, sparse_backward=False))
    torch.testing.assert_close(dict(sparse.named_parameters()), dict(dense.named_parameters()))

    g_sparse = _grads(sparse, x, w, naive=False)
    g_dense = _grads(dense, x, w, naive=False)
    g_naive = _grads(dense, x, w, naive=True)
    for name in ("W_enc", "b_enc", "b_dec", "W_dec"):
        assert g_sparse[name].abs().sum() > 0, name
        torch.testing.assert_close(g_sparse[name], g_naive[name], rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(g_dense[name], g_naive[name], rtol=1e-4, atol=1e-5, msg=name)
    # only the selected latents' encoder columns get gradient (the sparse backward's whole point)
    selected = torch.zeros(48, dtype=torch.bool)
    selected[sparse(x).top_idx.unique()] = True
    assert torch.all(g_sparse["W_enc"][:, ~selected] == 0)
    assert torch.all(g_sparse["b_enc"][~selected] == 0)


def test_sparse_backward_input_gradient() -> None:
    sae = randomize(build_topk(d_in=8, d_sae=32, k=3))
    x = torch.randn(10, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    sae(x).x_hat.pow(2).sum().backward()
    naive_topk(sae, x_ref)[2].pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)


def test_relu_after_topk() -> None:
    x = torch.randn(32, 16)
    plain = randomize(build_topk(relu_after_topk=False, k=8))
    relu = randomize(build_topk(relu_after_topk=True, k=8))
    with torch.no_grad():  # push pre-activations down so that some kept values are negative
        plain.b_enc.sub_(2.0)
        relu.b_enc.sub_(2.0)
    out_plain, out_relu = plain(x), relu(x)
    assert (out_plain.top_acts < 0).any(), "test setup: need negative kept values"
    # same selection; ReLU only clamps the kept values
    torch.testing.assert_close(out_relu.top_idx, out_plain.top_idx)
    torch.testing.assert_close(out_relu.top_acts, out_plain.top_acts.relu())
    assert (out_relu.top_acts >= 0).all()
    # a clamped latent contributes nothing to the reconstruction
    dense = plain.densify(out_plain).relu()
    torch.testing.assert_close(out_relu.x_hat, dense @ relu.W_dec + relu.b_dec, rtol=1e-5, atol=1e-5)


def test_decoder_rows_stay_unit_norm_under_adam() -> None:
    sae = build_topk(d_in=16, d_sae=64, k=4)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-2)
    for _ in range(10):
        x = torch.randn(128, 16) * 3 + 1
        opt.zero_grad()
        out = sae(x)
        (out.x_hat - x).pow(2).sum(-1).mean().backward()
        sae.remove_parallel_grad()
        # the gradient is now tangent to the unit sphere at every row
        cos = torch.nn.functional.cosine_similarity(sae.W_dec.grad, sae.W_dec, dim=-1)
        assert sae.W_dec.grad.abs().sum() > 0
        assert cos.abs().max() < 1e-5
        opt.step()
        drift = (sae.W_dec.norm(dim=1) - 1).abs().max()
        sae.normalize_decoder()
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6, rtol=0)
    assert drift > 1e-4, "Adam steps should move rows off the sphere (otherwise this test checks nothing)"


def test_remove_parallel_grad_without_grad_is_noop() -> None:
    sae = build_topk()
    sae.remove_parallel_grad()
    assert sae.W_dec.grad is None


def test_auxk_loss_reaches_only_dead_latents() -> None:
    sae = randomize(build_topk(d_in=16, d_sae=64, k=4, k_aux=8))
    x = torch.randn(50, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[[3, 10, 11, 40]] = True
    out = sae(x, dead_mask=dead)
    assert out.aux_loss > 0
    out.aux_loss.backward()
    assert sae.W_enc.grad[:, dead].abs().sum() > 0 and sae.W_dec.grad[dead].abs().sum() > 0
    assert torch.all(sae.W_enc.grad[:, ~dead] == 0)
    assert torch.all(sae.b_enc.grad[~dead] == 0)
    assert torch.all(sae.W_dec.grad[~dead] == 0)
    assert sae.b_dec.grad is None or torch.all(sae.b_dec.grad == 0)
    # no dead latent, no mask, or k_aux = 0: no AuxK loss
    assert sae(x, dead_mask=torch.zeros(64, dtype=torch.bool)).aux_loss == 0
    assert sae(x).aux_loss == 0
    assert build_topk(d_in=16, d_sae=64, k=4, k_aux=0)(x, dead_mask=dead).aux_loss == 0


def _sparse_features(n: int, features: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each row: 2 random features of ``features (n_feat, d)`` with magnitudes in [1, 3]."""
    n_feat = features.shape[0]
    idx = torch.rand(n, n_feat, generator=gen).argsort(-1)[:, :2]
    s = torch.zeros(n, n_feat).scatter_(1, idx, 1 + 2 * torch.rand(n, 2, generator=gen))
    return s @ features


@pytest.mark.parametrize("relu", [False, True])
def test_auxk_revives_planted_dead_latent(relu: bool) -> None:
    """Data: 2 of 24 unit features per token; the SAE has 16 latents (k=2), so some features are left
    in the residual. Latent ``j`` is planted dead: a tiny encoder column keeps it below the top-k of
    every token. With AuxK it learns a missing feature from the residual and fires again; without
    AuxK it never gets a gradient (its encoder column and bias stay bit-identical) and stays dead.

    The planted latent has small *positive* pre-activations on part of the data: AuxK, like TopK,
    trains a latent only through its kept (post-ReLU) values, so with ``relu_after_topk`` a latent
    that is negative everywhere gets no AuxK gradient either.
    """
    d_in, d_sae, j = 16, 16, 5
    features = torch.randn(24, d_in, generator=torch.Generator().manual_seed(100))
    features /= features.norm(dim=1, keepdim=True)
    x_eval = _sparse_features(4096, features, torch.Generator().manual_seed(7))
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[j] = True
    fire_rate = {}
    for k_aux in (8, 0):
        sae = TopKSAE(d_in, d_sae=d_sae, k=2, k_aux=k_aux, relu_after_topk=relu, seed=0)
        with torch.no_grad():
            sae.W_enc[:, j] *= 0.05
        assert not (sae(x_eval).top_idx == j).any(), "planted latent must start dead"
        w_enc_j, b_enc_j = sae.W_enc[:, j].detach().clone(), sae.b_enc[j].detach().clone()
        opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(0)
        for _ in range(300):
            x = _sparse_features(256, features, gen)
            out = sae(x, dead_mask=dead)
            loss = (out.x_hat - x).pow(2).sum(-1).mean() + out.aux_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sae.normalize_decoder()
        with torch.no_grad():
            fire_rate[k_aux] = float((sae(x_eval).top_idx == j).any(-1).float().mean())
        if k_aux == 0:
            torch.testing.assert_close(sae.W_enc[:, j].detach(), w_enc_j, rtol=0, atol=0)
            torch.testing.assert_close(sae.b_enc[j].detach(), b_enc_j, rtol=0, atol=0)
    assert fire_rate[0] == 0.0
    assert fire_rate[8] > 0.03, fire_rate


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        (dict(d_sae=8, k=9), "--model.sae.k"),
        (dict(d_sae=8, k=0), "--model.sae.k"),
        (dict(d_sae=8, k=-1), "--model.sae.k"),
        (dict(d_sae=0, k=1), "--model.sae.d_sae"),
        (dict(d_sae=-4, k=1), "--model.sae.d_sae"),
        (dict(d_sae=8, k=2, k_aux=-1), "--model.sae.k_aux"),
    ],
)
def test_invalid_options_name_the_cli_key(kwargs: dict, option: str) -> None:
    with pytest.raises(ValueError, match=option.replace(".", r"\.")) as exc:
        TopKSAE(16, **kwargs)
    assert "\n" not in str(exc.value)


def test_k_equal_d_sae_is_allowed() -> None:
    sae = build_topk(d_in=4, d_sae=6, k=6)
    out = sae(torch.randn(3, 4))
    assert sorted(out.top_idx[0].tolist()) == list(range(6))


def test_config_rebuilds_the_same_sae() -> None:
    sae = build_topk(d_in=16, d_sae=64, k=4, relu_after_topk=True, k_aux=3, seed=5)
    again = TopKSAE(**sae.config())
    torch.testing.assert_close(dict(again.named_parameters()), dict(sae.named_parameters()))
    assert again.config() == sae.config()
    assert sae.k_aux == 3 and build_topk(d_in=16).k_aux == 8  # default d_in // 2


def _sum_dist(y, x) -> float:
    return float((x - torch.as_tensor(y, dtype=x.dtype)).norm(dim=1).sum())


@pytest.mark.parametrize("x_hat_dtype", [torch.float32, torch.bfloat16])
def test_sse_loss_is_the_squared_error_sum_with_its_gradient(x_hat_dtype) -> None:
    """The training recon's one-op form equals ``(x − x̂).pow(2).sum()`` in value and gradient, also for a bf16 ``x̂``
    (taken in float32, as the subtraction promotes: ``x`` is never rounded to bf16), with and without autocast."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 12, generator=gen) * 30 + 500  # large offsets: rounding x to bf16 would show
    base = (x + torch.randn(50, 12, generator=gen)).to(x_hat_dtype)
    for autocast in (False, True):
        a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got = sse_loss(a, x)
            want = (x - b).pow(2).sum()
        assert got.dtype == torch.float32
        assert torch.allclose(got, want, rtol=1e-6)
        got.backward()
        want.backward()
        assert torch.allclose(a.grad.float(), b.grad.float(), rtol=1e-2 if x_hat_dtype == torch.bfloat16 else 1e-6)


def test_sparse_decode_input_gradient_for_changing_shapes() -> None:
    """``SparseDecode``'s ``∂top_acts`` (whose bag indices are reused per k across steps) equals ``embedding_bag``'s
    autograd for row counts that grow, shrink and grow again and for several k, as a sweep and AuxK call it."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(40, 6, generator=gen)
    for n, k in [(7, 3), (20, 3), (5, 3), (20, 5), (33, 3), (2, 5)]:
        idx = torch.randint(0, 40, (n, k), generator=gen)
        acts = torch.randn(n, k, generator=gen, requires_grad=True)
        ref = acts.detach().clone().requires_grad_()
        g = torch.randn(n, 6, generator=gen)
        (SparseDecode.apply(acts, W, None, idx, SparsePattern(40)) * g).sum().backward()
        (torch.nn.functional.embedding_bag(idx, W, per_sample_weights=ref, mode="sum") * g).sum().backward()
        assert torch.allclose(acts.grad, ref.grad, atol=1e-6), (n, k)


def test_geometric_median_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=gen, dtype=torch.float64)
    x[:10] += 50.0  # outliers pull the mean, not the median
    gm = geometric_median(x, max_iter=500, tol=1e-10)
    ref = minimize(_sum_dist, x.median(0).values.numpy(), args=(x,), method="Nelder-Mead",
                   options=dict(xatol=1e-10, fatol=1e-12, maxiter=20000, maxfev=20000))
    assert _sum_dist(gm, x) <= ref.fun + 1e-6
    torch.testing.assert_close(gm, torch.as_tensor(ref.x), atol=1e-3, rtol=0)
    # it beats the mean and every small perturbation of itself
    assert _sum_dist(gm, x) < _sum_dist(x.mean(0), x) - 1.0
    for _ in range(20):
        assert _sum_dist(gm, x) <= _sum_dist(gm + 1e-3 * torch.randn(5, generator=gen, dtype=torch.float64), x)


def test_init_b_dec() -> None:
    sae = build_topk(d_in=5)
    x = torch.randn(100, 5)
    x[:5] += 100.0
    sae.init_b_dec(x, "mean")
    torch.testing.assert_close(sae.b_dec.data, x.mean(0))
    sae.init_b_dec(x, "geometric_median")
    torch.testing.assert_close(sae.b_dec.data, geometric_median(x))
    assert sae.b_dec.norm() < 5  # robust to the outliers, unlike the mean
    with pytest.raises(ValueError, match="--model.b_dec_init"):
        sae.init_b_dec(x, "median")


# ---------------------------------------------------------------------- the sparse backward, harder cases
def _naive_auxk(sae: TopKSAE, x: torch.Tensor, x_hat: torch.Tensor, dead: torch.Tensor, aux_norm: float) -> torch.Tensor:
    """AuxK from dense matrices: top ``k_aux`` of the dead latents' pre-activations, dense decode of the residual."""
    pre = (x - sae.b_dec.detach()) @ sae.W_enc + sae.b_enc
    pre_dead = pre[:, dead]
    k_aux = min(sae.k_aux, int(dead.sum()))
    mask = torch.zeros_like(pre_dead).scatter(-1, pre_dead.detach().topk(k_aux, dim=-1).indices, 1.0)
    acts = pre_dead * mask
    if sae.relu_after_topk:
        acts = acts.relu()
    e_hat = acts @ sae.W_dec[dead]
    e = (x - x_hat).detach()
    scale = min(int(dead.sum()) / sae.k_aux, 1.0)
    return sae.aux_coef * scale * (e_hat - e).pow(2).sum() * aux_norm


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("gsae", [False, True])
def test_sparse_backward_with_auxk_equals_dense_autograd(relu: bool, gsae: bool) -> None:
    """Recon + AuxK through the sparse paths (shared latent-major order, ``SparseDecode`` for AuxK too) against the
    dense autograd path and a dense-matrix reference: 96 tokens × k=6 over 40 latents, so every latent is selected
    on many tokens (duplicate indices across tokens); a g-SAE shares the path with its own selection."""
    from gsae.sae import GradTopKSAE

    n, d_in, d_sae, k = 96, 16, 40, 6
    gen = torch.Generator().manual_seed(3)
    x, g, w = torch.randn(n, d_in, generator=gen), torch.randn(n, d_in, generator=gen), torch.rand(n, d_in, generator=gen)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[[1, 4, 5, 9, 17, 22, 23, 30, 38]] = True

    def build(sparse: bool) -> TopKSAE:
        kw = dict(d_sae=d_sae, k=k, k_aux=5, relu_after_topk=relu, sparse_backward=sparse)
        return randomize(GradTopKSAE(d_in, beta=3.0, **kw) if gsae else TopKSAE(d_in, **kw))

    grads, outs = {}, {}
    for name in ("sparse", "dense", "naive"):
        sae = build(name != "dense")
        out = sae(x, grad=g if gsae else None, dead_mask=dead, aux_norm=0.01)
        x_hat, aux = out.x_hat, out.aux_loss
        if name == "naive":  # same selection, everything else from dense matrices
            dense = sae.densify(out)
            pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
            latents = pre * (dense != 0).to(pre.dtype) if not relu else (pre * (dense != 0).to(pre.dtype)).relu()
            x_hat = latents @ sae.W_dec + sae.b_dec
            aux = _naive_auxk(sae, x, x_hat, dead, 0.01)
        assert aux > 0
        (((x_hat - x).pow(2) * w).sum() + aux).backward()
        grads[name] = {p: t.grad.clone() for p, t in sae.named_parameters()}
        outs[name] = out
    assert torch.equal(outs["sparse"].top_idx.sort(-1).values, outs["dense"].top_idx.sort(-1).values)
    counts = torch.bincount(outs["sparse"].top_idx.reshape(-1), minlength=d_sae)
    assert counts.max() > 10 and (counts > 1).sum() > 30, "test setup: latents must repeat across tokens"
    for p in ("W_enc", "b_enc", "b_dec", "W_dec"):
        assert grads["sparse"][p].abs().sum() > 0, p
        torch.testing.assert_close(grads["sparse"][p], grads["dense"][p], rtol=1e-4, atol=1e-5, msg=p)
        torch.testing.assert_close(grads["sparse"][p], grads["naive"][p], rtol=1e-4, atol=1e-5, msg=p)


def test_sparse_backward_keeps_parameter_layout_and_skips_unused_outputs() -> None:
    """``∂W_enc`` comes in ``W_enc``'s own (transposed) layout, so autograd takes it without a copy; a loss that
    uses only ``x̂`` and no kept value directly, or only ``pre_acts``, still works."""
    sae = randomize(build_topk(d_in=16, d_sae=64, k=4))
    x = torch.randn(32, 16)
    sae(x).x_hat.pow(2).sum().backward()
    for p in sae.parameters():
        assert p.grad.stride() == p.stride()
    sae.zero_grad()
    out = sae(x)
    out.top_acts.sum().backward()  # encoder only: no decoder gradient
    assert sae.W_dec.grad is None and sae.W_enc.grad.abs().sum() > 0
    # no rows at all
    empty = sae(torch.randn(0, 16))
    empty.x_hat.sum().backward()
    assert empty.x_hat.shape == (0, 16)


def test_decode_sparse_backward_equals_embedding_bag_autograd() -> None:
    """The base class's ``decode_sparse`` (``SparseDecode``) against ``embedding_bag``'s own autograd, with indices
    repeated within and across rows and kept values that need gradient."""
    import torch.nn.functional as F

    sae = randomize(build_topk(d_in=8, d_sae=20, k=3))
    gen = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 20, (50, 7), generator=gen)
    idx[0] = 3  # one latent repeated within a row
    acts = torch.randn(50, 7, generator=gen)
    w = torch.rand(50, 8, generator=gen)
    results = []
    for fast in (True, False):
        a = acts.clone().requires_grad_(True)
        sae.zero_grad()
        if fast:
            out = sae.decode_sparse(a, idx)
        else:
            out = F.embedding_bag(idx, sae.W_dec, per_sample_weights=a, mode="sum") + sae.b_dec
        (out.pow(2) * w).sum().backward()
        results.append((out.detach(), a.grad, sae.W_dec.grad.clone(), sae.b_dec.grad.clone()))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("d", "k"), [(12288, 32), (12288, 3), (12288, 64), (15360, 10), (3000, 7), (768, 200), (64, 5)])
def test_topk_indices_equals_torch_topk(d: int, k: int) -> None:
    """The two-level CPU selection returns the same k values per row as ``torch.topk`` (indices distinct), also with
    heavy ties, ±inf and NaN, on block and fallback shapes alike."""
    check_topk_indices(d, k)


def check_topk_indices(d: int, k: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    """:func:`test_topk_indices_equals_torch_topk` on ``device`` in ``dtype`` (``tests/gpu`` runs it on CUDA)."""
    g = torch.Generator().manual_seed(d + k)
    s = torch.randn(96, d, generator=g)
    s[0] = torch.randint(0, 3, (d,), generator=g).float()  # almost every value tied
    s[1, :: max(1, d // (2 * k))] = float("inf")  # more +inf entries than k
    s[2] = float("-inf")
    s[2, :3] = 1.0  # fewer finite entries than k
    s[3, 5] = float("nan")  # torch.topk ranks NaN above everything
    s[4] = s[4].abs() * (1e-30 if dtype == torch.float32 else 1e-38)  # tiny and denormal values
    s = s.to(device, dtype)
    idx = topk_indices(s, k)
    ref = s.topk(k, dim=-1, sorted=False).values
    assert idx.shape == (96, k) and idx.dtype == torch.long
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()
    torch.testing.assert_close(s.gather(1, idx).sort(-1).values, ref.sort(-1).values, equal_nan=True, rtol=0, atol=0)
    # a non-contiguous score matrix (e.g. a transposed view) gives the same indices on the CPU, the same values
    # elsewhere (CUDA's torch.topk may pick other ones among ties, in another order, for another layout)
    again = topk_indices(s.T.contiguous().T, k)
    if device == "cpu":
        assert torch.equal(again, idx)
    torch.testing.assert_close(s.gather(1, again).sort(-1).values, ref.sort(-1).values, equal_nan=True, rtol=0, atol=0)
    # the shapes of this project take the block path (measured faster), tiny ones fall back to torch.topk
    assert (topk_block(d, k) > 0) == (d >= 3000)


def test_decoder_constraints_in_row_blocks_equal_the_whole_matrix_formulas() -> None:
    """remove_parallel_grad / normalize_decoder work in blocks of ROW_BLOCK rows: every block, the last partial
    one included, gets ``g − (g·w) w`` and ``w / ‖w‖`` of its own rows."""
    sae = build_topk(d_in=16, d_sae=2 * TopKSAE.ROW_BLOCK + 77, k=4)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(sae.d_sae, 1) + 0.5)  # rows off the sphere
    g = torch.randn_like(sae.W_dec)
    w = sae.W_dec.detach().clone()
    sae.W_dec.grad = g.clone()
    sae.remove_parallel_grad()
    torch.testing.assert_close(sae.W_dec.grad, g - (g * w).sum(-1, keepdim=True) * w, rtol=1e-5, atol=1e-6)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.detach(), w / w.norm(dim=-1, keepdim=True), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("by_sort", [False, True])
def test_true_indices_equal_nonzero(by_sort: bool) -> None:
    from gsae.sae.topk import true_indices

    gen = torch.Generator().manual_seed(0)
    for mask in (torch.rand(300, generator=gen) < 0.1, torch.zeros(50, dtype=torch.bool), torch.ones(7, dtype=torch.bool)):
        want = mask.nonzero().squeeze(-1)
        assert torch.equal(true_indices(mask, int(mask.sum()), by_sort=by_sort), want)


@pytest.mark.parametrize("gsae", [False, True])
def test_auxk_with_the_host_count_and_the_sort_path_equals_counting_on_the_device(monkeypatch, gsae: bool) -> None:
    """A mask carrying its count (``count_true()``, as ``DeadLatentTracker.auxk_mask`` gives it) and the GPU's sort-based
    dead indices give the loss and gradients of counting the mask."""
    import gsae.sae.topk as topk
    from gsae.sae import GradTopKSAE

    x, g = torch.randn(64, 16), torch.randn(64, 16)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[[2, 3, 11, 19, 20, 33]] = True
    results = []
    for carried in (False, True):
        sae = randomize(GradTopKSAE(16, 40, 4, beta=2.0, k_aux=4) if gsae else TopKSAE(16, 40, 4, k_aux=4))
        mask = dead.clone()
        if carried:
            mask.count_true = lambda: 6
            inner = topk.true_indices
            monkeypatch.setattr(topk, "true_indices", lambda m, n, inner=inner: inner(m, n, by_sort=True))
        out = sae(x, grad=g if gsae else None, dead_mask=mask, aux_norm=0.1)
        assert out.aux_loss > 0
        out.aux_loss.backward()
        results.append((out.aux_loss.detach(), {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for name in results[0][1]:
        assert torch.equal(results[0][1][name], results[1][1][name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_transposed_mm_equals_the_sparse_one(dtype) -> None:
    """``SparsePattern.transposed_mm`` built densely in ``dense_dtype`` (the path under CUDA autocast) against the
    sparse ``embedding_bag`` one: equal in float32 up to summation order, within bf16 rounding in bfloat16."""
    from gsae.sae.base import SparsePattern

    n, k, d_sae, d = 256, 8, 96, 24
    gen = torch.Generator().manual_seed(1)
    idx = torch.rand(n, d_sae, generator=gen).topk(k, dim=-1).indices
    values, dense = torch.randn(n, k, generator=gen), torch.randn(n, d, generator=gen)
    want = SparsePattern(d_sae, idx).transposed_mm(values, dense)
    naive = torch.zeros(n, d_sae).scatter_(1, idx, values).T @ dense
    torch.testing.assert_close(want, naive, rtol=1e-5, atol=1e-5)
    got = SparsePattern(d_sae, idx, dense_dtype=dtype).transposed_mm(values, dense)
    assert got.dtype == dense.dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=0.05 * float(naive.abs().max()))
    torch.testing.assert_close(got, naive, **tol)


def test_sae_under_cuda_autocast_only_takes_the_dense_products(monkeypatch) -> None:
    """The dense path is chosen for CUDA tensors under CUDA autocast only (and can be switched off): not for a CPU
    tensor under CPU autocast, nor for one under CUDA autocast."""
    import gsae.sae.base as base

    x = torch.randn(4, 8)
    assert base.autocast_dense_dtype(x) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert base.autocast_dense_dtype(x) is None  # CPU autocast: the sparse path (FLOPs win on a CPU)
    torch.set_autocast_enabled("cuda", True)  # the flag alone (no CUDA device needed): a CPU-side computation inside
    try:  # a GPU run's autocast region keeps the sparse path
        assert torch.is_autocast_enabled("cuda")
        assert base.autocast_dense_dtype(x) is None
    finally:
        torch.set_autocast_enabled("cuda", False)
    monkeypatch.setattr(base, "DENSE_GRADS_UNDER_AUTOCAST", False)
    assert base.autocast_dense_dtype(x) is None


@pytest.mark.parametrize("gsae", [False, True])
def test_config_names_every_constructor_argument_with_its_given_value(gsae: bool) -> None:
    """``config()`` is what a checkpoint rebuilds the SAE from: every constructor argument (read from the signature),
    each with the non-default value it was given, so a rebuilt SAE trains and selects as the saved one (a dropped
    ``unit_norm_decoder`` or ``relu_after_topk`` would silently come back as its default)."""
    import inspect

    from gsae.sae import GradTopKSAE

    cls = GradTopKSAE if gsae else TopKSAE
    given = dict(d_in=16, d_sae=64, k=4, relu_after_topk=True, k_aux=3, aux_coef=0.5, sparse_backward=False, seed=5,
                 unit_norm_decoder=False)
    if gsae:
        given["beta"] = 7.0
    assert set(given) == set(inspect.signature(cls.__init__).parameters) - {"self"}
    sae = cls(**given)
    assert sae.config() == given
    again = cls(**sae.config())
    assert (again.unit_norm_decoder, again.relu_after_topk, again.sparse_backward) == (False, True, False)


def test_auxk_loss_without_aux_norm_is_the_centred_ratio_scaled_by_the_dead_share() -> None:
    """AuxK's own normalisation (no ``aux_norm``: the loss the SAE computes alone) against a per-row loop: with 5 dead
    latents and ``k_aux = 8`` every dead latent is used, the loss is ``aux_coef · (5/8) · Σ‖e − ê‖² / Σ‖e − ē‖²``
    (``ē`` the mean residual over the rows)."""
    sae = randomize(build_topk(d_in=8, d_sae=40, k=4, k_aux=8, aux_coef=0.25))
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(30, 8, generator=gen) * 2 + 3  # an offset: the residual has a mean, so centring matters
    dead_ids = [2, 7, 19, 20, 33]
    dead = torch.zeros(40, dtype=torch.bool)
    dead[dead_ids] = True
    with torch.no_grad():
        out = sae(x, dead_mask=dead)
        e = x - out.x_hat
        num = 0.0
        for n in range(x.shape[0]):
            e_hat = torch.zeros(8)
            for j in dead_ids:  # all 5 dead latents are among the top k_aux = 8
                pre = float((x[n] - sae.b_dec) @ sae.W_enc[:, j] + sae.b_enc[j])
                e_hat += pre * sae.W_dec[j]
            num += float((e[n] - e_hat).pow(2).sum())
        den = float((e - e.mean(0)).pow(2).sum())
    assert float(out.aux_loss) == pytest.approx(0.25 * (5 / 8) * num / den, rel=1e-5)


def test_aux_coef_zero_is_accepted_and_gives_no_auxk_loss() -> None:
    """``--model.sae.aux_coef`` must be ``>= 0``: 0 is valid (AuxK off by its coefficient), only negatives are refused."""
    sae = randomize(build_topk(d_in=8, d_sae=32, k=2, k_aux=4, aux_coef=0.0))
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:6] = True
    assert float(sae(torch.randn(10, 8), dead_mask=dead).aux_loss.detach()) == 0.0
    with pytest.raises(ValueError, match=r"--model\.sae\.aux_coef"):
        build_topk(aux_coef=-1e-3)


def test_geometric_median_at_its_default_tolerance_is_near_the_optimum() -> None:
    """``init_b_dec`` takes the default ``tol``: the median it stops at is within 1e-3 of the true minimiser of the
    summed distances (a brute-force Nelder-Mead), not just a few Weiszfeld steps from the mean."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 4, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.5, 2.0], dtype=torch.float64)
    x[:30] += 40.0  # outliers: the mean is far from the median, so stopping early shows
    ref = minimize(_sum_dist, x.median(0).values.numpy(), args=(x,), method="Nelder-Mead",
                   options=dict(xatol=1e-10, fatol=1e-12, maxiter=20000, maxfev=20000))
    gm = geometric_median(x)
    assert float((gm - torch.as_tensor(ref.x)).norm()) < 1e-3


def test_the_latent_order_is_exact_past_16_bit_latent_ids() -> None:
    """``SparsePattern``'s CPU radix sort keys latents as uint16: past ``2**16`` latents it must take the torch sort,
    whose order (tokens, offsets) is checked here against the dense ``Gᵀ @ D`` with latents on both sides of 2**16."""
    d_sae, n, k, d = 2**16 + 40, 64, 5, 6
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, d_sae, (n, k), generator=gen)
    idx[:, 0] = d_sae - 1 - torch.arange(n)  # latents above 2**16 (their uint16 keys would wrap onto 0..39)
    idx[:3, 1] = torch.tensor([2**16, 0, 2**16 - 1])
    idx[3:6, 1] = 7  # a latent on several tokens
    values, dense = torch.randn(n, k, generator=gen), torch.randn(n, d, generator=gen)
    want = torch.zeros(n, d_sae).scatter_add_(1, idx, values).T @ dense
    got = SparsePattern(d_sae, idx).transposed_mm(values, dense)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 7])
def test_init_is_unit_decoder_rows_with_the_encoder_their_transpose_and_zero_biases(seed: int) -> None:
    """Gao et al. §A.1 / smol-sae (SPEC §1.3): decoder rows random unit vectors, ``W_enc = W_decᵀ`` exactly (same
    directions and scale), ``b_enc = b_dec = 0``, reproducible per seed and different across seeds."""
    sae = TopKSAE(16, d_sae=64, k=4, seed=seed)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64), rtol=0, atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert torch.equal(sae.b_enc, torch.zeros(64)) and torch.equal(sae.b_dec, torch.zeros(16))
    assert torch.equal(TopKSAE(16, d_sae=64, k=4, seed=seed).W_dec, sae.W_dec)
    assert not torch.equal(TopKSAE(16, d_sae=64, k=4, seed=seed + 1).W_dec, sae.W_dec)


def test_sparse_backward_with_a_frozen_encoder_bias_still_trains_b_dec() -> None:
    """``∂b_dec``'s encoder part is ``−W_enc ∂b_enc``: it is needed even when ``b_enc`` itself is frozen (no
    ``requires_grad``); the sparse backward then gives the dense autograd's ``∂b_dec``, ``∂W_enc`` and ``∂W_dec``."""
    x, w = torch.randn(40, 16), torch.rand(40, 16)
    grads = []
    for sparse in (True, False):
        sae = randomize(build_topk(d_in=16, d_sae=48, k=5, sparse_backward=sparse))
        sae.b_enc.requires_grad_(False)
        ((sae(x).x_hat - x).pow(2) * w).sum().backward()
        assert sae.b_enc.grad is None
        grads.append({n: p.grad for n, p in sae.named_parameters() if p.requires_grad})
    assert grads[0]["b_dec"].abs().sum() > 0
    for name in ("W_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("sparse_backward", [True, False])
@pytest.mark.parametrize("x_dtype", [torch.float64, torch.bfloat16])
def test_activations_of_another_dtype_are_encoded_in_the_saes_dtype(sparse_backward: bool, x_dtype) -> None:
    """Activations arrive in the LM's dtype (a float64 reference model, a bfloat16 one) while the SAE trains in
    float32: the forward casts them to the SAE's dtype first, so it selects and reconstructs as the naive float32
    reference on ``x.float()`` (and the AuxK path takes them too)."""
    sae = randomize(build_topk(d_in=16, d_sae=64, k=5, sparse_backward=sparse_backward))
    x = torch.randn(30, 16).to(x_dtype)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[[1, 2, 3]] = True
    out = sae(x, dead_mask=dead)
    _, ref_idx, ref_x_hat = naive_topk(sae, x.float())
    assert out.x_hat.dtype == torch.float32 and out.aux_loss > 0
    assert [set(r.tolist()) for r in out.top_idx] == [set(r.tolist()) for r in ref_idx]
    torch.testing.assert_close(out.x_hat, ref_x_hat, rtol=1e-5, atol=1e-5)
