"""Activation shuffling buffer: mixes tokens across contexts so an SAE batch is not a few whole sequences.

Each call takes the freshly harvested rows and returns as many rows, drawn uniformly from the
buffer plus the new rows; the rest stay in the buffer. While the buffer fills (the first
``capacity / (n/2)`` steps) only half of the incoming rows are returned. No row is ever returned
twice and none is dropped (except what is still buffered when training stops). The buffer and its
random generator are part of the checkpoint, so a resumed run mixes exactly as an uninterrupted one.
Under DDP every rank has its own buffer (its own rows, generator seeded ``seed + rank``); the training
system gathers all of them into the checkpoint and gives each rank its own back on resume (on another number of
ranks it deals all the rows out: ``SAESystem._own_buffer_state``). Activations
and gradients (g-SAE) travel together. The state is saved on the CPU and restored rows follow the
device and dtype of the next incoming batch (Lightning loads checkpoints on the CPU).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gsae.data.batch import ActivationBatch


class ShuffleBuffer:
    """A fixed-capacity mixing buffer of activation rows (and their gradients)."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 0:
            raise ValueError(f"--model.buffer_size must be >= 0 (got {capacity})")
        self.capacity = capacity
        self.gen = torch.Generator().manual_seed(seed)
        self.x: Tensor | None = None
        self.grad: Tensor | None = None
        # rows restored beyond capacity (a run resumed on fewer ranks): kept on the host, fed in a batch at a time
        self.backlog_x: Tensor | None = None
        self.backlog_grad: Tensor | None = None

    @property
    def fill(self) -> int:
        """Rows held: in the buffer, and in the host backlog of a restored surplus."""
        return sum(0 if t is None else t.shape[0] for t in (self.x, self.backlog_x))

    def mix(self, batch: ActivationBatch) -> ActivationBatch:
        """Add ``batch``'s rows, return a uniformly drawn set of rows of the same size (half while filling).

        A buffer restored with more than ``capacity`` rows (from more ranks, or with a smaller
        ``--model.buffer_size``) keeps the surplus on the host (:meth:`load_state_dict`) and adds up to a batch of it
        to each call, which then gives up to twice the batch's rows: the surplus leaves within ``surplus / n`` calls,
        none dropped, no batch more than twice the usual size, and the device never holds more than ``capacity`` rows
        besides the call's own."""
        if self.capacity == 0 and self.x is None and self.backlog_x is None:
            return batch
        self._follow(batch)
        n_in = batch.x.shape[0]
        held = 0 if self.x is None else self.x.shape[0]
        xs, gs = [batch.x], [batch.grad]
        if self.backlog_x is not None:  # the next rows of the restored surplus, on the batch's device
            take = min(n_in, self.backlog_x.shape[0])
            xs.append(self.backlog_x[:take].to(batch.x.device, batch.x.dtype))
            grad = None if self.backlog_grad is None or batch.grad is None else self.backlog_grad[:take]
            gs.append(None if grad is None else grad.to(batch.grad.device, batch.grad.dtype))
            rest = self.backlog_x.shape[0] - take
            self.backlog_x = self.backlog_x[take:] if rest else None
            self.backlog_grad = self.backlog_grad[take:] if rest and self.backlog_grad is not None else None
        if self.x is not None:
            xs.insert(0, self.x)
            gs.insert(0, self.grad)
        x = torch.cat(xs) if len(xs) > 1 else xs[0]
        g = None if any(t is None for t in gs) else torch.cat(gs) if len(gs) > 1 else gs[0]
        n_out = n_in if held + n_in // 2 >= self.capacity else n_in // 2
        n_out = max(n_out, min(x.shape[0] - self.capacity, 2 * n_in))  # over capacity: drain, ≤ 2 batches a call
        perm = torch.randperm(x.shape[0], generator=self.gen)
        if x.is_cuda:  # pinned: a pageable copy to the device would wait for every queued kernel first
            perm = perm.pin_memory()
        perm = perm.to(x.device, non_blocking=True)
        out, keep = perm[:n_out], perm[n_out:]
        self.x = x[keep] if keep.numel() or self.capacity else None  # a drained buffer_size-0 buffer: off again
        self.grad = None if g is None or self.x is None else g[keep]
        return ActivationBatch(x[out], None if g is None else g[out])

    def _follow(self, batch: ActivationBatch) -> None:
        """Move the held rows to the incoming batch's device and dtype (a restored buffer is on the CPU)."""
        if self.x is not None and (self.x.device != batch.x.device or self.x.dtype != batch.x.dtype):
            self.x = self.x.to(batch.x.device, batch.x.dtype)
        if self.grad is not None and batch.grad is not None:
            if self.grad.device != batch.grad.device or self.grad.dtype != batch.grad.dtype:
                self.grad = self.grad.to(batch.grad.device, batch.grad.dtype)

    def state_dict(self) -> dict:
        """Held rows (on the CPU; the buffer's, then any backlog's) and the generator state."""
        def rows(buffered: Tensor | None, backlog: Tensor | None) -> Tensor | None:
            parts = [t.detach().cpu() for t in (buffered, backlog) if t is not None]
            if len(parts) < 2:
                return parts[0] if parts else None
            return torch.cat([parts[0], parts[1].to(parts[0].dtype)])

        grad = None if self.grad is None and self.backlog_grad is None else rows(self.grad, self.backlog_grad)
        return {"x": rows(self.x, self.backlog_x), "grad": grad, "gen": self.gen.get_state(), "capacity": self.capacity}

    def load_state_dict(self, state: dict) -> None:
        """Restore rows and generator. Rows beyond ``capacity`` stay where they were loaded (the host) as the
        backlog that :meth:`mix` feeds in, so a run resumed on fewer ranks does not move them all to the device."""
        x, grad = state["x"], state["grad"]
        n = 0 if x is None else x.shape[0]
        if n > self.capacity:
            self.x = x[: self.capacity] if self.capacity else None
            self.grad = None if grad is None or self.x is None else grad[: self.capacity]
            self.backlog_x, self.backlog_grad = x[self.capacity :], None if grad is None else grad[self.capacity :]
        else:
            self.x, self.grad, self.backlog_x, self.backlog_grad = x, grad, None, None
        self.gen.set_state(state["gen"].cpu())

    def reseed(self, seed: int) -> None:
        """Restart the generator from ``seed`` (each DDP rank mixes with its own stream)."""
        self.gen.manual_seed(seed)
