"""Training metrics are computed on logging steps only (every ``log_every_n_steps``, a fit's first and last step): the
metric passes and their host-device waits are skipped on the others, while the dead-latent counters and the token
count advance on every step."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

import gsae.systems.base as base
import gsae.systems.sweep as sweep
from gsae.lm import LanguageModel
from gsae.optim import Adam
from gsae.systems import SweepSAESystem
from tests.conftest import CallCounter
from tests.systems.helpers import HOOK, build_data, build_system, build_trainer

STEPS = 8


class CountTokens(pl.Callback):
    """The reference token count: positions that are not special tokens in every training batch."""

    def __init__(self) -> None:
        self.n = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.n += int(pl_module.token_mask(batch.tokens).sum())


def _fit(system, tmp_path, every: int):
    count = CountTokens()
    trainer = build_trainer(tmp_path, STEPS, callbacks=[count], log_every_n_steps=every)
    trainer.fit(system, datamodule=build_data(system))
    trainer.tokens_counted = count.n
    return trainer


@pytest.mark.parametrize("every, logged", [(1, STEPS), (3, 4), (50, 2)])  # 3: steps 0, 2, 5, 7 (first, 3rd, 6th, last)
def test_metrics_are_computed_on_logging_steps_only(tmp_path, monkeypatch, every, logged):
    spy = CallCounter(monkeypatch, base, "recon_sums")  # the per-step metric sums
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
    spy = CallCounter(monkeypatch, sweep, "recon_sums")
    members = [{"name": f"topk-k{k}", "sae": {"class_path": "gsae.sae.TopKSAE", "init_args": {"d_sae": 64, "k": k}}}
               for k in (2, 4)]
    system = SweepSAESystem(LanguageModel("random-tiny", seed=0), members, hook=HOOK, buffer_size=128,
                            optimizer=lambda p: Adam(p, lr=1e-2))
    trainer = _fit(system, tmp_path, 3)
    assert spy.calls == 4 * len(members)
    assert int(system.tokens_seen) + system.buffer.fill == trainer.tokens_counted > 0
    assert {"train/topk-k2/nmse", "train/topk-k4/l0", "train/loss"} <= set(trainer.callback_metrics)


def _lightning_log(self, metrics, console_only=()):
    """The reference: Lightning's own ``log_dict`` (what ``SAESystem.log_step_metrics`` stands in for); the
    ``console_only`` keys with ``logger=False`` (callback_metrics only)."""
    logged = {k: v for k, v in metrics.items() if k not in console_only}
    self.log_dict(logged, on_step=True, on_epoch=False, rank_zero_only=True)
    if len(logged) < len(metrics):
        self.log_dict({k: v for k, v in metrics.items() if k in console_only}, on_step=True, on_epoch=False,
                      rank_zero_only=True, logger=False)


def _events(folder) -> dict[str, dict[int, float]]:
    """Every scalar tag's ``{step: value}`` of the run in ``folder`` and of its sweep members' runs (``<member>:<tag>``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for run in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
        acc.Reload()
        name = "" if run == folder else f"{run.name}:"
        out |= {name + tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    return out


def _logged_run(kind: str, root, monkeypatch, reference: bool):
    from lightning.pytorch.loggers import CSVLogger

    from gsae.loggers import TensorBoardLogger

    if reference:
        monkeypatch.setattr(base.SAESystem, "log_step_metrics", _lightning_log)
    torch.manual_seed(0)
    if kind.startswith("sweep"):
        members = [{"name": f"{cls.lower()}-k{k}",
                    "sae": {"class_path": f"gsae.sae.{cls}", "init_args": {"d_sae": 64, "k": k, **extra}}}
                   for cls, k, extra in (("TopKSAE", 2, {}), ("GradTopKSAE", 4, {"k_aux": 0}))]
        system = SweepSAESystem(LanguageModel("random-tiny", seed=0), members, hook=HOOK, buffer_size=128,
                                optimizer=lambda p: Adam(p, lr=1e-2))
    else:
        system = build_system(kind.split("-")[0], buffer_size=128)
    loggers = [TensorBoardLogger(str(root), name="tb"), CSVLogger(str(root), name="csv")]
    ddp = dict(devices=2, strategy="ddp_fork") if kind.endswith("-ddp") else {}
    if kind.endswith("-accumulate"):  # 2 batches per optimizer step: Lightning logs on the stepping batch only
        ddp["accumulate_grad_batches"] = 2
    trainer = build_trainer(root, STEPS, logger=loggers, log_every_n_steps=3, **ddp)
    trainer.fit(system, datamodule=build_data(system, batch_size=2) if ddp else build_data(system))
    monkeypatch.undo()
    csv = (root / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    return trainer, _events(root / "tb" / "version_0"), csv


@pytest.mark.parametrize("kind", ["topk", "sweep", "topk-accumulate", pytest.param("topk-ddp", marks=pytest.mark.slow),
                                  pytest.param("sweep-ddp", marks=pytest.mark.slow)])
def test_step_metrics_reach_callbacks_and_loggers_as_lightnings_log_dict_does(tmp_path, monkeypatch, kind):
    """log_step_metrics bypasses LightningModule.log; the loggers (TensorBoard, CSV) and callback_metrics get what
    Lightning's log_dict gives them: the same keys, steps and values (tokens_per_s is a clock reading: keys and steps),
    also over 2 DDP ranks (rank 0 writes; the main process gets rank 0's callback_metrics back)."""
    ours, tb, csv = _logged_run(kind, tmp_path / "ours", monkeypatch, reference=False)
    ref, tb_ref, csv_ref = _logged_run(kind, tmp_path / "ref", monkeypatch, reference=True)
    sweep = kind.startswith("sweep")
    assert set(tb) == set(tb_ref) and ("train/loss" in tb) == (not sweep) and "epoch" not in tb
    if sweep:  # the members' means and summed loss: the console's (callback_metrics), not the loggers'
        assert {"train/loss", "train/nmse", "train/l0"} <= set(ours.callback_metrics) and "train/nmse" not in tb
        # each member's in its own run (gsae.loggers.TensorBoardLogger), its name out of the tags
        assert {"topksae-k2:train/nmse", "gradtopksae-k4:train/beta_attribution_median", "topksae-k2:lr"} <= set(tb)
        assert not [t for t in tb if "/topksae" in t or "/gradtopksae" in t], sorted(tb)
        # AuxK's loss only for the member that has AuxK (k_aux 0: always 0, not logged)
        assert "topksae-k2:train/aux_loss" in tb and "gradtopksae-k4:train/aux_loss" not in tb
    for tag in tb:
        # steps 3 and 6 of 8: at those steps, as the console, checkpoints, validation and evaluation count them
        # (Lightning's log_dict plots them one step earlier, at 2 and 5)
        assert list(tb[tag]) == [3, 6] and list(tb_ref[tag]) == [2, 5], tag
        if tag != "train/tokens_per_s":
            assert list(tb[tag].values()) == list(tb_ref[tag].values()), tag
    # CSV: the same columns (epoch included, as Lightning adds it) and rows; Lightning's values went through float32
    # tensors, ours are the Python floats (lr 0.01, not 0.009999999776): equal once rounded to float32
    header = csv[0].split(",")
    assert header == csv_ref[0].split(",") and "epoch" in header and len(csv) == len(csv_ref) == 3
    for row, row_ref in zip(csv[1:], csv_ref[1:]):
        for key, v, v_ref in zip(header, row.split(","), row_ref.split(",")):
            if key == "step":
                assert int(v) == int(v_ref) + 1
            elif key != "train/tokens_per_s":
                assert float(np.float32(v)) == float(v_ref), (key, v, v_ref)
    # callback_metrics: every rank's own values of the last logged step (here the last step, for the progress line)
    assert set(ours.callback_metrics) == set(ref.callback_metrics)
    for k, v in ref.callback_metrics.items():
        if k != "train/tokens_per_s":
            assert float(ours.callback_metrics[k]) == pytest.approx(float(v), rel=1e-6), k
    assert set(ours.logged_metrics) == set(ref.logged_metrics)


class SlowAfterCheckpoints(pl.Callback):
    """Stands for the evaluation a checkpoint runs (0.4 s after each) and a slow validation; records the logged
    ``train/tokens_per_s`` of every step."""

    def __init__(self) -> None:
        self.rates: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rate = trainer.callback_metrics.get("train/tokens_per_s")
        if rate is not None:
            self.rates[trainer.global_step] = float(rate)
        if trainer.global_step % 4 == 0:
            time.sleep(0.4)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            time.sleep(0.4)


def test_tokens_per_s_counts_training_time_only(tmp_path):
    """The logged ``train/tokens_per_s`` left out nothing: the point after each checkpoint (whose evaluation takes
    minutes at GPT-2 scale) or validation read a fraction of the rate the console showed. Now the time after a step
    that checkpointed or validated is left out, as the progress bar does."""
    system = build_system("topk")
    slow = SlowAfterCheckpoints()
    trainer = build_trainer(tmp_path, 12, callbacks=[slow], checkpoint_every=4, log_every_n_steps=1,
                            val_check_interval=6, limit_val_batches=1)
    trainer.fit(system, datamodule=build_data(system))
    after = [slow.rates[s] for s in (5, 7, 9)]  # the steps after a checkpoint (4, 8) or a validation (6)
    others = [r for s, r in slow.rates.items() if s not in (1, 5, 7, 9)]
    assert len(others) >= 6 and min(after) > 0.3 * float(np.median(others)), (after, others)


def test_validation_metrics_are_plotted_at_the_step_just_done_and_not_for_the_sanity_check(tmp_path):
    """A validation's metrics go to the loggers at the optimizer step it follows (``global_step``: 3 and 6 for a
    validation every 3 batches), where that step's training metrics are, and the sanity check before training plots
    nothing."""
    from gsae.loggers import TensorBoardLogger

    torch.manual_seed(0)
    system = build_system("topk", buffer_size=128)
    trainer = build_trainer(tmp_path, STEPS, logger=[TensorBoardLogger(str(tmp_path), name="tb")], log_every_n_steps=3,
                            val_check_interval=3, limit_val_batches=1, num_sanity_val_steps=1)
    trainer.fit(system, datamodule=build_data(system))
    tb = _events(tmp_path / "tb" / "version_0")
    assert list(tb["train/loss"]) == [3, 6]
    val = {tag: list(steps) for tag, steps in tb.items() if tag.startswith("val/")}
    assert {"val/nmse", "val/recon_loss"} <= set(val) and all(steps == [3, 6] for steps in val.values()), val


def test_tokens_per_s_is_the_tokens_since_the_previous_logging_step_over_the_time_since(monkeypatch):
    """``train/tokens_per_s`` = (tokens now − tokens at the previous call) / (seconds between them), by hand with a
    fixed clock: not all tokens seen so far over the last interval."""
    system = build_system("topk")
    clock = iter([10.0, 12.0, 16.0])
    monkeypatch.setattr(base.time, "perf_counter", lambda: next(clock))
    system.tokens_seen.fill_(100)
    assert system.progress_metrics() == {"train/tokens_seen": 100.0}  # no previous call: no rate yet
    system.tokens_seen.fill_(300)
    assert system.progress_metrics() == {"train/tokens_seen": 300.0, "train/tokens_per_s": 100.0}
    system.tokens_seen.fill_(340)
    assert system.progress_metrics()["train/tokens_per_s"] == 10.0


def test_auxk_loss_is_logged_as_the_part_of_the_loss_that_is_not_the_reconstruction(tmp_path):
    """``train/aux_loss`` is logged for an SAE with AuxK: once latents are dead (``dead_tokens`` 1), ``train/loss`` =
    ``train/recon_loss`` + ``train/aux_loss`` > 0; an SAE without it (``k_aux`` 0) logs none."""
    from gsae.sae import TopKSAE
    from gsae.systems import LocalSAESystem

    for k_aux in (8, 0):
        torch.manual_seed(0)
        system = LocalSAESystem(LanguageModel("random-tiny", seed=0), lambda d, a=k_aux: TopKSAE(d, 64, 4, k_aux=a),
                                hook=HOOK, optimizer=lambda p: Adam(p, lr=1e-2), dead_tokens=1)
        trainer = build_trainer(tmp_path / str(k_aux), 3, log_every_n_steps=1)
        trainer.fit(system, datamodule=build_data(system))
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        assert m["train/dead_fraction_tokens"] > 0
        if k_aux:
            assert m["train/aux_loss"] > 0
            assert m["train/aux_loss"] == pytest.approx(m["train/loss"] - m["train/recon_loss"], rel=1e-4)
        else:
            assert "train/aux_loss" not in m
