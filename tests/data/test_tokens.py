"""Token stream: packing, DDP sharding, workers, exact resume, held-out validation, local sources, errors."""

from __future__ import annotations

import itertools
import json
import re

import pytest
import torch
from torch.utils.data import DataLoader

from gsae.data import DataSourceError, TokenDataModule
from gsae.data.tokens import TokenStream, local_data_files, pack, synthetic_context
from gsae.lm import BYTE_BOS


# ---------------------------------------------------------------------------------------------- pack
def test_pack_prepends_bos_and_separates_documents() -> None:
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    out = list(pack(iter(docs), context_size=4, bos=99, prepend_bos=True, separator=0))
    # stream 1 2 3 0 4 5 0 6 7 8 9 10, cut into bodies of 3 (BOS takes the 4th slot); the tail "10" is dropped
    assert out == [[99, 1, 2, 3], [99, 0, 4, 5], [99, 0, 6, 7], [99, 8, 9, 10]]
    assert all(len(c) == 4 for c in out)


def test_pack_without_bos_or_separator() -> None:
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    assert list(pack(iter(docs), 4, bos=99, prepend_bos=False, separator=None)) == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert list(pack(iter(docs), 3, bos=99, prepend_bos=False, separator=0)) == [
        [1, 2, 3], [0, 4, 5], [0, 6, 7], [8, 9, 10]
    ]
    # a long document spans several contexts; nothing is lost except the incomplete tail
    long = list(range(1, 101))
    out = list(pack(iter([long]), 10, bos=0, prepend_bos=True, separator=None))
    assert [t for c in out for t in c[1:]] == long[: 9 * len(out)] and len(out) == 11


def test_synthetic_context_is_deterministic_and_keeps_bos_out_of_the_body() -> None:
    a = synthetic_context(5, 64, 257, seed=0, bos=BYTE_BOS, prepend_bos=True)
    assert a == synthetic_context(5, 64, 257, seed=0, bos=BYTE_BOS, prepend_bos=True)
    assert a != synthetic_context(6, 64, 257, seed=0, bos=BYTE_BOS, prepend_bos=True)
    assert a != synthetic_context(5, 64, 257, seed=1, bos=BYTE_BOS, prepend_bos=True)
    assert len(a) == 64 and a[0] == BYTE_BOS and BYTE_BOS not in a[1:]
    assert max(a[1:]) < 256
    assert len(synthetic_context(5, 64, 257, seed=0, bos=BYTE_BOS, prepend_bos=False)) == 64


# ---------------------------------------------------------------------------------------------- streams
@pytest.fixture(scope="module")
def synthetic_dm(tiny_lm) -> TokenDataModule:
    return TokenDataModule(lm=tiny_lm, dataset="synthetic", context_size=16, batch_size=4)


def _train_stream(dm: TokenDataModule, batch_size: int, **kw) -> TokenStream:
    return TokenStream(lambda start: dm.contexts("train", start), batch_size, **kw)


def _batches(stream, n: int) -> list:
    return list(itertools.islice(iter(stream), n))


def test_ranks_partition_the_single_process_batches(synthetic_dm) -> None:
    world1 = _batches(_train_stream(synthetic_dm, 4), 5)
    rank0 = _batches(_train_stream(synthetic_dm, 2, rank=0, world_size=2), 5)
    rank1 = _batches(_train_stream(synthetic_dm, 2, rank=1, world_size=2), 5)
    for b, (w, r0, r1) in enumerate(zip(world1, rank0, rank1)):
        assert w.index == r0.index == r1.index == b
        assert w.tokens.shape == (4, 16) and r0.tokens.shape == r1.tokens.shape == (2, 16)
        rows0 = {tuple(r) for r in r0.tokens.tolist()}
        rows1 = {tuple(r) for r in r1.tokens.tolist()}
        assert not rows0 & rows1
        assert rows0 | rows1 == {tuple(r) for r in w.tokens.tolist()}
    # consecutive batches hold consecutive, distinct contexts
    all_rows = [tuple(r) for w in world1 for r in w.tokens.tolist()]
    assert len(set(all_rows)) == len(all_rows)


