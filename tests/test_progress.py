"""The console of ``train.py``: the step progress bar (plain lines when stdout is not a terminal), the run
summary, and TensorBoard without Lightning's ``epoch`` / ``hp_metric`` cards — through the real CLI."""

from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gsae.callbacks.progress import format_count, format_duration
from gsae.cli import main
from tests.conftest import quickstart_args

REPO_ROOT = Path(__file__).resolve().parent.parent


def train_args(tmp_path, *extra: str, steps: int = 20) -> list[str]:
    return quickstart_args(
        tmp_path, "--trainer.enable_progress_bar", "true", "--checkpoint.every_n_train_steps", "10", *extra, steps=steps
    )


def scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def line_values(line: str) -> dict[str, str]:
    """``step 10/20  tokens/s 1.2k  loss 0.72 ...`` -> ``{"step": "10/20", "tokens/s": "1.2k", "loss": "0.72", ...}``."""
    return dict(part.split(" ", 1) for part in line.strip().split("  "))


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """A 20-step quickstart with stdout redirected to a file (``> train.log``), validation every 10 steps."""
    tmp = tmp_path_factory.mktemp("plain")
    log, old = tmp / "train.log", sys.stdout
    with open(log, "w") as f:
        sys.stdout = f
        try:
            code = main(train_args(tmp, "--trainer.val_check_interval", "10"))
        finally:
            sys.stdout = old
    return code, log.read_text(), tmp


def test_plain_lines_hold_the_logged_metrics(plain_run, monkeypatch) -> None:
    code, out, tmp = plain_run
    assert code == 0
    assert "Epoch" not in out and "v_num" not in out and "\r" not in out
    lines = {m.group(1): line for line in out.splitlines() if (m := re.match(r"step (\d+)/20 ", line))}
    assert set(lines) == {"1", "10", "20"}, out  # the first step, then every log_every_n_steps (10)
    events = scalars(next(tmp.glob("quickstart-topk/version_*")))
    for step in (10, 20):
        v = line_values(lines[str(step)])
        assert v["step"] == f"{step}/20"
        assert {"tokens/s", "loss", "nmse", "L0", "dead", "elapsed", "eta"} <= set(v), v
        h, m, sec = (int(x) for x in v["eta"].split(":"))  # the time left at the pace so far: none at the end
        assert step < 20 or h == m == sec == 0
        tb = {k: events[f"train/{k}"] for k in ("loss", "nmse", "l0", "dead_fraction")}
        logged_at = step  # at the step the console shows (Lightning's own log_dict would use 9 for step 10)
        assert v["loss"] == f"{tb['loss'][logged_at]:.4g}"
        assert v["nmse"] == f"{tb['nmse'][logged_at]:.4f}"
        assert v["L0"] == f"{tb['l0'][logged_at]:.1f}"
        assert v["dead"] == f"{tb['dead_fraction'][logged_at]:.1%}"
        assert float(v["tokens/s"].rstrip("kM")) > 0
    val = [line for line in out.splitlines() if line.startswith("val    step ")]
    assert len(val) == 2 and "nmse" in val[0] and "L0" in val[0], out


def test_summary_names_tokens_paths_and_commands(plain_run, monkeypatch) -> None:
    code, out, tmp = plain_run
    summary = out[out.index("── run summary"):]
    run = tmp / "quickstart-topk"
    events = scalars(next(run.glob("version_*")))
    tokens = int(events["train/tokens_seen"][20])
    assert f"finished: 20 steps, {format_count(tokens)} tokens in " in summary
    ckpt_dir = run / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.glob("*.ckpt")) == ["epoch=0-step=10.ckpt", "epoch=0-step=20.ckpt",
                                                              "last.ckpt"]
    assert (f"checkpoints  {ckpt_dir}/  (epoch=0-step=10.ckpt, epoch=0-step=20.ckpt, last.ckpt → epoch=0-step=20.ckpt)"
            in summary)
    assert f"exports      {ckpt_dir / 'epoch=0-step=20.saelens'}  (+1 more in that folder)" in summary
    assert f"exports      {ckpt_dir / 'epoch=0-step=20.saelens'}" in summary
    # last.ckpt links to step 20 but its JSON and dashboard are files of their own: not counted as more
    assert f"evaluation   {ckpt_dir / 'epoch=0-step=20.ckpt.eval.json'}  (+1 more in that folder)\n" in summary
    assert f"latents      {ckpt_dir / 'epoch=0-step=20.ckpt.latents.html'}  (+1 more in that folder)\n" in summary
    results = json.loads((ckpt_dir / "epoch=0-step=20.ckpt.eval.json").read_text())["results"]
    row = next(line for line in summary.splitlines() if line.startswith("eval @20     loss_added: "))
    assert f"L_added {results['loss_added']['L_added']:.4g}  " in row, row
    assert (ckpt_dir / "epoch=0-step=20.saelens").is_dir()
    log_dir = next(run.glob("version_*"))
    assert f"events       {log_dir}\n" in summary
    assert f"tensorboard --logdir {run}\n" in summary  # the run's folder, where TensorBoard finds it
    assert "--ckpt_path last" not in summary  # a finished run offers no resume
    assert f"python evaluate.py {ckpt_dir / 'epoch=0-step=20.ckpt'}" in summary
    final = line_values(next(line for line in summary.splitlines() if line.startswith("train ")).replace("train", "", 1))
    assert final["loss"] == f"{events['train/loss'][20]:.4g}"


