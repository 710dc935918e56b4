"""Adam whose fused kernel sees every parameter as one contiguous run of memory.

``W_enc`` is stored transposed (``(d_in, d_sae)`` with strides ``(1, d_in)``: the layout the sparse
encoder backward writes ``∂W_enc`` in, so autograd keeps it without a copy). PyTorch's fused CPU Adam
(``aten/src/ATen/native/cpu/FusedAdamKernel.cpp``, torch 2.x) starts with ``grad.contiguous()`` — a result
it never uses — so every step of every SAE paid a full transposing copy of ``∂W_enc`` (37.7 MB at GPT-2
shape; 24 ms alone, 90–150 ms inside a 10-member sweep step whose working set misses the caches).

Adam is elementwise, so it may run on any view that pairs the same elements of the parameter, its
gradient and its two moments. :class:`Adam` hands the fused kernel, for each dense but non-contiguous
parameter, the flat ``(numel,)`` views of the four over their memory: the same updates (bit for bit,
``tests/test_optim.py``), no copy (a 10-SAE sweep step at GPT-2 shape: 0.43 → 0.16 s of optimizer).

The kernel also walks the four tensors' memory in step without checking their strides: a moment restored
in another layout than its parameter's (a checkpoint written with another ``W_enc`` layout) is paired with
the wrong elements, and torch's fused Adam then updates silently wrong (tested). :class:`Adam` first copies
any gradient or moment whose strides differ from its parameter's into the parameter's layout (once: the
moment is replaced in the state).

A sweep trains N SAEs with one optimizer, a parameter group per member (``gsae.systems.SweepSAESystem``); torch's
Adam steps each group on its own: N rounds of Python and N fused kernels (plus N step-count increments) per step.
:meth:`Adam.step` steps every group with the same hyperparameters (lr, betas, eps, weight decay, …: equal under
one schedule) in one call of the fused kernel. The kernel is elementwise and takes each parameter's own step count,
so the updates are those of the groups stepped one by one, bit for bit (``tests/test_optim.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.adam import adam
from torch.optim.optimizer import _use_grad_for_differentiable

#: the group options ``torch.optim.adam.adam`` takes: groups equal in all of them step in one fused call
STEP_OPTIONS = ("lr", "betas", "weight_decay", "eps", "amsgrad", "maximize", "foreach", "capturable", "differentiable",
                "fused", "decoupled_weight_decay")


def dense_order(t: Tensor) -> list[int] | None:
    """The dimension order in which ``t``'s memory is contiguous (a permutation), or ``None`` if ``t`` is not a
    permutation of a contiguous tensor (gaps, overlaps, a storage offset does not matter)."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return order if t.permute(order).is_contiguous() else None


def flat_view(t: Tensor) -> Tensor:
    """``t``'s elements as a contiguous ``(numel,)`` view in memory order (``t`` must be dense: :func:`dense_order`)."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


class Adam(torch.optim.Adam):
    """``torch.optim.Adam``, fused by default, without the per-step copy of transposed parameters' gradients
    and with every moment kept in its parameter's layout.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (default 1e-4, SPEC §1.3).
        betas: moment decay rates (default (0.9, 0.999)).
        eps: denominator term (default 1e-8).
        weight_decay: L2 penalty (default 0).
        amsgrad: the AMSGrad variant (default False).
        maximize: maximise the objective (default False).
        fused: one kernel for all parameters (default True; CPU and CUDA, ~2.5x faster than the
            per-tensor loop on CPU, same updates to ~1e-8); ``False``: torch's default implementation.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        fused: bool | None = True,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, fused=fused
        )

    @_use_grad_for_differentiable
    def step(self, closure=None):
        """One Adam step of every group, as ``torch.optim.Adam.step``; fused groups with equal options (a sweep's
        members under one schedule) in one call of the fused kernel."""
        self._accelerator_graph_capture_health_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        calls: dict[object, tuple[dict, list[list[Tensor]], list[bool]]] = {}
        for i, group in enumerate(self.param_groups):
            lists: list[list[Tensor]] = [[], [], [], [], [], []]
            has_complex = self._init_group(group, *lists)
            key = i  # a group of its own, unless fused with hashable options
            if group["fused"] and not isinstance(group["lr"], Tensor):
                key = tuple(group[k] for k in STEP_OPTIONS)
            if key in calls:
                _, into, complex_ = calls[key]
                for a, b in zip(into, lists):
                    a.extend(b)
                complex_.append(has_complex)
            else:
                calls[key] = (group, lists, [has_complex])
        for group, (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps), complex_ in calls.values():
            beta1, beta2 = group["betas"]
            adam(
                params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                amsgrad=group["amsgrad"], has_complex=any(complex_), beta1=beta1, beta2=beta2, lr=group["lr"],
                weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                foreach=group["foreach"], capturable=group["capturable"], differentiable=group["differentiable"],
                fused=group["fused"], grad_scale=getattr(self, "grad_scale", None),
                found_inf=getattr(self, "found_inf", None), decoupled_weight_decay=group["decoupled_weight_decay"],
            )
        return loss

    def _init_group(self, group, params, grads, *rest):  # type: ignore[override]
        has_complex = super()._init_group(group, params, grads, *rest)
        if not group.get("fused"):
            return has_complex
        # the per-parameter lists torch filled: exp_avgs, exp_avg_sqs (and max_exp_avg_sqs with amsgrad) hold a
        # tensor of the parameter's shape per entry; state_steps (scalars) and the amsgrad flag are left alone
        lists = [grads, *(x for x in rest if isinstance(x, list) and len(x) == len(params))]
        for i, p in enumerate(params):
            mine = [lst for lst in lists if lst[i].shape == p.shape and lst[i].dim() > 0]
            for lst in mine:
                if lst[i].stride() != p.stride():
                    lst[i] = self._in_layout_of(p, lst[i])
            if not p.is_contiguous() and p.dim() >= 2 and dense_order(p) is not None:
                params[i] = flat_view(p)
                for lst in mine:
                    lst[i] = flat_view(lst[i])
        return has_complex

    def _in_layout_of(self, p: Tensor, t: Tensor) -> Tensor:
        """``t`` copied into ``p``'s memory layout, replacing it in ``p``'s state if it is a moment. The fused kernel
        walks the four tensors' memory in step, so a moment in another layout (a state restored from a checkpoint
        of another layout) would be paired with the wrong elements: torch gives silently wrong updates then."""
        new = torch.empty_like(p, dtype=t.dtype).copy_(t)
        state = self.state[p]
        for key, value in state.items():
            if value is t:
                state[key] = new
        return new
