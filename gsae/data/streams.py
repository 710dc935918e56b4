"""Logical streams of a text source -> per-rank, per-worker batches that carry their stream's resume state.

Each of the ``n_streams`` (S) streams of a :class:`gsae.data.sources.TextSource` packs its own documents
(SPEC §5 packing: a separator between documents, ``context_size − 1`` tokens after BOS) with a
:class:`StreamPacker`, whose :class:`~gsae.data.batch.StreamState` (epoch, shard, documents packed, carry-over
tokens) is enough to continue it later without re-tokenizing anything.

Assignment (:class:`StreamBatches`): with ``W`` ranks, rank ``r`` owns streams ``s ≡ r (mod W)``, i.e. its local
streams ``i = 0..S/W−1`` are ``s = r + W·i``; its batch ``b`` is the next ``batch_size`` contexts of local
stream ``b mod (S/W)``. DataLoader worker ``w`` of ``n`` builds the batches ``b ≡ start + w (mod n)`` — since ``n``
divides ``S/W`` those are whole streams, each tokenized by one worker only — and the DataLoader's round-robin
over workers restores the order ``b = start, start+1, ...``. So the batches are the same for any ``num_workers``,
ranks read disjoint streams, and the union over ranks of a run is what one rank reads in the same number of
contexts (each stream then advances by the same number of contexts); the per-step "2 ranks × B/2 = 1 rank × B"
identity holds only for index-addressable sources (``synthetic``, :class:`gsae.data.tokens.TokenStream`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from gsae.data.batch import StreamState, TokenBatch
from gsae.data.tokens import DataSourceError

#: ``(stream, epoch, shard, docs) -> iterator of (epoch, shard, index in shard, tokens)`` (``TextSource.stream_documents``)
StreamDocuments = Callable[[int, int, int, int], Iterator[tuple[int, int, int, list[int]]]]


class StreamPacker:
    """Packs one stream's documents into contexts; :meth:`state` is its position after the last context.

    Args:
        stream: the stream id ``s``.
        documents: the source's ``stream_documents``.
        context_size: tokens per context, BOS included.
        bos: the BOS id (prepended when ``prepend_bos``).
        prepend_bos: start every context with BOS.
        separator: token put between documents (``None`` for pretokenized rows, which carry their own).
        state: where to continue (``None``: the stream's start).
        dataset: the ``--data.dataset`` value, for error messages.
    """

    def __init__(
        self,
        stream: int,
        documents: StreamDocuments,
        context_size: int,
        bos: int,
        prepend_bos: bool,
        separator: int | None,
        state: StreamState | None = None,
        dataset: str = "",
    ) -> None:
        self.stream, self.bos, self.prepend_bos, self.separator, self.dataset = stream, bos, prepend_bos, separator, dataset
        self.context_size = context_size
        self.body = context_size - 1 if prepend_bos else context_size
        self.epoch, self.shard, self.docs = (0, 0, 0) if state is None else (int(state.epoch), int(state.shard), int(state.docs))
        self.buf: list[int] = [] if state is None else [int(t) for t in state.rest.tolist()]
        self.pos = 0  # tokens of buf already in a context
        self.docs_it = documents(stream, self.epoch, self.shard, self.docs)
        self.whole_epoch = self.shard == self.docs == 0  # this epoch was read from its start (an empty pass can be told)
        self.made_in_epoch = 0
        self.filled = False  # a document of this epoch had tokens
        self.at_start = (self.epoch, self.shard, self.docs) == (0, 0, 0) and not self.buf  # nothing packed yet

    def next_context(self) -> list[int]:
        """The stream's next context (reads and tokenizes documents as needed)."""
        while len(self.buf) - self.pos < self.body:
            epoch, shard, i, toks = next(self.docs_it)
            if epoch != self.epoch:  # a new pass over the stream's documents
                if self.whole_epoch and self.made_in_epoch == 0:
                    empty = " (every document of it is empty: blank lines or empty texts)" if not self.filled else ""
                    raise DataSourceError(
                        f"--data.dataset: a whole pass over stream {self.stream} of {self.dataset!r} gives no complete "
                        f"{self.context_size}-token context{empty}; use more data or a smaller --data.n_streams / "
                        "--data.context_size"
                    )
                self.whole_epoch, self.made_in_epoch, self.filled = True, 0, False
            if not toks:  # an empty document (a blank line, "" or null): nothing to pack, not even a separator; a
                self.epoch, self.shard, self.docs = epoch, shard, i + 1  # stream of them would be separators only
                continue
            self.filled = True
            if self.separator is not None and not self.at_start:  # between documents, not before the stream's first
                self.buf.append(self.separator)
            self.at_start = False
            self.buf.extend(toks)
            self.epoch, self.shard, self.docs = epoch, shard, i + 1
        chunk = self.buf[self.pos : self.pos + self.body]
        self.pos += self.body
        if self.pos > 4096 and self.pos * 2 > len(self.buf):  # drop what is packed, keep appends amortised O(1)
            self.buf, self.pos = self.buf[self.pos :], 0
        self.made_in_epoch += 1
        return [self.bos, *chunk] if self.prepend_bos else chunk

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """``(batch_size, context_size)`` next contexts."""
        return torch.tensor([self.next_context() for _ in range(batch_size)], dtype=torch.long)

    def state(self) -> StreamState:
        """The stream's position after the last context returned."""
        return StreamState(self.stream, self.epoch, self.shard, self.docs, torch.tensor(self.buf[self.pos :], dtype=torch.long))


def check_assignment(n_streams: int, world_size: int, num_workers: int) -> None:
    """One-line errors when the streams cannot be split evenly between ranks and their workers."""
    if n_streams % world_size:
        raise ValueError(
            f"--data.n_streams ({n_streams}) must be a multiple of the number of ranks ({world_size}: devices × num_nodes)"
        )
    per_rank = n_streams // world_size
    if num_workers > 1 and per_rank % num_workers:
        raise ValueError(
            f"--data.num_workers ({num_workers}) must divide the streams per rank (--data.n_streams {n_streams} / "
            f"{world_size} ranks = {per_rank}); set --data.n_streams to a multiple of {world_size * num_workers}"
        )


class StreamBatches(IterableDataset):
    """One rank's training batches from the text streams it owns (module docstring), endless.

    Args:
        open_streams: ``{stream: state | None} -> {stream: StreamPacker}`` (all the streams one worker reads,
            opened together so that they can share one pass over the source).
        n_streams: the number of logical streams S.
        batch_size: contexts per batch (per rank).
        rank, world_size: this process's place in the DDP group.
        start_batch: index of the first batch (resume: the number of batches already consumed on this rank).
        states: state of each stream already read (resume), by stream id; the others start afresh.
    """

    def __init__(
        self,
        open_streams: Callable[[dict[int, StreamState | None]], dict[int, StreamPacker]],
        n_streams: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        states: dict[int, StreamState] | None = None,
    ) -> None:
        super().__init__()
        check_assignment(n_streams, world_size, 1)
        self.open_streams, self.n_streams, self.batch_size = open_streams, n_streams, batch_size
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch
        self.states = dict(states or {})

    def __iter__(self) -> Iterator[TokenBatch]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        check_assignment(self.n_streams, self.world_size, n_workers)
        per_rank = self.n_streams // self.world_size
        mine = [self.rank + self.world_size * i for i in range(per_rank) if (i - self.start_batch - worker) % n_workers == 0]
        packers = self.open_streams({s: self.states.get(s) for s in mine})
        b = self.start_batch + worker
        while True:
            packer = packers[self.rank + self.world_size * (b % per_rank)]
            tokens = packer.next_batch(self.batch_size)  # (B, T)
            yield TokenBatch(tokens, b, packer.state())
            b += n_workers
