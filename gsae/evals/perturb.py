"""The perturbation loop shared by ``sensitive_directions`` and ``plateaus``: many perturbed copies of a few
reference sequences, run from the hook on, compared with their reference by next-token KL and final-residual L2.

For each group of reference sequences the reference runs once (only the layers after the hook, up to the final
hidden state: ``LanguageModel.hidden_from_hook``) and its logits, probabilities and final residual at the read
positions are kept; then every job's copies of the group run in forwards of about ``forward_tokens`` tokens, and
each copy's KL is taken against the kept reference in chunks of positions (:func:`gsae.lm_chunked.kl_to_reference`:
one vocabulary matmul per copy's chunk, no full-vocabulary logits of a forward, the reference never recomputed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from gsae import lm_chunked
from gsae.lm import LanguageModel

#: ``make(jobs (nj,), s0, s1) -> (nj, s1 − s0, t_run, D)``: the perturbed copies of reference sequences s0:s1.
MakeCopies = Callable[[Tensor, int, int], Tensor]


class PerturbedRuns(NamedTuple):
    """KL and L2 of every (job, reference sequence, read position).

    Attributes:
        kl: ``(J, N, R)`` float64 ``KL(P_ref ‖ P_pert)`` of the next token.
        l2: ``(J, N, R)`` float64 ``‖h_pert − h_ref‖`` at ``blocks.{n_layers−1}.hook_resid_post``.
    """

    kl: Tensor
    l2: Tensor


def final_hook(lm: LanguageModel) -> str:
    """The final residual, where the L2 distance is read (``blocks.11.hook_resid_post`` for GPT-2 small)."""
    return f"blocks.{lm.n_layers - 1}.hook_resid_post"


@torch.no_grad()
def perturbation_runs(
    lm: LanguageModel,
    hook: str,
    ref: Tensor,
    n_jobs: int,
    make: MakeCopies,
    read: Tensor,
    *,
    tokens: Tensor | None = None,
    forward_tokens: int = 1024,
) -> PerturbedRuns:
    """KL and final-residual L2 of ``make(j, s0, s1)`` against ``ref[s0:s1]`` at the ``read`` positions.

    Args:
        lm: the language model.
        hook: the hook the activations are put at.
        ref: ``(N, t_run, D)`` reference activations (clean, or a curve's step 0).
        n_jobs: number of jobs ``J``; every job has one copy of every reference sequence.
        make: builds the copies (see :data:`MakeCopies`).
        read: long ``(R,)`` positions read (< ``t_run``).
        tokens: ``(N, t_run)`` tokens, needed only for hooks inside a block (full forward with a patch hook).
        forward_tokens: about how many tokens one forward pass holds (memory: the reference's ``forward_tokens × d_vocab``
            logits and probabilities).
    """
    N, t_run, _ = ref.shape
    fin = final_hook(lm)
    read = read.to(ref.device)
    R = read.numel()
    lo = int(read[0]) if R else 0
    if R and torch.equal(read.cpu(), torch.arange(lo, lo + R)):
        read = slice(lo, lo + R)  # contiguous: a view of the logits, not a gathered copy
    kl = torch.zeros(n_jobs, N, R, dtype=torch.float64, device=ref.device)
    l2 = torch.zeros_like(kl)
    group = min(N, max(1, forward_tokens // t_run))  # reference sequences per group
    per_fwd = max(1, forward_tokens // (group * t_run))  # jobs per forward
    W_U, b_U, V = lm.unembedding()
    for s0 in range(0, N, group):
        s1 = min(N, s0 + group)
        b = s1 - s0
        tok = None if tokens is None else tokens[s0:s1]
        clean = lm.hidden_from_hook(ref[s0:s1], hook, tokens=tok, cache_hooks=[fin])
        h_ref = clean.cache.get(fin, ref[s0:s1])[:, read].float()  # the hook may itself be the final residual
        kept = lm_chunked.reference(clean.hidden[:, read].reshape(b * R, -1), W_U, b_U, V)  # for every job
        del clean
        for j0 in range(0, n_jobs, per_fwd):
            jobs = torch.arange(j0, min(n_jobs, j0 + per_fwd), device=ref.device)
            xp = make(jobs, s0, s1)  # (nj, b, t_run, D)
            nj = xp.shape[0]
            flat = xp.reshape(nj * b, t_run, -1)
            run = lm.hidden_from_hook(flat, hook, tokens=None if tok is None else tok.repeat(nj, 1), cache_hooks=[fin])
            hidden = run.hidden[:, read].reshape(nj, b * R, -1)
            kl[j0 : j0 + nj, s0:s1] = lm_chunked.kl_to_reference(kept, hidden, W_U, b_U, d_vocab=V).reshape(nj, b, R)
            h = run.cache.get(fin, flat)[:, read].reshape(nj, b, R, -1).float()
            l2[j0 : j0 + nj, s0:s1] = (h - h_ref).norm(dim=-1).double()
            del run, xp, flat, hidden, h
    return PerturbedRuns(kl, l2)
