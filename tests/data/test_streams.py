"""Text sources as logical streams: per-stream packing against a naive reference, workers, ranks, resume,
held-out documents, shards, epochs, and the errors a bad source gives (one line, never an endless loop)."""

from __future__ import annotations

import itertools
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from gsae.data import DataSourceError, TokenDataModule
from gsae.data.sources import _corpus_train_index
from gsae.data.streams import StreamBatches
from gsae.data.tokens import pack
from gsae.lm import BYTE_BOS
from tests.data.test_tokens import _doc_ids, _documents, _write

S, V, T = 4, 8, 24


@pytest.fixture
def local(tmp_path, tiny_lm) -> TokenDataModule:
    path = _write(tmp_path, "jsonl", [{"text": d} for d in _documents()])
    dm = TokenDataModule(lm=tiny_lm, dataset=path, context_size=T, batch_size=2, n_streams=S, val_documents=V)
    dm.validate()
    return dm


def _reference_stream(s: int, n: int, docs: list[str] | None = None) -> list[list[int]]:
    """Stream ``s`` by hand: documents ``j >= V, j ≡ s (mod S)``, repeated epoch after epoch, packed by ``pack``."""
    mine = [list(d.encode()) for j, d in enumerate(docs or _documents()) if j >= V and j % S == s]
    return list(itertools.islice(pack(itertools.chain.from_iterable(itertools.repeat(mine)), T, BYTE_BOS, True, BYTE_BOS), n))


def _stream_doc_ids(contexts: list[list[int]]) -> set[int]:
    """Documents whose tag appears in consecutive contexts of one stream (bodies joined, so no tag is cut)."""
    text = bytes(t for c in contexts for t in c[1:] if t != BYTE_BOS)
    return {int(m) for m in re.findall(rb"<doc(\d{3})>", text)}


def _write_lines(path, docs: list[str]) -> None:
    """A jsonl file of ``docs``, one ``{"text": ...}`` row each."""
    Path(path).write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


def _four_shards(tmp_path) -> Path:
    """A folder of 4 jsonl files of 15 documents each (shard mode for 2 streams)."""
    docs = _documents()
    folder = tmp_path / "shards"
    folder.mkdir()
    for f in range(4):
        _write_lines(folder / f"part{f}.jsonl", docs[15 * f : 15 * f + 15])
    return folder


def _contexts(packer, n: int) -> list[list[int]]:
    return [packer.next_context() for _ in range(n)]


def _rows(batches) -> list[tuple[int, ...]]:
    return [tuple(r) for b in batches for r in b.tokens.tolist()]


