"""Training metrics are computed on logging steps only (every ``log_every_n_steps``, a fit's first and last step): the
metric passes and their host-device waits are skipped on the others, while the dead-latent counters and the token
count advance on every step."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

import gsae.systems.base as base
import gsae.systems.sweep as sweep
from gsae.lm import LanguageModel
from gsae.optim import Adam
from gsae.systems import SweepSAESystem
from tests.systems.helpers import HOOK, build_data, build_system, build_trainer

STEPS = 8


class CountTokens(pl.Callback):
    """The reference token count: positions that are not special tokens in every training batch."""

    def __init__(self) -> None:
        self.n = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.n += int(pl_module.token_mask(batch.tokens).sum())


class Spy:
    """Counts calls of ``module.recon_sums`` (the per-step metric sums)."""

    def __init__(self, monkeypatch, module) -> None:
        self.calls = 0
        inner = module.recon_sums

        def counted(*a, **k):
            self.calls += 1
            return inner(*a, **k)

        monkeypatch.setattr(module, "recon_sums", counted)


def _fit(system, tmp_path, every: int):
    count = CountTokens()
    trainer = build_trainer(tmp_path, STEPS, callbacks=[count], log_every_n_steps=every)
    trainer.fit(system, datamodule=build_data(system))
    trainer.tokens_counted = count.n
    return trainer


@pytest.mark.parametrize("every, logged", [(1, STEPS), (3, 4), (50, 2)])  # 3: steps 0, 2, 5, 7 (first, 3rd, 6th, last)
def test_metrics_are_computed_on_logging_steps_only(tmp_path, monkeypatch, every, logged):
    spy = Spy(monkeypatch, base)
    torch.manual_seed(0)
    system = build_system("gsae", buffer_size=128)
    trainer = _fit(system, tmp_path, every)
    assert spy.calls == logged
    # the counters and the token count advance on every step; the last step's metrics reach callback_metrics
    assert int(system.tokens_seen) + system.buffer.fill == trainer.tokens_counted > 0  # the rest wait in the buffer
    assert int(system.dead.batches_since_fired.max()) <= STEPS
    assert {"train/loss", "train/nmse", "train/l0", "train/dead_fraction"} <= set(trainer.callback_metrics)


def test_logging_steps_do_not_change_training(tmp_path):
    """Skipping the metric passes changes nothing that trains: every-step and every-50-steps logging end equal."""
    ends = []
    for every in (1, 50):
        torch.manual_seed(0)
        system = build_system("gsae", buffer_size=128)
        _fit(system, tmp_path / str(every), every)
        ends.append(system)
    for name, p in ends[0].sae.state_dict().items():
        assert torch.equal(p, ends[1].sae.state_dict()[name]), name
    assert torch.equal(ends[0].dead.tokens_since_fired, ends[1].dead.tokens_since_fired)


def test_a_sweep_computes_member_metrics_on_logging_steps_only(tmp_path, monkeypatch):
    spy = Spy(monkeypatch, sweep)
    members = [{"name": f"topk-k{k}", "sae": {"class_path": "gsae.sae.TopKSAE", "init_args": {"d_sae": 64, "k": k}}}
               for k in (2, 4)]
    system = SweepSAESystem(LanguageModel("random-tiny", seed=0), members, hook=HOOK, buffer_size=128,
                            optimizer=lambda p: Adam(p, lr=1e-2))
    trainer = _fit(system, tmp_path, 3)
    assert spy.calls == 4 * len(members)
    assert int(system.tokens_seen) + system.buffer.fill == trainer.tokens_counted > 0
    assert {"train/topk-k2/nmse", "train/topk-k4/l0", "train/loss"} <= set(trainer.callback_metrics)
