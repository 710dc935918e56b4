"""Evaluation figures drawn in a background worker process: the images the training process would draw, written
into the run's one event file at the evaluation's step by the end of the fit; a failing worker or figure never
stops training."""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import time
from concurrent.futures import Future

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto.summary_pb2 import Summary

import gsae.callbacks.figures as figures
from gsae.callbacks import EvaluationCallback
from gsae.callbacks.figures import FigureRenderer, render_summaries
from tests.conftest import quickstart_args

#: a dead-latents result as the benchmark returns it (the fields its two figures read)
RESULTS = {
    "dead_latents": {
        "dead_fraction_batches": 0.25,
        "n_never_fired": 2,
        "log10_density_hist": {"edges": [-6.0, -4.0, -3.0, -2.0, -1.0, 0.0], "counts": [2, 0, 1, 3, 2]},
        "density_cdf": {"log10_density": [-6.0, -4.0, -3.0, -2.0, -1.0, 0.0], "fraction": [0.25, 0.25, 0.375, 0.75, 1.0, 1.0]},
    },
}


class _ExitOnLoad:
    """Ends the worker process (as an OOM killer would) when the worker unpickles the job that holds it."""

    def __reduce__(self):
        return os._exit, (3,)


class _PrintsOnLoad:
    """Prints when the worker unpickles it (a stray print while a job is drawn; longer than a text buffer, so it
    reaches the stream at once), and is then ``None``: a field no figure reads."""

    def __reduce__(self):
        return print, ("stray " * 2000,)


class _Writer:
    """The one method of a SummaryWriter the renderer calls: collects ``(tag, step, pixels)``."""

    def __init__(self) -> None:
        self.got: list[tuple[str, int, np.ndarray]] = []

    def _get_file_writer(self):
        return self

    def add_summary(self, summary: Summary, step: int) -> None:
        for v in summary.value:
            self.got.append((v.tag, step, np.asarray(Image.open(io.BytesIO(v.image.encoded_image_string)))))


def test_background_images_equal_the_ones_drawn_here():
    results = RESULTS
    here, there = _Writer(), _Writer()
    FigureRenderer(background=False).submit([here], 7, "eval/m1", results)
    renderer = FigureRenderer(background=True)
    renderer.submit([there], 7, "eval/m1", results)
    renderer.drain()
    assert renderer.background  # the worker served it (no fallback)
    assert [t for t, _, _ in here.got] == [t for t, _, _ in there.got] and len(here.got) == 2
    assert all(t.startswith("eval/m1/dead_latents/") for t, _, _ in here.got)
    for (_, s1, a), (_, s2, b) in zip(here.got, there.got):
        assert s1 == s2 == 7 and a.shape == b.shape and a.ndim == 3
        assert np.array_equal(a, b)
    # and equal to what SummaryWriter.add_figure encodes
    (tag, data), *_ = render_summaries("eval/m1", results)
    assert Summary.FromString(data).value[0].tag == tag == here.got[0][0]


def test_poll_writes_only_finished_figures_and_drain_the_rest():
    results = RESULTS
    w = _Writer()
    renderer = FigureRenderer(background=True)
    renderer.submit([w], 1, "eval", results)
    renderer.submit([w], 2, "eval", results)
    renderer.poll()  # may write none, one or both: never blocks
    renderer.drain()
    assert sorted({s for _, s, _ in w.got}) == [1, 2] and not renderer._pending


class _Pending(Future):
    """A job's Future the test completes; waiting on it unfinished without a timeout is a test failure."""

    def result(self, timeout=None):
        if timeout is None and not self.done():
            raise AssertionError("waited, without a timeout, for figures still being drawn")
        return super().result(timeout)


