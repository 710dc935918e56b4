"""gsae's TensorBoard logger writes what Lightning's writes (less ``epoch`` and ``hp_metric``), as one event per call."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from gsae.loggers import TensorBoardLogger, curves_first


def _read(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's ``(step, value)`` list of the run in ``folder``."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


CALLS = [
    ({"train/loss": 0.123456789, "train/l0": 32, "lr": torch.tensor(3e-4), "train/nmse": torch.tensor([0.25]),
      "train/flag": True, "train/np": np.float32(1.5), "epoch": 0}, 9),
    ({"train/loss": float("nan"), "pair": {"a": 1.0, "b": 2.0}, "train/l0": torch.tensor(31, dtype=torch.int64)}, 19),
]


@pytest.mark.parametrize("prefix", ["", "sae"])
def test_scalars_match_lightnings_logger(tmp_path, prefix):
    ours = TensorBoardLogger(str(tmp_path), name="ours", prefix=prefix)
    ref = LightningTensorBoardLogger(str(tmp_path), name="ref", prefix=prefix, default_hp_metric=False)
    for metrics, step in CALLS:
        ours.log_metrics(metrics, step)
        ref.log_metrics(metrics, step)
    ours.finalize("success")
    ref.finalize("success")
    got = _read(tmp_path / "ours" / "version_0")
    want = _read(tmp_path / "ref" / "version_0")
    want = {k: v for k, v in want.items() if not k.endswith("epoch")}  # dropped (an SAE run has one epoch)
    assert set(got) == set(want) and got.keys() >= {f"{prefix}-train/loss" if prefix else "train/loss"}
    for tag in want:
        steps = [s for s, _ in got[tag]]
        assert steps == [s for s, _ in want[tag]], tag
        np.testing.assert_array_equal([v for _, v in got[tag]], [v for _, v in want[tag]], err_msg=tag)  # NaN == NaN


def test_one_call_is_one_event(tmp_path):
    """Numbers and one-element tensors (half of them here) alike: one event of 140 values, not one event each."""
    logger = TensorBoardLogger(str(tmp_path), name="run")
    logger.log_metrics({f"train/m{i}/nmse": torch.tensor(i / 7) if i % 2 else i / 7 for i in range(140)}, step=3)
    logger.finalize("success")
    got = _read(tmp_path / "run" / "version_0")
    assert len(got) == 140 and got["train/m3/nmse"] == [(3, pytest.approx(3 / 7))]
    (events,) = list((tmp_path / "run" / "version_0").glob("events.out.tfevents.*"))
    summaries = [e for e in EventFileLoader(str(events)).Load() if e.HasField("summary")]
    assert len(summaries) == 1 and len(summaries[0].summary.value) == 140 and summaries[0].step == 3


def test_unsupported_values_fail_as_in_lightning(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="run")
    with pytest.raises(ValueError, match="not supported"):
        logger.log_metrics({"train/loss": 1.0, "train/text": "abc"}, step=0)


def test_curves_first_converts_lightnings_logger(tmp_path):
    (lg,) = loggers = [LightningTensorBoardLogger(str(tmp_path), name="run")]
    curves_first(loggers)
    assert type(lg) is TensorBoardLogger
    lg.log_metrics({"train/loss": 1.0, "epoch": 0, "hp_metric": -1}, step=0)
    lg.finalize("success")
    assert set(_read(tmp_path / "run" / "version_0")) == {"train/loss"}


def _steps(folder, tag: str) -> list[int]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0}).Reload()
    return [e.step for e in (acc.Images(tag) if tag in acc.Tags()["images"] else acc.Scalars(tag))]


def test_drop_events_keeps_steps_up_to_the_checkpoint_and_leaves_other_files_alone(tmp_path, caplog):
    """The events a killed run logged after its checkpoint's step go (scalars and images alike); files with nothing
    after it stay byte for byte; a record a kill cut short at a file's end does not stop the rewrite."""
    from torch.utils.tensorboard import SummaryWriter

    from gsae.loggers import drop_events, event_files

    early = SummaryWriter(str(tmp_path), filename_suffix=".a")
    for step in (1, 2, 3):
        early.add_scalar("train/loss", step / 10, step)
    early.close()
    late = SummaryWriter(str(tmp_path), filename_suffix=".b")
    for step in (4, 5, 6, 7):
        late.add_scalar("train/loss", step / 10, step)
    late.add_image("eval/figure", np.zeros((3, 4, 4), np.uint8), 5)
    late.add_image("eval/figure", np.zeros((3, 4, 4), np.uint8), 7)
    late.close()
    a, b = sorted(tmp_path.glob("events.out.tfevents.*"), key=lambda f: f.name[-1])
    with open(b, "ab") as f:
        f.write(b"\x20\x00\x00\x00\x00\x00\x00\x00truncated")  # a kill mid-record
    a_bytes = a.read_bytes()
    with caplog.at_level("INFO", logger="gsae.loggers"):
        assert drop_events(event_files(tmp_path), after=5) == [b]
    assert caplog.messages == [f"dropped from {b} the events after step 5"]
    assert a.read_bytes() == a_bytes
    assert _steps(tmp_path, "train/loss") == [1, 2, 3, 4, 5]
    assert _steps(tmp_path, "eval/figure") == [5]
    assert [e.file_version for e in EventFileLoader(str(b)).Load()][0].startswith("brain.Event")  # still an event file
    assert drop_events(event_files(tmp_path), after=5) == [] and not list(tmp_path.glob(".*partial"))
    # a rewrite that fails (a full disk) leaves the file as it was and nothing TensorBoard would read as events
    import unittest.mock

    with unittest.mock.patch("os.fsync", side_effect=OSError(28, "No space left on device")), pytest.raises(OSError):
        drop_events(event_files(tmp_path), after=4)
    assert _steps(tmp_path, "train/loss") == [1, 2, 3, 4, 5] and len(list(tmp_path.iterdir())) == 2