def test_no_epoch_or_hp_metric_cards(plain_run) -> None:
    _, _, tmp = plain_run
    tags = set(scalars(next(tmp.glob("quickstart-topk/version_*"))))
    assert {"train/loss", "train/l0", "val/nmse"} <= tags
    assert not tags & {"epoch", "hp_metric"}, tags


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class InterruptAt(pl.Callback):
    """Raise ``KeyboardInterrupt`` after optimizer step ``step`` (what Ctrl+C does)."""

    def __init__(self, step: int = 5) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def test_terminal_bar_and_summary_on_ctrl_c(tmp_path, monkeypatch) -> None:
    """On a terminal the bar is redrawn in place (``step n/12``); Ctrl+C stops cleanly and still prints the summary."""
    monkeypatch.chdir(REPO_ROOT)
    tty = _TTY()
    monkeypatch.setattr(sys, "stdout", tty)
    import signal

    handler = signal.getsignal(signal.SIGINT)
    try:  # Lightning's graceful shutdown ends with sys.exit(1), "failed"; train.py's code is the shell's for Ctrl+C
        assert main(train_args(tmp_path, "--trainer.log_every_n_steps", "2", "--checkpoint.every_n_train_steps", "4",
                               "--trainer.callbacks+=tests.test_progress.InterruptAt", "--trainer.callbacks.step", "6",
                               steps=12)) == 130
    finally:
        signal.signal(signal.SIGINT, handler)  # main ignores a further Ctrl+C on its way out
    out = tty.getvalue()
    frames = out.split("\r")
    bar = r"step 4/12 ━{7}─{13} \d:\d\d:\d\d<\d:\d\d:\d\d  tokens/s \S+  loss \S+  nmse \S+  L0 16.0  dead \S+%"
    assert any(re.fullmatch(bar + " *", f) for f in frames), frames
    assert any(f.startswith("step 5/12 ━━━━━━━━") for f in frames), frames  # redrawn every step
    assert "stopped (Ctrl+C): 6 steps," in out and "tensorboard --logdir" in out
    resume = next(line.strip() for line in out.splitlines() if "--ckpt_path last" in line)
    assert resume.startswith("python train.py --config ") and "--trainer.callbacks.step 6" in resume
    assert "(epoch=0-step=4.ckpt, last.ckpt → epoch=0-step=4.ckpt)" in out and "epoch=0-step=4.ckpt\n" in out  # kept, and the evaluate command


def test_format_helpers() -> None:
    from gsae.callbacks.summary import _names

    assert [format_count(x) for x in (512, 12345, 4.2e6, 3e9)] == ["512", "12.3k", "4.2M", "3G"]
    assert [format_count(x) for x in (999, 1000, 1e6)] == ["999", "1k", "1M"]  # a scale's first value: its suffix
    assert [format_count(x) for x in (-12345, -4.2e6)] == ["-12.3k", "-4.2M"]  # a negative count is scaled by its size
    assert format_duration(3725.4) == "1:02:05"
    assert format_duration(59.6) == "0:01:00"  # rounded, not cut
    few = [f"/r/epoch=0-step={i}.ckpt" for i in (10, 20)] + ["/r/last.ckpt"]
    assert _names(few) == "epoch=0-step=10.ckpt, epoch=0-step=20.ckpt, last.ckpt"
    many = [f"/r/epoch=0-step={i * 1000}.ckpt" for i in range(1, 41)] + ["/r/last.ckpt"]  # a GPT-2 run's 41 files
    assert _names(many) == ("epoch=0-step=1000.ckpt, epoch=0-step=2000.ckpt, … 36 more …, epoch=0-step=39000.ckpt, "
                            "epoch=0-step=40000.ckpt, last.ckpt")


def test_summary_lists_the_final_checkpoint_saved_at_train_end(tmp_path, monkeypatch, capsys) -> None:
    """The checkpoint callback saves the final state after the other callbacks' ``on_train_end``: still listed."""
    monkeypatch.chdir(REPO_ROOT)
    assert main(quickstart_args(tmp_path, steps=3)) == 0  # checkpoints every 100 steps: only the final one
    out = capsys.readouterr().out
    (ckpt,) = (tmp_path / "quickstart-topk" / "checkpoints").glob("*step=3.ckpt")
    assert f"({ckpt.name}, last.ckpt → {ckpt.name})" in out and f"python evaluate.py {ckpt}" in out
    # and its evaluation is in the run's time, as evaluating: the time ended before it, which left the training time
    # negative, so the line showed a bare rate (GPT-2: "2 steps ... in 0:00:07" for a 176 s run)
    (line,) = [ln for ln in out.splitlines() if ln.startswith("finished: 3 steps")]
    assert "(training " in line and ", evaluating " in line, line


def test_one_line_per_optimizer_step_under_gradient_accumulation(tmp_path, monkeypatch) -> None:
    """With ``accumulate_grad_batches`` 2 two batches make a step: the plain log has one line per logged step (no
    ``step 0`` line before the first optimizer step, no line printed twice)."""
    log, old = tmp_path / "train.log", sys.stdout
    with open(log, "w") as f:
        sys.stdout = f
        try:
            code = main(train_args(tmp_path, "--trainer.accumulate_grad_batches", "2", "--trainer.log_every_n_steps",
                                   "2", steps=6))
        finally:
            sys.stdout = old
    assert code == 0
    steps = [line.split()[1] for line in log.read_text().splitlines() if line.startswith("step ")]
    assert steps == ["1/6", "2/6", "4/6", "6/6"], steps


