"""The command line: a LightningCLI whose typed ``__init__`` arguments are the configuration.

``python train.py`` trains the default GPT-2 config; ``--config configs/X.yaml`` any config; every
option can be overridden (``--model.sae.k 64``); ``--help`` lists them with their docstrings;
``--print_config`` prints the resolved config; ``--ckpt_path last`` resumes.
"""

from __future__ import annotations

import ast
import errno
import logging
import os
import re
import shlex
import signal
import sys
import time
import warnings
from argparse import ArgumentError
from pathlib import Path
from types import SimpleNamespace

from jsonargparse import lazy_instance
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from safetensors import SafetensorError

from gsae import sigterm
from gsae.allocator import tune_malloc
from gsae.callbacks.checkpoint import SAECheckpoint, checkpoint_folder
from gsae.callbacks.evaluation import EvaluationCallback
from gsae.cli_errors import parse_error_line
from gsae.data.datamodule import TokenDataModule
from gsae.loggers import LOG_FOLDER_KEY, continue_log_folder, curves_first
from gsae.startup import log_to_terminal, one_line_warnings
from gsae.systems.base import SAESystem

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "gpt2" / "gsae.yaml"

# Errors a user causes with a bad option or file: reported as one line, no traceback.
# (OSError: a folder that is a file, a path without permission; MisconfigurationException: Lightning's own checks of
# --trainer options, e.g. --trainer.accelerator gpu without one)
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, OSError, RuntimeError, MisconfigurationException, SafetensorError
)


# The logger's default folder: replaced by --trainer.default_root_dir, so one run writes under one folder.
RUN_ROOT = "<default_root_dir>"


class GSAECLI(LightningCLI):
    """LightningCLI with the LM linked from the model to the data module and ``--ckpt_path``.

    One run, one folder: checkpoints, SAELens exports, evaluation JSON (``<root>/<name>/checkpoints``),
    TensorBoard events and ``config.yaml`` (``<root>/<name>/version_N``) all go under
    ``--trainer.default_root_dir`` (default ``checkpoints``) unless the user sets the logger's ``save_dir``.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.lm", "data.lm", apply_on="instantiate")
        parser.add_lightning_class_args(SAECheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.every_n_train_steps": 1000})
        # benchmarks on every checkpoint, on by default: --evaluation.enabled false / --evaluation.benchmarks [...]
        parser.add_lightning_class_args(EvaluationCallback, "evaluation")
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="Checkpoint to resume from: a path, or 'last' for the newest last.ckpt of this run.",
        )

    def before_instantiate_classes(self) -> None:
        trainer = self.config.get("trainer")
        logger = trainer.get("logger") if trainer is not None else None
        init = logger.get("init_args") if hasattr(logger, "get") else None
        if init is not None and init.get("save_dir") == RUN_ROOT:
            init["save_dir"] = trainer.get("default_root_dir") or os.getcwd()

    def instantiate_trainer(self, **kwargs):
        """The trainer, with gsae's console callbacks added (see :func:`console_callbacks`)."""
        config = self._get(self.config_init, "trainer", default={})
        kwargs.setdefault("callbacks", [*_as_list(config.get("callbacks")), *console_callbacks(config)])
        trainer = super().instantiate_trainer(**kwargs)
        curves_first(trainer.loggers)  # no `epoch` / `hp_metric` cards in TensorBoard
        return trainer


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, list | tuple) else [x]


def console_callbacks(trainer_config: dict) -> list:
    """The run summary that ``main`` prints, and the step progress bar (unless the trainer's progress bar is off
    or another is configured)."""
    from lightning.pytorch.callbacks import ProgressBar

    from gsae.callbacks.progress import StepProgressBar
    from gsae.callbacks.summary import RunSummary

    configured = _as_list(trainer_config.get("callbacks"))
    out = [] if any(isinstance(c, RunSummary) for c in configured) else [RunSummary()]
    if trainer_config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in configured):
        out.append(StepProgressBar())
    return out


def print_summary(cli: GSAECLI, resume: str) -> None:
    """Print the :class:`~gsae.callbacks.summary.RunSummary` of the run (on rank 0, once training ended or stopped),
    with the command that resumes it (``resume``, :func:`resume_command`) if it was stopped."""
    from gsae.callbacks.summary import RunSummary

    if not cli.trainer.is_global_zero:
        return
    for cb in cli.trainer.callbacks:
        if isinstance(cb, RunSummary) and cb.summary is not None:
            print(cb.render(resume), flush=True)


def resume_command(args: list[str], trainer=None) -> str:
    """``python train.py ARGS --ckpt_path last`` (any ``--ckpt_path`` in ``args`` replaced); where ``trainer``'s
    processes were started by someone else (``torchrun …``, ``srun …``) the launcher is the user's, so it is left as
    ``<launcher>``. (``--trainer.strategy ddp``/``ddp_fork`` on one node: Lightning starts them, from ``python``.)
    Call it before ``fit``: Lightning's own launcher then sets ``LOCAL_RANK``, by which its environment reads as
    external too."""
    kept, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--ckpt_path":
            skip = True
        elif not a.startswith("--ckpt_path="):
            kept.append(a)
    env = getattr(getattr(trainer, "strategy", None), "cluster_environment", None)
    launcher = "<launcher>" if env is not None and env.creates_processes_externally else "python"
    return f"{launcher} train.py {shlex.join([*kept, '--ckpt_path', 'last'])}"


