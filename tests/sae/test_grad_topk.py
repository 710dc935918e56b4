"""g-SAE selection (arXiv 2411.10397 §3): TopK of ``s = z ∘ (1 + β|W_dec g|)``, kept values plain ``z``,
no gradient into ``g``."""

from __future__ import annotations

import pytest
import torch

from gsae.sae import GradTopKSAE, TopKSAE
from tests.conftest import randomize


def _pair(beta: float, **kw) -> tuple[GradTopKSAE, TopKSAE]:
    g_sae = randomize(GradTopKSAE(16, d_sae=64, k=5, beta=beta, **kw))
    t_sae = randomize(TopKSAE(16, d_sae=64, k=5, **kw))
    torch.testing.assert_close(dict(g_sae.named_parameters()), dict(t_sae.named_parameters()))
    return g_sae, t_sae


def _index_sets(idx: torch.Tensor) -> list[set[int]]:
    return [set(r.tolist()) for r in idx]


@pytest.mark.parametrize("sparse_backward", [True, False])
def test_beta_zero_or_no_grad_is_plain_topk(sparse_backward: bool) -> None:
    x, g = torch.randn(50, 16), torch.randn(50, 16)
    g_sae, t_sae = _pair(0.0, sparse_backward=sparse_backward)
    ref = t_sae(x)
    for out in (g_sae(x, grad=g), _pair(1e5, sparse_backward=sparse_backward)[0](x, grad=None)):
        assert _index_sets(out.top_idx) == _index_sets(ref.top_idx)
        torch.testing.assert_close(g_sae.densify(out), t_sae.densify(ref))
        torch.testing.assert_close(out.x_hat, ref.x_hat)


@pytest.mark.parametrize("sparse_backward", [True, False])
@pytest.mark.parametrize("relu", [False, True])
def test_selection_equals_brute_force_score(sparse_backward: bool, relu: bool) -> None:
    beta = 2.0
    x, g = torch.randn(200, 16), torch.randn(200, 16)
    g_sae, t_sae = _pair(beta, sparse_backward=sparse_backward, relu_after_topk=relu)
    out = g_sae(x, grad=g)

    z = (x - g_sae.b_dec) @ g_sae.W_enc + g_sae.b_enc  # (N, d_sae)
    a = (g @ g_sae.W_dec.T).abs()  # |W_dec g| per latent, (N, d_sae)
    s = z * (1 + beta * a)
    ref_idx = s.topk(5, dim=-1).indices
    assert _index_sets(out.top_idx) == _index_sets(ref_idx)
    # the gradient term changes the selection for many tokens (else this test would not test it)
    differs = sum(a != b for a, b in zip(_index_sets(out.top_idx), _index_sets(t_sae(x).top_idx)))
    assert differs > 50

    # kept values are the plain pre-activations z (ReLU'd if asked), not the scores s
    expected = z.gather(-1, out.top_idx)
    torch.testing.assert_close(out.top_acts, expected.relu() if relu else expected)
    dense = torch.zeros_like(z).scatter(-1, out.top_idx, out.top_acts)
    torch.testing.assert_close(out.x_hat, dense @ g_sae.W_dec + g_sae.b_dec, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_sae.attribution(g), beta * a)


@pytest.mark.parametrize("sparse_backward", [True, False])
def test_no_gradient_flows_into_grad(sparse_backward: bool) -> None:
    g_sae, _ = _pair(3.0, sparse_backward=sparse_backward)
    x = torch.randn(30, 16, requires_grad=True)
    g = torch.randn(30, 16, requires_grad=True)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:10] = True
    out = g_sae(x, grad=g, dead_mask=dead)
    loss = (out.x_hat - x.detach()).pow(2).sum() + out.aux_loss
    (gx, gg) = torch.autograd.grad(loss, [x, g], allow_unused=True)
    assert gg is None
    assert gx is not None and gx.abs().sum() > 0
    assert not out.pre_acts.requires_grad


