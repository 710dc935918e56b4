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
    with pytest.raises(NonFiniteLossError, match="at step 5"):
        trainer.fit(system, datamodule=build_data(system))
    kept = sorted(p.name for p in (tmp_path / "ckpts").glob("*.ckpt"))
    assert "epoch=0-step=4.ckpt" in kept and "last.ckpt" in kept
    sae, meta = load_checkpoint(tmp_path / "ckpts" / "last.ckpt")
    assert all(torch.isfinite(p).all() for p in sae.parameters())
    assert meta["tokens_seen"] > 0
