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

The worker is a child ``python`` running :func:`gsae.evals.render.serve` (torch and matplotlib, not Lightning; safe
beside CUDA and the data loader's threads, and it never re-runs the user's script as ``multiprocessing``'s ``spawn``
would). It starts with the fit, its ~1 s of imports off the training loop, and serves every fit of the process. If it
cannot start or dies, the figures are drawn in the training process, as with
``--evaluation.figures_in_background false``, and a warning says so; a figure's failure never stops training or
loses a checkpoint. ``EvaluationCallback`` uses the worker by default only when training on a GPU. On a CPU the
training's threads use every core: on 2 cores the worker cut the quickstart sweep's checkpoint stalls from 8.9 to
2.4 s, but the run took 35–37 s instead of 31–32 (the cores shared, and the last checkpoint's figures still drawn
before the process ends).
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import queue
import subprocess
import sys
import threading
from concurrent.futures import Future

from gsae.evals.render import render_summaries

log = logging.getLogger(__name__)


class _Worker:
    """A ``python`` child running :func:`gsae.evals.render.serve`: jobs ``(id, prefix, results)`` pickled to its
    stdin by a thread, answers ``(id, ok, summaries or error)`` pickled back on its stdout, read by a thread that
    completes each job's Future.

    A child process of its own (not ``multiprocessing``): ``spawn`` re-runs the parent's ``__main__`` script in the
    child, which starts training again in a user's script without an ``if __name__ == "__main__"`` guard.
    It exits when its stdin closes or its answer finds no reader (this process ended, even by SIGKILL: checked, the
    worker left within its current job)."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), OMP_NUM_THREADS="1",
                   MPLBACKEND="Agg")
        self.owner = os.getpid()  # a forked child (a data loader worker) shares this object, not the worker
        self.proc = subprocess.Popen([sys.executable, "-c", "from gsae.evals.render import serve; serve()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._jobs: dict[int, Future] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._outbox: queue.Queue = queue.Queue()
        self.dead: str | None = None
        threading.Thread(target=self._read, name="gsae-figures-read", daemon=True).start()
        threading.Thread(target=self._write, name="gsae-figures-write", daemon=True).start()

    def submit(self, prefix: str, results: dict[str, dict]) -> Future:
        """Queue a job; never blocks (a thread writes it: the pipe holds 64 KB, and the worker reads a job only
        once it has drawn the previous one, or imported its modules)."""
        future: Future = Future()
        with self._lock:
            if self.dead is not None:
                raise RuntimeError(f"the figure worker exited ({self.dead})")
            job, self._next = self._next, self._next + 1
            self._jobs[job] = future
        self._outbox.put((job, prefix, results))
        return future

    def _write(self) -> None:
        while True:
            item = self._outbox.get()
            if item is None:
                break
            try:
                data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as e:  # noqa: BLE001 - results that do not pickle fail their job alone
                with self._lock:
                    future = self._jobs.pop(item[0], None)
                if future is not None:
                    future.set_exception(RuntimeError(f"the results could not be sent to the figure worker "
                                                      f"({type(e).__name__}: {e})"))
                continue
            try:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
            except (OSError, ValueError) as e:  # a closed pipe: the worker is gone
                self._fail(f"{type(e).__name__}: {e}")
                return
        try:
            self.proc.stdin.close()  # the worker exits when it has answered every job
        except OSError:
            pass

    def _read(self) -> None:
        while True:
            try:
                job, ok, payload = pickle.load(self.proc.stdout)
            except Exception as e:  # noqa: BLE001 - EOF or a broken stream: the worker is gone
                self._fail(f"{type(e).__name__}: {e}" if not isinstance(e, EOFError) else f"exit code {self.proc.poll()}")
                return
            with self._lock:
                future = self._jobs.pop(job, None)
            if future is not None:
                future.set_result(payload) if ok else future.set_exception(RuntimeError(payload))

    def _fail(self, why: str) -> None:
        with self._lock:
            self.dead = self.dead or why
            jobs, self._jobs = self._jobs, {}
        for future in jobs.values():
            future.set_exception(RuntimeError(f"the figure worker exited ({why})"))

    def close(self) -> None:
        if os.getpid() != self.owner:
            return
        self._outbox.put(None)
        try:
            self.proc.wait(timeout=60)
        except Exception:  # noqa: BLE001 - still drawing after a minute at exit: stop it
            self.proc.kill()


_WORKER: _Worker | None = None
#: seconds :meth:`FigureRenderer.drain` waits for one evaluation's figures (a worker that hangs is given up on)
DRAIN_TIMEOUT = 300.0


def _pool() -> _Worker:
    """The process's figure worker, started on first use (one that exited is not restarted: it raises)."""
    global _WORKER
    if _WORKER is None or _WORKER.owner != os.getpid():  # in a forked child: its own worker, if ever
        _WORKER = _Worker()
        atexit.register(_WORKER.close)
    if _WORKER.dead is not None:
        raise RuntimeError(f"the figure worker exited ({_WORKER.dead})")
    return _WORKER


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
                self._pending.append((writers, step, _pool().submit(prefix, results)))
                return
            except Exception as e:  # noqa: BLE001 - a pool that cannot start (or is broken): draw here
                self._give_up_background(e)
        self._write(writers, step, self._render_here(prefix, results))

    def start(self) -> None:
        """Start the worker now (when drawing in the background), so its imports are done by the first evaluation."""
        if self.background:
            try:
                _pool()
            except Exception as e:  # noqa: BLE001
                self._give_up_background(e)

    def poll(self) -> None:
        """Write the figures whose drawing finished (in submission order; none is waited for)."""
        while self._pending and self._pending[0][2].done():
            self._finish(*self._pending.pop(0))

    def drain(self, timeout: float = DRAIN_TIMEOUT) -> None:
        """Wait for every queued figure (each at most ``timeout`` seconds) and write it."""
        while self._pending:
            self._finish(*self._pending.pop(0), timeout=timeout)

    # ------------------------------------------------------------------ internals
    def _finish(self, writers: list, step: int, future: Future, timeout: float | None = None) -> None:
        try:
            summaries = future.result(timeout=timeout)
        except Exception as e:  # noqa: BLE001 - the worker died or a figure failed: the figures are skipped
            log.warning("evaluation figures at step %d were not drawn (%s: %s)", step, type(e).__name__, e)
            if _WORKER is not None and _WORKER.dead is not None:
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
        log.warning("evaluation figures: the background worker is unavailable (%s: %s); drawing them in the "
                    "training process from now on", type(error).__name__, error)
        self.background = False