def test_dataloader_workers_keep_batches_and_order(synthetic_dm) -> None:
    stream = _train_stream(synthetic_dm, 3, max_batches=7)
    single = list(DataLoader(stream, batch_size=None, num_workers=0))
    multi = list(DataLoader(stream, batch_size=None, num_workers=2))
    assert [b.index for b in single] == list(range(7))
    assert [int(b.index) for b in multi] == list(range(7))
    for a, b in zip(single, multi):
        torch.testing.assert_close(a.tokens, b.tokens)


def test_start_batch_resumes_exactly(synthetic_dm) -> None:
    fresh = _batches(_train_stream(synthetic_dm, 3), 8)
    resumed = _batches(_train_stream(synthetic_dm, 3, start_batch=5), 3)
    assert [b.index for b in resumed] == [5, 6, 7]
    for a, b in zip(fresh[5:], resumed):
        torch.testing.assert_close(a.tokens, b.tokens)
    # also sharded and with workers
    fresh2 = _batches(_train_stream(synthetic_dm, 2, rank=1, world_size=2), 6)
    stream = _train_stream(synthetic_dm, 2, rank=1, world_size=2, start_batch=4, max_batches=6)
    resumed2 = list(DataLoader(stream, batch_size=None, num_workers=2))
    assert [int(b.index) for b in resumed2] == [4, 5]
    for a, b in zip(fresh2[4:], resumed2):
        torch.testing.assert_close(a.tokens, b.tokens)


def test_datamodule_resumes_from_its_state(synthetic_dm, tiny_lm) -> None:
    fresh = _batches(synthetic_dm.train_dataloader(), 6)
    dm = TokenDataModule(lm=tiny_lm, dataset="synthetic", context_size=16, batch_size=4)
    state = {**synthetic_dm.state_dict(), "consumed_batches": 4}
    for contexts in (4 * 4, None):  # recorded, or (older checkpoints) batches × this world
        dm.load_state_dict({**state, "consumed_contexts": contexts})
        resumed = _batches(dm.train_dataloader(), 2)
        assert [b.index for b in resumed] == [4, 5]
        for a, b in zip(fresh[4:], resumed):
            torch.testing.assert_close(a.tokens, b.tokens)
    with pytest.raises(ValueError, match="--data.batch_size"):
        dm.load_state_dict({"consumed_batches": 4, "batch_size": 8})


@pytest.mark.parametrize("saved_world, world, recorded", [(2, 1, True), (1, 2, True), (2, 3, True), (2, 2, False)])
def test_datamodule_resumes_on_another_number_of_ranks_at_the_global_context(tiny_lm, monkeypatch, saved_world, world,
                                                                               recorded):
    """A run of ``saved_world`` ranks stopped after 5 batches (5 × 4 × saved_world global contexts) and resumed on
    ``world`` ranks: together the new ranks read the next contexts, none skipped or repeated. A checkpoint that did
    not record its context count (``recorded`` false) was written by as many ranks as resume it."""
    start = 5 * 4 * saved_world
    firsts = []
    for rank in range(world):
        dm = TokenDataModule(lm=tiny_lm, dataset="synthetic", context_size=16, batch_size=4)
        monkeypatch.setattr(dm, "_rank_world", lambda r=rank: (r, world))
        dm.load_state_dict({"consumed_batches": 5, "consumed_contexts": start if recorded else None, "batch_size": 4,
                            "n_streams": dm.n_streams})
        firsts.append(_batches(dm.train_dataloader(), 2))
    read = [c for step in range(2) for rank in range(world) for c in firsts[rank][step].tokens.tolist()]
    expected = list(itertools.islice(dm.contexts("train", start), 2 * 4 * world))
    assert sorted(read) == sorted(expected)
    dm.consumed_batches = 7  # two more batches on each of the new ranks
    assert dm.consumed_contexts(world) == start + 2 * 4 * world
    assert dm.state_dict()["consumed_contexts"] == start + 2 * 4 * world  # what a checkpoint of this world records


def test_validation_batches_are_val_batch_size_rows_of_each_ranks_block(tiny_lm) -> None:
    """Rank r of W validates, in batch b, rows r, r + W, ... of held-out contexts b·V·W to (b+1)·V·W (V =
    val_batch_size, not batch_size); the batches are read once per (rank, world) and indexed 0, 1, ..."""
    held_out = list(itertools.islice(TokenDataModule(lm=tiny_lm, dataset="synthetic", context_size=16).contexts("val"), 24))
    dm = TokenDataModule(lm=tiny_lm, dataset="synthetic", context_size=16, batch_size=4, val_batch_size=3, val_batches=2)
    for world in (1, 2, 1):  # back to one rank after two: not the two-rank batches kept
        for rank in range(world):
            batches = dm.val_batches_of(rank, world)
            assert [int(b.index) for b in batches] == [0, 1]
            for b, batch in enumerate(batches):
                expected = [held_out[b * 3 * world + rank + world * j] for j in range(3)]
                assert batch.tokens.tolist() == expected, (world, rank, b)