def test_ddp_fork_summary_comes_from_rank_0(tmp_path) -> None:
    """Under ``--trainer.strategy ddp_fork`` the ranks are forked children: rank 0 prints the run's summary once (the
    parent's copy of the callback never saw the run); Ctrl+C (SIGINT to the process group, as a terminal sends it)
    prints the resume command with the launcher the user ran, ``python``, and no summary of the parent's empty copy."""
    import os
    import signal
    import subprocess

    fork = ["--trainer.strategy", "ddp_fork", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
            "--evaluation.enabled", "false", "--trainer.enable_progress_bar", "true"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "train.py", *quickstart_args(tmp_path, *fork, steps=10)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("── run summary") == 1 and "finished: 10 steps," in done.stdout, done.stdout

    proc = subprocess.Popen([sys.executable, "train.py", *quickstart_args(tmp_path / "b", *fork, steps=100000)],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    for line in proc.stdout:  # until the ranks train
        lines.append(line)
        if line.startswith("step 10/"):
            break
    os.killpg(proc.pid, signal.SIGINT)
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert "Traceback" not in out and "0 steps" not in out, out
    resume = out.split("stopped (Ctrl+C); to resume:\n", 1)[1].splitlines()[0].strip()
    assert resume.startswith("python train.py --config ") and resume.endswith("--ckpt_path last"), resume


def test_the_forking_process_offers_the_resume_on_ctrl_c_only(capsys) -> None:
    """Under ``ddp_fork`` the process that forked the ranks runs no step (rank 0 prints the summary): on Ctrl+C it
    prints the resume command; on another exception (a rank failed, re-raised there) it says nothing of a resume."""
    from types import SimpleNamespace

    from gsae.callbacks.summary import RunSummary

    cb = RunSummary()
    cb.print_from_forked_rank("python train.py --config c.yaml --ckpt_path last")
    trainer = SimpleNamespace(is_global_zero=True)
    cb.on_exception(trainer, None, RuntimeError("rank 1 failed"))
    assert capsys.readouterr().out == "" and cb.summary is None
    cb.on_exception(trainer, None, KeyboardInterrupt())
    assert capsys.readouterr().out == "stopped (Ctrl+C); to resume:\n  python train.py --config c.yaml --ckpt_path last\n"
    assert cb.summary is None


def test_resume_command_names_an_external_launcher() -> None:
    """``python`` where Lightning or the user started the processes; ``<launcher>`` under torchrun or srun."""
    from types import SimpleNamespace

    from gsae.cli import resume_command

    def trainer(external: bool):
        env = SimpleNamespace(creates_processes_externally=external)
        return SimpleNamespace(strategy=SimpleNamespace(cluster_environment=env))

    args = ["--config", "c.yaml", "--ckpt_path", "x.ckpt", "--ckpt_path=y.ckpt", "--model.sae.k", "8"]
    assert resume_command(args) == "python train.py --config c.yaml --model.sae.k 8 --ckpt_path last"
    assert resume_command(args, trainer(False)).startswith("python train.py ")
    assert resume_command(args, trainer(True)).startswith("<launcher> train.py ")


def test_resume_command_of_lightning_s_own_ddp_launcher_is_python(monkeypatch) -> None:
    """``--trainer.strategy ddp --trainer.devices 2`` from ``python train.py``: Lightning starts the ranks, and sets
    ``LOCAL_RANK`` in rank 0 once it has (so its environment reads as external after ``fit`` began: main computes the
    command before); torchrun sets it before the script starts."""
    import lightning.pytorch as pl

    from gsae.cli import resume_command

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    trainer = pl.Trainer(strategy="ddp", devices=2, accelerator="cpu", logger=False, enable_checkpointing=False)
    assert resume_command([], trainer) == "python train.py --ckpt_path last"
    monkeypatch.setenv("LOCAL_RANK", "0")  # as under torchrun
    assert resume_command([], trainer) == "<launcher> train.py --ckpt_path last"


def test_the_console_callbacks_are_added_once() -> None:
    """gsae's run summary and step bar join the trainer's callbacks: the bar unless the progress bar is off or the
    config names one of its own (``enable_progress_bar`` unset is Lightning's default, on); neither twice."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    from gsae.callbacks.progress import StepProgressBar
    from gsae.callbacks.summary import RunSummary
    from gsae.cli import console_callbacks

    def kinds(config: dict) -> list[type]:
        return [type(c) for c in console_callbacks(config)]

    assert kinds({}) == kinds({"enable_progress_bar": None}) == kinds({"enable_progress_bar": True}) == [
        RunSummary, StepProgressBar]
    assert kinds({"enable_progress_bar": False}) == [RunSummary]
    assert kinds({"callbacks": [TQDMProgressBar()]}) == [RunSummary]
    assert kinds({"callbacks": RunSummary()}) == [StepProgressBar]  # one callback, not in a list


def test_only_global_rank_0_prints_the_run_summary(capsys) -> None:
    """Every rank of a DDP run started by ``python train.py`` or torchrun runs ``main`` to its end: one summary, rank
    0's, not one per rank."""
    from types import SimpleNamespace

    from gsae.callbacks.summary import RunSummary
    from gsae.cli import print_summary

    class Ended(RunSummary):
        summary = "ended"

        def render(self, resume_command: str | None = None) -> str:
            return f"the run's summary; resume: {resume_command}"

    for zero, printed in ((True, "the run's summary; resume: R\n"), (False, "")):
        print_summary(SimpleNamespace(trainer=SimpleNamespace(is_global_zero=zero, callbacks=[Ended()])), "R")
        assert capsys.readouterr().out == printed


def test_a_run_stopped_before_its_first_checkpoint_offers_no_resume() -> None:
    """Ctrl+C before the first checkpoint: ``--ckpt_path last`` would fail (nothing to resume), so the summary gives
    the command that starts over; with a checkpoint, the resume."""
    from gsae.callbacks.summary import Summary, render

    s = Summary(status="stopped", steps=20, steps_run=20, tokens=1000, tokens_total=1000, wall_s=2.0, train=[], val=[],
                eval_step=None, eval_source=None, headline=[], checkpoint_dir="/r/ckpts", checkpoints=[], exports=[],
                eval_json=[], latents_html=[], events=None)
    text = render(s, "python train.py --config c.yaml --ckpt_path last")
    assert "(none written)" in text and "--ckpt_path last" not in text
    assert "  python train.py --config c.yaml   # no checkpoint yet: starts over" in text
    text = render(s._replace(checkpoints=["/r/ckpts/last.ckpt"]), "python train.py --config c.yaml --ckpt_path last")
    assert "  python train.py --config c.yaml --ckpt_path last" in text
    # stopped between logging steps: the train row says which step its numbers are from
    assert "\ntrain @20    loss 0.5\n" in render(s._replace(steps=29, steps_run=29, train=[("loss", "0.5")], train_step=20))
    assert "\ntrain        loss 0.5\n" in render(s._replace(train=[("loss", "0.5")]))
    from types import SimpleNamespace

    from gsae.callbacks.summary import RunSummary

    cb = RunSummary()
    cb._step0 = 0
    at = lambda step, every=10: SimpleNamespace(global_step=step, log_every_n_steps=every)  # noqa: E731
    assert [cb._last_logged_step("stopped", at(n)) for n in (29, 30, 5, 1)] == [20, None, 1, None]
    assert cb._last_logged_step("finished", at(29)) is None  # a finished run logs its last step
    assert cb._last_logged_step("stopped", at(0)) is None  # stopped before its first step: no numbers of a later one


def test_the_summary_s_rate_leaves_the_evaluations_out_and_shows_the_first_member(tmp_path) -> None:
    """The tokens/s of a run's wall time, evaluations included, read 4 tokens/s for a GPT-2 config evaluating every
    step: the summary splits training from evaluating. A sweep's files are shown for its first member (config order,
    not by name) of the newest step, and a linked last.ckpt's copies do not count as more files."""
    import os

    from gsae.callbacks.summary import Summary, _beside, render

    s = Summary(status="finished", steps=2, steps_run=2, tokens=4000, tokens_total=4000, wall_s=1000.0, train=[],
                val=[], eval_step=None, eval_source=None, headline=[], checkpoint_dir=None, checkpoints=[], exports=[],
                eval_json=[], latents_html=[], events=None)
    assert "finished: 2 steps, 4k tokens in 0:16:40 (4 tokens/s)" in render(s)
    assert "finished: 2 steps, 4k tokens in 0:16:40 (training 0:00:10 at 400 tokens/s, evaluating 0:16:30)" in render(
        s._replace(eval_s=990.0))
    # validation is not training either (audit K: "training 0:03:01" for 2 steps of 19 s, at GPT-2 shape on a CPU)
    assert ("(training 0:00:20 at 200 tokens/s, validating 0:02:40, evaluating 0:13:40)" in
            render(s._replace(eval_s=820.0, val_s=160.0)))
    for name in ("s.ckpt", "s.ckpt.topk-k64.eval.json", "s.ckpt.topk-k8.eval.json", "s.ckpt.gsae-k8.eval.json"):
        (tmp_path / name).write_text("{}")
    os.symlink("s.ckpt", tmp_path / "last.ckpt")
    os.symlink("s.ckpt.topk-k8.eval.json", tmp_path / "last.ckpt.topk-k8.eval.json")
    got = _beside([tmp_path / "s.ckpt", tmp_path / "last.ckpt"], ".eval.json", members=["topk-k8", "topk-k64", "gsae-k8"])
    assert [os.path.basename(p) for p in got] == ["s.ckpt.topk-k8.eval.json", "s.ckpt.topk-k64.eval.json",
                                                  "s.ckpt.gsae-k8.eval.json"]


def test_bar_fits_the_terminal_and_log_records_start_their_own_line(tmp_path, monkeypatch) -> None:
    """A bar longer than the terminal wraps, and "\\r" then redraws only its last row: every refresh left a stale row
    (202 rows for 200 steps at 80 columns). The bar is cut to the width; a log record (the evaluation's "evaluated
    …", Lightning's "`Trainer.fit` stopped") clears the bar's line first instead of being glued to its end."""
    import logging
    import os
    import shutil

    from gsae.callbacks.progress import StepProgressBar, console_log_handlers

    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=(80, 24): os.terminal_size((60, 24)))
    tty = _TTY()
    monkeypatch.setattr(sys, "stdout", tty)
    assert main(train_args(tmp_path, "--trainer.log_every_n_steps", "2", "--evaluation.enabled", "false", steps=6)) == 0
    frames = [f for f in re.split(r"[\r\n]", tty.getvalue()) if f.startswith("step ")]
    assert frames and max(len(f.rstrip()) for f in frames) <= 59, max(frames, key=len)

    bar = StepProgressBar()
    bar.stream, bar._bar = _TTY(), "step 5/10 ━━━━━━────  loss 0.5"
    handler = logging.StreamHandler(bar.stream)
    logging.getLogger().addHandler(handler)
    try:
        assert handler in console_log_handlers()
        handler.addFilter(bar._clear_for_log)
        logging.getLogger("gsae.test").warning("evaluated loss_added at step 5")
    finally:
        logging.getLogger().removeHandler(handler)
    assert bar.stream.getvalue() == "\r" + " " * 30 + "\r" + "evaluated loss_added at step 5\n"


def test_the_eta_leaves_out_what_ran_before_the_first_step(monkeypatch) -> None:
    """A resume redoes the evaluation a kill cut short before its first step: 3 minutes of eta for 1 s of steps left
    (``step 41/60 … eta 0:03:13``). The pace is taken from the first step's start."""
    from types import SimpleNamespace

    import gsae.callbacks.progress as progress

    clock = [1000.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    bar = progress.StepProgressBar()
    trainer = SimpleNamespace(global_step=40, max_steps=60, checkpoint_callback=None)
    bar._t0, bar._step0, bar._pace0, bar._t_end, bar._validated = clock[0], 40, None, None, False  # on_train_start
    clock[0] += 180.0  # the redone evaluation
    bar.on_train_batch_start(trainer, None, None, 0)
    clock[0] += 1.0  # one step
    trainer.global_step = 41
    assert bar._eta(trainer, elapsed=181.0) == 19.0  # 1 s a step, 19 to go; not 181 s a step


def test_the_summary_headline_has_each_default_benchmarks_finding_not_its_settings() -> None:
    """The run summary's eval lines: steering's on-target probability and sensitive directions' SAE-error ratio (the
    papers' claims) are shown; latents' line repeated a setting (``n_latents 32``) and is gone (its output is files)."""
    from gsae.callbacks.summary import headline_numbers

    results = {"steering": {"on_target": 0.1234, "off_target_added": 0.05, "n_latents": 128, "alpha_report": 50.0},
               "sensitive_directions": {"ratio_sae_over_eps_isotropic": 2.5, "kl_sae": 0.1, "n_sequences": 8},
               "latents": {"n_latents": 32, "n_alive": 1000, "shown_median_density": 0.01}}
    assert headline_numbers(results) == [("steering.on_target", "0.1234"), ("steering.off_target_added", "0.05"),
                                         ("sensitive_directions.ratio_sae_over_eps_isotropic", "2.5")]
    error = "RuntimeError: " + "x" * 100  # a failed benchmark's error, cut to 60 characters
    assert headline_numbers({"fake": {"failed": error}}) == [("fake.failed", error[:59] + "…")]
    assert headline_numbers({"steering": {"on_target": True}}) == []  # a flag under a metric's name is not a number


def test_the_e2e_downstream_mse_is_on_the_line_summed_over_its_hooks() -> None:
    """e2e+ds logs one ``train/ds_mse/<hook>`` per downstream hook, most of its loss (audit E: the quickstart's loss
    1.632 was 0.10 KL and 1.53 of it downstream MSE, which the console did not show)."""
    from gsae.callbacks.progress import metric_fields

    metrics = {"train/loss": 1.632, "train/kl": 0.1022, "train/ds_mse/blocks.3.hook_resid_post": 2.0,
               "train/ds_mse/blocks.4.hook_resid_post": 1.0625}
    assert metric_fields(metrics) == [("loss", "1.632"), ("kl", "0.1022"), ("ds_mse", "3.062")]
    assert metric_fields({"train/loss": 1.0}) == [("loss", "1")]
    # a diverged run's numbers read as they are, not through the field's format ("nan%")
    nan, inf = float("nan"), float("inf")
    assert metric_fields({"train/loss": nan, "train/nmse": inf, "train/dead_fraction": nan}) == [
        ("loss", "nan"), ("nmse", "inf"), ("dead", "nan")]


def test_the_summary_times_validation_apart_from_training(tmp_path, monkeypatch) -> None:
    """A real fit whose validation is slow (0.2 s a batch, 2 validations of 2 batches): the summary's ``val_s``
    holds that time (the sanity check's left out) and the training rate does not."""
    import time

    from gsae.callbacks.summary import RunSummary
    from tests.systems.helpers import build_data, build_system, build_trainer

    system = build_system("topk")
    step = type(system).validation_step

    def slow(self, *a, **k):
        time.sleep(0.2)
        return step(self, *a, **k)

    monkeypatch.setattr(type(system), "validation_step", slow)
    cb = RunSummary()
    trainer = build_trainer(tmp_path, 4, callbacks=[cb], val_check_interval=2, limit_val_batches=2,
                            num_sanity_val_steps=2)
    trainer.fit(system, datamodule=build_data(system, val_batches=2))
    s = cb.summary
    assert 0.8 <= s.val_s < s.wall_s, (s.val_s, s.wall_s)  # 2 × 2 × 0.2 s, not the sanity check's 2 × 0.2 s more
    assert s.val_s < 1.6


def test_the_summary_counts_evaluations_between_checkpoints_as_evaluating(tmp_path, monkeypatch) -> None:
    """``--evaluation.every_n_steps`` evaluations (logged, no JSON) are evaluation time in the summary, as the
    checkpoints' are: they were counted as training ("training 0:00:31 at 6.4k tokens/s" with no "evaluating")."""
    import time

    from gsae.callbacks.evaluation import EvaluationCallback
    from gsae.callbacks.summary import RunSummary
    from tests.systems.helpers import build_data, build_system, build_trainer

    system = build_system("topk")
    ev = EvaluationCallback(benchmarks=["loss_added"], n_seqs=2, every_n_steps=2, log_figures=False)
    monkeypatch.setattr(ev, "evaluate", lambda trainer, module: time.sleep(0.3) or {})
    cb = RunSummary()
    build_trainer(tmp_path, 4, callbacks=[cb, ev]).fit(system, datamodule=build_data(system))
    s = cb.summary
    assert 0.6 <= s.eval_s < 1.2, s  # steps 2 and 4


def test_the_summary_lists_a_link_after_the_checkpoint_it_points_at(tmp_path) -> None:
    """``last.ckpt`` linked to the newest step reads as that step's time: on a tie the glob's order decided, and a
    resumed run's summary said "(…, last.ckpt → epoch=0-step=300.ckpt, epoch=0-step=300.ckpt)"."""
    import os

    from gsae.callbacks.summary import checkpoints_oldest_first

    for i, name in enumerate(("epoch=0-step=300.ckpt", "epoch=0-step=200.ckpt")):
        (tmp_path / name).write_text("x")
        os.utime(tmp_path / name, (1000 - 100 * i, 1000 - 100 * i))
    (tmp_path / "last.ckpt").symlink_to("epoch=0-step=300.ckpt")
    (tmp_path / "a.ckpt").symlink_to("epoch=0-step=300.ckpt")  # a name sorting before the target's
    assert [p.name for p in checkpoints_oldest_first(tmp_path)] == [
        "epoch=0-step=200.ckpt", "epoch=0-step=300.ckpt", "a.ckpt", "last.ckpt"]


class _Clock:
    def __init__(self, *times: float) -> None:
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0)


def test_validation_time_leaves_out_an_evaluation_run_inside_it(monkeypatch) -> None:
    """An evaluation run from a validation hook is the evaluation's time, not validation's."""
    from types import SimpleNamespace

    from gsae.callbacks import summary

    cb = summary.RunSummary()
    evaluation = SimpleNamespace(seconds_total=1.0)
    trainer = SimpleNamespace(sanity_checking=False, callbacks=[evaluation])
    monkeypatch.setattr(summary.time, "perf_counter", _Clock(100.0, 110.0))
    cb.on_validation_start(trainer, None)
    evaluation.seconds_total = 5.0  # a 4 s evaluation ran during the validation
    cb.on_validation_end(trainer, None)
    assert cb._val_s == 6.0


def test_the_bars_rate_is_the_tokens_since_the_last_refresh_over_the_time_since(monkeypatch) -> None:
    from types import SimpleNamespace

    import torch

    from gsae.callbacks import progress

    bar = progress.StepProgressBar(plain=True)
    trainer = SimpleNamespace(callback_metrics={"train/tokens_seen": torch.tensor(1000.0)})
    monkeypatch.setattr(progress.time, "perf_counter", _Clock(10.0, 12.0, 13.0))
    bar._measure_rate(trainer)
    trainer.callback_metrics["train/tokens_seen"] = torch.tensor(1400.0)
    bar._measure_rate(trainer)
    assert bar._rate == 200.0
    trainer.callback_metrics["train/tokens_per_s"] = torch.tensor(150.0)  # no token since: the logged rate, not 0
    bar._measure_rate(trainer)
    assert bar._rate == 150.0


def _bar_trainer(max_steps: int, every: int, step: int = 0):
    """What the bar reads of a Lightning trainer."""
    from types import SimpleNamespace

    return SimpleNamespace(global_step=step, max_steps=max_steps, log_every_n_steps=every, callback_metrics={},
                           checkpoint_callback=None, sanity_checking=False)


def _steps(bar, trainer, clock: list[float], steps: list[tuple[int, float, float, dict]]) -> None:
    """Run ``(global step, batch start time, batch end time, metrics)`` through the bar's batch hooks."""
    for step, start, end, metrics in steps:
        clock[0] = start
        bar.on_train_batch_start(trainer, None, None, 0)
        clock[0] = end
        trainer.global_step = step
        trainer.callback_metrics.update(metrics)
        bar.on_train_batch_end(trainer, None, None, None, 0)


def test_the_plain_lines_of_a_run_with_a_validation(monkeypatch) -> None:
    """The redirected log of 5 steps, ``log_every_n_steps`` 2, a 10 s validation after step 1 (read on a fake clock):
    a line at the first step, every second step and the last (5, not a multiple of 2); tokens/s over training time only
    (the validation, which runs after the bar's batch end, is left out; the data loading before a batch is not);
    the eta at the pace since the first step's start; a validation line with every validation number (none for the
    sanity check)."""
    import torch

    from gsae.callbacks import progress

    clock = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    bar = progress.StepProgressBar()  # made before stdout is redirected: the bar writes where stdout is at the start
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    trainer = _bar_trainer(max_steps=5, every=2)
    trainer.sanity_checking = True
    trainer.callback_metrics.update({"val/nmse": 0.5, "val/l0": 3.0})
    bar.on_validation_end(trainer, None)  # the sanity check's: no line
    trainer.sanity_checking = False
    bar.on_train_start(trainer, None)

    def tokens(n: float, loss: float = 0.5) -> dict:
        return {"train/tokens_seen": torch.tensor(n), "train/loss": torch.tensor(loss)}

    _steps(bar, trainer, clock, [(1, 0.0, 1.0, tokens(100))])
    clock[0] = 11.0
    trainer.callback_metrics.update({"val/loss": 1.5, "val/nmse": 0.25, "val/explained_variance": 0.75,
                                     "val/l0": 15.5, "val/ds_mse/a": 1.0, "val/ds_mse/b": 2.0})
    bar.on_validation_end(trainer, None)
    _steps(bar, trainer, clock, [(2, 11.0, 12.0, tokens(200)), (3, 12.5, 13.5, tokens(300)),
                                 (4, 13.5, 14.0, tokens(400, 0.25)), (5, 14.0, 15.0, tokens(500, 0.125))])
    # step 2: 100 tokens in the 1 s since step 1 less the validation's 10 s; eta 12 s / 2 steps × 3 left
    # step 4: 200 tokens since step 2 in 2 s (step 3's 0.5 s before its batch counts); eta 14 / 4 × 1 = 3.5 s → 4 s
    assert out.getvalue().splitlines() == [
        "step 1/5  loss 0.5  elapsed 0:00:01  eta 0:00:04",
        "val    step 1  loss 1.5  nmse 0.2500  expl.var 0.7500  L0 15.5  ds_mse 3",
        "step 2/5  tokens/s 100  loss 0.5  elapsed 0:00:12  eta 0:00:18",
        "step 4/5  tokens/s 100  loss 0.25  elapsed 0:00:14  eta 0:00:04",
        "step 5/5  tokens/s 100  loss 0.125  elapsed 0:00:15  eta 0:00:00",
    ]


def test_the_rate_leaves_out_the_time_of_a_checkpoint_saved_at_the_step_before(monkeypatch) -> None:
    """A checkpoint saved after a step (with the evaluation run there) is not training: tokens/s leaves its time out as
    it does a validation's; the next step, after no checkpoint, keeps the time since (its data loading) in."""
    from types import SimpleNamespace

    import torch

    from gsae.callbacks import progress

    clock = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    bar, trainer = progress.StepProgressBar(), _bar_trainer(max_steps=4, every=1)
    trainer.checkpoint_callback = SimpleNamespace(_last_global_step_saved=0)
    bar.on_train_start(trainer, None)
    _steps(bar, trainer, clock, [(1, 0.0, 1.0, {"train/tokens_seen": torch.tensor(100.0)})])
    trainer.checkpoint_callback._last_global_step_saved = 1  # step 1's checkpoint: 10 s before step 2's batch
    _steps(bar, trainer, clock, [(2, 11.0, 12.0, {"train/tokens_seen": torch.tensor(200.0)}),
                                 (3, 16.0, 17.0, {"train/tokens_seen": torch.tensor(300.0)})])
    rates = [line.split("tokens/s ")[1].split()[0] for line in out.getvalue().splitlines() if "tokens/s" in line]
    assert rates == ["100", "20"]  # 100 tokens in 1 s of training; then in the 5 s since step 2's end


def test_the_bar_of_a_run_resumed_past_its_max_steps_is_full_not_longer(monkeypatch) -> None:
    """A checkpoint at step 6 resumed with ``max_steps`` 4: the bar is drawn full, its width, not 6/4 of it."""
    from gsae.callbacks import progress

    tty = _TTY()
    monkeypatch.setattr(sys, "stdout", tty)
    bar, trainer = progress.StepProgressBar(bar_width=4), _bar_trainer(max_steps=4, every=1, step=6)
    bar.on_train_start(trainer, None)
    bar.on_train_end(trainer, None)
    assert tty.getvalue() == "\rstep 6/4 ━━━━ 0:00:00<?\n"


def test_an_endless_or_resumed_run_s_plain_lines(monkeypatch) -> None:
    """``--trainer.max_steps -1`` (train until stopped): ``step n/?`` and no eta, on a line or on the bar. A run
    resumed at step 10 under gradient accumulation prints nothing for the batches before its first optimizer step."""
    import torch

    from gsae.callbacks import progress

    clock = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    bar, trainer = progress.StepProgressBar(), _bar_trainer(max_steps=-1, every=2)
    bar.on_train_start(trainer, None)
    _steps(bar, trainer, clock, [(1, 0.0, 65.0, {"train/loss": torch.tensor(0.5)})])
    assert out.getvalue() == "step 1/?  loss 0.5  elapsed 0:01:05\n"

    tty = _TTY()
    monkeypatch.setattr(sys, "stdout", tty)
    bar, trainer = progress.StepProgressBar(), _bar_trainer(max_steps=-1, every=2)
    bar.on_train_start(trainer, None)
    _steps(bar, trainer, clock, [(1, 65.0, 66.0, {"train/loss": torch.tensor(0.5)})])
    bar.on_train_end(trainer, None)
    assert tty.getvalue().split("\r")[1:] == ["step 0/? 0:00:00", "step 1/? 0:00:01  loss 0.5\n"]

    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    bar, trainer = progress.StepProgressBar(), _bar_trainer(max_steps=20, every=2, step=10)
    bar.on_train_start(trainer, None)
    _steps(bar, trainer, clock, [(10, 70.0, 71.0, {}), (11, 71.0, 72.0, {})])  # the first batch accumulates
    assert [line.split()[1] for line in out.getvalue().splitlines()] == ["11/20"]


def test_the_terminal_bar_redraws_prints_and_closes_on_lines_of_its_own(monkeypatch) -> None:
    """On a terminal: a shorter redraw blanks the longer bar's tail; a log record (the root logger's or Lightning's,
    which does not propagate) clears the bar first; a printed line (the validation's) goes above the bar, which is
    redrawn under it; the end of training ends the bar's line (the summary starts on its own); the bar's log filters
    go with it. A disabled bar (every rank but 0) writes nothing."""
    import logging

    import torch

    from gsae.callbacks import progress

    clock = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    tty = _TTY()
    monkeypatch.setattr(sys, "stdout", tty)
    root, lightning = logging.StreamHandler(tty), logging.StreamHandler(tty)
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", False)  # as Lightning sets it
    logging.getLogger().addHandler(root)
    logging.getLogger("lightning.pytorch").addHandler(lightning)
    bar, trainer = progress.StepProgressBar(bar_width=4), _bar_trainer(max_steps=4, every=1)
    try:
        bar.on_train_start(trainer, None)
        _steps(bar, trainer, clock, [(1, 0.0, 1.0, {"train/loss": torch.tensor(0.1234)}),
                                     (2, 1.0, 2.0, {"train/loss": torch.tensor(0.5)})])
        logging.getLogger("gsae.test").warning("evaluated at step 2")
        _steps(bar, trainer, clock, [(3, 2.0, 3.0, {})])
        logging.getLogger("lightning.pytorch.test").warning("Trainer.fit stopped")
        _steps(bar, trainer, clock, [(4, 3.0, 4.0, {"val/nmse": 0.25})])
        bar.on_validation_end(trainer, None)
        bar.print("done", 4, sep=", ")
        bar.on_train_end(trainer, None)
        assert bar._clear_for_log not in root.filters and bar._clear_for_log not in lightning.filters
    finally:
        logging.getLogger().removeHandler(root)
        logging.getLogger("lightning.pytorch").removeHandler(lightning)
    bars = ["step 0/4 ──── 0:00:00<?", "step 1/4 ━─── 0:00:01<0:00:03  loss 0.1234",
            "step 2/4 ━━── 0:00:02<0:00:02  loss 0.5", "step 3/4 ━━━─ 0:00:03<0:00:01  loss 0.5",
            "step 4/4 ━━━━ 0:00:04<0:00:00  loss 0.5"]
    val, printed = "val    step 4  nmse 0.2500", "done, 4"

    def clear(line: str) -> str:
        return "\r" + " " * len(line) + "\r"

    assert tty.getvalue() == "".join([
        "\r" + bars[0], "\r" + bars[1], "\r" + bars[2].ljust(len(bars[1])),
        clear(bars[2]), "evaluated at step 2\n", "\r" + bars[3],
        clear(bars[3]), "Trainer.fit stopped\n", "\r" + bars[4],
        clear(bars[4]), val + "\n" + bars[4], clear(bars[4]), printed + "\n" + bars[4], "\n",
    ])

    quiet = _TTY()
    monkeypatch.setattr(sys, "stdout", quiet)
    bar, trainer = progress.StepProgressBar(), _bar_trainer(max_steps=4, every=1)
    bar.disable()
    bar.on_train_start(trainer, None)
    _steps(bar, trainer, clock, [(1, 4.0, 5.0, {})])
    bar.on_validation_end(trainer, None)
    bar.on_train_end(trainer, None)
    assert quiet.getvalue() == ""

    # a narrow terminal (a split pane of 30 columns): each frame is cut to 29 characters
    import shutil

    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=(120, 24): os.terminal_size((30, 24)))
    narrow = _TTY()
    monkeypatch.setattr(sys, "stdout", narrow)
    bar, trainer = progress.StepProgressBar(), _bar_trainer(max_steps=4, every=1)
    bar.on_train_start(trainer, None)
    assert narrow.getvalue() == "\r" + "step 0/4 " + "─" * 20 + " 0:00:00<?"[:29 - 9 - 20]
    assert progress.StepProgressBar(bar_width=0).bar_width == 0
    with pytest.raises(ValueError, match="bar_width must be >= 0"):
        progress.StepProgressBar(bar_width=-1)