def trainer_defaults() -> dict:
    return {
        "default_root_dir": "checkpoints",
        "logger": lazy_instance(TensorBoardLogger, save_dir=RUN_ROOT, name="gsae"),
        "max_epochs": -1,
        "log_every_n_steps": 10,
        "enable_model_summary": False,
    }


class _SayDroppedOptions(logging.Filter):
    """jsonargparse's parser log, filtered to one thing: a ``class_path`` replaced on the command line (or by a later
    config) drops the old class's options that the new one does not take, which jsonargparse says at debug level only
    (``--model.class_path gsae.systems.E2ESAESystem`` over the TopK quickstart dropped its ``buffer_size: 4096``). Each
    drop is said once (the parser meets it once per parse of the defaults, the config and the arguments), rank 0."""

    _DROP = re.compile(r"class_path change from '([^']+)' to '([^']+)', discarding init_args: (.*)\.$", re.S)

    def __init__(self) -> None:
        super().__init__()
        self.said: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        from lightning.pytorch.utilities import rank_zero_warn

        found = self._DROP.search(record.getMessage())
        if found is not None and found.group(0) not in self.said:
            self.said.add(found.group(0))
            old, new, dropped = found.groups()
            try:  # "{'buffer_size': 4096}" -> "buffer_size=4096"; None: a default nobody set (the sweep configs'
                # SweepSAESystem replacing the parser's own SAESystem drops its sae=None)
                dropped = ", ".join(f"{k}={v!r}" for k, v in ast.literal_eval(dropped).items() if v is not None)
            except (ValueError, SyntaxError, AttributeError):
                pass
            if not dropped:
                return False
            rank_zero_warn(f"{new} replaces {old}: its options that {new.rsplit('.', 1)[-1]} does not take are "
                           f"dropped ({dropped})", category=UserWarning)
        return False  # nothing else of the parser's debug log is printed


def parser_log() -> logging.Logger:
    """The logger handed to the CLI's parser (see :class:`_SayDroppedOptions`)."""
    logger = logging.getLogger("gsae.cli.parser")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.filters = [_SayDroppedOptions()]  # a new parse, a new memory of what was said
    return logger


def build_cli(args: list[str] | None = None, run_defaults: bool = True) -> GSAECLI:
    """Parse ``args`` and instantiate model, data and trainer (does not train)."""
    args = list(sys.argv[1:] if args is None else args)
    if run_defaults and not any(_is_config_flag(a) for a in args) and not _is_help(args):
        args = ["--config", str(DEFAULT_CONFIG), *args]
    return GSAECLI(
        SAESystem,
        TokenDataModule,
        subclass_mode_model=True,
        run=False,
        args=args,
        auto_configure_optimizers=False,
        trainer_defaults=trainer_defaults(),
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        # parse errors raise (main() prints them as one line); no abbreviations: --trainer.max_step would silently
        # mean --trainer.max_steps, and a prefix stops naming one option once another shares it
        parser_kwargs={"exit_on_error": False, "allow_abbrev": False, "logger": parser_log()},
    )


def _is_config_flag(arg: str) -> bool:
    """``--config`` or ``-c`` (also ``-cFILE``, ``--config=FILE``): a config file the user gave, so the default GPT-2
    config does not go underneath it. (Abbreviations such as ``--conf`` are refused by the parser.)"""
    return (arg.startswith("-c") and not arg.startswith("--")) or arg.split("=", 1)[0] == "--config"


def _is_help(args: list[str]) -> bool:
    return any(a in ("-h", "--help") or a.endswith(".help") for a in args)


def resolve_ckpt_path(cli: GSAECLI) -> str | None:
    """``last`` -> the newest readable checkpoint in the run's checkpoint folder (:func:`newest_checkpoint`; clear
    error if there is none); any other path is checked to be a gsae checkpoint."""
    path = cli.config.get("ckpt_path")
    if path is None:
        return None
    if path == "last":
        looked = []
        for cb in cli.trainer.checkpoint_callbacks:
            folder = checkpoint_folder(cli.trainer, cb)
            looked.append(folder)
            newest = newest_checkpoint(folder, say=cli.trainer.is_global_zero)
            if newest is not None:
                return newest
        folders = ", ".join(str(f) for f in looked) or "no checkpoint folder configured"
        raise FileNotFoundError(f"--ckpt_path last: no readable checkpoint in {folders}; nothing to resume")
    if not Path(path).is_file():
        raise FileNotFoundError(f"--ckpt_path: no checkpoint at {path!r}")
    _check_checkpoint(path)
    return path


