"""Members stepped as one stack (``gsae.sae.stacked``) against each member alone: the same selection, reconstruction,
pre-activations and parameter gradients as every SAE's own forward — checked against dense autograd (the
``sparse_backward=False`` TopK path), so neither the stacked backward nor the members' sparse one is its own
reference — for mixed TopK / g-SAE stacks with several ``k``, different ``β``, ReLU, the dense (autocast) products,
both latent orders; and how members are grouped."""

from __future__ import annotations

import copy

import pytest
import torch

import gsae.sae.stacked as stacked_mod
from gsae.sae import GradTopKSAE, ReLUSAE, TopKSAE
from gsae.sae.stacked import StackPlan, stack_key, stacked_forward, stacks
from tests.conftest import randomize

D_IN = 12


def _members(d_sae: int = 96, relu: bool = False) -> list[TopKSAE]:
    """TopK and g-SAEs of one shape: k 3, 5, 5, 8, 3 (runs of equal k after ordering), β 1e2 and 5e2, AuxK on one."""
    saes = [
        TopKSAE(D_IN, d_sae, k=5, relu_after_topk=relu, k_aux=0, seed=1),
        GradTopKSAE(D_IN, d_sae, k=3, beta=1e2, relu_after_topk=relu, k_aux=0, seed=2),
        TopKSAE(D_IN, d_sae, k=3, relu_after_topk=relu, k_aux=4, seed=3),
        GradTopKSAE(D_IN, d_sae, k=5, beta=5e2, relu_after_topk=relu, k_aux=0, seed=4),
        TopKSAE(D_IN, d_sae, k=8, relu_after_topk=relu, k_aux=0, seed=5),
    ]
    return [randomize(s, seed=i) for i, s in enumerate(saes)]


def _dense_copy(sae: TopKSAE) -> TopKSAE:
    """The same SAE on dense autograd (``sparse_backward=False``): the independent reference."""
    ref = copy.deepcopy(sae)
    ref.sparse_backward = False
    return ref


def _reference(saes, x, grad, weights):
    """Each member alone on dense autograd: ``(outputs, {member: {param: grad}})`` of ``Σ_i w_i·‖(x̂_i − x)·v‖²``."""
    outs, grads = [], []
    for sae, w in zip(saes, weights):
        ref = _dense_copy(sae)
        out = ref(x, grad=grad)
        ((out.x_hat - x).pow(2) * w).sum().backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in ref.named_parameters()})
    return outs, grads


def _stacked(saes, x, grad, weights):
    order = stacks(saes, x.shape[0])
    assert len(order) == 1
    plan = StackPlan([saes[i] for i in order[0]])
    x_hat, pre = stacked_forward(plan, x, grad)
    w = torch.stack([weights[i] for i in order[0]]).unsqueeze(1)  # (N, 1, d_in)
    ((x_hat - x).pow(2) * w).sum().backward()
    return order[0], plan, x_hat, pre


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("grouped", [False, True], ids=["topk-per-run", "topk-per-block"])
def test_a_stack_equals_each_member_alone(relu: bool, dense: bool, grouped: bool, monkeypatch) -> None:
    if dense:  # the products CUDA autocast takes (batched dense matmuls), here in float32 on the CPU
        monkeypatch.setattr(stacked_mod, "autocast_dense_dtype", lambda t: torch.float32)
    # a GPU's selection: one top-k of the largest k per block of equally scored rows (g-SAEs, TopK SAEs), each member
    # then its best k of those; else one top-k per run of equal k
    monkeypatch.setattr(stacked_mod, "GROUPED_TOPK_DEVICES", {"cpu"} if grouped else set())
    calls = []
    real_topk = stacked_mod.topk_indices
    monkeypatch.setattr(stacked_mod, "topk_indices", lambda s, k: calls.append(k) or real_topk(s, k))
    saes = _members(relu=relu)
    with torch.no_grad():  # one member whose kept pre-activations are mostly negative: ReLU zeroes them
        saes[4].b_enc.sub_(3)
    x = torch.randn(40, D_IN) * 2
    grad = torch.randn(40, D_IN) * 1e-2
    weights = [torch.rand(D_IN) + 0.5 for _ in saes]  # a per-element weight per member: index bugs show
    ref_outs, ref_grads = _reference(saes, x, grad, weights)
    order, plan, x_hat, pre = _stacked(saes, x, grad, weights)
    # the g-SAEs first (their scores and decoders are views of the stack's first rows), each part ordered by k
    assert [(type(saes[i]).__name__, saes[i].k) for i in order] == [
        ("GradTopKSAE", 3), ("GradTopKSAE", 5), ("TopKSAE", 3), ("TopKSAE", 5), ("TopKSAE", 8)]
    assert plan.n_grad == 2 and plan.runs == [(3, 0, 1), (5, 1, 2), (3, 2, 3), (5, 3, 4), (8, 4, 5)]
    assert calls == ([8, 8] if grouped else [3, 5, 3, 5, 8])
    for row, i in enumerate(order):
        ref = ref_outs[i]
        top_acts, top_idx = plan.top[row]
        assert [set(r.tolist()) for r in top_idx] == [set(r.tolist()) for r in ref.top_idx], f"member {i} selection"
        got = torch.zeros(x.shape[0], saes[i].d_sae).scatter_(1, top_idx, top_acts)
        want = torch.zeros_like(got).scatter_(1, ref.top_idx, ref.top_acts.detach())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x_hat[row].detach(), ref.x_hat.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pre[row], ref.pre_acts, rtol=1e-5, atol=1e-5)
        for name, p in saes[i].named_parameters():
            assert p.grad is not None and p.grad.shape == p.shape and p.grad.stride() == p.stride(), name
            torch.testing.assert_close(p.grad, ref_grads[i][name], rtol=1e-4, atol=1e-5, msg=f"member {i} {name}")
    assert not pre.requires_grad
    l0 = plan.l0_per_token(x.shape[0])  # the logging step's per-row counts of nonzero kept values
    assert torch.equal(l0, torch.stack([(a != 0).sum(-1) for a, _ in plan.top]).to(l0.dtype))
    if relu:  # ReLU zeroed some kept values: their latents get no encoder gradient
        assert any((a == 0).any() for a, _ in plan.top)