def test_drop_events_at_a_step_removes_an_event_left_without_values(tmp_path):
    """An evaluation done again drops its values at that step (``at``, ``prefix``): an event that held only those goes
    whole (no empty event is left at the step), one holding others keeps them, and the other steps stay."""
    from gsae.loggers import drop_events, event_files

    lg = TensorBoardLogger(str(tmp_path), name="run")
    lg.log_metrics({"eval/kl": 0.5}, 10)  # an event of evaluation values only
    lg.log_metrics({"train/loss": 1.0, "eval/l0": 8.0}, 10)  # an event holding both
    lg.log_metrics({"eval/kl": 0.25}, 20)
    lg.finalize("success")
    folder = tmp_path / "run" / "version_0"
    assert drop_events(event_files(folder), at=10, prefix="eval/") == event_files(folder)
    events = [e for f in event_files(folder) for e in EventFileLoader(str(f)).Load() if e.HasField("summary")]
    assert [(e.step, [v.tag for v in e.summary.value]) for e in events] == [(10, ["train/loss"]), (20, ["eval/kl"])]


def test_a_logger_resumed_in_its_folder_drops_the_later_events_before_it_writes(tmp_path):
    from gsae.loggers import continue_log_folder, log_folder_record

    first = TensorBoardLogger(str(tmp_path), name="run")
    for step in (10, 20, 30):
        first.log_metrics({"train/loss": step, "eval/kl": step / 10}, step)  # one event holding both
    ckpt_dir = tmp_path / "run" / "checkpoints"
    record = log_folder_record([first], ckpt_dir)
    assert record == {"version": 0, "path": "../version_0"}
    first.finalize("success")
    ckpt = ckpt_dir / "last.ckpt"  # where the record was written; not read here
    resumed = TensorBoardLogger(str(tmp_path), name="run")
    assert continue_log_folder([resumed], ckpt, record, step=20) == tmp_path / "run" / "version_0"
    assert resumed.version == 0
    resumed.log_metrics({"train/loss": 30.5}, 30)
    resumed.drop_redone(10)  # not the step resumed from: nothing (eval/kl at 10 stays)
    resumed.drop_redone(20)  # the resume evaluates step 20 again: the stopped run's eval/* at 20 go, the rest stays
    resumed.log_metrics({"eval/kl": 2.5}, 20)
    resumed.finalize("success")
    got = _read(tmp_path / "run" / "version_0")
    assert got["train/loss"] == [(10, 10.0), (20, 20.0), (30, 30.5)]
    assert got["eval/kl"] == [(10, 1.0), (20, 2.5)]
    # said before the resumed run's writer exists (no hyperparameters logged first): dropped when it is made
    again = TensorBoardLogger(str(tmp_path), name="run")
    assert continue_log_folder([again], ckpt, record, step=20) is not None
    again.drop_redone(20)
    again.log_metrics({"eval/kl": 2.75}, 20)
    again.finalize("success")
    got = _read(tmp_path / "run" / "version_0")
    assert got["eval/kl"] == [(10, 1.0), (20, 2.75)] and got["train/loss"] == [(10, 10.0), (20, 20.0)]
    # another run's checkpoint, a pinned version, no record, a Lightning-class subclass: a folder of their own
    other = TensorBoardLogger(str(tmp_path / "elsewhere"), name="run")
    assert continue_log_folder([other], ckpt, record, step=20) is None and other.version == 0
    pinned = TensorBoardLogger(str(tmp_path), name="run", version="mine")
    assert continue_log_folder([pinned], ckpt, record, step=20) is None and pinned.version == "mine"
    assert continue_log_folder([TensorBoardLogger(str(tmp_path), name="run")], ckpt, None, step=20) is None
    assert continue_log_folder([], ckpt, record, step=20) is None