def newest_checkpoint(folder: Path, say: bool = True) -> str | None:
    """The checkpoint of ``folder`` that holds the run's latest state, or ``None`` if none reads as a gsae checkpoint.

    That is ``last.ckpt`` (the newest readable ``last*.ckpt``), which is written right after each step checkpoint;
    unless a step checkpoint written after it holds a *later step* (a run killed between the two writes, or, before
    gsae deferred the evaluation, while it evaluated a new checkpoint): resuming from ``last.ckpt`` would redo those
    steps. Without any ``last*.ckpt``, the step checkpoint of the latest step. File times alone do not decide: a
    copy or a sync that does not keep them in order would otherwise resume an older step. A file that does not read
    (a copy cut short) is skipped with a warning (``say``: log, rank 0)."""
    from gsae.export import saved_step

    def step_of(path: Path) -> int | None:
        try:
            return saved_step(path)
        except ValueError as e:
            if say:
                log.warning("--ckpt_path last: skipping %s (%s)", path.name, e)
            return None

    found = sorted(folder.glob("*.ckpt"))
    for path in found:
        if not path.exists() and say:  # last.ckpt linked to a step checkpoint since deleted
            log.warning("--ckpt_path last: skipping %s (a link to %s, which is gone)", path.name, os.readlink(path))
    newest_first = sorted(
        (p for p in found if p.exists()), key=lambda p: (os.path.getmtime(p), p.name.startswith("last")), reverse=True
    )
    last = None
    for i, path in enumerate(newest_first):
        if path.name.startswith("last") and (step := step_of(path)) is not None:
            last = (path, step, i)
            break
    best = last
    for path in newest_first[: last[2]] if last else newest_first:  # written after last.ckpt (all, without one)
        if not path.name.startswith("last") and (step := step_of(path)) is not None and (best is None or step > best[1]):
            best = (path, step, 0)
    if best is None:
        return None
    if last is not None and best is not last and say:
        log.info("--ckpt_path last: resuming from %s (step %d), newer than last.ckpt (step %d): the run stopped "
                 "between the two", best[0].name, best[1], last[1])
    return str(best[0])


def check_trainer(trainer) -> None:
    """One-line errors for ``--trainer`` values Lightning accepts and then divides by (a ``ZeroDivisionError`` in the
    loop, after the first step) or that train nothing (``max_steps`` or ``limit_train_batches`` 0), and for a strategy
    that starts its processes by spawning (``ddp_spawn``: each process would need the command line's objects pickled,
    the LM and the parser's optimizer factory among them)."""
    from lightning.pytorch.plugins.environments import LightningEnvironment
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    if isinstance(launcher, _MultiProcessingLauncher) and launcher._start_method != "fork":
        method = launcher._start_method
        name = "ddp_spawn" if method == "spawn" else f"{type(trainer.strategy).__name__}(start_method={method!r})"
        raise ValueError(
            f"--trainer.strategy {name}: train.py cannot start processes by {method}; use "
            "--trainer.strategy ddp (Lightning starts one process per device, or launch with torchrun/srun) or ddp_fork"
        )
    env = getattr(trainer.strategy, "cluster_environment", None)
    if (trainer.num_nodes > 1 and isinstance(launcher, _SubprocessScriptLauncher) and isinstance(env, LightningEnvironment)
            and not {"MASTER_ADDR", "NODE_RANK", "GROUP_RANK"} & set(os.environ)):
        # no launcher told this process which node it is nor where node 0 is: every node would be node 0 on its own
        # 127.0.0.1 and wait for the others in DDP's set-up (30 minutes)
        raise ValueError(
            f"--trainer.num_nodes {trainer.num_nodes}: no launcher told this process its node: start it on every node "
            "with torchrun or srun, or export MASTER_ADDR, MASTER_PORT and NODE_RANK (README: Multi-GPU / multi-node)"
        )
    if trainer.max_steps == 0:  # Lightning would end at once with exit code 0, leaving an empty TensorBoard run
        raise ValueError("--trainer.max_steps 0: nothing to train (-1 or a count of steps)")
    if trainer.limit_train_batches == 0:
        raise ValueError("--trainer.limit_train_batches 0: nothing to train (leave it at 1.0: the stream is endless, "
                         "--trainer.max_steps sets the run's length)")
    if int(trainer.accumulate_grad_batches) < 1:
        raise ValueError(f"--trainer.accumulate_grad_batches must be >= 1 (got {trainer.accumulate_grad_batches})")
    interval = trainer.val_check_interval
    if interval is not None and interval <= 0:
        raise ValueError(f"--trainer.val_check_interval must be > 0 (got {interval})")
    precision = str(getattr(trainer, "precision", ""))
    if precision in ("bf16-true", "16-true"):
        raise ValueError(
            f"--trainer.precision {precision}: would keep the SAE's weights, Adam's state and the g-SAE's gradient "
            f"scale in half precision (1009 prediction counts stored as 1008); use bf16-mixed (half-precision compute, "
            "float32 weights)"
        )


def forks_ranks(trainer) -> bool:
    """Whether ``fit`` runs in processes forked from this one (``--trainer.strategy ddp_fork``), whose callbacks and
    loggers are copies this process never sees again."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    return isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher)


def prepare_forked_ranks(trainer, resume: str) -> None:
    """Under ``ddp_fork``, before the ranks are forked: choose each logger's version folder (``version_N``) here, so
    the ranks inherit it and this process knows the folder they wrote (a failed run's empty one is removed by
    :func:`remove_empty_log_dirs`, instead of this process looking for the next free ``version_N + 1``); and have rank
    0 print the run summary, which this process's copy of the callback never sees."""
    from gsae.callbacks.summary import RunSummary

    if not forks_ranks(trainer):
        return
    for logger in trainer.loggers:
        getattr(logger, "version", None)  # resolved once, then kept
    for cb in trainer.callbacks:
        if isinstance(cb, RunSummary):
            cb.print_from_forked_rank(resume)


