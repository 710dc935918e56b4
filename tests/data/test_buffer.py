"""Shuffle buffer: identity at capacity 0, no row returned twice or lost, grads travel with rows, exact resume."""

from __future__ import annotations

import io

import pytest
import torch

from gsae.data.batch import ActivationBatch
from gsae.data.buffer import ShuffleBuffer

D = 3


def _batch(start: int, n: int, with_grad: bool = True) -> ActivationBatch:
    """Rows whose first column is a unique row id; the gradient encodes the same id (-id)."""
    ids = torch.arange(start, start + n, dtype=torch.float64)
    x = torch.stack([ids, ids * 0.5, torch.ones(n, dtype=torch.float64)], dim=1)  # (n, D)
    grad = torch.stack([-ids, ids + 7, torch.zeros(n, dtype=torch.float64)], dim=1) if with_grad else None
    return ActivationBatch(x, grad)


def test_capacity_zero_is_identity() -> None:
    buf = ShuffleBuffer(0)
    batch = _batch(0, 10)
    out = buf.mix(batch)
    assert out.x is batch.x and out.grad is batch.grad
    assert buf.fill == 0


def test_negative_capacity_names_the_option() -> None:
    with pytest.raises(ValueError, match="--model.buffer_size"):
        ShuffleBuffer(-1)


@pytest.mark.parametrize(("capacity", "sizes"), [(64, [16] * 40), (50, [7, 30, 1, 16, 64, 3, 20] * 5), (8, [32] * 10)])
def test_no_row_returned_twice_or_lost(capacity: int, sizes: list[int]) -> None:
    buf = ShuffleBuffer(capacity, seed=1)
    seen: list[int] = []
    start = 0
    for n in sizes:
        out = buf.mix(_batch(start, n))
        start += n
        ids = out.x[:, 0].long().tolist()
        seen += ids
        assert buf.fill <= capacity
        assert len(ids) >= n // 2  # half while filling, then as many as came in (or more to stay within capacity)
        # gradients travel with their rows
        torch.testing.assert_close(out.grad[:, 0], -out.x[:, 0])
        torch.testing.assert_close(out.grad[:, 1], out.x[:, 0] + 7)
        torch.testing.assert_close(buf.grad[:, 0], -buf.x[:, 0])
    held = buf.x[:, 0].long().tolist()
    assert len(seen) == len(set(seen)), "a row was returned twice"
    assert sorted(seen + held) == list(range(start)), "a row was lost or duplicated"


@pytest.mark.parametrize("capacity", [16, 0])
def test_a_buffer_over_capacity_drains_in_batches_at_most_twice_the_size(capacity: int) -> None:
    """Restored with more rows than it holds (a run resumed on fewer ranks, or with a smaller --model.buffer_size;
    0 = off): the surplus leaves in outputs of at most twice the batch, none lost or twice, then the buffer is back
    at its capacity (off again for 0)."""
    buf = ShuffleBuffer(capacity, seed=1)
    held = _batch(1000, 60)
    buf.load_state_dict({"x": held.x, "grad": held.grad, "gen": torch.Generator().manual_seed(2).get_state()})
    seen, start, sizes = [], 0, []
    for _ in range(12):
        out = buf.mix(_batch(start, 8))
        start += 8
        sizes.append(out.x.shape[0])
        seen += out.x[:, 0].long().tolist()
        torch.testing.assert_close(out.grad[:, 0], -out.x[:, 0])
    assert max(sizes) == 16 and sizes[-1] == 8 and buf.fill == capacity
    left = [] if buf.x is None else buf.x[:, 0].long().tolist()
    assert sorted(seen + left) == sorted(list(range(start)) + list(range(1000, 1060)))
    if capacity == 0:
        batch = _batch(start, 8)
        assert buf.x is None and buf.mix(batch).x is batch.x  # drained: the identity again


def test_a_restored_surplus_waits_where_it_was_loaded_and_resumes_mid_drain() -> None:
    """The surplus of a restore (8 ranks' rows resumed on 1) stays where Lightning loaded it (the host; here: its
    float64 stays float64 while the batches are float32) and is fed in at most a batch per call, so the rows converted
    to the batch's device and dtype never exceed ``capacity`` plus the call's own; a checkpoint taken mid-drain resumes
    with the same outputs as the buffer that went on."""
    capacity = 16
    buf = ShuffleBuffer(capacity, seed=1)
    held = _batch(1000, 60)
    buf.load_state_dict({"x": held.x, "grad": held.grad, "gen": torch.Generator().manual_seed(2).get_state()})
    assert buf.fill == 60 and buf.x.shape[0] == capacity and buf.backlog_x.dtype == torch.float64

    def batch32(start: int) -> ActivationBatch:
        b = _batch(start, 8)
        return ActivationBatch(b.x.float(), b.grad.float())

    for start in (0, 8):
        out = buf.mix(batch32(start))
        assert out.x.dtype == out.grad.dtype == buf.x.dtype == torch.float32 and buf.backlog_x.dtype == torch.float64
        assert buf.x.shape[0] == capacity and out.x.shape[0] == 16
    blob = io.BytesIO()
    torch.save(buf.state_dict(), blob)
    blob.seek(0)
    state = torch.load(blob, weights_only=False)
    assert state["x"].shape[0] == buf.fill == 60 - 16 and state["x"].dtype == torch.float32  # buffer's dtype, then
    resumed = ShuffleBuffer(capacity, seed=99)
    resumed.load_state_dict(state)
    for start in range(16, 16 + 8 * 8, 8):
        a, b = buf.mix(batch32(start)), resumed.mix(batch32(start))
        assert torch.equal(a.x, b.x) and torch.equal(a.grad, b.grad)
    assert buf.backlog_x is None and resumed.backlog_x is None and buf.fill == capacity


