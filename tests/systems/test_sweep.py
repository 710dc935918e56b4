"""A sweep (``SweepSAESystem``: many SAEs from one LM pass) against its independent reference: every member trained
alone by ``LocalSAESystem`` on the same tokens — after n steps, after a stop and resume, and under 2-rank DDP."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import lightning.pytorch as pl
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gsae.cli import user_message
from gsae.export import load_checkpoint, load_members
from gsae.lm import LanguageModel
from gsae.optim import Adam
from gsae.sae import GradTopKSAE, TopKSAE
from gsae.sae.stacked import StackPlan
from gsae.systems import LocalSAESystem, SweepSAESystem
from tests.systems.helpers import (
    HOOK,
    RecordMetrics,
    RecordTokens,
    StopAt,
    assert_same_metrics,
    build_data,
    build_trainer,
)

STEPS, STOP = 8, 4
COMMON = dict(hook=HOOK, lr_warmup_steps=2, dead_tokens=200, buffer_size=128, grad_mean_tokens=60)
LR = 1e-2
#: Members that differ in everything a member may own: class, d_sae, k, β, init seed, lr, schedule, clipping.
MEMBERS = [
    {"name": "topk-k4", "sae": {"class_path": "gsae.sae.TopKSAE", "init_args": {"d_sae": 64, "k": 4, "k_aux": 8, "seed": 1}}},
    {"name": "topk-k2", "sae": {"class_path": "TopKSAE", "init_args": {"d_sae": 32, "k": 2, "k_aux": 0, "seed": 2}},
     "lr": 3e-3, "lr_schedule": "constant"},
    {"name": "gsae-k4", "sae": {"class_path": "gsae.sae.GradTopKSAE",
                                "init_args": {"d_sae": 64, "k": 4, "beta": 1e4, "k_aux": 8, "seed": 3}},
     "gradient_clip_val": 0.05, "lr_warmup_steps": 0},
    {"name": "gsae-k3", "sae": {"class_path": "GradTopKSAE", "init_args": {"d_sae": 48, "k": 3, "beta": 1e3, "seed": 4}},
     "lr_min_ratio": 0.5},
]
CLASSES = {"TopKSAE": TopKSAE, "GradTopKSAE": GradTopKSAE}


def _lm() -> LanguageModel:
    return LanguageModel("random-tiny", seed=0)


def _adam(lr: float):
    return lambda params: Adam(params, lr=lr)  # the default optimizer (fused, transposed W_enc as flat views)


def _sweep(members=MEMBERS, stack: bool | None = None) -> SweepSAESystem:
    return SweepSAESystem(_lm(), members, optimizer=_adam(LR), stack_members=stack, **COMMON)


def _alone(spec: dict, hook: str | None = None) -> LocalSAESystem:
    """The member as its own run: its SAE at its hook (or ``hook``), its lr / schedule options, the sweep's shared
    options."""
    cls = CLASSES[spec["sae"]["class_path"].rpartition(".")[2]]
    args = spec["sae"]["init_args"]
    kw = dict(COMMON, hook=hook or spec.get("hook", HOOK))
    for key in ("lr_warmup_steps", "lr_schedule", "lr_min_ratio"):
        if key in spec:
            kw[key] = spec[key]
    return LocalSAESystem(_lm(), lambda d: cls(d, **args), optimizer=_adam(spec.get("lr", LR)), **kw)


def _fit(system, root, steps=STEPS, callbacks=(), ckpt_path=None, devices=1, clip=0.5, checkpoint_every=None, **kw):
    torch.manual_seed(0)
    data = build_data(system, batch_size=4 // devices)
    kw.update(dict(devices=devices, strategy="ddp_fork") if devices > 1 else {})
    root.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(
        root, steps, callbacks=list(callbacks), checkpoint_every=checkpoint_every, gradient_clip_val=clip, **kw
    )
    trainer.fit(system, datamodule=data, ckpt_path=ckpt_path)
    return system


def _assert_member_equals(member, alone, atol=1e-6) -> None:
    for name, p in alone.sae.state_dict().items():
        q = member.sae.state_dict()[name]
        assert torch.allclose(p, q, atol=atol, rtol=0), f"{member.name}.{name} differs by {(p - q).abs().max():.2e}"
    assert torch.equal(alone.dead.batches_since_fired, member.dead.batches_since_fired), member.name
    assert torch.equal(alone.dead.tokens_since_fired, member.dead.tokens_since_fired), member.name


@pytest.mark.slow
@pytest.mark.parametrize("stack", [None, True], ids=["default", "stacked"])
def test_every_member_equals_the_sae_trained_alone(tmp_path, stack):
    """On the CPU the default steps members one by one; ``stack_members: true`` (a GPU's default) steps topk-k4 and
    gsae-k4, one shape, as one stack (``gsae.sae.stacked``)."""
    sweep = _fit(_sweep(stack=stack), tmp_path / "sweep")
    assert sum(isinstance(u, StackPlan) for u in sweep.member_stacks(0)) == (1 if stack else 0)
    for spec in MEMBERS:
        alone = _fit(_alone(spec), tmp_path / spec["name"], clip=spec.get("gradient_clip_val", 0.5))
        _assert_member_equals(sweep.members[spec["name"]], alone)
        assert int(alone.tokens_seen) == int(sweep.tokens_seen)
        if spec["name"].startswith("gsae"):  # the one harvest took ∇ₓL at the scale each g-SAE alone would
            assert float(sweep.members[spec["name"]].sae.grad_normaliser) == float(alone.sae.grad_normaliser) == 60
    # the per-member clip is real: the g-SAE member's clip (0.05) binds; clipping it at the trainer's 0.5 differs
    loose = _fit(_alone(MEMBERS[2]), tmp_path / "loose", clip=0.5)
    assert not torch.allclose(loose.sae.W_enc, sweep.members["gsae-k4"].sae.W_enc, atol=1e-4)
    # and the members' schedules are their own: lr of the constant-schedule member stays at its peak
    groups = sweep.trainer.optimizers[0].param_groups
    assert groups[1]["lr"] == pytest.approx(3e-3) and groups[0]["lr"] < LR


def test_a_resume_with_other_optimizer_options_applies_adams_and_says_what_it_keeps(tmp_path, caplog):
    """Lightning restores every group option from the checkpoint: a member's betas and weight_decay changed for the
    resume were dropped without a word (audit D). Adam's hyperparameters now take the configured values from the
    resumed step on, each said in one line; amsgrad, which Adam's state is built for, keeps the checkpoint's, said."""
    _fit(_sweep(), tmp_path, callbacks=[StopAt(STOP)], checkpoint_every=STOP)
    ckpt = str(tmp_path / "ckpts" / "last.ckpt")
    opts = {"betas": [0.5, 0.9], "weight_decay": 0.1, "amsgrad": True}
    changed = [dict(m, optimizer=opts) if m["name"] == "topk-k2" else m for m in MEMBERS]
    with caplog.at_level("WARNING", logger="gsae.systems.base"):
        resumed = _fit(_sweep(changed), tmp_path / "new", ckpt_path=ckpt, steps=STOP + 1)
    groups = resumed.trainer.optimizers[0].param_groups
    i = [m["name"] for m in MEMBERS].index("topk-k2")
    assert groups[i]["betas"] == (0.5, 0.9) and groups[i]["weight_decay"] == 0.1 and groups[i]["amsgrad"] is False
    assert all(g["betas"] == (0.9, 0.999) and g["weight_decay"] == 0 for j, g in enumerate(groups) if j != i)
    said = [r.getMessage() for r in caplog.records if "member topk-k2's optimizer" in r.getMessage()]
    assert said == [f"--ckpt_path: member topk-k2's optimizer betas (0.5, 0.9) replaces the checkpoint's (0.9, 0.999) "
                    f"from step {STOP} on",
                    f"--ckpt_path: member topk-k2's optimizer weight_decay 0.1 replaces the checkpoint's 0.0 from step {STOP} on",
                    "--ckpt_path: member topk-k2's optimizer amsgrad True is not applied on resume: the checkpoint's "
                    "False stays (its optimizer state was built for it)"], said


@pytest.mark.slow
def test_stop_and_resume_equals_uninterrupted(tmp_path):
    full = _fit(_sweep(stack=True), tmp_path / "a", callbacks=[RecordTokens(tmp_path)])
    (tmp_path / "b").mkdir()
    _fit(_sweep(stack=True), tmp_path / "b", callbacks=[StopAt(STOP)], checkpoint_every=STOP)
    ckpt = tmp_path / "b" / "ckpts" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert list(saved["gsae"]["members"]) == [m["name"] for m in MEMBERS]
    assert len(saved["optimizer_states"][0]["param_groups"]) == len(MEMBERS)
    resumed = _fit(_sweep(stack=True), tmp_path / "b", ckpt_path=str(ckpt), checkpoint_every=STOP)
    assert resumed.global_step == STEPS
    for name in full.members:
        _assert_member_equals(resumed.members[name], full.members[name])
    assert torch.equal(full.buffer.x, resumed.buffer.x) and torch.equal(full.buffer.grad, resumed.buffer.grad)


def test_a_resume_with_another_learning_rate_applies_it_to_that_member(tmp_path, caplog):
    """Lightning restores the optimizer's param groups, learning rates included: a member's lr changed for the resume
    was silently ignored (an audit found it bit-identical to the unchanged resume), then only warned about. Now it
    applies from the resumed step on: that member's first resumed Adam step is the unchanged resume's scaled by the
    ratio of the learning rates (same gradient, same moments), and the other members' are bit for bit the same. One
    changed member is past its warm-up on a constant schedule, the other on the cosine (its first resumed lr is the
    new peak times the schedule's factor at the resumed step, not the step before)."""
    _fit(_sweep(), tmp_path, callbacks=[StopAt(STOP)], checkpoint_every=STOP)
    ckpt = str(tmp_path / "ckpts" / "last.ckpt")
    before = {k: v for k, v in torch.load(ckpt, weights_only=False)["state_dict"].items() if k.startswith("members.")}
    new_lr = {"topk-k2": 0.5, "gsae-k3": 0.02}
    changed = [dict(m, lr=new_lr[m["name"]]) if m["name"] in new_lr else m for m in MEMBERS]
    with caplog.at_level("WARNING", logger="gsae.systems.base"):
        resumed = _fit(_sweep(changed), tmp_path / "new", ckpt_path=ckpt, callbacks=[StopAt(STOP + 1)])  # the schedule of 8
    assert f"member topk-k2's lr 0.5 replaces the checkpoint's 0.003 from step {STOP} on" in caplog.text, caplog.text
    assert f"member gsae-k3's lr 0.02 replaces the checkpoint's 0.01 from step {STOP} on" in caplog.text, caplog.text
    assert caplog.text.count("replaces the checkpoint's") == 2  # the other members' lr are unchanged
    assert resumed.trainer.optimizers[0].param_groups[1]["initial_lr"] == pytest.approx(0.5)
    caplog.clear()
    with caplog.at_level("WARNING", logger="gsae.systems.base"):
        same = _fit(_sweep(), tmp_path / "again", ckpt_path=ckpt, callbacks=[StopAt(STOP + 1)])
    assert "replaces the checkpoint's" not in caplog.text
    for name in (m["name"] for m in MEMBERS):
        a, b = resumed.members[name].sae, same.members[name].sae
        if name not in new_lr:
            _assert_member_equals(resumed.members[name], same.members[name])
            continue
        key = f"members.{name}.sae.W_enc"  # not the decoder: renormalised after the step
        delta_new = a.W_enc.detach() - before[key]
        delta_old = b.W_enc.detach() - before[key]
        ratio = new_lr[name] / (3e-3 if name == "topk-k2" else LR)
        torch.testing.assert_close(delta_new, delta_old * ratio, rtol=1e-3, atol=1e-6 * ratio)
        assert delta_old.abs().max() > 0


@pytest.mark.slow
def test_ddp_two_ranks_equal_single_process(tmp_path):
    """2 gloo ranks × B/2 = 1 rank × B for every member (no shuffle buffer: each rank mixes its own rows); the ranks
    step the two members (one shape) as one stack, the single process one by one."""
    members = MEMBERS[::2]
    kw = dict(COMMON, buffer_size=0)
    logged = dict(log_every_n_steps=1, limit_val_batches=1.0, val_check_interval=3)  # every step, validation twice
    single = _fit(SweepSAESystem(_lm(), members, optimizer=_adam(LR), stack_members=False, **kw), tmp_path / "d1",
                  callbacks=[RecordMetrics(tmp_path / "d1")], **logged)
    ddp = _fit(SweepSAESystem(_lm(), members, optimizer=_adam(LR), stack_members=True, **kw), tmp_path / "d2",
               devices=2, callbacks=[RecordMetrics(tmp_path / "d2")], **logged)
    for name in single.members:
        _assert_member_equals(ddp.members[name], single.members[name], atol=2e-5)
    assert int(single.tokens_seen) == int(ddp.tokens_seen)
    # logged: the run's and every member's loss and recon_loss (they were rank 0's shares: halved), metrics, val
    one, two = torch.load(tmp_path / "d1" / "metrics.pt"), torch.load(tmp_path / "d2" / "metrics.pt")
    tags = set().union(*one.values())
    assert {"train/loss", *(f"train/{n}/{k}" for n in single.members for k in ("loss", "recon_loss", "nmse"))} <= tags
    assert assert_same_metrics(one, two, skip=("tokens_per_s",)) > 10 * len(one)


#: Members on four hooks of random-tiny: a TopK before the shallowest g-SAE hook (read on the no-grad prefix), two
#: g-SAEs on different hooks (one backward gives both gradients), a TopK after them and one on an MLP output.
HOOKED = [
    {"name": "topk-pre0", "hook": "blocks.0.hook_resid_mid",
     "sae": {"class_path": "TopKSAE", "init_args": {"d_sae": 48, "k": 3, "k_aux": 8, "seed": 5}}},
    {"name": "gsae-pre1", "sae": {"class_path": "GradTopKSAE", "init_args": {"d_sae": 64, "k": 4, "beta": 1e4, "seed": 6}}},
    {"name": "topk-pre1", "sae": {"class_path": "TopKSAE", "init_args": {"d_sae": 32, "k": 2, "seed": 7}}, "lr": 3e-3},
    {"name": "gsae-post1", "hook": "blocks.1.hook_resid_post",
     "sae": {"class_path": "GradTopKSAE", "init_args": {"d_sae": 48, "k": 4, "beta": 1e3, "k_aux": 8, "seed": 8}}},
    {"name": "topk-mlp1", "hook": "blocks.1.hook_mlp_out",
     "sae": {"class_path": "TopKSAE", "init_args": {"d_sae": 32, "k": 3, "seed": 9}}},
]


def test_members_on_several_hooks_share_one_harvest(tmp_path, monkeypatch):
    """One LM pass per batch for members on four hooks: the harvest is one forward and one backward (the gradient at
    both g-SAE hooks), each hook's columns equal the one-hook harvest there, and each member gets its hook's rows."""
    sweep = _sweep(HOOKED)
    assert sweep.hooks == ["blocks.0.hook_resid_mid", HOOK, "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"]
    assert sweep.grad_hooks == [HOOK, "blocks.1.hook_resid_post"]
    assert {m.hook for m in sweep.members.values()} == set(sweep.hooks)
    tokens = torch.randint(0, 256, (3, 16))
    tokens[:, 0] = 256
    lm = sweep.lm
    calls = {"grad": 0, "fwd": 0}
    real_grad, real_fwd = lm.activations_and_grads, lm.activations
    monkeypatch.setattr(lm, "activations_and_grads", lambda *a, **k: calls.__setitem__("grad", calls["grad"] + 1) or real_grad(*a, **k))
    monkeypatch.setattr(lm, "activations", lambda *a, **k: calls.__setitem__("fwd", calls["fwd"] + 1) or real_fwd(*a, **k))
    acts = sweep.harvest(tokens)
    assert calls == {"grad": 0, "fwd": 0}  # no per-hook harvest: one pass (activations_at + one autograd.grad)
    monkeypatch.undo()
    xs, gs = sweep.split_hooks(acts)
    assert list(gs) == sweep.grad_hooks
    for hook in sweep.hooks:
        needs_grad = hook in sweep.grad_hooks
        one = _alone(HOOKED[1] if needs_grad else HOOKED[0], hook)
        if needs_grad:
            one.sae.grad_normaliser.fill_(float(sweep.grad_saes()[0].grad_normaliser))
        ref = one.harvest(tokens)
        assert torch.allclose(xs[hook], ref.x, atol=1e-5, rtol=0), hook
        if needs_grad:
            assert torch.allclose(gs[hook], ref.grad, atol=1e-6 * float(ref.grad.abs().max()), rtol=0), hook
    # the TopK-only sweep takes no gradient at all
    topk_only = _sweep([HOOKED[0], HOOKED[2], HOOKED[4]])
    assert topk_only.grad_hooks == [] and topk_only.harvest(tokens).grad is None
    # two names of one residual point (blocks.0.hook_resid_post is blocks.1.hook_resid_pre), both read by g-SAEs
    alias = _sweep([HOOKED[1], dict(HOOKED[3], hook="blocks.0.hook_resid_post")])
    xs, gs = alias.split_hooks(alias.harvest(tokens))
    assert torch.equal(xs[HOOK], xs["blocks.0.hook_resid_post"]) and torch.equal(gs[HOOK], gs["blocks.0.hook_resid_post"])


@pytest.mark.slow
def test_members_on_several_hooks_equal_their_saes_trained_alone(tmp_path):
    sweep = _fit(_sweep(HOOKED), tmp_path / "sweep")
    for spec in HOOKED:
        alone = _fit(_alone(spec), tmp_path / spec["name"])
        _assert_member_equals(sweep.members[spec["name"]], alone, atol=2e-5)
        assert float(sweep.members[spec["name"]].act_scale) == pytest.approx(float(alone.act_scale), rel=1e-5)
    # a checkpoint describes each member at its hook; its evaluation and export read that hook
    meta = sweep.describe()["members"]
    assert {n: meta[n]["hook"] for n in meta} == {m.name: m.hook for m in sweep.members.values()}


@pytest.mark.slow
def test_several_hooks_resume_and_ddp(tmp_path):
    """Stop + resume = uninterrupted (the shuffle buffer holds every hook's columns), and 2 gloo ranks = 1 process."""
    full = _fit(_sweep(HOOKED), tmp_path / "a")
    (tmp_path / "b").mkdir()
    _fit(_sweep(HOOKED), tmp_path / "b", callbacks=[StopAt(STOP)], checkpoint_every=STOP)
    ckpt = tmp_path / "b" / "ckpts" / "last.ckpt"
    resumed = _fit(_sweep(HOOKED), tmp_path / "b", ckpt_path=str(ckpt), checkpoint_every=STOP)
    for name in full.members:
        _assert_member_equals(resumed.members[name], full.members[name])
    assert torch.equal(full.buffer.x, resumed.buffer.x) and torch.equal(full.buffer.grad, resumed.buffer.grad)
    # the sweep's own hook is only the members' default: with every member naming its hook it may change on resume
    named = [dict(m, hook=m.get("hook", HOOK)) for m in HOOKED]
    other_default = SweepSAESystem(_lm(), named, optimizer=_adam(LR), **dict(COMMON, hook="blocks.0.hook_resid_pre"))
    other_default.on_load_checkpoint(torch.load(ckpt, weights_only=False))
    moved = [dict(m, hook="blocks.1.hook_resid_post") if m["name"] == "topk-pre0" else m for m in HOOKED]
    with pytest.raises(ValueError, match="member topk-pre0 was trained at hook 'blocks.0.hook_resid_mid'"):
        _fit(_sweep(moved), tmp_path / "b", ckpt_path=str(ckpt), checkpoint_every=STOP)
    kw = dict(COMMON, buffer_size=0)
    single = _fit(SweepSAESystem(_lm(), HOOKED, optimizer=_adam(LR), **kw), tmp_path / "d1")
    ddp = _fit(SweepSAESystem(_lm(), HOOKED, optimizer=_adam(LR), **kw), tmp_path / "d2", devices=2)
    for name in single.members:
        _assert_member_equals(ddp.members[name], single.members[name], atol=2e-5)


def test_member_options_are_checked_with_one_line_errors():
    ok = MEMBERS[0]
    cases = {
        "is used twice": [ok, ok],
        "unknown keys ['k']": [dict(ok, k=3)],
        "no SAE class 'gsae.sae.Nope'": [{"name": "x", "sae": {"class_path": "gsae.sae.Nope"}}],
        "use letters, digits": [dict(ok, name="a.b")],
        "the run's own TensorBoard tags use it (eval/seconds/…)": [dict(ok, name="seconds")],
        "sae is required": [{"name": "x"}],
        "non-empty list": [],
        "lr_schedule must be": [dict(ok, lr_schedule="linear")],
        "init_args": [{"name": "x", "sae": {"class_path": "TopKSAE", "init_args": {"kk": 3}}}],
        "unknown hook 'blocks.9.hook_resid_pre'": [dict(ok, hook="blocks.9.hook_resid_pre")],
        "every hook must be on the residual stream": [ok, dict(ok, name="z", hook="blocks.0.attn.hook_z")],
        # the options a member sets are checked as the sweep's own are (they bypass the optimizer's own checks)
        "[0].sae.init_args.k must be <= d_sae (got 800 > 64)": [
            dict(ok, sae={"class_path": "TopKSAE", "init_args": {"d_sae": 64, "k": 800}})],
        "[0].lr must be > 0 (got -1)": [dict(ok, lr=-1)],
        "[0].lr: expected a number, got 'fast'": [dict(ok, lr="fast")],
        "[0].lr_min_ratio must be in [0, 1] (got 5)": [dict(ok, lr_min_ratio=5)],
        "[0].lr_warmup_steps must be >= 0 (got -3)": [dict(ok, lr_warmup_steps=-3)],
        "[0].lr_warmup_steps: expected an integer, got 2.5": [dict(ok, lr_warmup_steps=2.5)],
        "[0].gradient_clip_val must be >= 0": [dict(ok, gradient_clip_val=-1.0)],
        "[0].optimizer must be a mapping": [dict(ok, optimizer=[0.9, 0.99])],
        "give the member's learning rate as --model.members[0].lr": [dict(ok, optimizer={"lr": 1e-3})],
        # torch keeps any key in a group: a typo trained a plain Adam (audit D)
        "[0].optimizer.betaz: not a group option of Adam": [dict(ok, optimizer={"betaz": [0.9, 0.99]})],
        "[0].optimizer.class_path: not a group option of Adam": [dict(ok, optimizer={"class_path": "torch.optim.SGD"})],
        # the SAE's options are typed as a one-SAE run's are (k: 8.5 trained until the first top-k raised mid-run)
        "[0].sae.init_args.k: expected an integer, got 8.5": [
            dict(ok, sae={"class_path": "TopKSAE", "init_args": {"d_sae": 64, "k": 8.5}})],
        "[0].sae.init_args.seed: expected an integer, got 1.5": [
            dict(ok, sae={"class_path": "TopKSAE", "init_args": {"d_sae": 64, "k": 4, "seed": 1.5}})],
        "[0].sae.init_args.kk: not an option of TopKSAE": [
            dict(ok, sae={"class_path": "TopKSAE", "init_args": {"d_sae": 64, "k": 4, "kk": 1}})],
    }
    for message, members in cases.items():
        with pytest.raises(ValueError, match="--model.members") as e:
            SweepSAESystem(_lm(), members, **COMMON)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
        # what train.py prints: this message, not the SAE's own one it re-words (--model.sae.k must be ...)
        assert user_message(e.value) == str(e.value)
    # without a sweep-level hook (members may name theirs), a member that is not a mapping is still one line
    with pytest.raises(ValueError, match=r"--model.members\[0\] must be a mapping with name and sae"):
        SweepSAESystem(_lm(), ["x"], **{k: v for k, v in COMMON.items() if k != "hook"})


def test_member_optimizer_options_from_yaml_lists_are_used_and_checked():
    """A member's ``optimizer: {betas: [0.9, 0.99]}`` (YAML gives a list) is its group's betas, and steps (the fused
    Adam groups equal options by hashing them: a list crashed it); values torch takes unchecked in a group are refused
    in one line naming the member."""
    a, b = MEMBERS[0], {**MEMBERS[1], "optimizer": {"betas": [0.9, 0.99], "eps": 1e-6}}
    system = SweepSAESystem(_lm(), [a, b], optimizer=_adam(LR), **COMMON)
    opt = system.configure_optimizers()["optimizer"]
    assert [g["betas"] for g in opt.param_groups] == [(0.9, 0.999), (0.9, 0.99)]
    assert [g["eps"] for g in opt.param_groups] == [1e-8, 1e-6]
    for p in system.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    opt.step()
    assert opt.state[b_param := next(system.members[b["name"]].sae.parameters())]["step"] == 1, b_param.shape
    for bad, message in [({"betas": [2.0, 0.9]}, "[1].betas must be two numbers in [0, 1) (got [2.0, 0.9])"),
                         ({"eps": -1.0}, "[1].eps must be >= 0 (got -1.0)"),
                         ({"weight_decay": -0.1}, "[1].weight_decay must be >= 0")]:
        system = SweepSAESystem(_lm(), [a, {**b, "optimizer": bad}], optimizer=_adam(LR), **COMMON)
        with pytest.raises(ValueError, match=r"^--model\.members") as e:
            system.configure_optimizers()
        assert message in str(e.value), str(e.value)
    with pytest.raises(ValueError, match=r"^--model\.optimizer\.lr must be > 0 \(got 0"):  # the sweep's own lr 0
        SweepSAESystem(_lm(), [a], optimizer=_adam(0.0), **COMMON).configure_optimizers()


def _quick_args(config: str, steps: int, root) -> list[str]:
    """train.py's arguments for ``steps`` steps of a quickstart sweep config, one checkpoint and loss_added only."""
    n = str(steps)
    return [
        "--config", f"configs/quickstart/{config}.yaml", "--trainer.max_steps", n, "--checkpoint.every_n_train_steps", n,
        "--trainer.val_check_interval", n, "--trainer.default_root_dir", str(root),
        "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "2", "--evaluation.benchmarks", "[loss_added]",
        "--evaluation.n_seqs", "8",
    ]


@pytest.mark.slow
def test_cli_sweep_writes_every_members_export_evaluation_and_tensorboard(tmp_path, capsys):
    """The quickstart sweep through train.py: each member gets its SAELens export (loadable by SAELens, equal to the
    checkpoint's member), evaluation JSON, TensorBoard namespace and summary line; evaluate.py evaluates them all."""
    from sae_lens import SAE

    from gsae.cli import main
    from gsae.evaluate import main as evaluate_main

    assert main(_quick_args("sweep", 6, tmp_path)) == 0
    out = capsys.readouterr().out
    run = tmp_path / "quickstart-sweep"
    ckpt = run / "checkpoints" / "epoch=0-step=6.ckpt"
    names = ["topk-k8", "topk-k16", "gsae-k8", "gsae-k16"]
    members = load_members(ckpt)
    assert list(members) == names
    for name in names:
        assert any(line.strip().startswith(name) or f" {name} " in line for line in out.splitlines()), out
        sae, meta = load_checkpoint(ckpt, member=name)
        assert meta["member"] == name and meta["hook"] == "blocks.2.hook_resid_post"
        assert sae.k == int(name.rsplit("k", 1)[1])
        theirs = SAE.load_from_disk(str(ckpt.with_name(f"epoch=0-step=6.{name}.saelens")))
        assert torch.allclose(theirs.W_dec, sae.decoder_weight().detach(), atol=1e-6)
        assert torch.allclose(theirs.W_enc, sae.W_enc.detach(), atol=1e-6)
        payload = json.loads((run / "checkpoints" / f"epoch=0-step=6.ckpt.{name}.eval.json").read_text())
        assert payload["member"] == name and "loss_added" in payload["results"]
    # TensorBoard: each member a run of its own (version_0/<member>/), its tags without its name, so a chart per
    # metric holds every member's curve; its evaluation's figures there too
    version = run / "version_0"
    assert sorted(p.name for p in version.iterdir() if p.is_dir()) == sorted(names)
    size = {"scalars": 0, "images": 0, "tensors": 0}
    root = EventAccumulator(str(version), size_guidance=size).Reload().Tags()
    tags = set(root["scalars"])
    assert "train/tokens_seen" in tags and not [t for t in tags if any(f"/{n}" in t for n in names)], sorted(tags)
    assert not [t for t in root["images"] if any(f"/{n}/" in t for n in names)], root["images"]  # in their own runs only
    # the progress bar's headline (sum of losses, mean nmse, L0, dead) and the validation line's means are the
    # console's: as TensorBoard curves they would plot beside the members' curves of the same names
    assert not {"train/loss", "train/nmse", "train/l0", "train/dead_fraction", "val/nmse", "val/l0"} & tags
    ev = {n: EventAccumulator(str(version / n), size_guidance=size).Reload() for n in names}
    for name in names:
        found = ev[name].Tags()
        assert {"train/nmse", "train/l0", "train/dead_fraction", "val/nmse", "eval/loss_added/L_added", "lr"} <= set(
            found["scalars"]), (name, found["scalars"])
        assert found["images"] and all(t.startswith("eval/") and name not in t for t in found["images"]), found["images"]
    # the HPARAMS tab: a session per member with its settings (the optimizer's lr where the member sets none)
    from tests.test_loggers import _sessions

    sessions = _sessions(version)
    assert sorted(sessions) == sorted(names)
    for name in names:
        hp = sessions[name]
        assert hp["member"] == name and hp["k"] == int(name.rsplit("k", 1)[1]) and hp["hook"] == "blocks.2.hook_resid_post"
        assert hp["sae"] == ("GradTopKSAE" if name.startswith("gsae") else "TopKSAE") and hp["lr"] > 0
        assert hp["beta"] == (1e5 if name.startswith("gsae") else 0.0)  # TopK: the g-SAE at β = 0, one column
    # the validation line and the summary's val row: the mean over members
    val = {k: sum(ev[n].Scalars(f"val/{k}")[-1].value for n in names) / len(names) for k in ("nmse", "l0")}
    assert any(line.startswith("val ") and f"nmse {val['nmse']:.4f}" in line for line in out.splitlines()), out
    # the summary's train rows: each member's own numbers (the console's line is their mean: no member's), as logged
    rows = out.split("── run summary")[1].splitlines()
    for name in names:
        (row,) = [r for r in rows if r[13:].startswith(name + " ") and " nmse " in r]
        assert f"nmse {ev[name].Scalars('train/nmse')[-1].value:.4f}" in row and f"L0 {int(name.rsplit('k', 1)[1])}.0" in row
        assert ("β·attr" in row) == name.startswith("gsae"), row

    # evaluate.py maps the checkpoint, reading each member's weights only: it used to read the whole file (every
    # member and the optimizer state, ~4x the weights with Adam) once per member, 10 times for the Table 1 sweep
    reads, real_load = [], torch.load

    def spy(path, *a, **kw):
        if str(path).endswith(".ckpt"):
            reads.append((Path(path).name, kw.get("mmap")))
        return real_load(path, *a, **kw)

    with mock.patch.object(torch, "load", spy):
        assert evaluate_main([str(ckpt), "--benchmarks", "dead_latents", "--n-seqs", "8", "--output", str(tmp_path / "e.json")]) == 0
    assert reads and all(name == ckpt.name and mmapped for name, mmapped in reads), reads
    table = capsys.readouterr().out
    result = json.loads((tmp_path / "e.json").read_text())["results"]["dead_latents"]
    assert len(result) == 4 and all(any(k.endswith(f":{n}") for k in result) for n in names)
    assert all(n in table for n in names)


@pytest.mark.slow
def test_cli_layers_sweep_exports_evaluates_and_logs_each_member_at_its_hook(tmp_path, capsys, monkeypatch):
    """configs/quickstart/layers_sweep.yaml through train.py: each member's checkpoint section and SAELens export name
    its own hook, and its evaluation during training ran at that hook: evaluate.py, which reads each member's hook
    from the checkpoint (and a TopK member's from its export), gives the same loss_added. Both evaluations harvest
    each batch at the two hooks from one LM pass."""
    from gsae.cli import main
    from gsae.evals.common import SharedHarvests
    from gsae.evaluate import main as evaluate_main

    planned = []  # the hooks of every shared harvest (SharedHarvests.plan)
    real = SharedHarvests._harvest_planned
    monkeypatch.setattr(SharedHarvests, "_harvest_planned",
                        staticmethod(lambda lm, hooks, *a: planned.append(list(hooks)) or real(lm, hooks, *a)))
    both = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    assert main(_quick_args("layers_sweep", 4, tmp_path)) == 0
    assert planned and all(h == both for h in planned)
    planned.clear()
    run = tmp_path / "quickstart-layers-sweep"
    ckpt = run / "checkpoints" / "epoch=0-step=4.ckpt"
    hooks = {"topk-L1": "blocks.1.hook_resid_post", "gsae-L1": "blocks.1.hook_resid_post",
             "topk-L2": "blocks.2.hook_resid_post", "gsae-L2": "blocks.2.hook_resid_post"}
    payloads = {n: json.loads(ckpt.with_name(f"{ckpt.name}.{n}.eval.json").read_text()) for n in hooks}
    assert {n: p["hook"] for n, p in payloads.items()} == hooks
    trained = {n: p["results"]["loss_added"]["L_added"] for n, p in payloads.items()}
    assert trained["topk-L1"] != trained["topk-L2"]  # the layers' SAEs read different activations
    assert evaluate_main([str(ckpt), "--benchmarks", "loss_added", "--n-seqs", "8", "--output", str(tmp_path / "c.json")]) == 0
    assert planned and all(h == both for h in planned)
    capsys.readouterr()
    # --model naming a narrower LM without layer 2: one line naming the first member and the widths (the plan of the
    # members' hooks skips a hook that LM lacks: it is that member's own error, in evaluate.py's words)
    assert evaluate_main([str(ckpt), "--benchmarks", "loss_added", "--n-seqs", "2", "--model", "random-tiny"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: PATH '{ckpt}:topk-L1': the SAE reads 128-wide activations, random-tiny's "
                   "blocks.1.hook_resid_post is 64 wide"), err
    from_ckpt = json.loads((tmp_path / "c.json").read_text())["results"]["loss_added"]
    for name, hook in hooks.items():
        _, meta = load_checkpoint(ckpt, member=name)
        assert meta["hook"] == hook
        export = ckpt.with_name(f"epoch=0-step=4.{name}.saelens")
        assert json.loads((export / "cfg.json").read_text())["metadata"]["hook_name"] == hook
        (result,) = [v for k, v in from_ckpt.items() if k.endswith(f":{name}")]
        assert result["L_added"] == pytest.approx(trained[name], rel=1e-4, abs=1e-6), name
        if name.startswith("topk"):  # a g-SAE's export encodes as its β = 0 TopK (gsae.export), so TopK only
            out = tmp_path / f"{name}.json"
            assert evaluate_main([str(export), "--benchmarks", "loss_added", "--n-seqs", "8", "--output", str(out)]) == 0
            (alone,) = json.loads(out.read_text())["results"]["loss_added"].values()
            assert alone["L_added"] == pytest.approx(trained[name], rel=1e-4, abs=1e-6), name
    # one member alone (CKPT:MEMBER): a g-SAE, which its export cannot stand for; an unknown member is one line
    out = tmp_path / "one.json"
    assert evaluate_main([f"{ckpt}:gsae-L2", "--benchmarks", "loss_added", "--n-seqs", "8", "--output", str(out)]) == 0
    assert list(json.loads(out.read_text())["results"]["loss_added"]) == [f"{ckpt}:gsae-L2"]
    (one,) = json.loads(out.read_text())["results"]["loss_added"].values()
    assert one["L_added"] == pytest.approx(trained["gsae-L2"], rel=1e-4, abs=1e-6)
    capsys.readouterr()
    assert evaluate_main([f"{ckpt}:gsae-L9", "--benchmarks", "loss_added"]) == 1
    assert capsys.readouterr().err.strip() == (f"error: PATH '{ckpt}:gsae-L9': no member 'gsae-L9' in {ckpt}; its "
                                               "members are topk-L1, gsae-L1, topk-L2, gsae-L2")
    for n in hooks:  # each member's run
        tags = set(EventAccumulator(str(run / "version_0" / n), size_guidance={"scalars": 0}).Reload().Tags()["scalars"])
        assert {"train/nmse", "val/nmse", "eval/loss_added/L_added"} <= tags, (n, tags)


#: Members that stack (gsae.sae.stacked): one shape, TopK and g-SAEs, k 2 / 3 / 3 / 5 (three runs of equal k), β 1e3
#: and 1e4, AuxK on two (dead_tokens 200: latents die and AuxK trains within the run), their own lr and clipping; a
#: ReLU member and another width that run alone.
STACKING = [
    {"name": "t-k3", "sae": {"class_path": "TopKSAE", "init_args": {"d_sae": 64, "k": 3, "k_aux": 8, "seed": 11}}},
    {"name": "g-k2", "sae": {"class_path": "GradTopKSAE", "init_args": {"d_sae": 64, "k": 2, "beta": 1e3, "seed": 12}},
     "lr": 3e-3},
    {"name": "relu-k3", "sae": {"class_path": "TopKSAE", "init_args": {"d_sae": 64, "k": 3, "relu_after_topk": True,
                                                                       "seed": 13}}},
    {"name": "g-k3", "sae": {"class_path": "GradTopKSAE",
                             "init_args": {"d_sae": 64, "k": 3, "beta": 1e4, "k_aux": 8, "seed": 14}},
     "gradient_clip_val": 0.05},
    {"name": "t-k5", "sae": {"class_path": "TopKSAE", "init_args": {"d_sae": 64, "k": 5, "k_aux": 0, "seed": 15}}},
    {"name": "wide-k3", "sae": {"class_path": "TopKSAE", "init_args": {"d_sae": 96, "k": 3, "seed": 16}}},
]


class CountKernels(pl.Callback):
    """aten calls that launch a kernel on a GPU (not views), over training steps ``first`` … ``first + n − 1``."""

    def __init__(self, first: int = 3, n: int = 2) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        self.first, self.n, self.count = first, n, 0
        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not func.is_view and func.namespace == "aten":
                    outer.count += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.first:
            self.mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.first + self.n - 1:
            self.mode.__exit__(None, None, None)


@pytest.mark.slow
def test_stacked_members_equal_members_stepped_one_by_one(tmp_path, monkeypatch):
    """The default sweep steps the members that share a shape as one batched pass; the same run with
    ``stack_members: false`` steps each member on its own (the path the sweep-vs-alone tests above pin to the single
    runs). Both end with the same SAEs, dead-latent counters and logged metrics, and the stacked run launches far
    fewer ops per step (what a GPU's host time scales with). So does the stack with a GPU's selection (one top-k per
    block of equally scored rows, ``GROUPED_TOPK_DEVICES``)."""
    runs, counts = {}, {}
    for stack in (True, False):
        root = tmp_path / str(stack)
        system = SweepSAESystem(_lm(), STACKING, optimizer=_adam(LR), stack_members=stack, **COMMON)
        runs[stack] = _fit(system, root, callbacks=[RecordMetrics(root)], log_every_n_steps=1)
        counter = CountKernels()  # steps that do not log (most of a run's)
        system = SweepSAESystem(_lm(), STACKING, optimizer=_adam(LR), stack_members=stack, **COMMON)
        _fit(system, tmp_path / f"count-{stack}", callbacks=[counter], log_every_n_steps=50)
        counts[stack] = counter.count / counter.n
    units = runs[True].member_stacks(0)
    assert [[s.k for s in u.saes] for u in units if isinstance(u, StackPlan)] == [[2, 3, 3, 5]]
    assert sum(isinstance(u, StackPlan) for u in runs[False].member_stacks(0)) == 0
    for name in runs[True].members:
        _assert_member_equals(runs[True].members[name], runs[False].members[name], atol=1e-5)
    assert any(bool(m.dead.dead_by_tokens().any()) for m in runs[True].members.values())  # AuxK had dead latents
    one, two = torch.load(tmp_path / "True" / "metrics.pt"), torch.load(tmp_path / "False" / "metrics.pt")
    assert assert_same_metrics(one, two, skip=("tokens_per_s",), rtol=1e-4, atol=1e-5) > 10 * len(one)
    # ~40 launches per member stepped alone; the stack of 4 takes a few for all of them
    # ~40 launches per member stepped alone; each stacked member beyond the first saves most of its own (AuxK, the
    # dead-latent counters and the decoder constraints stay per member)
    assert counts[False] - counts[True] >= 15 * 3, counts
    import gsae.sae.stacked as stacked_mod

    monkeypatch.setattr(stacked_mod, "GROUPED_TOPK_DEVICES", {"cpu"})
    root = tmp_path / "grouped"
    system = SweepSAESystem(_lm(), STACKING, optimizer=_adam(LR), stack_members=True, **COMMON)
    grouped = _fit(system, root, callbacks=[RecordMetrics(root)], log_every_n_steps=1)
    for name in grouped.members:
        _assert_member_equals(grouped.members[name], runs[False].members[name], atol=1e-5)
    assert assert_same_metrics(torch.load(root / "metrics.pt"), two, skip=("tokens_per_s",), rtol=1e-4, atol=1e-5) > 0


def test_stacked_members_under_bf16_mixed(tmp_path, monkeypatch):
    """CPU autocast bf16 (``--trainer.precision bf16-mixed``): the stacked pass's encoder runs in bf16, its
    reconstruction, the members' parameters and gradients stay float32, and the members end near the stepped-alone
    run's (the bf16 matmuls differ in rounding: a near-tie may select another latent)."""
    import gsae.systems.sweep as sweep_mod

    seen, grads = set(), set()
    real = sweep_mod.stacked_forward

    def record(plan, x, grad):
        x_hat, pre = real(plan, x, grad)
        seen.add((x.dtype, pre.dtype, x_hat.dtype))
        return x_hat, pre

    class Grads(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            grads.update(p.grad.dtype for p in pl_module.parameters() if p.grad is not None)

    monkeypatch.setattr(sweep_mod, "stacked_forward", record)
    runs = {}
    for stack in (True, False):
        system = SweepSAESystem(_lm(), STACKING, optimizer=_adam(LR), stack_members=stack, **COMMON)
        runs[stack] = _fit(system, tmp_path / str(stack), steps=4, callbacks=[Grads()], precision="bf16-mixed")
    assert seen == {(torch.float32, torch.bfloat16, torch.float32)}, seen
    assert grads == {torch.float32}
    for name, m in runs[True].members.items():
        for k, p in m.sae.state_dict().items():
            assert p.dtype == torch.float32 and torch.isfinite(p).all(), (name, k)
            torch.testing.assert_close(p, runs[False].members[name].sae.state_dict()[k], atol=5e-2, rtol=0)


@pytest.mark.slow
def test_stacks_at_two_hooks_with_accumulation_and_validation(tmp_path):
    """Stacks at two hooks (members of one shape at each), a split stack (at most two members per stack), gradient
    accumulation over two micro-batches (the stacked backward's gradient views accumulate in place) and validation:
    the same SAEs and validation metrics as the members stepped one by one."""
    import gsae.sae.stacked as stacked_mod

    other = "blocks.1.hook_resid_post"
    members = [*STACKING[:2], *STACKING[3:5],
               *({**m, "name": m["name"] + "-L1", "hook": other} for m in (STACKING[0], STACKING[1], STACKING[4]))]
    runs = {}
    for stack in (True, False):
        system = SweepSAESystem(_lm(), members, optimizer=_adam(LR), stack_members=stack, **COMMON)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(stacked_mod, "STACK_BYTES", 2 * 64 * 64 * 4)  # two members of 64 latents at 64 rows per stack
            runs[stack] = _fit(system, tmp_path / str(stack), steps=6, accumulate_grad_batches=2,
                               limit_val_batches=2, val_check_interval=3, callbacks=[RecordMetrics(tmp_path / str(stack))],
                               log_every_n_steps=1)
    units = [[(s.k, type(s).__name__) for s in u.saes] for u in runs[True].member_stacks(0) if isinstance(u, StackPlan)]
    # hook 1's four: the g-SAEs, then the TopK SAEs; the other hook's three: two stacked, t-k5-L1 alone
    assert sorted(units) == [[(2, "GradTopKSAE"), (3, "GradTopKSAE")], [(2, "GradTopKSAE"), (3, "TopKSAE")],
                             [(3, "TopKSAE"), (5, "TopKSAE")]], units
    for name in runs[True].members:
        _assert_member_equals(runs[True].members[name], runs[False].members[name], atol=1e-5)
    one, two = torch.load(tmp_path / "True" / "metrics.pt"), torch.load(tmp_path / "False" / "metrics.pt")
    assert any(k.startswith("val/") for step in one.values() for k in step)
    assert assert_same_metrics(one, two, skip=("tokens_per_s",), rtol=1e-4, atol=1e-5) > 10 * len(one)


def test_members_all_on_one_hook_other_than_the_sweeps_read_their_own():
    """Every member on one hook that is not ``--model.hook`` (the quickstart sweep sets one): the one-hook harvest
    read ``--model.hook``'s rows while the checkpoint and export named the members' hook (exit 0, a wrong SAE); a hook
    of another width failed at the first step with a split_with_sizes error."""
    other = "blocks.0.hook_resid_pre"
    assert other != HOOK
    moved = SweepSAESystem(_lm(), [dict(MEMBERS[2], hook=other)], optimizer=_adam(LR), **COMMON)
    direct = SweepSAESystem(_lm(), [MEMBERS[2]], optimizer=_adam(LR), **dict(COMMON, hook=other))
    tokens = torch.randint(1, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    a, b = moved.harvest(tokens), direct.harvest(tokens)
    assert moved.hook == other and torch.equal(a.x, b.x) and torch.equal(a.grad, b.grad)
    assert moved.saes()[MEMBERS[2]["name"]][1]["hook"] == other
    wide = SweepSAESystem(_lm(), [dict(MEMBERS[0], hook="blocks.0.mlp.hook_post")], optimizer=_adam(LR), **COMMON)
    assert wide.harvest(tokens).x.shape[1] == _lm().d_in("blocks.0.mlp.hook_post") != _lm().d_in(HOOK)


@pytest.mark.parametrize("stack", [False, True], ids=["one-by-one", "stacked"])
def test_members_count_dead_latents_with_the_sweeps_activity_test(tmp_path, stack):
    """``dead_activity_test: sum_positive`` reaches every member, stacked or not: each member's counters equal its
    SAE's trained alone with the same test, and latent 0, planted to be kept with a negative value on every token
    (k = d_sae, b_enc −100), is dead by it (it fires on every token by the default ``nonzero`` test)."""
    specs = [{"name": f"s{seed}", "sae": {"class_path": "TopKSAE",
                                          "init_args": {"d_sae": 64, "k": 64, "k_aux": 0, "seed": seed}}}
             for seed in (1, 2)]
    common = dict(COMMON, dead_activity_test="sum_positive")

    def plant(sae):
        with torch.no_grad():
            sae.b_enc[0] = -100.0
        return sae

    sweep = SweepSAESystem(_lm(), specs, optimizer=_adam(LR), stack_members=stack, **common)
    for m in sweep.members.values():
        plant(m.sae)
    _fit(sweep, tmp_path / "sweep")
    assert sum(isinstance(u, StackPlan) for u in sweep.member_stacks(0)) == int(stack)
    for spec in specs:
        args = spec["sae"]["init_args"]
        alone = LocalSAESystem(_lm(), lambda d, a=args: plant(TopKSAE(d, **a)), optimizer=_adam(LR), **common)
        _assert_member_equals(sweep.members[spec["name"]], _fit(alone, tmp_path / spec["name"]), atol=1e-5)
        assert int(sweep.members[spec["name"]].dead.batches_since_fired[0]) == STEPS


def test_a_members_dead_fraction_is_the_batch_window_one(tmp_path):
    """A member's ``train/<m>/dead_fraction`` is its dead-batch window's fraction, as a one-SAE run's
    ``train/dead_fraction`` (stacked and one-by-one runs were compared with each other only)."""
    class Check(pl.Callback):
        def __init__(self) -> None:
            self.seen: list[tuple[float, float]] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            for name, m in module.members.items():
                logged = trainer.callback_metrics.get(f"train/{name}/dead_fraction")
                if logged is not None:
                    self.seen.append((float(logged), float(m.dead.dead_by_batches().float().mean())))

    specs = [{"name": "wide", "sae": {"class_path": "TopKSAE", "init_args": {"d_sae": 512, "k": 1, "k_aux": 0, "seed": 1}}}]
    check = Check()
    _fit(SweepSAESystem(_lm(), specs, optimizer=_adam(LR), **dict(COMMON, dead_batches=1, dead_tokens=10**9)), tmp_path,
         callbacks=[check], log_every_n_steps=1)
    assert check.seen and any(by_batches > 0 for _, by_batches in check.seen)
    assert all(logged == by_batches for logged, by_batches in check.seen), check.seen


class RecordLogged(pl.Callback):
    """Every value ``trainer.callback_metrics`` holds after each training batch and each validation (what the console,
    the summary and the loggers get), as ``{(stage, step): {tag: value}}``."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, int], dict[str, float]] = {}

    def _record(self, trainer, stage: str) -> None:
        if not trainer.sanity_checking:
            self.seen[(stage, trainer.global_step)] = {k: float(v) for k, v in trainer.callback_metrics.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._record(trainer, "train")

    def on_validation_end(self, trainer, pl_module) -> None:
        self._record(trainer, "val")


def test_members_log_and_count_what_their_saes_trained_alone_do(tmp_path):
    """Each member's logged numbers are its own run's: ``train/<m>/<metric>``, ``val/<m>/<metric>`` and ``lr/<m>``
    equal ``train/<metric>``, ``val/<metric>`` and ``lr`` of the SAE trained alone, at every logging step and at both
    validations (each validation its own: its sums start from zero), and the console's ``train/nmse`` / ``val/nmse``
    are the mean of the runs alone (``train/loss`` their sum). With 2 micro-batches per optimizer step the members'
    dead-latent counters count optimizer steps, as each run alone does. (The other sweep tests compare members with
    members, stacked or over ranks, which one shared slip in the packing of the metrics or the counters passes.)"""
    specs = MEMBERS[:3]  # AuxK; another lr on a constant schedule; a g-SAE with its own clipping and no warm-up
    # validation every 6 batches: after optimizer steps 3 and 6
    kw = dict(steps=6, log_every_n_steps=1, limit_val_batches=1, val_check_interval=6, accumulate_grad_batches=2)
    record = RecordLogged()
    sweep = _fit(_sweep(specs), tmp_path / "sweep", callbacks=[record], **kw)
    alone = {}
    for spec in specs:
        rec = RecordLogged()
        run = _fit(_alone(spec), tmp_path / spec["name"], callbacks=[rec], clip=spec.get("gradient_clip_val", 0.5), **kw)
        _assert_member_equals(sweep.members[spec["name"]], run)
        alone[spec["name"]] = rec.seen
    assert record.seen.keys() == alone["topk-k4"].keys() and ("val", 6) in record.seen and ("val", 3) in record.seen
    compared = 0
    for when, logged in record.seen.items():
        for tag, value in logged.items():
            parts = tag.split("/")
            if parts[0] in ("train", "val") and len(parts) == 3 and parts[1] in alone:
                want = alone[parts[1]][when][f"{parts[0]}/{parts[2]}"]
            elif parts[0] == "lr" and len(parts) == 2:
                want = alone[parts[1]][when]["lr"]
            else:
                continue
            assert value == pytest.approx(want, rel=1e-4, abs=1e-6), (when, tag, value, want)
            compared += 1
        for tag in ("train/nmse", "train/l0", "val/nmse", "val/explained_variance"):
            if tag.split("/")[0] == when[0]:
                mean = sum(alone[n][when][tag] for n in alone) / len(alone)
                assert logged[tag] == pytest.approx(mean, rel=1e-4, abs=1e-6), (when, tag)
        if when[0] == "train":
            assert logged["train/loss"] == pytest.approx(sum(alone[n][when]["train/loss"] for n in alone), rel=1e-4)
    assert compared > 30 * len(record.seen), compared
    assert {f"lr/{s['name']}" for s in specs} <= record.seen[("train", 6)].keys()


def test_a_resume_names_the_members_that_were_reordered_or_changed(tmp_path):
    """A sweep checkpoint resumes the same members only: the optimizer's parameter groups (Adam's moments) are
    restored by position, and an SAE setting that is no parameter shape (``k``) would load silently. Reordered
    members, or a member with another ``k``, are one line naming them, before anything is restored."""
    _fit(_sweep(), tmp_path, steps=2, checkpoint_every=2)
    ckpt = torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=False)
    _sweep().check_resumable(ckpt)  # the same members: resumes
    names = [m["name"] for m in MEMBERS]
    with pytest.raises(ValueError, match=r"^--ckpt_path: the checkpoint's members \[.*\] differ from --model\.members") as e:
        _sweep(MEMBERS[::-1]).on_load_checkpoint(ckpt)
    assert str(e.value) == f"--ckpt_path: the checkpoint's members {names} differ from --model.members {names[::-1]}"
    other_k = [dict(m, sae={**m["sae"], "init_args": {**m["sae"]["init_args"], "k": 3}}) if m["name"] == "topk-k2" else m
               for m in MEMBERS]
    with pytest.raises(ValueError, match=r"^--ckpt_path: member topk-k2 differs from the configured one .*'k': \(2, 3\)"):
        _sweep(other_k).on_load_checkpoint(ckpt)