def test_poll_writes_finished_figures_in_submission_order_without_waiting_and_drain_gives_up_after_its_timeout(
        monkeypatch, caplog):
    """With the worker's answers in the test's hands: poll writes only the figures whose drawing finished, in the order
    they were submitted, to every writer; drain waits at most its timeout for one (a hung worker is given up on)."""
    summaries = render_summaries("eval", RESULTS)
    jobs: list[Future] = []

    class FakeWorker:
        dead = None

        def submit(self, prefix, results):
            jobs.append(_Pending())
            return jobs[-1]

    monkeypatch.setattr(figures, "_pool", FakeWorker)
    monkeypatch.setattr(figures, "_WORKER", None)
    a, b = _Writer(), _Writer()
    renderer = FigureRenderer(background=True)
    for step in (1, 2, 3):
        renderer.submit([a, b], step, "eval", RESULTS)
    renderer.poll()
    jobs[1].set_result(summaries)
    renderer.poll()  # step 2 is drawn, step 1 not yet: nothing is written out of order
    assert not a.got
    jobs[0].set_result(summaries)
    renderer.poll()
    for w in (a, b):  # every writer gets every image
        assert [(t, s) for t, s, _ in w.got] == [(t, s) for s in (1, 2) for t, _ in summaries]
    with caplog.at_level(logging.WARNING, logger="gsae.callbacks.figures"):
        start = time.monotonic()
        renderer.drain(timeout=0.5)  # step 3 never answered
    assert time.monotonic() - start < 30 and not renderer._pending
    assert "step 3 were not drawn (TimeoutError" in caplog.text
    assert [s for _, s, _ in a.got] == [1, 1, 2, 2] and renderer.background  # a slow job is no dead worker
    for step in (4, 5):
        renderer.submit([a], step, "eval", RESULTS)
        jobs[-1].set_result(summaries)
    renderer.drain()
    assert [s for _, s, _ in a.got][4:] == [4, 4, 5, 5]


def test_start_starts_the_worker_only_when_drawing_in_the_background(monkeypatch, caplog):
    started = []
    monkeypatch.setattr(figures, "_pool", lambda: started.append(1))
    FigureRenderer(background=False).start()
    assert not started
    renderer = FigureRenderer(background=True)
    renderer.start()
    assert started == [1] and renderer.background

    def broken():
        raise OSError("no processes here")

    monkeypatch.setattr(figures, "_pool", broken)
    with caplog.at_level(logging.WARNING, logger="gsae.callbacks.figures"):
        renderer.start()
    assert not renderer.background and "background worker is unavailable" in caplog.text


def test_a_worker_that_cannot_start_falls_back_to_drawing_here(monkeypatch, caplog):
    results = RESULTS

    def broken():
        raise OSError("no processes here")

    monkeypatch.setattr(figures, "_pool", broken)
    w = _Writer()
    renderer = FigureRenderer(background=True)
    with caplog.at_level(logging.WARNING, logger="gsae.callbacks.figures"):
        renderer.submit([w], 3, "eval", results)
    assert not renderer.background and w.got and "background worker is unavailable" in caplog.text


def test_a_failing_figure_is_a_warning_not_an_error(caplog):
    bad = {"dead_latents": {"log10_density_hist": "not a histogram"}}
    for background in (True, False):
        w = _Writer()
        renderer = FigureRenderer(background=background)
        with caplog.at_level(logging.WARNING, logger="gsae.callbacks.figures"):
            renderer.submit([w], 4, "eval", bad)
            renderer.drain()
        assert not w.got and "were not drawn" in caplog.text
        assert renderer.background is background  # the worker, alive, keeps drawing the next ones
        caplog.clear()


def test_the_default_draws_in_the_background_on_a_gpu_only():
    from types import SimpleNamespace

    cb = EvaluationCallback()
    for device, expected in (("cpu", False), ("cuda", True)):
        # not rank 0: the worker is not started here
        trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=SimpleNamespace(type=device)), is_global_zero=False)
        cb.setup(trainer, None, "fit")
        assert cb.figures.background is expected
    for explicit in (True, False):
        cb = EvaluationCallback(figures_in_background=explicit)
        cb.setup(trainer, None, "fit")
        assert cb.figures.background is explicit


