"""Resume equivalence: a run stopped at step n and resumed from its checkpoint ends where an uninterrupted run ends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gsae.cli import main
from tests.conftest import quickstart_args
from tests.systems.helpers import RecordBuffer, RecordTokens, StopAt, build_data, build_system, build_trainer

STEPS, STOP = 10, 4


def _fit(root, objective, callbacks=(), ckpt_path=None, devices=1):
    torch.manual_seed(0)
    system = build_system(objective, buffer_size=128 if objective != "e2e" else 0)
    data = build_data(system, batch_size=4 // devices)
    kw = dict(devices=devices, strategy="ddp_fork") if devices > 1 else {}
    trainer = build_trainer(root, STEPS, callbacks=callbacks, checkpoint_every=STOP, **kw)
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


@pytest.mark.slow
def test_ddp_stop_and_resume_with_shuffle_buffer_equals_uninterrupted(tmp_path):
    """2 gloo ranks, each with its own shuffle buffer: the checkpoint (written by rank 0 only) holds every rank's
    buffer and generator, and each rank gets its own back, so the resumed run ends where the uninterrupted one does."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    full = _fit(a, "gsae", [RecordBuffer(a)], devices=2)
    _fit(b, "gsae", [StopAt(STOP)], devices=2)
    saved = torch.load(b / "ckpts" / "last.ckpt", weights_only=False)["gsae_buffer"]
    assert saved["world_size"] == 2 and len(saved["ranks"]) == 2
    x0, x1 = saved["ranks"][0]["x"], saved["ranks"][1]["x"]
    assert x0.shape[0] > 0 and x1.shape[0] > 0 and not torch.equal(x0[: len(x1)], x1[: len(x0)])  # each rank's own rows
    resumed = _fit(b, "gsae", [RecordBuffer(b)], ckpt_path=str(b / "ckpts" / "last.ckpt"), devices=2)
    for r in range(2):  # every rank's buffer (rows, their gradients) ends as in the uninterrupted run
        end_full, end_resumed = torch.load(a / f"buffer{r}.pt"), torch.load(b / f"buffer{r}.pt")
        assert torch.equal(end_full["x"], end_resumed["x"]), f"rank {r}: buffered rows differ"
        assert torch.equal(end_full["grad"], end_resumed["grad"]), f"rank {r}: buffered gradients differ"
    for name, p in full.sae.state_dict().items():
        assert torch.allclose(p, resumed.sae.state_dict()[name], atol=1e-6), f"{name} differs"


