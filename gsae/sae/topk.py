"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders") with AuxK.

``z = W_encᵀ(x − b_dec) + b_enc``; keep the k largest entries of a *selection score* (``z`` itself
for TopK; g-SAEs change only the score, see ``grad_topk.py``); ``x̂ = Σ_{i∈K} z_i W_dec[i] + b_dec``.

The encoder backward is sparse: only the k kept pre-activations per token receive gradient, so
``∂W_enc`` is a sparse (d_sae × N) · (N × d_in) product (N·k·d_in flops instead of N·d_sae·d_in),
the trick of OpenAI's TopK kernels. ``∂W_enc`` and ``∂W_dec`` have the same sparsity pattern: one stable sort
of the N·k latent indices (``SparsePattern``) turns both into one ``embedding_bag`` each, a bag per latent
(no COO tensors, no ``coalesce``, no ``(N·k, d_in)`` or ``(N, d_sae)`` intermediates).
``tests/sae/test_topk.py`` checks it against dense autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from gsae.sae.base import SAEOutput, SparseAutoencoder, SparseDecode, SparsePattern, autocast_dense_dtype

#: candidates per row :func:`topk_indices` aims for (``k × block``); measured best at 512 for k 3–256 (below)
TOPK_CANDIDATES = 512
#: devices :func:`topk_indices` takes the two-level selection on (elsewhere plain ``torch.topk``); on a GPU it reads
#: the ``(N, d_sae)`` scores once with a coalesced max and leaves ``torch.topk`` rows of ``k·block`` and ``d/block``
#: entries instead of ``d_sae`` (``benchmarks/sae_kernels.py`` times both)
BLOCKED_TOPK_DEVICES = {"cpu", "cuda"}


def topk_block(d: int, k: int) -> int:
    """The strided block size :func:`topk_indices` uses for rows of ``d`` scores (0: plain ``torch.topk``)."""
    block = 64
    while block > 8 and block * k > TOPK_CANDIDATES:
        block //= 2
    while block >= 4 and d % block:
        block //= 2
    return block if block >= 4 and d // block > 2 * k else 0


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """Indices ``(N, k)`` of the k largest entries of each row of ``scores (N, d)`` (unsorted), as
    ``scores.topk(k, dim=-1, sorted=False).indices`` up to the order of equal values.

    On CPU, a two-level selection that reads the ``(N, d)`` matrix once with vectorised maxima: split each row into
    ``b`` strided blocks ``{j, j + d/b, j + 2d/b, …}`` — a ``(N, b, d/b)`` view, so their maxima are one
    elementwise max over ``b`` contiguous rows —, keep the ``k`` blocks with the largest maxima, and take the top k
    of their ``k·b`` entries. Exact: if ``τ`` is the k-th largest block maximum, k entries are ``≥ τ``, so the k-th
    largest entry ``v_k ≥ τ``; any entry ``≥ v_k`` lies in a block whose maximum is ``≥ τ``, i.e. a kept block.
    (``torch.topk``'s per-row selection costs ~1.7 ns per entry on CPU; this ~0.5 at k = 32, d = 12288:
    k 3 / 32 / 64: 67 / 97 / 124 ms → 21 / 54 / 75 ms for 4096 rows, 2 cores.) ``tests/sae/test_topk.py``
    checks it against ``torch.topk`` on ties, infinities and NaNs (``tests/gpu`` on CUDA). Devices not in
    :data:`BLOCKED_TOPK_DEVICES` and shapes without a useful block size use ``torch.topk``.
    """
    n, d = scores.shape
    block = topk_block(d, k) if scores.device.type in BLOCKED_TOPK_DEVICES else 0
    if not block:
        return scores.topk(k, dim=-1, sorted=False).indices
    nb = d // block
    v = scores.contiguous().view(n, block, nb)
    top_blocks = v.amax(1).topk(k, dim=-1, sorted=False).indices  # (N, k)
    cand = v.gather(2, top_blocks.unsqueeze(1).expand(n, block, k)).view(n, block * k)
    sel = cand.topk(k, dim=-1, sorted=False).indices  # entry (i, j): row i of the block view, kept block j
    return sel.div(k, rounding_mode="floor").mul_(nb).add_(top_blocks.gather(1, sel.remainder(k)))