def test_sparse_and_dense_backward_agree_for_gsae() -> None:
    x, g = torch.randn(64, 16), torch.randn(64, 16)
    grads = []
    for sparse in (True, False):
        sae = randomize(GradTopKSAE(16, d_sae=48, k=4, beta=5.0, sparse_backward=sparse))
        sae(x, grad=g).x_hat.sub(x).pow(2).sum().backward()
        grads.append({n: p.grad for n, p in sae.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_negative_beta_is_rejected_and_config_roundtrips() -> None:
    with pytest.raises(ValueError, match=r"--model\.sae\.beta"):
        GradTopKSAE(16, d_sae=64, k=4, beta=-1.0)
    with pytest.raises(ValueError, match=r"--model\.sae\.k"):
        GradTopKSAE(16, d_sae=4, k=5)
    sae = GradTopKSAE(16, d_sae=64, k=4, beta=7.0, seed=3)
    assert sae.config()["beta"] == 7.0 and sae.architecture == "gsae"
    again = GradTopKSAE(**sae.config())
    torch.testing.assert_close(dict(again.named_parameters()), dict(sae.named_parameters()))


def test_attribution_at_equals_the_dense_attribution_gathered() -> None:
    g = torch.Generator().manual_seed(3)
    sae = GradTopKSAE(16, 64, k=5, beta=7.0)
    x, grad = torch.randn(12, 16, generator=g), torch.randn(12, 16, generator=g)
    idx = sae(x, grad=grad).top_idx
    torch.testing.assert_close(sae.attribution_at(grad, idx), sae.attribution(grad).gather(-1, idx))


@pytest.mark.parametrize("sparse_backward", [True, False])
@pytest.mark.parametrize("g_scale", [1e-6, 1e-8])
def test_under_float16_autocast_a_small_gradient_selects_as_in_float64(sparse_backward: bool, g_scale: float) -> None:
    """``16-mixed``: a mean-reduced CE gradient over many tokens puts ``|W_dec g|`` at ~1e-7 to 1e-9, float16
    subnormals or 0; with β sized to it (β|W_dec g| ~ 1), β|W_dec g| was 2% off at g ~ 1e-6 and the selection kept
    38% of float64's latents at 1e-8. Rows scaled by powers of two before the product keep both as float32 does."""
    torch.manual_seed(0)
    d, m, k = 64, 1024, 16
    x, g = torch.randn(256, d), torch.randn(256, d) * g_scale
    sae = randomize(GradTopKSAE(d, d_sae=m, k=k, beta=1.0, sparse_backward=sparse_backward, k_aux=0))
    a64 = (g.double() @ sae.W_dec.detach().double().T).abs()
    sae.beta = float(1 / a64.median().detach())  # the gradient term ~ 1: it moves the selection
    z64 = (x.double() - sae.b_dec.double()) @ sae.W_enc.double() + sae.b_enc.double()
    ref = (z64 * (1 + sae.beta * a64)).topk(k, dim=-1).indices
    assert sum(a != b for a, b in zip(_index_sets(ref), _index_sets(z64.topk(k, dim=-1).indices))) > 128
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        out = sae(x, grad=g)
        attr, attr_at = sae.attribution(g), sae.attribution_at(g, out.top_idx)
    agree = sum(len(a & b) for a, b in zip(_index_sets(out.top_idx), _index_sets(ref))) / ref.numel()
    assert agree > 0.98, f"the float16 selection keeps {agree:.1%} of float64's latents"
    want = sae.beta * a64
    assert float(((attr.double() - want).abs() / want.clamp_min(1e-3)).median()) < 2e-3
    torch.testing.assert_close(attr_at.double(), want.gather(-1, out.top_idx), rtol=1e-2, atol=1e-3)


def test_half_safe_grad_scales_rows_exactly_and_only_in_float16() -> None:
    from gsae.sae.grad_topk import half_safe_grad

    g = torch.tensor([[3e-8, -1e-9], [0.0, 0.0], [5.0, 1.0]])
    w32, w16 = torch.randn(3, 2), torch.randn(3, 2).half()
    same, r = half_safe_grad(g, w32)
    assert r is None and same.dtype == torch.float32 and torch.equal(same, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert half_safe_grad(g, w32)[1] is None
    for scaled, r in (_under_float16(lambda: half_safe_grad(g, w32)), half_safe_grad(g, w16)):
        if scaled.dtype == torch.float32:  # autocast casts it in the product
            assert torch.equal(scaled * r, g)  # powers of two: exact
        else:  # a float16 decoder takes it in float16: normal numbers, float16's rounding
            assert scaled.dtype == torch.float16
            torch.testing.assert_close(scaled.float() * r, g, rtol=1e-3, atol=0)
        top = scaled.float().abs().amax(-1)
        assert ((top >= 0.5) & (top < 1)).tolist() == [True, False, True] and float(r[1]) == 1.0
    sae = randomize(GradTopKSAE(2, d_sae=3, k=1, beta=1e8, k_aux=0)).half()  # a float16 SAE, no autocast
    torch.testing.assert_close(sae.attribution(g[:1]).float(), 1e8 * (g[:1] @ sae.W_dec.float().T).abs(), rtol=2e-3, atol=0)


def _under_float16(fn):
    with torch.autocast("cpu", dtype=torch.float16):
        return fn()


def test_the_grad_normaliser_travels_in_the_state_dict() -> None:
    """The gradient scale a g-SAE was trained with is part of its weights (a checkpoint or export): a fresh SAE that
    loads the state dict selects with the trained scale, not the 'unset' 0 (= whatever batch it is evaluated on)."""
    sae = GradTopKSAE(16, d_sae=64, k=4, beta=3.0)
    sae.grad_normaliser.fill_(8160.0)
    state = sae.state_dict()
    assert float(state["grad_normaliser"]) == 8160.0
    fresh = GradTopKSAE(**sae.config())
    assert float(fresh.grad_normaliser) == 0.0
    fresh.load_state_dict(state)
    assert float(fresh.grad_normaliser) == 8160.0
