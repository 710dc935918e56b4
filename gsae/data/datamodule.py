"""The LightningDataModule: token batches for training and held-out validation. The stream position is
its state (the batches consumed and, for text sources, every logical stream's position), so
``--ckpt_path last`` resumes at the next unseen context of every stream (no replay, no skip) without
re-tokenizing what was consumed."""

from __future__ import annotations

import functools
import itertools
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from gsae.data.batch import StreamState, TokenBatch
from gsae.data.sources import SharedReads, TextSource
from gsae.data.streams import StreamBatches, StreamPacker, check_assignment
from gsae.data.tokens import (
    GSAE_CORPUS,
    DataSourceError,
    TokenStream,
    local_data_files,
    pack,
    saved_dataset,
    synthetic_context,
)
from gsae.lm import LanguageModel
from gsae.sigterm import quiet_worker

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic"


class TokenDataModule(pl.LightningDataModule):
    """Streams packed token contexts from a HF dataset, local files, ``gsae-corpus`` or an offline synthetic source.

    How contexts map to ranks and workers: ``synthetic`` is index-addressable, so global context ``i`` goes to
    rank ``i mod W`` and 2 ranks × B/2 see exactly the contexts of 1 rank × B at every step. Text sources are
    cut into ``n_streams`` logical streams (:mod:`gsae.data.sources`, :mod:`gsae.data.streams`): ranks own
    disjoint streams, each stream is tokenized by one DataLoader worker, the batches are the same whatever
    ``num_workers`` is, and the union over ranks is what one rank reads in as many contexts (no context
    lost or repeated). Finite sources repeat epoch by epoch, per stream, deterministically, so training length
    is set by ``--trainer.max_steps`` and ranks never run out at different times.
    """

    def __init__(
        self,
        lm: LanguageModel | None = None,
        dataset: str = "Skylion007/openwebtext",
        dataset_config: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        val_documents: int = 1000,
        text_column: str = "text",
        text_unit: Literal["document", "paragraph", "line"] = "document",
        streaming: bool = True,
        context_size: int = 128,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        val_batches: int = 4,
        prepend_bos: bool = True,
        separator: bool = True,
        n_streams: int = 16,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        """Configure the token stream.

        Args:
            lm: the language model (linked from ``--model.lm``; gives the tokenizer, BOS and ``n_ctx``).
            dataset: HF hub dataset (``Skylion007/openwebtext``; pretokenized ones with an ``input_ids``
                column such as ``apollo-research/Skylion007-openwebtext-tokenizer-gpt2`` are used as is),
                a local file / folder / glob of .txt, .jsonl, .json or .parquet, a ``datasets`` ``save_to_disk``
                folder (``load_from_disk``; a ``DatasetDict``'s ``split``), ``gsae-corpus`` (the generated corpus
                of the shipped ``gsae-tiny`` model, offline), or ``synthetic`` (random tokens, offline).
            dataset_config: HF dataset configuration name, if it has several.
            split: split to train on.
            val_split: split to validate on; if unset, the first ``val_documents`` documents of ``split`` are
                held out for validation and never trained on.
            val_documents: documents held out for validation when ``val_split`` is unset (the first ones of the
                source, or of its first shard when it has ``n_streams`` shards or more; ``gsae-corpus`` holds out
                its documents 0, 1000, 2000, ... instead). A validation pass reads only these.
            text_column: column holding the text (ignored when an ``input_ids`` column exists).
            text_unit: what one document of a local ``.txt`` file is: the whole file (``document``, the default:
                a folder of .txt files is a folder of documents), a blank-line-separated paragraph, or a line
                (``datasets``' ``sample_by``; for one huge file of one document per line). Documents are packed with
                BOS/EOS between them (``separator``); the text inside one keeps its newlines.
            streaming: stream the HF hub dataset instead of downloading it whole. Local files are read in place
                either way (the same documents to the same streams); a dataset held whole (downloaded, or a
                ``save_to_disk`` folder) is cut into ``n_streams`` contiguous pieces if each holds more than the
                ``val_documents``, else by documents.
            context_size: tokens per context, BOS included (must be <= the model's ``n_ctx``).
            batch_size: contexts per training batch *per device*; tokens per optimizer step =
                ``batch_size × context_size × devices × num_nodes``.
            val_batch_size: contexts per validation batch (default: ``batch_size``).
            val_batches: number of validation batches per rank (the validation set is fixed, read once).
            prepend_bos: start every context with BOS (SAELens and the JB/Apollo SAEs do).
            separator: put BOS/EOS between concatenated text documents.
            n_streams: logical streams a text source is cut into (by shards if it has that many, else by
                documents); must be a multiple of ``devices × num_nodes × max(num_workers, 1)``. Changing it
                changes which contexts are trained on, nothing else does.
            num_workers: DataLoader workers per rank; they read and tokenize text sources in parallel with
                training (each owns whole streams; the batches do not depend on it).
            seed: seed of the ``synthetic`` and ``gsae-corpus`` sources (``gsae-corpus`` seed 0 is the text
                gsae-tiny was trained on; other seeds give unseen text).
        """
        super().__init__()
        for name, value, low in (("context_size", context_size, 2), ("batch_size", batch_size, 1), ("val_batches", val_batches, 0),
                                 ("n_streams", n_streams, 1), ("num_workers", num_workers, 0), ("val_documents", val_documents, 0)):
            if value < low:
                raise ValueError(f"--data.{name} must be >= {low} (got {value})")
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(f"--data.val_batch_size must be >= 1, or null for --data.batch_size (got {val_batch_size})")
        self.lm = lm
        self.dataset = dataset
        self.dataset_config = dataset_config
        self.split = split
        self.val_split = val_split
        self.val_documents = val_documents
        self.text_column = text_column
        self.text_unit = text_unit
        self.streaming = streaming
        self.context_size = context_size
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.val_batches = val_batches
        self.prepend_bos = prepend_bos
        self.separator = separator
        self.n_streams = n_streams
        self.num_workers = num_workers
        self.seed = seed
        self.consumed_batches = 0  # training batches handed to training_step on this rank
        # (batches, global contexts) consumed when this process started: a resume on another number of ranks goes on
        # from the global context count (synthetic contexts are addressed by it), not from batches × this world
        self._resumed_at: tuple[int, int | None] = (0, 0)
        self.stream_states: dict[int, StreamState] = {}  # text sources: each consumed stream's position
        self._source: TextSource | None = None
        self._data_bytes: int | None = None  # local data: its files' size (position_options), read once
        self._said_repeat = False  # say_if_data_repeats: once
        self._val_cache: tuple[tuple[int, int], list[TokenBatch]] | None = None

    # ------------------------------------------------------------------ sources
    def validate(self) -> None:
        """Check the options against the model and the dataset; raise a one-line error naming the option."""
        if self.lm is None:
            raise ValueError("--data.lm is not set (it is linked from --model.lm by the CLI)")
        if self.context_size > self.lm.n_ctx:
            raise ValueError(
                f"--data.context_size ({self.context_size}) exceeds the model's n_ctx ({self.lm.n_ctx}) for {self.lm.name!r}"
            )
        if self.dataset in (SYNTHETIC, GSAE_CORPUS) and self.text_column != "text":
            raise ValueError(f"--data.text_column {self.text_column!r}: {self.dataset} is generated, with no columns")
        if self.dataset != SYNTHETIC:
            self.source()  # opens the source: missing path / column / hub errors, empty files now

    def source(self) -> TextSource:
        """The text source, opened once (not for ``synthetic``)."""
        if self._source is None:
            self._source = TextSource(
                self.dataset, self.dataset_config, self.split, self.val_split, self.streaming, self.text_column,
                self.lm.encode_text, self.n_streams, self.val_documents, self.seed, vocab=self.lm.d_vocab,
                text_unit=self.text_unit,
            )
        return self._source

    def _separator(self) -> int | None:
        return None if (self.source().pretokenized or not self.separator) else self.lm.eos_token_id

    def contexts(self, which: str, start: int = 0) -> Iterator[list[int]]:
        """Packed contexts of ``which`` from index ``start`` on: ``val`` the held-out set (what validation and
        evaluations read), ``train`` the training documents packed in source order as one sequence (training
        batches of text sources come from the ``n_streams`` streams instead)."""
        bos = self.lm.bos_token_id
        if self.dataset == SYNTHETIC:
            # disjoint index ranges, so val never equals train; below 2**32 because torch's CPU generator
            # keeps only the low 32 bits of a seed (an offset of 2**40 gave val context i == train context i)
            offset = 0 if which == "train" else 1 << 31
            return (
                synthetic_context(offset + i, self.context_size, self.lm.d_vocab, self.seed, bos, self.prepend_bos)
                for i in itertools.count(start)
            )
        src = self.source()
        docs = src.val_documents() if which == "val" else src.train_documents()
        return itertools.islice(pack(docs, self.context_size, bos, self.prepend_bos, self._separator()), start, None)

    def evaluation_contexts(self, n: int, spread: int = 8) -> list[list[int]]:
        """``n`` held-out contexts for the benchmarks (the evaluation callback's and ``evaluate.py``'s), spread over the
        held-out set: of its first ``m = min(all, spread·n)`` contexts, every ``spread``-th (0, 8, 16, …), then, if
        the set is smaller than ``spread·n``, the ones halfway between (4, 12, …), and so on (2, 6, 1, 5, 3, 7 mod 8).
        The first ``n`` of a packed text stream come from a handful of documents (OpenWebText averages ~1,100 GPT-2
        tokens: 64 contexts of 128 are ~7 documents), so a benchmark's numbers were a few documents' topics; spread 8,
        the ~400 contexts of a GPT-2 config's evaluation come from ~370 of the 1000 held-out documents.

        The order does not depend on ``n``: each benchmark takes the first contexts it needs, so its contexts are the
        same whichever other benchmarks (and so whichever largest ``n``) are run, on a small held-out set as well.
        Synthetic contexts are i.i.d.: the first ``n``."""
        if self.dataset == SYNTHETIC:
            return list(itertools.islice(self.contexts("val"), n))
        ctx = list(itertools.islice(self.contexts("val"), spread * n))
        width = max(spread - 1, 0).bit_length()  # residues in bit-reversed order: each pass halves the gaps
        residues = sorted(range(spread), key=lambda r: (int(f"{r:0{width}b}"[::-1], 2) if width else 0, r))
        return [ctx[i] for r in residues for i in range(r, len(ctx), spread)][:n]

    def open_stream(self, stream: int, state: StreamState | None = None) -> StreamPacker:
        """Stream ``stream`` of the text source, packed, from ``state`` (or its start)."""
        src = self.source()
        return StreamPacker(
            stream, src.stream_documents, self.context_size, self.lm.bos_token_id, self.prepend_bos,
            self._separator(), state, self.dataset,
        )

    def open_streams(self, states: dict[int, StreamState | None]) -> dict[int, StreamPacker]:
        """Several streams opened together; in document mode they share one pass over the source (:class:`SharedReads`)."""
        src = self.source()
        if src.mode != "documents" or len(states) < 2:
            return {s: self.open_stream(s, st) for s, st in states.items()}
        reads = SharedReads(src, {s: (0, 0) if st is None else (int(st.epoch), int(st.docs)) for s, st in states.items()})
        documents = functools.partial(src.stream_documents, reads=reads)
        return {
            s: StreamPacker(s, documents, self.context_size, self.lm.bos_token_id, self.prepend_bos, self._separator(), st,
                            self.dataset)
            for s, st in states.items()
        }

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        self.validate()

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def check_world(self, world_size: int) -> None:
        """One-line error if a text source's ``n_streams`` cannot be split between ``world_size`` ranks and their
        workers (checked again when the loader is built)."""
        if self.dataset != SYNTHETIC:
            check_assignment(self.n_streams, world_size, self.num_workers)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        if self.dataset == SYNTHETIC:
            stream = TokenStream(
                lambda start: self.contexts("train", start), self.batch_size, rank, world,
                start_batch=self.consumed_batches, start_context=self.consumed_contexts(world),
            )
        else:
            check_assignment(self.n_streams, world, self.num_workers)
            self.source()
            if self.num_workers:  # the parent tokenized while validating; forked workers would warn and serialise
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            mine = {s: st for s, st in self.stream_states.items() if s % world == rank}
            for s in range(rank, self.n_streams, world):  # a source without a context fails here, in one line
                self.open_stream(s, mine.get(s)).next_context()
            stream = StreamBatches(self.open_streams, self.n_streams, self.batch_size, rank, world, self.consumed_batches, mine)
        # on a GPU, pinned batches: copying pageable memory to the device waits for every queued kernel first
        launcher = getattr(getattr(self.trainer, "strategy", None), "launcher", None)
        forked = type(launcher).__name__ == "_MultiProcessingLauncher"  # a rank ddp_fork forked (gsae.sigterm)
        quiet = functools.partial(quiet_worker, keep_sigterm=forked)  # signals: the main's (gsae.sigterm)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=self._on_cuda(),
                          worker_init_fn=quiet if self.num_workers else None)

    def _on_cuda(self) -> bool:
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def val_batches_of(self, rank: int = 0, world: int = 1) -> list[TokenBatch]:
        """This rank's validation batches: block ``b`` of ``val_batch_size × world`` held-out contexts, rows ``≡ rank``.

        Read once and kept. Warns, with the numbers, when the held-out set is smaller than asked for.
        """
        if self._val_cache is not None and self._val_cache[0] == (rank, world):
            return self._val_cache[1]
        per_batch = self.val_batch_size * world
        wanted = self.val_batches * per_batch
        ctx = list(itertools.islice(self.contexts("val"), wanted))
        n = len(ctx) // per_batch
        if n < self.val_batches:
            where = f"--data.val_split {self.val_split!r}" if self.val_split else f"--data.val_documents {self.val_documents}"
            rank_zero_warn(
                f"validation: the held-out set of {self.dataset!r} ({where}) gives {len(ctx)} contexts, fewer than the "
                f"{wanted} asked (--data.val_batches {self.val_batches} × --data.val_batch_size {self.val_batch_size} × "
                f"{world} ranks); validating on {n} batches per rank"
            )
        batches = [TokenBatch(torch.tensor(ctx[b * per_batch : (b + 1) * per_batch][rank::world], dtype=torch.long), b)
                   for b in range(n)]
        self._val_cache = ((rank, world), batches)
        return batches

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_batches_of(*self._rank_world()), batch_size=None, num_workers=0)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if isinstance(batch, TokenBatch) and trainer is not None and trainer.training:
            self.consumed_batches = int(batch.index) + 1
            if batch.state is not None:
                state = batch.state
                self.say_if_data_repeats(state, self.stream_states.get(int(state.stream)), trainer.global_rank)
                self.stream_states[int(state.stream)] = state
                batch = batch._replace(state=None)  # the carry-over stays on the CPU
        module = trainer.lightning_module if trainer is not None else None
        prepare = getattr(module, "prepare_batch", None)  # Lightning calls this hook, not the module's
        return prepare(batch) if prepare is not None else batch

    def say_if_data_repeats(self, state: StreamState, before: StreamState | None, rank: int) -> None:
        """Say once (rank 0) when a training stream starts its second pass over its documents: training repeats data
        from there on. A stream that does so within its first batch of a fresh run holds less than a batch: the batch
        then has the same text more than once."""
        if self._said_repeat or rank != 0 or int(state.epoch) < 1 or (before is not None and int(before.epoch) >= 1):
            return
        self._said_repeat = True
        short = ""
        if before is None and self._resumed_at[0] == 0:  # its first batch: one pass is shorter than a batch
            short = (f"; one pass of it is shorter than a batch (--data.batch_size {self.batch_size}), so a batch "
                     "holds the same text more than once: use more data, or a smaller --data.batch_size or "
                     "--data.n_streams")
        src = self._source
        if src is not None and src.mode == "shards" and src.ds.num_shards % self.n_streams:
            n, s = src.ds.num_shards, self.n_streams  # streams advance alike: those with fewer shards repeat sooner
            bigger = "stream 0" if n % s == 1 else f"streams 0–{n % s - 1}"
            short += (f"; its {n} shards are dealt {n // s + 1} to {bigger} and {n // s} to the others, so the "
                      "documents of the smaller streams come round more often: a --data.n_streams dividing "
                      f"{n} (and a multiple of devices × workers) deals them evenly")
        log.warning("--data.dataset %r: stream %d of %d has been read to its end and starts again from its first "
                    "document: training repeats data from here on (each stream repeats its own documents, pass after "
                    "pass; the other streams follow as they end)%s", self.dataset, int(state.stream), self.n_streams,
                    short)

    def _all_stream_states(self) -> dict[int, StreamState]:
        """Every rank's stream states (ranks own disjoint streams; only rank 0 writes the checkpoint)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return dict(self.stream_states)
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = {s: tuple(st) for s, st in self.stream_states.items() if s % world == rank}  # not stale loaded copies
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
        return {s: StreamState(*st) for part in gathered for s, st in part.items()}

    def consumed_contexts(self, world: int) -> int:
        """Global training contexts consumed (every rank's): those before this process's start, plus ``batch_size ×
        world`` per batch since."""
        batches, contexts = self._resumed_at
        if contexts is None:  # a checkpoint that did not record it: its world was this one
            contexts = batches * self.batch_size * world
        return contexts + (self.consumed_batches - batches) * self.batch_size * world

    def state_dict(self) -> dict[str, Any]:
        streams = self._all_stream_states()
        return {
            "consumed_batches": self.consumed_batches, "dataset": self.dataset, "batch_size": self.batch_size,
            "n_streams": self.n_streams, "text_unit": self.text_unit,
            "consumed_contexts": self.consumed_contexts(self._rank_world()[1]),
            "streams": [None if s not in streams else [streams[s].epoch, streams[s].shard, streams[s].docs, streams[s].rest.clone()]
                        for s in range(self.n_streams)],
            "position_options": self.position_options(),
        }

    def position_options(self) -> dict[str, Any]:
        """The options that say what the saved stream positions (shard, document, tokens left) point at: with
        another value they point at other documents or other text (``--data.n_streams``, ``text_unit`` and
        ``batch_size`` are checked on their own; ``context_size``, ``prepend_bos`` and ``separator`` only change the
        packing, and a position is in tokens, so they may change)."""
        if self.dataset in (SYNTHETIC, GSAE_CORPUS):  # generated: the seed decides the text
            return {"dataset": self.dataset, "seed": self.seed}
        out: dict[str, Any] = {"dataset": self.dataset, "dataset_config": self.dataset_config, "split": self.split,
                               "val_split": self.val_split, "val_documents": None if self.val_split else self.val_documents}
        if self._source is not None and not self._source.pretokenized:
            out["text_column"] = self.text_column
        files = local_data_files(self.dataset)
        if files is None and not saved_dataset(self.dataset):  # a hub dataset: its shards are its files when
            out["streaming"] = self.streaming  # streamed, n_streams contiguous pieces when not
        else:  # local data: its size tells a file of the same name with other text from the same file moved
            if self._data_bytes is None:
                paths = files[1] if files is not None else [p for p in Path(self.dataset).expanduser().rglob("*") if p.is_file()]
                self._data_bytes = sum(os.path.getsize(f) for f in paths)
            out["data_bytes"] = self._data_bytes
        return out

    def check_resumable(self, state_dict: dict[str, Any]) -> None:
        """One-line refusal where an option the saved stream positions depend on differs from the checkpoint's:
        ``batch_size``, ``n_streams``, ``text_unit`` and :meth:`position_options` (the run would go on at the wrong
        documents: text trained on twice or never). Options a checkpoint does not record (written before they were)
        are not checked; a local dataset at another path with the same name and size is taken as moved, and one whose
        files' size changed is refused."""
        kept = ("batch_size", "n_streams", "text_unit")
        saved = {k: state_dict[k] for k in kept if k in state_dict} | (state_dict.get("position_options") or {})
        ours = {k: getattr(self, k) for k in kept} | self.position_options()
        for key, was in saved.items():
            now = ours.get(key, was)
            if now == was:
                continue
            if key == "dataset" and _moved(str(was), str(now)):
                log.info("--data.dataset %r: the checkpoint read %r; taken as the same data, moved", now, was)
                continue
            if key == "data_bytes":
                raise ValueError(
                    f"--data.dataset {self.dataset!r} holds {now} bytes of data files, the checkpoint's "
                    f"{saved.get('dataset')!r} held {was}: other text, at which its stream positions would point at "
                    "other documents; resume with the checkpoint's data, or start a new run")
            shown = "null" if was is None else was
            raise ValueError(
                f"--data.{key} ({now}) differs from the checkpoint's ({shown}): its stream positions cannot be resumed "
                f"with it; resume with --data.{key} {shown}, or start a new run")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.check_resumable(state_dict)
        self.consumed_batches = int(state_dict["consumed_batches"])
        contexts = state_dict.get("consumed_contexts")
        self._resumed_at = (self.consumed_batches, None if contexts is None else int(contexts))
        self.stream_states = {
            s: StreamState(s, int(st[0]), int(st[1]), int(st[2]), st[3])
            for s, st in enumerate(state_dict.get("streams") or []) if st is not None
        }


def _moved(was: str, now: str) -> bool:
    """Whether local dataset ``now`` reads as ``was`` at another path (the same file or folder name)."""
    local = local_data_files(now) is not None or saved_dataset(now)
    return local and os.path.basename(was.rstrip("/")) == os.path.basename(now.rstrip("/"))


__all__ = ["DataSourceError", "TokenDataModule"]