def test_data_workers_leave_ctrl_c_and_sigterm_to_the_main_process(tiny_lm) -> None:
    """The training loader's workers ignore SIGINT and SIGTERM (the main process stops, saves and ends them), except
    a ``ddp_fork`` rank's workers, which keep SIGTERM (gsae.sigterm); without workers there is nothing to set up."""
    import signal
    from types import SimpleNamespace

    assert TokenDataModule(lm=tiny_lm, dataset="synthetic", batch_size=2).train_dataloader().worker_init_fn is None
    forking = type("_MultiProcessingLauncher", (), {})()
    for launcher, sigterm_ignored in ((None, True), (forking, False)):
        dm = TokenDataModule(lm=tiny_lm, dataset="synthetic", batch_size=2, num_workers=2)
        dm.trainer = SimpleNamespace(global_rank=0, world_size=1, strategy=SimpleNamespace(
            launcher=launcher, root_device=torch.device("cpu")))
        init = dm.train_dataloader().worker_init_fn
        saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            init(0)  # what each worker runs first
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert (signal.getsignal(signal.SIGTERM) is signal.SIG_IGN) is sigterm_ignored
        finally:
            for s, handler in saved.items():
                signal.signal(s, handler)


def test_synthetic_validation_never_equals_training(synthetic_dm) -> None:
    train = {tuple(c) for c in itertools.islice(synthetic_dm.contexts("train"), 400)}
    val = {tuple(c) for c in itertools.islice(synthetic_dm.contexts("val"), 100)}
    assert len(train) == 400 and len(val) == 100
    assert not train & val
    val_batches = list(synthetic_dm.val_dataloader())
    assert len(val_batches) == synthetic_dm.val_batches
    # the validation set is fixed: the same batches every time
    for a, b in zip(val_batches, synthetic_dm.val_dataloader()):
        torch.testing.assert_close(a.tokens, b.tokens)


# ---------------------------------------------------------------------------------------------- local files
N_DOCS = 60


def _documents() -> list[str]:
    """Documents of distinct random words, each tagged with its index (so a context shows whose text it holds)."""
    gen = torch.Generator().manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    docs = []
    for j in range(N_DOCS):
        n = 20 + 15 * (j % 4)
        words = "".join(letters[i] if i < 26 else " " for i in torch.randint(0, 31, (n,), generator=gen).tolist())
        docs.append(f"<doc{j:03d}> {words}")
    return docs


def _write(tmp_path, fmt: str, rows: list[dict]) -> str:
    path = tmp_path / f"corpus.{fmt}"
    if fmt == "txt":  # a folder of documents, one file each (and a hidden folder of copies, left out)
        path.mkdir()
        for i, r in enumerate(rows):
            (path / f"{i:04d}.txt").write_text(r["text"])
        (path / ".ipynb_checkpoints").mkdir()
        (path / ".ipynb_checkpoints" / "0000-checkpoint.txt").write_text("a stale copy")
    elif fmt == "lines.txt":  # one document per line (--data.text_unit line)
        path.write_text("\n".join(r["text"] for r in rows) + "\n")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def _doc_ids(contexts: list[list[int]]) -> set[int]:
    text = b"".join(bytes(t for t in c if t != BYTE_BOS) + b"|" for c in contexts)
    return {int(m) for m in re.findall(rb"<doc(\d{3})>", text)}