def test_resume_from_a_buffer_saved_in_another_dtype(tmp_path):
    """A checkpoint's buffer comes back on the CPU, possibly in another dtype than the batches (simulated: float64
    rows and gradients); the resumed run moves it to the batch's and ends as the uninterrupted one (float32 ->
    float64 -> float32 is exact)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full = _fit(tmp_path / "a", "gsae")
    _fit(tmp_path / "b", "gsae", [StopAt(STOP)])
    ckpt = tmp_path / "b" / "ckpts" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)
    (rank0,) = state["gsae_buffer"]["ranks"]
    assert rank0["x"].shape[0] > 0
    rank0["x"], rank0["grad"] = rank0["x"].double(), rank0["grad"].double()
    torch.save(state, ckpt)
    resumed = _fit(tmp_path / "b", "gsae", ckpt_path=str(ckpt))
    assert resumed.buffer.x.dtype == resumed.buffer.grad.dtype == torch.float32
    for name, p in full.sae.state_dict().items():
        assert torch.allclose(p, resumed.sae.state_dict()[name], atol=1e-6), f"{name} differs"


def test_resume_on_another_world_size_is_a_one_line_error(tmp_path):
    system = build_system("topk", buffer_size=128)
    rows = {"x": torch.zeros(3, 64), "grad": None, "gen": torch.Generator().get_state(), "capacity": 128}
    with pytest.raises(ValueError, match=r"--ckpt_path: .*2 DDP ranks but this run has 1"):
        system._own_buffer_state({"world_size": 2, "ranks": [rows, rows]})
    assert system._own_buffer_state({"world_size": 1, "ranks": [rows]}) is rows
    assert system._own_buffer_state(rows) is rows  # checkpoints written before per-rank buffers


def test_cli_resume_last_continues_the_run(tmp_path, capsys, recwarn):
    assert main(quickstart_args(tmp_path, steps=6)) == 0
    ckpts = tmp_path / "quickstart-topk" / "checkpoints"
    assert (ckpts / "last.ckpt").exists()
    capsys.readouterr()
    # resuming a run that is already at max_steps says so (Lightning would end at once, silently) and writes nothing
    assert main(quickstart_args(tmp_path, "--ckpt_path", "last", steps=6)) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"nothing to train: {ckpts / 'last.ckpt'} is at step 6 and --trainer.max_steps is 6 (raise " \
        "--trainer.max_steps to train on)"
    assert [p.name for p in (tmp_path / "quickstart-topk").glob("version_*")] == ["version_0"]
    assert (ckpts / "last.ckpt.eval.json").exists() and (ckpts / "last.ckpt.latents.html").exists()
    recwarn.clear()
    assert main(quickstart_args(tmp_path, "--ckpt_path", "last", "--evaluation.enabled", "false", steps=10)) == 0
    assert not [w for w in recwarn if "exists and is not empty" in str(w.message)]  # expected on a resume
    # last.ckpt was rewritten at step 10 without an evaluation: step 6's results beside it are gone, not stale
    assert not (ckpts / "last.ckpt.eval.json").exists() and not (ckpts / "last.ckpt.latents.html").exists()
    assert (ckpts / "epoch=0-step=6.ckpt.eval.json").exists()  # the step checkpoint's own stay
    from safetensors.torch import load_file

    from gsae.export import load_checkpoint

    exported = load_file(ckpts / "last.saelens" / "sae_weights.safetensors")["W_dec"]
    assert torch.equal(exported, load_checkpoint(ckpts / "last.ckpt")[0].decoder_weight().detach())  # step 10's
    state = torch.load(ckpts / "last.ckpt", weights_only=True)  # our checkpoints load without unpickling code
    assert state["global_step"] == 10
    assert state["TokenDataModule"]["consumed_batches"] == 10  # the stream position travels in the checkpoint
    assert state["gsae"]["tokens_seen"] > 0 and state["gsae"]["hook"] == "blocks.2.hook_resid_post"
    assert not any(k.startswith(("lm.", "model.")) for k in state["state_dict"])  # never the LM's weights


@pytest.mark.slow
@pytest.mark.parametrize("kill_when", ["after_last_export", "at_the_first_step_checkpoint"])
def test_sigkill_after_a_checkpoint_then_resume_last_equals_uninterrupted(tmp_path, kill_when):
    """``python train.py`` killed with SIGKILL (no clean shutdown), then resumed with ``--ckpt_path last``, ends with
    the SAE of the uninterrupted run (shuffle buffer, stream, optimizer). Killed once ``last.ckpt`` and its export
    are complete, and once as soon as the first step checkpoint appears — before ``last.ckpt`` may exist, or while
    the evaluation runs: ``last`` then resumes from that step checkpoint."""
    import os
    import signal
    import time

    from gsae.cli import newest_checkpoint
    from tests.systems.launch import assert_same_sae, finish, start, train_args

    steps, every = 15, 5
    full = start(train_args(tmp_path / "full", steps, "--checkpoint.every_n_train_steps", str(every)))
    killed_root = tmp_path / "killed"
    args = train_args(killed_root, steps, "--checkpoint.every_n_train_steps", str(every))
    proc = start(args)
    ckpts = killed_root / "quickstart-topk" / "checkpoints"
    # the export is written after last.ckpt is complete; a step checkpoint appears complete (written, then moved)
    marker = ckpts / ("last.saelens/cfg.json" if kill_when == "after_last_export" else f"epoch=0-step={every}.ckpt")
    deadline = time.monotonic() + 600
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(newest_checkpoint(ckpts), weights_only=False)["global_step"]
    assert 0 < killed_at < steps
    finish(start([*args, "--ckpt_path", "last"]))
    finish(full)
    assert_same_sae(ckpts / "last.ckpt", tmp_path / "full" / "quickstart-topk" / "checkpoints" / "last.ckpt")


def test_newest_checkpoint_is_the_last_written_readable_one(tmp_path, caplog):
    """``--ckpt_path last`` resumes from the checkpoint written last: ``last.ckpt``, or a step checkpoint written
    after it (a run killed between the two writes); a file cut short is skipped for the next newest."""
    import os

    from gsae.cli import newest_checkpoint

    def save(name: str, step: int, mtime: float) -> None:
        torch.save({"gsae": {}, "global_step": step}, tmp_path / name)
        os.utime(tmp_path / name, (mtime, mtime))

    assert newest_checkpoint(tmp_path) is None
    save("epoch=0-step=5.ckpt", 5, 100.0)
    assert newest_checkpoint(tmp_path) == str(tmp_path / "epoch=0-step=5.ckpt")  # killed before last.ckpt existed
    save("last.ckpt", 5, 100.0)  # written in the same instant: last.ckpt
    assert newest_checkpoint(tmp_path) == str(tmp_path / "last.ckpt")
    save("epoch=0-step=10.ckpt", 10, 200.0)  # last.ckpt of step 10 not written
    with caplog.at_level("INFO", logger="gsae.cli"):
        assert newest_checkpoint(tmp_path) == str(tmp_path / "epoch=0-step=10.ckpt")
    assert "newer than last.ckpt" in caplog.text
    data = (tmp_path / "epoch=0-step=10.ckpt").read_bytes()
    (tmp_path / "epoch=0-step=15.ckpt").write_bytes(data[: len(data) // 2])  # a copy cut short
    os.utime(tmp_path / "epoch=0-step=15.ckpt", (300.0, 300.0))
    (tmp_path / "notes.ckpt").write_bytes(b"not a checkpoint")
    os.utime(tmp_path / "notes.ckpt", (400.0, 400.0))
    with caplog.at_level("WARNING", logger="gsae.cli"):
        assert newest_checkpoint(tmp_path) == str(tmp_path / "epoch=0-step=10.ckpt")
    assert "skipping epoch=0-step=15.ckpt" in caplog.text and "skipping notes.ckpt" in caplog.text


def test_evaluation_runs_after_the_steps_checkpoint_and_last_ckpt_are_written(tmp_path):
    """The evaluation (seconds to minutes at GPT-2 scale) is handed each checkpoint only once the step's checkpoint
    *and* ``last.ckpt`` are on disk: a run killed while it evaluates resumes from this step, not the one before."""
    import lightning.pytorch as pl

    seen = []

    class Probe(pl.Callback):
        def on_sae_checkpoint(self, trainer, pl_module, path) -> None:
            last = tmp_path / "ckpts" / "last.ckpt"
            last_step = torch.load(last, weights_only=False)["global_step"] if last.exists() else None
            seen.append((Path(path).name, trainer.global_step, last_step))

    torch.manual_seed(0)
    system = build_system("topk")
    trainer = build_trainer(tmp_path, 7, callbacks=[Probe()], checkpoint_every=3)
    trainer.fit(system, datamodule=build_data(system, batch_size=4))
    # the final step (7, off the cadence) is saved at the end of training, named for the epoch it was trained in
    assert [name for name, *_ in seen] == [
        "epoch=0-step=3.ckpt", "last.ckpt", "epoch=0-step=6.ckpt", "last.ckpt", "epoch=0-step=7.ckpt", "last.ckpt"
    ]
    assert all(step == last_step for _, step, last_step in seen), seen