def test_a_sweeps_members_are_runs_of_their_own(tmp_path):
    """Each member's values in ``version_0/<member>/`` without its name in the tag (``train/topk-k8/nmse`` as
    ``train/nmse``, ``lr/topk-k8`` as ``lr``, ``eval/topk-k8/…`` as ``eval/…``): TensorBoard's Scalars tab then draws a
    chart per metric with every member's curve in its own colour, beside the run's own ``train/nmse`` (the members'
    mean), where one run had a card per member per metric. The run's own tags stay (``eval/seconds/…``, a member-like
    name that is not a member's). A resume drops what the stopped run logged after the checkpoint in every run."""
    from gsae.loggers import TensorBoardLogger, member_tag

    members = ("topk-k8", "gsae.k8")
    assert member_tag("train/topk-k8/nmse", members) == ("topk-k8", "train/nmse")
    assert member_tag("lr/gsae.k8", members) == ("gsae.k8", "lr")
    assert member_tag("eval/gsae.k8/loss_added/L_added", members) == ("gsae.k8", "eval/loss_added/L_added")
    assert member_tag("eval/seconds/gsae.k8/loss_added", members) == ("gsae.k8", "eval/seconds/loss_added")
    assert [member_tag(t, members) for t in ("train/nmse", "train/topk-k8", "eval/seconds/x", "train/gsaexk8/nmse",
                                             "eval/seconds/gsae.k8")] == [None] * 5

    lg = TensorBoardLogger(str(tmp_path), name="run")
    lg.members = members
    own = {"train/loss": 2.0, "train/nmse": 0.5, "train/tokens_seen": 9.0, "eval/seconds/loss_added": 3.0}

    def member_values(step: int) -> dict:
        return {f"train/{m}/{k}": step + i + (k == "l0") for i, m in enumerate(members) for k in ("nmse", "l0")}

    for step in (10, 20, 30):
        lg.log_metrics(own | member_values(step) | {f"lr/{m}": 1e-3 for m in members}, step=step)
    lg.log_metrics({f"eval/{m}/loss_added/L_added": 0.1 * (i + 1) for i, m in enumerate(members)}, step=30)
    lg.member_experiment("gsae.k8").add_text("eval/latents/top", "latent 3", global_step=30)
    lg.finalize("success")
    run = tmp_path / "run" / "version_0"
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == sorted(members)
    assert sorted(_read(run)) == sorted(own)  # no member's tag left in the run's own events
    for i, m in enumerate(members):
        got = _read(run / m)
        assert sorted(got) == ["eval/loss_added/L_added", "lr", "train/l0", "train/nmse"], (m, sorted(got))
        assert got["train/nmse"] == [(s, float(s + i)) for s in (10, 20, 30)]
        assert got["eval/loss_added/L_added"] == [(30, pytest.approx(0.1 * (i + 1)))]
    texts = EventAccumulator(str(run / "gsae.k8"), size_guidance={"tensors": 0}).Reload().Tags()["tensors"]
    assert "eval/latents/top/text_summary" in texts

    # resumed from step 20: the events after it go from the run's files and every member's, then the resume logs.
    # (A resume is a later process: its event files' names, which start with the second they were made, sort after
    # the run's. In one process within one second the names differ by a counter, which sorts as text: 10 < 9.)
    time.sleep(1.05)
    again = TensorBoardLogger(str(tmp_path), name="run", version=0)
    again.resume_step, again.members = 20, members
    again.log_metrics(own | member_values(25), step=25)
    again.finalize("success")
    assert [s for s, _ in _read(run)["train/loss"]] == [10, 20, 25]
    for m in members:
        got = _read(run / m)
        assert [s for s, _ in got["train/nmse"]] == [10, 20, 25] and "eval/loss_added/L_added" not in got, m