@pytest.mark.parametrize("fmt", ["txt", "lines.txt", "jsonl", "parquet", "saved", "saved-dict"])
def test_local_text_files_hold_out_the_first_documents(tmp_path, tiny_lm, fmt: str) -> None:
    rows = [{"text": d} for d in _documents()]
    if fmt.startswith("saved"):  # datasets' save_to_disk: a Dataset, or a DatasetDict read at --data.split
        import datasets

        path = str(tmp_path / "saved")
        ds = datasets.Dataset.from_list(rows)
        (datasets.DatasetDict({"train": ds, "test": ds.select([0])}) if fmt == "saved-dict" else ds).save_to_disk(path)
    else:
        path = _write(tmp_path, fmt, rows)
    unit = "line" if fmt == "lines.txt" else "document"
    dm = TokenDataModule(lm=tiny_lm, dataset=path, context_size=24, batch_size=2, val_documents=12, text_unit=unit)
    dm.validate()
    train, val = list(dm.contexts("train")), list(dm.contexts("val"))
    assert all(len(c) == 24 and c[0] == BYTE_BOS for c in train + val)
    train_ids, val_ids = _doc_ids(train), _doc_ids(val)
    assert train_ids and val_ids
    assert all(j >= 12 for j in train_ids)
    assert all(j < 12 for j in val_ids)
    assert not {tuple(c) for c in train} & {tuple(c) for c in val}
    # the whole training text, in order, separated by BOS/EOS (tail cut by packing)
    expected: list[int] = []
    for d in _documents()[12:]:
        expected += ([BYTE_BOS] if expected else []) + list(d.encode())
    assert [t for c in train for t in c[1:]] == expected[: 23 * len(train)]
    # and the held-out text is exactly the first 12 documents
    expected_val: list[int] = []
    for d in _documents()[:12]:
        expected_val += ([BYTE_BOS] if expected_val else []) + list(d.encode())
    assert [t for c in val for t in c[1:]] == expected_val[: 23 * len(val)]
    # resuming a re-packed source skips exactly
    assert list(dm.contexts("train", start=3)) == train[3:]


def test_a_folder_laid_out_as_a_hub_repository_trains_on_its_train_split(tmp_path, tiny_lm, caplog) -> None:
    """``data/{train,validation,test}-00000-of-00001.jsonl`` (a cloned or downloaded hub dataset): every file was read
    as training text, the test split included, and the held-out documents came from ``test-…``, which sorts first
    (audit G). The splits are the ones ``datasets`` finds; training and held-out documents come from train only."""
    docs = _documents()
    (tmp_path / "repo" / "data").mkdir(parents=True)
    parts = {"train": docs[:30], "validation": docs[30:35], "test": docs[35:40]}
    for split, rows in parts.items():
        (tmp_path / "repo" / "data" / f"{split}-00000-of-00001.jsonl").write_text(
            "".join(json.dumps({"text": d}) + "\n" for d in rows))
    with caplog.at_level("WARNING", logger="gsae.data.tokens"):
        dm = TokenDataModule(lm=tiny_lm, dataset=str(tmp_path / "repo"), context_size=24, batch_size=2, val_documents=6)
        dm.validate()
        train, val = list(dm.contexts("train")), list(dm.contexts("val"))
    assert set() < _doc_ids(train) <= set(range(6, 30)) and set() < _doc_ids(val) <= set(range(6))
    assert caplog.text.count("holds the splits test, train, validation: training reads its train split (1 files)") == 1
    # a plain folder of files (no split names) is all training text, as before
    (tmp_path / "plain").mkdir()
    for i, d in enumerate(docs[:3]):
        (tmp_path / "plain" / f"{i}.txt").write_text(d)
    assert len(local_data_files(str(tmp_path / "plain"))[1]) == 3


def test_pretokenized_input_ids(tmp_path, tiny_lm) -> None:
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 256, (int(n),), generator=gen).tolist()}
            for n in torch.randint(5, 40, (30,), generator=gen)]
    path = _write(tmp_path, "jsonl", rows)
    dm = TokenDataModule(lm=tiny_lm, dataset=path, context_size=16, batch_size=2, val_documents=6)
    dm.validate()
    train, val = list(dm.contexts("train")), list(dm.contexts("val"))
    # used as is: no tokenizer, no separators between rows, BOS prepended to each context
    stream = [t for r in rows[6:] for t in r["input_ids"]]
    assert [t for c in train for t in c[1:]] == stream[: 15 * len(train)]
    assert all(c[0] == BYTE_BOS for c in train)
    val_stream = [t for r in rows[:6] for t in r["input_ids"]]
    assert [t for c in val for t in c[1:]] == val_stream[: 15 * len(val)]
    # no text column is read from pretokenized rows: a resume with another --data.text_column reads the same documents
    other = TokenDataModule(lm=tiny_lm, dataset=path, context_size=16, batch_size=2, val_documents=6, text_column="body")
    other.validate()
    other.load_state_dict({**dm.state_dict(), "consumed_batches": 3})
    assert other.consumed_batches == 3


