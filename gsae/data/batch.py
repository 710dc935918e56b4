"""The contract between ``data/`` and ``systems/``: what a batch is."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class StreamState(NamedTuple):
    """Where one logical stream of a text source stands: enough to continue it without re-tokenizing.

    Attributes:
        stream: the stream's id ``s`` in ``0..n_streams-1``.
        epoch: passes over the stream's documents completed (finite sources repeat, epoch by epoch).
        shard: the stream's current shard, counted among its own shards (0 unless the source is cut by shards).
        docs: documents of the current shard already packed (the next one to read is ``docs``).
        rest: ``(n,)`` tokens read but not yet in a yielded context (the packer's carry-over).
    """

    stream: int
    epoch: int
    shard: int
    docs: int
    rest: Tensor


class TokenBatch(NamedTuple):
    """A batch of fixed-length token contexts, as the data module yields it.

    Attributes:
        tokens: ``(B, T)`` token ids; each row is one packed context.
        index: the batch's position in this rank's stream (0, 1, 2, ...); the data module records the
            last consumed index so that a resumed run continues exactly after it.
        state: for text sources, the state of the stream the batch came from *after* it; the data module
            records it when the batch is consumed (prefetched batches do not count), so a resumed run
            continues every stream exactly. ``None`` for index-addressable sources (``synthetic``).
        keep: ``(n,)`` flat indices into the ``B·T`` positions whose activations train the SAE (special tokens
            dropped), ascending; set on the host before the batch moves to the device
            (:meth:`gsae.systems.SAESystem.prepare_batch`) so that selecting those rows on a GPU does not wait for it
            to count them. ``None``: the system computes the mask on the tokens' device.
    """

    tokens: Tensor
    index: int
    state: StreamState | None = None
    keep: Tensor | None = None


class ActivationBatch(NamedTuple):
    """Activations harvested from the language model, flattened over (batch, position).

    Attributes:
        x: ``(N, d_in)`` activations at the hook.
        grad: ``(N, d_in)`` ``dL/dx`` at the hook (g-SAE), or ``None``.
    """

    x: Tensor
    grad: Tensor | None
