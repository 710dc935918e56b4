"""Run benchmarks (:mod:`gsae.evals`) on every checkpoint, and optionally every N steps, during training.

On by default: ``train.py`` adds this callback as the ``evaluation`` option group (like ``checkpoint``), so
every run evaluates each checkpoint with :data:`DEFAULT_BENCHMARKS`. Each config sizes the budgets in an
``evaluation:`` section::

    evaluation:
      options:
        loss_added: {n_seqs: 64}         # a benchmark's own n_seqs: the first n of the held-out contexts
        sensitive_directions: {n_seqs: 8, lengths: [1, 11, 31, 51, 91]}
        # dead_latents, without an n_seqs: as many contexts as its window (5 x 4096 tokens) needs

On the command line: ``--evaluation.enabled false`` turns it off; ``--evaluation.benchmarks [loss_added,steering]``
changes the set; ``--evaluation.n_seqs 32``, ``--evaluation.every_n_steps 200``.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from gsae.callbacks.checkpoint import member_path
from gsae.callbacks.figures import FigureRenderer
from gsae.evals import (
    BENCHMARKS,
    N_SEQS_OPTION,
    Task,
    about_sae,
    artifacts,
    check_benchmarks,
    check_options,
    failure,
    held_out_counts,
    json_text,
    run_benchmarks_at,
    run_options,
    run_split,
    stop_check,
    tagged_scalars,
    tagged_texts,
    tokens_per_benchmark,
)
from gsae.files import write_text

log = logging.getLogger(__name__)


#: the checkpoint key of the evaluation settings a run used (:meth:`EvaluationCallback.settings`; ``evaluate.py``
#: evaluates a checkpoint with them unless told otherwise, so it reproduces the run's ``.eval.json``)
SETTINGS_KEY = "gsae_evaluation"
#: Benchmarks run when none are named: the four promised on every checkpoint, plus decoder geometry.
DEFAULT_BENCHMARKS = ("loss_added", "dead_latents", "steering", "sensitive_directions", "decoder_geometry", "latents")


def stop_if_terminated(trainer: pl.Trainer) -> None:
    """Raise Lightning's ``SIGTERMException`` if this (one-process) run has received SIGTERM: the evaluation then
    stops between two benchmarks, its JSON unwritten (a resume redoes it), and the run saves and exits 143 as at a
    step (:mod:`gsae.sigterm`), instead of evaluating for minutes while the scheduler's grace period runs out."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    connector = getattr(trainer, "_signal_connector", None)
    if connector is not None and connector.received_sigterm:
        log.info("SIGTERM: the evaluation at step %d stops here (a resume redoes it)", trainer.global_step)
        raise SIGTERMException()


def say_sigterm_waited(trainer: pl.Trainer, step: int, world: int) -> None:
    """After a DDP evaluation during which this rank got SIGTERM: say that it ran to its end (the ranks share its
    benchmarks, so none can stop alone; they agree at the next step, :mod:`gsae.sigterm`), and what comes next. After
    the last step there is no next step: the run then ends finished, exit code 0, which said nothing of the signal."""
    connector = getattr(trainer, "_signal_connector", None)
    if not (trainer.is_global_zero and getattr(connector, "gsae_noted", False)):
        return
    last = trainer.max_steps is not None and 0 < trainer.max_steps <= step
    log.warning("SIGTERM during the evaluation at step %d: its %d ranks share the benchmarks, so it ran to its end; %s",
                step, world, "training had finished, so the run ends now (nothing to resume)" if last
                else "the run stops at the next step and saves it")


def member_saes(pl_module: pl.LightningModule) -> dict[str, tuple[torch.nn.Module, str]]:
    """``{member: (sae, hook)}`` of the SAEs a module trains: ``{"": (sae, hook)}`` for one SAE, every member of a
    sweep at its own hook (its description's, else the module's)."""
    saes = pl_module.saes() if hasattr(pl_module, "saes") else {"": (pl_module.sae, {})}
    return {member: (sae, meta.get("hook", pl_module.hook)) for member, (sae, meta) in saes.items()}


