"""Text sources cut into logical streams: which documents each stream reads, and which are held out.

A text source (HF ``datasets``, local files, ``gsae-corpus``) is cut into ``n_streams`` (S) logical
streams of documents. The cut depends on the source and S only, never on the number of ranks or
DataLoader workers, which is what makes the data the same whatever ``num_workers`` is:

* **shards** (the source has at least S shards: a hub dataset of many parquet files, a folder of files, or a
  parquet file of at least S row groups — ``datasets``' ``reshard``):
  stream ``s`` reads shards ``s, s+S, s+2S, ...`` and nothing else;
* **documents** (fewer shards, e.g. one local file): stream ``s`` keeps documents ``j ≡ s (mod S)``. Every
  stream parses the whole source (pyarrow batches, ~150× cheaper than tokenizing) but tokenizes only its own
  documents, so a rank owning S/W streams tokenizes 1/W of the source;
* ``gsae-corpus`` (generated, index-addressable): stream ``s`` generates its own documents directly.

Held out for validation (``val_split`` unset): the first ``val_documents`` documents of the source (in
shard mode: in shard order, so of its first shard on OpenWebText, ~100k documents each; a folder of one-document
files holds out its first files) are never trained on, and reading them costs their own size; ``gsae-corpus``
holds out its documents 0, 1000, 2000, ... (generated directly).

Finite sources repeat: a stream that has read all its documents starts again (``epoch + 1``) with the same
documents in the same order, so every stream is endless and DDP ranks never run out at different times.
A stream with no document is a :class:`DataSourceError` naming ``--data.dataset``.

Resuming a stream at ``(epoch, shard, docs)`` tokenizes nothing it had consumed: in shard mode it opens its
current shard directly (the finished shards are not read) and skips ``docs`` rows of it in pyarrow batches; in
document mode it skips rows the same way (parsing, not tokenizing); ``gsae-corpus`` jumps.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
from collections.abc import Callable, Iterator

import numpy as np

from gsae.data.tokens import GSAE_CORPUS, DataSourceError, local_data_files, saved_dataset

#: rows per pyarrow batch read from a ``datasets`` source
_READ_ROWS = 1024
#: ``gsae-corpus`` holds out documents ``j ≡ 0 (mod 1000)``
CORPUS_VAL_EVERY = 1000

Encode = Callable[[list[str]], list[list[int]]]

# datasets' json builder logs a file's read error (twice) before raising it: arrow_batches says it once, naming the file
logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)


#: what one document of a ``.txt`` file is (``--data.text_unit``; ``datasets``' text builder ``sample_by``)
TEXT_UNITS = ("document", "paragraph", "line")


def open_dataset(
    path: str, name: str | None, split: str, streaming: bool, n_shards: int, held_out: int = 0,
    text_unit: str = "document", option: str = "--data.split",
):
    """A ``datasets.IterableDataset`` over a local file/folder/glob, a ``save_to_disk`` folder or a hub dataset
    (one-line errors).

    Local files are read in place (streamed) whatever ``streaming`` says, so they give the same documents to the
    same streams either way. A dataset held whole (a hub dataset with ``streaming`` off, a ``save_to_disk`` folder)
    is cut into ``n_shards`` contiguous shards when its first shard still has documents after the ``held_out``
    ones, else left as one (document mode): a small file used to leave stream 0 with nothing to train on."""
    import datasets

    local = local_data_files(path)
    # datasets' file builders log the error of a bad file before raising it; its one line is said here instead
    builders = logging.getLogger("datasets.packaged_modules")
    level = builders.level
    builders.setLevel(logging.CRITICAL)
    try:
        if saved_dataset(path):
            ds = _load_saved(path, split, option)
            streaming = False
        elif local is not None:
            builder, files = local
            if split != "train":
                raise DataSourceError(f"{option} {split!r}: local files ({path!r}) have one split, 'train'")
            kw = {"sample_by": text_unit} if builder == "text" else {}
            ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kw)
            streaming = True
        else:
            if os.environ.get("HF_DATASETS_OFFLINE") != "1" and os.environ.get("HF_HUB_OFFLINE") != "1":
                from gsae.lm import _hub_reachable

                if not _hub_reachable():
                    raise DataSourceError(
                        f"--data.dataset: {path!r} is not a local path and the Hugging Face hub is unreachable "
                        "(offline, use `--data.dataset synthetic` or the quickstart: configs/quickstart/topk.yaml)"
                    )
            ds = datasets.load_dataset(path, name, split=split, streaming=streaming)
    except DataSourceError:
        raise
    except StopIteration:  # datasets' json builder on an empty file
        raise DataSourceError(f"--data.dataset: {path!r} has no documents (empty file)") from None
    except (FileNotFoundError, ValueError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataSourceError(f"--data.dataset: could not open {path!r} (split {split!r}): {msg}") from None
    finally:
        builders.setLevel(level)
    if not streaming:  # a memory-mapped Dataset: contiguous shards with O(1) access
        ds = ds.to_iterable_dataset(num_shards=n_shards if len(ds) // max(n_shards, 1) > held_out else 1)
    elif ds.num_shards < n_shards:
        ds = ds.reshard()  # parquet: one shard per row group instead of per file (other formats: unchanged)
    return ds


def _load_saved(path: str, split: str, option: str):
    """The ``split`` of a ``save_to_disk`` folder (a ``Dataset`` folder is its one split, whatever its name)."""
    import datasets

    try:
        ds = datasets.load_from_disk(os.path.expanduser(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DataSourceError(f"--data.dataset: could not load the saved dataset {path!r}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataSourceError(f"{option} {split!r}: the saved dataset {path!r} has splits {sorted(ds)}")
        ds = ds[split]
    return ds


def arrow_batches(ds, name: str, batch_size: int = _READ_ROWS) -> Iterator:
    """``ds``'s rows as pyarrow tables of ``batch_size`` rows; a file that does not read (binary data given as text,
    a JSON line that does not parse) is a :class:`DataSourceError` naming the dataset ``name``, not pyarrow's or the
    codec's words alone (which name no file)."""
    import pyarrow as pa

    try:
        yield from ds.with_format("arrow").iter(batch_size=batch_size)
    except DataSourceError:
        raise
    except UnicodeDecodeError as e:
        raise DataSourceError(
            f"--data.dataset {name!r}: not UTF-8 text ({e.reason} at byte {e.start}); local datasets are text (.txt), "
            "JSON lines / JSON (.jsonl, .json) or parquet files"
        ) from None
    except pa.ArrowException as e:
        problem = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataSourceError(f"--data.dataset {name!r}: could not read it: {problem}") from None


