"""What every benchmark needs: running an SAE on token batches (with ``∇ₓL`` for g-SAEs) and batching.

Benchmark contract (one file per benchmark in ``gsae/evals/``, no Lightning import)::

    def run(sae, lm, hook, tokens, *, seed=0, **options) -> dict   # JSON-serialisable result
    def figures(result) -> dict[str, matplotlib.figure.Figure]     # optional, for TensorBoard

``tokens`` is a ``(n_seq, T)`` LongTensor of evaluation contexts. Same seed, SAE and tokens give the
same numbers.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

from gsae.data.harvest import loss_gradients, loss_gradients_at
from gsae.lm import LanguageModel
from gsae.sae.base import SAEOutput, SparseAutoencoder

log = logging.getLogger(__name__)


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


#: default budget of :class:`SharedHarvests` (bytes of activations and gradients kept)
HARVEST_CACHE_BYTES = 1 << 30


class SharedHarvests:
    """The SAE-independent LM work of an evaluation, done once: activations (and ``∇ₓL``) per token batch.

    Every benchmark starts from the activations at the hook of its token batches (:func:`sae_on_tokens`), and
    g-SAEs from ``∇ₓL`` too: a forward (and backward) of the LM that does not depend on the SAE. Within
    :func:`shared_harvests`, the first request for a batch computes it and later ones (the next benchmark, the next
    member of a sweep) reuse it. Keys are the hook, the token *values* and, for gradients, the normaliser; plain
    activations and activations taken with the gradient are kept apart, so every SAE sees exactly the tensors it
    would have been given alone (tested: shared and unshared results are equal). Kept up to ``max_bytes``;
    beyond that, batches are computed as if unshared.

    Several hooks of one LM (a sweep over layers, :meth:`plan`): a miss at a planned hook computes the batch at every
    planned hook from one pass (:meth:`gsae.lm.LanguageModel.activations_at`, or one forward and one backward:
    :func:`gsae.data.harvest.loss_gradients_at`) and keeps them all, so the next hook's request is a hit. Each tensor
    equals the one-hook harvest there (tested exactly, on the fused and the TransformerLens forwards). A gradient miss
    takes the gradient at every planned hook: the backward runs on to the shallowest of them even if only deeper hooks
    ask (at most one backward's extra layers; every hook of a g-SAE sweep over layers asks, as does
    ``decoder_geometry``).
    """

    def __init__(self, max_bytes: int = HARVEST_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._store: dict[tuple, tuple[Tensor, Tensor | None]] = {}
        self._plans: dict[int, list[str]] = {}  # id(lm) -> hooks harvested together

    def plan(self, lm: LanguageModel, hooks: list[str]) -> None:
        """Harvest ``hooks`` of ``lm`` together from now on (see the class docstring); added to any earlier plan.
        Only residual-stream hooks (:meth:`~gsae.lm.LanguageModel.hook_depth`) are planned; while fewer than two are,
        every hook is harvested alone."""
        planned = [*self._plans.get(id(lm), []), *hooks]
        self._plans[id(lm)] = [h for h in dict.fromkeys(planned) if lm.hook_depth(h) is not None]

    @staticmethod
    def key(lm: LanguageModel, hook: str, tokens: Tensor, normaliser: float | None) -> tuple:
        tok = tokens.detach().cpu()
        return id(lm), hook, tuple(tok.shape), tok.numpy().tobytes(), normaliser

    def get(self, lm: LanguageModel, hook: str, tokens: Tensor, normaliser: float | None, compute) -> tuple:
        key = self.key(lm, hook, tokens, normaliser)
        hit = self._store.get(key)
        if hit is not None:
            self.hits += 1
            return hit
        self.misses += 1
        hooks = self._plans.get(id(lm), [])
        if len(hooks) > 1 and hook in hooks and self.bytes + self._size(lm, hooks, tokens, normaliser) <= self.max_bytes:
            for h, value in self._harvest_planned(lm, hooks, tokens, normaliser).items():
                self._keep(key[:1] + (h,) + key[2:], value)
            return self._store[key]
        value = compute()
        self._keep(key, value)
        return value

    def _keep(self, key: tuple, value: tuple) -> None:
        size = sum(t.numel() * t.element_size() for t in value if t is not None)
        if key not in self._store and self.bytes + size <= self.max_bytes:
            self._store[key] = value
            self.bytes += size

    @staticmethod
    def _size(lm: LanguageModel, hooks: list[str], tokens: Tensor, normaliser: float | None) -> int:
        """Bytes of one batch harvested at every planned hook (activations, and gradients if ``normaliser``)."""
        per = tokens.numel() * lm.W_U.element_size() * (1 if normaliser is None else 2)
        return per * sum(lm.d_in(h) for h in hooks)

    @staticmethod
    def _harvest_planned(lm: LanguageModel, hooks: list[str], tokens: Tensor, normaliser: float | None) -> dict:
        """``{hook: (x, ∇ₓL or None)}`` of one batch at every planned hook, from one LM pass."""
        if normaliser is None:
            return {h: (x, None) for h, x in lm.activations_at(tokens, hooks).items()}
        acts, grads = loss_gradients_at(lm, tokens, hooks, hooks, normaliser)
        return {h: (acts[h], grads[h]) for h in hooks}


_ACTIVE: list[SharedHarvests] = []


@contextmanager
def shared_harvests(max_bytes: int = HARVEST_CACHE_BYTES) -> Iterator[SharedHarvests]:
    """Share the activations (and ``∇ₓL``) of identical token batches between the benchmarks and SAEs evaluated
    inside the block (see :class:`SharedHarvests`); nested blocks use the outermost cache."""
    if _ACTIVE:
        yield _ACTIVE[0]
        return
    cache = SharedHarvests(max_bytes)
    _ACTIVE.append(cache)
    try:
        yield cache
    finally:
        _ACTIVE.remove(cache)


def harvest(lm: LanguageModel, hook: str, tokens: Tensor, normaliser: float | None = None) -> tuple[Tensor, Tensor | None]:
    """``(x, ∇ₓL)`` at ``hook`` for ``tokens (B, T)`` (``∇ₓL`` of ``Σ CE / normaliser``, see
    :func:`gsae.data.harvest.loss_gradients`, only when ``normaliser`` is not None; else ``(x, None)``), shared
    within :func:`shared_harvests`."""

    def compute() -> tuple[Tensor, Tensor | None]:
        if normaliser is None:
            return lm.activations(tokens, hook), None
        x, g, _ = loss_gradients(lm, tokens, hook, normaliser)
        return x, g

    return _ACTIVE[0].get(lm, hook, tokens, normaliser, compute) if _ACTIVE else compute()


_UNSCALED: weakref.WeakSet = weakref.WeakSet()  # g-SAEs already warned about (once each)


def grad_normaliser(sae: SparseAutoencoder) -> float:
    """The CE normaliser a g-SAE's ``∇ₓL`` is taken with (its ``grad_normaliser``, set by training). 0 (a g-SAE not
    trained by gsae) means each evaluation batch's own prediction count, so results then depend on the evaluation's
    batch size: said once per SAE."""
    n = float(getattr(sae, "grad_normaliser", 0))
    if n == 0 and sae not in _UNSCALED:
        _UNSCALED.add(sae)
        log.warning(
            "this g-SAE has no grad_normaliser (not trained by gsae): its ∇ₓL is each evaluation batch's mean CE "
            "gradient, so its selection, and the results, depend on the batch size; set sae.grad_normaliser to the "
            "number of predictions its training loss was averaged over"
        )
    return n


@torch.no_grad()
def sae_on_tokens(sae: SparseAutoencoder, lm: LanguageModel, hook: str, tokens: Tensor) -> SAEOnTokens:
    """Activations at ``hook`` for ``tokens (B, T)`` and the SAE's output on them."""
    x, g = harvest(lm, hook, tokens, grad_normaliser(sae) if needs_grad(sae) else None)
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
