"""What every benchmark needs: running an SAE on token batches (with ``∇ₓL`` for g-SAEs) and batching.

Benchmark contract (one file per benchmark in ``gsae/evals/``, no Lightning import)::

    def run(sae, lm, hook, tokens, *, seed=0, **options) -> dict   # JSON-serialisable result
    def figures(result) -> dict[str, matplotlib.figure.Figure]     # optional, for TensorBoard

``tokens`` is a ``(n_seq, T)`` LongTensor of evaluation contexts. Same seed, SAE and tokens give the
same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from gsae.data.harvest import loss_gradients
from gsae.lm import LanguageModel
from gsae.sae.base import SAEOutput, SparseAutoencoder


class SAEOnTokens(NamedTuple):
    """An SAE run on a batch of sequences.

    Attributes:
        x: ``(B, T, d_in)`` clean activations at the hook.
        grad: ``(B, T, d_in)`` ``∇ₓL`` (g-SAEs only) or ``None``.
        out: the SAE output on the flattened ``(B·T, d_in)`` activations.
        x_hat: ``(B, T, d_in)`` reconstruction.
    """

    x: Tensor
    grad: Tensor | None
    out: SAEOutput
    x_hat: Tensor


def needs_grad(sae: SparseAutoencoder) -> bool:
    """Whether the SAE's encoding uses ``∇ₓL`` (g-SAEs with β > 0)."""
    return getattr(sae, "beta", 0) > 0


@torch.no_grad()
def sae_on_tokens(sae: SparseAutoencoder, lm: LanguageModel, hook: str, tokens: Tensor) -> SAEOnTokens:
    """Activations at ``hook`` for ``tokens (B, T)`` and the SAE's output on them."""
    if needs_grad(sae):
        x, g, _ = loss_gradients(lm, tokens, hook, float(getattr(sae, "grad_normaliser", 0)))
    else:
        x, g = lm.activations(tokens, hook), None
    b, t, d = x.shape
    xf = x.reshape(b * t, d).to(sae.W_enc.dtype)
    out = sae(xf, grad=None if g is None else g.reshape(b * t, d).to(sae.W_enc.dtype))
    return SAEOnTokens(x, g, out, out.x_hat.reshape(b, t, d).to(x.dtype))


def batches(tokens: Tensor, batch_size: int) -> Iterator[Tensor]:
    """Consecutive ``(≤ batch_size, T)`` slices of ``tokens``."""
    for i in range(0, tokens.shape[0], batch_size):
        yield tokens[i : i + batch_size]


def special_token_mask(lm: LanguageModel, tokens: Tensor, exclude: bool = True) -> Tensor:
    """Bool ``(B, T)``: True at positions whose *input* token is not special (SPEC §5: SAELens masks
    them from every metric and leaves them unpatched). All True when ``exclude`` is False."""
    if not exclude:
        return torch.ones_like(tokens, dtype=torch.bool)
    return ~torch.isin(tokens, torch.tensor(lm.special_token_ids, device=tokens.device))
