"""The shared SAE base: parameters, decoding, decoder constraints, and the output contract.

Vocabulary (STYLE §6): ``W_enc (d_in, d_sae)``, ``b_enc (d_sae,)``, ``W_dec (d_sae, d_in)`` (one row per
latent direction), ``b_dec (d_in,)``. No Lightning import here: SAEs are plain ``nn.Module``s.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


class SAEOutput(NamedTuple):
    """What an SAE forward returns.

    Attributes:
        x_hat: ``(N, d_in)`` reconstruction.
        top_acts: ``(N, k)`` values of the active latents (TopK family) — for dense SAEs, ``None``.
        top_idx: ``(N, k)`` indices of the active latents — for dense SAEs, ``None``.
        latents: ``(N, d_sae)`` dense latent activations; materialised lazily by :meth:`SparseAutoencoder.densify`
            for TopK SAEs (``None`` in the training path), always set for dense SAEs.
        pre_acts: ``(N, d_sae)`` encoder pre-activations (detached; used by AuxK and diagnostics); dense SAEs
            (:class:`~gsae.sae.relu.ReLUSAE`, the SAELens adapter) give their latents here, as nothing reads a dense
            SAE's pre-activations and keeping them would cost a second ``(N, d_sae)`` tensor.
        aux_loss: AuxK dead-latent loss (0 when disabled or no latent is dead).
        sparsity_loss: L1 penalty for ReLU SAEs (0 for TopK).
    """

    x_hat: Tensor
    top_acts: Tensor | None
    top_idx: Tensor | None
    latents: Tensor | None
    pre_acts: Tensor
    aux_loss: Tensor
    sparsity_loss: Tensor


class SparseAutoencoder(nn.Module):
    """Base class: parameters, initialisation and decoder constraints shared by every SAE.

    Initialisation (Gao et al. 2024 §A.1; smol-sae ``base.py``): decoder rows random unit vectors,
    encoder = decoder transpose, ``b_enc = 0``; ``b_dec`` is set from the first training batch by
    :meth:`init_b_dec` (the training system's ``b_dec_init``: Gao et al.'s geometric median by default; smol-sae's
    zeros in the g-SAE paper's configs).
    """

    #: Whether the decoder rows are kept at unit norm by the training system (post-step renorm; TopK SAEs: an option).
    unit_norm_decoder: bool = True
    #: Whether the encoder reads ``x − b_dec`` (TopK SAEs, Gao et al.) rather than ``x`` (ReLU SAEs, Braun et al.)
    subtracts_b_dec: bool = True
    #: rows per block of the decoder constraints (a block of ``W_dec`` and its gradient stays in cache)
    ROW_BLOCK = 512

    def __init__(self, d_in: int, d_sae: int, seed: int | None = 0) -> None:
        super().__init__()
        if d_in <= 0:
            raise ValueError(f"--model.sae.d_in must be > 0 (got {d_in})")
        if d_sae <= 0:
            raise ValueError(f"--model.sae.d_sae must be > 0 (got {d_sae})")
        self.d_in = d_in
        self.d_sae = d_sae
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        w_dec = torch.randn(d_sae, d_in, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    # ------------------------------------------------------------------ description
    def config(self) -> dict:
        """Constructor arguments that rebuild this SAE (stored in checkpoints)."""
        raise NotImplementedError

    @property
    def architecture(self) -> str:
        raise NotImplementedError

    # ------------------------------------------------------------------ decoding
    def decoder_weight(self) -> Tensor:
        """The dictionary ``(d_sae, d_in)`` the forward uses (rows = latent directions)."""
        return self.W_dec

    def decode_sparse(self, top_acts: Tensor, top_idx: Tensor) -> Tensor:
        """``Σ_j top_acts[n, j] · W_dec[top_idx[n, j]] + b_dec`` by gathering k rows (no dense d_sae matmul);
        the backward is sparse too (:class:`SparseDecode`)."""
        return SparseDecode.apply(top_acts, self.W_dec, self.b_dec, top_idx, SparsePattern(self.d_sae))

    def decode(self, latents: Tensor) -> Tensor:
        """Dense decode ``latents (N, d_sae) @ W_dec + b_dec``."""
        return latents @ self.W_dec + self.b_dec

    def densify(self, out: SAEOutput) -> Tensor:
        """``(N, d_sae)`` dense latents of an output (scatters the top-k for TopK SAEs)."""
        if out.latents is not None:
            return out.latents
        dense = out.top_acts.new_zeros(out.top_acts.shape[0], self.d_sae)
        return dense.scatter_(-1, out.top_idx, out.top_acts)

    def encode(self, x: Tensor, grad: Tensor | None = None) -> Tensor:
        """Dense latents ``(N, d_sae)`` of ``x`` (``grad`` is used by gradient-aware SAEs only)."""
        return self.densify(self(x, grad=grad))

    def forward(
        self, x: Tensor, grad: Tensor | None = None, dead_mask: Tensor | None = None, aux_norm: Tensor | float | None = None
    ) -> SAEOutput:
        raise NotImplementedError

    @property
    def has_sparsity_loss(self) -> bool:
        """Whether :meth:`forward` returns a sparsity penalty to train on (``SAEOutput.sparsity_loss``; ReLU: its L1).
        True unless a subclass says otherwise, so an SAE's own penalty is never dropped; TopK SAEs are sparse by
        construction (theirs is always 0: the systems skip adding it)."""
        return True

    @property
    def uses_dead_mask(self) -> bool:
        """Whether :meth:`forward` reads ``dead_mask`` (an auxiliary loss on dead latents). A training system builds the
        mask (and, on a GPU, sends the dead count to the host) only for SAEs that do: True unless a subclass says
        otherwise (TopK: with AuxK; ReLU: never)."""
        return True

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_b_dec(self, x: Tensor, method: str = "geometric_median") -> None:
        """Set ``b_dec`` from a batch ``x (N, d_in)``: its geometric median (Weiszfeld, as SAELens) or mean.

        The geometric median is robust to the few huge-norm activations of GPT-2's residual stream.
        """
        x = x.float()
        if method == "mean":
            self.b_dec.copy_(x.mean(0))
        elif method == "geometric_median":
            self.b_dec.copy_(geometric_median(x))
        elif method != "zeros":
            raise ValueError(f"--model.b_dec_init must be geometric_median, mean or zeros (got {method!r})")

    # ------------------------------------------------------------------ decoder constraints
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit norm (called after each optimizer step)."""
        for w in self.W_dec.split(self._row_block()):
            w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Remove the component of ``W_dec.grad`` parallel to each row (Gao et al. 2024 App. A.4; sparsify).

        With unit-norm rows this makes the update tangent to the sphere, so the post-step renorm
        only corrects second-order drift instead of undoing part of every step.
        """
        if self.W_dec.grad is None:
            return
        # in blocks of rows that stay in cache between the dot products and the update: one pass over the
        # (d_sae, d_in) gradient and decoder instead of two (a batched matmul of 1x1 products: 2x slower)
        block = self._row_block()
        for grad, w in zip(self.W_dec.grad.split(block), self.W_dec.split(block)):
            grad.addcmul_(torch.linalg.vecdot(grad, w).unsqueeze(1), w, value=-1)

    def _row_block(self) -> int:
        """Rows per block of the decoder constraints: :attr:`ROW_BLOCK` on the CPU (cache-sized); the whole matrix
        on a GPU, where each block is a few kernel launches and the matrix passes at memory bandwidth anyway."""
        return self.ROW_BLOCK if self.W_dec.device.type == "cpu" else max(self.W_dec.shape[0], 1)


#: Under CUDA autocast (``--trainer.precision bf16-mixed``), compute ``∂W_enc`` and ``∂W_dec`` as dense matmuls in the
#: autocast dtype instead of the sparse ``embedding_bag`` products (:meth:`SparsePattern.transposed_mm`). A GPU's
#: tensor cores do the dense ``(d_sae × N) · (N × d_in)`` product (d_sae/k times the FLOPs) faster than the gather
#: kernels run the sparse one; bf16 operands with float32 accumulation are autocast's own precision for a matmul
#: (as SAELens' dense TopK under autocast). Off for float32 training and on the CPU, where the sparse path wins.
DENSE_GRADS_UNDER_AUTOCAST = True


def autocast_dense_dtype(t: Tensor) -> torch.dtype | None:
    """The dtype :class:`SparsePattern` computes its products in for a forward on ``t``'s device now: the autocast
    dtype on a CUDA device under autocast (and :data:`DENSE_GRADS_UNDER_AUTOCAST`), else ``None`` (sparse)."""
    if not DENSE_GRADS_UNDER_AUTOCAST or t.device.type != "cuda" or not torch.is_autocast_enabled("cuda"):
        return None
    return torch.get_autocast_dtype("cuda")


class SparsePattern:
    """The latent-major order of a ``(N, k)`` top-k index matrix, computed once on first use and shared by the
    sparse backwards of one forward (the decoder's ``∂W_dec`` and the encoder's ``∂W_enc`` have the same
    sparsity pattern).

    ``Gᵀ @ D`` for the sparse ``G (N, d_sae)`` holding ``values (N, k)`` at ``top_idx`` is then one
    ``embedding_bag`` with a bag per latent (the tokens it was selected on, in token order): no COO tensor, no
    ``coalesce`` and no ``(N·k, d)`` intermediate. With ``dense_dtype`` set (a forward under CUDA autocast:
    :func:`autocast_dense_dtype`), ``G`` is built densely in that dtype and the product is one tensor-core matmul.
    """

    def __init__(self, d_sae: int, top_idx: Tensor | None = None, dense_dtype: torch.dtype | None = None) -> None:
        self.d_sae = d_sae
        self.top_idx = top_idx
        self.dense_dtype = dense_dtype
        self._order: tuple[Tensor, Tensor, Tensor] | None = None

    def order(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(perm, tokens, offsets)``: ``top_idx.flatten()[perm]`` is sorted (stable), ``tokens[i]`` is the token of
        entry ``perm[i]``, and latent ``j``'s entries are ``offsets[j]:offsets[j + 1]``."""
        if self._order is None:
            flat = self.top_idx.reshape(-1)
            if flat.device.type == "cpu" and self.d_sae <= 2**16:
                # numpy's single-threaded radix sort of 16-bit keys: ~1 ms for 130k keys, where torch's parallel CPU
                # sort takes 2 ms on idle cores and 100+ ms on cores shared with other jobs (a barrier per pass)
                keys = flat.numpy().astype(np.uint16)
                perm = np.argsort(keys, kind="stable")
                counts = np.bincount(keys, minlength=self.d_sae)
                order = perm, perm // self.top_idx.shape[1], np.cumsum(counts) - counts
                self._order = tuple(torch.from_numpy(a.astype(np.int64, copy=False)) for a in order)
            else:
                keys = flat.int() if self.d_sae < 2**31 else flat
                keys, perm = keys.sort(stable=True)
                # each latent's first entry (no bincount: no device sync on GPUs)
                offsets = torch.searchsorted(keys, torch.arange(self.d_sae, dtype=keys.dtype, device=keys.device))
                self._order = (perm, perm.div(self.top_idx.shape[1], rounding_mode="floor"), offsets)
        return self._order

    def transposed_mm(self, values: Tensor, dense: Tensor) -> Tensor:
        """``(d_sae, d) = Gᵀ @ dense`` with ``G (N, d_sae)`` sparse, ``values (N, k)`` at ``top_idx``; ``dense (N, d)``."""
        if self.dense_dtype is not None:  # scatter then matmul (float32 accumulation), returned in dense's dtype
            G = values.new_zeros(values.shape[0], self.d_sae, dtype=self.dense_dtype)
            G.scatter_(1, self.top_idx, values.to(self.dense_dtype))
            return (G.T @ dense.to(self.dense_dtype)).to(dense.dtype)
        perm, tokens, offsets = self.order()
        weights = values.reshape(-1)[perm].to(dense.dtype)
        return F.embedding_bag(tokens, dense, offsets, per_sample_weights=weights, mode="sum")


#: entries (``n·k``, int64) :func:`_row_bags` keeps over all its shapes (128 MB); past it, it starts again
ROW_BAGS_BUDGET = 1 << 24
_ROW_BAGS: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}


