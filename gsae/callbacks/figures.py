"""Benchmark figures rendered off the training loop: a worker process draws them, the trainer writes them.

Drawing is the slow part of an evaluation's logging. Matplotlib takes ~1.3 s per SAE per checkpoint (11 figures; the
latents' 16 small multiples alone 0.6 s; 2 CPU cores), so a 10-member sweep stopped training ~13 s at every
checkpoint for figures, and under DDP every rank waited for rank 0. On a GPU run the host's other cores are idle:
:class:`FigureRenderer` hands each evaluation's results (plain JSON-able dicts, as written to
``<checkpoint>.eval.json``) to one worker process, which draws them with the benchmarks' own ``figures`` functions and
returns TensorBoard image summaries, encoded as ``SummaryWriter.add_figure`` encodes them. The trainer writes each into
the run's own event file (one file per run: TensorBoard follows only the newest file of a folder) at the evaluation's
step, when it is ready: checked after every training step, waited for at the end of the fit. The images equal those
drawn in the training process (``tests/evals/test_figures.py``).

The worker is started with ``spawn`` (safe beside CUDA and the data loader's threads) the first time it is needed,
~2 s of imports off the training loop, and serves every fit of the process. If it cannot start or dies, the figures
are drawn in the training process, as with ``--evaluation.figures_in_background false``, and a warning says so; a
figure's failure never stops training or loses a checkpoint. ``EvaluationCallback`` uses the worker by default only
when training on a GPU: on a CPU the training's threads use every core, and on 2 cores the worker slowed the
quickstart sweep (31 → 36 s) while cutting its checkpoint stalls 8.6 → 2.4 s.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor

log = logging.getLogger(__name__)

_POOL: ProcessPoolExecutor | None = None


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


def _pool() -> ProcessPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        atexit.register(_shutdown)
    return _POOL


def _shutdown() -> None:
    global _POOL
    if _POOL is not None:
        _POOL.shutdown(wait=True, cancel_futures=True)
        _POOL = None


class FigureRenderer:
    """Draws ``{benchmark: result}`` figures for a list of TensorBoard writers, in a worker process
    (``background=True``) or here.

    :meth:`submit` queues one evaluation's figures; :meth:`poll` writes those that are ready (cheap: call it often);
    :meth:`drain` waits for the rest and writes them.
    """

    def __init__(self, background: bool = True) -> None:
        self.background = background
        self._pending: list[tuple[list, int, Future]] = []

    def submit(self, writers: list, step: int, prefix: str, results: dict[str, dict]) -> None:
        """Draw the figures of ``results`` (tags ``<prefix>/<benchmark>/<figure>``) for ``writers`` at ``step``."""
        if not writers:
            return
        if self.background:
            try:
                self._pending.append((writers, step, _pool().submit(render_summaries, prefix, results)))
                return
            except Exception as e:  # noqa: BLE001 - a pool that cannot start (or is broken): draw here
                self._give_up_background(e)
        self._write(writers, step, self._render_here(prefix, results))

    def poll(self) -> None:
        """Write the figures whose drawing finished (in submission order; none is waited for)."""
        while self._pending and self._pending[0][2].done():
            self._finish(*self._pending.pop(0))

    def drain(self) -> None:
        """Wait for every queued figure and write it."""
        while self._pending:
            self._finish(*self._pending.pop(0))

    # ------------------------------------------------------------------ internals
    def _finish(self, writers: list, step: int, future: Future) -> None:
        try:
            summaries = future.result()
        except Exception as e:  # noqa: BLE001 - the worker died or a figure failed: the figures are skipped
            log.warning("evaluation figures at step %d were not drawn (%s: %s)", step, type(e).__name__, e)
            if "BrokenProcessPool" in type(e).__name__:
                self._give_up_background(e)
            return
        self._write(writers, step, summaries)

    @staticmethod
    def _render_here(prefix: str, results: dict[str, dict]) -> list[tuple[str, bytes]]:
        try:
            return render_summaries(prefix, results)
        except Exception as e:  # noqa: BLE001 - a figure's failure never stops training
            log.warning("evaluation figures (%s) were not drawn (%s: %s)", prefix, type(e).__name__, e)
            return []

    @staticmethod
    def _write(writers: list, step: int, summaries: list[tuple[str, bytes]]) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        for _, data in summaries:
            summary = Summary.FromString(data)
            for w in writers:
                w._get_file_writer().add_summary(summary, step)

    def _give_up_background(self, error: BaseException) -> None:
        global _POOL
        log.warning("evaluation figures: the background worker is unavailable (%s: %s); drawing them in the "
                    "training process from now on", type(error).__name__, error)
        self.background = False
        if _POOL is not None:
            _POOL.shutdown(wait=False, cancel_futures=True)
            _POOL = None