@pytest.mark.slow
def test_a_run_with_background_figures_has_every_image_in_its_one_event_file(tmp_path):
    from gsae.cli import main

    extra = tmp_path / "eval.yaml"
    extra.write_text("evaluation:\n  benchmarks: [loss_added, dead_latents]\n  n_seqs: 4\n  figures_in_background: true\n")
    args = quickstart_args(tmp_path, "--config", str(extra), "--checkpoint.every_n_train_steps", "5", steps=10)
    assert main(args) == 0
    run = tmp_path / "quickstart-topk"
    (events,) = glob.glob(str(run / "version_0" / "events*"))
    ea = EventAccumulator(events, size_guidance={"images": 0})
    ea.Reload()
    tags = [t for t in ea.Tags()["images"] if t.startswith("eval/")]
    assert {"eval/dead_latents/density_histogram", "eval/loss_added/ce_and_kl"} <= set(tags)
    for t in tags:
        assert [e.step for e in ea.Images(t)] == [5, 10], t
    payload = json.loads((run / "checkpoints" / "epoch=0-step=10.ckpt.eval.json").read_text())
    assert set(payload["results"]) == {"loss_added", "dead_latents"}


def test_a_worker_that_dies_fails_its_jobs_with_a_warning_and_figures_come_from_here_after(caplog):
    results = RESULTS
    w = _Writer()
    renderer = FigureRenderer(background=True)
    renderer.submit([w], 1, "eval", results)
    renderer.drain()
    assert len(w.got) == 2
    worker = figures._pool()
    worker.proc.kill()  # as an OOM killer would
    worker.proc.wait()
    with caplog.at_level(logging.WARNING, logger="gsae.callbacks.figures"):
        renderer.submit([w], 2, "eval", results)  # fails (dead pipe or lost answer), or is drawn here
        renderer.drain()
        renderer.submit([w], 3, "eval", results)
        renderer.drain()
    steps = [s for _, s, _ in w.got]
    assert steps.count(3) == 2 and not renderer.background  # drawn here once the worker was found dead
    assert "unavailable" in caplog.text
    figures._WORKER = None  # the next test starts a fresh worker


@pytest.fixture
def fresh_worker():
    """The process's figure worker started afresh for the test, and dropped after it (it may have been ended)."""
    figures._WORKER = None
    yield
    if figures._WORKER is not None and figures._WORKER.proc.poll() is None:
        figures._WORKER.proc.kill()
    figures._WORKER = None


def test_a_worker_that_dies_while_drawing_fails_that_job_at_once(fresh_worker, caplog):
    """The job the worker held when it died is failed as soon as its answer stream ends (not after the drain's
    timeout), with the worker's exit as the reason, and later figures are drawn here."""
    w = _Writer()
    renderer = FigureRenderer(background=True)
    renderer.submit([w], 1, "eval", RESULTS)
    renderer.drain()  # one job answered first
    renderer.submit([w], 2, "eval", {"dead_latents": _ExitOnLoad()})
    with caplog.at_level(logging.WARNING, logger="gsae.callbacks.figures"):
        start = time.monotonic()
        renderer.drain(timeout=30)
        assert time.monotonic() - start < 25
        assert "step 2 were not drawn" in caplog.text and "the figure worker exited (exit code" in caplog.text
        assert not renderer.background and "background worker is unavailable" in caplog.text
        renderer.submit([w], 3, "eval", RESULTS)
    assert [s for _, s, _ in w.got] == [1, 1, 3, 3]


def test_results_that_do_not_pickle_fail_their_job_alone(fresh_worker, caplog):
    """A result the worker cannot be sent (a lambda, a lock) skips that evaluation's figures with a warning at once;
    the worker stays up and draws the next one (it had stopped the writer thread: every later job waited out the
    drain's timeout, lost)."""
    w = _Writer()
    renderer = FigureRenderer(background=True)
    renderer.submit([w], 1, "eval", {"dead_latents": {**RESULTS["dead_latents"], "note": lambda: 0}})
    with caplog.at_level(logging.WARNING, logger="gsae.callbacks.figures"):
        start = time.monotonic()
        renderer.drain(timeout=30)
        assert time.monotonic() - start < 25
    assert "step 1 were not drawn" in caplog.text and "could not be sent to the figure worker" in caplog.text
    renderer.submit([w], 2, "eval", RESULTS)
    renderer.drain(timeout=60)
    assert [s for _, s, _ in w.got] == [2, 2] and renderer.background and figures._WORKER.dead is None


