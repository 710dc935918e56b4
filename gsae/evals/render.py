"""Benchmark figures as TensorBoard image summaries, and the loop of the worker process that draws them
(:mod:`gsae.callbacks.figures`). Imports torch and matplotlib, not Lightning: the worker starts in ~1 s."""

from __future__ import annotations

import pickle
import sys


def render_summaries(prefix: str, results: dict[str, dict]) -> list[tuple[str, bytes]]:
    """``[(tag, serialized Summary)]``: every figure of ``{benchmark: result}`` as the image summary
    ``SummaryWriter.add_figure(tag, fig)`` writes, tags ``<prefix>/<benchmark>/<figure>``."""
    from torch.utils.tensorboard._utils import figure_to_image
    from torch.utils.tensorboard.summary import image

    from gsae.evals import tagged_figures

    return [
        (tag, image(tag, figure_to_image(fig, close=False), dataformats="CHW").SerializeToString())
        for tag, fig in tagged_figures(results, prefix).items()
    ]


def serve() -> None:
    """The worker's loop: draw each job, answer, until stdin closes."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # stray prints (warnings) stay off the answer stream
    while True:
        try:
            job, prefix, results = pickle.load(stdin)
        except EOFError:
            return
        try:
            answer = (job, True, render_summaries(prefix, results))
        except Exception as e:  # noqa: BLE001 - reported to the trainer as a warning
            answer = (job, False, f"{type(e).__name__}: {e}")
        try:
            pickle.dump(answer, stdout, protocol=pickle.HIGHEST_PROTOCOL)
            stdout.flush()
        except BrokenPipeError:  # the trainer is gone (ended, or killed): so is the job
            return
