"""The LightningDataModule: token batches for training and held-out validation; the stream position
is its state, so ``--ckpt_path last`` resumes at the next unseen batch (no replay, no skip)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from gsae.data.batch import TokenBatch
from gsae.data.tokens import DataSourceError, TokenStream, hf_rows, pack, row_tokens, synthetic_context
from gsae.lm import LanguageModel

SYNTHETIC = "synthetic"


class TokenDataModule(pl.LightningDataModule):
    """Streams packed token contexts from a HF dataset, local files, or an offline synthetic source."""

    def __init__(
        self,
        lm: LanguageModel | None = None,
        dataset: str = "Skylion007/openwebtext",
        dataset_config: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        val_every: int = 1000,
        text_column: str = "text",
        streaming: bool = True,
        context_size: int = 128,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        val_batches: int = 4,
        prepend_bos: bool = True,
        separator: bool = True,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        """Configure the token stream.

        Args:
            lm: the language model (linked from ``--model.lm``; gives the tokenizer, BOS and ``n_ctx``).
            dataset: HF hub dataset (``Skylion007/openwebtext``; pretokenized ones with an ``input_ids``
                column such as ``apollo-research/Skylion007-openwebtext-tokenizer-gpt2`` are used as is),
                a local file / folder / glob of .txt, .jsonl or .parquet, ``gsae-corpus`` (the generated corpus
                of the shipped ``gsae-tiny`` model, offline), or ``synthetic`` (random tokens, offline).
            dataset_config: HF dataset configuration name, if it has several.
            split: split to train on.
            val_split: split to validate on; if unset, every ``val_every``-th document of ``split`` is
                held out for validation and never trained on.
            val_every: hold out document ``j`` for validation iff ``j % val_every == 0`` (when ``val_split`` is unset).
            text_column: column holding the text (ignored when an ``input_ids`` column exists).
            streaming: stream the HF dataset instead of downloading it whole.
            context_size: tokens per context, BOS included (must be <= the model's ``n_ctx``).
            batch_size: contexts per training batch *per device*; tokens per optimizer step =
                ``batch_size × context_size × devices × num_nodes``.
            val_batch_size: contexts per validation batch (default: ``batch_size``).
            val_batches: number of validation batches (the validation set is fixed).
            prepend_bos: start every context with BOS (SAELens and the JB/Apollo SAEs do).
            separator: put BOS/EOS between concatenated text documents.
            num_workers: DataLoader workers (each builds every n-th batch; order is unchanged).
            seed: seed of the ``synthetic`` and ``gsae-corpus`` sources (``gsae-corpus`` seed 0 is the text
                gsae-tiny was trained on; other seeds give unseen text).
        """
        super().__init__()
        if context_size < 2:
            raise ValueError(f"--data.context_size must be >= 2 (got {context_size})")
        if batch_size <= 0:
            raise ValueError(f"--data.batch_size must be > 0 (got {batch_size})")
        if val_every < 2:
            raise ValueError(f"--data.val_every must be >= 2 (got {val_every})")
        self.lm = lm
        self.dataset = dataset
        self.dataset_config = dataset_config
        self.split = split
        self.val_split = val_split
        self.val_every = val_every
        self.text_column = text_column
        self.streaming = streaming
        self.context_size = context_size
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.val_batches = val_batches
        self.prepend_bos = prepend_bos
        self.separator = separator
        self.num_workers = num_workers
        self.seed = seed
        self.consumed_batches = 0  # training batches handed to training_step on this rank

    # ------------------------------------------------------------------ sources
    def validate(self) -> None:
        """Check the options against the model and the dataset; raise a one-line error naming the option."""
        if self.lm is None:
            raise ValueError("--data.lm is not set (it is linked from --model.lm by the CLI)")
        if self.context_size > self.lm.n_ctx:
            raise ValueError(
                f"--data.context_size ({self.context_size}) exceeds the model's n_ctx ({self.lm.n_ctx}) for {self.lm.name!r}"
            )
        if self.dataset != SYNTHETIC:
            next(self._documents("train"), None)  # opens the source: missing path / column / hub errors now

    def _documents(self, which: str) -> Iterator[list[int]]:
        """Token lists of the training or validation documents."""
        split = self.val_split if which == "val" and self.val_split else self.split
        rows = hf_rows(self.dataset, self.dataset_config, split, self.streaming, seed=self.seed)
        docs = row_tokens(rows, self.text_column, self.lm.encode_text)
        if self.val_split is None:
            keep = (lambda j: j % self.val_every == 0) if which == "val" else (lambda j: j % self.val_every != 0)
            docs = (d for j, d in enumerate(docs) if keep(j))
        return docs

    def contexts(self, which: str, start: int = 0) -> Iterator[list[int]]:
        """Packed contexts of ``which`` (``train`` or ``val``) from global index ``start`` on."""
        bos = self.lm.bos_token_id
        if self.dataset == SYNTHETIC:
            # disjoint index ranges, so val never equals train; below 2**32 because torch's CPU generator
            # keeps only the low 32 bits of a seed (an offset of 2**40 gave val context i == train context i)
            offset = 0 if which == "train" else 1 << 31
            return (
                synthetic_context(offset + i, self.context_size, self.lm.d_vocab, self.seed, bos, self.prepend_bos)
                for i in itertools.count(start)
            )
        docs = self._documents(which)
        pretokenized = self._is_pretokenized()
        sep = None if (pretokenized or not self.separator) else self.lm.eos_token_id
        return itertools.islice(pack(docs, self.context_size, bos, self.prepend_bos, sep), start, None)

    def _is_pretokenized(self) -> bool:
        if not hasattr(self, "_pretok"):
            first = next(hf_rows(self.dataset, self.dataset_config, self.split, self.streaming, seed=self.seed), None)
            self._pretok = first is not None and "input_ids" in first
        return self._pretok

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        self.validate()

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        stream = TokenStream(
            lambda start: self.contexts("train", start), self.batch_size, rank, world, start_batch=self.consumed_batches
        )
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        stream = TokenStream(
            lambda start: self.contexts("val", start), self.val_batch_size, rank, world, max_batches=self.val_batches
        )
        return DataLoader(stream, batch_size=None, num_workers=0)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if isinstance(batch, TokenBatch) and trainer is not None and trainer.training:
            self.consumed_batches = int(batch.index) + 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_batches": self.consumed_batches, "dataset": self.dataset, "batch_size": self.batch_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("batch_size", self.batch_size) != self.batch_size:
            raise ValueError(
                f"--data.batch_size ({self.batch_size}) differs from the checkpoint's ({state_dict['batch_size']}); "
                "the stream position cannot be resumed exactly"
            )
        self.consumed_batches = int(state_dict["consumed_batches"])


__all__ = ["DataSourceError", "TokenDataModule"]
