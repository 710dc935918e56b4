"""Per-rank data throughput of the text pipeline as the number of ranks grows, and the cost of a validation pass.

A local jsonl of the generated corpus (``gsae.tinylm.corpus``, ``--docs`` documents, written to a temporary
folder), tokenized with gsae-tiny's BPE, packed into 128-token contexts by :class:`gsae.data.TokenDataModule`
(default ``n_streams``; one file, so streams split it by documents). What is timed:

- ``rank_tokens_per_s_W{W}``: rank 0 of a simulated ``W``-rank group (``StreamBatches(rank=0, world_size=W)``
  — exactly what ``train_dataloader`` builds on rank 0 under DDP) through a ``DataLoader`` with ``--workers``
  workers: tokens of the batches it yields per second, after ``n_streams / W`` warm-up batches (every stream
  of the rank opened). Each rank only tokenizes its own streams, so this should not fall with ``W``.
- ``scaling_W4``: ``rank_tokens_per_s_W4 / rank_tokens_per_s_W1`` (target ≥ 0.8), the median over rounds of the
  per-round ratio: W1 and W4 alternate (W1, W4, W1, W4, ...) so each pair runs under the same background load;
  per-round figures are printed as ``#`` lines, the tokens/s figures are medians over rounds.
- ``--legacy``: also ``legacy_rank_tokens_per_s_W{W}`` / ``legacy_scaling_W{W}``, the previous design as a
  control: rank 0 packs the whole stream in one process (``contexts("train")``) and keeps every ``W``-th context.
- ``val_pass_s``: the first validation pass of the default validation set (``val_batches × batch_size``
  contexts from the first ``val_documents`` documents: read, tokenized, cached); ``val_pass_cached_s``: a later
  pass (the set is kept in memory).

Usage::

    python benchmarks/data_throughput.py            # ~1-2 min on 2 shared cores
    python benchmarks/data_throughput.py --format parquet   # the same corpus as parquet row groups: streams by shards
    python benchmarks/data_throughput.py --rounds 7 --batches 1000 --worlds 1 2 4 8
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader

from gsae.data import TokenDataModule
from gsae.data.streams import StreamBatches
from gsae.lm import LanguageModel
from gsae.tinylm.corpus import rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=20000, help="documents in the jsonl (~143 gsae-tiny tokens each)")
    p.add_argument("--batches", type=int, default=300, help="timed batches per measurement")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of W1 and W4")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    p.add_argument("--batch-size", type=int, default=32, help="contexts per batch")
    p.add_argument("--context-size", type=int, default=128, help="tokens per context")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 4], help="simulated world sizes (first = reference)")
    p.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl",
                   help="jsonl: one shard, streams split it by documents; parquet (1000-row row groups): by shards")
    p.add_argument("--legacy", action="store_true", help="also time the previous design (every rank packs everything)")
    args = p.parse_args(argv)
    if args.docs <= 2000:  # the data module holds out its first 1000 documents; every stream needs some of the rest
        p.error(f"--docs must be > 2000 (got {args.docs}): the first 1000 are held out for validation")
    return args


def rank_tokens_per_s(dm: TokenDataModule, world: int, args: argparse.Namespace) -> float:
    """Tokens per second rank 0 of ``world`` ranks gets from its DataLoader, after warm-up."""
    stream = StreamBatches(dm.open_streams, dm.n_streams, args.batch_size, rank=0, world_size=world)
    it = iter(DataLoader(stream, batch_size=None, num_workers=args.workers))
    for _ in itertools.islice(it, dm.n_streams // world):
        pass
    t0 = time.perf_counter()
    n = sum(b.tokens.numel() for b in itertools.islice(it, args.batches))
    dt = time.perf_counter() - t0
    del it  # stops the workers
    return n / dt


def legacy_rank_tokens_per_s(dm: TokenDataModule, world: int, args: argparse.Namespace) -> float:
    """The previous design: one process packs every context and rank 0 keeps contexts ``i ≡ 0 (mod W)``."""
    n_ctx = args.batch_size * max(args.batches // 5, 1)
    t0 = time.perf_counter()
    kept = sum(len(c) for c in itertools.islice(itertools.islice(dm.contexts("train"), 0, None, world), n_ctx))
    return kept / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as train_dataloader sets it: one thread per worker
    lm = LanguageModel("gsae-tiny")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"corpus.{args.format}"
        if args.format == "jsonl":
            with path.open("w") as f:
                for r in rows(seed=1, n=args.docs):
                    f.write(json.dumps(r) + "\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(list(rows(seed=1, n=args.docs))), str(path), row_group_size=1000)
        dm = TokenDataModule(lm, dataset=str(path), context_size=args.context_size, batch_size=args.batch_size)
        dm.validate()
        print(f"# {args.docs} documents, n_streams={dm.n_streams} ({dm.source().mode} mode), {args.workers} workers, "
              f"{args.batch_size}x{args.context_size} tokens per batch")
        per_world: dict[int, list[float]] = {w: [] for w in args.worlds}
        for r in range(args.rounds):
            for w in args.worlds:
                per_world[w].append(rank_tokens_per_s(dm, w, args))
            ref = per_world[args.worlds[0]][-1]
            print("# round", r, " ".join(f"W{w}={per_world[w][-1]:.0f} ratio={per_world[w][-1] / ref:.3f}" for w in args.worlds))
        med = {w: statistics.median(v) for w, v in per_world.items()}
        for w in args.worlds:
            print(f"rank_tokens_per_s_W{w}={med[w]:.0f}")
        for w in args.worlds[1:]:  # median of the per-round ratios: each round's pair ran under the same load
            ratios = [a / b for a, b in zip(per_world[w], per_world[args.worlds[0]])]
            print(f"scaling_W{w}={statistics.median(ratios):.3f}")
        if args.legacy:
            legacy = {w: legacy_rank_tokens_per_s(dm, w, args) for w in args.worlds}
            for w in args.worlds:
                print(f"legacy_rank_tokens_per_s_W{w}={legacy[w]:.0f}")
            for w in args.worlds[1:]:
                print(f"legacy_scaling_W{w}={legacy[w] / legacy[args.worlds[0]]:.3f}")

        fresh = TokenDataModule(lm, dataset=str(path), context_size=args.context_size, batch_size=args.batch_size)
        fresh.validate()
        t0 = time.perf_counter()
        val = fresh.val_batches_of()
        t1 = time.perf_counter()
        fresh.val_batches_of()
        t2 = time.perf_counter()
        print(f"# validation: {len(val)} batches x {fresh.val_batch_size} contexts from the first "
              f"{fresh.val_documents} documents")
        print(f"val_pass_s={t1 - t0:.3f}")
        print(f"val_pass_cached_s={t2 - t1:.6f}")


if __name__ == "__main__":
    main()