@pytest.mark.parametrize("grouped", [False, True], ids=["topk-per-run", "topk-per-block"])
def test_the_g_sae_scores_select_and_topk_members_ignore_the_gradient(grouped: bool, monkeypatch) -> None:
    """With a large β the g-SAE's selection follows |W_dec g| (differs from its TopK selection); TopK members'
    selection is the same with or without a gradient (without one, every row is scored by ``pre``: one block)."""
    monkeypatch.setattr(stacked_mod, "GROUPED_TOPK_DEVICES", {"cpu"} if grouped else set())
    saes = _members()
    x, grad = torch.randn(30, D_IN), torch.randn(30, D_IN)
    plan = StackPlan([saes[i] for i in stacks(saes, 30)[0]])
    stacked_forward(plan, x, grad)
    with_grad = [ix.clone() for _, ix in plan.top]
    stacked_forward(plan, x, None)
    without = [ix for _, ix in plan.top]
    for sae, a, b in zip(plan.saes, with_grad, without):
        same = [set(r.tolist()) for r in a] == [set(r.tolist()) for r in b]
        assert same == (not isinstance(sae, GradTopKSAE)), type(sae).__name__


def test_both_latent_orders_give_the_same_gradients(monkeypatch) -> None:
    """The CPU's per-member radix sort (d_sae ≤ 2**16) and the one stable sort over all stacked latents."""
    saes = _members(d_sae=64)
    x, grad = torch.randn(25, D_IN), torch.randn(25, D_IN) * 1e-2
    weights = [torch.ones(D_IN) for _ in saes]
    _stacked(saes, x, grad, weights)
    radix = [[p.grad.clone() for p in s.parameters()] for s in saes]
    for s in saes:
        s.zero_grad(set_to_none=True)
    monkeypatch.setattr(stacked_mod, "RADIX_SORT_DEVICES", set())  # the GPU's branch: one stable torch sort
    monkeypatch.setattr(stacked_mod.np, "argsort", None)  # (the numpy path would fail now: it is not taken)
    _stacked(saes, x, grad, weights)
    for s, want in zip(saes, radix):
        for p, w in zip(s.parameters(), want):
            torch.testing.assert_close(p.grad, w, rtol=1e-6, atol=1e-7)


