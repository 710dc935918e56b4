"""A sweep (``SweepSAESystem``: many SAEs from one LM pass) against its independent reference: every member trained
alone by ``LocalSAESystem`` on the same tokens — after n steps, after a stop and resume, and under 2-rank DDP."""

from __future__ import annotations

import json

import pytest
import torch

from gsae.export import load_checkpoint, load_members
from gsae.lm import LanguageModel
from gsae.optim import Adam
from gsae.sae import GradTopKSAE, TopKSAE
from gsae.systems import LocalSAESystem, SweepSAESystem
from tests.systems.helpers import HOOK, RecordTokens, StopAt, build_data, build_trainer

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


def _sweep(members=MEMBERS) -> SweepSAESystem:
    return SweepSAESystem(_lm(), members, optimizer=_adam(LR), **COMMON)


def _alone(spec: dict) -> LocalSAESystem:
    """The member as its own run: its SAE, its lr / schedule options, the sweep's shared options."""
    cls = CLASSES[spec["sae"]["class_path"].rpartition(".")[2]]
    args = spec["sae"]["init_args"]
    kw = dict(COMMON)
    for key in ("lr_warmup_steps", "lr_schedule", "lr_min_ratio"):
        if key in spec:
            kw[key] = spec[key]
    return LocalSAESystem(_lm(), lambda d: cls(d, **args), optimizer=_adam(spec.get("lr", LR)), **kw)


def _fit(system, root, steps=STEPS, callbacks=(), ckpt_path=None, devices=1, clip=0.5, checkpoint_every=None):
    torch.manual_seed(0)
    data = build_data(system, batch_size=4 // devices)
    kw = dict(devices=devices, strategy="ddp_fork") if devices > 1 else {}
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
def test_every_member_equals_the_sae_trained_alone(tmp_path):
    sweep = _fit(_sweep(), tmp_path / "sweep")
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


@pytest.mark.slow
def test_stop_and_resume_equals_uninterrupted(tmp_path):
    full = _fit(_sweep(), tmp_path / "a", callbacks=[RecordTokens(tmp_path)])
    (tmp_path / "b").mkdir()
    _fit(_sweep(), tmp_path / "b", callbacks=[StopAt(STOP)], checkpoint_every=STOP)
    ckpt = tmp_path / "b" / "ckpts" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert list(saved["gsae"]["members"]) == [m["name"] for m in MEMBERS]
    assert len(saved["optimizer_states"][0]["param_groups"]) == len(MEMBERS)
    resumed = _fit(_sweep(), tmp_path / "b", ckpt_path=str(ckpt), checkpoint_every=STOP)
    assert resumed.global_step == STEPS
    for name in full.members:
        _assert_member_equals(resumed.members[name], full.members[name])
    assert torch.equal(full.buffer.x, resumed.buffer.x) and torch.equal(full.buffer.grad, resumed.buffer.grad)


@pytest.mark.slow
def test_ddp_two_ranks_equal_single_process(tmp_path):
    """2 gloo ranks × B/2 = 1 rank × B for every member (no shuffle buffer: each rank mixes its own rows)."""
    members = MEMBERS[::2]
    kw = dict(COMMON, buffer_size=0)
    single = _fit(SweepSAESystem(_lm(), members, optimizer=_adam(LR), **kw), tmp_path / "d1")
    ddp = _fit(SweepSAESystem(_lm(), members, optimizer=_adam(LR), **kw), tmp_path / "d2", devices=2)
    for name in single.members:
        _assert_member_equals(ddp.members[name], single.members[name], atol=2e-5)
    assert int(single.tokens_seen) == int(ddp.tokens_seen)


def test_member_options_are_checked_with_one_line_errors():
    ok = MEMBERS[0]
    cases = {
        "is used twice": [ok, ok],
        "unknown keys ['k']": [dict(ok, k=3)],
        "no SAE class 'gsae.sae.Nope'": [{"name": "x", "sae": {"class_path": "gsae.sae.Nope"}}],
        "use letters, digits": [dict(ok, name="a.b")],
        "sae is required": [{"name": "x"}],
        "non-empty list": [],
        "lr_schedule must be": [dict(ok, lr_schedule="linear")],
        "init_args": [{"name": "x", "sae": {"class_path": "TopKSAE", "init_args": {"kk": 3}}}],
    }
    for message, members in cases.items():
        with pytest.raises(ValueError, match="--model.members") as e:
            SweepSAESystem(_lm(), members, **COMMON)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.slow
def test_cli_sweep_writes_every_members_export_evaluation_and_tensorboard(tmp_path, capsys):
    """The quickstart sweep through train.py: each member gets its SAELens export (loadable by SAELens, equal to the
    checkpoint's member), evaluation JSON, TensorBoard namespace and summary line; evaluate.py evaluates them all."""
    from sae_lens import SAE
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gsae.cli import main
    from gsae.evaluate import main as evaluate_main

    args = [
        "--config", "configs/quickstart/sweep.yaml", "--trainer.max_steps", "6", "--checkpoint.every_n_train_steps", "6",
        "--trainer.val_check_interval", "6", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "2", "--evaluation.benchmarks", "[loss_added]",
        "--evaluation.n_seqs", "8",
    ]
    assert main(args) == 0
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
    ev = EventAccumulator(str(run / "version_0"), size_guidance={"scalars": 0}).Reload()
    tags = set(ev.Tags()["scalars"])
    for name in names:
        assert {f"train/{name}/nmse", f"train/{name}/l0", f"train/{name}/dead_fraction", f"val/{name}/nmse"} <= tags
        assert f"eval/{name}/loss_added/L_added" in tags
    assert {"train/loss", "train/nmse"} <= tags  # the progress bar's headline (sum of losses, mean nmse)
    # the validation line and the summary's val row: the mean over members
    val = {k: ev.Scalars(f"val/{k}")[-1].value for k in ("nmse", "l0", "explained_variance")}
    for k, v in val.items():
        assert v == pytest.approx(sum(ev.Scalars(f"val/{n}/{k}")[-1].value for n in names) / len(names), rel=1e-6)
    assert any(line.startswith("val ") and f"nmse {val['nmse']:.4f}" in line for line in out.splitlines()), out

    assert evaluate_main([str(ckpt), "--benchmarks", "dead_latents", "--n-seqs", "8", "--output", str(tmp_path / "e.json")]) == 0
    table = capsys.readouterr().out
    result = json.loads((tmp_path / "e.json").read_text())["dead_latents"]
    assert len(result) == 4 and all(any(k.endswith(f":{n}") for k in result) for n in names)
    assert all(n in table for n in names)