def column_values(
    ds, column: str, start: int = 0, step: int = 1, limit: int | None = None, name: str = "(the dataset)"
) -> Iterator:
    """Values of ``column`` at rows ``start, start+step, ...`` of ``ds`` (at most ``limit``), read in pyarrow batches
    (:func:`arrow_batches`; ``name`` names the dataset in a read error).

    ``ds.iter`` reads the whole dataset in every process (``datasets`` splits a plain ``for row in ds``
    between DataLoader workers by itself, which is what we do here explicitly, by stream).
    """
    import pyarrow as pa

    if limit is not None and limit <= 0:
        return
    first, wanted, n_out = 0, start, 0  # global row of the batch's first row; next wanted row
    for table in arrow_batches(ds.select_columns([column]), name):
        n = table.num_rows
        if wanted < first + n:
            idx = np.arange(wanted - first, n, step)
            if limit is not None:
                idx = idx[: limit - n_out]
            yield from table.column(column).take(pa.array(idx)).to_pylist()
            n_out += len(idx)
            if limit is not None and n_out >= limit:
                return
            wanted = first + int(idx[-1]) + step
        first += n


def tokens_of(
    values: Iterator, pretokenized: bool, encode: Encode, chunk: int = 32, vocab: int | None = None, column: str = "text"
) -> Iterator[list[int]]:
    """Token lists of documents: ``input_ids`` rows as they are (each id checked to be below ``vocab``), text
    tokenized ``chunk`` documents at a time (a missing value, ``null``, is an empty document: skipped in packing)."""
    if pretokenized:
        for v in values:
            ids = [] if v is None else list(v)
            if vocab is not None and ids and not 0 <= min(ids) <= max(ids) < vocab:
                bad = next(i for i in ids if not 0 <= i < vocab)
                raise DataSourceError(
                    f"--data.dataset: its input_ids hold token {bad}, outside the model's vocabulary of {vocab} "
                    "(pretokenized for another tokenizer? see --model.lm.name)"
                )
            yield ids
        return
    it = iter(values)
    while texts := list(itertools.islice(it, chunk)):
        texts = ["" if t is None else t for t in texts]
        wrong = next((t for t in texts if not isinstance(t, str)), None)
        if wrong is not None:
            raise DataSourceError(f"--data.text_column {column!r}: holds {type(wrong).__name__} values, not text")
        yield from encode(texts)