def _sessions(folder) -> dict[str, dict]:
    """The HPARAMS sessions (``session_start_info``) of the run in ``folder`` and its sub-runs: ``{run: hparams}``."""
    from tensorboard.plugins.hparams import metadata

    out = {}
    for run in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        acc = EventAccumulator(str(run)).Reload()
        try:
            content = acc.PluginTagToContent("hparams")
        except KeyError:  # no hparams data in this run
            content = {}
        if metadata.SESSION_START_INFO_TAG in content:
            info = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
            out[run.name] = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}
    return out


def test_hyperparameters_reach_the_hparams_tab(tmp_path):
    """Lightning writes the HPARAMS tab's data only with a metric (the ``hp_metric`` placeholder this logger leaves
    out), so it had none. Now a run is a session with its flattened hyperparameters; a sweep's members each one in
    their own run (its SAE's settings, hook, lr), the run's own folder none (it would be a row without metrics)."""
    from gsae.loggers import TensorBoardLogger

    one = TensorBoardLogger(str(tmp_path), name="one")
    one.log_hyperparams({"hook": "blocks.2.hook_resid_post", "sae": {"init_args": {"k": 8}}, "lr": None})
    one.log_metrics({"train/nmse": 0.5}, step=1)
    one.finalize("success")
    assert _sessions(tmp_path / "one" / "version_0") == {
        "version_0": {"hook": "blocks.2.hook_resid_post", "sae/init_args/k": 8.0, "lr": "None"}}

    sweep = TensorBoardLogger(str(tmp_path), name="sweep")
    sweep.members = ("topk-k8", "gsae-k8")
    sweep.member_hparams = {"topk-k8": {"sae": "TopKSAE", "k": 8, "lr": 1e-3},
                            "gsae-k8": {"sae": "GradTopKSAE", "k": 8, "beta": 1e4, "lr": 3e-3}}
    sweep.log_hyperparams({"members": [{"name": "topk-k8"}, {"name": "gsae-k8"}]})
    sweep.log_metrics({"train/topk-k8/nmse": 0.5, "train/gsae-k8/nmse": 0.4}, step=1)
    sweep.finalize("success")
    assert _sessions(tmp_path / "sweep" / "version_0") == {
        "gsae-k8": {"sae": "GradTopKSAE", "k": 8.0, "beta": 1e4, "lr": 3e-3},
        "topk-k8": {"sae": "TopKSAE", "k": 8.0, "lr": 1e-3}}


@pytest.mark.slow
def test_a_runs_hparams_row_names_its_sae(tmp_path):
    """Through train.py: a one-SAE run's HPARAMS row holds its SAE's settings, hook, LM and lr (Lightning's own
    hyperparameters left out the SAE, held apart by the CLI), the run's data seed apart from the SAE's init seed."""
    from gsae.cli import REPO_ROOT, main

    args = ["--config", str(REPO_ROOT / "configs" / "quickstart" / "topk.yaml"), "--trainer.max_steps", "2",
            "--trainer.default_root_dir", str(tmp_path), "--evaluation.enabled", "false",
            "--trainer.enable_progress_bar", "false", "--model.sae.init_args.seed", "7"]
    assert main(args) == 0
    (row,) = _sessions(tmp_path / "quickstart-topk" / "version_0").values()
    assert {k: row[k] for k in ("objective", "sae", "k", "d_sae", "hook", "lm", "lr", "seed", "run_seed")} == {
        "objective": "LocalSAESystem", "sae": "TopKSAE", "k": 16, "d_sae": 1024, "hook": "blocks.2.hook_resid_post",
        "lm": "gsae-tiny", "lr": 1e-3, "seed": 7, "run_seed": 0}


