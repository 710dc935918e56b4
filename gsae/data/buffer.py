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

    @property
    def fill(self) -> int:
        return 0 if self.x is None else self.x.shape[0]

    def mix(self, batch: ActivationBatch) -> ActivationBatch:
        """Add ``batch``'s rows, return a uniformly drawn set of rows of the same size (half while filling).

        A buffer holding more than ``capacity`` rows (restored from more ranks, or with a smaller
        ``--model.buffer_size``) gives up to twice the batch's rows per call until it is back at ``capacity``: the
        surplus leaves within ``surplus / n`` calls, none dropped, and no batch is more than twice the usual size."""
        if self.capacity == 0 and self.x is None:
            return batch
        self._follow(batch)
        x = batch.x if self.x is None else torch.cat([self.x, batch.x])
        g = batch.grad if self.grad is None or batch.grad is None else torch.cat([self.grad, batch.grad])
        n_in = batch.x.shape[0]
        n_out = n_in if self.fill + n_in // 2 >= self.capacity else n_in // 2
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
        """Held rows (on the CPU) and the generator state."""
        cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
        return {"x": cpu(self.x), "grad": cpu(self.grad), "gen": self.gen.get_state(), "capacity": self.capacity}

    def load_state_dict(self, state: dict) -> None:
        self.x, self.grad = state["x"], state["grad"]
        self.gen.set_state(state["gen"].cpu())

    def reseed(self, seed: int) -> None:
        """Restart the generator from ``seed`` (each DDP rank mixes with its own stream)."""
        self.gen.manual_seed(seed)
