"""Harvesting ``(x, ∇ₓL)`` for gradient-aware SAEs: one place that fixes the gradient's scale.

A g-SAE's selection score ``z ∘ (1 + β|W_dec g|)`` depends on the *scale* of ``g``, which depends on how
the LM loss is reduced (SPEC §1.2 [AMBIG]). The SAE carries that scale with it: ``g = ∇ₓ(Σ CE) / n``
with ``n = sae.grad_normaliser``, the number of predictions the CE mean was taken over when it was
trained (one device's LM batch: ``B·(T−1)`` for ``grad_reduction: mean``, or ``grad_mean_tokens``;
1 for ``sum``; never the number of devices). Training
and every benchmark compute ``g`` here, so a g-SAE encodes at evaluation time exactly as it did in training.

The cost is one LM forward and one backward from the loss to the hook: ``LanguageModel.activations_and_grads``
runs the fused GPT-2 forward (``gsae.lm_fused``) and takes the cross-entropy's gradient with respect to the
final hidden state in chunks of positions (``gsae.lm_chunked.ce_sum_and_grad``: no full-vocabulary logits).
"""

from __future__ import annotations

from torch import Tensor

from gsae.lm import ActsAndGrads, LanguageModel


def predictions(tokens: Tensor) -> int:
    """Number of next-token predictions in a ``(B, T)`` batch: ``B·(T−1)``."""
    return tokens.shape[0] * (tokens.shape[1] - 1)


def loss_gradients(lm: LanguageModel, tokens: Tensor, hook: str, normaliser: float | None = None) -> ActsAndGrads:
    """Activations and ``∇ₓ(Σ CE)/normaliser`` at ``hook``; ``normaliser`` None or 0 = this batch's prediction count (a mean)."""
    acts, grads, loss = lm.activations_and_grads(tokens, hook, "sum")
    n = _normaliser(tokens, normaliser)
    # divided in float32: a float16 LM's Σ CE gradient over n (8160 in the gpt2 configs) falls in float16's subnormals
    return ActsAndGrads(acts, grads.float() / n, loss / n)


def _normaliser(tokens: Tensor, normaliser: float | None) -> float:
    """The CE normaliser: ``normaliser``, or (None or 0) this batch's prediction count."""
    return float(normaliser) if normaliser else float(predictions(tokens))


def loss_gradients_at(
    lm: LanguageModel, tokens: Tensor, hooks: list[str], grad_hooks: list[str], normaliser: float | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """:func:`loss_gradients` at several hooks from one LM pass (a sweep whose members read different hooks):
    ``({hook: acts}, {grad hook: ∇ₓ(Σ CE)/normaliser})``, each equal to :func:`loss_gradients` at that hook."""
    acts, grads, _ = lm.activations_and_grads_at(tokens, hooks, grad_hooks)
    n = _normaliser(tokens, normaliser)
    return acts, {h: g.float() / n for h, g in grads.items()}  # in float32, as loss_gradients
