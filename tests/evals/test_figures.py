"""Evaluation figures drawn in a background worker process: the images the training process would draw, written
into the run's one event file at the evaluation's step by the end of the fit; a failing worker or figure never
stops training."""

from __future__ import annotations

import glob
import io
import json
import logging

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
