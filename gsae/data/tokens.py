"""Token-level building blocks: local files, packing, the synthetic source and its index-addressable stream.

Sources: HF ``datasets`` (streaming by default; a ``text`` column tokenized with the model's tokenizer, or a
pretokenized ``input_ids`` column), local files (txt / jsonl / parquet through ``datasets``' ``data_files``),
``gsae-corpus`` (generated) — the text sources of :mod:`gsae.data.sources`, batched by
:mod:`gsae.data.streams` — or ``synthetic`` (offline random tokens with some structure, for the quickstart
and tests), batched here by :class:`TokenStream`.

Packing (SAELens ``concat_and_batch_sequences`` with BOS handling as in SPEC §5): documents are
concatenated with a separator token (BOS=EOS for GPT-2) between them and cut into chunks of
``context_size − 1`` tokens, each prefixed with BOS (``prepend_bos``). Pretokenized rows are
treated as pieces of one continuous stream (they already carry their separators).

Sharding of ``synthetic`` (index-addressable): the contexts are numbered 0, 1, 2, ...; rank ``r`` of ``W``
takes contexts ``i ≡ r (mod W)``, in order, and groups them into batches of ``batch_size``. So the
global batch ``s`` is the same set of contexts whatever ``W`` is (2 ranks × B/2 = 1 rank × B), which is
what makes DDP training equal to single-process training. DataLoader worker ``w`` of ``n`` builds the
batches ``b ≡ w (mod n)`` (each jumps to its contexts in O(1)); the DataLoader interleaves workers
round-robin, so the order is unchanged.
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from gsae.data.batch import TokenBatch

log = logging.getLogger(__name__)

Documents = Callable[[], Iterator[list[int]]]

_FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataSourceError(ValueError):
    """A dataset option is wrong (missing path, no usable column, unreachable hub)."""


def saved_dataset(path: str) -> bool:
    """Whether ``path`` is a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset``: ``state.json`` and
    ``dataset_info.json``; a ``DatasetDict``: ``dataset_dict.json``), read with ``load_from_disk``."""
    folder = Path(path).expanduser()
    saved_dict = (folder / "dataset_dict.json").is_file()
    return folder.is_dir() and (saved_dict or all((folder / f).is_file() for f in ("state.json", "dataset_info.json")))


def local_data_files(path: str) -> tuple[str, list[str]] | None:
    """``(datasets builder, files)`` if ``path`` is a local file, folder or glob of data files; else ``None`` (a hub
    name, or a :func:`saved_dataset` folder). A folder's hidden files and folders (``.ipynb_checkpoints/``) are left
    out."""
    if saved_dataset(path):
        return None
    path = os.path.expanduser(path)  # a config's '~/data.txt' (no shell expands it there; save_to_disk folders did)
    if any(c in path for c in "*?["):
        files = sorted(glob.glob(path))
    elif os.path.isdir(path):
        files = sorted(
            str(p) for p in Path(path).rglob("*")
            if p.suffix in _FILE_BUILDERS and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        files = _train_split(path, files)
    elif os.path.isfile(path):
        files = [path]
    elif path.startswith((".", "/", "~")) or Path(path).suffix in _FILE_BUILDERS:
        raise DataSourceError(f"--data.dataset: local path {path!r} does not exist")
    else:
        return None
    if not files:
        raise DataSourceError(f"--data.dataset: no {'/'.join(sorted(_FILE_BUILDERS))} files at {path!r}")
    suffixes = {Path(f).suffix for f in files}
    if len(suffixes) != 1 or next(iter(suffixes)) not in _FILE_BUILDERS:
        raise DataSourceError(f"--data.dataset: files at {path!r} must all be one of {sorted(_FILE_BUILDERS)} (got {sorted(suffixes)})")
    return _FILE_BUILDERS[suffixes.pop()], files


_SPLITS_SAID: set[str] = set()


def _train_split(folder: str, files: list[str]) -> list[str]:
    """A folder laid out as a hub dataset repository (``data/train-*.parquet``, ``validation-*``, ``test-*``, or
    ``train.jsonl`` beside ``test.jsonl``: the splits ``datasets`` itself finds there) trains on its train files
    only, said in one line: all of them were read as training text, a test set included, and the held-out documents
    came from whichever file sorted first (``test-…``). ``files`` unchanged for a folder without named splits."""
    from datasets.data_files import get_data_patterns

    try:
        patterns = {str(k): v for k, v in get_data_patterns(folder).items()}
    except Exception:  # noqa: BLE001 - no split layout datasets recognises: every file is training text
        return files
    if set(patterns) <= {"train"}:
        return files
    split_of = {}
    for split, pats in patterns.items():
        for pat in pats:
            for f in glob.glob(os.path.join(folder, pat), recursive=True):
                split_of.setdefault(os.path.normpath(f), split)
    train = [f for f in files if split_of.get(os.path.normpath(f)) == "train"]
    if not train:
        raise DataSourceError(f"--data.dataset: {folder!r} holds the splits {', '.join(sorted(patterns))} and no train "
                              "split; name the files to train on (a file or a glob)")
    left = sorted(set(patterns) - {"train"})
    if folder in _SPLITS_SAID:  # read by several parts of a run: said once
        return train
    _SPLITS_SAID.add(folder)
    log.warning(
        "--data.dataset: %s holds the splits %s: training reads its train split (%d files); %s left out, and the "
        "held-out documents come from the train files (--data.val_documents)", folder, ", ".join(sorted(patterns)),
        len(train), ", ".join(left))
    return train


#: ``--data.dataset gsae-corpus``: the procedural corpus gsae-tiny was trained on, generated in-process (offline, endless).
GSAE_CORPUS = "gsae-corpus"


def pack(docs: Iterator[list[int]], context_size: int, bos: int, prepend_bos: bool, separator: int | None) -> Iterator[list[int]]:
    """Concatenate documents (``separator`` between them) and cut into contexts of ``context_size``."""
    body = context_size - 1 if prepend_bos else context_size
    buf: list[int] = []
    first = True
    for doc in docs:
        if not doc:  # an empty document (a blank line, "" or null): nothing, as training's StreamPacker takes it
            continue
        if separator is not None and not first:
            buf.append(separator)
        first = False
        buf.extend(doc)
        while len(buf) >= body:
            chunk, buf = buf[:body], buf[body:]
            yield [bos, *chunk] if prepend_bos else chunk


def synthetic_context(index: int, context_size: int, d_vocab: int, seed: int, bos: int, prepend_bos: bool) -> list[int]:
    """Offline context ``index``: a seeded random walk over a Zipf-like vocabulary with repeated phrases.

    Deterministic in ``(seed, index)`` so a resumed or sharded stream can jump to any context in O(1).
    torch's CPU generator keeps only the low 32 bits of a seed, so indices ``2**32`` apart give the same context.
    """
    gen = torch.Generator().manual_seed((seed * 1_000_003 + index) % 2**32)
    n = context_size - 1 if prepend_bos else context_size
    vocab = d_vocab - 1 if bos == d_vocab - 1 else d_vocab  # keep the BOS id out of the body
    ranks = torch.arange(1, vocab + 1, dtype=torch.float)
    probs = ranks.pow(-1.1)
    toks = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=gen)
    # repeat earlier spans now and then, so there is context for attention to use
    for start in range(8, n - 4, 16):
        if torch.rand((), generator=gen) < 0.5:
            src = int(torch.randint(0, start - 4, (), generator=gen))
            toks[start : start + 4] = toks[src : src + 4]
    toks = toks.tolist()
    return [bos, *toks] if prepend_bos else toks


class TokenStream(IterableDataset):
    """Batches of packed contexts for one rank of one split, starting at batch ``start_batch``.

    Args:
        contexts: ``start -> iterator over the split's packed contexts from global index ``start``
            on``; sources that can jump (synthetic) do so, others skip by re-packing.
        batch_size: contexts per batch (per rank).
        rank, world_size: this process's place in the DDP group.
        start_batch: first batch index to yield (resume).
        start_context: global index of the first context read (resume; default ``start_batch × batch_size ×
            world_size``, which a resume on another number of ranks would get wrong).
        max_batches: stop after this batch index (exclusive), or ``None`` for an endless stream.
    """

    def __init__(
        self,
        contexts: Callable[[int], Iterator[list[int]]],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        max_batches: int | None = None,
        start_context: int | None = None,
    ) -> None:
        super().__init__()
        self.contexts = contexts
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch
        self.max_batches = max_batches
        self.start_context = start_context

    def __iter__(self) -> Iterator[TokenBatch]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        per_batch = self.batch_size * self.world_size  # global contexts per batch index
        first = self.start_batch * per_batch if self.start_context is None else self.start_context
        it = self.contexts(first)
        b = self.start_batch
        while self.max_batches is None or b < self.max_batches:
            block = list(itertools.islice(it, per_batch))
            if len(block) < per_batch:
                return  # the source ran out: end of the epoch
            if (b - self.start_batch) % n_workers == worker:
                rows = block[self.rank :: self.world_size]
                yield TokenBatch(torch.tensor(rows, dtype=torch.long), b)
            b += 1
