"""Failures never lose a checkpoint: a non-finite loss stops the run with its step; earlier checkpoints stay."""

from __future__ import annotations

import pytest
import torch

from gsae.export import load_checkpoint
from gsae.systems import NonFiniteLossError
from tests.systems.helpers import build_data, build_system, build_trainer


def test_nan_loss_stops_with_the_step_and_keeps_checkpoints(tmp_path):
    system = build_system("topk")
    orig = system.objective

    def poisoned(batch, stage):
        loss, *rest = orig(batch, stage)
        if stage == "train" and system.global_step == 5:
            loss = loss * float("nan")
        return (loss, *rest)

    system.objective = poisoned
    trainer = build_trainer(tmp_path, 10, checkpoint_every=2)
    with pytest.raises(NonFiniteLossError, match="at step 5; stopping \\(last good checkpoint kept: resume from it"):
        trainer.fit(system, datamodule=build_data(system))
    kept = sorted(p.name for p in (tmp_path / "ckpts").glob("*.ckpt"))
    assert "epoch=0-step=4.ckpt" in kept and "last.ckpt" in kept
    sae, meta = load_checkpoint(tmp_path / "ckpts" / "last.ckpt")
    assert all(torch.isfinite(p).all() for p in sae.parameters())
    assert meta["tokens_seen"] > 0


def test_a_nan_loss_at_a_resumes_first_step_points_at_the_checkpoint(tmp_path):
    """A checkpoint damaged in a copy loads (torch checks no checksum) and its resume's first step is non-finite: the
    message sent the user to a lower learning rate; it now names the checkpoint and an earlier one first."""
    system = build_system("topk")
    build_trainer(tmp_path, 4, checkpoint_every=2).fit(system, datamodule=build_data(system))
    damaged = tmp_path / "ckpts" / "epoch=0-step=4.ckpt"
    state = torch.load(damaged, weights_only=False)
    state["state_dict"]["sae.W_enc"][0, 0] = float("inf")
    torch.save(state, damaged)
    system = build_system("topk")
    with pytest.raises(NonFiniteLossError, match=r"at step 4; stopping \(at the first step after resuming from "
                                                 r".*epoch=0-step=4.ckpt: that checkpoint may be damaged; resume from an "
                                                 r"earlier one"):
        build_trainer(tmp_path, 8, checkpoint_every=2).fit(system, datamodule=build_data(system),
                                                           ckpt_path=str(damaged))


def test_a_nan_loss_before_the_first_checkpoint_does_not_offer_one(tmp_path):
    """At step 1 there is no checkpoint: the message said to resume from "the last good checkpoint"."""
    system = build_system("topk")
    orig = system.objective

    def poisoned(batch, stage):
        loss, *rest = orig(batch, stage)
        return (loss * float("nan") if stage == "train" else loss, *rest)

    system.objective = poisoned
    with pytest.raises(NonFiniteLossError, match=r"at step 0; stopping \(no checkpoint written yet: start again with a "
                                                 r"lower --model.optimizer.lr\)"):
        build_trainer(tmp_path, 10, checkpoint_every=2).fit(system, datamodule=build_data(system))


def test_a_sweep_member_with_a_nan_loss_stops_the_run_naming_it(tmp_path):
    """Every member's loss is checked at once (one wait for the device per step): the first non-finite member is named,
    with the step, before any member's update; earlier checkpoints stay and hold finite members."""
    from gsae.export import load_members
    from gsae.lm import LanguageModel
    from gsae.optim import Adam
    from gsae.systems import SweepSAESystem
    from tests.systems.helpers import HOOK

    members = [{"name": f"topk-k{k}", "sae": {"class_path": "gsae.sae.TopKSAE", "init_args": {"d_sae": 64, "k": k}}}
               for k in (2, 3, 4)]
    system = SweepSAESystem(LanguageModel("random-tiny", seed=0), members, hook=HOOK, buffer_size=128,
                            optimizer=lambda p: Adam(p, lr=1e-2))
    sae = system.members["topk-k3"].sae
    forward = sae.forward

    def poisoned(*a, **k):
        out = forward(*a, **k)
        return out._replace(x_hat=out.x_hat * float("nan")) if system.global_step == 3 else out

    sae.forward = poisoned
    with pytest.raises(NonFiniteLossError, match="member topk-k3 .* at step 3"):
        build_trainer(tmp_path, 10, checkpoint_every=2).fit(system, datamodule=build_data(system))
    assert system.global_step == 3
    kept = load_members(tmp_path / "ckpts" / "last.ckpt")
    assert set(kept) == {"topk-k2", "topk-k3", "topk-k4"}
    assert all(torch.isfinite(p).all() for s, _ in kept.values() for p in s.parameters())