def test_rows_are_mixed_across_batches() -> None:
    buf = ShuffleBuffer(256, seed=0)
    outs = [buf.mix(_batch(64 * i, 64)) for i in range(20)]
    last = outs[-1].x[:, 0]
    # once full, an output batch mixes rows from many input batches, not only the newest one
    assert len(set((last // 64).long().tolist())) > 3
    assert all(o.x.shape[0] == 64 for o in outs[8:])  # steady state: as many out as in


def test_without_gradients() -> None:
    buf = ShuffleBuffer(32)
    for i in range(5):
        out = buf.mix(_batch(16 * i, 16, with_grad=False))
        assert out.grad is None
    assert buf.grad is None


def test_state_dict_reproduces_future_outputs() -> None:
    a = ShuffleBuffer(48, seed=3)
    for i in range(6):
        a.mix(_batch(20 * i, 20))
    blob = io.BytesIO()
    torch.save(a.state_dict(), blob)  # as in a checkpoint
    blob.seek(0)
    b = ShuffleBuffer(48, seed=12345)  # a different seed: the state must carry the generator
    b.load_state_dict(torch.load(blob, weights_only=False))
    assert b.fill == a.fill
    for i in range(6, 12):
        out_a, out_b = a.mix(_batch(20 * i, 20)), b.mix(_batch(20 * i, 20))
        torch.testing.assert_close(out_a.x, out_b.x)
        torch.testing.assert_close(out_a.grad, out_b.grad)
    # and a buffer that did not load the state differs
    c = ShuffleBuffer(48, seed=12345)
    assert not torch.equal(c.mix(_batch(0, 20)).x, ShuffleBuffer(48, seed=3).mix(_batch(0, 20)).x)


def test_restored_rows_follow_the_batch_dtype_and_device() -> None:
    """Lightning restores checkpoints on the CPU (and a buffer may have been saved in another dtype): the held rows
    are moved to the next batch's device and dtype before mixing, so the output is that batch's type."""
    a = ShuffleBuffer(48, seed=3)
    for i in range(6):
        a.mix(_batch(20 * i, 20))  # float64 rows
    saved = a.state_dict()
    assert saved["x"].device.type == "cpu" and saved["x"].dtype == torch.float64
    b = ShuffleBuffer(48)
    b.load_state_dict(saved)
    for i in range(6, 9):
        new = _batch(20 * i, 20)
        new32 = ActivationBatch(new.x.float(), new.grad.float())
        out_a, out_b = a.mix(new), b.mix(new32)
        assert out_b.x.dtype == out_b.grad.dtype == b.x.dtype == b.grad.dtype == torch.float32
        torch.testing.assert_close(out_b.x, out_a.x.float())  # the same rows, in the batch's dtype
        torch.testing.assert_close(out_b.grad, out_a.grad.float())


def test_state_dict_is_on_the_cpu_and_detached() -> None:
    buf = ShuffleBuffer(16)
    x = torch.randn(12, D, requires_grad=True)
    buf.mix(ActivationBatch(x * 2, None))
    state = buf.state_dict()
    assert state["x"].device.type == "cpu" and not state["x"].requires_grad and state["grad"] is None


def test_reseed_changes_the_mixing() -> None:
    a, b = ShuffleBuffer(32, seed=0), ShuffleBuffer(32, seed=0)
    b.reseed(1)
    assert not torch.equal(a.mix(_batch(0, 32)).x, b.mix(_batch(0, 32)).x)


def test_a_filling_buffer_gives_half_a_batch_until_half_a_batch_more_fills_it() -> None:
    """While it fills, each call gives half its rows and keeps the rest; once what it holds plus half a batch reaches
    the capacity it gives whole batches and stays just under full (capacity 64, batches of 16: 7 calls of 8, then 16)."""
    buf = ShuffleBuffer(64, seed=0)
    sizes = [buf.mix(ActivationBatch(torch.randn(16, 4), None)).x.shape[0] for _ in range(12)]
    assert sizes == [8] * 7 + [16] * 5
    assert buf.fill == 56


def test_a_filling_buffer_gives_the_lower_half_of_an_odd_batch() -> None:
    """Batches of 15 into a buffer of 64: while filling each call gives ``15 // 2 = 7`` rows and keeps 8, until the
    rows held plus 7 reach the capacity (after 8 calls: 64 held), then whole batches."""
    buf = ShuffleBuffer(64, seed=0)
    sizes = [buf.mix(ActivationBatch(torch.randn(15, 4), None)).x.shape[0] for _ in range(12)]
    assert sizes == [7] * 8 + [15] * 4
    assert buf.fill == 64