def checks_before_training(cli: GSAECLI) -> tuple[str | None, dict | None, tuple[Path, int] | None]:
    """What is checked before any rank trains: the data's split between ranks, its source and its held-out set (before
    DDP starts the ranks, else each fails, and says so, on its own), ``--ckpt_path``, the run folder, a new run's
    ``init_from`` weights (loaded here: ``SAESystem.warm_start``), and whether the
    checkpoint resumes this configuration (``SAESystem.check_resumable``). Returns the
    checkpoint to resume from, its contents (mapped) and, on rank 0, the later checkpoints :func:`roll_back` sets
    aside (:func:`_later_checkpoints`: their folder checked writable here), or ``(None, None, None)``."""
    cli.datamodule.check_world(cli.trainer.world_size)
    cli.datamodule.validate()
    for cb in cli.trainer.callbacks:
        if getattr(cb, "enabled", False) and hasattr(cb, "check_held_out"):
            cb.check_held_out(SimpleNamespace(datamodule=cli.datamodule))
    ckpt = resolve_ckpt_path(cli)
    check_run_folder(cli.trainer, ckpt)
    if hasattr(cli.model, "warm_start"):  # --model.init_from: a bad source stops the run before anything is written
        cli.model.warm_start(resuming=ckpt is not None, say=cli.trainer.is_global_zero)
    if ckpt is None:
        return None, None, None
    from gsae.export import read_checkpoint

    state = read_checkpoint(ckpt, mmap=True)
    if hasattr(cli.model, "check_resumable"):  # a refused resume writes nothing (the fit would, before refusing)
        cli.model.check_resumable(state)
    data = state.get(type(cli.datamodule).__qualname__)
    if isinstance(data, dict) and hasattr(cli.datamodule, "check_resumable"):
        cli.datamodule.check_resumable(data)
    later = None
    if cli.trainer.is_global_zero:  # the roll-back's (rank 0's) refusal, here where every rank agrees on it
        later = _later_checkpoints(ckpt, int(state.get("global_step", 0)), cli.trainer)
        if later is not None:
            _check_set_aside_writable(ckpt)
    return ckpt, state, later


class OtherRanksFailed(RuntimeError):
    """Raised on the ranks of a multi-node run whose own checks passed while another rank's failed."""


def agree_before_training(trainer, failure: BaseException | None) -> None:
    """On several nodes, every rank learns whether any rank's :func:`checks_before_training` failed, and all stop.

    A check can fail on one node only: a node that does not see the run folder (``--ckpt_path last`` finds no
    checkpoint there, or a new run finds an earlier run's), or lacks a data file. That node's ranks used to stop while
    the others waited for them in DDP's set-up (30 minutes, Lightning's timeout). Here the process group is set up
    before training (as Lightning would at the start of ``fit``, which then finds it set up; under a plain ``python
    train.py`` per node, Lightning's other local ranks are started here rather than in ``fit``), every rank's error
    message is gathered, and a rank that failed raises its own error (``error (rank R): …``) while the others raise
    :class:`OtherRanksFailed` (rank 0 names the failed ranks and their messages). On one node, or with ``ddp_fork``,
    nothing is exchanged: ``failure``, if any, is the caller's to raise (one node's ranks see the same files, and
    Lightning starts them after these checks)."""
    import torch.distributed as dist
    from lightning.pytorch.strategies.launchers.subprocess_script import (
        _launch_process_observer,
        _SubprocessScriptLauncher,
    )

    strategy = trainer.strategy
    launcher = getattr(strategy, "launcher", None)
    if trainer.num_nodes <= 1 or trainer.world_size <= 1 or not isinstance(launcher, _SubprocessScriptLauncher):
        return
    started_here = not strategy.cluster_environment.creates_processes_externally
    if started_here:  # this node's other ranks, which run these checks too (fit then finds them started)
        launcher._call_children_scripts()
    strategy.setup_environment()  # the process group (fit's set-up reuses it)
    message = None if failure is None else (user_message(failure) if isinstance(failure, USER_ERRORS)
                                            else f"{type(failure).__name__}: {failure}")
    messages: list[str | None] = [None] * trainer.world_size
    dist.all_gather_object(messages, message)
    failed = {r: m for r, m in enumerate(messages) if m is not None}
    if not failed:
        if started_here:
            _launch_process_observer(launcher.procs)  # as Lightning's launch does for the processes it starts
        return
    leave_process_group()
    if started_here:  # they stop too; wait for them so none outlives this process
        for proc in launcher.procs:
            proc.wait()
    if failure is not None:
        return  # the caller raises this rank's own error
    ranks = sorted(failed)
    same = len(set(failed.values())) == 1
    detail = (f"{failed[ranks[0]]}" if same else "; ".join(f"rank {r}: {failed[r]}" for r in ranks))
    raise OtherRanksFailed(
        f"rank{'s' * (len(ranks) > 1)} {_ranges(ranks)} of {trainer.world_size} failed before training, so all stop "
        f"({detail}). Every node must see the same files: the run folder (a shared filesystem) and the data")