def test_local_data_edge_cases(tmp_path, tiny_lm) -> None:
    """What a researcher's own files hold: the same streams with streaming off (a small file used to leave stream 0
    with nothing), a .txt document keeping its newlines (one document per file; paragraphs and lines on request),
    null texts as empty documents, a text column of numbers, pretokenized ids of another vocabulary, and split names
    that do not exist (ignored before)."""
    rows = [{"text": d} for d in _documents()]
    path = _write(tmp_path, "jsonl", rows)

    def streams(**kw) -> list[list[list[int]]]:
        dm = TokenDataModule(lm=tiny_lm, dataset=path, context_size=24, batch_size=2, val_documents=4, **kw)
        dm.validate()
        src = dm.source()
        return [[toks for *_, toks in itertools.islice(src.stream_documents(s), 2)] for s in range(src.n_streams)]

    assert streams(streaming=False) == streams(streaming=True)

    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("Line one.\nLine two.\n\nPara two.\n")
    for unit, docs in (("document", ["Line one.\nLine two.\n\nPara two.\n"]),
                       ("paragraph", ["Line one.\nLine two.", "Para two.\n"]),
                       ("line", ["Line one.", "Line two.", "", "Para two."])):
        dm = TokenDataModule(lm=tiny_lm, dataset=str(folder), context_size=8, batch_size=1, val_documents=0,
                             n_streams=1, text_unit=unit)
        dm.validate()
        got = [bytes(d).decode() for d in dm.source().train_documents()]
        assert got[: len(docs)] == docs, (unit, got)

    nulls = tmp_path / "nulls.jsonl"
    nulls.write_text("".join(json.dumps({"text": None if i % 3 == 0 else f"doc {i}"}) + "\n" for i in range(12)))
    dm = TokenDataModule(lm=tiny_lm, dataset=str(nulls), context_size=8, batch_size=1, val_documents=0, n_streams=1)
    dm.validate()
    assert [bytes(d).decode() for d in dm.source().train_documents()][:4] == ["", "doc 1", "doc 2", ""]

    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text("".join(json.dumps({"text": i}) + "\n" for i in range(12)))
    dm = TokenDataModule(lm=tiny_lm, dataset=str(numbers), context_size=8, batch_size=1, val_documents=0, n_streams=1)
    dm.validate()
    with pytest.raises(DataSourceError, match="--data.text_column 'text': holds int values, not text"):
        list(dm.source().train_documents())

    foreign = tmp_path / "ids.jsonl"
    foreign.write_text("".join(json.dumps({"input_ids": [5, 300 + i, 7]}) + "\n" for i in range(12)))
    dm = TokenDataModule(lm=tiny_lm, dataset=str(foreign), context_size=8, batch_size=1, val_documents=0, n_streams=1)
    dm.validate()
    with pytest.raises(DataSourceError, match="token 300, outside the model's vocabulary of 257"):
        list(dm.source().train_documents())

    with pytest.raises(DataSourceError, match="--data.split 'test': local files .* have one split, 'train'"):
        TokenDataModule(lm=tiny_lm, dataset=path, split="test").validate()
    with pytest.raises(DataSourceError, match="--data.val_split: gsae-corpus has no splits"):
        TokenDataModule(lm=tiny_lm, dataset="gsae-corpus", val_split="validation").validate()


def test_text_column_option(tmp_path, tiny_lm) -> None:
    path = _write(tmp_path, "jsonl", [{"body": d, "other": 1} for d in _documents()])
    dm = TokenDataModule(lm=tiny_lm, dataset=path, text_column="body", context_size=24, val_documents=3)
    dm.validate()
    assert _doc_ids(list(dm.contexts("train")))


# ---------------------------------------------------------------------------------------------- errors
def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_local_path(tmp_path, tiny_lm) -> None:
    for path in (tmp_path / "nope.txt", tmp_path / "missing" / "dir"):
        dm = TokenDataModule(lm=tiny_lm, dataset=str(path))
        with pytest.raises(DataSourceError, match="--data.dataset") as exc:
            dm.validate()
        assert str(path) in _one_line(exc)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataSourceError, match="--data.dataset"):
        TokenDataModule(lm=tiny_lm, dataset=str(empty)).validate()


