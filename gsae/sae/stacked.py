"""Several TopK SAEs and g-SAEs of one shape, stepped as one: a sweep's members in a few batched kernels.

A sweep (``gsae.systems.SweepSAESystem``) trains N SAEs on the same rows. Stepped one by one, each member's forward
and backward is ~40 kernel launches (encoder matmul, top-k, gather, sparse decode, its backward, loss, metrics); on a
GPU at the paper's 4096 tokens per step a member's step is host-bound (~2.8 ms of Python and launches for ~1.5 ms of
kernels), so a 10-member sweep paid ~10× the launches for what a GPU could run as one batched pass.
:func:`stacked_forward` runs members that share ``d_in``, ``d_sae``, ``relu_after_topk`` and the parameter dtype —
TopK and g-SAE alike, any ``k``, ``β``, ``k_aux``, init — as one pass:

- ``pre = (x − b_dec) W_enc + b_enc`` for every member in one ``baddbmm`` (each member's own ``b_dec``, as alone);
- the g-SAE members' ``|W_dec ∇ₓL|`` in one batched matmul, their scores ``pre·(1 + β|W_dec ∇ₓL|)`` in one pass
  (the g-SAEs are the stack's first rows, so their pre-activations and decoders are views, not copies, and no
  ``(N, B, d_sae)`` scores matrix is built for the TopK members, whose scores are their pre-activations);
- on a GPU one top-k per block of equally scored rows (the g-SAEs, the TopK SAEs) at the largest ``k``, sorted,
  each member taking its best ``k`` of those (:data:`GROUPED_TOPK_DEVICES`); on the CPU one top-k per run of equal
  ``k`` (g-SAEs, then TopK SAEs, each ordered by ``k``);
- the decode of every member in one ``embedding_bag`` over the stacked decoders (a bag per member and row);
- the backward as one autograd node: ``∂W_dec`` and ``∂W_enc`` as one sparse product each over the stacked
  latents (the latent-major order of all members' entries; dense bf16 matmuls under CUDA autocast, as
  :class:`~gsae.sae.base.SparsePattern`), ``∂b_enc`` one ``index_add``, ``∂b_dec`` one batched matmul.

Each member's parameters stay its own ``nn.Parameter``\\ s (checkpoints, exports, optimizer groups and AuxK, which
runs per member on its slice, are unchanged), but their data lives in the stack (:meth:`StackPlan.storage`: each
parameter a view of its row), so no step copies the encoders and decoders (0.47 GB each at Table 1's shape); the
backward hands each member its gradients as views of the stacked ones. The results equal the members' own forwards and backwards
(:class:`~gsae.sae.TopKSAE`'s sparse path) up to float rounding of the batched matmuls: same selection, same bags in
the same order (``tests/sae/test_stacked.py`` checks outputs and gradients against each member on dense autograd;
``tests/systems/test_sweep.py`` whole runs against the members stepped one by one).

On the CPU a member's step is FLOP-bound and the stack's working set (every member's pre-activations at once) costs
page faults, so ``SweepSAESystem`` stacks on a GPU only by default (``benchmarks/README.md``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from gsae.sae.base import autocast_dense_dtype
from gsae.sae.grad_topk import GradTopKSAE, half_safe_grad
from gsae.sae.topk import TopKSAE, topk_indices

#: the most bytes one stack's pre-activations (members × rows × d_sae, in the forward's dtype) may take; members
#: beyond it go into another stack (:func:`stacks`). The scores of a stack with g-SAEs take as much again.
STACK_BYTES = 4 << 30
#: devices whose latent-major order (the sparse backward's) is one numpy radix sort per member (else one torch sort)
RADIX_SORT_DEVICES = {"cpu"}
#: devices where the stack's top-k runs once per block of equally scored rows (g-SAEs, TopK SAEs) at the largest
#: ``k``, each member then taking its best ``k`` of those (:meth:`StackPlan.selection`), instead of once per run of
#: equal ``k``: ~25 kernel launches for Table 1's 10 members instead of ~110 (a GPU step there is host-bound); on the
#: CPU the top-k's cost grows with ``k`` (k 3 / 64: 21 / 75 ms for 4096 rows) and launches cost nothing
GROUPED_TOPK_DEVICES = {"cuda"}
#: devices where :func:`remove_parallel_grads` and :func:`normalize_decoders` run each SAE's own constraint (a CPU is
#: not launch-bound, and each SAE's cache-sized row blocks beat one pass over the whole stack: 10 decoders of GPT-2
#: shape, 2 cores, 0.10 s in one pass against 0.05 s per SAE); elsewhere one pass over the stacked decoders
PER_SAE_CONSTRAINT_DEVICES = {"cpu"}


def scored_by_grad(sae) -> bool:
    """Whether ``sae`` selects by ``pre·(1 + β|W_dec ∇ₓL|)`` (a g-SAE with ``β ≠ 0``) rather than by ``pre``."""
    return isinstance(sae, GradTopKSAE) and sae.beta != 0


def stack_key(sae) -> tuple | None:
    """What members must share to run in one stack (``None``: this SAE runs on its own: not a sparse-backward
    :class:`TopKSAE` / :class:`GradTopKSAE`, e.g. a subclass with its own forward)."""
    if type(sae) not in (TopKSAE, GradTopKSAE) or not sae.sparse_backward:
        return None
    w = sae.W_enc
    return sae.d_in, sae.d_sae, sae.relu_after_topk, sae.unit_norm_decoder, w.dtype, w.device


def stacks(saes: list, rows: int, itemsize: int = 4) -> list[list[int]]:
    """Positions of ``saes`` grouped into stacks: equal :func:`stack_key`, at most :data:`STACK_BYTES` of
    pre-activations for ``rows`` rows each, in stack order: the g-SAEs (:func:`scored_by_grad`) first, then by
    ``k`` (stable). SAEs without a key are stacks of one (the caller runs them alone)."""
    groups: dict[tuple, list[int]] = {}
    out: list[list[int]] = []
    for i, sae in enumerate(saes):
        key = stack_key(sae)
        if key is None:
            out.append([i])
        else:
            groups.setdefault(key, []).append(i)
    for members in groups.values():
        members.sort(key=lambda i: (not scored_by_grad(saes[i]), saes[i].k))
        per = max(1, STACK_BYTES // max(1, rows * saes[members[0]].d_sae * itemsize))
        out += [members[j : j + per] for j in range(0, len(members), per)]
    return out


class StackPlan:
    """One stack: its SAEs in stack order (:func:`stacks`: g-SAEs first, each part by ``k``), its runs of rows with
    the same ``k`` and scores, the number of g-SAE rows, the storage its members' parameters live in
    (:meth:`storage`) and the bag layout of its decode (:meth:`layout`, the latest row count's)."""

    def __init__(self, saes: list[TopKSAE]) -> None:
        self.saes = saes
        self.n = len(saes)
        self.d_in, self.d_sae = saes[0].d_in, saes[0].d_sae
        self.relu = saes[0].relu_after_topk
        self.ks = [s.k for s in saes]
        scored = [scored_by_grad(s) for s in saes]
        self.n_grad = sum(scored)  # the g-SAE rows: 0 … n_grad − 1
        if scored != sorted(scored, reverse=True):
            raise ValueError("StackPlan: the g-SAEs must come first (gsae.sae.stacked.stacks orders them)")
        self.runs: list[tuple[int, int, int]] = []  # (k, first row, end row): equal k and equally scored
        for i, k in enumerate(self.ks):
            if self.runs and self.runs[-1][0] == k and i != self.n_grad:
                self.runs[-1] = (k, self.runs[-1][1], i + 1)
            else:
                self.runs.append((k, i, i + 1))
        self.betas = [s.beta for s in saes[: self.n_grad]]
        self.k_max = max(self.ks)
        self._const: dict[torch.device, tuple[Tensor, Tensor]] = {}  # layout(): k per member, latent offsets
        self._last: tuple | None = None  # layout(): the latest row count's
        self._last_selection: tuple | None = None  # selection(): the latest row count's
        self._betas: dict[tuple, Tensor] = {}
        self._storage: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # storage(): the members' parameters
        # set by the forward for the caller: per stack row, (top_acts (B, k), top_idx (B, k)) views; and every
        # member's entries flat (member-major), their stacked latents (``i·d_sae + top_idx``) and kept values
        self.top: list[tuple[Tensor, Tensor]] = []
        self.gidx: Tensor | None = None
        self.acts: Tensor | None = None

    def params(self) -> list[Tensor]:
        return [s.W_enc for s in self.saes] + [s.b_enc for s in self.saes] + [s.W_dec for s in self.saes] + [
            s.b_dec for s in self.saes
        ]

    def storage(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(W_encᵀ (N, d_sae, d_in), b_enc (N, d_sae), W_dec (N, d_sae, d_in), b_dec (N, d_in))`` whose rows ARE the
        members' parameters: each parameter's data is a view of its row (``W_enc`` the transpose of its row, the layout
        it is kept in), so the stacked pass and the decoder constraints read and write them without a copy per step.

        The parameters stay the members' own ``nn.Parameter`` objects (optimizer state, checkpoints, exports and
        evaluation see them as before); only their data moves into the stack, on first use and again whenever
        something replaced a parameter's data since (``.to()``, a dtype change): a check of data pointers per call."""
        if self._storage is None or not self._packed():
            self._pack()
        return self._storage

    def _views(self) -> list[tuple[Tensor, Tensor]]:
        """``(parameter, the view of the stack it should be)`` for every parameter of every member."""
        W_encT, b_enc, W_dec, b_dec = self._storage
        out = []
        for i, s in enumerate(self.saes):
            out += [(s.W_enc, W_encT[i].T), (s.b_enc, b_enc[i]), (s.W_dec, W_dec[i]), (s.b_dec, b_dec[i])]
        return out

    def _packed(self) -> bool:
        return all(
            p.data_ptr() == v.data_ptr() and p.stride() == v.stride() and p.shape == v.shape and p.dtype == v.dtype
            and p.device == v.device
            for p, v in self._views()
        )

    @torch.no_grad()
    def _pack(self) -> None:
        self._storage = (
            torch.stack([s.W_enc.T for s in self.saes]),
            torch.stack([s.b_enc for s in self.saes]),
            torch.stack([s.W_dec for s in self.saes]),
            torch.stack([s.b_dec for s in self.saes]),
        )
        for p, v in self._views():
            p.data = v

    def l0_per_token(self, rows: int) -> Tensor:
        """``(N, rows)``: each member's nonzero kept values per row, from the last forward (:attr:`acts`), in one
        ``index_add`` over the bags."""
        _, bags, _, _ = self.layout(rows, self.acts.device)
        nonzero = self.acts.ne(0).to(self.acts.dtype)
        return self.acts.new_zeros(self.n * rows).index_add_(0, bags, nonzero).view(self.n, rows)

    def beta_tensor(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The g-SAEs' ``β`` as an ``(N_g, 1, 1)`` tensor (made once per device and dtype)."""
        key = (device, dtype)
        if key not in self._betas:
            self._betas[key] = torch.tensor(self.betas, dtype=dtype).view(-1, 1, 1).to(device)
        return self._betas[key]

    def layout(self, rows: int, device: torch.device) -> tuple[Tensor, Tensor, np.ndarray, Tensor]:
        """``(bag offsets, bag of each entry, start of each member's entries (host), member offsets of the stacked
        latents (N, 1, 1))`` for ``rows`` rows: the flat entries are member-major (member i's ``rows·k_i`` entries,
        row-major), a bag per (member, row) — bag ``i·rows + b`` — so a bag's entries are its row's k.

        Built on the device from two tensors made once per device: a step's rows vary with the special tokens it drops,
        and a copy from the host per new row count would wait for the GPU (``repeat_interleave`` is given its output
        size for the same reason). The latest row count's layout is kept."""
        const = self._const.get(device)
        if const is None:
            ks = torch.tensor(self.ks, dtype=torch.int64).to(device)
            const = self._const[device] = (ks, torch.arange(self.n, device=device).view(-1, 1, 1) * self.d_sae)
        if self._last is not None and self._last[0] == (rows, device):
            return self._last[1]
        ks, latent_base = const
        sizes = ks.repeat_interleave(rows, output_size=self.n * rows)  # each bag's size (its member's k)
        offsets = sizes.cumsum(0).sub_(sizes)
        bags = torch.arange(self.n * rows, device=device).repeat_interleave(sizes, output_size=rows * sum(self.ks))
        starts = np.concatenate([[0], np.cumsum([rows * k for k in self.ks])])
        have = (offsets, bags, starts, latent_base)
        self._last = ((rows, device), have)
        return have

    def selection(self, rows: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(take, base)`` of the grouped top-k (:data:`GROUPED_TOPK_DEVICES`): for each entry of the decode's layout
        (:meth:`layout`: member-major, then row, then its member's ``k`` best), its place in the ``(N·rows, k_max)``
        matrix of every row's ``k_max`` best latents, best first (``bag · k_max + its rank``), and its member's offset
        in the stacked latents (``member · d_sae``). Built on the device from :meth:`layout`'s tensors; the latest row
        count's is kept."""
        if self._last_selection is not None and self._last_selection[0] == (rows, device):
            return self._last_selection[1]
        offsets, bags, _, _ = self.layout(rows, device)
        rank = torch.arange(bags.numel(), device=device).sub_(offsets[bags])  # each entry's place in its bag
        have = (bags * self.k_max + rank, bags.div(rows, rounding_mode="floor").mul_(self.d_sae))
        self._last_selection = ((rows, device), have)
        return have


def _grouped_top(plan: StackPlan, pre: Tensor, scores: Tensor | None, rows: int) -> tuple[Tensor, Tensor]:
    """``(top_idx, top_acts)`` of every member, flat in the layout's order (:meth:`StackPlan.layout`): one top-k of
    ``k_max`` per block of equally scored rows (the g-SAEs by their scores, the TopK SAEs by ``pre``), sorted by score,
    then each member's first ``k`` (its top ``k``: the ``k_max`` best hold them) taken in one ``index_select``."""
    n, d_sae, k_max = plan.n, plan.d_sae, plan.k_max
    g_rows = 0 if scores is None else scores.shape[0]
    best = []
    for first, end in [(0, g_rows), (g_rows, n)]:
        if end <= first:
            continue
        score = (scores if first < g_rows else pre[first:end]).reshape((end - first) * rows, d_sae)
        idx = topk_indices(score, k_max)
        order = score.gather(1, idx).argsort(dim=1, descending=True)  # best first (ties: either, as torch.topk's)
        best.append(idx.gather(1, order))
    best_idx = torch.cat(best) if len(best) > 1 else best[0]  # (N·rows, k_max): member-major rows, best first
    take, _ = plan.selection(rows, pre.device)
    acts = pre.view(n * rows, d_sae).gather(1, best_idx).view(-1).index_select(0, take)
    return best_idx.view(-1).index_select(0, take), acts


class _StackedOrder:
    """The latent-major order of a stack's entries: ``(perm, bag of each sorted entry, latent offsets)`` over the
    ``N·d_sae`` stacked latents, as :meth:`SparsePattern.order` for one SAE."""

    def __init__(self, plan: StackPlan, gidx: Tensor, bags: Tensor, starts: np.ndarray) -> None:
        n_lat = plan.n * plan.d_sae
        if gidx.device.type in RADIX_SORT_DEVICES and plan.d_sae <= 2**16:
            # each member's entries hold only its own latents: one numpy 16-bit radix sort per member block (~1 ms
            # per 130k keys, single-threaded; torch's parallel CPU sort stalls on shared cores), shifted into place
            flat = gidx.numpy()
            perms, counts = [], []
            for i in range(plan.n):
                keys = (flat[starts[i] : starts[i + 1]] - i * plan.d_sae).astype(np.uint16)
                perms.append(np.argsort(keys, kind="stable") + starts[i])
                counts.append(np.bincount(keys, minlength=plan.d_sae))
            c = np.concatenate(counts)
            perm = torch.from_numpy(np.concatenate(perms).astype(np.int64, copy=False))
            self.offsets = torch.from_numpy((np.cumsum(c) - c).astype(np.int64, copy=False))
        else:
            keys, perm = gidx.int().sort(stable=True) if n_lat < 2**31 else gidx.sort(stable=True)
            self.offsets = torch.searchsorted(keys, torch.arange(n_lat, dtype=keys.dtype, device=keys.device))
        self.perm = perm
        self.tokens = bags[perm]

    def transposed_mm(self, values: Tensor, dense: Tensor) -> Tensor:
        """``(N·d_sae, d)``: for each stacked latent, the sum over its entries of ``value · dense[bag]``."""
        weights = values[self.perm].to(dense.dtype)
        return F.embedding_bag(self.tokens, dense, self.offsets, per_sample_weights=weights, mode="sum")


class _StackedTopK(torch.autograd.Function):
    """``(x, grad, plan, *params) -> (x̂ (N, B, d_in), pre (N, B, d_sae))`` for a stack's members; ``plan.top`` gets each
    member's ``(top_acts, top_idx)``. ``params`` = the members' ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` (N each)."""

    @staticmethod
    def forward(ctx, x: Tensor, grad: Tensor | None, plan: StackPlan, *params: Tensor):
        # the parameters arrive for autograd (their gradients go back to them); their values are read from the stack
        # they live in (StackPlan.storage, packed by stacked_forward)
        n, d_sae = plan.n, plan.d_sae
        W_encT, b_enc_all, W_dec_all, b_dec_all = plan._storage
        dtype = W_encT.dtype
        x = x.to(dtype)
        rows = x.shape[0]
        offsets, bags, starts, latent_base = plan.layout(rows, x.device)
        x_c = x.unsqueeze(0) - b_dec_all.unsqueeze(1)  # (N, B, d_in): each member centres on its own b_dec
        pre = torch.baddbmm(b_enc_all.unsqueeze(1), x_c, W_encT.transpose(1, 2))  # (N, B, d_sae)
        g_rows, scores = plan.n_grad if grad is not None else 0, None
        if g_rows:  # the g-SAEs' scores pre · (1 + β|W_dec g|), as GradTopKSAE's (their rows come first: views)
            g, r = half_safe_grad(grad, W_dec_all)  # float16: rows scaled by powers of two, r undoes it
            a = torch.matmul(g, W_dec_all[:g_rows].transpose(1, 2)).abs_()
            pre_g = pre[:g_rows]
            if len(set(plan.betas)) == 1 and r is None:
                scores = torch.addcmul(pre_g, pre_g, a, value=plan.betas[0], out=a)
            else:  # β per g-SAE: a (N_g, 1, 1) tensor made once per device (a copy per step would wait for a GPU)
                # β in float32 (1e5 is inf in float16, 16-mixed): β|W_dec g| is computed in float32, stored in a's dtype
                beta = plan.beta_tensor(a.device, torch.float32)
                scores = torch.addcmul(pre_g, pre_g, a.mul_(beta if r is None else beta * r), out=a)
        if x.device.type in GROUPED_TOPK_DEVICES and len(plan.runs) > 1 + (0 < g_rows < n):
            idx, acts = _grouped_top(plan, pre, scores, rows)  # one top-k per block of equally scored rows
            del scores
            if plan.relu:
                acts = F.relu(acts)
            plan.top = [(acts[starts[i] : starts[i + 1]].view(rows, k), idx[starts[i] : starts[i + 1]].view(rows, k))
                        for i, k in enumerate(plan.ks)]
            gidx = idx + plan.selection(rows, x.device)[1]
        else:
            idx_parts, act_parts = [], []
            for k, first, end in plan.runs:  # one top-k per run of equal k (TopK rows: scored by pre itself)
                m = end - first
                score = scores[first:end] if first < g_rows else pre[first:end]
                idx = topk_indices(score.reshape(m * rows, d_sae), k).view(m, rows, k)
                acts = pre[first:end].gather(2, idx)
                if plan.relu:
                    acts = F.relu(acts)
                idx_parts.append(idx)
                act_parts.append(acts)
            del scores, score
            plan.top = [(a[i], ix[i]) for a, ix in zip(act_parts, idx_parts) for i in range(a.shape[0])]
            gidx = torch.cat([(ix + latent_base[first:end]).reshape(-1)
                              for ix, (_, first, end) in zip(idx_parts, plan.runs)])
            acts = torch.cat([a.reshape(-1) for a in act_parts])
        acts = acts.to(W_dec_all.dtype)
        plan.gidx, plan.acts = gidx, acts
        x_hat = F.embedding_bag(gidx, W_dec_all.view(n * d_sae, -1), offsets, per_sample_weights=acts, mode="sum")
        x_hat = x_hat.view(n, rows, -1).add_(b_dec_all.unsqueeze(1))
        ctx.save_for_backward(x_c, W_encT, W_dec_all, gidx, acts)
        ctx.plan, ctx.layout = plan, (offsets, bags, starts)
        ctx.dense_dtype = autocast_dense_dtype(x)
        ctx.mark_non_differentiable(pre)
        ctx.set_materialize_grads(False)
        return x_hat, pre

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x_hat: Tensor, _grad_pre):
        plan = ctx.plan
        n, d_sae = plan.n, plan.d_sae
        nothing = (None, None, None, *([None] * (4 * n)))
        if grad_x_hat is None:
            return nothing
        x_c, W_encT, W_dec_all, gidx, acts = ctx.saved_tensors
        offsets, bags, starts = ctx.layout
        rows, d_in = x_c.shape[1], x_c.shape[2]
        g = grad_x_hat.to(W_dec_all.dtype).contiguous().view(n * rows, d_in)
        W_dec_flat = W_dec_all.view(n * d_sae, d_in)
        # ∂acts[e] = g[bag e] · W_dec[gidx e]  (SparseDecode's, over the stacked decoders)
        grad_acts = torch.ops.aten._embedding_bag_per_sample_weights_backward(g, W_dec_flat, gidx, offsets, bags, 0)
        if plan.relu:
            grad_acts = grad_acts * (acts > 0)
        grad_acts = grad_acts.to(x_c.dtype)
        x_flat = x_c.view(n * rows, d_in)
        if ctx.dense_dtype is not None:  # CUDA autocast: the sparse products as batched tensor-core matmuls
            dt = ctx.dense_dtype
            pos = bags * d_sae + gidx.remainder(d_sae)  # entry → (member row, local latent) of a (N·B, d_sae) matrix
            G = acts.new_zeros(n * rows * d_sae, dtype=dt).index_put_((pos,), acts.to(dt)).view(n, rows, d_sae)
            grad_W_dec = torch.bmm(G.transpose(1, 2), g.view(n, rows, d_in).to(dt)).to(g.dtype)
            G.view(-1).index_put_((pos,), grad_acts.to(dt))
            grad_W_encT = torch.bmm(G.transpose(1, 2), x_c.to(dt)).to(x_c.dtype)
        else:
            order = _StackedOrder(plan, gidx, bags, starts)
            grad_W_dec = order.transposed_mm(acts, g).view(n, d_sae, d_in)
            grad_W_encT = order.transposed_mm(grad_acts, x_flat).view(n, d_sae, d_in)
        grad_b_enc = x_c.new_zeros(n * d_sae).index_add_(0, gidx, grad_acts).view(n, d_sae)
        # ∂b_dec = Σ_rows g (the decoder's bias) − W_enc ∂b_enc (the encoder's centring), one batched product
        grad_b_dec = torch.baddbmm(
            g.view(n, rows, d_in).sum(1, keepdim=True), grad_b_enc.unsqueeze(1), W_encT, alpha=-1
        ).view(n, d_in)
        need = ctx.needs_input_grad[3:]
        grads = (
            [grad_W_encT[i].T for i in range(n)] + [grad_b_enc[i] for i in range(n)]
            + [grad_W_dec[i] for i in range(n)] + [grad_b_dec[i] for i in range(n)]
        )
        return (None, None, None, *(gr if ok else None for gr, ok in zip(grads, need)))


def stacked_forward(plan: StackPlan, x: Tensor, grad: Tensor | None) -> tuple[Tensor, Tensor]:
    """Every member of ``plan`` on ``x (B, d_in)`` (g-SAEs scored with ``grad``, ``∇ₓL`` per row): ``(x̂ (N, B, d_in),
    pre (N, B, d_sae))`` in stack order, ``plan.top[i] = (top_acts, top_idx)`` of member ``i`` — what
    ``plan.saes[i](x, grad)`` gives as ``x_hat``, ``pre_acts``, ``top_acts`` and ``top_idx``."""
    plan.storage()  # the parameters' data in the stack (packed on first use, or again if it was replaced)
    return _StackedTopK.apply(x, grad, plan, *plan.params())


def stacked_view(tensors: list[Tensor]) -> Tensor | None:
    """``(N, *shape)``: ``tensors`` as one view if they are equally spaced, equally strided pieces of one storage (the
    gradients :func:`stacked_forward`'s backward hands its members, when autograd keeps them as given), else ``None``."""
    first = tensors[0]
    if len(tensors) < 2:
        return first.unsqueeze(0)
    storage = first.untyped_storage().data_ptr()
    step = tensors[1].storage_offset() - first.storage_offset()
    for i, t in enumerate(tensors):
        if (
            t.untyped_storage().data_ptr() != storage or t.shape != first.shape or t.stride() != first.stride()
            or t.dtype != first.dtype or t.storage_offset() != first.storage_offset() + i * step
        ):
            return None
    if step < first.numel() or not first.is_contiguous():
        return None  # overlapping pieces, or a layout this view would not describe
    return first.as_strided((len(tensors), *first.shape), (step, *first.stride()))


@torch.no_grad()
def remove_parallel_grads(plan: StackPlan) -> None:
    """:meth:`~gsae.sae.base.SparseAutoencoder.remove_parallel_grad` of every SAE of a stack in one pass: the gradient
    of each decoder row minus its component along the (unit) row, as each SAE's own (row for row the same products)."""
    saes = plan.saes
    grads = [s.W_dec.grad for s in saes]
    if any(g is None for g in grads) or saes[0].W_dec.device.type in PER_SAE_CONSTRAINT_DEVICES:
        for s in saes:
            s.remove_parallel_grad()
        return
    W = plan.storage()[2]
    G = stacked_view(grads)
    copied = G is None
    if copied:  # autograd copied the gradients: work on a stack of them and write them back in one call
        G = torch.stack(grads)
    G.addcmul_(torch.linalg.vecdot(G, W).unsqueeze(-1), W, value=-1)
    if copied:
        torch._foreach_copy_(grads, list(G.unbind(0)))


@torch.no_grad()
def normalize_decoders(plan: StackPlan) -> None:
    """:meth:`~gsae.sae.base.SparseAutoencoder.normalize_decoder` of every SAE of a stack in one pass (each row divided
    by its norm, as each SAE's own), in place in the stack the decoders live in."""
    if plan.saes[0].W_dec.device.type in PER_SAE_CONSTRAINT_DEVICES:
        for s in plan.saes:
            s.normalize_decoder()
        return
    W = plan.storage()[2]
    W.div_(W.norm(dim=2, keepdim=True).clamp_min(1e-12))
