"""The TensorBoard logger of ``train.py``: TensorBoard opens on the SAE's curves, not on Lightning's bookkeeping.

Lightning's ``TensorBoardLogger`` adds two scalars that mean nothing for an SAE run and, sorting first,
are the first cards TensorBoard shows: ``epoch`` (the token stream is endless, so it stays 0) and
``hp_metric`` (a ``-1`` placeholder written with the hyperparameters). :class:`TensorBoardLogger` drops
both, and writes the hyperparameters to the HPARAMS tab itself (Lightning writes them there only with a metric): a
session per run (a sweep: per member, its SAE's settings, hook and learning rate), with every scalar of its run as a
metric, so runs and members compare in one table (``k``, ``beta`` … beside ``eval/loss_added/L_added`` …). The CLI uses it for every run, including configs
that name Lightning's class (:func:`curves_first`).

It also writes a call's scalars as one event (one ``Summary`` holding every value) where Lightning's writes one per
scalar through ``SummaryWriter.add_scalar``: TensorBoard reads the same tags, steps and values, and a 10-member sweep's
~140 scalars per logging step take 0.5 ms instead of 8 (``benchmarks/logging_cost.py``).

A sweep's members (:class:`gsae.systems.SweepSAESystem`) are TensorBoard runs of their own, ``version_N/<member>/``:
a member's ``train/<member>/nmse`` is written there as ``train/nmse`` (``lr/<member>`` as ``lr``, ``eval/<member>/…`` as
``eval/…``, its figures and texts too), so the Scalars tab draws one chart per metric with every member's curve in its
own colour, named in the legend and switched on and off in the runs list; the run's own folder keeps what is not a
member's (``train/tokens_seen``, the evaluation's shared seconds). In one run they were a card per member per metric
(140 for Table 1's sweep).

A resumed run goes on in the TensorBoard folder (``version_N``) of the run it resumes, so its curves continue as one
run, not as a second one (``version_N+1``) drawn over the first: every checkpoint records that folder
(:data:`LOG_FOLDER_KEY`, :func:`log_folder_record`), ``train.py --ckpt_path`` points the logger back at it
(:func:`continue_log_folder`), and what the killed run logged after the checkpoint's step, which the resume logs again,
is dropped from the folder's event files before the first new event is written (:func:`drop_events`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import _DummyExperiment
from lightning.pytorch.loggers import TensorBoardLogger as _LightningTensorBoardLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from typing_extensions import override

log = logging.getLogger(__name__)

#: Scalars Lightning adds on its own that an SAE run does not log.
DROPPED = frozenset({"epoch", "hp_metric"})

#: The checkpoint key of the run's TensorBoard folder (:func:`log_folder_record`).
LOG_FOLDER_KEY = "gsae_log_folder"


class TensorBoardLogger(_LightningTensorBoardLogger):
    """Lightning's ``TensorBoardLogger`` without the ``epoch`` and ``hp_metric`` scalars; on a resume into an existing
    folder (:attr:`resume_step` set), the folder's events after that step are dropped before this run writes."""

    #: the step a resume continues from, when it continues in an existing folder (:func:`continue_log_folder`)
    resume_step: int | None = None
    #: that folder's event files when this run's writer was made: the stopped run's
    _earlier_files: list[Path] = []
    #: the tags' prefix of what this run logs again at :attr:`resume_step`, if said before its writer was made
    _redone: str | None = None
    #: a sweep's member names (:class:`gsae.systems.SweepSAESystem` sets them): each a TensorBoard run of its own
    members: tuple[str, ...] = ()
    #: each SAE's hyperparameters, ``{member: settings}`` (``""``: a one-SAE run), for the HPARAMS tab
    #: (:meth:`log_hyperparams`; :meth:`gsae.systems.base.SAESystem.session_hparams` sets them)
    member_hparams: dict[str, dict[str, Any]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("default_hp_metric", False)
        super().__init__(*args, **kwargs)

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> SummaryWriter:
        if self._experiment is None and self.resume_step is not None:
            self._earlier_files = run_event_files(Path(self.log_dir))
            redone = self._redone
            drop_events(self._earlier_files, after=self.resume_step, at=None if redone is None else self.resume_step,
                        prefix=redone or "")
        return super().experiment

    def drop_redone(self, step: int, prefix: str = "eval/") -> None:
        """Before a resume logs again what the stopped run logged at ``step`` (the resumed checkpoint's evaluation,
        which a kill cut short after it was logged): drop those values (tags starting with ``prefix``) from the
        folder's earlier event files, now or, if this run has not written yet, with the events after ``step``.
        Nothing unless this logger continues a folder at ``step``."""
        if self.resume_step != step:
            return
        if self._experiment is None:
            self._redone = prefix
        else:
            drop_events(self._earlier_files, at=step, prefix=prefix)

    @property
    def _member_writers(self) -> dict[str, SummaryWriter]:
        """The members' writers made so far (kept in the instance: :func:`curves_first` makes one without ``__init__``)."""
        return self.__dict__.setdefault("_member_writers_", {})

    def member_experiment(self, member: str) -> SummaryWriter:
        """The writer of sweep member ``member``'s run, ``<log_dir>/<member>/`` (made on first use, after the run's own
        writer, so that a resume's drop of the stopped run's later events has been done in every folder); on other
        ranks than 0, Lightning's stand-in that does nothing (as :attr:`experiment`)."""
        if rank_zero_only.rank > 0:
            return _DummyExperiment()
        writer = self._member_writers.get(member)
        if writer is None:
            main = self.experiment
            kwargs = {k: v for k, v in self._kwargs.items() if k != "log_dir"}
            writer = type(main)(log_dir=os.path.join(self.log_dir, member), **kwargs)
            self._member_writers[member] = writer
        return writer

    def writer_for(self, tag: str) -> tuple[SummaryWriter, str]:
        """``(writer, tag)`` a value tagged ``tag`` goes to: a member's tag to its run without the member's name
        (:func:`member_tag`), any other to the run's own writer."""
        found = member_tag(tag, self.members)
        return (self.experiment, tag) if found is None else (self.member_experiment(found[0]), found[1])

    @override
    @rank_zero_only
    def log_hyperparams(self, params: Any, metrics: dict[str, Any] | None = None, step: int | None = None) -> None:
        """Lightning's (``hparams.yaml``; the HPARAMS tab only when given a metric), and the HPARAMS tab's session
        without one: each SAE's settings (:attr:`member_hparams`; a sweep member's in its own run), else the
        hyperparameters given, flattened (``sae/init_args/k``). TensorBoard takes a session's scalars as its metrics."""
        from lightning.fabric.utilities.logger import _convert_params, _flatten_dict

        super().log_hyperparams(params, metrics, step)
        if metrics or not isinstance(self.experiment, SummaryWriter):
            return
        if self.member_hparams:  # gsae's systems: each SAE's settings (SAESystem.session_hparams; "": a one-SAE run)
            sessions = [(self.member_experiment(m) if m else self.experiment, hp) for m, hp in self.member_hparams.items()]
        else:
            flat = self._sanitize_params(_flatten_dict(_convert_params(params)))
            sessions = [(self.experiment, {k: v for k, v in flat.items() if not k.startswith("_")})]
        for writer, hp in sessions:
            writer._get_file_writer().add_summary(session_start(hp), step)

    @override
    @rank_zero_only
    def save(self) -> None:
        super().save()
        for writer in self._member_writers.values():
            writer.flush()

    @override
    @rank_zero_only
    def finalize(self, status: str) -> None:
        for writer in self._member_writers.values():
            writer.flush()
            writer.close()
        self._member_writers.clear()
        super().finalize(status)

    @override
    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Numbers and one-element tensors as one event of ``float32`` ``simple_value``s (what ``add_scalar`` writes);
        anything else (a dict for ``add_scalars``, a value to reject) through Lightning's ``log_metrics``."""
        kept = {k: v for k, v in metrics.items() if k not in DROPPED}
        writer = self.experiment
        if not isinstance(writer, SummaryWriter):  # another writer class (tensorboardX): one add_scalar each
            super().log_metrics(kept, step)
            return
        numbers: dict[str, float] = {}
        other: dict[str, Any] = {}
        for k, v in kept.items():
            if isinstance(v, Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, (int, float)):
                numbers[f"{self._prefix}{self.LOGGER_JOIN_CHAR}{k}" if self._prefix else k] = float(v)
            else:
                other[k] = v
        by_writer: dict[int, tuple[SummaryWriter, list]] = {}
        for k, v in numbers.items():  # a sweep's member values to the member's run: one event per run
            w, tag = self.writer_for(k) if self.members else (writer, k)
            by_writer.setdefault(id(w), (w, []))[1].append(Summary.Value(tag=tag, simple_value=v))
        for w, values in by_writer.values():
            w._get_file_writer().add_summary(Summary(value=values), step)
        if other:
            super().log_metrics(other, step)


#: names a sweep member cannot have: the run's own tags hold them where a member's name goes (``eval/seconds/…``)
RESERVED_MEMBER_NAMES = frozenset({"seconds"})


def session_start(hparams: dict[str, Any]) -> Summary:
    """The HPARAMS tab's ``session_start_info`` summary of a run with ``hparams`` (values other than numbers, text
    and booleans as text; ``None`` as ``"None"``). No experiment summary: TensorBoard then builds the table from every
    run's session and takes the runs' scalars as its metrics."""
    from torch.utils.tensorboard.summary import hparams as summaries

    plain = {str(k): v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()}
    _, start, _ = summaries(plain, {})
    return start


def member_tag(tag: str, members: Iterable[str]) -> tuple[str, str] | None:
    """``(member, tag in its run)`` of a sweep member's tag: ``<section>/<member>/<metric…>`` (``train``, ``val``,
    ``eval``) as ``<section>/<metric…>``, ``<section>/<member>`` (``lr``) as ``<section>``; ``None`` for the run's own
    tags (``train/tokens_seen``; ``train/nmse``, the members' mean, were it logged). The evaluation's time for one member,
    ``eval/seconds/<member>/<benchmark>``, is ``eval/seconds/<benchmark>`` in the member's run."""
    parts = tag.split("/")
    if len(parts) >= 2 and parts[1] in members and (len(parts) >= 3 or parts[0] == "lr"):
        return parts[1], "/".join([parts[0], *parts[2:]])
    if len(parts) >= 4 and parts[:2] == ["eval", "seconds"] and parts[2] in members:
        return parts[2], "/".join(["eval", "seconds", *parts[3:]])
    return None


def curves_first(loggers: list) -> None:
    """Make every plain Lightning ``TensorBoardLogger`` in ``loggers`` a :class:`TensorBoardLogger` (same state,
    one overridden method), so the shipped configs that name Lightning's class get it too."""
    for lg in loggers:
        if type(lg) is _LightningTensorBoardLogger:
            lg.__class__ = TensorBoardLogger
            lg._default_hp_metric = False


def drop_events(files: list[Path], after: int | None = None, at: int | Iterable[int] | None = None,
                prefix: str | tuple[str, ...] = "") -> list[Path]:
    """Rewrite TensorBoard event ``files`` without the summaries (scalars, figures, text) logged at steps after
    ``after`` (a run killed after its checkpoint at that step logged them, and its resume logs those steps again), nor
    the values at step ``at`` (or any of the steps ``at``) whose tag starts with ``prefix`` (or one of them: an
    evaluation done again). Other events (file version, graphs) stay, and so do files with nothing to drop
    (untouched) and a record a kill cut short at a file's end (left for TensorBoard, which skips it). Each file is written beside the old one, then renamed over it.
    Returns the files rewritten."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    steps = frozenset() if at is None else frozenset([at] if isinstance(at, int) else at)
    rewritten = []
    if after is None and not steps:
        return rewritten
    for f in files:
        records = list(RawEventFileLoader(str(f)).Load())
        kept = [r for r in (_without(r, Event.FromString(r), after, steps, prefix) for r in records) if r is not None]
        if kept == records:
            continue
        # beside it, under a name TensorBoard does not read (any name holding "tfevents" is read as a run's events)
        partial = f.with_name(f".rewrite-{os.getpid()}.partial")
        try:
            with open(partial, "wb") as out:
                writer = RecordWriter(out)
                for r in kept:
                    writer.write(r)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, f)
        finally:
            partial.unlink(missing_ok=True)
        rewritten.append(f)
        log.info("dropped from %s the events %s", f, " and ".join(
            ([] if after is None else [f"after step {after}"]) + ([f"{prefix} at step{'s' * (len(steps) > 1)} {', '.join(map(str, sorted(steps)))}"] if steps else [])))
    return rewritten


def event_files(folder: Path) -> list[Path]:
    """The TensorBoard event files in ``folder``, oldest first (their names start with the time they were made)."""
    return sorted(folder.glob("events.out.tfevents.*"))


def run_event_files(folder: Path) -> list[Path]:
    """A training run's event files: its own (:func:`event_files`) and its sweep members' (``<folder>/<member>/``)."""
    if not folder.is_dir():
        return []
    return event_files(folder) + [f for sub in sorted(p for p in folder.iterdir() if p.is_dir()) for f in event_files(sub)]


def _without(record: bytes, event, after: int | None, steps: frozenset[int],
             prefix: str | tuple[str, ...]) -> bytes | None:
    """``record`` (the serialized ``event``) as kept by :func:`drop_events`: itself, ``None``, or fewer values."""
    if not event.HasField("summary"):
        return record
    if after is not None and event.step > after:
        return None
    if event.step not in steps:
        return record
    values = [v for v in event.summary.value if not v.tag.startswith(prefix)]
    if len(values) == len(event.summary.value):
        return record
    if not values:
        return None
    del event.summary.value[:]
    event.summary.value.extend(values)
    return event.SerializeToString()


def _tensorboard_logger(loggers: list):
    return next((lg for lg in loggers if isinstance(lg, _LightningTensorBoardLogger)), None)


def log_folder_record(loggers: list, checkpoint_dir: str | Path) -> dict[str, Any] | None:
    """What a checkpoint in ``checkpoint_dir`` records of the run's TensorBoard folder (the first TensorBoard logger's
    ``version_N``): its ``version`` and its ``path`` relative to the checkpoint's folder (so a run folder moved or
    copied whole still finds it); ``None`` without a TensorBoard logger."""
    tb = _tensorboard_logger(loggers)
    if tb is None:
        return None
    return {"version": tb.version, "path": os.path.relpath(tb.log_dir, checkpoint_dir)}


def continue_log_folder(loggers: list, ckpt: str | Path, record: dict[str, Any] | None, step: int) -> Path | None:
    """Point the run's TensorBoard logger at the folder the checkpoint ``ckpt`` (at ``step``, recording ``record``, see
    :func:`log_folder_record`) was logged into, so a resume continues its curves there, and have it drop the events
    after ``step`` before writing (:class:`TensorBoardLogger`). Only where the logger would otherwise pick a new
    ``version_N`` in that same run folder and the folder exists: a checkpoint of another run (fine-tuning from it), a
    pinned ``version`` or a folder since deleted get a new folder, as before. Returns the folder continued, or
    ``None``. Call it before the logger writes or settles its version (before ``fit``; ``gsae.cli.main`` does)."""
    tb = _tensorboard_logger(loggers)
    if not isinstance(tb, TensorBoardLogger) or record is None or tb._version is not None or tb._experiment is not None:
        return None
    version = record.get("version")
    folder = Path(os.path.normpath(Path(ckpt).parent / str(record.get("path"))))
    name = version if isinstance(version, str) else f"version_{version}"
    if not folder.is_dir() or os.path.realpath(folder) != os.path.realpath(Path(tb.root_dir) / name):
        return None
    tb._version = version
    tb.resume_step = step
    return folder