def test_dataset_without_text_column(tmp_path, tiny_lm) -> None:
    path = _write(tmp_path, "jsonl", [{"body": d} for d in _documents()])
    dm = TokenDataModule(lm=tiny_lm, dataset=path)
    with pytest.raises(DataSourceError, match="--data.text_column") as exc:
        dm.validate()
    assert "body" in _one_line(exc)


def test_context_size_larger_than_n_ctx(tiny_lm) -> None:
    dm = TokenDataModule(lm=tiny_lm, dataset="synthetic", context_size=tiny_lm.n_ctx + 1)
    with pytest.raises(ValueError, match="--data.context_size") as exc:
        dm.validate()
    assert str(tiny_lm.n_ctx) in _one_line(exc)
    TokenDataModule(lm=tiny_lm, dataset="synthetic", context_size=tiny_lm.n_ctx).validate()


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [(dict(context_size=1), "--data.context_size"), (dict(batch_size=0), "--data.batch_size"),
     (dict(val_documents=-1), "--data.val_documents"), (dict(n_streams=0), "--data.n_streams"),
     (dict(num_workers=-1), "--data.num_workers"), (dict(val_batches=-1), "--data.val_batches"),
     (dict(val_batch_size=0), "--data.val_batch_size")],  # 0 is not null: it must not fall back to batch_size
)
def test_invalid_options(kwargs: dict, option: str) -> None:
    with pytest.raises(ValueError, match=option.replace(".", r"\.")):
        TokenDataModule(dataset="synthetic", **kwargs)


def test_evaluation_contexts_spread_over_the_held_out_set(tiny_lm, tmp_path):
    """The benchmarks read contexts spread over the held-out documents, not the first ones (a few documents of
    OpenWebText): every 8th of the first 8·n held-out contexts; on a smaller held-out set, every 8th, then those
    halfway between, ...; synthetic: the first n. A benchmark takes the first contexts it needs, so they must not
    depend on how many the others ask for (evaluate.py --benchmarks loss_added and loss_added,dead_latents gave
    loss_added other contexts on a small set)."""
    import json

    from gsae.data import TokenDataModule

    dm = TokenDataModule(lm=tiny_lm, dataset="gsae-corpus", context_size=32)  # an endless held-out stream
    dm.validate()
    n = 10
    head = list(itertools.islice(dm.contexts("val"), 8 * n))
    picked = dm.evaluation_contexts(n)
    assert [head.index(c) for c in picked] == [8 * i for i in range(n)]
    assert dm.evaluation_contexts(3 * n)[:n] == picked
    path = tmp_path / "docs.jsonl"  # a finite held-out set, smaller than asked: all of it
    path.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(40)))
    local = TokenDataModule(lm=tiny_lm, dataset=str(path), context_size=32, val_documents=6, n_streams=1)
    local.validate()
    every = list(local.contexts("val"))
    m = len(every)
    assert 16 < m < 60 and sorted(local.evaluation_contexts(60)) == sorted(every)
    order = [every.index(c) for c in local.evaluation_contexts(60)]
    assert order == [i for r in (0, 4, 2, 6, 1, 5, 3, 7) for i in range(r, m, 8)]
    for small in (2, 5, m // 8 + 2, m - 1):  # the first contexts of any count, whatever the largest count asked
        assert all(local.evaluation_contexts(big)[:small] == local.evaluation_contexts(small) for big in (small + 1, m, 60))
    synthetic = TokenDataModule(lm=tiny_lm, dataset="synthetic", context_size=16)
    assert synthetic.evaluation_contexts(4) == list(itertools.islice(synthetic.contexts("val"), 4))


def test_held_out_packing_skips_empty_documents_as_training_does(tmp_path, monkeypatch) -> None:
    """Training's StreamPacker puts nothing for an empty document (a blank line, "" or null); the held-out packer put
    a separator, so validation and evaluation contexts held EOS EOS pairs training never shows (audit G)."""
    out = list(pack(iter([[5, 6], [], [7], [], [8, 8]]), 6, 0, False, 9))
    assert out == [[5, 6, 9, 7, 9, 8]]
    # and a path from a config, '~/corpus.txt' (no shell expands it there), is the user's file
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "corpus.txt").write_text("text")
    assert local_data_files("~/corpus.txt") == ("text", [str(tmp_path / "corpus.txt")])