def leave_process_group() -> None:
    """Tear down a process group :func:`agree_before_training` set up, where no training follows."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _ranges(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    out, start = [], ranks[0]
    for prev, r in zip(ranks, [*ranks[1:], None]):
        if r is None or r != prev + 1:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = r
    return ", ".join(out)


def left_to_finish(cli: GSAECLI, step: int) -> list[str]:
    """What a kill left undone at the checkpoint of ``step`` in the run's folder (``"SAELens export"``,
    ``"evaluation"``, both, or none): a resume that has nothing to train still finishes it (the fit trains nothing
    and :class:`SAECheckpoint` finishes them)."""
    from gsae.callbacks.checkpoint import unfinished_at

    for cb in cli.trainer.checkpoint_callbacks:
        if isinstance(cb, SAECheckpoint):
            members = list(cli.model.saes()) if hasattr(cli.model, "saes") else [""]
            _, export, evaluate = unfinished_at(checkpoint_folder(cli.trainer, cb), step, members, cli.trainer.callbacks,
                                                cb.export_saelens)
            return [what for what, missing in (("SAELens export", export), ("evaluation", evaluate)) if missing]
    return []


def trained_to_the_end(ckpt: str, step: int, max_steps: int, left: list[str] = ()) -> str | None:
    """A one-line note if checkpoint ``ckpt``, at ``step``, is already at ``--trainer.max_steps`` (Lightning would end
    at once, silently, leaving an empty TensorBoard folder), naming what of it is ``left`` to finish
    (:func:`left_to_finish`); ``None`` if there is training left."""
    if max_steps is None or max_steps < 0:
        return None
    if step < max_steps:
        return None
    head = f"nothing to train: {ckpt} is at step {step} and --trainer.max_steps is {max_steps}"
    if not left:
        return f"{head} (raise --trainer.max_steps to train on)"
    several = len(left) > 1
    return f"{head}; its {' and '.join(left)} {'were' if several else 'was'} cut short: finishing {'them' if several else 'it'}"


def check_run_folder(trainer, ckpt: str | None) -> None:
    """The checkpoint folder must take files (a read-only or foreign location stopped the run at its first checkpoint,
    or a resume with TensorBoard's writer threads' tracebacks).
    One run per checkpoint folder: a run that does not resume from a checkpoint of its folder (a new run, or one
    started from another run's checkpoint) is refused if the folder already holds checkpoints; Lightning would write
    ``last-v1.ckpt``, ``epoch=0-step=N-v1.ckpt`` … among the earlier run's files, and its curves beside that run's."""
    from gsae.files import unwritable

    for cb in trainer.checkpoint_callbacks:
        folder = checkpoint_folder(trainer, cb)
        why = unwritable(folder) if trainer.is_global_zero else None  # rank 0 writes the run's files
        if why is not None:  # found now, not at the first checkpoint (the steps trained until then lost)
            option = "--checkpoint.dirpath" if cb.dirpath else "--trainer.default_root_dir"
            raise PermissionError(f"{option}: the run's checkpoints go to {folder}, but {why}")
        found = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
        if not found or (ckpt is not None and os.path.samefile(Path(ckpt).parent, folder)):
            continue
        in_branch = ckpt is not None and ".superseded-after-step" in Path(ckpt).parent.name
        if in_branch and Path(ckpt).parent.name.startswith(folder.name + "."):
            raise FileExistsError(
                f"--ckpt_path: {ckpt} is in a branch a retraining set aside; to go back to it, move {folder} aside "
                f"and rename {Path(ckpt).parent.name} to {folder.name}, then resume with --ckpt_path last")
        shown = ", ".join(found[:3]) + (f", … {len(found) - 3} more" if len(found) > 3 else "")
        raise FileExistsError(
            f"{folder} holds an earlier run's checkpoints ({shown}): resume it with --ckpt_path last, or start this run "
            "in another folder (--trainer.default_root_dir, or the config's --trainer.logger.init_args.name), or "
            "remove that one")
    if trainer.is_global_zero:  # TensorBoard's folders too: its writer threads fail with tracebacks
        for logger in trainer.loggers:
            root = getattr(logger, "root_dir", None)  # <save_dir>/<name>, where the version_N folders are
            if not root:
                continue
            folders = [Path(root), *(sorted(Path(root).glob("version_*")) if ckpt is not None else [])]
            for f in folders:
                why = unwritable(f)
                if why is not None:
                    raise PermissionError(f"--trainer.default_root_dir: the run's TensorBoard events go to {f}, but {why}")
            if ckpt is None:  # no checkpoint in the folder (else refused above): curves of a start stopped before one
                earlier = [f.name for f in sorted(Path(root).glob("version_*")) if any(f.glob("events.out.tfevents.*"))]
                if earlier:
                    log.warning("%s holds the TensorBoard curves of an earlier start that wrote no checkpoint (%s): this "
                                "run logs beside them, in the next version_N; remove %s to see this run alone", root,
                                ", ".join(earlier), " and ".join(earlier))


def roll_back(ckpt: str, step: int, trainer=None, later: tuple[Path, int] | None = None) -> None:
    """A resume from ``ckpt`` (at ``step``), older than its folder's newest checkpoint (to retrain from there, e.g.
    with a lower learning rate after a divergence): the later checkpoints move aside
    (:func:`gsae.callbacks.checkpoint.set_aside_later_checkpoints`) and a warning says where; their TensorBoard events
    are dropped (:func:`continue_logging`). Only where the run writes into ``ckpt``'s folder (``trainer``'s checkpoint
    folder): a run started from another run's checkpoint, in a folder of its own, leaves that run alone. ``later``:
    :func:`_later_checkpoints`' answer where the caller has it (``train.py``: from :func:`checks_before_training`)."""
    if later is None:  # not handed over by checks_before_training, which checked the set-aside folder then
        later = _later_checkpoints(ckpt, step, trainer)
        if later is None:
            return
        _check_set_aside_writable(ckpt)
    from gsae.callbacks.checkpoint import set_aside_later_checkpoints

    newest, reached = later
    moved = set_aside_later_checkpoints(Path(ckpt).parent, step, ckpt)
    where = (f"its checkpoints after step {step} ({', '.join(moved[1])}) are moved to {moved[0]} (remove it when "
             "you no longer need them)") if moved else f"its checkpoints after step {step} are gone"
    log.warning("resuming from step %d of a run that reached step %d (%s): %s, and their TensorBoard events are dropped",
                step, reached, Path(newest).name, where)


