"""Metrics: one definition each, with the formula and its source. Used by training, callbacks and ``evaluate.py``.

Reconstruction metrics are computed from *sums* (:class:`ReconSums`) so that they can be
all-reduced across DDP ranks and accumulated over batches before the ratios are taken.

State accumulated over batches and ranks lives in ``torchmetrics.Metric`` s (:class:`ReconMetric`,
:class:`FireCountMetric`: ``dist_reduce_fx="sum"``), used by validation and the benchmarks. The *training
step* keeps one packed ``all_reduce`` of ``[fired mask, ReconSums]`` (``SAESystem.shared_step``): the dead-latent
counters need the global fired mask at every step, and torchmetrics syncs each state with its own
``all_gather`` (8 collectives plus the gather buffers, against one). ``benchmarks/eval_speed.py --metrics`` on
2 gloo CPU ranks: 323 ms packed vs 396 ms torchmetrics per step, under 2% of a CPU g-SAE step (~0.04% there);
not measured on GPUs, where steps are far shorter, so the packed reduction stays.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from gsae.lm import upcast


class ReconSums(NamedTuple):
    """Sufficient statistics of a batch of reconstructions; add them up, then call :func:`recon_metrics`.

    Attributes:
        n: number of tokens.
        sse: ``Σ_t ‖x_t − x̂_t‖²``.
        sum_sq: ``Σ_t ‖x_t‖²``.
        sum_x: ``Σ_t x_t`` (a ``d_in`` vector; gives the centered variance).
        nmse_tok: ``Σ_t ‖x_t − x̂_t‖² / ‖x_t‖²`` (smol-sae's per-token NMSE).
        l0: ``Σ_t #{i : f_i(x_t) ≠ 0}``.
        cos: ``Σ_t cos(x_t, x̂_t)``.
        l2_ratio: ``Σ_t ‖x̂_t‖ / ‖x_t‖``.
    """

    n: Tensor
    sse: Tensor
    sum_sq: Tensor
    sum_x: Tensor
    nmse_tok: Tensor
    l0: Tensor
    cos: Tensor
    l2_ratio: Tensor

    def flat(self) -> Tensor:
        """All fields in one vector (one all-reduce)."""
        scalars = torch.stack([self.n, self.sse, self.sum_sq, self.nmse_tok, self.l0, self.cos, self.l2_ratio])
        return torch.cat([scalars, self.sum_x])

    @classmethod
    def unflat(cls, v: Tensor) -> ReconSums:
        n, sse, sum_sq, nmse_tok, l0, cos, l2 = v[:7]
        return cls(n, sse, sum_sq, v[7:], nmse_tok, l0, cos, l2)

    def __add__(self, other: ReconSums) -> ReconSums:  # type: ignore[override]
        return ReconSums.unflat(self.flat() + other.flat())


@torch.no_grad()
def recon_sums(x: Tensor, x_hat: Tensor, l0_per_token: Tensor) -> ReconSums:
    """:class:`ReconSums` of ``x, x̂ (N, d_in)`` and the per-token active-latent counts ``(N,)``: :func:`recon_sums_stacked`
    of a stack of one reconstruction."""
    return ReconSums.unflat(recon_sums_stacked(x, x_hat.unsqueeze(0), l0_per_token.unsqueeze(0))[0])


@torch.no_grad()
def recon_sums_stacked(x: Tensor, x_hat: Tensor, l0_per_token: Tensor) -> Tensor:
    """``(M, 7 + d_in)``: row ``i`` is the :class:`ReconSums` (``.flat()``) of ``x (N, d_in)``, its reconstruction
    ``x_hat[i]`` of ``x_hat (M, N, d_in)`` and the per-token active-latent counts ``l0_per_token[i]`` of ``(M, N)``
    (a stacked sweep's members on a logging step: one pass of batched ops for all, the statistics of ``x`` once).

    In float64. Per token ``‖x‖``, ``‖x̂‖`` and ``‖x − x̂‖`` are norms and ``x·x̂`` a batched matmul (no ``(N, d_in)``
    product tensors: a handful of passes over the float64 copies); ``cos = x·x̂ / (max(‖x‖, 1e-8) · max(‖x̂‖, 1e-8))``
    is ``F.cosine_similarity``'s definition.
    """
    m, n = x_hat.shape[0], x.shape[0]
    xd, hd = x.double(), x_hat.to(torch.float64, copy=True)  # hd is overwritten below: never the caller's tensor
    xn, xhn = torch.linalg.vector_norm(xd, dim=-1), torch.linalg.vector_norm(hd, dim=-1)  # (N,), (M, N)
    dot = torch.bmm(xd.unsqueeze(1), hd.permute(1, 2, 0)).view(n, m).T  # (M, N)
    err = torch.linalg.vector_norm(hd.sub_(xd), dim=-1).square_()  # (M, N)
    sq = xn.square()
    scalars = torch.stack(
        [
            torch.full((m,), float(n), dtype=torch.float64, device=x.device),
            err.sum(1),
            sq.sum().expand(m),
            (err / sq.clamp_min(1e-12)).sum(1),
            l0_per_token.double().sum(1),
            (dot / (xn.clamp_min(1e-8) * xhn.clamp_min(1e-8))).sum(1),
            (xhn / xn.clamp_min(1e-12)).sum(1),
        ],
        dim=1,
    )
    return torch.cat([scalars, xd.sum(0).expand(m, -1)], dim=1)


class ReconMetric(Metric):
    """:class:`ReconSums` accumulated over batches (``update``) and summed over ranks on ``compute``
    (``dist_reduce_fx="sum"``); ``compute()`` returns :func:`recon_metrics` of the total.

    States are float64 and not saved in checkpoints. ``sync_on_compute=False`` for code that runs on one rank
    only (the evaluation callback under DDP), where a collective would wait for ranks that never call it.
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, d_in: int, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ReconSums._fields:
            shape = (d_in,) if name == "sum_x" else ()
            self.add_state(name, torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x: Tensor, x_hat: Tensor, l0_per_token: Tensor) -> None:  # type: ignore[override]
        """Add the sums of ``x, x̂ (N, d_in)`` and the per-token active-latent counts ``(N,)``."""
        self.add_sums(recon_sums(x, x_hat, l0_per_token))

    def add_sums(self, s: ReconSums) -> None:
        """Add already computed :class:`ReconSums` (e.g. of a step that all-reduced them itself)."""
        for name, v in zip(ReconSums._fields, s):
            setattr(self, name, getattr(self, name) + v.to(torch.float64))

    def sums(self) -> ReconSums:
        """The accumulated (local, unsynced) sums."""
        return ReconSums(*(getattr(self, name) for name in ReconSums._fields))

    def compute(self) -> dict[str, float]:
        return recon_metrics(self.sums())


class FireCountMetric(Metric):
    """``(d_sae,)`` on how many tokens each latent fired, accumulated over batches and summed over ranks
    (:func:`fire_counts`; ``compute()`` returns the counts and the token total)."""

    full_state_update = False
    higher_is_better = None

    def __init__(self, d_sae: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.d_sae = d_sae
        self.add_state("counts", torch.zeros(d_sae, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n_tokens", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, top_idx: Tensor | None, top_acts: Tensor | None, latents: Tensor | None) -> None:  # type: ignore[override]
        """Add the fire counts of some rows (sparse ``top_idx``/``top_acts`` or dense ``latents``)."""
        rows = next(t for t in (top_acts, latents) if t is not None).shape[0]
        self.counts += fire_counts(top_idx, top_acts, latents, self.d_sae).to(self.counts)
        self.n_tokens += rows

    def compute(self) -> tuple[Tensor, Tensor]:
        return self.counts, self.n_tokens


def recon_metrics(s: ReconSums) -> dict[str, float]:
    """Reconstruction metrics from accumulated sums.

    - ``mse``: ``mean_t ‖x − x̂‖²`` (sum over ``d_in``, mean over tokens).
    - ``nmse``: ``mean_t ‖x − x̂‖²/‖x‖²``, the squared per-token NMSE of smol-sae / the g-SAE paper (SPEC §1.4).
    - ``explained_variance``: ``1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²`` with ``x̄`` the mean over tokens (centered; SPEC §5's clean form).
    - ``fvu_uncentered``: ``Σ‖x − x̂‖² / Σ‖x‖²`` (what SAELens v6 ``explained_variance`` ≈ ``1 −`` this; SPEC §5).
    - ``l0``: mean number of active latents per token. ``cossim``: mean ``cos(x, x̂)``. ``l2_ratio``: mean ``‖x̂‖/‖x‖``.
    """
    return host_floats(recon_metric_tensors(s))


def recon_metric_tensors(s: ReconSums) -> dict[str, Tensor]:
    """:func:`recon_metrics` as 0-d tensors on the sums' device (no wait for it: gather them with :func:`host_floats`)."""
    n = s.n.clamp_min(1)
    centered = (s.sum_sq - s.sum_x.pow(2).sum() / n).clamp_min(1e-12)
    return {
        "mse": s.sse / n,
        "nmse": s.nmse_tok / n,
        "explained_variance": 1 - s.sse / centered,
        "fvu_uncentered": s.sse / s.sum_sq.clamp_min(1e-12),
        "l0": s.l0 / n,
        "cossim": s.cos / n,
        "l2_ratio": s.l2_ratio / n,
    }


def host_floats(values: dict[str, Tensor | float]) -> dict[str, float]:
    """``values`` as Python floats, the tensors among them copied to the host in one transfer: on a GPU, one wait for
    the device instead of one per ``float(tensor)`` (a logging step converts ~13 metrics per SAE)."""
    out = {k: float(v) for k, v in values.items() if not isinstance(v, Tensor)}
    by_dtype: dict[torch.dtype, list[str]] = {}
    for k, v in values.items():
        if isinstance(v, Tensor):
            by_dtype.setdefault(v.dtype, []).append(k)
    if by_dtype:
        # one stack per dtype, then one cast and one copy: a few kernels, not a cast per value (a sweep logs ~140);
        # stacking is exact, and so is each value's cast to float64
        flat = torch.cat([torch.stack([values[k].detach().reshape(()) for k in keys]).to(torch.float64)
                          for keys in by_dtype.values()]).tolist()
        out.update(zip((k for keys in by_dtype.values() for k in keys), flat))
    return {k: out[k] for k in values}


def kl_div_per_token(logits_clean: Tensor, logits_new: Tensor) -> Tensor:
    """``KL(P_clean ‖ P_new)`` per token (sum over the vocabulary), shape of the logits minus the last dim.

    The convention of every codebase in SPEC §0: ``F.kl_div(log_softmax(new), log_softmax(clean), log_target=True)``.
    """
    lp_clean = F.log_softmax(upcast(logits_clean), dim=-1)
    lp_new = F.log_softmax(upcast(logits_new), dim=-1)
    return (lp_clean.exp() * (lp_clean - lp_new)).sum(-1)


class DeadLatentTracker(nn.Module):
    """Both dead-latent definitions of SPEC §1.5, updated from a *global* fired mask each step.

    - **batches** (g-SAE paper Table 1, smol-sae): dead if it did not fire in the last ``n_batches``
      consecutive training batches: ``batches_since_fired >= n_batches`` (default 5).
    - **tokens** (Gao et al., sparsify): dead if it did not fire in the last ``n_tokens`` tokens:
      ``tokens_since_fired >= n_tokens`` (default 10M).

    Latents start with both counters at 0 (alive until proven dead). The counters are buffers, so they
    are in the checkpoint. Under DDP the caller passes the fired mask OR-reduced over ranks and the
    global token count, so every rank holds the same counters ("dead" is global: sparsify #119).
    """

    def __init__(self, d_sae: int, n_batches: int = 5, n_tokens: int = 10_000_000, send_dead_count: bool = True) -> None:
        """Counters for ``d_sae`` latents; ``send_dead_count``: on a GPU, every :meth:`update` starts copying the new dead
        count to the host for the next :meth:`n_dead_by_tokens` (AuxK's); off for an SAE without AuxK (three kernels
        and an event a step saved)."""
        super().__init__()
        self.send_dead_count = send_dead_count
        if n_batches <= 0:
            raise ValueError(f"--model.dead_batches must be > 0 (got {n_batches})")
        if n_tokens <= 0:
            raise ValueError(f"--model.dead_tokens must be > 0 (got {n_tokens})")
        self.n_batches = n_batches
        self.n_tokens = n_tokens
        self.register_buffer("batches_since_fired", torch.zeros(d_sae, dtype=torch.long))
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))
        # on a GPU: the dead count of the last update, on its way to pinned host memory (see n_dead_by_tokens)
        self._pending: tuple[Tensor, torch.cuda.Event, int, int] | None = None

    @torch.no_grad()
    def update(self, fired: Tensor, n_tokens: int, new_batch: bool = True) -> None:
        """Advance the counters by one batch of ``n_tokens`` tokens; ``fired`` is a bool ``(d_sae,)``.

        ``new_batch=False``: these tokens are another micro-batch of the batch the last update began (an optimizer
        step under ``accumulate_grad_batches``): the batch counter is not advanced again, and a latent that fired
        in any micro-batch of the step counts as fired in it. The token counter advances by every micro-batch."""
        if new_batch:
            self.batches_since_fired.add_(1)
        self.batches_since_fired.masked_fill_(fired, 0)
        self.tokens_since_fired.add_(int(n_tokens)).masked_fill_(fired, 0)
        self._send_dead_count()

    @staticmethod
    @torch.no_grad()
    def update_many(trackers: list[DeadLatentTracker], idle: list[Tensor], n_tokens: int, new_batch: bool = True) -> None:
        """:meth:`update` of every tracker (a sweep's members), with ``idle[i]`` the *not*-fired mask of tracker ``i``
        as 0/1 ``long``: one ``_foreach`` call per counter operation for all trackers (one fused launch on a GPU
        instead of four per tracker; the counters times ``idle`` is ``masked_fill_(fired, 0)``, exactly)."""
        batches = [t.batches_since_fired for t in trackers]
        tokens = [t.tokens_since_fired for t in trackers]
        if new_batch:
            torch._foreach_add_(batches, 1)
        torch._foreach_mul_(batches, idle)
        torch._foreach_add_(tokens, int(n_tokens))
        torch._foreach_mul_(tokens, idle)
        for t in trackers:
            t._send_dead_count()

    def _send_dead_count(self) -> None:
        t = self.tokens_since_fired
        self._pending = None
        if t.is_cuda and self.send_dead_count:  # start copying the new dead count to the host now; the next step reads it
            host = torch.empty((), dtype=torch.long, pin_memory=True)
            host.copy_((t >= self.n_tokens).sum(), non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending = (host, done, t._version, t.data_ptr())

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_pending"] = None  # a CUDA event and pinned memory: a copy counts on its first read
        return state

    def auxk_mask(self, count: int | None = None) -> Tensor:
        """:meth:`dead_by_tokens` (AuxK's dead latents) with a way to its count on the host attached as
        ``count_true`` (:meth:`n_dead_by_tokens`, or ``count`` when the caller has it already), which
        :meth:`gsae.sae.TopKSAE.auxk_loss` calls instead of counting on the device."""
        mask = self.dead_by_tokens()
        mask.count_true = self.n_dead_by_tokens if count is None else (lambda: count)
        return mask

    def n_dead_by_tokens(self) -> int:
        """``int(dead_by_tokens().sum())``, the count AuxK needs on the host. On a GPU it was sent to the host by the
        last :meth:`update`, behind that step's kernels only, so reading it rarely waits (counting now would wait for
        every kernel queued since); counted now if the counters changed otherwise since (a restore, a move)."""
        p, t = self._pending, self.tokens_since_fired
        if p is not None and p[2] == t._version and p[3] == t.data_ptr():
            p[1].synchronize()
            return int(p[0])
        return int(self.dead_by_tokens().sum())

    def dead_by_batches(self) -> Tensor:
        return self.batches_since_fired >= self.n_batches

    def dead_by_tokens(self) -> Tensor:
        return self.tokens_since_fired >= self.n_tokens


def fire_counts(
    top_idx: Tensor | None, top_acts: Tensor | None, latents: Tensor | None, d_sae: int, dtype: torch.dtype = torch.long,
    test: Literal["nonzero", "sum_positive"] = "nonzero",
) -> Tensor:
    """``(d_sae,)``: on how many rows each latent has a nonzero activation (SPEC §1.5's activity test), in ``dtype``
    (a training step packs them as float64 for its one all-reduce: counted in that dtype, no conversion after).
    ``test="sum_positive"``: each latent's summed activation instead (smol-sae's ``x_hid.sum(0) > 0``); either way a
    latent fired in the rows iff its entry, also summed over ranks, is ``> 0``.

    Give either the sparse form (``top_idx``, ``top_acts`` of any matching shapes) or dense ``latents (N, d_sae)``.
    """
    if test == "sum_positive":
        if latents is not None:
            return latents.sum(0, dtype=dtype)
        sums = torch.zeros(d_sae, dtype=dtype, device=top_idx.device)
        return sums.index_add_(0, top_idx.reshape(-1), top_acts.reshape(-1).to(dtype))
    if latents is not None:
        return (latents != 0).sum(0, dtype=dtype)
    counts = torch.zeros(d_sae, dtype=dtype, device=top_idx.device)
    nonzero = torch.ne(top_acts.reshape(-1), 0, out=torch.empty(top_acts.numel(), dtype=dtype, device=top_idx.device))
    return counts.index_add_(0, top_idx.reshape(-1), nonzero)  # no boolean-mask gather; the test written in dtype


def fired_mask(top_idx: Tensor | None, top_acts: Tensor | None, latents: Tensor | None, d_sae: int) -> Tensor:
    """Bool ``(d_sae,)``: latents with a nonzero activation on some token of the batch (SPEC §1.5)."""
    return fire_counts(top_idx, top_acts, latents, d_sae) > 0


def l0_per_token(top_acts: Tensor | None, latents: Tensor | None) -> Tensor:
    """``(N,)`` number of nonzero latents per token: ``#{i : f_i(x_t) ≠ 0}`` (SAELens ``l0``, ``!= 0``)."""
    return (top_acts != 0).sum(-1) if top_acts is not None else (latents != 0).sum(-1)