def true_indices(mask: Tensor, count: int, by_sort: bool | None = None) -> Tensor:
    """The indices of ``mask``'s True entries, ascending (``mask.nonzero().squeeze(-1)``), given their ``count``.

    ``by_sort`` (default: off the CPU): a stable sort puts them first, so a GPU need not report the count to the host
    (``nonzero`` waits for every queued kernel); on the CPU ``nonzero`` is cheaper and waits for nothing."""
    if by_sort is None:
        by_sort = mask.device.type != "cpu"
    if not by_sort:
        return mask.nonzero().squeeze(-1)
    return torch.sort(mask.logical_not().to(torch.uint8), stable=True).indices[:count]


class _TopKEncode(torch.autograd.Function):
    """``(x, W_enc, b_enc, b_dec, k, scores_fn, pattern) -> (top_acts, top_idx, pre)`` with a sparse backward.

    ``pre = (x − b_dec) @ W_enc + b_enc``; ``top_acts[n, j] = pre[n, top_idx[n, j]]`` where ``top_idx`` are the k
    largest entries of ``scores_fn(pre)`` (default: ``pre`` itself). ``scores`` never gets gradient.

    Backward (``g = ∂L/∂top_acts``, the sparse ``G (N, d_sae)`` holding ``g`` at ``top_idx``): ``∂W_enc = x_cᵀ G``
    (one ``embedding_bag`` per latent, :meth:`SparsePattern.transposed_mm`, returned as the transpose of a
    ``(d_sae, d_in)`` block: the layout ``W_enc`` is stored in), ``∂b_enc = Σ_n G[n]``, ``∂b_dec = −W_enc ∂b_enc``
    (``= −Σ_n ∂x_c[n]``, without the ``(N, d_in)`` input gradient), and ``∂x = G W_encᵀ`` only when ``x`` needs it.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, scores_fn, pattern: SparsePattern):
        x_c = x - b_dec
        pre = torch.addmm(b_enc, x_c, W_enc)  # (N, d_sae)
        scores = pre if scores_fn is None else scores_fn(pre)
        top_idx = topk_indices(scores, k)  # (N, k)
        del scores
        top_acts = pre.gather(-1, top_idx)
        pattern.top_idx = top_idx
        ctx.save_for_backward(x_c, W_enc, top_idx)
        ctx.pattern = pattern
        ctx.mark_non_differentiable(top_idx, pre)
        ctx.set_materialize_grads(False)  # else autograd fills an (N, d_sae) zero gradient for ``pre`` every step
        return top_acts, top_idx, pre

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_acts: Tensor, _grad_idx, _grad_pre):
        x_c, W_enc, top_idx = ctx.saved_tensors
        need_x, need_W, need_b, need_b_dec = ctx.needs_input_grad[:4]
        if grad_acts is None:  # the kept values did not reach the loss
            return None, None, None, None, None, None, None
        g = grad_acts.to(x_c.dtype)
        grad_x = grad_W = grad_b = grad_b_dec = None
        if need_b or need_b_dec:
            grad_b = x_c.new_zeros(W_enc.shape[1]).index_add_(0, top_idx.reshape(-1), g.reshape(-1))
        if need_W:
            grad_W = ctx.pattern.transposed_mm(g, x_c).T  # (d_in, d_sae)
        if need_b_dec:  # one kernel for −W_enc ∂b_enc (beta 0: the uninitialised input is ignored)
            grad_b_dec = torch.addmv(W_enc.new_empty(W_enc.shape[0]), W_enc, grad_b, beta=0, alpha=-1)
        if need_x:
            grad_x = F.embedding_bag(top_idx, W_enc.T, per_sample_weights=g, mode="sum")  # Σ_j g[n, j] W_enc[:, idx]
        return grad_x, grad_W, grad_b if need_b else None, grad_b_dec, None, None, None


class TopKSAE(SparseAutoencoder):
    """TopK sparse autoencoder with the AuxK dead-latent loss.

    Defaults: no ReLU after TopK (SPEC §1.1 [AMBIG]: smol-sae, the g-SAE authors' base, keeps raw
    pre-activations; OpenAI applies ReLU — set ``relu_after_topk: true`` for that).
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int = 15360,
        k: int = 32,
        relu_after_topk: bool = False,
        k_aux: int | None = None,
        aux_coef: float = 1 / 32,
        sparse_backward: bool = True,
        seed: int = 0,
        unit_norm_decoder: bool = True,
    ) -> None:
        """Build a TopK SAE.

        Args:
            d_in: activation width at the hook (linked from the language model; not set in configs).
            d_sae: number of latents.
            k: number of active latents per token (must be <= d_sae).
            relu_after_topk: apply ReLU to the kept values (OpenAI); default False keeps raw
                pre-activations (smol-sae, SPEC §1.1 recommendation).
            k_aux: latents the AuxK loss reconstructs the residual with (Gao et al. App. B.1);
                default ``d_in // 2``; 0 disables AuxK.
            aux_coef: AuxK coefficient α (Gao et al.: 1/32).
            sparse_backward: sparse encoder backward (k columns per token); False uses dense autograd.
            seed: seed of the decoder initialisation.
            unit_norm_decoder: keep the decoder rows at unit norm while training (Gao et al.: the gradient's component
                along each row removed, the rows renormalised after every step; default). False trains an
                unconstrained decoder with plain Adam from unit-norm rows, as smol-sae, the g-SAE authors' code
                (SPEC §1.2 [AMBIG]: a g-SAE's ``|W_dec ∇ₓL|`` then also weighs each latent by its row's norm).
        """
        super().__init__(d_in, d_sae, seed=seed)
        self.unit_norm_decoder = bool(unit_norm_decoder)
        if k <= 0:
            raise ValueError(f"--model.sae.k must be > 0 (got {k})")
        if k > d_sae:
            raise ValueError(f"--model.sae.k must be <= d_sae (got {k} > {d_sae})")
        self.k = k
        self.relu_after_topk = relu_after_topk
        self.k_aux = d_in // 2 if k_aux is None else k_aux
        if self.k_aux < 0:
            raise ValueError(f"--model.sae.k_aux must be >= 0 (got {k_aux})")
        if aux_coef < 0:
            raise ValueError(f"--model.sae.aux_coef must be >= 0 (got {aux_coef}): AuxK's loss would push dead latents "
                             "away from the residual")
        self.aux_coef = aux_coef
        self.sparse_backward = sparse_backward
        self.seed = seed

    @property
    def architecture(self) -> str:
        return "topk"

    @property
    def uses_dead_mask(self) -> bool:
        return self.k_aux > 0  # AuxK

    @property
    def has_sparsity_loss(self) -> bool:
        return False  # sparse by the top-k

    def config(self) -> dict:
        return dict(
            d_in=self.d_in,
            d_sae=self.d_sae,
            k=self.k,
            relu_after_topk=self.relu_after_topk,
            k_aux=self.k_aux,
            aux_coef=self.aux_coef,
            sparse_backward=self.sparse_backward,
            seed=self.seed,
            unit_norm_decoder=self.unit_norm_decoder,
        )

    # ------------------------------------------------------------------ selection
    def selection_scores(self, pre: Tensor, grad: Tensor | None) -> Tensor:
        """Score the top-k is taken of: the pre-activations (g-SAEs override this)."""
        return pre

    def _encode_topk(
        self, x: Tensor, grad: Tensor | None, pattern: SparsePattern | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        pattern = SparsePattern(self.d_sae) if pattern is None else pattern
        if self.sparse_backward:
            scores_fn = None if grad is None and type(self).selection_scores is TopKSAE.selection_scores else (
                lambda pre: self.selection_scores(pre, grad)
            )
            top_acts, top_idx, pre = _TopKEncode.apply(
                x.to(self.W_enc.dtype), self.W_enc, self.b_enc, self.b_dec, self.k, scores_fn, pattern
            )
        else:
            x_c = x.to(self.W_enc.dtype) - self.b_dec
            pre = torch.addmm(self.b_enc, x_c, self.W_enc)
            with torch.no_grad():
                top_idx = self.selection_scores(pre.detach(), grad).topk(self.k, dim=-1, sorted=False).indices
            top_acts = pre.gather(-1, top_idx)
            pre = pre.detach()
        if self.relu_after_topk:
            top_acts = F.relu(top_acts)
        return top_acts, top_idx, pre

    def forward(
        self, x: Tensor, grad: Tensor | None = None, dead_mask: Tensor | None = None, aux_norm: Tensor | float | None = None
    ) -> SAEOutput:
        """Encode, select, decode; with ``dead_mask (d_sae,)`` also the AuxK loss.

        Args:
            x: ``(N, d_in)`` activations.
            grad: ``(N, d_in)`` ``dL/dx`` (used by g-SAEs; ignored here).
            dead_mask: bool ``(d_sae,)``, True for latents counted dead (AuxK uses only these).
            aux_norm: multiply the AuxK squared error by this instead of ``1/‖e − ē‖²`` of this batch
                (the training system passes a constant so the loss is exact under DDP).
        """
        if self.sparse_backward:  # one latent-major order serves the decoder's and the encoder's backward
            pattern = SparsePattern(self.d_sae, dense_dtype=autocast_dense_dtype(x))
            top_acts, top_idx, pre = self._encode_topk(x, grad, pattern)
            x_hat = SparseDecode.apply(top_acts, self.W_dec, self.b_dec, top_idx, pattern)
        else:  # dense autograd throughout (the reference the sparse backward is tested against)
            top_acts, top_idx, pre = self._encode_topk(x, grad)
            x_hat = F.embedding_bag(top_idx, self.W_dec, per_sample_weights=top_acts.to(self.W_dec.dtype), mode="sum")
            x_hat = x_hat + self.b_dec
        zero = x_hat.new_zeros(())  # the sparsity loss, and AuxK's when it has none (one fill, not two)
        aux = self.auxk_loss(x, x_hat, pre, dead_mask, aux_norm, zero=zero)
        return SAEOutput(x_hat, top_acts, top_idx, None, pre, aux, zero)

    def auxk_loss(
        self, x: Tensor, x_hat: Tensor, pre: Tensor, dead_mask: Tensor | None, aux_norm: Tensor | float | None = None,
        zero: Tensor | None = None,
    ) -> Tensor:
        """AuxK (Gao et al. 2024 App. B.1): reconstruct the residual ``e = x − x̂`` with the top ``k_aux``
        *dead* latents, ``Σ‖e − ê‖² / Σ‖e − ē‖²`` (normalised like sparsify), scaled by ``min(n_dead/k_aux, 1)``,
        times ``aux_coef``. ``x̂`` and ``e`` are detached: only the dead latents' parameters learn from it, and
        they learn from nothing else, so under Adam the normalisation (``aux_norm``) hardly matters.

        The number of dead latents sets the shapes here, so the host needs it: a mask from
        :meth:`gsae.metrics.DeadLatentTracker.auxk_mask` carries a way to it (``count_true()``, sent to the host by
        the previous step); any other mask is counted here, which on a GPU waits for every queued kernel.
        Without a loss (no AuxK, no dead latent) it returns ``zero`` if given (a 0-d tensor of the caller's), else a
        new 0.
        """
        if dead_mask is None or self.k_aux == 0:
            return x_hat.new_zeros(()) if zero is None else zero
        count = getattr(dead_mask, "count_true", None)
        n_dead = int(dead_mask.sum()) if count is None else int(count())
        if n_dead == 0:
            return x_hat.new_zeros(()) if zero is None else zero
        k_aux = min(self.k_aux, n_dead)
        dead_ids = true_indices(dead_mask, n_dead)  # ascending, as dead_mask.nonzero()
        x_c = x.to(self.W_enc.dtype) - self.b_dec.detach()
        # recompute pre-activations with grad only for the dead columns
        W = self.W_enc.index_select(1, dead_ids)  # (d_in, n_dead)
        pre_dead = x_c.detach() @ W + self.b_enc.index_select(0, dead_ids)
        acts, idx = pre_dead.topk(k_aux, dim=-1, sorted=False)
        if self.relu_after_topk:
            acts = F.relu(acts)
        if self.sparse_backward:  # N·k_aux rows: the sparse decoder backward matters most here
            pattern = SparsePattern(self.d_sae, dense_dtype=autocast_dense_dtype(x))
            e_hat = SparseDecode.apply(acts, self.W_dec, None, dead_ids[idx], pattern)
        else:
            e_hat = F.embedding_bag(dead_ids[idx], self.W_dec, per_sample_weights=acts, mode="sum")
        e = (x.to(x_hat.dtype) - x_hat).detach()
        norm = 1 / (e - e.mean(0)).pow(2).sum().clamp_min(1e-12) if aux_norm is None else aux_norm
        scale = min(n_dead / self.k_aux, 1.0)
        return self.aux_coef * scale * (e_hat - e).pow(2).sum() * norm
