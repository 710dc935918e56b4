"""DDP equivalence: 2 CPU ranks (gloo) × batch B/2 end where 1 rank × batch B ends, on the same tokens."""

from __future__ import annotations

import pytest
import torch

from tests.systems.helpers import RecordTokens, build_data, build_system, build_trainer

STEPS = 6


def _train(tmp_path, objective: str, devices: int):
    torch.manual_seed(0)
    system = build_system(objective)
    data = build_data(system, batch_size=4 // devices)
    folder = tmp_path / f"d{devices}"
    folder.mkdir()
    kw = dict(devices=devices, strategy="ddp_fork") if devices > 1 else dict(devices=1)
    trainer = build_trainer(folder, STEPS, callbacks=[RecordTokens(folder)], **kw)
    trainer.fit(system, datamodule=data)
    return system, folder


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["topk", "gsae", "e2e"])
def test_ddp_two_ranks_equal_single_process(tmp_path, objective):
    single, f1 = _train(tmp_path, objective, 1)
    ddp, f2 = _train(tmp_path, objective, 2)

    # data: ranks disjoint, and together exactly the single-process tokens of every step
    r0, r1, one = torch.load(f2 / "rank0.pt"), torch.load(f2 / "rank1.pt"), torch.load(f1 / "rank0.pt")
    rows = lambda t: {tuple(r.tolist()) for r in t}  # noqa: E731
    assert not rows(r0) & rows(r1)
    assert rows(r0) | rows(r1) == rows(one)
    assert r0.shape[0] == r1.shape[0] == one.shape[0] // 2

    # parameters after training: rank 0's weights come back to the main process
    for name, p in single.sae.state_dict().items():
        q = ddp.sae.state_dict()[name]
        assert torch.allclose(p, q, atol=2e-5, rtol=1e-4), f"{objective}: {name} differs by {(p - q).abs().max():.2e}"
    # dead-latent counters are global: identical to the single-process ones
    assert torch.equal(single.dead.batches_since_fired, ddp.dead.batches_since_fired)
    assert torch.equal(single.dead.tokens_since_fired, ddp.dead.tokens_since_fired)
    assert int(single.tokens_seen) == int(ddp.tokens_seen)
