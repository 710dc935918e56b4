"""Builders for system-level tests: a tiny system + data module + trainer, all offline."""

from __future__ import annotations

from datetime import timedelta

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy

from gsae.callbacks.checkpoint import SAECheckpoint
from gsae.data import TokenDataModule
from gsae.lm import LanguageModel
from gsae.optim import Adam
from gsae.sae import GradTopKSAE, TopKSAE
from gsae.systems import E2ESAESystem, LocalSAESystem

HOOK = "blocks.1.hook_resid_pre"
# A rank that stops taking part in a collective (a bug) fails its test after this, not after gloo's 30 minutes, which
# would pass CI's time limit; the longest legitimate wait of a test's rank for another is a few seconds.
DDP_TIMEOUT = timedelta(minutes=3)


def build_system(objective: str = "topk", buffer_size: int = 0, lm_name: str = "random-tiny", **kw) -> pl.LightningModule:
    lm = LanguageModel(lm_name, seed=0)
    common = dict(hook=HOOK, optimizer=lambda p: Adam(p, lr=1e-2), lr_warmup_steps=2, dead_tokens=200, **kw)
    if objective == "topk":
        return LocalSAESystem(lm, lambda d: TopKSAE(d, 64, 4, k_aux=8), buffer_size=buffer_size, **common)
    if objective == "gsae":
        return LocalSAESystem(lm, lambda d: GradTopKSAE(d, 64, 4, beta=1e4, k_aux=8), buffer_size=buffer_size, **common)
    if objective == "e2e":
        return E2ESAESystem(
            lm, lambda d: TopKSAE(d, 64, 4, k_aux=8), downstream_hooks=["blocks.1.hook_resid_post"], downstream_coef=0.5, **common
        )
    raise ValueError(objective)


def build_data(system, batch_size: int = 4, context_size: int = 16, **kw) -> TokenDataModule:
    kw.setdefault("val_batches", 1)
    return TokenDataModule(system.lm, dataset="synthetic", context_size=context_size, batch_size=batch_size, **kw)


def build_trainer(root, max_steps: int, callbacks=(), checkpoint_every: int | None = None, **kw) -> pl.Trainer:
    cbs = list(callbacks)
    if checkpoint_every:
        cbs.append(SAECheckpoint(dirpath=str(root / "ckpts"), every_n_train_steps=checkpoint_every, export_saelens=False))
    kw.setdefault("limit_val_batches", 0)
    kw.setdefault("accelerator", "cpu")
    kw.setdefault("logger", False)
    if kw.get("strategy") == "ddp_fork":
        kw["strategy"] = DDPStrategy(start_method="fork", timeout=DDP_TIMEOUT)
    return pl.Trainer(
        default_root_dir=str(root),
        max_steps=max_steps,
        enable_checkpointing=bool(checkpoint_every),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=cbs,
        **kw,
    )


class RecordTokens(pl.Callback):
    """Writes every training batch's contexts to ``<folder>/rank<r>.pt`` at the end of training."""

    def __init__(self, folder) -> None:
        self.folder = folder
        self.seen: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(batch.tokens.cpu())

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(torch.cat(self.seen), self.folder / f"rank{trainer.global_rank}.pt")


class RecordMetrics(pl.Callback):
    """Writes what global rank 0 logged (``trainer.callback_metrics``: the progress bar's and the loggers' values)
    after every training batch and at every validation end to ``<folder>/metrics.pt``, as ``{(stage, step): {tag:
    value}}`` (stage ``train`` or ``val``)."""

    def __init__(self, folder) -> None:
        self.folder = folder
        self.seen: dict[tuple[str, int], dict[str, float]] = {}

    def _record(self, trainer, stage: str) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            prefix = f"{stage}/"
            self.seen[(stage, trainer.global_step)] = {
                k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)
            }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._record(trainer, "train")

    def on_validation_end(self, trainer, pl_module) -> None:
        self._record(trainer, "val")

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            torch.save(self.seen, self.folder / "metrics.pt")


def assert_same_metrics(one: dict, other: dict, rtol: float = 1e-4, atol: float = 1e-6, skip: tuple[str, ...] = ()) -> int:
    """Two :class:`RecordMetrics` records hold the same tags with the same values (``skip``: tags left out, e.g.
    throughput); returns how many values were compared."""
    assert one.keys() == other.keys()
    compared = 0
    for key, values in one.items():
        kept = {k for k in values if not any(s in k for s in skip)}
        assert kept == {k for k in other[key] if not any(s in k for s in skip)}, key
        for tag in kept:
            a, b = values[tag], other[key][tag]
            assert abs(a - b) <= atol + rtol * abs(b), f"{key} {tag}: {a} vs {b}"
            compared += 1
    return compared


class StopAt(pl.Callback):
    """Stops training after step ``n`` (simulates an interrupted run)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.n:
            trainer.should_stop = True


class RecordBuffer(pl.Callback):
    """Writes each rank's final shuffle-buffer rows (and gradients) to ``<folder>/buffer<r>.pt``."""

    def __init__(self, folder) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(pl_module.buffer.state_dict(), self.folder / f"buffer{trainer.global_rank}.pt")