def test_the_summary_s_rows() -> None:
    """The summary's lines for a resumed run (its own tokens and rate, then the run's totals), a stop by SIGTERM, a
    validation shorter than half a second (left out) or longer, an evaluation time over the wall time (a bare rate,
    not a negative training time), the val row, one eval row per benchmark and a sweep's rows per member, and the
    file shown for a sweep (the newest step's first member, not the newest name)."""
    from gsae.callbacks.summary import Summary, _names, render

    s = Summary(status="finished", steps=2, steps_run=2, tokens=4000, tokens_total=4000, wall_s=1000.0, train=[],
                val=[], eval_step=None, eval_source=None, headline=[], checkpoint_dir=None, checkpoints=[], exports=[],
                eval_json=[], latents_html=[], events=None)

    def head(**changes) -> str:
        return render(s._replace(**changes)).splitlines()[1]

    assert head(steps=5, tokens_total=10000) == ("finished: 2 steps, 4k tokens in 0:16:40 (4 tokens/s) "
                                                 "(run total 10k tokens, step 5)")
    assert head() == "finished: 2 steps, 4k tokens in 0:16:40 (4 tokens/s)"
    assert head(status="terminated").startswith("stopped (SIGTERM; last.ckpt holds the step reached): 2 steps, ")
    assert head(val_s=0.4) == "finished: 2 steps, 4k tokens in 0:16:40 (4 tokens/s)"
    assert head(val_s=2.0) == "finished: 2 steps, 4k tokens in 0:16:40 (training 0:16:38 at 4.01 tokens/s, validating 0:00:02)"
    assert head(eval_s=1200.0) == "finished: 2 steps, 4k tokens in 0:16:40 (4 tokens/s)"

    rows = render(s._replace(val=[("nmse", "0.1000"), ("L0", "16.0")], eval_step=2, headline=[
        ("loss_added.L_added", "0.03"), ("loss_added.l0", "16"), ("dead_latents.alive_fraction", "0.9")])).splitlines()
    assert rows[2:5] == ["val          nmse 0.1000  L0 16.0", "eval @2      loss_added: L_added 0.03  l0 16",
                         "             dead_latents: alive_fraction 0.9"]
    sweep = render(s._replace(
        member_train={"topk": [("loss", "1")], "gsae-k8": [("loss", "2")]},
        eval_step=2, headline=[("topk:loss_added.L_added", "0.03"), ("gsae-k8:loss_added.L_added", "0.02")],
        exports=[f"/r/s{n}.{m}.saelens" for n in (1, 2) for m in ("topk", "gsae-k8")],
        shown={"exports": "/r/s2.topk.saelens"})).splitlines()
    assert sweep[2:7] == ["train        topk     loss 1", "             gsae-k8  loss 2",
                          "eval @2      topk     loss_added.L_added 0.03",
                          "             gsae-k8  loss_added.L_added 0.02",
                          "exports      /r/s2.topk.saelens  (+3 more in that folder)"]
    six = [f"/r/{i}.ckpt" for i in range(6)]
    assert _names(six) == "0.ckpt, 1.ckpt, 2.ckpt, 3.ckpt, 4.ckpt, 5.ckpt"  # up to 6: every name
    assert _names([*six, "/r/6.ckpt"]) == "0.ckpt, 1.ckpt, … 2 more …, 4.ckpt, 5.ckpt, 6.ckpt"


