"""What a run did and where it put things, for the console at the end of training (and on Ctrl+C).

:class:`RunSummary` records, when training ends or is stopped (Lightning's graceful ``KeyboardInterrupt``):
steps and tokens trained, wall time, the final ``train/`` and ``val/`` metrics, the headline numbers of the
newest evaluation (the newest ``<checkpoint>.eval.json``, or the evaluation callback's latest results if those
are newer), the checkpoints with their SAELens exports, evaluation JSON and latent dashboards, the TensorBoard
event folder, and the exact ``tensorboard`` and ``evaluate.py`` commands for this run. ``train.py`` prints
:meth:`RunSummary.render`.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import time
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from gsae.callbacks.progress import TRAIN_FIELDS, VAL_FIELDS, format_count, format_duration, metric_fields
from gsae.evals import failure

#: ``benchmark -> metrics`` shown for the newest evaluation (all of them are in the JSON).
HEADLINE = {
    "loss_added": ("L_added", "ce_increase", "kl_sae", "explained_variance", "l0"),
    "dead_latents": ("dead_fraction_batches", "alive_fraction", "median_density"),
    "decoder_geometry": ("nn_cos_mean",),
    # the g-SAE paper's steering claim (on-target probability added at alpha_report) and Gurnee's pathology (KL of
    # the SAE error over that of an ε-random direction of its size); latents writes files (its numbers are settings)
    "steering": ("on_target", "off_target_added"),
    "sensitive_directions": ("ratio_sae_over_eps_isotropic",),
}

#: The shorter headline of each member of a sweep (one console line per member).
SWEEP_HEADLINE = {
    "loss_added": ("L_added", "explained_variance", "l0"),
    "dead_latents": ("dead_fraction_batches",),
}


class Summary(NamedTuple):
    """The record of one run.

    Attributes:
        status: ``finished``, ``stopped`` (Ctrl+C) or ``terminated`` (SIGTERM: a scheduler's preemption or time
            limit, ``kill``; the step reached is saved in ``last.ckpt`` first).
        steps: global step at the end; ``steps_run``: steps of this invocation (less when resumed).
        tokens: tokens trained in this invocation; ``tokens_total``: since the run began.
        wall_s: wall-clock seconds of this invocation's training; ``eval_s`` of them evaluating checkpoints,
            ``val_s`` validating (the held-out loss every ``val_check_interval``).
        train, val: ``[(label, value)]`` final metrics.
        eval_step: step of the newest evaluation (None if none); ``eval_source``: its JSON path or "callback".
        headline: ``[(benchmark.metric, value)]`` of that evaluation.
        checkpoint_dir: folder of the checkpoints; ``checkpoints``: their paths, oldest first.
        exports, eval_json, latents_html: the SAELens folders, evaluation JSON and dashboards beside them.
        events: TensorBoard event folder of this run (None without a TensorBoard logger).
    """

    status: str
    steps: int
    steps_run: int
    tokens: int
    tokens_total: int
    wall_s: float
    train: list[tuple[str, str]]
    val: list[tuple[str, str]]
    eval_step: int | None
    eval_source: str | None
    headline: list[tuple[str, str]]
    checkpoint_dir: str | None
    checkpoints: list[str]
    exports: list[str]
    eval_json: list[str]
    latents_html: list[str]
    events: str | None
    train_step: int | None = None  # the step of the ``train`` numbers, where it is not ``steps`` (a stopped run)
    eval_s: float = 0.0  # of ``wall_s``, the seconds the checkpoints' evaluations took (the training rate leaves them out)
    val_s: float = 0.0  # of ``wall_s``, the seconds validation took (outside the evaluations; left out of the rate too)
    shown: dict[str, str] | None = None  # exports / evaluation / latents: the file shown (the newest step's first SAE)
    member_train: dict[str, list[tuple[str, str]]] | None = None  # a sweep: each member's ``train`` numbers


class RunSummary(Callback):
    """Note when training ends or is interrupted; :attr:`summary` then describes the run. It is collected when
    first read (``train.py`` reads it after ``fit`` returns), so the final checkpoint, which Lightning's
    checkpoint callbacks save after every other callback's ``on_train_end``, and its evaluation are in it."""

    def __init__(self) -> None:
        super().__init__()
        self._t0 = 0.0
        self._step0 = 0
        self._tokens0 = 0
        self._end: tuple[str, float, pl.Trainer, pl.LightningModule] | None = None
        self._summary: Summary | None = None
        self._forked_print: tuple[int, str] | None = None
        self._val_s = 0.0  # seconds validating (outside sanity checks and evaluations) since the train start
        self._val0: tuple[float, float] | None = None  # the running validation's start: (clock, evaluation seconds)

    def print_from_forked_rank(self, resume_command: str) -> None:
        """Print the summary from global rank 0's own process when the run ends there (``resume_command`` offered if
        it was stopped): under ``--trainer.strategy ddp_fork`` the ranks are children forked from this process, whose
        copy of the callback never sees the run. ``train.py`` calls this; otherwise it prints the summary itself."""
        self._forked_print = (os.getpid(), resume_command)

    def _print_if_forked(self, trainer: pl.Trainer) -> None:
        if self._forked_print is None:
            return
        parent, command = self._forked_print
        if os.getpid() != parent and trainer.is_global_zero and self.summary is not None:
            print(self.render(command), flush=True)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()
        self._step0 = trainer.global_step
        self._tokens0 = _tokens(pl_module)
        self._eval0 = _eval_seconds(trainer)
        self._val_s = 0.0
        self._end, self._summary = None, None

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val0 = (time.perf_counter(), _eval_seconds(trainer))

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and self._val0 is not None:
            t0, e0 = self._val0  # an evaluation run from a validation hook is the evaluation's time, not validation's
            self._val_s += time.perf_counter() - t0 - (_eval_seconds(trainer) - e0)
            self._val0 = None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end = ("finished", time.perf_counter(), trainer, pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._forked_print is not None and os.getpid() == self._forked_print[0]:
            # the process that forked the ranks ran no step; on Ctrl+C it ends them before rank 0 could report
            if isinstance(exception, KeyboardInterrupt):
                print(f"stopped (Ctrl+C); to resume:\n  {self._forked_print[1]}", flush=True)
            return
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)) and trainer.is_global_zero:
            status = "terminated" if isinstance(exception, SIGTERMException) else "stopped"
            self._end = (status, time.perf_counter(), trainer, pl_module)
            self._print_if_forked(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._end is not None and self._end[0] == "finished":  # the run's time ends after the final checkpoint
            # and its evaluation, which the checkpoint callback's on_train_end runs after this one's (the summary
            # left minutes of GPT-2 evaluation out of its time and counted them as evaluating: negative training)
            self._end = ("finished", time.perf_counter(), *self._end[2:])
            self._summary = None
        self._print_if_forked(trainer)  # after the final checkpoint and its evaluation

    @property
    def summary(self) -> Summary | None:
        """The run's :class:`Summary` (None before training ended or was stopped)."""
        if self._summary is None and self._end is not None:
            self._summary = self.collect(*self._end)
        return self._summary

    def collect(self, status: str, t_end: float, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Summary:
        metrics = trainer.callback_metrics
        ckpt_dir = getattr(trainer.checkpoint_callback, "dirpath", None)
        ckpts = checkpoints_oldest_first(Path(ckpt_dir)) if ckpt_dir else []
        step, source, headline = newest_evaluation(trainer, ckpts)
        tokens = _tokens(pl_module)
        own = [p for p in ckpts if not p.is_symlink()]  # last.ckpt linked to a step: its files repeat that step's
        members = [m for m in pl_module.saes() if m] if hasattr(pl_module, "saes") else []
        newest = next((p for p in reversed(own) if not p.name.startswith("last")), own[-1] if own else None)
        shown = {} if newest is None else {
            label: _beside([newest], suffix, stem=label == "exports", members=members)[:1]
            for label, suffix in (("exports", ".saelens"), ("evaluation", ".eval.json"), ("latents", ".latents.html"))
        }
        return Summary(
            status=status,
            steps=trainer.global_step,
            steps_run=trainer.global_step - self._step0,
            tokens=tokens - self._tokens0,
            tokens_total=tokens,
            wall_s=t_end - self._t0,
            train=metric_fields(metrics, TRAIN_FIELDS),
            train_step=self._last_logged_step(status, trainer),
            val=metric_fields(metrics, VAL_FIELDS),
            eval_step=step,
            eval_source=source,
            headline=headline,
            checkpoint_dir=ckpt_dir,
            checkpoints=[str(p) for p in ckpts],
            exports=_beside(own, ".saelens", stem=True, members=members),
            eval_json=_beside(own, ".eval.json", members=members),
            latents_html=_beside(own, ".latents.html", members=members),
            events=_events_dir(trainer),
            eval_s=_eval_seconds(trainer) - self._eval0,
            val_s=self._val_s,
            shown={label: paths[0] for label, paths in shown.items() if paths},
            member_train={m: metric_fields({k.replace(f"train/{m}/", "train/", 1): v for k, v in metrics.items()
                                            if k.startswith(f"train/{m}/")}, TRAIN_FIELDS) for m in members} or None,
        )

    def _last_logged_step(self, status: str, trainer: pl.Trainer) -> int | None:
        """The step whose training numbers ``trainer.callback_metrics`` holds: every ``log_every_n_steps``, this
        session's first step, and the last step of a finished run (``SAESystem.log_this_step``); None if ``steps``."""
        step = trainer.global_step
        if status == "finished" or step <= self._step0:
            return None
        every = max(int(trainer.log_every_n_steps or 1), 1)
        logged = max(step - step % every, self._step0 + 1)
        return None if logged == step else logged

    def render(self, resume_command: str | None = None) -> str:
        """The summary as console text ("" before training ended); ``resume_command`` is offered if it was stopped."""
        summary = self.summary
        return render(summary, resume_command) if summary is not None else ""


def newest_evaluation(trainer: pl.Trainer, ckpts: list[Path]) -> tuple[int | None, str | None, list[tuple[str, str]]]:
    """``(step, source, headline)`` of the newest evaluation: a callback's latest results or the newest JSON.

    For a sweep every member has its own JSON; the headline then names each metric ``<member>:<benchmark>.<metric>``."""
    best: tuple[int, str, dict] | None = None  # (step, source, {member: results})
    for p in ckpts:
        found: dict[str, dict] = {}
        step, source = -1, None
        for path in sorted(p.parent.glob(glob.escape(p.name) + "*.eval.json")):
            try:
                payload = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            found[str(payload.get("member", ""))] = payload.get("results", {})
            step, source = int(payload.get("step", -1)), str(path)
        if found and (best is None or step >= best[0]):
            best = (step, source if len(found) == 1 else str(p) + ".*.eval.json", found)
    for cb in trainer.callbacks:
        last = getattr(cb, "_last", None)  # EvaluationCallback: (global step, {member: {benchmark: result}})
        if isinstance(last, tuple) and len(last) == 2 and isinstance(last[1], dict):
            if best is None or last[0] >= best[0]:  # the same step: the callback's, in the members' order
                best = (int(last[0]), "callback", last[1])
    if best is None:
        return None, None, []
    members = best[2]
    if list(members) == [""]:
        return best[0], best[1], headline_numbers(members[""])
    return best[0], best[1], [(f"{m}:{k}", v) for m, r in members.items() for k, v in headline_numbers(r, SWEEP_HEADLINE)]


def headline_numbers(results: dict[str, dict], which: dict[str, tuple[str, ...]] | None = None) -> list[tuple[str, str]]:
    """``[("loss_added.L_added", "0.0312"), ...]``: the :data:`HEADLINE` metrics present in ``results``, and
    ``("<benchmark>.failed", "<Error>: <message>")`` for every benchmark that raised (shortened to 60 characters)."""
    out = []
    for bench, keys in (which or HEADLINE).items():
        for k in keys:
            v = results.get(bench, {}).get(k)
            if isinstance(v, int | float) and not isinstance(v, bool):
                out.append((f"{bench}.{k}", f"{v:.4g}"))
    for bench, result in results.items():
        failed = failure(result)
        if failed:
            out.append((f"{bench}.failed", failed if len(failed) <= 60 else failed[:59] + "…"))
    return out


def render(s: Summary, resume_command: str | None = None) -> str:
    """Console text of a :class:`Summary`; paths relative to the working directory where they are under it.
    ``resume_command``: the command that continues a stopped run (shown under ``next`` when it was stopped)."""
    rate = s.tokens / s.wall_s if s.wall_s > 0 else 0.0
    training = s.wall_s - s.eval_s - s.val_s
    # the evaluations (minutes per checkpoint at GPT-2 scale) and validation are not training: the rate leaves them out
    others = [f"{what} {format_duration(t)}" for what, t in (("validating", s.val_s), ("evaluating", s.eval_s)) if t >= 0.5]
    timing = (", ".join([f"training {format_duration(training)} at {format_count(s.tokens / training)} tokens/s",
                         *others]) if others and training > 0 else f"{format_count(rate)} tokens/s")
    head = {"finished": "finished", "terminated": "stopped (SIGTERM; last.ckpt holds the step reached)"}.get(
        s.status, "stopped (Ctrl+C)"
    )
    resumed = f" (run total {format_count(s.tokens_total)} tokens, step {s.steps})" if s.steps_run != s.steps else ""
    lines = [
        "── run summary " + "─" * 50,
        f"{head}: {s.steps_run} steps, {format_count(s.tokens)} tokens in {format_duration(s.wall_s)} "
        f"({timing}){resumed}",
    ]
    label = "train" if s.train_step is None else f"train @{s.train_step}"  # a stopped run's last logged numbers
    if s.member_train and any(s.member_train.values()):
        # a sweep: each member's own numbers (the console's line is their mean, and their summed loss: no member's)
        width = max(len(m) for m in s.member_train)
        for i, (m, fields) in enumerate(s.member_train.items()):
            lines.append(f"{label if i == 0 else '':<12} {m:<{width}}  " + "  ".join(f"{k} {v}" for k, v in fields))
    elif s.train:
        lines.append(f"{label:<12} " + "  ".join(f"{k} {v}" for k, v in s.train))
    if s.val:
        lines.append("val          " + "  ".join(f"{k} {v}" for k, v in s.val))
    sweep = any(":" in k for k, _ in s.headline)
    if sweep:  # one line per member
        members = list(dict.fromkeys(k.split(":", 1)[0] for k, _ in s.headline))
        width = max(len(m) for m in members)
        for i, m in enumerate(members):
            label = f"eval @{s.eval_step}" if i == 0 else ""
            values = "  ".join(f"{k.split(':', 1)[1]} {v}" for k, v in s.headline if k.split(":", 1)[0] == m)
            lines.append(f"{label:<12} {m:<{width}}  {values}")
    benches = [] if sweep else list(dict.fromkeys(k.split(".", 1)[0] for k, _ in s.headline))
    for i, bench in enumerate(benches):
        label = f"eval @{s.eval_step}" if i == 0 else ""
        values = "  ".join(f"{k.split('.', 1)[1]} {v}" for k, v in s.headline if k.startswith(bench + "."))
        lines.append(f"{label:<12} {bench}: {values}")
    if s.checkpoint_dir:
        names = _names(s.checkpoints) or "none written"
        lines.append(f"checkpoints  {_rel(s.checkpoint_dir)}/  ({names})")
    for label, paths in (("exports", s.exports), ("evaluation", s.eval_json), ("latents", s.latents_html)):
        if paths:
            more = f"  (+{len(paths) - 1} more in that folder)" if len(paths) > 1 else ""  # other steps, members
            lines.append(f"{label:<12} {_rel((s.shown or {}).get(label) or _newest_step(paths))}{more}")
    if s.events:
        lines.append(f"events       {_rel(s.events)}")
    lines.append("next")
    if s.status != "finished" and resume_command and s.checkpoints:
        lines.append(f"  {resume_command}")
    elif s.status != "finished" and resume_command:  # stopped before the first checkpoint: nothing to resume
        lines.append(f"  {resume_command.removesuffix(' --ckpt_path last')}   # no checkpoint yet: starts over")
    if s.events:
        # the run's folder, not this session's version_N: a resumed run's curves continue in version_N+1, and
        # TensorBoard shows them with the earlier sessions'
        lines.append(f"  tensorboard --logdir {shlex.quote(_rel(str(Path(s.events).parent)))}")
    if s.checkpoints:
        lines.append(f"  python evaluate.py {shlex.quote(_rel(_newest_step(s.checkpoints)))}")
    return "\n".join(lines)


def checkpoints_oldest_first(folder: Path) -> list[Path]:
    """The ``*.ckpt`` of ``folder`` by time written, a link (``last.ckpt``) right after the checkpoint it points at
    (whose time it reads as): after a resume the link came first as often as not."""
    return sorted(folder.glob("*.ckpt"), key=lambda c: (os.path.getmtime(c), c.is_symlink(), c.name))


def _names(paths: list[str], most: int = 6) -> str:
    """The file names of ``paths`` (oldest first), the first two and the last three with a count between when there
    are more than ``most`` (a long run keeps dozens); a link with what it points at (``last.ckpt → epoch=0-step=N.ckpt``)."""
    names = [f"{Path(p).name} → {os.readlink(p)}" if Path(p).is_symlink() else Path(p).name for p in paths]
    if len(names) > most:
        names = [*names[:2], f"… {len(names) - 5} more …", *names[-3:]]
    return ", ".join(names)


def _beside(ckpts: list[Path], suffix: str, stem: bool = False, members: list[str] | None = None) -> list[str]:
    """Files (``stem``: folders named from the checkpoint's stem) beside each checkpoint with ``suffix``: the one
    SAE's (``<ckpt><suffix>``) and a sweep's members' (``<ckpt>.<member><suffix>``, in ``members``' order, the
    config's; others after them by name)."""
    order = {m: i for i, m in enumerate(members or [])}
    out = []
    for p in ckpts:
        base = p.stem if stem else p.name
        own = p.with_name(base + suffix)
        found = p.parent.glob(glob.escape(base) + ".*" + suffix)  # never matches ``own``
        cut = len(base) + 1
        ordered = sorted(found, key=lambda f, cut=cut: (order.get(f.name[cut : -len(suffix)], len(order)), f.name))
        out += [str(f) for f in ([own] if own.exists() else []) + ordered if not f.is_symlink()]  # last.saelens: a link
    return out


def _eval_seconds(trainer: pl.Trainer) -> float:
    """Seconds the evaluation callbacks have spent in this process (``EvaluationCallback.seconds_total``)."""
    return sum(float(getattr(cb, "seconds_total", 0.0)) for cb in trainer.callbacks)


def _newest_step(paths: list[str]) -> str:
    """The newest of ``paths`` (oldest first) that is not a ``last*`` copy, else the newest."""
    steps = [p for p in paths if not Path(p).name.startswith("last")]
    return (steps or paths)[-1]


def _rel(path: str | os.PathLike) -> str:
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _tokens(pl_module: pl.LightningModule) -> int:
    t: Any = getattr(pl_module, "tokens_seen", 0)
    return int(t)


def _events_dir(trainer: pl.Trainer) -> str | None:
    from lightning.pytorch.loggers import TensorBoardLogger

    for lg in trainer.loggers:
        if isinstance(lg, TensorBoardLogger):
            return lg.log_dir
    return None