def test_the_layout_follows_the_row_count() -> None:
    """Bag offsets and each entry's bag, built on the device, against a naive construction, as the row count changes
    from step to step (the special tokens a step drops) and back."""
    saes = _members()
    plan = StackPlan([saes[i] for i in stacks(saes, 10)[0]])
    for rows in (7, 12, 7, 1):
        offsets, bags, starts, latent_base = plan.layout(rows, torch.device("cpu"))
        want_offsets, want_bags, start = [], [], 0
        for i, k in enumerate(plan.ks):
            for b in range(rows):
                want_offsets.append(start)
                want_bags += [i * rows + b] * k
                start += k
        assert offsets.tolist() == want_offsets and bags.tolist() == want_bags
        assert starts.tolist() == [0, *torch.tensor(plan.ks).mul(rows).cumsum(0).tolist()]
        assert latent_base.flatten().tolist() == [i * plan.d_sae for i in range(plan.n)]


def test_members_are_grouped_by_shape_and_split_by_memory(monkeypatch) -> None:
    saes = [
        TopKSAE(D_IN, 64, k=4), GradTopKSAE(D_IN, 64, k=2), TopKSAE(D_IN, 32, k=4),  # d_sae 32: its own group
        TopKSAE(D_IN, 64, k=3, relu_after_topk=True),  # ReLU: its own group
        ReLUSAE(D_IN, 64),  # not a TopK: alone
        GradTopKSAE(D_IN, 64, k=1, sparse_backward=False),  # dense autograd: alone
        TopKSAE(D_IN, 64, k=1),
    ]
    assert stack_key(saes[4]) is None and stack_key(saes[5]) is None
    groups = stacks(saes, rows=10)
    assert sorted(map(sorted, groups)) == [[0, 1, 6], [2], [3], [4], [5]]
    assert [g for g in groups if len(g) == 3] == [[1, 6, 0]]  # the g-SAE, then the TopK SAEs by k: 1, 4
    plan = StackPlan([saes[i] for i in [1, 6, 0]])
    assert plan.n_grad == 1 and plan.runs == [(2, 0, 1), (1, 1, 2), (4, 2, 3)]
    with pytest.raises(ValueError, match="g-SAEs must come first"):
        StackPlan([saes[i] for i in [6, 1, 0]])
    # equal k after the g-SAEs: one run (one top-k) for both TopK SAEs
    same_k = [GradTopKSAE(D_IN, 64, k=2), GradTopKSAE(D_IN, 64, k=2, beta=0), TopKSAE(D_IN, 64, k=2)]
    assert StackPlan([same_k[i] for i in stacks(same_k, 10)[0]]).runs == [(2, 0, 1), (2, 1, 3)]  # β 0 scores by pre
    # at most STACK_BYTES of pre-activations per stack: 64 latents × 10 rows × 4 bytes = 2560 per member
    monkeypatch.setattr(stacked_mod, "STACK_BYTES", 2 * 2560)
    assert [g for g in stacks(saes, rows=10) if 0 in g or 1 in g or 6 in g] == [[1, 6], [0]]
    monkeypatch.setattr(stacked_mod, "STACK_BYTES", 100)
    assert all(len(g) == 1 for g in stacks(saes, rows=10))  # each member alone, never none


def test_a_stack_leaves_parameters_and_autograd_state_alone() -> None:
    """The pass reads the parameters (no in-place change), keeps nothing between calls but the layout cache, and a
    second backward through it is refused as any ``once_differentiable`` node's."""
    saes = _members()
    before = [[p.detach().clone() for p in s.parameters()] for s in saes]
    x = torch.randn(20, D_IN)
    plan = StackPlan([saes[i] for i in stacks(saes, 20)[0]])
    x_hat, _ = stacked_forward(plan, x, None)
    x_hat.sum().backward()
    for s, b in zip(saes, before):
        assert all(torch.equal(p, q) for p, q in zip(s.parameters(), b))
    # another row count: a fresh layout, the same per-row results for the shared rows
    x_hat2, _ = stacked_forward(plan, x[:7], None)
    torch.testing.assert_close(x_hat2.detach(), x_hat[:, :7].detach())