def test_the_summary_of_a_resumed_sweep_run(tmp_path) -> None:
    """Collected from the trainer: this session's steps and tokens apart from the run's, each member's own train
    numbers (``train/<member>/…`` as ``train/…``), the newest evaluation (the callback's over a JSON of the same step,
    in the members' order; otherwise the newest step's JSON files), and the newest step's files, not a ``last``
    checkpoint's."""
    from types import SimpleNamespace

    from gsae.callbacks.summary import RunSummary, newest_evaluation

    for n, members in ((10, ("gsae-k8", "topk")), (20, ("gsae-k8", "topk"))):
        (tmp_path / f"s{n}.ckpt").write_text("x")
        for m in members:
            (tmp_path / f"s{n}.ckpt.{m}.eval.json").write_text(json.dumps(
                {"step": n, "member": m, "results": {"loss_added": {"L_added": n / 100 + (m == "topk")}}}))
            (tmp_path / f"s{n}.{m}.saelens").mkdir()
    (tmp_path / "last.ckpt").write_text("x")  # a stopped run's (SIGTERM): a copy, not a link
    (tmp_path / "last.topk.saelens").mkdir()
    for age, name in enumerate(("s10.ckpt", "s20.ckpt", "last.ckpt")):
        os.utime(tmp_path / name, (1000 + age, 1000 + age))
    module = SimpleNamespace(tokens_seen=1000, saes=lambda: {"topk": None, "gsae-k8": None})
    trainer = SimpleNamespace(global_step=10, log_every_n_steps=10, callbacks=[], loggers=[], is_global_zero=True,
                              checkpoint_callback=SimpleNamespace(dirpath=str(tmp_path)), callback_metrics={})
    cb = RunSummary()
    cb.on_train_start(trainer, module)
    trainer.global_step, module.tokens_seen = 25, 4000
    trainer.callback_metrics = {"train/loss": 3.0, "train/topk/loss": 1.0, "train/gsae-k8/loss": 2.0}
    cb.on_exception(trainer, module, KeyboardInterrupt())
    s = cb.summary
    assert (s.status, s.steps, s.steps_run, s.tokens, s.tokens_total) == ("stopped", 25, 15, 3000, 4000)
    assert s.member_train == {"topk": [("loss", "1")], "gsae-k8": [("loss", "2")]}
    assert (s.eval_step, s.eval_source) == (20, str(tmp_path / "s20.ckpt") + ".*.eval.json")
    assert s.headline == [("gsae-k8:loss_added.L_added", "0.2"), ("topk:loss_added.L_added", "1.2")]
    assert s.shown["exports"] == str(tmp_path / "s20.topk.saelens")
    assert f"\n  python evaluate.py {tmp_path / 's20.ckpt'}" in cb.render()  # the newest step's, not last.ckpt

    cb.on_train_start(trainer, module)  # the same callback in a second fit (a notebook): the second's summary
    trainer.global_step = 30
    cb.on_exception(trainer, module, KeyboardInterrupt())
    assert (cb.summary.steps, cb.summary.steps_run) == (30, 5)

    results = {"topk": {"loss_added": {"L_added": 0.5}}, "gsae-k8": {"loss_added": {"L_added": 0.25}}}
    trainer.callbacks = [SimpleNamespace(_last=(20, results))]  # the evaluation callback's, of step 20
    assert newest_evaluation(trainer, [tmp_path / "s10.ckpt", tmp_path / "s20.ckpt"]) == (
        20, "callback", [("topk:loss_added.L_added", "0.5"), ("gsae-k8:loss_added.L_added", "0.25")])
    one = tmp_path / "one" / "s5.ckpt"  # a one-SAE run's
    one.parent.mkdir()
    (one.parent / "s5.ckpt.eval.json").write_text(json.dumps({"step": 5, "results": {"loss_added": {"l0": 8}}}))
    trainer.callbacks = []
    assert newest_evaluation(trainer, [one]) == (5, str(one) + ".eval.json", [("loss_added.l0", "8")])
    # two JSONs of one step (a stopped run's last.ckpt, evaluated at its newest checkpoint's step): the newer file's
    for name, l0 in (("s5.ckpt", 8), ("last.ckpt", 9)):
        (one.parent / f"{name}.eval.json").write_text(json.dumps({"step": 5, "results": {"loss_added": {"l0": l0}}}))
    assert newest_evaluation(trainer, [one, one.with_name("last.ckpt")]) == (
        5, str(one.with_name("last.ckpt")) + ".eval.json", [("loss_added.l0", "9")])


def test_the_summary_counts_only_this_fits_evaluation_seconds() -> None:
    """The evaluation callback's seconds are a running total of the process (a notebook's earlier fit, an evaluation
    before the first step): the summary's ``eval_s`` is what this fit added to it."""
    from types import SimpleNamespace

    from gsae.callbacks.summary import RunSummary

    evaluation = SimpleNamespace(seconds_total=5.0)
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=1, callbacks=[evaluation], loggers=[],
                              is_global_zero=True, checkpoint_callback=None, callback_metrics={})
    module = SimpleNamespace(tokens_seen=0)
    cb = RunSummary()
    cb.on_train_start(trainer, module)
    evaluation.seconds_total, trainer.global_step = 8.0, 4
    cb.on_train_end(trainer, module)
    assert cb.summary.eval_s == 3.0
