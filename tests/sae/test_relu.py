"""ReLU + L1 SAE (Braun et al.): Apollo's initialisation (untied nn.Linear encoder, orthogonal decoder), tied optional."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gsae.sae import ReLUSAE


def test_default_encoder_is_an_untied_nn_linear_init():
    d_in, d_sae = 64, 512
    sae = ReLUSAE(d_in, d_sae=d_sae, seed=3)
    ref = nn.Linear(d_in, d_sae)  # Apollo: nn.Sequential(nn.Linear(input_size, n_dict_components), nn.ReLU())
    bound = 1 / math.sqrt(d_in)
    for ours, theirs in ((sae.W_enc, ref.weight.T), (sae.b_enc, ref.bias)):
        assert ours.shape == theirs.shape
        assert float(ours.abs().max()) <= bound and float(ours.abs().max()) > 0.95 * bound  # U(±1/√d_in)
        assert abs(float(ours.std()) - float(theirs.std())) < 0.05 * bound
    assert not torch.allclose(sae.W_enc, sae.W_dec.T)  # untied
    # the decoder as Apollo's: orthonormal columns (d_in orthonormal vectors in R^d_sae), rows renormalised in the forward
    torch.testing.assert_close(sae.W_dec.T @ sae.W_dec, torch.eye(d_in), atol=1e-5, rtol=0)
    assert torch.equal(sae.b_dec, torch.zeros(d_in))
    assert sae.config()["tied_init"] is False


def test_tied_init_option():
    sae = ReLUSAE(32, d_sae=128, tied_init=True)
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    assert torch.equal(sae.b_enc, torch.zeros(128))


def test_forward_matches_apollo_formula():
    sae = ReLUSAE(32, d_sae=128, l1_coef=2.0, seed=1)
    x = torch.randn(10, 32)
    out = sae(x)
    c = F.relu(x @ sae.W_enc + sae.b_enc)
    x_hat = F.linear(c, F.normalize(sae.W_dec.T, dim=0), bias=sae.b_dec)  # Apollo: dict_elements = normalize(dim=0)
    torch.testing.assert_close(out.x_hat, x_hat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.sparsity_loss, 2.0 * c.abs().sum(-1).mean() / 32)


def test_the_encoder_reads_x_itself_not_x_minus_b_dec():
    """Braun et al.'s ``c = ReLU(x W_enc + b_enc)``: unlike a TopK SAE's encoder, no ``b_dec`` is subtracted first
    (checked with a nonzero ``b_dec``, which the default init hides); ``pre_acts`` come back detached."""
    sae = ReLUSAE(16, d_sae=64, l1_coef=1.0, seed=2)
    with torch.no_grad():
        sae.b_dec.copy_(torch.linspace(-2, 2, 16))
        sae.b_enc.normal_(0, 0.5)
    x = torch.randn(12, 16)
    out = sae(x)
    c = F.relu(x @ sae.W_enc + sae.b_enc)
    assert not torch.allclose(c, F.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc), atol=1e-3)  # b_dec matters here
    torch.testing.assert_close(out.latents, c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.x_hat, F.linear(c, F.normalize(sae.W_dec.T, dim=0), bias=sae.b_dec), atol=1e-5,
                               rtol=1e-5)
    assert not out.pre_acts.requires_grad and out.latents.requires_grad


def test_the_training_system_leaves_the_relu_decoder_unconstrained(tiny_lm):
    """Apollo trains the raw decoder with plain Adam (the forward normalises its rows): the training system must
    neither project the decoder gradient nor renormalise its rows, as it does for a TopK SAE."""
    from gsae.sae import TopKSAE
    from gsae.systems import LocalSAESystem

    for build, constrained in ((lambda d: ReLUSAE(d, 32), False), (lambda d: TopKSAE(d, 32, 4), True)):
        system = LocalSAESystem(tiny_lm, build, hook="blocks.0.hook_resid_post")
        sae = system.sae
        with torch.no_grad():
            sae.W_dec.mul_(2.0)  # rows off the unit sphere
        grad = sae.W_dec.detach().clone() + torch.randn_like(sae.W_dec)  # with a component along each row
        sae.W_dec.grad = grad.clone()
        system.on_after_backward()
        assert torch.equal(sae.W_dec.grad, grad) != constrained
        assert sae.unit_norm_decoder == constrained


def test_same_seed_same_init():
    a, b = ReLUSAE(16, d_sae=64, seed=5), ReLUSAE(16, d_sae=64, seed=5)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