# ---------------------------------------------------------------------------------------------- streams
def test_each_stream_packs_its_own_documents_and_repeats(local) -> None:
    assert local.source().mode == "documents"
    epoch_lengths = []
    for s in range(S):
        got = _contexts(local.open_stream(s), 40)  # several passes over the stream's ~13 documents
        assert got == _reference_stream(s, 40)
        ids = _stream_doc_ids(got)
        assert ids == {j for j in range(V, len(_documents())) if j % S == s}
        epoch_lengths.append(sum(len(d) + 1 for j, d in enumerate(_documents()) if j >= V and j % S == s) // (T - 1))
    packer = local.open_stream(0)
    _contexts(packer, 40)
    assert packer.state().epoch >= 2  # it wrapped around, deterministically
    # one pass over every stream covers each training document once, and no context is repeated
    first_pass = [c for s in range(S) for c in _contexts(local.open_stream(s), epoch_lengths[s] - 1)]
    assert len({tuple(c) for c in first_pass}) == len(first_pass)
    assert _doc_ids(first_pass) <= set(range(V, len(_documents())))


def test_stream_state_resumes_without_retokenizing(local) -> None:
    src = local.source()
    encoded: list[str] = []
    real_encode = src.encode
    src.encode = lambda texts: encoded.extend(texts) or real_encode(texts)
    for s, k in [(1, 0), (1, 5), (2, 17), (3, 29)]:
        packer = local.open_stream(s)
        _contexts(packer, k)
        state = packer.state()
        assert state.rest.numel() < T + max(len(d) for d in _documents()) + 1  # the carry-over is at most one document
        expected = _contexts(packer, 12)
        encoded.clear()
        resumed = local.open_stream(s, state)
        assert _contexts(resumed, 12) == expected == _reference_stream(s, k + 12)[k:]
        # only documents from the state's position on are tokenized again
        mine = [d for j, d in enumerate(_documents()) if j >= V and j % S == s]
        assert not set(encoded) & set(mine[: state.docs]) or state.epoch > 0


def test_streams_opened_together_share_one_pass_and_read_the_same(local, monkeypatch) -> None:
    import gsae.data.sources as sources

    passes = []
    real = sources.column_values
    monkeypatch.setattr(sources, "column_values", lambda *a, **kw: passes.append(kw.get("start")) or real(*a, **kw))
    # fresh streams, and streams resumed mid-epoch and in a later epoch
    states = {0: None, 1: None, 2: None, 3: None}
    for s in (1, 3):
        packer = local.open_stream(s)
        _contexts(packer, 7 if s == 1 else 60)
        states[s] = packer.state()
    assert states[3].epoch >= 1 and states[1].epoch == 0
    passes.clear()
    together = local.open_streams(states)
    got = {s: _contexts(p, 30) for s, p in together.items()}
    n_shared = len(passes)
    for s, st in states.items():
        assert got[s] == _contexts(local.open_stream(s, st), 30), s
    assert n_shared <= 4 < len(passes)  # a few passes over the file for all four streams, not one per stream and epoch
    # streams all resumed in their third pass: the shared reading starts in that pass, as each stream's own does (it
    # started at the first pass, and read the whole source twice for nothing)
    for s in (1, 3):
        packer = local.open_stream(s)
        while int(packer.state().epoch) < 2:
            packer.next_context()
        _contexts(packer, 3)
        states[s] = packer.state()
    later = {s: states[s] for s in (1, 3)}
    passes.clear()
    got = {s: _contexts(p, 10) for s, p in local.open_streams(later).items()}
    n_shared = len(passes)
    alone = []
    for s, st in later.items():
        passes.clear()
        assert got[s] == _contexts(local.open_stream(s, st), 10), s
        alone.append(len(passes))
    assert n_shared <= max(alone), (n_shared, alone)


@pytest.mark.parametrize("workers", [2, 4])
def test_workers_give_the_same_batches(local, workers: int) -> None:
    single = list(itertools.islice(iter(local.train_dataloader()), 12))
    local.num_workers = workers
    multi = list(itertools.islice(iter(local.train_dataloader()), 12))
    assert [b.index for b in single] == list(range(12)) == [int(b.index) for b in multi]
    assert [b.state.stream for b in single] == [b % S for b in range(12)] == [int(b.state.stream) for b in multi]
    for a, b in zip(single, multi):
        torch.testing.assert_close(a.tokens, b.tokens)
    # batch b holds the next contexts of stream b mod S
    assert [list(r) for r in single[5].tokens.tolist()] == _reference_stream(1, 4)[2:4]


def test_ranks_read_disjoint_streams_whose_union_is_one_rank(local) -> None:
    one = list(itertools.islice(StreamBatches(local.open_streams, S, 2), 16))
    ranks = [
        list(itertools.islice(iter(DataLoader(StreamBatches(local.open_streams, S, 1, r, 2), batch_size=None, num_workers=2)), 16))
        for r in range(2)
    ]
    assert {int(b.state.stream) for b in ranks[0]} == {0, 2} and {int(b.state.stream) for b in ranks[1]} == {1, 3}
    r0, r1 = _rows(ranks[0]), _rows(ranks[1])
    assert not set(r0) & set(r1)
    assert sorted(r0 + r1) == sorted(_rows(one))  # the same contexts, none lost or repeated


def test_training_says_once_when_its_data_starts_to_repeat(local, tiny_lm, caplog) -> None:
    """Rank 0's training loop says once when the first stream starts its second pass (said from the batches' stream
    states, so once whatever the number of workers), and when one pass of a stream is shorter than a batch."""
    from types import SimpleNamespace

    def run(dm, n: int, rank: int = 0) -> list[str]:
        dm.trainer = None
        batches = list(itertools.islice(iter(dm.train_dataloader()), n))
        dm.trainer = SimpleNamespace(training=True, global_rank=rank, lightning_module=None)  # the loop's hook
        caplog.clear()
        with caplog.at_level("WARNING", logger="gsae.data.datamodule"):
            for b in batches:
                dm.on_before_batch_transfer(b, 0)
        return [r.getMessage() for r in caplog.records if "starts again" in r.getMessage()]

    # each stream's pass, by its packer: batch b reads 2 contexts of stream b mod S, so stream s ends its pass at the
    # batch that needs its context number passes[s] + 1
    passes = []
    for s in range(S):
        packer = local.open_stream(s)
        n = 0
        while int(packer.state().epoch) == 0:
            packer.next_context()
            n += 1
        passes.append(n - 1)
    first = min(range(64), key=lambda b: (2 * (b // S + 1) <= passes[b % S], b))
    assert run(local, first) == []  # no stream has ended yet
    said = run(local, 64)
    assert len(said) == 1, said
    assert f"stream {first % S} of {S} has been read to its end" in said[0] and "shorter than a batch" not in said[0]
    assert run(local, 64) == []  # said once

    big = TokenDataModule(lm=tiny_lm, dataset=local.dataset, context_size=T, batch_size=3 * max(passes), n_streams=S,
                          val_documents=V)
    said = run(big, 1)
    assert len(said) == 1 and f"shorter than a batch (--data.batch_size {3 * max(passes)})" in said[0], said
    other = TokenDataModule(lm=tiny_lm, dataset=local.dataset, context_size=T, batch_size=2, n_streams=S, val_documents=V)
    assert run(other, 64, rank=1) == []  # rank 0 only

    folder = local.dataset + ".shards"  # 3 files on 2 streams: stream 0 holds two, stream 1 one
    os.mkdir(folder)
    docs = _documents()
    for f in range(3):
        _write_lines(f"{folder}/part{f}.jsonl", docs[15 * f : 15 * f + 15])
    sharded = TokenDataModule(lm=tiny_lm, dataset=folder, context_size=T, batch_size=2, n_streams=2, val_documents=5)
    assert sharded.source().mode == "shards"
    said = run(sharded, 200)
    assert len(said) == 1 and "stream 1 of 2 has been read to its end" in said[0], said
    assert "its 3 shards are dealt 2 to stream 0 and 1 to the others" in said[0] and "--data.n_streams dividing 3" in said[0]


def test_assignment_errors_name_the_option(local) -> None:
    local.num_workers = 3
    with pytest.raises(ValueError, match=r"--data\.num_workers \(3\)"):
        local.train_dataloader()
    with pytest.raises(ValueError, match=r"--data\.n_streams \(4\).*\(3"):
        StreamBatches(local.open_streams, S, 2, 0, 3)


def test_datamodule_state_round_trip(local, tiny_lm) -> None:
    fresh = list(itertools.islice(iter(local.train_dataloader()), 11))
    batches = fresh[:7]
    for b in batches[:5]:  # consumed; the last two were only prefetched
        local.consumed_batches = b.index + 1
        local.stream_states[b.state.stream] = b.state
    state = local.state_dict()
    assert state["consumed_batches"] == 5 and len(state["streams"]) == S
    dm = TokenDataModule(lm=tiny_lm, dataset=local.dataset, context_size=T, batch_size=2, n_streams=S, val_documents=V)
    dm.load_state_dict(state)
    dm.num_workers = 2
    resumed = list(itertools.islice(iter(dm.train_dataloader()), 6))
    assert [int(b.index) for b in resumed] == list(range(5, 11))
    for a, b in zip(fresh[5:], resumed):
        torch.testing.assert_close(a.tokens, b.tokens)
    with pytest.raises(ValueError, match="--data.n_streams"):
        TokenDataModule(lm=tiny_lm, dataset=local.dataset, batch_size=2, n_streams=8).load_state_dict(state)
    with pytest.raises(ValueError, match=r"--data.text_unit \(line\) differs from the checkpoint's \(document\)"):
        TokenDataModule(lm=tiny_lm, dataset=local.dataset, batch_size=2, n_streams=S, text_unit="line").load_state_dict(state)


def test_a_resume_on_other_data_is_refused_but_the_same_data_moved_goes_on(local, tiny_lm, tmp_path, caplog) -> None:
    """The saved stream positions (shard, document, tokens left) are positions in one data: a resume whose options
    make them point at other documents (another file, split, held-out count, hub download mode, generator seed) is
    refused with one line naming the option; the same file at another path, and a new context size (positions are
    in tokens), go on."""
    import logging
    import shutil

    batches = list(itertools.islice(iter(local.train_dataloader()), 3))
    for b in batches:
        local.consumed_batches = b.index + 1
        local.stream_states[b.state.stream] = b.state
    state = local.state_dict()

    def resume(dataset=local.dataset, **kw) -> TokenDataModule:
        dm = TokenDataModule(lm=tiny_lm, dataset=dataset, batch_size=2, n_streams=S, **{"val_documents": V, **kw})
        dm.load_state_dict(state)
        return dm

    with pytest.raises(ValueError, match=rf"--data.val_documents \({V + 1}\) differs from the checkpoint's \({V}\)"):
        resume(val_documents=V + 1)  # one document more held out: every stream's documents shift
    other = tmp_path / "other.jsonl"
    shutil.copy(local.dataset, other)
    with pytest.raises(ValueError, match=r"--data.dataset .*other.jsonl.* resume with --data.dataset"):
        resume(str(other))
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(local.dataset, moved / os.path.basename(local.dataset))
    with caplog.at_level(logging.INFO):
        assert resume(str(moved / os.path.basename(local.dataset)), context_size=T // 2).consumed_batches == 3
    assert "taken as the same data, moved" in caplog.text
    (moved / os.path.basename(local.dataset)).write_text(open(local.dataset).read() + json.dumps({"text": "one document more"}) + "\n")
    with pytest.raises(ValueError, match=r"--data.dataset .* holds \d+ bytes of data files, the checkpoint's .* held "
                                         r"\d+: other text"):  # the same name, other text
        resume(str(moved / os.path.basename(local.dataset)))
    for dataset, saved, now in (("synthetic", {"seed": 0}, {"seed": 1}),
                                ("Skylion007/openwebtext", {"streaming": True}, {"streaming": False}),
                                ("Skylion007/openwebtext", {"split": "train"}, {"split": "validation"})):
        hub = TokenDataModule(lm=tiny_lm, dataset=dataset, batch_size=2, n_streams=S, **now)  # not opened
        state = {"consumed_batches": 1, "batch_size": 2, "n_streams": S,
                 "position_options": {**hub.position_options(), **saved}}
        (key,) = saved
        with pytest.raises(ValueError, match=rf"--data.{key} .* differs from the checkpoint's"):
            hub.load_state_dict(state)


def test_what_a_resume_checks_is_what_names_the_documents(tmp_path, tiny_lm) -> None:
    """A folder moved, named with a trailing slash, is the same data; a hub dataset of another owner with the same name
    is not; ``gsae-corpus`` is its seed's text; the held-out count of a run with its own ``val_split`` is not checked
    (no training document is held out)."""
    import shutil

    folder = _four_shards(tmp_path)
    dm = TokenDataModule(lm=tiny_lm, dataset=str(folder), context_size=T, batch_size=2, n_streams=2, val_documents=5)
    dm.validate()
    dm.consumed_batches = 2
    state = dm.state_dict()
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copytree(folder, moved / folder.name)
    again = TokenDataModule(lm=tiny_lm, dataset=str(moved / folder.name) + "/", context_size=T, batch_size=2, n_streams=2,
                            val_documents=5)
    again.load_state_dict(state)
    assert again.consumed_batches == 2

    def hub_state(**kw) -> dict:
        hub = TokenDataModule(lm=tiny_lm, batch_size=2, n_streams=S, **kw)  # not opened
        return {"consumed_batches": 1, "batch_size": 2, "n_streams": S, "position_options": hub.position_options()}

    saved = hub_state(dataset="someone/openwebtext")
    with pytest.raises(ValueError, match=r"--data.dataset \(Skylion007/openwebtext\) differs from the checkpoint's"):
        TokenDataModule(lm=tiny_lm, dataset="Skylion007/openwebtext", batch_size=2, n_streams=S).load_state_dict(saved)
    saved = hub_state(dataset="gsae-corpus", seed=0)
    with pytest.raises(ValueError, match=r"--data.seed \(1\) differs from the checkpoint's \(0\)"):
        TokenDataModule(lm=tiny_lm, dataset="gsae-corpus", seed=1, batch_size=2, n_streams=S).load_state_dict(saved)
    saved = hub_state(dataset="Skylion007/openwebtext", val_split="validation", val_documents=1000)
    resumed = TokenDataModule(lm=tiny_lm, dataset="Skylion007/openwebtext", val_split="validation", val_documents=10,
                              batch_size=2, n_streams=S)
    resumed.load_state_dict(saved)
    assert resumed.consumed_batches == 1


def test_streams_resume_on_another_number_of_ranks(local, tiny_lm, monkeypatch) -> None:
    """Two ranks read 3 batches each (their streams 0, 2 and 1, 3), then one rank resumes from their joint state
    (the checkpoint gathers every rank's streams): every stream goes on where it stopped, none skipped or repeated."""
    seen: dict[int, list] = {s: [] for s in range(S)}
    states = {}
    for rank in range(2):
        dm = TokenDataModule(lm=tiny_lm, dataset=local.dataset, context_size=T, batch_size=2, n_streams=S, val_documents=V)
        monkeypatch.setattr(dm, "_rank_world", lambda r=rank: (r, 2))
        for b in itertools.islice(iter(dm.train_dataloader()), 3):
            seen[int(b.state.stream)] += b.tokens.tolist()
            states[int(b.state.stream)] = b.state
    local.stream_states, local.consumed_batches = states, 3
    dm = TokenDataModule(lm=tiny_lm, dataset=local.dataset, context_size=T, batch_size=2, n_streams=S, val_documents=V)
    dm.load_state_dict(local.state_dict())
    for b in itertools.islice(iter(dm.train_dataloader()), 8):
        seen[int(b.state.stream)] += b.tokens.tolist()
    for s in range(S):
        assert seen[s] == _reference_stream(s, len(seen[s])), f"stream {s}"
    assert sum(len(v) for v in seen.values()) == (2 * 3 + 8) * 2


# ---------------------------------------------------------------------------------------------- shards, corpus
def test_a_source_with_enough_shards_gives_each_stream_its_files(tmp_path, tiny_lm) -> None:
    folder = _four_shards(tmp_path)
    dm = TokenDataModule(lm=tiny_lm, dataset=str(folder), context_size=T, batch_size=2, n_streams=2, val_documents=5)
    dm.validate()
    assert dm.source().mode == "shards"
    ids = [_stream_doc_ids(_contexts(dm.open_stream(s), 100)) for s in range(2)]  # more than a pass
    assert ids[0] == set(range(5, 15)) | set(range(30, 45))  # files 0 and 2, the held-out head of file 0 skipped
    assert ids[1] == set(range(15, 30)) | set(range(45, 60))  # files 1 and 3
    # a stream resumed in its second shard opens that shard directly: the finished one is not read again
    packer = dm.open_stream(0)
    while packer.state().shard == 0:
        packer.next_context()
    state, expected = packer.state(), _contexts(packer, 5)
    assert state.epoch == 0 and state.shard == 1
    (folder / "part0.jsonl").rename(folder / "gone")
    assert _contexts(dm.open_stream(0, state), 5) == expected
    (folder / "gone").rename(folder / "part0.jsonl")
    val = [t for c in dm.contexts("val") for t in c[1:]]
    head = [t for d in _documents()[:5] for t in [BYTE_BOS, *d.encode()]][1:]  # the first 5 documents of file 0, separated
    assert val and val == head[: len(val)] and len(head) - len(val) < T


def test_a_parquet_file_is_cut_by_row_groups(tmp_path, tiny_lm) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": d} for d in _documents()]), str(path), row_group_size=10)
    dm = TokenDataModule(lm=tiny_lm, dataset=str(path), context_size=T, batch_size=2, n_streams=2, val_documents=5)
    dm.validate()
    assert dm.source().mode == "shards" and dm.source().ds.num_shards == 6
    ids = [_stream_doc_ids(_contexts(dm.open_stream(s), 100)) for s in range(2)]
    assert ids[0] == set(range(5, 10)) | set(range(20, 30)) | set(range(40, 50))  # row groups 0, 2, 4
    assert ids[1] == set(range(10, 20)) | set(range(30, 40)) | set(range(50, 60))


def test_gsae_corpus_streams_generate_their_documents(tiny_lm) -> None:
    from gsae.tinylm.corpus import document

    assert [_corpus_train_index(i) for i in (0, 998, 999, 1997, 1998)] == [1, 999, 1001, 1999, 2001]
    assert all(_corpus_train_index(i) % 1000 for i in range(5000))
    dm = TokenDataModule(lm=tiny_lm, dataset="gsae-corpus", context_size=T, n_streams=S)
    docs = [list(document(0, _corpus_train_index(2 + k * S)).encode()) for k in range(3)]
    assert _contexts(dm.open_stream(2), 5) == list(itertools.islice(pack(iter(docs), T, BYTE_BOS, True, BYTE_BOS), 5))
    val = [list(document(0, 1000 * i).encode()) for i in range(2)]
    assert list(itertools.islice(dm.contexts("val"), 3)) == list(itertools.islice(pack(iter(val), T, BYTE_BOS, True, BYTE_BOS), 3))


# ---------------------------------------------------------------------------------------------- validation
def test_validation_reads_only_the_held_out_documents_once(local) -> None:
    src = local.source()
    encoded: list[str] = []
    real_encode = src.encode
    src.encode = lambda texts: encoded.extend(texts) or real_encode(texts)
    local.val_batches = 1
    first = local.val_batches_of()
    assert len(first) == 1 and first[0].tokens.shape == (2, T)
    assert set(encoded) <= set(_documents()[:V])
    encoded.clear()
    again = local.val_batches_of()
    assert encoded == [] and again is first


def test_small_validation_set_warns_with_the_numbers(local) -> None:
    local.val_batch_size, local.val_batches = 4, 50
    n_val = len(list(local.contexts("val")))
    with pytest.warns(UserWarning, match=rf"gives {n_val} contexts, fewer than the 200 asked.*validating on {n_val // 4} batches"):
        batches = local.val_batches_of()
    assert len(batches) == n_val // 4 > 0
    local.val_batches, local._val_cache = n_val // 4 + 1, None  # one batch short: said too
    with pytest.warns(UserWarning, match=rf"gives {n_val} contexts, fewer than the {4 * (n_val // 4 + 1)} asked"):
        assert len(local.val_batches_of()) == n_val // 4
    local.val_batches, local._val_cache = n_val // 4, None  # all there: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(local.val_batches_of()) == n_val // 4


# ---------------------------------------------------------------------------------------------- errors
def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "--data.dataset" in msg
    return msg


def test_empty_file_is_a_one_line_error(tmp_path, tiny_lm) -> None:
    for name, content in [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.txt", "")]:
        path = tmp_path / name
        path.write_text(content)
        dm = TokenDataModule(lm=tiny_lm, dataset=str(path), val_documents=0)
        with pytest.raises(DataSourceError) as exc:
            dm.validate()
            dm.train_dataloader()
        assert str(path) in _one_line(exc)


def test_val_split_of_local_files_is_an_error(local, tiny_lm) -> None:
    dm = TokenDataModule(lm=tiny_lm, dataset=local.dataset, val_split="validation")
    with pytest.raises(DataSourceError, match="--data.val_split.*--data.val_documents"):
        dm.validate()


def test_a_source_without_a_context_fails_instead_of_looping(tmp_path, tiny_lm) -> None:
    path = _write(tmp_path, "jsonl", [{"text": d} for d in _documents()])
    # everything held out
    dm = TokenDataModule(lm=tiny_lm, dataset=path, n_streams=2, val_documents=len(_documents()))
    dm.validate()
    with pytest.raises(DataSourceError, match="no training document") as exc:
        dm.train_dataloader()
    _one_line(exc)
    # documents too short for one context in a whole pass (tested in the main process, before any worker starts)
    short = _write(tmp_path, "txt", [{"text": "ab"}] * 5)
    dm = TokenDataModule(lm=tiny_lm, dataset=short, context_size=64, n_streams=2, val_documents=0, num_workers=2)
    dm.validate()
    with pytest.raises(DataSourceError, match="no complete 64-token context") as exc:
        dm.train_dataloader()
    _one_line(exc)


def test_resume_on_another_number_of_ranks_continues_every_stream(local) -> None:
    """The checkpoint holds each stream's position, so 1 rank's run may continue on 2 ranks: nothing replayed or skipped."""
    consumed = list(itertools.islice(StreamBatches(local.open_streams, S, 2), 6))  # streams 0, 1 twice; 2, 3 once
    states = {b.state.stream: b.state for b in consumed}
    for r in range(2):
        cont = list(itertools.islice(StreamBatches(local.open_streams, S, 2, r, 2, start_batch=6, states=states), 4))
        for j, b in enumerate(cont):
            s = int(b.state.stream)
            assert s % 2 == r
            done = sum(1 for c in consumed + cont[:j] if c.state.stream == s)  # batches of stream s before this one
            assert [list(x) for x in b.tokens.tolist()] == _reference_stream(s, 2 * done + 2)[2 * done :]


def test_empty_documents_are_skipped_in_packing() -> None:
    """Blank lines and empty texts are no documents: they added a separator each, so a stream of them packed
    contexts of separators only (trained on, looping epoch after epoch) or failed as "no complete context"."""
    from gsae.data.streams import StreamPacker

    docs = [[], [5, 6], [], [7, 8, 9], []]

    def documents(stream, epoch, shard, start):
        for e in itertools.count(epoch):
            for i in range(start if e == epoch else 0, len(docs)):
                yield e, 0, i, docs[i]

    p = StreamPacker(0, documents, context_size=4, bos=1, prepend_bos=True, separator=0)
    got = [p.next_context() for _ in range(4)]
    assert got == [[1, 5, 6, 0], [1, 7, 8, 9], [1, 0, 5, 6], [1, 0, 7, 8]]  # one separator between documents
    empties = StreamPacker(3, lambda s, e, sh, d: ((x, 0, i, []) for x in itertools.count(e) for i in range(4)),
                           context_size=4, bos=1, prepend_bos=True, separator=0, dataset="blank.txt")
    with pytest.raises(DataSourceError, match=r"stream 3 of 'blank.txt' gives no complete 4-token context \(every "
                                              r"document of it is empty"):
        empties.next_context()


def test_column_values_keep_their_step_across_read_batches():
    """A strided read (a document-mode stream's every S-th row) crosses pyarrow's 1024-row read batches at the right
    row: every test source had fewer rows than one batch."""
    import datasets

    from gsae.data.sources import column_values

    ds = datasets.Dataset.from_dict({"text": [str(i) for i in range(3000)]}).to_iterable_dataset()
    assert [int(v) for v in column_values(ds, "text", start=2, step=3)] == list(range(2, 3000, 3))


def test_a_stream_resumed_with_nothing_carried_over_separates_its_next_document():
    """Stopped exactly at a document's end (no tokens carried over), the resumed stream still puts the separator
    before its next document, as the uninterrupted one does (only the stream's very first document has none)."""
    from gsae.data.streams import StreamPacker

    docs = [[10 + j] * 6 for j in range(40)]

    def documents(s, epoch, shard, start):
        for e in itertools.count(epoch):
            for i in range(start if e == epoch else 0, len(docs)):
                yield e, 0, i, docs[i]

    whole = StreamPacker(0, documents, 7, 1, True, 0)  # body 6: the first context is the first document exactly
    assert whole.next_context() == [1, *docs[0]]
    state = whole.state()
    assert state.rest.numel() == 0 and state.docs == 1
    rest = [whole.next_context() for _ in range(4)]
    assert rest[0] == [1, 0, *docs[1][:5]]  # the separator, then the next document
    resumed = StreamPacker(0, documents, 7, 1, True, 0, state=state)
    assert [resumed.next_context() for _ in range(4)] == rest


def test_a_shard_mode_resume_restores_each_streams_shard(tmp_path, tiny_lm):
    """Through the data module's own state_dict / load_state_dict, a shard-mode stream continues in the shard it had
    reached (the resume tests went through packer states only)."""
    folder = _four_shards(tmp_path)
    kw = dict(lm=tiny_lm, dataset=str(folder), context_size=T, batch_size=2, n_streams=2, val_documents=5)
    dm = TokenDataModule(**kw)
    dm.validate()
    packer = dm.open_stream(0)
    while packer.state().shard == 0:
        packer.next_context()
    dm.stream_states[0] = packer.state()
    expected = _contexts(packer, 5)
    again = TokenDataModule(**kw)
    again.load_state_dict(dm.state_dict())
    again.validate()
    assert int(again.stream_states[0].shard) == 1
    assert _contexts(again.open_stream(0, again.stream_states[0]), 5) == expected


def test_a_resume_already_in_a_second_pass_does_not_say_again_that_the_data_repeats(tmp_path, tiny_lm, caplog):
    import logging
    from types import SimpleNamespace

    from gsae.data.batch import StreamState

    path = _write(tmp_path, "jsonl", [{"text": d} for d in _documents()])
    dm = TokenDataModule(lm=tiny_lm, dataset=path, context_size=T, batch_size=2, n_streams=S, val_documents=V)
    dm.validate()
    dm.trainer = SimpleNamespace(training=True, global_rank=0, lightning_module=None)
    dm.stream_states[0] = StreamState(0, 1, 0, 2, torch.tensor([], dtype=torch.long))  # loaded: in its second pass
    later = StreamState(0, 1, 0, 3, torch.tensor([], dtype=torch.long))
    with caplog.at_level(logging.WARNING, logger="gsae.data.datamodule"):
        dm.say_if_data_repeats(later, dm.stream_states.get(0), 0)
    assert not [r for r in caplog.records if "starts again" in r.getMessage()]
    # a resumed run's first batch of a stream that had no saved position is not a fresh run's first batch: the pass
    # it ends is not said to be shorter than a batch
    resumed = TokenDataModule(lm=tiny_lm, dataset=path, context_size=T, batch_size=2, n_streams=S, val_documents=V)
    resumed.load_state_dict({"consumed_batches": 40, "batch_size": 2, "n_streams": S, "streams": [None] * S})
    with caplog.at_level(logging.WARNING, logger="gsae.data.datamodule"):
        resumed.say_if_data_repeats(later, None, 0)
    said = [r.getMessage() for r in caplog.records if "starts again" in r.getMessage()]
    assert len(said) == 1 and "shorter than a batch" not in said[0], said


def test_a_checkpoint_without_its_context_count_resumes_at_this_worlds_count(tiny_lm):
    """A data-module state that did not record its consumed contexts (older checkpoints) was written at the world
    size the run resumes at: its batches count × batch size × that world."""
    dm = TokenDataModule(lm=tiny_lm, dataset="synthetic", context_size=T, batch_size=2)
    dm.load_state_dict({"consumed_batches": 3})
    assert dm.consumed_contexts(1) == 6 and dm.consumed_contexts(2) == 12
    dm.consumed_batches = 5  # two more batches on this run's 2 ranks
    assert dm.consumed_contexts(2) == 20


def _byte_encode(texts: list[str]) -> list[list[int]]:
    """A byte-level tokenizer for :class:`TextSource`: each text's UTF-8 bytes."""
    return [list(t.encode()) for t in texts]


def _texts(documents) -> list[str]:
    """Byte-encoded documents as their texts."""
    return [bytes(t).decode() for t in documents]


def _first_pass(src, s: int) -> list[str]:
    """The texts of stream ``s``'s first pass (epoch 0) over ``src``."""
    return _texts(t for *_, t in itertools.takewhile(lambda d: d[0] == 0, src.stream_documents(s)))


def test_column_values_start_and_limit_across_read_batches():
    """A start on a read batch's first row, and a limit reached in a later read batch (held-out prefixes of
    more than 1024 documents), give exactly the rows asked for; a limit of 0 gives none."""
    import datasets

    from gsae.data.sources import column_values

    ds = datasets.Dataset.from_dict({"text": [str(i) for i in range(3000)]}).to_iterable_dataset()
    assert [int(v) for v in column_values(ds, "text", start=1024)] == list(range(1024, 3000))
    assert [int(v) for v in column_values(ds, "text", start=2048, step=5)] == list(range(2048, 3000, 5))
    assert [int(v) for v in column_values(ds, "text", limit=1500)] == list(range(1500))
    assert [int(v) for v in column_values(ds, "text", start=10, step=2, limit=700)] == list(range(10, 1410, 2))
    assert list(column_values(ds, "text", limit=0)) == []


def _endless(docs: list[list[int]], last_epoch: int = 10**9):
    """``stream_documents`` of a stream of ``docs`` repeated epoch after epoch (a loop past ``last_epoch`` fails)."""

    def documents(stream, epoch, shard, start):
        for e in itertools.count(epoch):
            if e > last_epoch:
                raise RuntimeError("the packer kept reading pass after pass")
            for i in range(start if e == epoch else 0, len(docs)):
                yield e, 0, i, docs[i]

    return documents


def test_stream_packer_without_bos_fills_whole_contexts():
    """``prepend_bos`` off: every context is ``context_size`` tokens of the stream, separators between documents."""
    from gsae.data.streams import StreamPacker

    p = StreamPacker(0, _endless([[5, 6, 7], [8, 9]]), context_size=4, bos=1, prepend_bos=False, separator=0)
    # the stream: 5 6 7 0 8 9 0 5 6 7 0 8 9 0 ...
    assert [p.next_context() for _ in range(4)] == [[5, 6, 7, 0], [8, 9, 0, 5], [6, 7, 0, 8], [9, 0, 5, 6]]


def test_a_pass_of_exactly_one_context_packs_it_and_reads_no_further():
    """A stream whose one pass is exactly one context's body gives that context, says its position is still in the
    first pass (nothing of the second read yet), and goes on into the next pass."""
    from gsae.data.streams import StreamPacker

    p = StreamPacker(0, _endless([[5, 6, 7]]), context_size=4, bos=1, prepend_bos=True, separator=0)
    assert p.next_context() == [1, 5, 6, 7]
    state = p.state()
    assert (int(state.epoch), int(state.docs), state.rest.tolist()) == (0, 1, [])
    assert [p.next_context() for _ in range(3)] == [[1, 0, 5, 6], [1, 7, 0, 5], [1, 6, 7, 0]]


def test_a_stream_resumed_mid_pass_fails_on_a_later_pass_without_a_context():
    """A stream resumed in the middle of a pass whose passes give no context (a resume with a larger
    --data.context_size) still fails once a whole pass made nothing, instead of reading pass after pass forever."""
    from gsae.data.batch import StreamState
    from gsae.data.streams import StreamPacker

    state = StreamState(0, 0, 0, 1, torch.tensor([5], dtype=torch.long))
    p = StreamPacker(0, _endless([[5], [6], [7]], last_epoch=4), context_size=64, bos=1, prepend_bos=True,
                     separator=0, state=state, dataset="short.txt")
    with pytest.raises(DataSourceError, match="stream 0 of 'short.txt' gives no complete 64-token context") as exc:
        p.next_context()
    assert "empty" not in str(exc.value)  # its documents have tokens, too few: not told as blank lines


def test_a_resumed_stream_with_a_short_rest_of_its_pass_goes_on_into_the_next_pass():
    """Resumed near a pass's end (the rest of it shorter than a context), the stream reads on into the next pass:
    only a pass read from its start can tell that it gives no context."""
    from gsae.data.batch import StreamState
    from gsae.data.streams import StreamPacker

    docs = [[5] * 6, [6] * 6, [7, 7]]
    state = StreamState(0, 0, 0, 2, torch.tensor([], dtype=torch.long))  # the last, short document is next
    p = StreamPacker(0, _endless(docs), context_size=7, bos=1, prepend_bos=True, separator=0, state=state)
    # the stream from there: 0 7 7 | 0 5 5 5 5 5 5 0 6 6 6 6 6 6 0 7 7 ...
    assert [p.next_context() for _ in range(3)] == [[1, 0, 7, 7, 0, 5, 5], [1, 5, 5, 5, 5, 0, 6], [1, 6, 6, 6, 6, 6, 0]]


def test_a_long_stream_packs_every_token_once_past_the_buffer_compaction():
    """Hundreds of contexts (the packer drops what it has packed once past 4096 tokens) are the documents joined
    by separators and cut into bodies, by hand, nothing lost or repeated at the compaction."""
    from gsae.data.streams import StreamPacker

    docs = [[2 + (j * 7 + k) % 50 for k in range(5 + j % 11)] for j in range(37)]
    p = StreamPacker(0, _endless(docs), context_size=T, bos=1, prepend_bos=True, separator=0)
    flat: list[int] = []
    for e in range(40):
        for j, d in enumerate(docs):
            flat += ([] if e == j == 0 else [0]) + d
    n = 400  # 400 × 23 = 9200 tokens: past the compaction twice
    assert len(flat) > n * (T - 1)
    assert [p.next_context() for _ in range(n)] == [[1, *flat[k * (T - 1) : (k + 1) * (T - 1)]] for k in range(n)]


def test_a_held_out_prefix_longer_than_the_first_shards_spans_them(tmp_path, tiny_lm):
    """Shard mode, ``val_documents`` 50 over 4 files of 15: the first three files and the head of the last are held
    out (validation reads all 50, in order), and training reads documents 50..59 only."""
    folder = _four_shards(tmp_path)
    dm = TokenDataModule(lm=tiny_lm, dataset=str(folder), context_size=T, batch_size=2, n_streams=1, val_documents=50)
    dm.validate()
    assert dm.source().mode == "shards" and dm.source().held == [15, 15, 15, 5]
    assert _stream_doc_ids(_contexts(dm.open_stream(0), 40)) == set(range(50, 60))
    val = [t for c in dm.contexts("val") for t in c[1:]]
    head = [t for d in _documents()[:50] for t in [BYTE_BOS, *d.encode()]][1:]
    assert val == head[: len(val)] and len(head) - len(val) < T


def test_a_separate_val_split_holds_out_no_training_document(tmp_path):
    """With ``val_split`` the held-out set is that split: ``val_documents`` then keeps nothing of the training split
    out, each training document goes to one stream, and validation reads the validation split whole."""
    import datasets

    from gsae.data.sources import TextSource

    train = [f"train document {i}" for i in range(20)]
    held = [f"validation document {i}" for i in range(3)]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train}),
                          "validation": datasets.Dataset.from_dict({"text": held})}).save_to_disk(str(tmp_path / "saved"))
    src = TextSource(str(tmp_path / "saved"), None, "train", "validation", False, "text", _byte_encode, n_streams=2,
                     val_documents=5)
    per_stream = [_first_pass(src, s) for s in range(2)]
    assert sorted(per_stream[0] + per_stream[1]) == sorted(train) and not set(per_stream[0]) & set(per_stream[1])
    assert _texts(src.train_documents()) == train
    assert _texts(src.val_documents()) == held


def test_workers_must_divide_each_ranks_streams_not_all_streams():
    """4 streams on 2 ranks are 2 per rank: 4 workers per rank would leave two of them without a stream (and the
    batches of those streams without a worker), although 4 divides the 4 streams."""
    from gsae.data.streams import check_assignment

    with pytest.raises(ValueError, match=r"--data.num_workers \(4\) must divide the streams per rank .* = 2\)"):
        check_assignment(4, 2, 4)
    for n_streams, world, workers in [(4, 2, 2), (6, 3, 2), (8, 2, 4), (3, 1, 0), (6, 2, 1)]:
        check_assignment(n_streams, world, workers)  # every rank's streams split evenly: no error
    with pytest.raises(ValueError, match=r"--data.n_streams \(6\) must be a multiple of the number of ranks \(4"):
        check_assignment(6, 4, 1)


def test_stream_documents_resume_at_any_document_and_start_the_next_pass_from_its_start(tmp_path):
    """``stream_documents`` from a position: in document mode (stream 0 of 2, documents 2, 4, 6, 8 after 2 held out)
    and in shard mode (1 stream over 4 files, 5 held out of the first), resumed mid-pass, in a later shard, or just
    after a pass's last document, it reads on from there and the next pass starts with the stream's first document."""
    from gsae.data.sources import TextSource

    docs = _documents()

    def read(src, n, *position):
        return [(e, m, i, bytes(t).decode()) for e, m, i, t in itertools.islice(src.stream_documents(0, *position), n)]

    _write_lines(tmp_path / "ten.jsonl", docs[:10])
    src = TextSource(str(tmp_path / "ten.jsonl"), None, "train", None, True, "text", _byte_encode, n_streams=2,
                     val_documents=2)
    assert src.mode == "documents"
    assert read(src, 3, 0, 0, 3) == [(0, 0, 3, docs[8]), (1, 0, 0, docs[2]), (1, 0, 1, docs[4])]
    assert read(src, 2, 0, 0, 4) == [(1, 0, 0, docs[2]), (1, 0, 1, docs[4])]  # the pass had ended: no error
    assert read(src, 2, 3, 0, 1) == [(3, 0, 1, docs[4]), (3, 0, 2, docs[6])]
    # one pass over the training documents, in source order, and the held-out ones
    assert _texts(src.train_documents()) == docs[2:10]
    assert _texts(src.val_documents()) == docs[:2]

    src = TextSource(str(_four_shards(tmp_path)), None, "train", None, True, "text", _byte_encode, n_streams=1,
                     val_documents=5)
    assert src.mode == "shards"
    got = read(src, 12 + 15 + 15 + 2, 0, 1, 3)
    assert got[:13] == [(0, 1, i, docs[15 + i]) for i in range(3, 15)] + [(0, 2, 0, docs[30])]
    assert got[12:42] == [(0, 2 + k // 15, k % 15, docs[30 + k]) for k in range(30)]  # later shards: from their start
    assert got[42:] == [(1, 0, 0, docs[5]), (1, 0, 1, docs[6])]  # next pass: shard 0 after its held-out head
    assert _texts(src.train_documents()) == docs[5:60]
    assert _texts(src.val_documents()) == docs[:5]


def test_pretokenized_ids_must_lie_in_the_vocabulary_exactly():
    """``input_ids`` rows pass through as they are while every id is in ``0 .. vocab − 1``; the first id outside (the
    vocabulary size itself, or a negative one) is the error, named."""
    from gsae.data.sources import tokens_of

    assert list(tokens_of(iter([[0, 255], None, [7]]), True, encode=None, vocab=256)) == [[0, 255], [], [7]]
    for row, bad in [([3, 256, 4], 256), ([3, -1], -1)]:
        with pytest.raises(DataSourceError, match=rf"input_ids hold token {bad}, outside the model's vocabulary of 256"):
            list(tokens_of(iter([[1], row]), True, encode=None, vocab=256))


def test_as_many_shards_as_streams_give_each_stream_one_shard(tmp_path):
    """4 files for 4 streams is shard mode (at least S shards): stream ``s`` reads file ``s`` alone (file 0 after its
    5 held-out documents), not every 4th document of all four."""
    from gsae.data.sources import TextSource

    docs = _documents()
    src = TextSource(str(_four_shards(tmp_path)), None, "train", None, True, "text", _byte_encode, n_streams=4,
                     val_documents=5)
    assert src.mode == "shards"
    for s in range(4):
        assert _first_pass(src, s) == docs[max(15 * s, 5) : 15 * s + 15]


def test_a_saved_dataset_whose_first_shard_would_be_all_held_out_is_cut_by_documents(tmp_path):
    """A ``save_to_disk`` dataset of 20 documents for 2 streams with 10 held out: two shards of 10 would leave
    stream 0 nothing to train on, so it stays one shard (document mode) and each stream keeps every other document."""
    import datasets

    from gsae.data.sources import TextSource

    texts = [f"document {i}" for i in range(20)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    src = TextSource(str(tmp_path / "saved"), None, "train", None, False, "text", _byte_encode, n_streams=2,
                     val_documents=10)
    assert src.mode == "documents"
    for s in range(2):
        assert _first_pass(src, s) == texts[10 + s :: 2]


def test_a_local_file_of_blank_text_is_told_as_holding_no_text(tmp_path):
    """Whitespace only (spaces and newlines) is no text: the file is named as such when the source opens, not
    later as a stream without a complete context."""
    from gsae.data.sources import TextSource

    (tmp_path / "blank.txt").write_text("   \n\n \t \n")
    with pytest.raises(DataSourceError, match=r"blank.txt' holds no text \(every document in it is empty or blank\)"):
        TextSource(str(tmp_path / "blank.txt"), None, "train", None, True, "text", _byte_encode, n_streams=1,
                   val_documents=0)