def _later_checkpoints(ckpt: str, step: int, trainer=None) -> tuple[Path, int] | None:
    """``(newest checkpoint, its step)`` when ``ckpt`` (at ``step``) is older than its folder's newest and the run
    writes into that folder (:func:`roll_back`), else None."""
    from gsae.export import saved_step

    if trainer is not None:
        folders = [checkpoint_folder(trainer, cb) for cb in trainer.checkpoint_callbacks]
        if not any(f.is_dir() and os.path.samefile(f, Path(ckpt).parent) for f in folders):
            return None
    newest = newest_checkpoint(Path(ckpt).parent, say=False)
    if newest is None or os.path.samefile(newest, ckpt):
        return None
    reached = saved_step(newest)
    return (Path(newest), reached) if reached > step else None


def _check_set_aside_writable(ckpt: str) -> None:
    """A roll-back moves the later checkpoints into a folder beside ``ckpt``'s: refused, in one line, where it cannot."""
    from gsae.files import unwritable

    why = unwritable(Path(ckpt).parent.parent)
    if why is not None:
        raise PermissionError(f"--ckpt_path {ckpt}: retraining from it sets the later checkpoints aside beside "
                              f"{Path(ckpt).parent}, but {why}")


def continue_logging(trainer, ckpt: str, step: int, record: dict | None) -> None:
    """A resume from checkpoint ``ckpt`` (at ``step``, recording its TensorBoard folder as ``record``) logs on in that
    folder (:func:`gsae.loggers.continue_log_folder`: one run in TensorBoard, not ``version_N+1`` beside it), and
    writes its own configuration beside the first run's ``config.yaml`` as ``config.resume-step<S>.yaml``."""
    if continue_log_folder(trainer.loggers, ckpt, record, step) is None:
        return
    for cb in trainer.callbacks:
        if isinstance(cb, SaveConfigCallback):
            cb.config_filename = f"config.resume-step{step}.yaml"


def _check_checkpoint(path: str) -> None:
    from gsae.export import load_members

    try:  # mapped: the check reads the SAEs, not the optimizer state Lightning is about to load anyway
        load_members(path, mmap=True)
    except ValueError as e:  # corrupt or foreign file
        raise ValueError(f"--ckpt_path: {e}") from None


#: torch optimizers' own checks (raised when Lightning builds the optimizer): the option they are about
_OPTIMIZER_MESSAGES = ("Invalid learning rate", "Invalid beta parameter", "Invalid epsilon value",
                       "Invalid weight_decay value", "Invalid momentum value")


#: a child process's error, as torch.multiprocessing reports it to the parent (``ddp_fork``): its traceback as text
_CHILD_ERROR = re.compile(r"^([A-Za-z_][\w.]*): (.+)$", re.M)


def child_user_message(e: BaseException) -> str | None:
    """One line for an error raised in a process Lightning forked (``--trainer.strategy ddp_fork``), which reaches the
    parent as a ``ProcessRaisedException`` holding the child's traceback as text; ``None`` if ``e`` is not one or the
    child's error is not a user error (a bug keeps its traceback)."""
    from torch.multiprocessing import ProcessRaisedException

    if not isinstance(e, ProcessRaisedException):
        return None
    found = _error_in_traceback(str(e).split("terminated with the following error:", 1)[-1])
    users = {t.__name__ for t in USER_ERRORS}
    users |= {"FileNotFoundError", "IsADirectoryError", "NotADirectoryError", "PermissionError", "DataSourceError"}
    return found[1] if found is not None and found[0] in users else None


def _error_in_traceback(trace: str) -> tuple[str, str] | None:
    """``(outermost error's class name, line for the user)`` of a traceback printed as text: the innermost error line
    that names an option (chained tracebacks print the innermost cause first), else the outermost error's."""
    errors = [(m.group(1).rsplit(".", 1)[-1], m.group(2).strip()) for m in _CHILD_ERROR.finditer(trace)]
    if not errors:
        return None
    for _, text in errors:
        if _names_option(text):
            return errors[-1][0], text
    return errors[-1]


