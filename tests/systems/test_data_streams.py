"""A local jsonl (gsae-corpus text, gsae-tiny's BPE) through a real Trainer: DataLoader workers change nothing,
a run stopped and resumed with workers continues every stream exactly, and 2 gloo ranks × 2 workers read
disjoint contexts whose union is what 1 rank reads."""

from __future__ import annotations

import json

import pytest
import torch

from gsae.data import TokenDataModule
from tests.systems.helpers import RecordTokens, StopAt, build_system, build_trainer

STEPS, STOP = 8, 4


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> str:
    from gsae.tinylm.corpus import rows

    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({**r, "id": i}) + "\n" for i, r in enumerate(rows(seed=7, n=120))))
    return str(path)


def _fit(root, path: str, workers: int, batch_size: int = 4, devices: int = 1, stop: int | None = None, ckpt_path=None):
    root.mkdir(exist_ok=True)
    torch.manual_seed(0)
    system = build_system("topk", lm_name="gsae-tiny")
    data = TokenDataModule(
        system.lm, dataset=path, context_size=32, batch_size=batch_size, n_streams=4, val_documents=20, val_batches=1,
        num_workers=workers,
    )
    callbacks = [RecordTokens(root)] + ([StopAt(stop)] if stop else [])
    kw = dict(devices=devices, strategy="ddp_fork") if devices > 1 else dict(devices=1)
    trainer = build_trainer(root, STEPS, callbacks=callbacks, checkpoint_every=STOP, **kw)
    trainer.fit(system, datamodule=data, ckpt_path=ckpt_path)
    return system


def _assert_same_sae(a, b) -> None:
    for name, p in a.sae.state_dict().items():
        q = b.sae.state_dict()[name]
        assert torch.allclose(p, q, atol=1e-6), f"{name} differs by {(p - q).abs().max():.2e}"


def test_workers_see_the_same_contexts_and_train_the_same_sae(tmp_path, corpus_file) -> None:
    zero = _fit(tmp_path / "w0", corpus_file, workers=0)
    two = _fit(tmp_path / "w2", corpus_file, workers=2)
    seen0, seen2 = torch.load(tmp_path / "w0" / "rank0.pt"), torch.load(tmp_path / "w2" / "rank0.pt")
    assert seen0.shape == (STEPS * 4, 32)
    assert torch.equal(seen0, seen2)
    assert len({tuple(r) for r in seen0.tolist()}) == seen0.shape[0]  # no context twice
    _assert_same_sae(zero, two)


@pytest.mark.slow
def test_resume_with_workers_continues_exactly(tmp_path, corpus_file) -> None:
    full = _fit(tmp_path / "full", corpus_file, workers=2)
    part = _fit(tmp_path / "part", corpus_file, workers=2, stop=STOP)
    assert part.global_step == STOP
    state = torch.load(tmp_path / "part" / "ckpts" / "last.ckpt", weights_only=True)["TokenDataModule"]
    assert state["consumed_batches"] == STOP and all(s is not None for s in state["streams"])
    resumed = _fit(tmp_path / "part", corpus_file, workers=2, ckpt_path=str(tmp_path / "part" / "ckpts" / "last.ckpt"))
    seen_full = torch.load(tmp_path / "full" / "rank0.pt")
    assert torch.equal(torch.load(tmp_path / "part" / "rank0.pt"), seen_full[STOP * 4 :])
    _assert_same_sae(full, resumed)


@pytest.mark.slow
def test_two_gloo_ranks_with_two_workers_read_disjoint_contexts_whose_union_is_one_rank(tmp_path, corpus_file) -> None:
    _fit(tmp_path / "one", corpus_file, workers=0, batch_size=4)
    _fit(tmp_path / "ddp", corpus_file, workers=2, batch_size=2, devices=2)
    one = torch.load(tmp_path / "one" / "rank0.pt")
    r0, r1 = torch.load(tmp_path / "ddp" / "rank0.pt"), torch.load(tmp_path / "ddp" / "rank1.pt")
    rows = lambda t: sorted(tuple(r) for r in t.tolist())  # noqa: E731
    assert r0.shape == r1.shape == (STEPS * 2, 32)
    assert not set(rows(r0)) & set(rows(r1))
    assert sorted(rows(r0) + rows(r1)) == rows(one)  # same contexts, none lost or repeated


@pytest.mark.slow
def test_ddp_resume_keeps_every_ranks_streams(tmp_path, corpus_file) -> None:
    _fit(tmp_path / "full", corpus_file, workers=2, batch_size=2, devices=2)
    _fit(tmp_path / "part", corpus_file, workers=2, batch_size=2, devices=2, stop=STOP)
    state = torch.load(tmp_path / "part" / "ckpts" / "last.ckpt", weights_only=True)["TokenDataModule"]
    assert all(s is not None for s in state["streams"])  # rank 1's streams too, though rank 0 wrote the file
    _fit(tmp_path / "part", corpus_file, workers=2, batch_size=2, devices=2, ckpt_path=str(tmp_path / "part" / "ckpts" / "last.ckpt"))
    for r in range(2):
        full = torch.load(tmp_path / "full" / f"rank{r}.pt")
        assert torch.equal(torch.load(tmp_path / "part" / f"rank{r}.pt"), full[STOP * 2 :]), f"rank {r}"
    # the resumed run's checkpoint holds every stream where the uninterrupted run's does: each rank's own positions,
    # not the copies of the other rank's streams it loaded at the resume
    ends = [torch.load(root / "ckpts" / "last.ckpt", weights_only=True)["TokenDataModule"] for root in
            (tmp_path / "full", tmp_path / "part")]
    assert ends[0]["consumed_batches"] == ends[1]["consumed_batches"] == STEPS
    for s, (a, b) in enumerate(zip(ends[0]["streams"], ends[1]["streams"])):
        assert a[:3] == b[:3] and torch.equal(a[3], b[3]), f"stream {s}: {a[:3]} != {b[:3]}"
