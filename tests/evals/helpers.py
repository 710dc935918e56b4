"""Builders for benchmark tests: held-out synthetic tokens and known-answer SAEs."""

from __future__ import annotations

import torch

from gsae.data.tokens import synthetic_context
from gsae.lm import BYTE_BOS
from gsae.sae import TopKSAE
from gsae.sae.base import SAEOutput, SparseAutoencoder

HOOK = "blocks.1.hook_resid_pre"


def build_tokens(n_seqs: int = 8, context_size: int = 32, seed: int = 0) -> torch.Tensor:
    """``(n_seqs, context_size)`` synthetic contexts of the byte vocabulary, BOS first."""
    return torch.tensor([synthetic_context(i, context_size, 257, seed, BYTE_BOS, True) for i in range(n_seqs)])


def build_topk(d_in: int = 64, d_sae: int = 128, k: int = 8, **kw) -> TopKSAE:
    return TopKSAE(d_in, d_sae=d_sae, k=k, **kw)


def export_tiny(path, sae: SparseAutoencoder | None = None, **meta):
    """``sae`` (default :func:`build_topk`) written in SAELens format to the folder ``path``, as an SAE of random-tiny's
    ``HOOK`` trained on contexts of 16; ``meta`` adds to or overrides that record. Returns ``path``."""
    from gsae.export import export_saelens

    export_saelens(build_topk() if sae is None else sae, path,
                   {"hook": HOOK, "lm": {"name": "random-tiny"}, "context_size": 16, **meta})
    return path


class IdentitySAE(SparseAutoencoder):
    """``x̂ = x`` exactly: latents are the coordinates of ``x`` (``W_enc = W_dec = I``, biases 0)."""

    def __init__(self, d_in: int = 64) -> None:
        super().__init__(d_in, d_in)
        with torch.no_grad():
            self.W_dec.copy_(torch.eye(d_in))
            self.W_enc.copy_(torch.eye(d_in))

    def forward(self, x, grad=None, dead_mask=None) -> SAEOutput:
        zero = x.new_zeros(())
        return SAEOutput(x, None, None, x, x, zero, zero)


def plant_dead_latent(sae: TopKSAE, i: int = 0) -> TopKSAE:
    """Make latent ``i`` never selected: a huge negative encoder bias (TopK keeps raw pre-activations)."""
    with torch.no_grad():
        sae.b_enc[i] = -1e6
    return sae