def _names_option(text: str) -> bool:
    """Whether an error message names the option it is about (gsae's own messages do)."""
    return text.startswith("--") or "--data." in text or "--model." in text or "--ckpt_path" in text


#: a Trainer argument as Lightning's messages quote it (``You set `devices=3` in Lightning, but ...``)
_TRAINER_ARG = re.compile(r"[`(](devices|num_nodes|strategy|accelerator|precision|max_steps|max_epochs)=")


def user_message(e: BaseException) -> str:
    """One line for the user: the innermost error that names an option (jsonargparse wraps errors raised
    while instantiating classes in its own), else the error's first line."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        # ``raise ... from None`` re-words an error (a sweep member's ``--model.members[i]...`` for the SAE's own
        # ``--model.sae...``): the suppressed context is not followed, so the re-worded message is the one said
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    for err in reversed(chain):
        text = str(err).strip()
        if text.startswith("Caught ") and "Original Traceback" in text:  # a DataLoader worker's error, re-raised
            found = _error_in_traceback(text.split("Original Traceback", 1)[1])
            if found is not None:
                return found[1]
        if _names_option(text):
            return text.splitlines()[0]
    text = str(chain[0]).strip()
    if text.startswith(_OPTIMIZER_MESSAGES):
        return f"--model.optimizer: {text.splitlines()[0]}"
    if isinstance(chain[0], OSError) and chain[0].errno == errno.ENOSPC and not chain[0].filename:
        return f"{text.splitlines()[0]} (writing the run's files; the checkpoints already written are kept)"
    if isinstance(chain[0], SafetensorError):  # the SAELens export's writer
        return f"writing a SAELens export: {text.splitlines()[0]}"
    if isinstance(chain[0], UnicodeDecodeError):
        return f"a file given as text (--config?) is binary: {text.splitlines()[0]}"
    if text.startswith("No supported gpu backend found"):  # Lightning's words for accelerator="gpu" without one
        return "--trainer.accelerator gpu: this machine has no GPU (CUDA or MPS); use --trainer.accelerator cpu or auto"
    if text.startswith("`Timer(duration="):  # Lightning's words for a bad --trainer.max_time
        return f"--trainer.max_time: {text.splitlines()[0]}"
    trainer_option = _TRAINER_ARG.search(text)  # Lightning's own checks name the Trainer argument: `devices=3`
    if trainer_option:
        return f"--trainer.{trainer_option.group(1)}: {text.splitlines()[0]}"
    return text.splitlines()[0] if text else type(chain[0]).__name__


def _no_advert(record: logging.LogRecord) -> bool:
    """A log filter: drop Lightning's product tips, printed at the start of every run."""
    return not str(record.msg).startswith("💡 Tip:")