def _hparams_values(folder) -> list[str]:
    """The tags of the HPARAMS summaries in ``folder``'s event files, in the order written."""
    return [v.tag for f in sorted(folder.glob("events.out.tfevents.*")) for e in EventFileLoader(str(f)).Load()
            for v in e.summary.value if v.metadata.plugin_data.plugin_name == "hparams"]


def test_a_run_is_one_hparams_session_without_an_experiment_summary(tmp_path):
    """One ``session_start_info`` per run and no ``experiment`` summary (TensorBoard builds the table from the runs'
    sessions, their scalars the metrics): no ``hp_metric`` column, also for Lightning's class made gsae's by
    :func:`curves_first`. Hyperparameters whose names start with ``_`` (the CLI's ``_instantiator``) are left out.
    Given a metric, Lightning writes the session: not a second one. A one-SAE run's session is in its own folder."""
    from tensorboard.plugins.hparams import metadata

    start = metadata.SESSION_START_INFO_TAG
    ours = TensorBoardLogger(str(tmp_path), name="ours")
    (theirs,) = loggers = [LightningTensorBoardLogger(str(tmp_path), name="theirs")]
    curves_first(loggers)
    for lg in (ours, theirs):
        lg.log_hyperparams({"k": 8, "_instantiator": "x"})
        lg.finalize("success")
        assert _hparams_values(tmp_path / lg.name / "version_0") == [start]
    assert _sessions(tmp_path / "ours" / "version_0") == {"version_0": {"k": 8.0}}
    assert "hp_metric" not in _read(tmp_path / "theirs" / "version_0")

    given = TensorBoardLogger(str(tmp_path), name="given")
    given.log_hyperparams({"k": 8}, metrics={"val/nmse": 0.5})
    given.finalize("success")
    assert _hparams_values(tmp_path / "given" / "version_0").count(start) == 1

    one = TensorBoardLogger(str(tmp_path), name="one")
    one.member_hparams = {"": {"sae": "TopKSAE", "k": 8}}
    one.log_hyperparams({"model": "x"})
    one.finalize("success")
    assert len(list((tmp_path / "one" / "version_0").glob("events.out.tfevents.*"))) == 1
    assert _sessions(tmp_path / "one" / "version_0") == {"version_0": {"sae": "TopKSAE", "k": 8.0}}


def test_member_runs_on_save_after_finalize_and_on_other_ranks(tmp_path, monkeypatch):
    """A sweep member's events are on disk after :meth:`save` (at each checkpoint, as the run's own are), not only at
    the end; a logger used again after ``finalize`` (``trainer.validate`` after ``fit``) writes its members' values
    too; on a rank other than 0 a member's writer is Lightning's stand-in, and no folder is made."""
    from lightning.fabric.loggers.logger import _DummyExperiment
    from lightning.pytorch.utilities import rank_zero_only

    lg = TensorBoardLogger(str(tmp_path), name="run")
    lg.members = ("topk-k8",)
    lg.log_metrics({"train/topk-k8/nmse": 0.5, "train/tokens_seen": 64.0}, step=1)
    lg.save()
    run = tmp_path / "run" / "version_0"
    assert _read(run / "topk-k8") == {"train/nmse": [(1, 0.5)]}
    # save waits for the member's queued events (TensorBoard's writer thread writes them soon after, so reading the
    # file cannot tell; a SIGKILL right after a checkpoint can): it flushes the member's writer as the run's own
    member = lg.member_experiment("topk-k8")
    flushes = []
    monkeypatch.setattr(member, "flush", lambda: flushes.append(1))
    lg.save()
    assert flushes == [1]
    monkeypatch.undo()
    lg.finalize("success")
    lg.log_metrics({"val/topk-k8/nmse": 0.25}, step=2)
    lg.finalize("success")
    assert _read(run / "topk-k8")["val/nmse"] == [(2, 0.25)]

    other = TensorBoardLogger(str(tmp_path), name="other")
    other.members = ("topk-k8",)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert isinstance(other.member_experiment("topk-k8"), _DummyExperiment)
    assert not (tmp_path / "other").exists()


def test_curves_first_leaves_a_subclass_alone(tmp_path):
    """Only Lightning's own class is made gsae's: a config's subclass of it keeps its class (and its overrides)."""

    class Custom(LightningTensorBoardLogger):
        pass

    lg = Custom(str(tmp_path), name="run")
    curves_first([lg])
    assert type(lg) is Custom
