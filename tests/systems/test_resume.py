"""Resume equivalence: a run stopped at step n and resumed from its checkpoint ends where an uninterrupted run ends."""

from __future__ import annotations

import pytest
import torch

from gsae.cli import main
from tests.conftest import quickstart_args
from tests.systems.helpers import RecordTokens, StopAt, build_data, build_system, build_trainer

STEPS, STOP = 10, 4


def _fit(root, objective, callbacks=(), ckpt_path=None):
    torch.manual_seed(0)
    system = build_system(objective, buffer_size=128 if objective != "e2e" else 0)
    data = build_data(system)
    trainer = build_trainer(root, STEPS, callbacks=callbacks, checkpoint_every=STOP)
    trainer.fit(system, datamodule=data, ckpt_path=ckpt_path)
    return system


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["topk", "gsae", "e2e"])
def test_stop_and_resume_equals_uninterrupted(tmp_path, objective):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full = _fit(tmp_path / "a", objective, [RecordTokens(tmp_path / "a")])

    part = _fit(tmp_path / "b", objective, [StopAt(STOP)])
    assert part.global_step == STOP
    record = RecordTokens(tmp_path / "b")
    resumed = _fit(tmp_path / "b", objective, [record], ckpt_path=str(tmp_path / "b" / "ckpts" / "last.ckpt"))
    assert resumed.global_step == STEPS

    # the stream continues exactly: the resumed run's batches are the uninterrupted run's batches STOP..STEPS-1
    seen_full = torch.load(tmp_path / "a" / "rank0.pt")
    per_batch = seen_full.shape[0] // STEPS
    assert torch.equal(torch.load(tmp_path / "b" / "rank0.pt"), seen_full[STOP * per_batch :])

    for name, p in full.sae.state_dict().items():
        assert torch.allclose(p, resumed.sae.state_dict()[name], atol=1e-6), f"{objective}: {name} differs"
    assert torch.equal(full.dead.tokens_since_fired, resumed.dead.tokens_since_fired)
    assert torch.equal(full.dead.batches_since_fired, resumed.dead.batches_since_fired)
    if objective != "e2e":
        assert torch.equal(full.buffer.x, resumed.buffer.x)


def test_cli_resume_last_continues_the_run(tmp_path, capsys):
    assert main(quickstart_args(tmp_path, steps=6)) == 0
    ckpts = tmp_path / "quickstart-topk" / "checkpoints"
    assert (ckpts / "last.ckpt").exists()
    assert main(quickstart_args(tmp_path, "--ckpt_path", "last", steps=10)) == 0
    state = torch.load(ckpts / "last.ckpt", weights_only=True)  # our checkpoints load without unpickling code
    assert state["global_step"] == 10
    assert state["TokenDataModule"]["consumed_batches"] == 10  # the stream position travels in the checkpoint
    assert state["gsae"]["tokens_seen"] > 0 and state["gsae"]["hook"] == "blocks.2.hook_resid_post"
    assert not any(k.startswith(("lm.", "model.")) for k in state["state_dict"])  # never the LM's weights
