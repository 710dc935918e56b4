"""g-SAE: TopK whose *selection* is weighted by the loss gradient (Olmo et al. 2024, arXiv 2411.10397 §3).

``s = z ∘ (1 + β·|W_dec g|)`` with ``g = ∇ₓL(x)`` the gradient of the LM's next-token cross-entropy at
the SAE's input activation; ``K = TopK(s)``; the kept values are the *plain* ``z_K`` (SPEC §1.1). ``g``
is a detached input: nothing back-propagates through the selection, and the loss stays
reconstruction (+ AuxK). ``z_i·(W_dec g)_i`` is the attribution-patching estimate of the loss change
from switching latent i off, so latents that matter to the output are preferred.

Choices the paper leaves open (SPEC §1.2 [AMBIG]), with our defaults:

- no ReLU after TopK (smol-sae, which the authors modified), as in :class:`TopKSAE`;
- ``W_dec g`` uses the current decoder rows, kept at unit norm (``unit_norm_decoder``, default True; smol-sae leaves
  them unconstrained);
- the scale of ``g`` is set by the CE reduction (``mean`` over one device's LM batch by default); the SAE
  stores the normaliser it was trained with (``grad_normaliser``, see ``gsae/data/harvest.py``);
  the training system logs ``median(β·|W_dec g|)`` over the selected latents so β can be checked.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gsae.sae.base import SAEOutput
from gsae.sae.topk import TopKSAE


def half_safe_grad(grad: Tensor, weight: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(g', r)``: ``grad`` as the product ``g @ W_decᵀ`` should take it, and ``r (..., 1)`` float32 with
    ``|W_dec g| = r·|W_dec g'|`` (``None``: ``g' = g``, nothing to undo).

    Where the product runs in float16 (``16-mixed`` autocast, or a float16 decoder), ``|W_dec g|`` of a mean-reduced
    CE gradient is ~1e-6 to 1e-9 at large batches: float16 subnormals with a few bits, or 0 (with β sized to it, a
    g-SAE's selection kept 80% of float32's latents at 7e-8 and 26% at 7e-9; bfloat16 99%). There each row of ``g`` is
    scaled by the power of two that puts its largest entry in [0.5, 1) (exact: no rounding; then cast to a float16
    decoder's dtype, a normal float16), and ``r`` undoes it after the product. Elsewhere (float32; bfloat16, which has
    float32's exponent range) ``(g in weight's dtype, None)``, so those paths are unchanged to the bit."""
    dev = grad.device.type
    autocast = torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)  # (not on 'meta')
    half = (torch.get_autocast_dtype(dev) if autocast else weight.dtype) == torch.float16
    if not half:
        return grad.to(weight.dtype), None
    g = grad.float()
    exponent = torch.frexp(g.abs().amax(-1, keepdim=True)).exponent  # 0 for an all-zero row: scale 1
    return torch.ldexp(g, -exponent).to(weight.dtype), torch.ldexp(torch.ones_like(g[..., :1]), exponent)


class GradTopKSAE(TopKSAE):
    """g-SAE: TopK selection by ``z ∘ (1 + β|W_dec ∇ₓL|)``; with ``grad=None`` it is plain TopK."""

    def __init__(
        self,
        d_in: int,
        d_sae: int = 15360,
        k: int = 32,
        beta: float = 1e5,
        relu_after_topk: bool = False,
        k_aux: int | None = None,
        aux_coef: float = 1 / 32,
        sparse_backward: bool = True,
        seed: int = 0,
        unit_norm_decoder: bool = True,
    ) -> None:
        """Build a g-SAE.

        Args:
            d_in: activation width at the hook (linked from the language model; not set in configs).
            d_sae: number of latents.
            k: number of active latents per token (must be <= d_sae).
            beta: weight β of the gradient term in the selection score (paper: 1e5, with the mean-reduced CE).
            relu_after_topk: apply ReLU to the kept values (default False, SPEC §1.1).
            k_aux: AuxK latents (default ``d_in // 2``; 0 disables AuxK).
            aux_coef: AuxK coefficient α.
            sparse_backward: sparse encoder backward (k columns per token).
            seed: seed of the decoder initialisation.
            unit_norm_decoder: keep the decoder rows at unit norm (default; False: unconstrained, as smol-sae).
        """
        super().__init__(d_in, d_sae, k, relu_after_topk, k_aux, aux_coef, sparse_backward, seed, unit_norm_decoder)
        if beta < 0:
            raise ValueError(f"--model.sae.beta must be >= 0 (got {beta})")
        self.beta = beta
        # the number of predictions the CE mean behind ``g`` was taken over in training (0 = not yet
        # set: use the batch at hand); saved with the weights so evaluation uses the training scale
        self.register_buffer("grad_normaliser", torch.tensor(0.0))

    @property
    def architecture(self) -> str:
        return "gsae"

    def config(self) -> dict:
        return {**super().config(), "beta": self.beta}

    def attribution(self, grad: Tensor) -> Tensor:
        """``β·|W_dec g|`` ``(N, d_sae)``: the gradient term of the selection score (detached)."""
        with torch.no_grad():  # in place on the fresh product: one (N, d_sae) allocation, not three
            g, r = half_safe_grad(grad, self.W_dec)
            a = (g @ self.W_dec.T).abs_()
            return a.mul_(self.beta if r is None else r * self.beta)

    def attribution_at(self, grad: Tensor, idx: Tensor) -> Tensor:
        """``β·|W_dec g|`` at the latents ``idx (N, k)`` only (detached): ``attribution(grad).gather(-1, idx)`` with
        ``N·k`` dot products instead of the ``(N, d_sae)`` matmul."""
        with torch.no_grad():
            rows = self.W_dec[idx]  # (N, k, d_in)
            g, r = half_safe_grad(grad, rows)
            a = torch.bmm(rows, g.unsqueeze(-1)).squeeze(-1).abs_()
            return a.mul_(self.beta if r is None else r * self.beta)

    def selection_scores(self, pre: Tensor, grad: Tensor | None) -> Tensor:
        if grad is None or self.beta == 0:
            return pre
        with torch.no_grad():  # pre + β·pre·|W_dec g| = pre · (1 + β|W_dec g|): two passes over (N, d_sae), not four
            g, r = half_safe_grad(grad, self.W_dec)
            a = (g @ self.W_dec.T).abs_()
            if r is None:
                return torch.addcmul(pre, pre, a, value=self.beta, out=a)
            return torch.addcmul(pre, pre, a.mul_(r * self.beta), out=a)  # β|W_dec g| ~ 1: a normal float16

    def forward(
        self, x: Tensor, grad: Tensor | None = None, dead_mask: Tensor | None = None, aux_norm: Tensor | float | None = None
    ) -> SAEOutput:
        """As :meth:`TopKSAE.forward`; ``grad (N, d_in)`` is ``∇ₓL`` for each row of ``x``."""
        return super().forward(x, grad=grad, dead_mask=dead_mask, aux_norm=aux_norm)