def test_synthetic_context_never_draws_the_bos_id_even_from_a_tiny_vocabulary() -> None:
    """With BOS the last id of a 4-token vocabulary, a body drawn over all 4 ids would hold BOS about 1 token in 8;
    the body keeps to ids 0..2 (the 257-id test above almost never draws id 256 whatever the code does)."""
    bodies = [synthetic_context(i, 64, 4, seed=0, bos=3, prepend_bos=True)[1:] for i in range(20)]
    assert all(len(b) == 63 for b in bodies)
    assert {t for b in bodies for t in b} == {0, 1, 2}
    # a BOS id that is not the last one leaves the whole vocabulary to the body
    assert {t for i in range(20) for t in synthetic_context(i, 64, 4, seed=0, bos=0, prepend_bos=False)} == {0, 1, 2, 3}


def _numbered_contexts(n: int):
    """A finite source of ``n`` contexts, context ``i`` being ``[i, i]``: which contexts a batch holds is its rows."""
    return lambda start: iter([[i, i] for i in range(start, n)])


def test_token_stream_deals_contexts_to_ranks_by_index_and_ends_with_its_source() -> None:
    """Rank ``r`` of ``W`` takes the global contexts ``i ≡ r (mod W)`` of each batch (module docstring), batch ``b``
    is global contexts ``b·B·W .. (b+1)·B·W − 1``, a source that runs out ends the stream without a short batch, and
    ``max_batches`` is exclusive."""
    rows = lambda stream: [[r[0] for r in b.tokens.tolist()] for b in stream]  # noqa: E731
    assert rows(TokenStream(_numbered_contexts(10), 3)) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # context 9: no batch
    assert rows(TokenStream(_numbered_contexts(10), 3, max_batches=2)) == [[0, 1, 2], [3, 4, 5]]
    assert rows(TokenStream(_numbered_contexts(13), 2, rank=0, world_size=2)) == [[0, 2], [4, 6], [8, 10]]
    assert rows(TokenStream(_numbered_contexts(13), 2, rank=1, world_size=2)) == [[1, 3], [5, 7], [9, 11]]
    resumed = TokenStream(_numbered_contexts(13), 2, rank=1, world_size=2, start_batch=1)
    assert [b.index for b in resumed] == [1, 2] and rows(resumed) == [[5, 7], [9, 11]]


def test_token_stream_workers_keep_the_order_from_an_odd_start_batch() -> None:
    """Worker ``w`` of ``n`` builds the batches ``b ≡ start + w (mod n)``: from an odd start the DataLoader's
    round-robin still gives ``start, start+1, ...`` (a resume at batch 4 with 2 workers cannot tell)."""
    stream = TokenStream(_numbered_contexts(100), 2, start_batch=3, max_batches=8)
    got = list(DataLoader(stream, batch_size=None, num_workers=2))
    assert [int(b.index) for b in got] == [3, 4, 5, 6, 7]
    assert [[r[0] for r in b.tokens.tolist()] for b in got] == [[2 * b, 2 * b + 1] for b in range(3, 8)]


def test_local_data_files_sorts_a_glob_and_refuses_mixed_formats(tmp_path) -> None:
    """A glob's files are read in sorted order (the order the documents and shards are numbered in), whatever order
    they were written in; a folder of two formats is an error naming them, and a folder is a ``save_to_disk`` one
    only with both ``state.json`` and ``dataset_info.json``."""
    from gsae.data.tokens import saved_dataset

    names = [f"part-{i:02d}.txt" for i in (7, 3, 11, 0, 9, 1, 5, 10, 2, 8, 4, 6)]
    for name in names:
        (tmp_path / name).write_text(name)
    assert local_data_files(str(tmp_path / "part-*.txt")) == ("text", [str(tmp_path / n) for n in sorted(names)])
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("a")
    (mixed / "b.jsonl").write_text('{"text": "b"}\n')
    with pytest.raises(DataSourceError, match=r"must all be one of .*\['.jsonl', '.txt'\]"):
        local_data_files(str(mixed))
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text("{}")
    assert not saved_dataset(str(saved))  # a state.json alone is a JSON data file, not a saved dataset
    (saved / "dataset_info.json").write_text("{}")
    assert saved_dataset(str(saved))
