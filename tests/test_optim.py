"""gsae.optim.Adam: torch's fused Adam on flat views of transposed parameters (no gradient copy), and moments
realigned to their parameter's layout (torch's fused kernel pairs elements by memory position)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from gsae.optim import Adam, dense_order, flat_view
from gsae.sae import TopKSAE
from tests.conftest import CallCounter


def _params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(48, 32, generator=gen).T,  # (32, 48), strides (1, 32): the W_enc layout
        torch.randn(24, 32, generator=gen),  # contiguous matrix
        torch.randn(32, generator=gen),  # vector
        torch.randn(4, 6, 5, generator=gen).permute(2, 0, 1),  # a 3-d permutation
    ]


def _grads(params, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen) * (1 + step) for p in params]  # by logical index, any layout


def _run(cls, params, steps: int = 5, **kw) -> list[torch.Tensor]:
    ps = [torch.nn.Parameter(p.clone()) for p in params]  # clone keeps each layout
    opt = cls(ps, lr=1e-2, **kw)
    for step in range(steps):
        for p, g in zip(ps, _grads(ps, step)):
            p.grad = torch.empty_like(p).copy_(g)  # in the parameter's layout, as autograd leaves it
        opt.step()
    return [p.detach() for p in ps]


@pytest.mark.parametrize("options", [{}, {"amsgrad": True}, {"weight_decay": 0.1}, {"maximize": True}])
def test_updates_equal_torch_fused_adam_on_contiguous_copies_bit_for_bit(options) -> None:
    params = _params()
    assert not params[0].is_contiguous() and not params[3].is_contiguous()
    ours = _run(Adam, params, **options)
    ref = _run(lambda ps, **kw: torch.optim.Adam(ps, fused=True, **kw), [p.contiguous() for p in params], **options)
    for a, b, p in zip(ours, ref, params):
        assert a.stride() == p.stride()  # the layout is kept
        assert torch.equal(a, b)
    # and torch's unfused loop agrees to rounding (the fused kernel orders its arithmetic differently)
    loop = _run(lambda ps, **kw: torch.optim.Adam(ps, foreach=False, **kw), params, **options)
    for a, b in zip(ours, loop):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_defaults_are_spec_adam_fused() -> None:
    """Without options: SPEC §1.3's Adam (lr 1e-4, betas (0.9, 0.999), eps 1e-8, no weight decay), fused: the same
    trajectory, bit for bit, as torch's fused Adam given those numbers explicitly."""
    params = _params()
    ours = [torch.nn.Parameter(p.clone()) for p in params]
    ref = [torch.nn.Parameter(p.contiguous().clone()) for p in params]
    opts = [Adam(ours), torch.optim.Adam(ref, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)]
    assert opts[0].defaults["fused"] is True
    for step in range(3):
        for ps, opt in zip((ours, ref), opts):
            for p, g in zip(ps, _grads(ps, step)):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    assert not torch.equal(ours[1], params[1])  # it moved