class EvaluationCallback(Callback):
    """Evaluate the SAE on held-out tokens at each checkpoint (``SAECheckpoint`` calls :meth:`on_sae_checkpoint`)
    and every ``every_n_steps`` steps; log scalars as ``eval/<benchmark>/<metric>``, figures to TensorBoard,
    and write ``<checkpoint>.eval.json`` beside each checkpoint.

    Under DDP the ranks share the work (``distributed``, default): the benchmarks of every member are cut into tasks
    (:func:`gsae.evals.evaluation_tasks`), split between the ranks by their cost at the previous evaluation
    (:func:`gsae.evals.split_tasks`), and rank 0 gathers the results, logs them and writes the files: one answer,
    equal to a one-process evaluation, in about the time of the busiest rank's share. The held-out tokens are the
    first contexts of ``trainer.datamodule.contexts("val")``, read once and reused, so every evaluation of a run sees
    the same tokens; each benchmark gets the first ``n`` of them
    (:func:`gsae.evals.held_out_counts`). Benchmarks that define ``artifacts`` get
    ``<checkpoint><suffix>`` files beside each checkpoint; ``texts`` go to TensorBoard as text. Every checkpoint
    records the settings (:meth:`settings`, under :data:`SETTINGS_KEY`), with which ``evaluate.py`` evaluates it again.
    """

    def __init__(
        self,
        enabled: bool = True,
        benchmarks: list[str] | None = None,
        n_seqs: int | None = None,
        batch_size: int | None = None,
        every_n_steps: int | None = None,
        seed: int = 0,
        options: dict[str, dict[str, Any]] | None = None,
        log_figures: bool = True,
        write_json: bool = True,
        figures_in_background: bool | None = None,
        distributed: bool = True,
    ) -> None:
        """Choose what to evaluate and when.

        Args:
            enabled: evaluate at all (``--evaluation.enabled false`` turns every evaluation off).
            benchmarks: benchmark names from ``gsae.evals.BENCHMARKS``; default loss_added, dead_latents,
                steering, sensitive_directions, decoder_geometry, latents (the latent dashboards:
                ``<checkpoint>.latents.html``) (``--evaluation.benchmarks [loss_added,steering]``).
            n_seqs: held-out contexts to read (of the data module's ``context_size``); every benchmark reads them
                all, or its own ``options`` ``n_seqs`` if smaller (``--evaluation.n_seqs 8``: a quick evaluation).
                Default (null): every benchmark reads its own ``n_seqs``, else 64, and ``dead_latents`` without
                one as many as its "batches" window needs (the g-SAE paper's 5 batches of 4096 tokens, special
                tokens not counted), so its headline ``dead_fraction_batches`` is computed at any context size.
            batch_size: sequences per forward pass; default the data module's ``batch_size`` (for g-SAEs
                the gradient that selects latents is then taken over batches of the training size).
            every_n_steps: also evaluate (log only, no JSON) every this many optimizer steps; None: only at checkpoints.
            seed: seed of the benchmarks' samples (latents, positions).
            options: per-benchmark options, e.g. ``{"steering": {"n_latents": 64}}``; ``n_seqs`` there gives
                that benchmark the first ``n_seqs`` held-out contexts (at most ``n_seqs``). Options of
                benchmarks not in ``benchmarks`` are kept but unused, so ``--evaluation.benchmarks`` alone
                changes the set of a config that sizes them all.
            log_figures: log each benchmark's figures to TensorBoard (when the logger is a TensorBoardLogger).
            write_json: write ``<checkpoint>.eval.json`` beside every checkpoint.
            figures_in_background: draw the figures in a worker process while training goes on (written at the
                evaluation's step when ready, at the latest when the fit ends: :mod:`gsae.callbacks.figures`), or
                (false) in the training process before it resumes. Default (null): in the background when training
                on a GPU, whose host has idle cores; in the training process on a CPU, whose cores train (there a
                worker cut the 2-core quickstart sweep's checkpoint stalls 8.9 → 2.4 s but slowed the run by 15%).
            distributed: under DDP, split the benchmarks (and a sweep's members) between the ranks and gather the
                results on rank 0 (default); false: rank 0 evaluates alone while the others wait at their next step
                (the evaluation then takes as long on 8 GPUs as on one, bounded by the process group's timeout).
        """
        super().__init__()
        self.enabled = enabled
        self.benchmarks = check_benchmarks(list(benchmarks or DEFAULT_BENCHMARKS), "--evaluation.benchmarks")
        unknown = set(options or {}) - set(BENCHMARKS)
        if unknown:
            raise ValueError(
                f"--evaluation.options: {sorted(unknown)} are not benchmarks; choose from {', '.join(BENCHMARKS)}"
            )
        # every option name and type now, not at the first checkpoint (1000 steps into a GPT-2 run)
        check_options(options, "--evaluation.options", extra={N_SEQS_OPTION: int})
        if n_seqs is not None and n_seqs <= 0:
            raise ValueError(f"--evaluation.n_seqs must be > 0 (got {n_seqs})")
        if every_n_steps is not None and every_n_steps <= 0:
            raise ValueError(f"--evaluation.every_n_steps must be > 0 or null (got {every_n_steps})")
        if batch_size is not None and batch_size <= 0:
            raise ValueError(f"--evaluation.batch_size must be > 0, or null for --data.batch_size (got {batch_size})")
        self.n_seqs = n_seqs
        self.batch_size = batch_size
        self.every_n_steps = every_n_steps
        self.seed = seed
        self.options = options or {}
        self.log_figures = log_figures
        self.write_json = write_json
        self.figures_in_background = figures_in_background
        self.distributed = distributed
        self.figures = FigureRenderer(background=bool(figures_in_background))
        self._tokens: torch.Tensor | None = None
        self._counts: dict[str, int | None] = {}  # benchmark -> its held-out contexts (gsae.evals.held_out_counts)
        self._per_benchmark: tuple[torch.device, dict[str, torch.Tensor]] | None = None  # (device, its tokens)
        self._last: tuple[int, dict] | None = None  # (global step, {member: results}) of the latest evaluation
        #: wall seconds of every evaluation in this process (the run summary's training rate leaves them out)
        self.seconds_total = 0.0
        #: wall seconds of each benchmark in the latest evaluation (logged as ``eval/seconds/<benchmark>``)
        self.last_seconds: dict[str, float] = {}
        self._wall: float | None = None  # the last evaluation's wall seconds, said when the next one starts
        #: held-out contexts each benchmark read in the latest evaluation (the JSON's ``contexts``)
        self.last_contexts: dict[str, int] = {}
        #: the tasks (:class:`gsae.evals.Task`) this process ran in the latest evaluation (all of them on one process)
        self.last_tasks: list[Task] = []

    # ------------------------------------------------------------------ hooks
    def on_sae_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ckpt_path: str | Path) -> None:
        """Evaluate the checkpointed state (once per step: ``last.ckpt`` reuses it); write the JSON and artifacts
        (for a sweep, one set per member: ``<checkpoint>.<member>.eval.json``, ``<checkpoint>.<member>.latents.html``)."""
        if not self.enabled or not self._takes_part(trainer):
            return
        with self._timed():
            self._evaluate_and_write(trainer, pl_module, ckpt_path)

    @contextlib.contextmanager
    def _timed(self):
        """Add the block's seconds to :attr:`seconds_total` (evaluation time, which the run summary keeps out of the
        training rate), also when it fails."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds_total += time.perf_counter() - started

    def _evaluate_and_write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ckpt_path: str | Path) -> None:
        everything = self.evaluate(trainer, pl_module)  # every rank's share under DDP (distributed)
        if not trainer.is_global_zero:
            return
        saes = member_saes(pl_module)
        lm_name = getattr(getattr(pl_module, "lm", None), "name", "")
        run = str(getattr(trainer.loggers[0], "name", "") or "") if getattr(trainer, "loggers", None) else ""
        for member, results in everything.items():
            about = about_sae(saes[member][0], run, Path(ckpt_path).name, f"member {member}" if member else "",
                              f"step {trainer.global_step}", lm_name, saes[member][1])
            if self.write_json:
                payload = {
                    "checkpoint": Path(ckpt_path).name,
                    **({"member": member} if member else {}),
                    "hook": saes[member][1],
                    "step": trainer.global_step,
                    "seed": self.seed,
                    "n_seqs": int(self._tokens.shape[0]),
                    "contexts": self.last_contexts,
                    "results": results,
                }
                write_text(member_path(ckpt_path, member, ".eval.json"), json_text(payload))
            for suffix, content in artifacts(results, about).items():
                write_text(member_path(ckpt_path, member, suffix), content)

    def evaluated(self, ckpt_path: str | Path, members: list[str]) -> bool:
        """Whether this callback has nothing to redo for checkpoint ``ckpt_path`` (its JSON is there for every member,
        or it writes none)."""
        return not (self.enabled and self.write_json) or all(
            member_path(ckpt_path, m, ".eval.json").is_file() for m in members
        )

    def settings(self) -> dict[str, Any]:
        """What decides this callback's results, as plain JSON values: benchmarks, options, ``n_seqs``, seed, batch
        size (None: the data's)."""
        return json.loads(json.dumps({"benchmarks": list(self.benchmarks), "options": self.options, "n_seqs": self.n_seqs,
                                      "seed": self.seed, "batch_size": self.batch_size}, default=str))

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.enabled:
            checkpoint[SETTINGS_KEY] = self.settings()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        self.figures.poll()  # figures drawn in the background since the last step
        step = trainer.global_step
        if self.enabled and self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and self._takes_part(trainer):
            with self._timed():
                self.evaluate(trainer, pl_module)

    def _world(self, trainer: pl.Trainer) -> int:
        """The ranks an evaluation is split between: the process group's, under DDP with ``distributed``; else 1."""
        world = int(getattr(trainer, "world_size", 1) or 1)
        if not self.distributed or world < 2 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return 1
        return world

    def _takes_part(self, trainer: pl.Trainer) -> bool:
        """Whether this process runs (a share of) the evaluation: rank 0, and every rank when it is split."""
        return trainer.is_global_zero or self._world(trainer) > 1

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.enabled and stage == "fit":  # every rank: refused before training, not at the first checkpoint
            if self._takes_part(trainer) and hasattr(getattr(trainer, "datamodule", None), "contexts"):
                # read now and kept for every checkpoint: an empty held-out set is refused as check_held_out refuses
                # it, and a short one is said at the start, not after the training up to the first checkpoint
                self.held_out_tokens(trainer)
            else:
                self.check_held_out(trainer)
        background = self.figures_in_background
        self.figures.background = trainer.strategy.root_device.type != "cpu" if background is None else background
        if self.enabled and self.log_figures and trainer.is_global_zero:
            self.figures.start()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.figures.drain()  # before Lightning finalizes the loggers

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.figures.drain()

    # ------------------------------------------------------------------ work
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, dict[str, dict]]:
        """``{member: {benchmark: result}}`` for the module's current SAEs (member ``""`` for a one-SAE run; every
        member of a sweep, on the same held-out tokens and seeded draws), logged once per global step."""
        step = trainer.global_step
        if self._last is not None and self._last[0] == step:
            return self._last[1]
        lm = pl_module.frozen_lm() if hasattr(pl_module, "frozen_lm") else pl_module.lm
        dm = trainer.datamodule
        batch_size = self.batch_size or getattr(dm, "batch_size", 8)
        saes = member_saes(pl_module)
        if self._per_benchmark is None or self._per_benchmark[0] != lm.device:  # fixed tokens: split once
            tokens = self.held_out_tokens(trainer).to(lm.device)
            self._per_benchmark = (lm.device, tokens_per_benchmark(self._counts, tokens, lm, self.options))
        per_benchmark = self._per_benchmark[1]
        if trainer.is_global_zero:  # minutes at GPT-2 scale, after the step's line: say what runs, and how long it took
            log.info("evaluating %s at step %d%s%s", ", ".join(self.benchmarks), step,
                     f" for {len(saes)} SAEs" if len(saes) > 1 else "",
                     f" (the last evaluation took {datetime.timedelta(seconds=round(self._wall))})" if self._wall else "")
        t0 = time.perf_counter()
        self.last_contexts = {name: int(t.shape[0]) for name, t in per_benchmark.items()}
        kwargs = dict(seed=self.seed, options=run_options(self.benchmarks, self.options), batch_size=batch_size,
                      on_error="raise" if os.environ.get("GSAE_DEBUG") else "record")
        world = self._world(trainer)
        if world > 1:
            everything = self._evaluate_share(trainer, saes, lm, per_benchmark, world, kwargs)
            say_sigterm_waited(trainer, step, world)
        else:
            self.last_seconds = {}
            self.last_tasks = [Task(name, tuple(saes)) for name in self.benchmarks]
            # one set of LM passes for every benchmark and member (shared harvests; loss_added's run_many), and one per
            # batch for all the hooks of a sweep whose members read different hooks
            with stop_check(lambda: stop_if_terminated(trainer)):  # one process; DDP ranks agree at the next step
                everything = run_benchmarks_at(list(self.benchmarks), saes, lm, per_benchmark,
                                               seconds=self.last_seconds, **kwargs)
        self._last = (step, everything)
        if not trainer.is_global_zero:
            return everything
        for member, res in everything.items():  # a benchmark that raised: said once, training goes on
            for name, r in res.items():
                if failure(r):
                    log.error("evaluation: %s%s failed at step %d (%s); the run goes on (GSAE_DEBUG=1 raises)",
                              name, f" of {member}" if member else "", step, failure(r))
        self._log(trainer, everything, step, t0)
        self._wall = time.perf_counter() - t0
        return everything

    def _evaluate_share(self, trainer, saes, lm, tokens, world: int, kwargs: dict) -> dict[str, dict[str, dict]]:
        """This rank's share of the evaluation, split by the seconds each task took at the previous evaluation (which
        every rank holds after the gather), then every rank's results, gathered (:func:`gsae.evals.run_split`):
        ``{member: {benchmark: result}}`` in the order of ``saes`` and :attr:`benchmarks`, on every rank."""
        everything, self.last_seconds, self.last_tasks = run_split(
            list(self.benchmarks), saes, lm, tokens, world=world, rank=trainer.global_rank,
            seconds_before=self.last_seconds, **kwargs)
        return everything

    def held_out_tokens(self, trainer: pl.Trainer) -> torch.Tensor:
        """``(n, T)`` first held-out contexts of the data module, the most any benchmark reads (read once)."""
        if self._tokens is None:
            dm = trainer.datamodule
            if dm is None or not hasattr(dm, "contexts"):
                raise ValueError(
                    "EvaluationCallback needs a data module with contexts('val') (gsae.data.TokenDataModule)"
                )
            first = next(iter(dm.contexts("val")), None)
            if first is None:
                raise ValueError(self._no_held_out(dm))
            n_read, self._counts = held_out_counts(self.benchmarks, self.n_seqs, self.options, len(first))
            # spread over the held-out set (not its first contexts: a few documents); evaluate.py takes the same
            ctx = dm.evaluation_contexts(n_read) if hasattr(dm, "evaluation_contexts") else list(
                itertools.islice(dm.contexts("val"), n_read)
            )
            self._tokens = torch.tensor(ctx, dtype=torch.long)
            if len(ctx) < n_read:  # said once (rank 0): every benchmark's numbers read fewer contexts than asked for
                from lightning.pytorch.utilities import rank_zero_warn

                window = (" (dead_latents' window of 5 x 4096 tokens is then incomplete: no dead_fraction_batches)"
                          if "dead_latents" in self.benchmarks else "")
                rank_zero_warn(f"evaluation: the held-out set gives {len(ctx)} contexts of the {n_read} the benchmarks "
                               f"read{window}; hold out more documents (--data.val_documents, --data.val_split) for "
                               "numbers comparable across runs")
        return self._tokens

    def check_held_out(self, trainer: pl.Trainer) -> None:
        """A one-line error if the data module holds out no context to evaluate on (it used to end the run at its
        first checkpoint, and every resume at the next)."""
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "contexts") and next(iter(dm.contexts("val")), None) is None:
            raise ValueError(self._no_held_out(dm))

    @staticmethod
    def _no_held_out(dm) -> str:
        where = (f"--data.val_split {dm.val_split!r}" if getattr(dm, "val_split", None)
                 else f"--data.val_documents {getattr(dm, 'val_documents', '?')}")
        return (f"{where}: the held-out set gives no context to evaluate on; hold out more documents, or turn the "
                "evaluation off (--evaluation.enabled false)")

    def _log(self, trainer: pl.Trainer, everything: dict[str, dict[str, dict]], step: int, started: float) -> None:
        from torch.utils.tensorboard import SummaryWriter

        def tag(t: str, member: str) -> str:  # a sweep member's tags: eval/<member>/<benchmark>/<metric>
            return f"eval/{member}/{t[len('eval/'):]}" if member else t

        values: dict[str, float] = {}
        for k, v in self.last_seconds.items():  # a benchmark run in parts: their sum
            name = f"eval/seconds/{k.partition('#')[0]}"
            values[name] = values.get(name, 0.0) + v
        for member, results in everything.items():
            values.update({tag(t, member): v for t, v in tagged_scalars(results).items()})
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
        tensorboards = [lg for lg in trainer.loggers if isinstance(getattr(lg, "experiment", None), SummaryWriter)]
        for member, results in everything.items():
            # a sweep member's figures and texts: in its own run (gsae.loggers.TensorBoardLogger), else tagged with it
            own = [lg.member_experiment(member) for lg in tensorboards if member and member in getattr(lg, "members", ())]
            shared = [lg.experiment for lg in tensorboards if not (member and member in getattr(lg, "members", ()))]
            for writers, in_tag in ((own, False), (shared, True)):
                if not writers:
                    continue
                if self.log_figures:
                    self.figures.submit(writers, step, f"eval/{member}" if member and in_tag else "eval", results)
                for t, text in tagged_texts(results).items():
                    for w in writers:
                        w.add_text(tag(t, member) if in_tag else t, text, global_step=step)
        names = sorted({b for r in everything.values() for b, res in r.items() if not failure(res)})
        world = self._world(trainer)
        log.info("evaluated %s at step %d%s%s in %s", ", ".join(names), step,
                 f" for {len(everything)} SAEs" if len(everything) > 1 else "", f" on {world} ranks" if world > 1 else "",
                 datetime.timedelta(seconds=round(time.perf_counter() - started)))
        log.debug("eval at step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in values.items()))