def test_a_stray_print_in_the_worker_does_not_corrupt_its_answers(fresh_worker):
    """The worker's answers go on its stdout: a print while drawing (a library's) goes to its stderr instead."""
    w = _Writer()
    renderer = FigureRenderer(background=True)
    renderer.submit([w], 1, "eval", {"dead_latents": {**RESULTS["dead_latents"], "note": _PrintsOnLoad()}})
    renderer.drain()
    renderer.submit([w], 2, "eval", RESULTS)
    renderer.drain()
    assert [s for _, s, _ in w.got] == [1, 1, 2, 2] and renderer.background


def test_the_worker_answers_each_job_once_drawn_and_exits_when_closed(monkeypatch):
    """Each answer reaches the trainer when drawn, not when the worker ends (a user's environment has no
    ``PYTHONUNBUFFERED``); closed at the process's end (``atexit``), it answers what it holds and exits by itself."""
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    tags = [t for t, _ in render_summaries("eval", RESULTS)]
    worker = figures._Worker()
    try:
        # a job without figures (its benchmark skipped): a short answer, shorter than an output buffer
        assert worker.submit("eval", {"dead_latents": {"skipped": "not applicable"}}).result(timeout=60) == []
        assert [t for t, _ in worker.submit("eval", RESULTS).result(timeout=60)] == tags
        last = worker.submit("eval", RESULTS)
        worker.close()
        assert worker.proc.returncode == 0  # exited on its closed stdin, not killed after a minute
        assert [t for t, _ in last.result(timeout=30)] == tags
    finally:
        if worker.proc.poll() is None:
            worker.proc.kill()


def _draw_in_forked_child(answers) -> None:
    w = _Writer()
    renderer = FigureRenderer(background=True)
    renderer.submit([w], 1, "eval", RESULTS)
    renderer.drain(timeout=60)
    answers.put((len(w.got), renderer.background))


def test_a_forked_child_draws_with_a_worker_of_its_own(fresh_worker):
    """A forked process (``ddp_fork``'s ranks, a notebook's ``ddp_notebook``) does not share its parent's worker:
    the parent's reader and writer threads do not exist in the child."""
    import multiprocessing

    figures._pool()  # the parent's worker, started before the fork
    ctx = multiprocessing.get_context("fork")
    answers = ctx.Queue()
    child = ctx.Process(target=_draw_in_forked_child, args=(answers,))
    child.start()
    try:
        assert answers.get(timeout=120) == (2, True)
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()


def test_the_worker_never_reruns_the_users_script(tmp_path):
    """A script without an ``if __name__ == "__main__"`` guard runs once: the worker is not a ``spawn`` child."""
    import os
    import subprocess
    import sys

    from gsae.cli import REPO_ROOT

    marker = tmp_path / "runs.txt"
    script = tmp_path / "user_script.py"
    script.write_text(
        "import json, sys\n"
        f"open({str(marker)!r}, 'a').write('ran\\n')\n"
        "from gsae.callbacks.figures import FigureRenderer\n"
        "class W:\n"
        "    n = 0\n"
        "    def _get_file_writer(self): return self\n"
        "    def add_summary(self, summary, step): W.n += len(summary.value)\n"
        "r = FigureRenderer(background=True)\n"
        f"r.submit([W()], 1, 'eval', json.loads({json.dumps(json.dumps(RESULTS))}))\n"
        "r.drain()\n"
        "print('images', W.n, 'background', r.background)\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "images 2 background True" in out.stdout
    assert marker.read_text() == "ran\n"