def _row_bags(n: int, k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(offsets, bag of each entry)`` of ``n`` bags of ``k`` entries (row ``i`` of a ``(n, k)`` top-k): views of
    one pair built per ``k`` for the most rows seen (``arange(0, n·k, k)`` and ``arange(n·k) // k`` are prefixes of
    the longer ones), so a step reuses them instead of six ops (a GPU launches each; a sweep's members are
    host-bound there). A sweep holds a pair per distinct ``k`` (and AuxK's ``min(k_aux, dead)``), within
    :data:`ROW_BAGS_BUDGET` entries."""
    key = (k, torch.device(device))
    have = _ROW_BAGS.get(key)
    if have is None or have[0].shape[0] < n:
        if sum(b.numel() for _, b in _ROW_BAGS.values()) + n * k > ROW_BAGS_BUDGET:
            _ROW_BAGS.clear()
        _ROW_BAGS[key] = have = (
            torch.arange(0, n * k, k, device=device),
            torch.arange(n * k, device=device).div_(k, rounding_mode="floor"),
        )
    return have[0][:n], have[1][: n * k]


class SparseDecode(torch.autograd.Function):
    """``(top_acts, W_dec, b_dec, top_idx, pattern) -> Σ_j top_acts[n, j] · W_dec[top_idx[n, j]] + b_dec``
    (``b_dec=None``: no bias).

    Backward (``g = ∂L/∂x̂``): ``∂top_acts[n, j] = g[n] · W_dec[top_idx[n, j]]``, ``∂W_dec = Gᵀ g`` with ``G`` the
    sparse latents (:meth:`SparsePattern.transposed_mm`), ``∂b_dec = Σ_n g[n]``. Equal to ``embedding_bag``'s
    autograd (``tests/sae/test_topk.py``) without its index sort and dense scatter.
    """

    @staticmethod
    def forward(
        ctx, top_acts: Tensor, W_dec: Tensor, b_dec: Tensor | None, top_idx: Tensor, pattern: SparsePattern
    ) -> Tensor:
        acts = top_acts.to(W_dec.dtype)
        # embedding_bag's 2-d form builds the row offsets (an arange) at every call: the cached ones instead
        offsets, bags = _row_bags(*top_idx.shape, top_idx.device)
        x_hat = F.embedding_bag(top_idx.reshape(-1), W_dec, offsets, per_sample_weights=acts.reshape(-1), mode="sum")
        if b_dec is not None:
            x_hat += b_dec
        if pattern.top_idx is None:
            pattern.top_idx = top_idx
        ctx.save_for_backward(acts, W_dec, top_idx)
        ctx.pattern = pattern
        ctx.row_bags = offsets, bags  # the backward's too: one look-up per step
        return x_hat

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        acts, W_dec, top_idx = ctx.saved_tensors
        grad = grad.to(W_dec.dtype).contiguous()
        grad_acts = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            n, k = top_idx.shape
            offsets, bags = ctx.row_bags
            grad_acts = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad, W_dec, top_idx.reshape(-1), offsets, bags, 0
            ).view(n, k)
        if ctx.needs_input_grad[1]:
            grad_W = ctx.pattern.transposed_mm(acts, grad)
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_acts, grad_W, grad_b, None, None


def sse_loss(x_hat: Tensor, x: Tensor) -> Tensor:
    """``Σ ‖x − x̂‖²`` over all rows: ``F.mse_loss(..., reduction="sum")``, one pass forward and one backward op, where
    ``(x − x̂).pow(2).sum()`` records four (a GPU launches each: the sweep's members are host-bound there). Taken in
    the promoted dtype of the two, as the subtraction did (a bf16 ``x̂`` under autocast never rounds a float32 ``x``)."""
    if x_hat.dtype != x.dtype:
        dtype = torch.promote_types(x_hat.dtype, x.dtype)
        x_hat, x = x_hat.to(dtype), x.to(dtype)
    return F.mse_loss(x_hat, x, reduction="sum")


def geometric_median(x: Tensor, max_iter: int = 100, tol: float = 1e-5) -> Tensor:
    """Geometric median of the rows of ``x (N, d)`` by Weiszfeld iterations, starting from the mean."""
    y = x.mean(0)
    for _ in range(max_iter):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-8)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * y.norm().clamp_min(1e-8):
            return y_new
        y = y_new
    return y