@pytest.mark.parametrize("per_sae", [False, True], ids=["one-pass", "cpu-per-sae"])
@pytest.mark.parametrize("as_views", [True, False])
def test_stacked_decoder_constraints_equal_each_members_own(as_views: bool, per_sae: bool, monkeypatch) -> None:
    """``remove_parallel_grads`` and ``normalize_decoders`` on a stack = each SAE's ``remove_parallel_grad`` and
    ``normalize_decoder``: with the gradients as the stacked backward leaves them (views of one buffer) and as
    separate tensors (autograd copied them: written back); in one pass over the stack (a GPU's) and each SAE's own
    (the CPU's)."""
    if not per_sae:
        monkeypatch.setattr(stacked_mod, "PER_SAE_CONSTRAINT_DEVICES", set())
    saes = _members()
    plan = StackPlan([saes[i] for i in stacks(saes, 20)[0]])
    x_hat, _ = stacked_forward(plan, torch.randn(20, D_IN), torch.randn(20, D_IN))
    (x_hat.pow(2) * torch.rand_like(x_hat)).sum().backward()
    grads = [s.W_dec.grad for s in plan.saes]
    assert stacked_mod.stacked_view(grads) is not None  # autograd kept the stacked backward's views
    if not as_views:
        for s in plan.saes:
            s.W_dec.grad = s.W_dec.grad.clone()
        assert stacked_mod.stacked_view([s.W_dec.grad for s in plan.saes]) is None
    alone = [copy.deepcopy(s) for s in plan.saes]
    for a, s in zip(alone, plan.saes):
        a.W_dec.grad = s.W_dec.grad.clone()
        a.remove_parallel_grad()
        with torch.no_grad():
            a.W_dec.add_(0.1 * a.W_dec.grad)
            a.normalize_decoder()
    stacked_mod.remove_parallel_grads(plan)
    with torch.no_grad():
        for s in plan.saes:
            s.W_dec.add_(0.1 * s.W_dec.grad)
    stacked_mod.normalize_decoders(plan)
    for a, s in zip(alone, plan.saes):
        torch.testing.assert_close(s.W_dec.grad, a.W_dec.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(s.W_dec, a.W_dec, rtol=1e-6, atol=1e-7)
        # the rows are unit-norm again
        torch.testing.assert_close(s.W_dec.norm(dim=1), torch.ones(s.d_sae))


def test_stacked_view_only_describes_equally_spaced_pieces_of_one_storage() -> None:
    buf = torch.randn(4 * 6, 3)
    pieces = list(buf.view(4, 6, 3).unbind(0))
    assert torch.equal(stacked_mod.stacked_view(pieces), buf.view(4, 6, 3))
    assert stacked_mod.stacked_view(pieces[::2]).shape == (2, 6, 3)  # spaced by two pieces: still one view
    assert torch.equal(stacked_mod.stacked_view(pieces[::2]), buf.view(4, 6, 3)[::2])
    assert stacked_mod.stacked_view([pieces[0], pieces[1], pieces[3]]) is None  # unequal spacing
    assert stacked_mod.stacked_view([p.clone() for p in pieces]) is None  # separate storages
    overlapping = [buf[i : i + 6] for i in range(3)]
    assert stacked_mod.stacked_view(overlapping) is None


@pytest.mark.parametrize("grouped", [False, True], ids=["topk-per-run", "topk-per-block"])
def test_steady_steps_copy_nothing_from_the_host(grouped: bool, monkeypatch) -> None:
    """On a GPU a copy from the host waits for the device. After the first step (which makes the per-device constants:
    each member's k, the latent offsets, the β), a stacked forward and backward — also at a new row count, as the
    special tokens a step drops change it — runs no op with a host tensor. Checked on the ``meta`` device, which
    runs the same ops without data, so a host tensor in any of them shows."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(stacked_mod, "GROUPED_TOPK_DEVICES", {"meta"} if grouped else set())
    saes = [s.to("meta") for s in _members()]
    plan = StackPlan([saes[i] for i in stacks(saes, 10)[0]])
    assert len(set(plan.betas)) > 1  # the β tensor path too

    class HostOps(TorchDispatchMode):
        found: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            tensors = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
            if any(t.device.type == "cpu" for t in tensors):
                self.found.append(str(func))
            return func(*args, **(kwargs or {}))

    def step(rows: int) -> None:
        x_hat, _ = stacked_forward(plan, torch.randn(rows, D_IN, device="meta"), torch.randn(rows, D_IN, device="meta"))
        x_hat.sum().backward()

    step(10)
    with HostOps() as spy:
        step(10)
        step(9)
    assert spy.found == []


def test_the_stack_holds_the_members_parameters_and_repacks_when_they_move() -> None:
    """After a stacked pass every member's parameters are views of the stack (same objects, same values, the layouts
    they had: ``W_enc`` transposed), so Adam's in-place steps and the constraints write the stack; a parameter whose
    data is replaced (``.to()``, a dtype change) is packed again by the next pass, with its new values."""
    from gsae.optim import Adam

    saes = _members()
    before = [{n: p.detach().clone() for n, p in s.named_parameters()} for s in saes]
    ids = [[id(p) for p in s.parameters()] for s in saes]
    strides = [[p.stride() for p in s.parameters()] for s in saes]
    plan = StackPlan([saes[i] for i in stacks(saes, 20)[0]])
    x = torch.randn(20, D_IN)
    stacked_forward(plan, x, None)
    W_encT, b_enc, W_dec, b_dec = plan.storage()
    for i, s in enumerate(plan.saes):
        assert s.W_enc.data_ptr() == W_encT[i].data_ptr() and s.W_dec.data_ptr() == W_dec[i].data_ptr()
        assert s.b_enc.data_ptr() == b_enc[i].data_ptr() and s.b_dec.data_ptr() == b_dec[i].data_ptr()
    for s, b, i, st in zip(saes, before, ids, strides):
        assert [id(p) for p in s.parameters()] == i and [p.stride() for p in s.parameters()] == st
        assert all(torch.equal(p, b[n]) for n, p in s.named_parameters())
    # Adam on the packed parameters = Adam on unpacked copies, bit for bit; the stack holds the new values
    twins = [copy.deepcopy(s) for s in plan.saes]
    assert all(t.W_dec.untyped_storage().nbytes() == t.W_dec.numel() * 4 for t in twins)  # a copy owns its data
    for s, t in zip(plan.saes, twins):
        for p, q in zip(s.parameters(), t.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
    for group in ([p for s in plan.saes for p in s.parameters()], [p for t in twins for p in t.parameters()]):
        Adam(group, lr=1e-2).step()
    for s, t in zip(plan.saes, twins):
        assert all(torch.equal(p, q) for p, q in zip(s.parameters(), t.parameters()))
    assert torch.equal(W_dec[0], plan.saes[0].W_dec)
    # a member moved off the stack (its data replaced) is packed again, with the values it has now
    moved = plan.saes[1]
    with torch.no_grad():
        moved.W_dec.data = moved.W_dec.data.clone().mul_(2)
    want = moved.W_dec.detach().clone()
    x_hat, _ = stacked_forward(plan, x, None)
    assert plan.storage()[2][1].data_ptr() == moved.W_dec.data_ptr() and torch.equal(moved.W_dec, want)
    ref = _dense_copy(moved)(x)
    torch.testing.assert_close(x_hat[1].detach(), ref.x_hat.detach(), rtol=1e-5, atol=1e-5)


def test_a_stack_of_gsaes_with_different_betas_selects_as_each_alone_under_float16_autocast():
    """``--trainer.precision 16-mixed`` on a GPU (where sweeps stack their members): the per-member β tensor was made
    in the autocast dtype, so β = 1e5 (> float16's 65504) was inf and the stacked member's selection was garbage (0%
    of rows agreeing with the member alone, against ~98%), with a finite loss and no word."""
    torch.manual_seed(0)
    x, g = torch.randn(256, 64), torch.randn(256, 64) * 1e-5
    saes = [GradTopKSAE(64, 512, k=8, beta=b, seed=i) for i, b in enumerate((1e5, 3e4))]
    for s in saes:
        s.b_enc.data.normal_(0, 0.1)
    plan = StackPlan(saes)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        stacked_forward(plan, x, g)
        alone = [s(x, grad=g).top_idx for s in saes]
    for (_, idx), ref in zip(plan.top, alone):
        same = (idx.sort(-1).values == ref.sort(-1).values).all(-1).float().mean()
        assert same > 0.95, f"the stacked selection agrees with the member alone on {float(same):.0%} of rows"


def test_a_stack_of_gsaes_selects_as_in_float32_under_float16_autocast_with_a_small_gradient():
    """``|W_dec g|`` of a CE gradient meaned over many tokens (~1e-9 here) is a float16 subnormal or 0: the stack's
    batched product scales the gradient's rows by powers of two (as each g-SAE alone does), so its members still
    select as in float32 (without it: 4% of rows), with one β or one per member."""
    torch.manual_seed(0)
    x, g = torch.randn(256, 64), torch.randn(256, 64) * 1e-9
    for betas in ((2e8, 6e8), (4e8, 4e8)):
        saes = [GradTopKSAE(64, 512, k=8, beta=b, seed=i) for i, b in enumerate(betas)]
        for s in saes:
            s.b_enc.data.normal_(0, 0.1)
        with torch.no_grad():
            ref = [s(x, grad=g).top_idx for s in saes]
            plain = [s(x).top_idx for s in saes]
        plan = StackPlan(saes)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
            stacked_forward(plan, x, g)
        for (_, idx), want, topk in zip(plan.top, ref, plain):
            same = (idx.sort(-1).values == want.sort(-1).values).all(-1).float().mean()
            moved = (topk.sort(-1).values != want.sort(-1).values).any(-1).float().mean()
            assert moved > 0.5 and same > 0.95, f"stacked float16 selection: {float(same):.0%} of rows as float32"


def test_members_with_and_without_unit_norm_decoders_are_not_stacked_together() -> None:
    """A stack's decoder constraints run for the whole stack (``remove_parallel_grads`` / ``normalize_decoders``, as
    its first member asks): a member with an unconstrained decoder (smol-sae's ``unit_norm_decoder: false``) stacked
    with constrained ones would have its rows renormalised every step. Members differing only in it form two stacks."""
    saes = [TopKSAE(D_IN, 64, k=4, seed=0), TopKSAE(D_IN, 64, k=4, unit_norm_decoder=False, seed=1),
            GradTopKSAE(D_IN, 64, k=2, unit_norm_decoder=False, seed=2), TopKSAE(D_IN, 64, k=2, seed=3)]
    groups = stacks(saes, rows=10)
    assert sorted(map(sorted, groups)) == [[0, 3], [1, 2]]
    for g in groups:
        assert len({saes[i].unit_norm_decoder for i in g}) == 1


def test_the_grouped_selection_follows_the_row_count(monkeypatch) -> None:
    """A GPU's grouped top-k (each member's best ``k`` of the ``k_max`` best, placed by :meth:`StackPlan.selection`)
    with the row count changing from step to step (the special tokens a step drops) and back: every step's selection
    and reconstruction equal each member's own forward."""
    monkeypatch.setattr(stacked_mod, "GROUPED_TOPK_DEVICES", {"cpu"})
    saes = _members()
    plan = StackPlan([saes[i] for i in stacks(saes, 16)[0]])
    gen = torch.Generator().manual_seed(6)
    for rows in (16, 9, 16, 3):
        x, grad = torch.randn(rows, D_IN, generator=gen), torch.randn(rows, D_IN, generator=gen) * 1e-2
        with torch.no_grad():
            x_hat, _ = stacked_forward(plan, x, grad)
            for row, sae in enumerate(plan.saes):
                ref = _dense_copy(sae)(x, grad=grad)
                top_acts, top_idx = plan.top[row]
                assert top_idx.shape == (rows, sae.k)
                assert [set(r.tolist()) for r in top_idx] == [set(r.tolist()) for r in ref.top_idx], (rows, row)
                torch.testing.assert_close(x_hat[row], ref.x_hat, rtol=1e-5, atol=1e-5)