def main(args: list[str] | None = None) -> int:
    """Entry point of ``train.py``: returns the process exit code."""
    log_to_terminal()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
    warnings.filterwarnings("ignore", message=".*Sparse invariant checks.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # an empty validation set is said by the data module, with its numbers
    warnings.filterwarnings("ignore", message=".*Total length of `DataLoader` across ranks is zero.*")
    one_line_warnings()
    from gsae.callbacks.progress import console_log_handlers

    for handler in console_log_handlers():  # Lightning's "💡 Tip: … try installing litlogger / litmodels" adverts
        handler.addFilter(_no_advert)
    args = list(sys.argv[1:] if args is None else args)
    tune_malloc()  # large CPU tensors reused instead of re-faulted every step (GSAE_MALLOC_TUNING=0: off)
    started = time.time()
    held = HeldInfo()  # Lightning's "Seed set", "GPU available" lines: said once the options hold, not before an error
    try:
        try:
            cli = build_cli(args)
        except ArgumentError as e:  # jsonargparse: missing/unparsable config, wrongly typed or unknown option
            if os.environ.get("GSAE_DEBUG"):
                raise
            print(f"error: {parse_error_line(str(e), args)}", file=sys.stderr)
            return 2
        check_trainer(cli.trainer)
        resume = resume_command(args, cli.trainer)  # before fit (see there)
        try:
            ckpt, state, later = checks_before_training(cli)
        except Exception as e:  # noqa: BLE001 (re-raised by agree_before_training, on every rank of a multi-node run)
            agree_before_training(cli.trainer, e)
            raise
        agree_before_training(cli.trainer, None)
        held.release()
        if ckpt is not None:
            step = int(state.get("global_step", 0))
            left = left_to_finish(cli, step)
            done = trained_to_the_end(ckpt, step, cli.trainer.max_steps, left)
            if done and cli.trainer.is_global_zero:  # every rank stops here or finishes; one says why
                print(done, file=sys.stderr)
            if done and not left:
                leave_process_group()
                return 0
            # a resumed run writes into its own checkpoint folder: Lightning's "exists and is not empty" is expected
            warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
            if later is not None:  # rank 0's
                roll_back(ckpt, step, cli.trainer, later)
            continue_logging(cli.trainer, ckpt, step, state.get(LOG_FOLDER_KEY))
        prepare_forked_ranks(cli.trainer, resume)  # after continue_logging: it settles the logger's folder
        sigterm.install(cli.trainer)  # every rank stops at one step on SIGTERM, however many got it (gsae.sigterm)
        try:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
        finally:  # also after Ctrl+C (Lightning stops gracefully, then exits)
            print_summary(cli, resume)
    except KeyboardInterrupt:  # Ctrl+C before the fit (loading the LM, reading the data); in it Lightning stops cleanly
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a further Ctrl+C does not cut the exit short with a traceback
        if "cli" in locals() and (cli.trainer.interrupted or cli.trainer.global_step > 0):
            print("stopped (Ctrl+C)", file=sys.stderr)  # a second Ctrl+C during Lightning's own stop
            return 130
        print("stopped (Ctrl+C) before training", file=sys.stderr)
        if "cli" in locals():
            remove_empty_log_dirs(cli.trainer, since=started)
        return 130
    except SIGTERMException:  # a scheduler's preemption or time limit: last.ckpt holds the step reached
        return 128 + signal.SIGTERM  # the shell's code for "ended by SIGTERM" (Lightning's exception exits 0)
    except SystemExit as e:  # after SIGTERMException, a SystemExit. Lightning ends a fit stopped by Ctrl+C with
        if e.code == 1 and "cli" in locals() and cli.trainer.interrupted:  # sys.exit(1): the shell's code for it
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a further Ctrl+C does not cut the exit short
            return 130
        raise
    except OtherRanksFailed as e:  # rank 0 names the ranks that failed and why; the others stop without a word
        if cli.trainer.is_global_zero:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        message = user_message(e) if isinstance(e, USER_ERRORS) else child_user_message(e)
        if message is None or os.environ.get("GSAE_DEBUG"):
            raise
        rank = cli.trainer.global_rank if "cli" in locals() else 0
        # every rank that fails says so (a node's own problem, e.g. its data, is only seen there); named when not rank 0
        print(f"error (rank {rank}): {message}" if rank else f"error: {message}", file=sys.stderr)
        if "cli" in locals():
            remove_empty_log_dirs(cli.trainer, since=started)
        return 1
    finally:
        held.drop()
    return 0


class HeldInfo:
    """Hold the INFO lines of Lightning's own loggers (``Seed set to 0``, ``GPU available: …``, which print while the
    trainer and the model are built) until :meth:`release`: a bad option's one-line error then comes alone, not
    after three lines that read as if training had started. Warnings pass at once. :meth:`drop` forgets what is
    held (after an error) and stops holding."""

    LOGGERS = ("lightning.pytorch", "lightning.fabric")

    def __init__(self) -> None:
        self.records: list[tuple[logging.Handler, logging.LogRecord]] = []
        self.handlers = [h for name in self.LOGGERS for h in logging.getLogger(name).handlers]
        for h in self.handlers:
            h.addFilter(self._hold_for(h))

    def _hold_for(self, handler: logging.Handler):
        def hold(record: logging.LogRecord) -> bool:
            if record.levelno != logging.INFO:
                return True
            self.records.append((handler, record))
            return False

        hold.gsae_held = self  # type: ignore[attr-defined]
        return hold

    def _stop(self) -> None:
        for h in self.handlers:
            for f in [f for f in h.filters if getattr(f, "gsae_held", None) is self]:
                h.removeFilter(f)
        self.handlers = []

    def release(self) -> None:
        """Stop holding and say what was held, in order."""
        self._stop()
        records, self.records = self.records, []
        for handler, record in records:
            handler.handle(record)

    def drop(self) -> None:
        self._stop()
        self.records = []


def remove_empty_log_dirs(trainer, since: float = 0.0) -> list[Path]:
    """Remove the logger folders (``version_N``) of a run that failed before logging anything, and the run folder if
    that leaves it empty, so that the next run of the same config is ``version_0``, not ``version_1`` beside an empty
    one. A folder goes only if it holds nothing but TensorBoard event files without a single value (the hparams
    record the fit's start writes is not one: a data error at the first batch left it) and the
    ``config.yaml`` / ``hparams.yaml`` this run wrote (modified after ``since``, the run's start). Returns the folders
    removed (rank 0 only)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    def empty_events(f: Path) -> bool:  # no value: TensorBoard's hparams records (the fit's start) are not values
        return f.name.startswith("events.out.tfevents.") and f.stat().st_size <= 65536 and not any(
            not v.tag.startswith("_hparams_/") for e in EventFileLoader(str(f)).Load() if e.HasField("summary")
            for v in e.summary.value
        )

    def ours(f: Path) -> bool:
        return f.name in ("config.yaml", "hparams.yaml") and f.stat().st_mtime >= since

    removed: list[Path] = []
    if getattr(trainer, "global_rank", 0) != 0:  # rank 0 owns the folder
        return removed
    for logger in trainer.loggers:
        folder = Path(logger.log_dir) if getattr(logger, "log_dir", None) else None
        if folder is None or not folder.is_dir():
            continue
        if isinstance(logger, TensorBoardLogger):
            try:
                logger.experiment.close()  # the event file is complete before it is read
            except Exception:  # noqa: BLE001 - the writer's own error (a full disk) was the run's error, said already
                continue
        files = list(folder.iterdir())
        if any(not f.is_file() or not (empty_events(f) or ours(f)) for f in files):
            continue
        for f in files:
            f.unlink()
        folder.rmdir()
        removed.append(folder)
        if folder.parent.is_dir() and not any(folder.parent.iterdir()):
            folder.parent.rmdir()
    return removed