def _tokenized(
    items: Iterator[tuple], pretokenized: bool, encode: Encode, chunk: int = 32, **kw
) -> Iterator[tuple[tuple, list[int]]]:
    """``(item, tokens)`` for items whose last field is a raw document (text tokenized ``chunk`` at a time;
    ``kw``: :func:`tokens_of`'s ``vocab`` and ``column``)."""
    it = iter(items)
    while block := list(itertools.islice(it, chunk)):
        yield from zip(block, tokens_of((b[-1] for b in block), pretokenized, encode, chunk, **kw))


def _corpus_train_index(i: int) -> int:
    """Index of the ``i``-th ``gsae-corpus`` training document (documents ``≡ 0 mod 1000`` are held out)."""
    return i + 1 + i // (CORPUS_VAL_EVERY - 1)


class TextSource:
    """Documents of a text source, cut into ``n_streams`` logical streams plus a held-out prefix (module docstring).

    Args:
        dataset, dataset_config, split, val_split, streaming, text_column: as ``TokenDataModule``'s options.
        encode: the tokenizer (``LanguageModel.encode_text``).
        n_streams: the number of logical streams S.
        val_documents: documents held out for validation when ``val_split`` is unset.
        seed: ``gsae-corpus`` seed.
        vocab: the model's vocabulary size: pretokenized ids must be below it.
        text_unit: what one document of a ``.txt`` file is (:data:`TEXT_UNITS`).
    """

    def __init__(
        self,
        dataset: str,
        dataset_config: str | None,
        split: str,
        val_split: str | None,
        streaming: bool,
        text_column: str,
        encode: Encode,
        n_streams: int,
        val_documents: int,
        seed: int = 0,
        vocab: int | None = None,
        text_unit: str = "document",
    ) -> None:
        self.dataset, self.dataset_config, self.streaming = dataset, dataset_config, streaming
        self.val_split = val_split
        self.encode, self.n_streams, self.seed, self.vocab, self.text_unit = encode, n_streams, seed, vocab, text_unit
        self.held_out = 0 if val_split else val_documents  # documents of the training split kept out of training
        if text_unit not in TEXT_UNITS:
            raise DataSourceError(f"--data.text_unit must be one of {', '.join(TEXT_UNITS)} (got {text_unit!r})")
        if dataset == GSAE_CORPUS:
            if split != "train" or val_split:
                raise DataSourceError(
                    f"--data.{'val_split' if val_split else 'split'}: {GSAE_CORPUS} has no splits (it holds out its "
                    "documents 0, 1000, 2000, … for validation)"
                )
            self.ds, self.column, self.pretokenized, self.mode = None, "text", False, "corpus"
            return
        local = local_data_files(dataset) is not None  # (globs a folder: once)
        if val_split and local:
            raise DataSourceError(
                f"--data.val_split: local files ({dataset!r}) have one split; hold documents out with --data.val_documents"
            )
        self.ds = open_dataset(dataset, dataset_config, split, streaming, n_streams, self.held_out, text_unit)
        self.column, self.pretokenized = self._resolve_column(self.ds, text_column)
        if local and not self._has_text():
            raise DataSourceError(f"--data.dataset: {dataset!r} holds no text (every document in it is empty or blank)")
        self.mode = "shards" if self.ds.num_shards >= n_streams else "documents"
        #: shard mode: the held-out documents of shards 0, 1, ... (the first ``held_out`` of the source, in shard order)
        self.held: list[int] = self._held_per_shard() if self.mode == "shards" else []
        if self.mode == "documents" and n_streams > 1 and not local:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"--data.dataset {dataset!r} has {self.ds.num_shards} shards, fewer than --data.n_streams {n_streams}: "
                f"each of the {n_streams} streams reads the whole dataset and keeps 1 document in {n_streams}; a "
                f"--data.n_streams <= {self.ds.num_shards} (a multiple of ranks × workers) reads each shard once"
            )

    def _has_text(self) -> bool:
        """Whether some document has text (a non-blank string, a non-empty ``input_ids`` row): read up to the first one.
        An empty or blank local file used to be told as a held-out set without contexts, then as a stream without
        training documents, neither naming the file's emptiness."""
        for v in column_values(self.ds, self.column, name=self.dataset):
            if isinstance(v, str):
                if v.strip():
                    return True
            elif v is not None and (not hasattr(v, "__len__") or len(v)):  # other values: tokens_of names their type
                return True
        return False

    def _held_per_shard(self) -> list[int]:
        """How many documents the held-out prefix takes from each of the first shards: all of a shard smaller than
        what is left to hold out (a folder of one-document files), then the rest from the next. Reads at most
        ``held_out`` rows (OpenWebText: the first 1000 of shard 0)."""
        held, left, n = [], self.held_out, self.ds.num_shards
        while left > 0 and len(held) < n:
            shard = self.ds.shard(num_shards=n, index=len(held))
            count = sum(1 for _ in column_values(shard, self.column, limit=left, name=self.dataset))
            held.append(count)
            left -= count
        return held

    def held_in(self, shard: int) -> int:
        """Shard mode: the held-out documents at the start of ``shard`` (:attr:`held`)."""
        return self.held[shard] if shard < len(self.held) else 0

    def _resolve_column(self, ds, text_column: str) -> tuple[str, bool]:
        columns = ds.column_names
        if not columns:  # e.g. the text builder: no features until read
            first = next(iter(arrow_batches(ds, self.dataset, batch_size=1)), None)
            columns = None if first is None else first.column_names
        if not columns:
            raise DataSourceError(f"--data.dataset: {self.dataset!r} has no documents")
        if "input_ids" in columns:
            return "input_ids", True
        if text_column not in columns:
            raise DataSourceError(
                f"--data.text_column: dataset has no {text_column!r} or 'input_ids' column (columns: {sorted(columns)})"
            )
        return text_column, False

    # ------------------------------------------------------------------ training streams
    def _epoch_values(self, s: int, shard: int, docs: int) -> Iterator[tuple[int, int, object]]:
        """``(shard, index in shard, raw document)`` of stream ``s``'s epoch from ``(shard, docs)`` on.

        ``shard`` counts the stream's own shards (shard mode; always 0 otherwise): a resumed stream opens its
        current shard directly (``datasets``' ``shard``), so the shards it had finished are not read again.
        """
        S = self.n_streams
        if self.mode == "corpus":
            from gsae.tinylm.corpus import document

            return ((0, k, document(self.seed, _corpus_train_index(s + k * S))) for k in itertools.count(docs))
        if self.mode == "shards":
            n = self.ds.num_shards
            return (
                (m, i, v)
                for m, g in enumerate(range(s, n, S))
                if m >= shard
                for i, v in enumerate(
                    column_values(self.ds.shard(num_shards=n, index=g), self.column,
                                  start=self.held_in(g) + (docs if m == shard else 0), name=self.dataset),
                    start=docs if m == shard else 0,
                )
            )
        values = column_values(self.ds, self.column, start=self.first_document(s) + docs * S, step=S, name=self.dataset)
        return ((0, k, v) for k, v in enumerate(values, start=docs))

    def first_document(self, s: int) -> int:
        """Document mode: the first training document of stream ``s`` (the first ``j >= held_out``, ``j ≡ s mod S``)."""
        return s + self.n_streams * -(-max(self.held_out - s, 0) // self.n_streams)

    def stream_documents(
        self, s: int, epoch: int = 0, shard: int = 0, docs: int = 0, reads: SharedReads | None = None
    ) -> Iterator[tuple[int, int, int, list[int]]]:
        """``(epoch, shard, index in shard, tokens)`` of stream ``s``'s documents from ``(epoch, shard, docs)`` on.

        Endless: after the stream's last document it starts again with ``epoch + 1``. ``reads``: the
        :class:`SharedReads` of a set of document-mode streams this one belongs to (one pass for all of them).
        """
        while True:
            n = 0
            raw = reads.epoch_values(s, epoch, docs) if reads is not None else self._epoch_values(s, shard, docs)
            for (m, i, _), toks in _tokenized(raw, self.pretokenized, self.encode, vocab=self.vocab, column=self.column):
                n += 1
                yield epoch, m, i, toks
            if n == 0 and shard == docs == 0:
                raise DataSourceError(
                    f"--data.dataset: {self.dataset!r} gives no training document to stream {s} of "
                    f"--data.n_streams {self.n_streams} ({self.held_out} held out by --data.val_documents); "
                    "use more data, a smaller --data.n_streams or --data.val_documents"
                )
            epoch, shard, docs = epoch + 1, 0, 0

    # ------------------------------------------------------------------ one-pass views
    def train_documents(self) -> Iterator[list[int]]:
        """Every training document once, in source order (val excluded)."""
        if self.mode == "corpus":
            from gsae.tinylm.corpus import document

            values = (document(self.seed, _corpus_train_index(i)) for i in itertools.count())
        elif self.mode == "shards":
            n = self.ds.num_shards
            values = itertools.chain.from_iterable(
                column_values(self.ds.shard(num_shards=n, index=i), self.column, start=self.held_in(i), name=self.dataset)
                for i in range(n)
            )
        else:
            values = column_values(self.ds, self.column, start=self.held_out, name=self.dataset)
        return tokens_of(values, self.pretokenized, self.encode, vocab=self.vocab, column=self.column)

    def val_documents(self) -> Iterator[list[int]]:
        """The held-out documents, in order (a separate ``val_split`` whole, else the first ``val_documents``)."""
        if self.mode == "corpus":
            from gsae.tinylm.corpus import document

            values = (document(self.seed, CORPUS_VAL_EVERY * i) for i in itertools.count())
        elif self.val_split:
            ds = open_dataset(self.dataset, self.dataset_config, self.val_split, self.streaming, 1,
                              text_unit=self.text_unit, option="--data.val_split")
            values = column_values(ds, self._resolve_column(ds, self.column)[0], name=self.dataset)
        elif self.mode == "shards":
            n = self.ds.num_shards
            values = itertools.chain.from_iterable(
                column_values(self.ds.shard(num_shards=n, index=g), self.column, limit=count, name=self.dataset)
                for g, count in enumerate(self.held)
            )
        else:
            values = column_values(self.ds, self.column, limit=self.held_out, name=self.dataset)
        return tokens_of(values, self.pretokenized, self.encode, vocab=self.vocab, column=self.column)


class SharedReads:
    """One pass over a document-mode source that feeds several of its streams (one DataLoader worker's).

    Without it every stream parses the whole source to keep its 1/S of the documents; with it the worker
    parses the source once and hands each document to its stream's queue. The documents each stream gets,
    and their order, are the same (:meth:`epoch_values` = ``TextSource._epoch_values`` for that stream).

    Args:
        source: a :class:`TextSource` in document mode.
        starts: ``stream -> (epoch, docs)``, where each stream continues (``(0, 0)``: its start).
    """

    def __init__(self, source: TextSource, starts: dict[int, tuple[int, int]]) -> None:
        if source.mode != "documents":
            raise ValueError("SharedReads needs a source cut by documents")
        self.src = source
        self.queues: dict[int, collections.deque] = {s: collections.deque() for s in starts}
        # (epoch, global row) of the next document each stream needs; reading starts at the earliest
        self.want = {s: (e, source.first_document(s) + d * source.n_streams) for s, (e, d) in starts.items()}
        self.epoch, self.row = min(self.want.values())
        self.rows: Iterator | None = None

    def _advance(self) -> None:
        """Read one batch of rows and route them; at the end of the source mark every stream's epoch as ended."""
        src, S = self.src, self.src.n_streams
        if self.rows is None:
            self.rows = column_values(src.ds, src.column, start=self.row, name=src.dataset)
        block = list(itertools.islice(self.rows, _READ_ROWS))
        for v in block:
            j, self.row = self.row, self.row + 1
            q = self.queues.get(j % S)
            if q is not None and j >= src.held_out and (self.epoch, j) >= self.want[j % S]:
                q.append((self.epoch, (j - src.first_document(j % S)) // S, v))
        if len(block) < _READ_ROWS:  # the source ended: every stream's epoch ends here
            for q in self.queues.values():
                q.append((self.epoch, None, None))
            self.epoch, self.row, self.rows = self.epoch + 1, 0, None

    def epoch_values(self, s: int, epoch: int, docs: int) -> Iterator[tuple[int, int, object]]:
        """``(0, index in epoch, raw document)`` of stream ``s``'s epoch ``epoch`` from document ``docs`` on."""
        q = self.queues[s]
        while True:
            while not q:
                self._advance()
            e, k, v = q.popleft()
            if e < epoch or (k is not None and k < docs and e == epoch):
                continue
            if k is None:
                return
            yield 0, k, v