def test_a_stack_past_16_bit_latent_ids_gives_each_members_gradients() -> None:
    """The CPU's per-member radix sort keys latents as uint16: past ``2**16`` latents the stack takes the torch sort;
    its gradients equal each member's own on dense autograd, with selected latents on both sides of 2**16."""
    d_sae, rows = 2**16 + 8, 6
    saes = [TopKSAE(4, d_sae, k=2, k_aux=0, seed=1), TopKSAE(4, d_sae, k=3, k_aux=0, seed=2)]
    for i, s in enumerate(saes):
        randomize(s, seed=i)
        with torch.no_grad():  # make the top latents sit on both sides of 2**16
            s.b_enc[-5:] += 50.0
            s.b_enc[:3] += 50.0
    x = torch.randn(rows, 4)
    weights = [torch.rand(4) + 0.5 for _ in saes]
    ref_outs, ref_grads = _reference(saes, x, None, weights)
    assert all((o.top_idx >= 2**16).any() and (o.top_idx < 2**16).any() for o in ref_outs)
    order, plan, x_hat, _ = _stacked(saes, x, None, weights)
    for row, i in enumerate(order):
        torch.testing.assert_close(x_hat[row].detach(), ref_outs[i].x_hat.detach(), rtol=1e-5, atol=1e-5)
        for name, p in saes[i].named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[i][name], rtol=1e-4, atol=1e-5, msg=f"member {i} {name}")
