"""Full-vocabulary losses in chunks of positions: the LM cross-entropy's gradient, the e2e KL, and the
evaluation's CE and KL of many runs against one clean run.

Both take the final hidden state ``h`` (the unembedding's input, ``(..., D)``) rather than logits, and build
the logits of one chunk of positions at a time: no ``(B·T, d_vocab)`` float32 tensor (823 MB for GPT-2 at
32×128 tokens) exists beyond one chunk, in the forward or the backward. The maths is the textbook one:

- ``∂ Σ_t CE_t / ∂ logits_t = softmax(logits_t) − onehot(label_t)`` (:func:`ce_sum_and_grad`, no autograd graph
  over the vocabulary: the caller backpropagates the returned ``∂/∂h`` from ``h`` to the hook);
- ``KL_t(P_clean ‖ P_new) = Σ_v p_clean (log p_clean − log p_new)`` with
  ``∂ KL_t / ∂ logits_new = softmax(logits_new) − p_clean`` (:func:`kl_per_token`, an autograd function whose
  forward also takes the per-position gradient ``∂KL_t/∂h_t``, a ``D``-vector, so its backward is a product).

Logits are computed in the autocast dtype when autocast is on (bf16 on GPU), else in ``W_U``'s dtype, and
upcast to float32 for the softmax, as :func:`gsae.lm.next_token_loss` and :func:`gsae.metrics.kl_div_per_token`
(the unchunked definitions these are tested equal to) do with full logits.

Every function also takes a vocabulary padded with zero columns (:func:`pad_unembedding`, ``d_vocab`` the real
size): each chunk's logits are computed over the padded width and sliced to ``d_vocab`` before any use, so the
padding changes nothing but the matmul's speed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

#: float32 elements of one chunk of logits (32 Mi = 128 MB: 667 positions of GPT-2's vocabulary padded to 50,304).
#: On 2 AMD EPYC cores (32 MB of L3, which no chunk fits) 333-position chunks took the CE gradient of 4096 positions in
#: 3.8 s and the KL with its gradient in 6.1 s, 667-position ones in 3.5 s and 5.7 s (the vocabulary matmul is faster on
#: more rows; 1334 positions gained nothing more). The same size on a GPU (49 chunks per pass at 32768 positions):
#: a larger one there is untested
CHUNK_ELEMENTS = 1 << 25


#: the chunked losses' vocabulary matmuls run on an unembedding padded to a multiple of this many columns (zero
#: weights and bias, :func:`pad_unembedding`): GPT-2's 50,257 columns make every logits row start off a 64-byte line;
#: padded to 50,304 the ``(333, 768) @ (768, V)`` chunk product ran 1.36× faster (122 → 166 GFLOP/s, 2 AMD EPYC cores,
#: MKL; the gradient product ``p @ W_Uᵀ`` is unchanged), and GPU kernels get aligned rows (tensor-core loads)
VOCAB_MULTIPLE = 64


class Unembedding(NamedTuple):
    """An unembedding whose matrix may carry zero columns past the vocabulary (:func:`pad_unembedding`).

    Attributes:
        W_U: ``(D, V')`` with ``V' >= d_vocab``. b_U: ``(V',)``. d_vocab: the real vocabulary size ``V``.
    """

    W_U: Tensor
    b_U: Tensor
    d_vocab: int


def pad_unembedding(W_U: Tensor, b_U: Tensor, multiple: int = VOCAB_MULTIPLE) -> Unembedding:
    """``W_U (D, V)`` and ``b_U (V,)`` with zero columns appended up to a multiple of ``multiple`` (a detached copy;
    the tensors themselves when ``V`` is one already)."""
    D, V = W_U.shape
    padded = -(-V // multiple) * multiple
    if padded == V:
        return Unembedding(W_U.detach(), b_U.detach(), V)
    W = W_U.new_zeros(D, padded)
    W[:, :V] = W_U.detach()
    b = b_U.new_zeros(padded)
    b[:V] = b_U.detach()
    return Unembedding(W, b, V)


def chunk_rows(d_vocab: int, chunk_elements: int | None = None) -> int:
    """Positions per chunk for a vocabulary of ``d_vocab`` (default size: :data:`CHUNK_ELEMENTS`)."""
    return max(1, (CHUNK_ELEMENTS if chunk_elements is None else chunk_elements) // d_vocab)


def _vocab(W_U: Tensor, d_vocab: int | None) -> int:
    """The real vocabulary size: ``d_vocab``, or every column of ``W_U`` when it is not padded (``None``)."""
    return W_U.shape[1] if d_vocab is None else d_vocab


def compute_dtype(W_U: Tensor, device: torch.device) -> torch.dtype:
    """The dtype ``W_U``'s matmuls run in on ``device`` now: autocast's when it is on there, else ``W_U``'s own."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return W_U.dtype


def _product(h: Tensor, W_U: Tensor, b_U: Tensor) -> Tensor:
    """A chunk's vocabulary product ``h @ W_U + b_U`` ``(rows, V')``, in ``W_U``'s (already chosen) dtype, padded
    columns included (what the compiled chunk functions take)."""
    return torch.addmm(b_U, h.to(W_U.dtype), W_U)


def _logits(h: Tensor, W_U: Tensor, b_U: Tensor, d_vocab: int) -> Tensor:
    """float32 logits ``(rows, d_vocab)`` of a chunk: :func:`_product` sliced to the vocabulary (a view in float32)."""
    return _product(h, W_U, b_U)[:, :d_vocab].float()


# ---------------------------------------------------------------------------------------------- one chunk, fused
def ce_chunk(logits: Tensor, labels: Tensor, d_vocab: int, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """One chunk's CE sum and ``∂/∂logits``, written for ``torch.compile`` to fuse (:func:`compiled`).

    Args:
        logits: ``(rows, V')`` vocabulary product in its matmul dtype (``V' >= d_vocab``: padded columns ignored).
        labels: ``(rows,)`` next tokens, ``-1`` where a position predicts nothing.
        d_vocab: the real vocabulary size. out_dtype: dtype of the returned gradient.

    Returns:
        ``(Σ CE, softmax − onehot)``: a float32 scalar and ``(rows, d_vocab)`` in ``out_dtype`` (zero rows without a
        label). The softmax is taken in float32, as the eager loop of :func:`ce_sum_and_grad` does.
    """
    lg = logits[:, :d_vocab].float()
    valid = (labels >= 0)[:, None]
    safe = labels.clamp_min(0)[:, None]
    m = lg.amax(-1, keepdim=True)
    e = (lg - m).exp()
    s = e.sum(-1, keepdim=True)
    loss = torch.where(valid, m + s.log() - lg.gather(-1, safe), 0.0).sum()
    onehot = torch.arange(d_vocab, device=lg.device)[None, :] == safe
    return loss, torch.where(valid, e / s - onehot.float(), 0.0).to(out_dtype)


def kl_chunk(logits_clean: Tensor, logits_new: Tensor, d_vocab: int, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """One chunk's ``KL(P_clean ‖ P_new)`` per row and ``∂KL/∂logits_new``, written for ``torch.compile`` to fuse.

    Takes the two ``(rows, V')`` vocabulary products in their matmul dtype; returns the float32 KL ``(rows,)`` and
    ``softmax(new) − softmax(clean)`` ``(rows, d_vocab)`` in ``out_dtype``: the formulas of :class:`_ChunkedKL`'s
    eager loop (the logit gap taken before any exp).
    """
    l_c, l_n = logits_clean[:, :d_vocab].float(), logits_new[:, :d_vocab].float()
    m_c, m_n = l_c.amax(-1, keepdim=True), l_n.amax(-1, keepdim=True)
    e_c, e_n = (l_c - m_c).exp(), (l_n - m_n).exp()
    s_c, s_n = e_c.sum(-1, keepdim=True), e_n.sum(-1, keepdim=True)
    p_c = e_c / s_c
    kl = (p_c * (l_c - l_n)).sum(-1) + ((m_n - m_c) + (s_n / s_c).log()).squeeze(-1)
    return kl, (e_n / s_n - p_c).to(out_dtype)


_COMPILED: dict[str, Callable] = {}


def compiled(name: str) -> Callable:
    """:func:`ce_chunk` or :func:`kl_chunk` (``name`` ``"ce"`` / ``"kl"``) under ``torch.compile`` (compiled once per
    process on first use; shapes dynamic after the first ragged chunk). Eager, each chunk makes ~10 passes over
    ``(rows, d_vocab)`` float32 buffers, which on a GPU likely cost more than the chunk's two vocabulary matmuls
    (estimated from bandwidth and FLOPs; not yet measured there); compiled, the upcast, the reductions and the gradient
    are fused into a few reads of the product and one write of the gradient. On 2 CPU cores: CE as fast as eager, KL
    ~12% faster. Selected by ``--model.lm.compile true`` (:class:`gsae.lm.LanguageModel`)."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile({"ce": ce_chunk, "kl": kl_chunk}[name])
    return _COMPILED[name]


def ce_sum_and_grad(
    h: Tensor,
    W_U: Tensor,
    b_U: Tensor,
    tokens: Tensor,
    chunk_elements: int | None = None,
    d_vocab: int | None = None,
    compile: bool = False,
) -> tuple[Tensor, Tensor]:
    """``Σ`` next-token CE over the ``B·(T−1)`` predictions and its gradient with respect to ``h``.

    Args:
        h: ``(B, T, D)`` final hidden state (detached or not: no graph is built).
        W_U, b_U: unembedding ``(D, V')`` and bias, ``V' = d_vocab`` or padded (:func:`pad_unembedding`).
        tokens: ``(B, T)`` tokens; position ``t`` predicts ``tokens[:, t+1]``, the last position nothing.
        chunk_elements: logits elements per chunk (default :data:`CHUNK_ELEMENTS`).
        d_vocab: the real vocabulary size when ``W_U`` is padded (default: all its columns).
        compile: each chunk's softmax and gradient through ``torch.compile`` (:func:`compiled`; for GPUs).

    Returns:
        ``(loss_sum, dh)``: a float32 scalar and ``dh`` of ``h``'s shape and dtype (zero at the last position).
    """
    B, T, D = h.shape
    dtype = compute_dtype(W_U, h.device)
    with torch.autocast(h.device.type, enabled=False), torch.no_grad():
        W, b = W_U.to(dtype), b_U.to(dtype)
        V = _vocab(W, d_vocab)
        flat = h.detach().reshape(B * T, D)
        labels = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -1)], dim=1).reshape(-1)
        dh = torch.empty_like(flat)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        step = chunk_rows(W.shape[1], chunk_elements)
        fused = compiled("ce") if compile else None
        for i in range(0, B * T, step):
            lab = labels[i : i + step]
            if fused is not None:
                chunk_loss, p = fused(_product(flat[i : i + step], W, b), lab, V, dtype)
                loss += chunk_loss
                dh[i : i + step] = (p @ W[:, :V].T).to(dh.dtype)
                continue
            valid = (lab >= 0).float()[:, None]
            safe = lab.clamp_min(0)[:, None]
            logits = _logits(flat[i : i + step], W, b, V)
            target = logits.gather(-1, safe)
            # one exp per logit and one (rows, d_vocab) buffer, every pass in place: e = exp(l − max), lse = max + log Σe
            m = logits.amax(-1, keepdim=True)
            e = logits.sub_(m).exp_()
            s = e.sum(-1, keepdim=True)
            loss += ((m + s.log() - target) * valid).sum()
            p = e.mul_(valid / s)  # softmax; the rows without a label (last positions) zero
            p.scatter_add_(-1, safe, -valid)  # − onehot(label)
            dh[i : i + step] = (p.to(dtype) @ W[:, :V].T).to(dh.dtype)
    return loss, dh.reshape(B, T, D)


class _ChunkedKL(torch.autograd.Function):
    """KL per position; the forward also keeps ``∂KL_t/∂h_t`` ``(N, D)`` when ``h_new`` needs a gradient.

    ``KL_t`` depends on ``h_new[t]`` only, so the per-position Jacobian (a ``D``-vector) is all the backward
    needs for any upstream gradient: three vocabulary matmuls per chunk in all (clean logits, new logits, the
    gradient), none recomputed in the backward.
    """

    @staticmethod
    def forward(
        ctx, h_clean: Tensor, h_new: Tensor, W_U: Tensor, b_U: Tensor, dtype: torch.dtype, rows: int, V: int,
        compile: bool,
    ) -> Tensor:
        W, b = W_U.to(dtype), b_U.to(dtype)
        grad = torch.empty_like(h_new) if ctx.needs_input_grad[1] else None
        out = torch.empty(h_new.shape[0], dtype=torch.float32, device=h_new.device)
        diff = None
        fused = compiled("kl") if compile else None
        for i in range(0, h_new.shape[0], rows):
            if fused is not None:
                rows_c, rows_n = h_clean[i : i + rows], h_new[i : i + rows]
                out[i : i + rows], g = fused(_product(rows_c, W, b), _product(rows_n, W, b), V, dtype)
                if grad is not None:
                    grad[i : i + rows] = (g @ W[:, :V].T).to(grad.dtype)
                continue
            l_c, l_n = _logits(h_clean[i : i + rows], W, b, V), _logits(h_new[i : i + rows], W, b, V)
            # KL_t = Σ_v p_c (l_c − l_n) + lse_n − lse_c: the logit gap is taken before any exp or log (4–5× closer
            # to a float64 reference than Σ p_c (log p_c − log p_n) on nearby states), one exp per logit, three
            # (rows, d_vocab) buffers, every pass in place
            if diff is None or diff.shape != l_c.shape:
                diff = torch.empty_like(l_c)
            torch.sub(l_c, l_n, out=diff)
            m_c, m_n = l_c.amax(-1, keepdim=True), l_n.amax(-1, keepdim=True)
            s_c = l_c.sub_(m_c).exp_().sum(-1, keepdim=True)
            s_n = l_n.sub_(m_n).exp_().sum(-1, keepdim=True)
            p_c = l_c.div_(s_c)
            lse_gap = (m_n - m_c) + (s_n / s_c).log()
            out[i : i + rows] = (diff.mul_(p_c).sum(-1, keepdim=True) + lse_gap).squeeze(-1)
            if grad is not None:  # ∂KL_t/∂logits_new = softmax(logits_new) − p_clean
                grad[i : i + rows] = (l_n.div_(s_n).sub_(p_c).to(dtype) @ W[:, :V].T).to(grad.dtype)
        ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        (grad,) = ctx.saved_tensors
        return None, grad * g[:, None].to(grad.dtype), None, None, None, None, None, None


def kl_per_token(
    h_clean: Tensor,
    h_new: Tensor,
    W_U: Tensor,
    b_U: Tensor,
    chunk_elements: int | None = None,
    d_vocab: int | None = None,
    compile: bool = False,
) -> Tensor:
    """``KL(P_clean ‖ P_new)`` per position (float32, ``h``'s shape minus the last dim), differentiable in ``h_new``.

    ``P = softmax(h @ W_U + b_U)`` over the first ``d_vocab`` columns (default all; ``W_U`` may be padded:
    :func:`pad_unembedding`). The clean side is the target: no gradient flows to ``h_clean``.
    Equal to ``gsae.metrics.kl_div_per_token(unembed(h_clean), unembed(h_new))`` without the full logits.
    ``compile``: each chunk's softmaxes, KL and gradient through ``torch.compile`` (:func:`compiled`; for GPUs).
    """
    shape = h_new.shape[:-1]
    dtype = compute_dtype(W_U, h_new.device)
    D = h_new.shape[-1]
    with torch.autocast(h_new.device.type, enabled=False):
        out = _ChunkedKL.apply(
            h_clean.detach().reshape(-1, D), h_new.reshape(-1, D), W_U.detach(), b_U.detach(), dtype,
            chunk_rows(W_U.shape[1], chunk_elements), _vocab(W_U, d_vocab), compile,
        )
    return out.reshape(shape)


#: rows whose largest centred logit rise ``max_v (u_v − Σ p_ref u)`` exceeds this take the direct KL form (:func:`_kl_rows`)
KL_DIRECT_ABOVE = 2.0


def _kl_rows(l_ref: Tensor, p_ref: Tensor, l_new: Tensor) -> Tensor:
    """float64 ``KL(P_ref ‖ P_new)`` per row of float32 logits ``(r, V)``; ``l_new``'s buffer is overwritten.

    With ``u = l_new − l_ref`` (exact in float32 for nearby logits) centred by its ``p_ref``-mean (softmax ignores a
    row's common shift, so ``Σ p_ref u = 0`` changes no KL) and ``b = Σ p_ref expm1(u)`` (≥ 0 then, by convexity):
    ``KL = Σ p_ref (expm1(u) − u) + log1p(b) − b`` — a sum of non-negative terms ``≈ u²/2`` plus a scalar correction
    taken in float64, so a KL of 1e-5 nats between nearby states keeps float32's relative precision (the textbook
    ``Σ p (log p_ref − log p_new)`` subtracts two log-normalisers of ~11 nats to get it: ~1e-3 relative error at
    GPT-2's vocabulary). Without the centring, a row whose logits all moved down together (an unembedding without
    ``center_unembed``, as SAELens loads GPT-2) had ``b`` near −1, where ``log1p`` loses every digit: a 1–5% error at
    a shift of −10, NaN or garbage at −16. Rows where some centred logit rises by more than :data:`KL_DIRECT_ABOVE`
    (far states: ablations, large perturbations; ``expm1`` could overflow) take the direct form
    ``−Σ p u + log Σ p e^u`` (max-shifted). Identical logits give exactly 0. (Identical *states* give logits equal to
    the BLAS's rounding: MKL may round a row differently at another memory alignment, ~1e-14 nats.)
    """
    u = torch.sub(l_new, l_ref, out=l_new)
    u.sub_((p_ref * u).sum(-1, keepdim=True))  # the row's common shift out (exact identity; keeps b >= 0)
    far = u.amax(-1) > KL_DIRECT_ABOVE
    e = torch.expm1(u)  # may overflow in far rows only, which are replaced below
    b = (p_ref * e).sum(-1).double()  # (p · e).sum: ~2x faster than einsum / bmm / vecdot on CPU
    kl = (p_ref * e.sub_(u)).sum(-1).double() + (torch.log1p(b) - b)
    if bool(far.any()):
        uf, pf = u[far], p_ref[far]
        mf = uf.amax(-1, keepdim=True)
        direct = -(pf * uf).sum(-1).double() + mf.squeeze(-1).double()
        kl[far] = direct + torch.log((pf * uf.sub_(mf).exp_()).sum(-1)).double()
    return kl


class CEAndKL(NamedTuple):
    """What :func:`ce_and_kl_per_token` returns (float32; the CE is 0 at each sequence's last position).

    Attributes:
        ce_clean: ``(B, T)`` next-token CE of the clean run.
        ce: ``(n, B, T)`` next-token CE of each other run.
        kl: ``(n, B, T)`` ``KL(P_clean ‖ P_run)`` of each other run.
    """

    ce_clean: Tensor
    ce: Tensor
    kl: Tensor


@torch.no_grad()
def ce_and_kl_per_token(
    h_clean: Tensor,
    h_runs: Sequence[Tensor],
    W_U: Tensor,
    b_U: Tensor,
    tokens: Tensor,
    chunk_elements: int | None = None,
    d_vocab: int | None = None,
) -> CEAndKL:
    """Next-token CE of a clean run and of ``n`` other runs of the same tokens, and each run's KL to the clean one,
    from final hidden states ``(B, T, D)`` (no gradient).

    Per chunk of positions the clean logits are built once and every run's logits once (``1 + n`` vocabulary
    matmuls in all, no ``(B·T, d_vocab)`` tensor). Equal to :func:`gsae.lm.next_token_loss` (``"none"``) and
    :func:`gsae.metrics.kl_div_per_token` of the full logits; the KL is :func:`_kl_rows`' (identical states give
    0 up to the vocabulary matmul's rounding). ``W_U`` may be padded (:func:`pad_unembedding`, ``d_vocab`` the real size).
    """
    B, T, D = h_clean.shape
    dtype = compute_dtype(W_U, h_clean.device)
    n = len(h_runs)
    with torch.autocast(h_clean.device.type, enabled=False):
        W, b = W_U.to(dtype), b_U.to(dtype)
        V = _vocab(W, d_vocab)
        flats = [h.reshape(B * T, D) for h in (h_clean, *h_runs)]
        labels = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -1)], dim=1).reshape(-1)
        ce = torch.zeros(1 + n, B * T, dtype=torch.float32, device=h_clean.device)
        kl = torch.zeros(n, B * T, dtype=torch.float32, device=h_clean.device)
        step = chunk_rows(W.shape[1], chunk_elements)
        for i in range(0, B * T, step):
            lab = labels[i : i + step]
            valid, safe = lab >= 0, lab.clamp_min(0)[:, None]
            l_c = _logits(flats[0][i : i + step], W, b, V)
            lse_c = torch.logsumexp(l_c, -1)
            ce[0, i : i + step] = torch.where(valid, lse_c - l_c.gather(-1, safe).squeeze(-1), 0.0)
            p_c = (l_c - lse_c[:, None]).exp_()
            for j in range(n):
                l_n = _logits(flats[1 + j][i : i + step], W, b, V)
                lse_n = torch.logsumexp(l_n, -1)
                ce[1 + j, i : i + step] = torch.where(valid, lse_n - l_n.gather(-1, safe).squeeze(-1), 0.0)
                kl[j, i : i + step] = _kl_rows(l_c, p_c, l_n).float()
    return CEAndKL(ce[0].reshape(B, T), ce[1:].reshape(n, B, T), kl.reshape(n, B, T))


class Reference(NamedTuple):
    """Float32 logits, log-normaliser and probabilities ``(M, d_vocab)`` / ``(M,)`` of ``M`` reference positions,
    kept to compare many runs against (:func:`kl_to_reference`)."""

    logits: Tensor
    lse: Tensor
    probs: Tensor


@torch.no_grad()
def reference(h: Tensor, W_U: Tensor, b_U: Tensor, d_vocab: int | None = None) -> Reference:
    """The :class:`Reference` of final hidden states ``h (M, D)`` (``W_U`` may be padded: :func:`pad_unembedding`)."""
    dtype = compute_dtype(W_U, h.device)
    with torch.autocast(h.device.type, enabled=False):
        logits = _logits(h, W_U.to(dtype), b_U.to(dtype), _vocab(W_U, d_vocab))
    lse = torch.logsumexp(logits, -1)
    return Reference(logits, lse, (logits - lse[:, None]).exp_())


@torch.no_grad()
def kl_to_reference(
    ref: Reference, h: Tensor, W_U: Tensor, b_U: Tensor, chunk_elements: int | None = None, d_vocab: int | None = None
) -> Tensor:
    """float64 ``KL(P_ref ‖ P_h)`` ``(J, M)`` of ``J`` runs ``h (J, M, D)`` against the same ``M`` reference positions.

    Per chunk of positions of one run: its logits (one vocabulary matmul), then :func:`_kl_rows` (a run equal to the
    reference gives 0 up to the vocabulary matmul's rounding). Equal to :func:`gsae.metrics.kl_div_per_token` of the
    full logits, without them. ``W_U`` may be padded (:func:`pad_unembedding`, ``d_vocab`` the real size).
    """
    J, M, D = h.shape
    dtype = compute_dtype(W_U, h.device)
    out = torch.empty(J, M, dtype=torch.float64, device=h.device)
    step = chunk_rows(W_U.shape[1], chunk_elements)
    with torch.autocast(h.device.type, enabled=False):
        W, b = W_U.to(dtype), b_U.to(dtype)
        V = _vocab(W, d_vocab)
        for j in range(J):
            for i in range(0, M, step):
                l_n = _logits(h[j, i : i + step], W, b, V)
                out[j, i : i + step] = _kl_rows(ref.logits[i : i + step], ref.probs[i : i + step], l_n)
    return out
