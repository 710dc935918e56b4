"""Checkpointing that also writes a SAELens export beside each checkpoint and tells evaluation
callbacks where the new checkpoint is."""

from __future__ import annotations

import glob
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from gsae.export import export_saelens, saved_step
from gsae.files import SameFolderCheckpointIO, remove, remove_partials, size_text, symlink
from gsae.loggers import LOG_FOLDER_KEY, log_folder_record

log = logging.getLogger(__name__)


def saelens_dir(ckpt_path: str | Path, member: str = "") -> Path:
    """Where the SAELens export of a checkpoint goes: ``<name>.ckpt`` -> ``<name>.saelens/``; a sweep member's
    goes to ``<name>.<member>.saelens/``."""
    p = Path(ckpt_path)
    return p.with_name(p.stem + (f".{member}" if member else "") + ".saelens")


def member_path(ckpt_path: str | Path, member: str, suffix: str) -> Path:
    """A file beside a checkpoint for one SAE: ``<ckpt><suffix>`` (``.eval.json``, ``.latents.html``), or
    ``<ckpt>.<member><suffix>`` for a sweep member."""
    return Path(str(ckpt_path) + (f".{member}" if member else "") + suffix)


def beside_files(ckpt_path: str | Path) -> list[Path]:
    """What the run wrote beside checkpoint ``ckpt_path`` about its state: SAELens exports (``<stem>.saelens``,
    ``<stem>.<member>.saelens``; folders or links) and ``<name>.*`` files (evaluation JSON, dashboards)."""
    p = Path(ckpt_path)
    exports = [e for e in [saelens_dir(p), *p.parent.glob(glob.escape(p.stem) + ".*.saelens")] if e.is_symlink() or e.exists()]
    files = [f for f in p.parent.glob(glob.escape(p.name) + ".*") if f.is_file() or f.is_symlink()]
    return exports + files


#: the folder beside a checkpoint folder that a resume from an earlier checkpoint moves the later ones into
SUPERSEDED = "{folder}.superseded-after-step{step}"


def set_aside_later_checkpoints(folder: str | Path, step: int, keep: str | Path) -> tuple[Path, list[str]] | None:
    """A resume from step ``step`` (checkpoint ``keep``) of a run that had gone further: the checkpoints of later
    steps (and their exports, evaluation JSON and dashboards, and a ``last.ckpt`` that holds or links to one) belong
    to the abandoned continuation. They move to ``<folder>.superseded-after-step<step>/`` beside the checkpoint
    folder, so that the run folder holds one history: ``evaluate.py RUN`` does not mix them into the new run's
    steps, and ``--ckpt_path last`` after a kill does not resume the abandoned branch (``last.ckpt`` linked to its
    newest step). With another ``--checkpoint.every_n_train_steps`` the new run never writes their steps again.
    Returns ``(that folder, the checkpoint names moved)``, or ``None`` if none was later."""
    folder, keep = Path(folder), Path(keep).resolve()
    later = []
    for path in sorted(folder.glob("*.ckpt")):
        if path.is_symlink() or path.resolve() == keep:
            continue
        try:
            saved = saved_step(path)
        except ValueError:  # unreadable: left where it is
            continue
        if saved > step:
            later.append(path)
    if not later:
        return None
    base = dest = folder.parent / SUPERSEDED.format(folder=folder.name, step=step)
    n = 1
    while dest.exists():  # rolled back to this step before: each abandoned continuation its own folder
        n += 1
        dest = base.with_name(f"{base.name}-{n}")
    dest.mkdir()
    for path in later:
        for p in [path, *beside_files(path)]:
            os.replace(p, dest / p.name)
    for link in folder.glob("*.ckpt"):  # last.ckpt linked to a checkpoint moved: it and its export links go too
        if link.is_symlink() and not link.exists():
            for p in [link, *beside_files(link)]:
                if p.is_symlink():
                    remove(p, ignore_errors=True)
                else:  # last.ckpt.eval.json: a copy describing the abandoned state
                    os.replace(p, dest / p.name)
    return dest, [p.name for p in later]


def checkpoint_folder(trainer: pl.Trainer, callback: ModelCheckpoint) -> Path:
    """The folder ``callback`` writes its checkpoints to: its ``dirpath``, else
    ``<default_root_dir>/<logger name, or run>/checkpoints`` (what :meth:`SAECheckpoint.setup` resolves)."""
    if callback.dirpath:
        return Path(callback.dirpath)
    name = trainer.logger.name if trainer.logger is not None and trainer.logger.name else "run"
    return Path(trainer.default_root_dir) / name / "checkpoints"


