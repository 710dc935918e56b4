"""SIGTERM (a scheduler's time limit or preemption, ``kill``): every rank stops at the same step, however many of them
the signal reached and however often, and ``SAECheckpoint.on_exception`` saves the step reached in ``last.ckpt``.

Lightning 2.6's SIGTERM handler runs a ``dist.broadcast`` *inside the handler*, on every rank that receives the
signal and each time it does, and rank 0's handler forwards the signal to the ranks it launched. A signal to the
whole process group (``kill -TERM -<pgid>``; SLURM's time limit for a batch step running ``python train.py``) thus
reached the launched ranks twice and rank 0 once: the ranks issued different numbers of collectives, or paired a
handler's broadcast with another rank's step all-reduce, and hung without saving anything. A rank also stopped on
its own signal at the end of its batch, while the others went on to the next.

Here (:func:`install`, before ``fit``) the handler only notes the signal: rank 0 still forwards it once, so a
``kill <rank 0's pid>`` reaches the ranks it started, and on one process it sets Lightning's flag directly (its loop
checks it after each batch). Under DDP the exchange Lightning makes at the start of every training batch anyway
(``_broadcast_sigterm_tensor``: rank 0's flag, broadcast) becomes an all-reduce of every rank's flag, so a signal
to any rank stops all of them, at the same batch; no collective is added.

Lightning's watch over the ranks it launched no longer SIGKILLs rank 0 while it saves and reports a stop the other
ranks have already finished (:func:`patient_observer`).

Data-loading workers (``--data.num_workers``) ignore SIGTERM and Ctrl+C (:func:`quiet_worker`): the main process
stops, saves and ends them. A signal to the process group used to kill them first, and PyTorch's "DataLoader worker …
is killed by signal: Terminated" then stopped a DDP rank mid-step (exit code 1, the step reached unsaved) or, on one
process, replaced exit code 143 with 1; a second Ctrl+C printed a traceback per worker. As they ignore
``terminate()``, Python's exit (multiprocessing's exit hook joins them) would wait for them forever: a finalizer
that hook runs first ends any left (:func:`end_workers`), in every process that imports this module.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.util
import signal
import time

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message

log = logging.getLogger(__name__)


def install(trainer) -> None:
    """Replace the trainer's SIGTERM handling by the one in the module docstring (call before ``fit``; it is
    registered when ``fit`` starts)."""
    connector = trainer._signal_connector
    noted = {"signal": False}

    def distributed() -> bool:
        return dist.is_available() and dist.is_initialized() and trainer.world_size > 1

    def note(signum, _frame) -> None:
        log.info(rank_prefixed_message(f"Received SIGTERM: {signum}", trainer.local_rank))
        if not noted["signal"]:
            launcher = trainer.strategy.launcher
            if launcher is not None:  # the ranks rank 0 started (none under torchrun / srun: they get their own)
                launcher.kill(signum)
        noted["signal"] = True
        connector.gsae_noted = True  # read by the evaluation callback: a DDP evaluation cannot stop midway (it says so)
        if not distributed():
            connector.received_sigterm = True

    def agree() -> None:
        flag = torch.tensor([int(noted["signal"])], device=trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            connector.received_sigterm = True
            raise SIGTERMException()

    patient_observer()
    connector._sigterm_notifier_fn = note
    trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = agree


#: exit codes of a rank that stopped as asked: Ctrl+C (130), SIGTERM (143)
STOPPED = (128 + signal.SIGINT, 128 + signal.SIGTERM)


def patient_observer() -> None:
    """Lightning's watch over the ranks it launched (``_ChildProcessObserver``, in rank 0, every 5 s) SIGKILLs rank 0
    as soon as a launched rank has exited with a non-zero code. A rank that stopped as asked (Ctrl+C: 130, SIGTERM:
    143) exits once the step reached is saved, while rank 0 may still be exporting it and printing the summary: it was
    killed there (exit 137, no summary). Such codes now wait for rank 0; any other non-zero code still ends all."""
    from lightning.fabric.strategies.launchers import subprocess_script

    observer = subprocess_script._ChildProcessObserver
    if getattr(observer, "_gsae_patient", False):
        return
    lightnings = observer._run

    def run(self) -> bool:
        for proc in self._child_processes:
            proc.poll()
        codes = [proc.returncode for proc in self._child_processes]
        if any(c in STOPPED for c in codes) and all(c in (None, 0, *STOPPED) for c in codes):
            return all(c is not None for c in codes)  # stopped as asked: rank 0 finishes and exits on its own
        return lightnings(self)

    observer._run = run
    observer._gsae_patient = True


def quiet_worker(_worker_id: int, keep_sigterm: bool = False) -> None:
    """A data-loading worker's ``worker_init_fn``: SIGTERM and Ctrl+C (SIGINT) are the main process's to handle (it
    stops, saves and ends its workers: PyTorch's shutdown, else :func:`end_workers`). ``keep_sigterm``: the workers of a
    rank forked by ``ddp_fork`` keep SIGTERM (that rank exits through multiprocessing's exit hook, which ends its
    children with ``terminate()`` and waits for them; a group SIGTERM ends them there, as it did)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not keep_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _end_workers_before_the_join() -> None:
    """Any process that imports this module: multiprocessing's exit hook (``util._exit_function``) runs the
    finalizers of priority >= 0 *before* it ``terminate()``s and joins the children, so a data-loading iterator left
    alive (a test, a notebook, a stopped fit) cannot hang the exit on workers that ignore SIGTERM."""
    multiprocessing.util.Finalize(None, end_workers, exitpriority=100)


def end_workers(wait: float = 1.0) -> None:
    """After the fit and at exit: end the data-loading workers still alive (they ignore ``terminate()``'s SIGTERM,
    :func:`quiet_worker`) after ``wait`` seconds in all for PyTorch's own shutdown; other child processes are left alone.
    (A finished fit's workers are shut down already; a stopped one's may not be.)"""
    # PyTorch's workers are daemonic (multiprocessing forgets a started process's target): the children that
    # multiprocessing's exit would terminate() anyway; a ddp_fork rank is not daemonic and is left alone
    workers = [p for p in multiprocessing.active_children() if p.daemon]
    deadline = time.monotonic() + wait
    for p in workers:
        p.join(timeout=max(deadline - time.monotonic(), 0.0))
        if p.is_alive():
            p.kill()
            p.join()


_end_workers_before_the_join()
