"""Checkpointing that also writes a SAELens export beside each checkpoint and tells evaluation
callbacks where the new checkpoint is."""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from gsae.export import export_saelens


def saelens_dir(ckpt_path: str | Path, member: str = "") -> Path:
    """Where the SAELens export of a checkpoint goes: ``<name>.ckpt`` -> ``<name>.saelens/``; a sweep member's
    goes to ``<name>.<member>.saelens/``."""
    p = Path(ckpt_path)
    return p.with_name(p.stem + (f".{member}" if member else "") + ".saelens")


def member_path(ckpt_path: str | Path, member: str, suffix: str) -> Path:
    """A file beside a checkpoint for one SAE: ``<ckpt><suffix>`` (``.eval.json``, ``.latents.html``), or
    ``<ckpt>.<member><suffix>`` for a sweep member."""
    return Path(str(ckpt_path) + (f".{member}" if member else "") + suffix)


class SAECheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps checkpoints in ``<root>/<run name>/checkpoints`` (the same folder
    across restarts, so ``--ckpt_path last`` finds them), writes ``<name>.saelens/`` beside every
    ``<name>.ckpt``, and calls ``on_sae_checkpoint(trainer, pl_module, path)`` on every other callback
    that has it (the evaluation callbacks)."""

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str | None = None,
        every_n_train_steps: int | None = 1000,
        save_last: bool = True,
        save_top_k: int = -1,
        export_saelens: bool = True,
    ) -> None:
        """Checkpoint every ``every_n_train_steps`` steps and at the end of training.

        Args:
            dirpath: folder of the checkpoints (default ``<default_root_dir>/<run name>/checkpoints``).
            filename: Lightning checkpoint filename template (default ``epoch={epoch}-step={step}``).
            every_n_train_steps: save every this many optimizer steps (the final step is always saved).
            save_last: also keep ``last.ckpt`` (what ``--ckpt_path last`` resumes from).
            save_top_k: how many step checkpoints to keep, newest first (-1 keeps all).
            export_saelens: write a SAELens-format export beside every checkpoint.
        """
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            every_n_train_steps=every_n_train_steps,
            save_last=save_last,
            save_top_k=save_top_k,
            monitor="step" if save_top_k > 0 else None,
            mode="max",
        )
        self.export_saelens = export_saelens
        self._batch_epoch: int | None = None  # the epoch of the latest training batch (names the final checkpoint)
        self._to_announce: list[str] = []  # checkpoints written, not yet handed to the evaluation callbacks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.dirpath is None:  # resolved, as Lightning resolves a given dirpath: one folder, one spelling
            name = trainer.logger.name if trainer.logger is not None and trainer.logger.name else "run"
            self.dirpath = os.path.realpath(Path(trainer.default_root_dir) / name / "checkpoints")
        super().setup(trainer, pl_module, stage)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the checkpoint bookkeeping, also when the run folder was moved, copied or spelled another way
        (``--trainer.default_root_dir runs`` then ``/abs/runs``): Lightning then drops ``last_model_path``, so the next
        save, finding ``last.ckpt`` there, writes ``last-v1.ckpt`` and leaves ``last.ckpt`` at the old step. The saved
        paths are taken as the same files in this folder."""
        saved = state_dict.get("dirpath")
        if saved and self.dirpath and saved != self.dirpath:
            here = lambda p: str(Path(self.dirpath) / Path(p).name) if p else p  # noqa: E731
            state_dict = {
                **state_dict,
                "dirpath": self.dirpath,
                **{k: here(state_dict.get(k)) for k in ("best_model_path", "kth_best_model_path", "last_model_path")
                   if k in state_dict},
                "best_k_models": {here(p): v for p, v in state_dict.get("best_k_models", {}).items()},
            }
        super().load_state_dict(state_dict)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Always keep the final state: save it unless this step was just saved."""
        if trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step and not trainer.interrupted:
            candidates = self._monitor_candidates(trainer)
            if self._batch_epoch is not None:  # Lightning has closed the epoch by now: name it the one trained in
                candidates["epoch"] = torch.tensor(self._batch_epoch)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)
        self._announce(trainer)

    # Lightning saves in these hooks: the step's checkpoint, then last.ckpt; the evaluation comes after both
    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        self._batch_epoch = trainer.current_epoch
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        self._announce(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._announce(trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._announce(trainer)

    @override
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        # a checkpoint written over another (last.ckpt): what was beside the old one describes the old state
        self._remove_beside(trainer, filepath)
        super()._save_checkpoint(trainer, filepath)
        module = trainer.lightning_module
        if trainer.is_global_zero and self.export_saelens:
            for member, (sae, meta) in module.saes().items():  # one SAE, or every member of a sweep
                export_saelens(sae, saelens_dir(filepath, member), meta)
        self._to_announce.append(filepath)

    def _announce(self, trainer: pl.Trainer) -> None:
        """Call ``on_sae_checkpoint`` on the other callbacks for each checkpoint written since the last call.

        Deferred until the hook's saves are all done, so that ``last.ckpt`` is written before the evaluation, which
        takes seconds to minutes: a run killed while it evaluates resumes (``--ckpt_path last``) from this step's
        checkpoint, not the one before (or, at the first checkpoint, from nothing)."""
        paths, self._to_announce = self._to_announce, []
        module = trainer.lightning_module
        for filepath in paths:
            for cb in trainer.callbacks:
                if cb is not self and hasattr(cb, "on_sae_checkpoint"):
                    cb.on_sae_checkpoint(trainer, module, filepath)

    @override
    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        self._remove_beside(trainer, filepath)

    @staticmethod
    def _remove_beside(trainer: pl.Trainer, filepath: str) -> None:
        """Delete the SAELens exports, evaluation JSON and dashboards of checkpoint ``filepath`` (rank 0)."""
        if trainer.is_global_zero:
            p = Path(filepath)
            exports = [saelens_dir(p), *p.parent.glob(glob.escape(p.stem) + ".*.saelens")]
            for export in exports:
                shutil.rmtree(export, ignore_errors=True)
            for beside in p.parent.glob(glob.escape(p.name) + ".*"):  # .eval.json, .latents.html (and members')
                if beside.is_file():
                    beside.unlink(missing_ok=True)