def unfinished_at(
    folder: Path, step: int, members: list[str], callbacks: list, export_saelens: bool = True
) -> tuple[Path | None, bool, bool]:
    """``(checkpoint, export missing, evaluation missing)`` for the schedule's checkpoint of ``step`` in ``folder``
    (a kill after it was written cut short what comes after it: its SAELens exports, then the evaluation callbacks'
    JSON); ``(None, False, False)`` if there is no such checkpoint."""
    ckpt = next(iter(sorted(folder.glob(f"*step={step}.ckpt"))), None)
    if ckpt is None:
        return None, False, False
    export = export_saelens and any(not saelens_dir(ckpt, m).is_dir() for m in members)
    evaluate = any(not cb.evaluated(ckpt, members) for cb in callbacks if hasattr(cb, "evaluated"))
    return ckpt, export, evaluate


class SAECheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps checkpoints in ``<root>/<run name>/checkpoints`` (the same folder
    across restarts, so ``--ckpt_path last`` finds them; a checkpoint of a step written again replaces the old one),
    writes ``<name>.saelens/`` beside every
    ``<name>.ckpt``, and calls ``on_sae_checkpoint(trainer, pl_module, path)`` on every other callback
    that has it (the evaluation callbacks)."""

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str | None = None,
        every_n_train_steps: int | None = 1000,
        save_last: bool | Literal["link"] = "link",
        save_top_k: int = -1,
        export_saelens: bool = True,
    ) -> None:
        """Checkpoint every ``every_n_train_steps`` steps and at the end of training.

        Args:
            dirpath: folder of the checkpoints (default ``<default_root_dir>/<run name>/checkpoints``).
            filename: Lightning checkpoint filename template (default ``epoch={epoch}-step={step}``).
            every_n_train_steps: save every this many optimizer steps (the final step is always saved).
            save_last: also keep ``last.ckpt`` (what ``--ckpt_path last`` resumes from). ``"link"`` (the default):
                a symbolic link to the step checkpoint just written, and ``last[.<member>].saelens`` links to its
                exports, so each checkpoint is written once (a Table 1 sweep's is ~3.5 GB with its exports), not
                twice; where this step has no step checkpoint (a SIGTERM's save) or the folder takes no links,
                ``last.ckpt`` is written whole. ``true``: always written whole (a copy a later clean-up of step
                checkpoints cannot leave dangling); ``false``: none.
            save_top_k: how many step checkpoints to keep, newest first (-1 keeps all).
            export_saelens: write a SAELens-format export beside every checkpoint.
        """
        if filename is not None and ("/" in filename or os.sep in filename or filename in ("", ".", "..")):
            raise ValueError(f"--checkpoint.filename {filename!r}: a file name, not a path (the folder is "
                             "--checkpoint.dirpath; one run, one folder)")
        if every_n_train_steps is not None and every_n_train_steps < 0:
            raise ValueError(f"--checkpoint.every_n_train_steps must be >= 0 (got {every_n_train_steps}; 0 or null: "
                             "only at the end of training)")
        if save_top_k < -1:
            raise ValueError(f"--checkpoint.save_top_k must be -1 (keep all) or >= 0 (got {save_top_k})")
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            every_n_train_steps=every_n_train_steps,
            save_last=bool(save_last),  # Lightning's own "link" would link a SIGTERM's last.ckpt to an older step
            save_top_k=save_top_k,
            monitor="step" if save_top_k > 0 else None,
            mode="max",
            # a resume from an earlier checkpoint (or from the first, whose state names no last.ckpt yet) writes the
            # steps it reaches under their own names, not as last-v1.ckpt / epoch=0-step=N-v1.ckpt beside the files
            # of the steps it redoes; a new run never shares the folder (gsae.cli.check_run_folder)
            enable_version_counter=False,
        )
        self.export_saelens = export_saelens
        self.link_last = save_last == "link"
        self._step_checkpoint: tuple[int, str] | None = None  # (global step, path) of the latest step checkpoint
        self._saving_last = False
        self._room_said = False  # warned that the checkpoints to come will not fit (once per run)
        self._batch_epoch: int | None = None  # the epoch of the latest training batch (names the final checkpoint)
        # Lightning epochs a resume added without data behind them: a run resumed from its final checkpoint starts a new
        # epoch (Lightning closed the old one at max_steps), though the token stream just goes on; names leave them out
        self._epochs_added = 0
        self._loaded_batch_epoch: int | None = None
        self._to_announce: list[str] = []  # checkpoints written, not yet handed to the evaluation callbacks
        self._trained = False  # on_train_start ran (a fit resumed at max_steps has none)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.dirpath is None:  # resolved, as Lightning resolves a given dirpath: one folder, one spelling
            self.dirpath = os.path.realpath(checkpoint_folder(trainer, self))
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not $TMPDIR then a move (gsae.files)
            trainer.strategy.checkpoint_io = SameFolderCheckpointIO()
        if trainer.is_global_zero and Path(self.dirpath).is_dir():
            remove_partials(self.dirpath)  # what a killed save left
        super().setup(trainer, pl_module, stage)

    @property
    @override
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint, without the interval: Lightning's holds
        ``every_n_train_steps``, so a resume with another ``--checkpoint.every_n_train_steps`` dropped the state (with
        a warning asking to add the callback) and the next save wrote ``last-v1.ckpt`` beside a ``last.ckpt`` left at
        the old step."""
        # nor the monitor, which --checkpoint.save_top_k sets ("step" to keep the newest k, else none): a resume with
        # another save_top_k got the same warning and dropped the state
        return self._generate_state_key(monitor=None, mode=self.mode)

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Record the run's TensorBoard folder, where a resume from this checkpoint goes on logging
        (:func:`gsae.loggers.continue_log_folder`). Rank 0 writes the checkpoint and owns the folder."""
        record = log_folder_record(trainer.loggers, self.dirpath) if trainer.is_global_zero and self.dirpath else None
        if record is not None:
            checkpoint[LOG_FOLDER_KEY] = record

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Take this callback's state from checkpoints written before :attr:`state_key` left out the interval."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key not in states:
            ours = [k for k in states if isinstance(k, str) and k.startswith(type(self).__name__ + "{")]
            if len(ours) == 1:
                states[self.state_key] = states.pop(ours[0])

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the checkpoint bookkeeping, also when the run folder was moved, copied or spelled another way
        (``--trainer.default_root_dir runs`` then ``/abs/runs``): Lightning then warns that the dirpath changed and drops
        the saved paths, so ``save_top_k`` no longer knew the checkpoints it had kept (nor ``last.ckpt``'s). The saved
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
        self._loaded_batch_epoch = state_dict.get("batch_epoch")
        self._keep_newest()

    def _keep_newest(self) -> None:
        """With ``save_top_k`` k > 0, count the step checkpoints already in the folder among the k kept (newest
        first), whatever ``save_top_k`` the run had before: Lightning only counts those its state lists, so a resume
        that lowers ``save_top_k`` to free disk space (as a full disk's error advises) deleted none of them. The
        surplus goes at the resumed run's first checkpoint, once a newer one is on disk."""
        self._surplus = []
        if self.save_top_k <= 0 or not self.dirpath or not Path(self.dirpath).is_dir():
            return
        found = {}
        for path in Path(self.dirpath).glob("*.ckpt"):  # by the step each holds (--checkpoint.filename may omit it)
            if not path.is_symlink() and not path.name.startswith(self.CHECKPOINT_NAME_LAST):
                try:
                    found[str(path)] = saved_step(path)
                except ValueError:  # unreadable: neither kept nor removed
                    continue
        newest = sorted(found, key=found.get, reverse=True)
        keep, self._surplus = newest[: self.save_top_k], newest[self.save_top_k :]
        self.best_k_models = {p: torch.tensor(float(found[p])) for p in keep}
        if not keep:
            return
        self.best_model_path = keep[0]
        self.best_model_score = self.best_k_models[keep[0]]
        if len(keep) == self.save_top_k:
            self.kth_best_model_path, self.kth_value = keep[-1], self.best_k_models[keep[-1]]

    @override
    def _update_best_and_save(self, current: torch.Tensor, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._update_best_and_save(current, trainer, monitor_candidates)
        surplus, self._surplus = getattr(self, "_surplus", []), []
        for path in surplus:  # beyond save_top_k when the run resumed (_keep_newest); a newer checkpoint is written
            if Path(path).exists():
                self._remove_checkpoint(trainer, path)

    @override
    def state_dict(self) -> dict[str, Any]:
        """Lightning's, plus the epoch the latest batch's checkpoint names (:meth:`_monitor_candidates`)."""
        state = super().state_dict()
        if self._batch_epoch is not None:
            state["batch_epoch"] = self._batch_epoch - self._epochs_added
        return state

    @override
    def _monitor_candidates(self, trainer: pl.Trainer) -> dict[str, Any]:
        """Lightning's, with the epoch of the token stream: without the epochs a resume from a final checkpoint added
        (``epoch=1-step=N.ckpt`` after resuming a finished run, though no data was read twice)."""
        candidates = super()._monitor_candidates(trainer)
        candidates["epoch"] = torch.tensor(int(candidates.get("epoch", trainer.current_epoch)) - self._epochs_added)
        return candidates

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Always keep the final state: save it unless this step was just saved."""
        if trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step and not trainer.interrupted:
            candidates = self._candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)
        self._announce(trainer)

    def _candidates(self, trainer: pl.Trainer) -> dict[str, Any]:
        """What names a checkpoint saved outside Lightning's hooks (the final one, a SIGTERM's): Lightning has
        closed the epoch by then, so the epoch is the one of the last training batch."""
        candidates = self._monitor_candidates(trainer)
        if self._batch_epoch is not None:
            candidates["epoch"] = torch.tensor(self._batch_epoch - self._epochs_added)
        return candidates

    @staticmethod
    def _export(module: pl.LightningModule, filepath: str | Path) -> None:
        """The SAELens export of every SAE of ``module`` (one, or each member of a sweep) beside ``filepath``, with the
        run's evaluation settings (``evaluate.py`` on the export then evaluates as on the checkpoint)."""
        trainer = module._trainer
        settings = next((cb.settings() for cb in (trainer.callbacks if trainer is not None else [])
                         if hasattr(cb, "settings") and getattr(cb, "enabled", False)), None)
        for member, (sae, meta) in module.saes().items():
            export_saelens(sae, saelens_dir(filepath, member), {**meta, "evaluation": settings} if settings else meta)

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
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """On a resume, finish what a kill left undone at the step resumed from: its SAELens export (written after
        the checkpoint) and its evaluation (after both; minutes at GPT-2 scale, so the likeliest work to be cut
        short). The weights now are that checkpoint's, so both are what the uninterrupted run wrote."""
        super().on_train_start(trainer, pl_module)
        if self._loaded_batch_epoch is not None:  # restored: the epochs Lightning opened since (see __init__)
            self._epochs_added = max(trainer.current_epoch - self._loaded_batch_epoch, 0)
        self._trained = True
        self._finish_resumed(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A resume from a checkpoint already at ``max_steps`` trains nothing (no :meth:`on_train_start`), but may have
        its export or evaluation to finish (a time limit during the final evaluation): ``train.py`` then runs the
        fit for it (:func:`unfinished_at`), and it is done here, with the checkpoint's weights restored."""
        super().on_fit_end(trainer, pl_module)
        if not self._trained:
            self._finish_resumed(trainer, pl_module)

    def _finish_resumed(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.ckpt_path or self.dirpath is None:
            return
        redo = None  # rank 0 sees the files (other nodes may not); under DDP every rank evaluates a share
        if trainer.is_global_zero:
            step = trainer.global_step
            ckpt, export, evaluate = unfinished_at(Path(self.dirpath), step, list(pl_module.saes()), trainer.callbacks,
                                                   self.export_saelens)
            if export:
                self._export(pl_module, ckpt)
            if evaluate:
                log.info("%s has no evaluation (the run was stopped during it): evaluating it now", ckpt.name)
                redo = [str(ckpt)]
                last = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
                if last.is_symlink() and last.resolve() == ckpt.resolve():  # its JSON too (the same results)
                    redo.append(str(last))
                for logger in trainer.loggers:  # what the cut-short evaluation logged: once in TensorBoard
                    if hasattr(logger, "drop_redone"):
                        logger.drop_redone(step)
        redo = trainer.strategy.broadcast(redo, src=0)
        if redo is not None:
            self._to_announce.extend(redo)
            self._announce(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """On SIGTERM (a scheduler's preemption or time limit, ``kill``), save the step reached in ``last.ckpt``
        (and its export) before the process ends: the resume loses no step. Every rank gets the signal at the same
        step (Lightning broadcasts it), so the collective save is safe. No evaluation: a preempted job has seconds."""
        if (isinstance(exception, SIGTERMException) and self.save_last and trainer.global_step > 0
                and self._last_global_step_saved != trainer.global_step):
            self._save_last_checkpoint(trainer, self._candidates(trainer))
            self._to_announce.clear()
        super().on_exception(trainer, pl_module, exception)

    @override
    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        """``last.ckpt`` (and its exports) as links to this step's checkpoint (``save_last="link"``), else written
        whole (Lightning's)."""
        step = self._step_checkpoint
        if not (self.save_last and self.link_last and step is not None and step[0] == trainer.global_step):
            self._saving_last = True
            try:
                return super()._save_last_checkpoint(trainer, monitor_candidates)
            finally:
                self._saving_last = False
        filepath = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        linked = self._link(trainer, step[1], filepath)
        if not linked:  # no links on this filesystem: a copy, as save_last=true
            self.link_last = False
            return self._save_last_checkpoint(trainer, monitor_candidates)
        previous, self.last_model_path = self.last_model_path, filepath
        self._last_checkpoint_saved = filepath
        if previous and self._should_remove_checkpoint(trainer, previous, filepath):
            self._remove_checkpoint(trainer, previous)
        self._to_announce.append(filepath)

    def _link(self, trainer: pl.Trainer, target: str, filepath: str) -> bool:
        """Rank 0 points ``filepath`` and its exports at ``target``'s (relative links, so the run folder can move):
        each link made under a temporary name and renamed over the old file, so a kill leaves the old ``last.ckpt``
        or the new one. Whether it could (every rank learns rank 0's answer)."""
        ok = True
        if trainer.is_global_zero and os.path.abspath(target) != os.path.abspath(filepath):
            try:
                symlink(target, filepath)
            except OSError as e:
                log.warning("could not link %s to %s (%s): writing last.ckpt whole from now on", filepath, target, e)
                ok = False
            if ok:
                self._remove_beside(trainer, filepath)  # the old state's export, JSON, dashboards
                if self.export_saelens:
                    for member in trainer.lightning_module.saes():
                        if saelens_dir(target, member).is_dir():
                            symlink(saelens_dir(target, member), saelens_dir(filepath, member))
        return bool(trainer.strategy.broadcast(ok, src=0))

    @override
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)  # written whole, then renamed over the old file (gsae.files)
        if not self._saving_last:
            self._step_checkpoint = (trainer.global_step, filepath)
        # a checkpoint written over another (last.ckpt): what was beside the old one describes the old state; removed
        # once the new one is in place, so a kill during the save leaves the old checkpoint with its export
        self._remove_beside(trainer, filepath)
        if trainer.is_global_zero and self.export_saelens:
            self._export(trainer.lightning_module, filepath)
        if not self._saving_last:
            self._check_room(trainer, filepath)
        self._to_announce.append(filepath)

    def _check_room(self, trainer: pl.Trainer, filepath: str) -> None:
        """Warn, once, when the checkpoints still to come (to ``max_steps``) will not fit on the disk of the run
        folder, measured by the one just written with its exports: a run that would stop on a full disk hours later
        (a Table 1 sweep's checkpoint is ~3.5 GB) says so at its first checkpoint, while there is time to make room."""
        every, max_steps, step = self._every_n_train_steps, trainer.max_steps, trainer.global_step
        if self._room_said or not trainer.is_global_zero or not every or max_steps is None or max_steps <= step:
            return
        path = Path(filepath)
        if not path.is_file():  # a remote path (s3://...)
            return
        remaining = max_steps // every - step // every + (1 if max_steps % every else 0)  # the final step's too
        size = path.stat().st_size + sum(
            f.stat().st_size for member in trainer.lightning_module.saes() for f in saelens_dir(path, member).glob("*")
        )
        if self.save_top_k > 0:  # at most save_top_k on disk, and the next written before the oldest goes
            held = len([p for p in path.parent.glob("*.ckpt") if not p.is_symlink() and not p.name.startswith("last")])
            remaining = min(remaining, max(self.save_top_k + 1 - held, 1))
        copies = 1 if self.link_last or not self.save_last else 2  # last.ckpt written whole: a second copy each time
        need, free = remaining * copies * size, shutil.disk_usage(path.parent).free
        if need <= free:
            return
        self._room_said = True
        fits = int(free // (copies * size))
        stops = min((step // every + fits + 1) * every, max_steps)
        log.warning(
            "checkpoints: %s each with its exports; the %d still to come (to step %d) need %s more, and %s is free on "
            "the disk of %s: the run will stop on a full disk at the checkpoint of step %d. Make room, or keep fewer "
            "with --checkpoint.save_top_k",
            size_text(size), remaining, max_steps, size_text(need), size_text(free), path.parent, stops,
        )

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
            for beside in beside_files(filepath):  # last.saelens: the link, not the step checkpoint's export
                remove(beside, ignore_errors=True)