def test_step_copies_no_gradient() -> None:
    w = torch.nn.Parameter(torch.randn(2048, 512).T.clone())
    opt = Adam([w], lr=1e-3)
    w.grad = torch.randn(2048, 512).T.clone()
    opt.step()  # state created
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        opt.step()
    copies = [e for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")]
    assert not [e for e in copies if any(list(s) == [512, 2048] for s in e.input_shapes)]
    assert any(e.name == "aten::_fused_adam_" for e in prof.events()), "the fused kernel ran"


def test_moments_restored_in_another_layout_are_realigned() -> None:
    params = _params()[:1]
    ref = _run(lambda ps, **kw: torch.optim.Adam(ps, foreach=False, **kw), params, steps=3)

    p = torch.nn.Parameter(params[0].clone())
    opt = Adam([p], lr=1e-2)
    p.grad = torch.empty_like(p).copy_(_grads([p], 0)[0])
    opt.step()
    state = opt.state_dict()
    for key in ("exp_avg", "exp_avg_sq"):  # as a checkpoint written with the other layout would hold them
        state["state"][0][key] = state["state"][0][key].contiguous()
    opt.load_state_dict(state)
    assert opt.state[p]["exp_avg"].stride() != p.stride()
    for step in (1, 2):
        p.grad = torch.empty_like(p).copy_(_grads([p], step)[0])
        opt.step()
    torch.testing.assert_close(p.detach(), ref[0], rtol=1e-6, atol=1e-7)
    assert opt.state[p]["exp_avg"].stride() == p.stride() == opt.state[p]["exp_avg_sq"].stride()


def test_a_gradient_in_another_layout_is_used_elementwise() -> None:
    params = _params()[:1]
    ref = _run(lambda ps, **kw: torch.optim.Adam(ps, foreach=False, **kw), params, steps=2)
    p = torch.nn.Parameter(params[0].clone())
    opt = Adam([p], lr=1e-2)
    for step in range(2):
        p.grad = _grads([p], step)[0].contiguous()  # set by hand, not by autograd: contiguous, unlike p
        opt.step()
    torch.testing.assert_close(p.detach(), ref[0], rtol=1e-6, atol=1e-7)


def test_sae_training_equals_torch_adam() -> None:
    """The W_enc of every SAE is stored transposed: a few real TopK steps with either optimizer."""
    x = torch.randn(256, 16)
    result = {}
    for name, make in {"gsae": lambda ps: Adam(ps, lr=1e-2), "torch": lambda ps: torch.optim.Adam(ps, lr=1e-2)}.items():
        sae = TopKSAE(16, d_sae=64, k=4, seed=0)
        assert not sae.W_enc.is_contiguous()
        opt = make(sae.parameters())
        for _ in range(4):
            opt.zero_grad()
            out = sae(x)
            ((out.x_hat - x).pow(2).sum(-1).mean() + out.aux_loss).backward()
            opt.step()
        result[name] = dict(sae.named_parameters())
    torch.testing.assert_close(result["gsae"], result["torch"], rtol=1e-5, atol=1e-6)


def test_flat_view_helpers() -> None:
    t = torch.arange(24.0).reshape(2, 3, 4).permute(2, 0, 1)
    assert dense_order(t) == [1, 2, 0]
    assert torch.equal(flat_view(t), torch.arange(24.0))
    assert dense_order(torch.arange(24.0).reshape(4, 6)[:, ::2]) is None  # gaps


def test_a_state_saved_by_torch_adam_resumes() -> None:
    """Runs saved with torch.optim.Adam (the configs' optimizer before gsae.optim.Adam) resume with ours: same
    state keys, the step counter moved to the fused kernel's form, the same trajectory as continuing with torch's."""
    params = _params()
    first = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.Adam(first, lr=1e-2, foreach=False)
    for p, g in zip(first, _grads(first, 0)):
        p.grad = torch.empty_like(p).copy_(g)
    opt.step()
    saved = opt.state_dict()
    results = {}
    for name, cls in {"ours": Adam, "torch": lambda ps, lr: torch.optim.Adam(ps, lr=lr, foreach=False)}.items():
        ps = [torch.nn.Parameter(p.detach().clone()) for p in first]
        o = cls(ps, lr=1e-2)
        o.load_state_dict(copy.deepcopy(saved))  # state_dict() hands out the live tensors
        for step in (1, 2):
            for p, g in zip(ps, _grads(ps, step)):
                p.grad = torch.empty_like(p).copy_(g)
            o.step()
        results[name] = [p.detach() for p in ps]
    for a, b in zip(results["ours"], results["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _groups(params, lrs, extra=None) -> list[dict]:
    """A group per parameter-pair: ``lrs[i]`` and ``extra[i]`` options (a sweep: a group per member)."""
    extra = extra or [{}] * len(lrs)
    return [{"params": params[2 * i : 2 * i + 2], "lr": lr, **x} for i, (lr, x) in enumerate(zip(lrs, extra))]


@pytest.mark.parametrize(
    "lrs, extra, calls",
    [
        ([1e-2, 1e-2, 1e-2, 1e-2], None, 1),  # one schedule: one call for every group
        ([1e-2, 3e-3, 1e-2, 3e-3], None, 2),  # two learning rates: a call per rate
        # other options: calls of their own (the amsgrad group has no gradient: no call)
        ([1e-2] * 4, [{}, {"weight_decay": 0.1}, {"amsgrad": True}, {}], 2),
        ([1e-2] * 4, [{}, {"eps": 1e-1}, {}, {}], 2),  # eps, betas, maximize: each a call of its own
        ([1e-2] * 4, [{}, {"betas": (0.5, 0.9)}, {}, {}], 2),
        ([1e-2] * 4, [{}, {"maximize": True}, {}, {}], 2),
    ],
)
def test_groups_with_equal_options_step_in_one_call_and_update_as_torch_group_by_group(monkeypatch, lrs, extra, calls):
    """Groups stepped together get the updates torch's fused Adam gives them stepped one by one, bit for bit, each
    parameter with its own step count (the last group gets gradients from step 2 on: its own bias correction); the
    third group never gets a gradient (no state, no call)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(48, 32), (32,), (24, 16), (16,), (40, 8), (8,), (16, 16), (16,)]
    base = [torch.randn(s, generator=gen) for s in shapes]
    base[0] = base[0].T.contiguous().T  # the W_enc layout
    runs = []
    for cls in (Adam, lambda g: torch.optim.Adam(g, fused=True)):
        ps = [torch.nn.Parameter(p.clone()) for p in base]
        opt = cls(_groups(ps, lrs, extra))
        counter = CallCounter(monkeypatch, torch, "_fused_adam_") if cls is Adam else None  # the fused kernel
        for step in range(4):
            for i, (p, g) in enumerate(zip(ps, _grads(ps, step))):
                skip = (i >= 6 and step < 2) or i in (4, 5)
                p.grad = None if skip else torch.empty_like(p).copy_(g)
            opt.step()
        monkeypatch.undo()
        runs.append((ps, opt, counter))
    (ours, opt, counter), (ref, ref_opt, _) = runs
    assert counter.calls == 4 * calls  # per step (torch: one per group with gradients)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert torch.equal(a, b), i
        if opt.state[a]:
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(opt.state[a][key], ref_opt.state[b][key]), (i, key)
    assert int(opt.state[ours[6]]["step"]) == 2 and not opt.state[ours[4]]
