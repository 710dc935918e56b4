"""Resume equivalence: a run stopped at step n and resumed from its checkpoint ends where an uninterrupted run ends."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import lightning.pytorch as pl
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
    assert int(full.tokens_seen) == int(resumed.tokens_seen) > 0  # the summary's and TensorBoard's token axis
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


def test_a_resume_under_another_precision_says_it_is_not_a_bit_exact_continuation(tmp_path, caplog):
    """A bf16-mixed run resumed under 32-true (or the reverse) trains on, ~2e-3 away from either uninterrupted run,
    and said nothing; the checkpoint records the precision, and a resume under another one (or another LM dtype)
    says so once. Under its own precision, nothing is said."""
    import logging

    root = tmp_path / "b"
    root.mkdir()
    system = build_system("topk")
    build_trainer(root, STOP, checkpoint_every=STOP, precision="bf16-mixed").fit(system, datamodule=build_data(system))
    ckpt = root / "ckpts" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["gsae"]["precision"] == "bf16-mixed"
    said = lambda: [r.getMessage() for r in caplog.records if "bit-exact" in r.getMessage()]  # noqa: E731
    for precision, expected in (("bf16-mixed", 0), ("32-true", 1)):
        caplog.clear()
        system = build_system("topk")
        with caplog.at_level(logging.WARNING, logger="gsae.systems.base"):
            build_trainer(root, STOP + 1, precision=precision).fit(system, datamodule=build_data(system),
                                                                   ckpt_path=str(ckpt))
        assert len(said()) == expected, said()
    assert "--trainer.precision 32-true (the checkpoint's: bf16-mixed)" in said()[0]


def test_resume_on_another_world_size_deals_every_buffered_row_out_once(tmp_path, monkeypatch, caplog):
    """A checkpoint of 2 ranks' buffers resumed on 1, 3 or 4 ranks: the rows (and their gradients) are dealt out, none
    lost, none twice, shares within one row of each other; on fewer ranks a share above --model.buffer_size is kept
    (and drains: tests/data/test_buffer.py), with one warning; a checkpoint without the data module's global context
    count gets it from the saving world."""
    system = build_system("gsae", buffer_size=8)
    x = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(14, 3)
    saved = {"world_size": 2, "ranks": [
        {"x": x[:7], "grad": -x[:7], "gen": torch.Generator().get_state(), "capacity": 8},
        {"x": x[7:], "grad": -x[7:], "gen": torch.Generator().get_state(), "capacity": 8},
    ]}
    for world in (1, 3, 4):
        monkeypatch.setattr(type(system), "_world", lambda self, w=world: w)
        shares, gens = [], []
        for rank in range(world):
            monkeypatch.setattr(type(system), "global_rank", property(lambda self, r=rank: r))
            own = system._own_buffer_state(saved)
            assert torch.equal(own["grad"], -own["x"])  # rows and gradients stay together
            shares.append(own["x"])
            gens.append(tuple(own["gen"].tolist()))
        assert len(set(gens)) == world  # each rank mixes its share with a generator of its own
        rows = sorted(tuple(r.tolist()) for r in torch.cat(shares))
        assert rows == sorted(tuple(r.tolist()) for r in x), world  # every row once
        assert max(len(t) for t in shares) - min(len(t) for t in shares) <= 1
    monkeypatch.setattr(type(system), "_world", lambda self: 1)
    monkeypatch.setattr(type(system), "global_rank", property(lambda self: 0))
    data = {"consumed_batches": 5, "batch_size": 4}  # a data module state written before consumed_contexts
    with caplog.at_level("WARNING"):
        system.restore_run({"gsae": system.describe(), "gsae_buffer": saved, "TokenDataModule": data})
    assert system.buffer.fill == 14 and system.buffer.capacity == 8  # 2 ranks' rows; the surplus drains (mix)
    assert "holds 14 rows, --model.buffer_size 8" in caplog.text
    assert data["consumed_contexts"] == 5 * 4 * 2  # the saving world's global contexts, not this world's
    caplog.clear()  # 2 ranks' 4 rows each fill one buffer of 8 exactly: no surplus, nothing to say
    full = {"world_size": 2, "ranks": [{**r, "x": r["x"][:4], "grad": r["grad"][:4]} for r in saved["ranks"]]}
    with caplog.at_level("WARNING"):
        system.restore_run({"gsae": system.describe(), "gsae_buffer": full})
    assert system.buffer.fill == 8 and "resumed shuffle buffer" not in caplog.text
    empty = {"x": None, "grad": None, "gen": torch.Generator().get_state(), "capacity": 8}
    assert system._own_buffer_state({"world_size": 2, "ranks": [empty, empty]}) is empty  # nothing to deal out
    assert system._own_buffer_state(saved["ranks"][0]) is saved["ranks"][0]  # checkpoints before per-rank buffers
    mixed = {"world_size": 2, "ranks": [saved["ranks"][0], {**saved["ranks"][1], "grad": None}]}
    with pytest.raises(ValueError, match="gradients on some ranks only"):
        system._own_buffer_state(mixed)


@pytest.mark.slow
def test_ddp_run_resumed_on_one_rank_loses_and_repeats_nothing(tmp_path):
    """2 gloo ranks stopped at step STOP and resumed in one process (fewer devices after a preemption): the synthetic
    stream goes on at the global context where the two ranks stopped (not at batches × the new world), and the one
    rank starts with both ranks' buffered rows."""

    class FirstBuffer(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            self.x = pl_module.buffer.x.clone()

    b = tmp_path / "b"
    b.mkdir()
    _fit(b, "gsae", [StopAt(STOP)], devices=2)  # 2 contexts per rank and step
    saved = torch.load(b / "ckpts" / "last.ckpt", weights_only=False)
    assert saved["TokenDataModule"]["consumed_contexts"] == STOP * 2 * 2
    rows = torch.cat([r["x"] for r in saved["gsae_buffer"]["ranks"]])
    torch.manual_seed(0)
    system = build_system("gsae", buffer_size=128)
    data = build_data(system, batch_size=2)
    record, first = RecordTokens(b), FirstBuffer()
    trainer = build_trainer(b, STOP + 2, callbacks=[record, first])
    trainer.fit(system, datamodule=data, ckpt_path=str(b / "ckpts" / "last.ckpt"))
    assert torch.equal(first.x, rows)  # both ranks' rows, rank 0's then rank 1's
    expected = torch.tensor(list(itertools.islice(data.contexts("train", STOP * 2 * 2), 2 * 2)))
    assert torch.equal(torch.load(b / "rank0.pt"), expected)  # global contexts 16..19: none skipped or repeated
    assert data.consumed_contexts(1) == STOP * 2 * 2 + 2 * 2


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
    # named by the token stream's epoch: Lightning opened a new one on resuming the finished run, no data was reread
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["epoch=0-step=10.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"]
    from safetensors.torch import load_file

    from gsae.export import load_checkpoint

    exported = load_file(ckpts / "last.saelens" / "sae_weights.safetensors")["W_dec"]
    assert torch.equal(exported, load_checkpoint(ckpts / "last.ckpt")[0].decoder_weight().detach())  # step 10's
    state = torch.load(ckpts / "last.ckpt", weights_only=True)  # our checkpoints load without unpickling code
    assert state["global_step"] == 10
    assert state["TokenDataModule"]["consumed_batches"] == 10  # the stream position travels in the checkpoint
    assert state["gsae"]["tokens_seen"] > 0 and state["gsae"]["hook"] == "blocks.2.hook_resid_post"
    assert not any(k.startswith(("lm.", "model.")) for k in state["state_dict"])  # never the LM's weights
    # resumed again (a finished resumed run): Lightning opens epoch 2; the step checkpoints saved in its hooks (12) and
    # the final one (14) are still named by the stream's epoch 0
    assert main(quickstart_args(tmp_path, "--ckpt_path", "last", "--evaluation.enabled", "false",
                                "--checkpoint.every_n_train_steps", "2", steps=14)) == 0
    assert sorted(p.name for p in ckpts.glob("epoch=*.ckpt")) == [f"epoch=0-step={s}.ckpt" for s in (10, 12, 14, 6)]


def test_a_resume_continues_the_tensorboard_run_without_the_steps_it_redoes(tmp_path, capsys, caplog):
    """A resume logs on in the run's own ``version_0`` (one run in TensorBoard, not a second drawn over it), after the
    killed run's events past the checkpoint it resumes from were dropped: every step once, the redone ones from the
    resume. Its configuration goes beside the first one. A copy of the run folder resumes in the copy's folder; a
    checkpoint of another run starts a folder of its own and leaves that run's events alone."""
    import shutil
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def events(folder):
        return EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0}).Reload()

    run = tmp_path / "quickstart-topk"
    args = quickstart_args(tmp_path, "--checkpoint.every_n_train_steps", "10", "--trainer.log_every_n_steps", "2",
                           "--evaluation.benchmarks", "[dead_latents]", steps=20)
    assert main(args) == 0
    first = events(run / "version_0")
    config = (run / "version_0" / "config.yaml").read_text()
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    resumed_at = time.time()
    # as after a kill once step 20 was logged but before its checkpoint was: resume from step 10's
    assert main([*args, "--ckpt_path", str(run / "checkpoints" / "epoch=0-step=10.ckpt")]) == 0
    assert [p.name for p in run.glob("version_*")] == ["version_0"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == names  # no last-v1.ckpt, no …-v1.ckpt
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 20
    aside = run / "checkpoints.superseded-after-step10"  # the abandoned continuation's step 20, with what was beside it
    assert "resuming from step 10 of a run that reached step 20 (last.ckpt): its checkpoints after step 10 " \
        f"(epoch=0-step=20.ckpt) are moved to {aside} (remove it when you no longer need them)" in caplog.text
    assert sorted(p.name for p in aside.iterdir()) == ["epoch=0-step=20.ckpt", "epoch=0-step=20.ckpt.eval.json",
                                                       "epoch=0-step=20.saelens", "last.ckpt.eval.json"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", aside.name, "version_0"]
    both = events(run / "version_0")
    loss = both.Scalars("train/loss")
    assert [e.step for e in loss] == [e.step for e in first.Scalars("train/loss")]  # each step once
    assert max(e.step for e in loss) == 20 and all((e.wall_time > resumed_at) == (e.step > 10) for e in loss)
    for tag in both.Tags()["images"]:  # the evaluation's figures: step 10's from the first run, step 20's redone
        assert [(e.step, e.wall_time > resumed_at) for e in both.Images(tag)] == [(10, False), (20, True)], tag
    assert both.Tags()["images"]
    assert (run / "version_0" / "config.yaml").read_text() == config
    assert "ckpt_path: " in (run / "version_0" / "config.resume-step10.yaml").read_text()
    # the run folder copied elsewhere resumes in the copy's version_0
    copy = tmp_path / "copy"
    shutil.copytree(run, copy / "quickstart-topk")
    more = ("--evaluation.enabled", "false", "--trainer.log_every_n_steps", "2")
    assert main(quickstart_args(copy, "--ckpt_path", "last", *more, steps=22)) == 0
    assert [p.name for p in (copy / "quickstart-topk").glob("version_*")] == ["version_0"]
    assert max(e.step for e in events(copy / "quickstart-topk" / "version_0").Scalars("train/loss")) == 22
    # another run's checkpoint (fine-tuning from it): a new run, in its own folder, the first run's left as it was
    other = tmp_path / "other"
    ckpt = run / "checkpoints" / "epoch=0-step=10.ckpt"
    assert main(quickstart_args(other, "--ckpt_path", str(ckpt), *more, steps=12)) == 0
    assert [e.step for e in events(other / "quickstart-topk" / "version_0").Scalars("train/loss")] == [12]
    assert [e.step for e in events(run / "version_0").Scalars("train/loss")] == [e.step for e in loss]
    # a new run, or one from another run's checkpoint, does not write among a run's checkpoints: one line, nothing run
    capsys.readouterr()
    assert main(quickstart_args(tmp_path, *more, steps=12)) == 1
    assert main(quickstart_args(tmp_path, "--ckpt_path", str(other / "quickstart-topk" / "checkpoints" / "last.ckpt"),
                                *more, steps=14)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0] == err[1] == (
        f"error: {run / 'checkpoints'} holds an earlier run's checkpoints (epoch=0-step=10.ckpt, epoch=0-step=20.ckpt, "
        "last.ckpt): resume it with --ckpt_path last, or start this run in another folder (--trainer.default_root_dir, "
        "or the config's --trainer.logger.init_args.name), or remove that one")
    assert [p.name for p in run.glob("version_*")] == ["version_0"]


def test_a_resume_with_another_learning_rate_applies_it(tmp_path, caplog):
    """``--ckpt_path last`` with a new ``lr`` (lowered after a divergence) trains on with it from the resumed step,
    on the configured schedule; it used to be overridden by the learning rate Lightning restores with the optimizer
    state. One warning names the change."""
    import logging

    assert main(quickstart_args(tmp_path, "--evaluation.enabled", "false", steps=30)) == 0
    ckpts = tmp_path / "quickstart-topk" / "checkpoints"
    lr = ("--model.optimizer.lr", "0.0005")
    with caplog.at_level(logging.WARNING):
        assert main(quickstart_args(tmp_path, "--evaluation.enabled", "false", "--ckpt_path", "last", *lr, steps=40)) == 0
    assert "--model.optimizer lr 0.0005 replaces the checkpoint's 0.001 from step 30 on" in caplog.text
    (group,) = torch.load(ckpts / "last.ckpt", weights_only=False)["optimizer_states"][0]["param_groups"]
    assert group["initial_lr"] == 0.0005 and group["lr"] < 0.0005  # on the cosine schedule, past its warm-up
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the same lr again: nothing to say
        assert main(quickstart_args(tmp_path, "--evaluation.enabled", "false", "--ckpt_path", "last", *lr, steps=50)) == 0
    assert "replaces the checkpoint's" not in caplog.text


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
    assert logged_steps(killed_root) == logged_steps(tmp_path / "full")  # each step once, as uninterrupted


def logged_steps(root: Path) -> dict[str, list[int]]:
    """Every scalar tag's logged steps (but timings) in the TensorBoard folder of the quickstart run under ``root``,
    which must be one folder, resumed or not."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (folder,) = (root / "quickstart-topk").glob("version_*")
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    return {t: [e.step for e in events.Scalars(t)] for t in events.Tags()["scalars"] if "seconds" not in t}


def test_newest_checkpoint_is_the_last_written_readable_one(tmp_path, caplog):
    """``--ckpt_path last`` resumes from ``last.ckpt``, or a step checkpoint written after it with a later step (a run
    killed between the two writes); a file cut short is skipped for the next newest."""
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
    # file times out of order (a copy or a sync that does not keep them; a touch): a step checkpoint newer than
    # last.ckpt but of an earlier step is not resumed from (that redid steps 6..10 silently)
    save("last.ckpt", 10, 500.0)
    os.utime(tmp_path / "epoch=0-step=5.ckpt", (600.0, 600.0))
    assert newest_checkpoint(tmp_path) == str(tmp_path / "last.ckpt")
    (tmp_path / "last.ckpt").unlink()  # and without last.ckpt: the latest step, whatever the file times
    assert newest_checkpoint(tmp_path) == str(tmp_path / "epoch=0-step=10.ckpt")
    # a step checkpoint written before last.ckpt is of an earlier branch, whatever its step (one moved back from the
    # folder a retraining set it aside in keeps its file time); one written after it at the same step is no later
    save("last.ckpt", 10, 500.0)
    save("epoch=0-step=30.ckpt", 30, 150.0)
    assert newest_checkpoint(tmp_path) == str(tmp_path / "last.ckpt")
    os.utime(tmp_path / "epoch=0-step=10.ckpt", (700.0, 700.0))
    assert newest_checkpoint(tmp_path) == str(tmp_path / "last.ckpt")


@pytest.mark.parametrize(("steps", "saved"), [(7, (3, 6, 7)), (6, (3, 6))])
def test_evaluation_runs_after_the_steps_checkpoint_and_last_ckpt_are_written(tmp_path, steps, saved):
    """The evaluation (seconds to minutes at GPT-2 scale) is handed each checkpoint only once the step's checkpoint
    *and* ``last.ckpt`` are on disk: a run killed while it evaluates resumes from this step, not the one before. A
    final step on the cadence is saved (and evaluated) once."""
    import lightning.pytorch as pl

    seen = []

    class Probe(pl.Callback):
        def on_sae_checkpoint(self, trainer, pl_module, path) -> None:
            last = tmp_path / "ckpts" / "last.ckpt"
            last_step = torch.load(last, weights_only=False)["global_step"] if last.exists() else None
            seen.append((Path(path).name, trainer.global_step, last_step))

    torch.manual_seed(0)
    system = build_system("topk")
    trainer = build_trainer(tmp_path, steps, callbacks=[Probe()], checkpoint_every=3)
    trainer.fit(system, datamodule=build_data(system, batch_size=4))
    # the final step (7, off the cadence) is saved at the end of training, named for the epoch it was trained in
    assert [name for name, *_ in seen] == [name for s in saved for name in (f"epoch=0-step={s}.ckpt", "last.ckpt")]
    assert all(step == last_step for _, step, last_step in seen), seen
    assert not list((tmp_path / "ckpts").glob("*.saelens"))  # export_saelens=False (build_trainer): no export


@pytest.mark.slow
def test_sigterm_saves_the_step_reached_and_the_resume_equals_uninterrupted(tmp_path):
    """SIGTERM (a scheduler's preemption or time limit) used to end the run with exit code 0, no summary and the
    steps since the last checkpoint lost. Now the step reached is saved in last.ckpt, the summary says so with the
    resume command, the exit code is 143, and the resume ends with the uninterrupted run's SAE."""
    import signal
    import time

    from tests.systems.launch import assert_same_sae, finish, start, train_args, wait_for_checkpoint

    steps, every = 30, 10
    extra = ("--checkpoint.every_n_train_steps", str(every), "--evaluation.enabled", "false")
    full = start(train_args(tmp_path / "full", steps, *extra))
    root = tmp_path / "term"
    args = train_args(root, steps, *extra)
    proc = start(args)
    ckpts = root / "quickstart-topk" / "checkpoints"
    wait_for_checkpoint(proc, ckpts)
    time.sleep(0.5)  # a few steps past the checkpoint
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "stopped (SIGTERM; last.ckpt holds the step reached)" in out and "--ckpt_path last" in out
    saved = torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"]
    head = next(line for line in out.splitlines() if line.startswith("stopped (SIGTERM"))
    assert f": {saved} steps" in head and every <= saved < steps  # the step reached, not the last checkpoint's
    assert (ckpts / "last.saelens" / "cfg.json").is_file() and not list(ckpts.glob(".*"))  # exported; no partial left
    if saved % every:  # no step checkpoint holds this step: last.ckpt and its export are written whole, not linked
        assert not (ckpts / "last.ckpt").is_symlink() and not (ckpts / "last.saelens").is_symlink()
    finish(start([*args, "--ckpt_path", "last"]))
    assert os.readlink(ckpts / "last.ckpt") == f"epoch=0-step={steps}.ckpt"  # linked again at the final checkpoint
    finish(full)
    assert_same_sae(ckpts / "last.ckpt", tmp_path / "full" / "quickstart-topk" / "checkpoints" / "last.ckpt")
    steps_logged = logged_steps(root)  # one TensorBoard run, each step once
    assert steps_logged["train/loss"][-1] == steps and all(v == sorted(set(v)) for v in steps_logged.values())


@pytest.mark.parametrize("devices", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_resume_redoes_the_export_and_evaluation_a_kill_cut_short(tmp_path, devices):
    """A run killed after writing a checkpoint but before its export and evaluation were done (the evaluation takes
    minutes at GPT-2 scale) used to leave that checkpoint without them for good. The resume, whose weights are that
    checkpoint's, now writes both; it also keeps last.ckpt when the checkpoint interval changed (Lightning filed the
    callback's state under the old interval and wrote last-v1.ckpt beside a stale last.ckpt). Under DDP rank 0 finds
    the missing files and every rank evaluates its share (a decision only rank 0 took hung the others)."""
    import json
    import shutil

    from tests.systems.launch import finish, free_port, start, train_args

    root = tmp_path / "run"
    ddp = ("--trainer.devices", "2", "--trainer.strategy", "ddp") if devices > 1 else ()
    benchmarks = ("--evaluation.benchmarks", "[loss_added,decoder_geometry]")
    args = train_args(root, 10, "--checkpoint.every_n_train_steps", "5", *benchmarks, *ddp)
    finish(start(args, MASTER_PORT=str(free_port())))
    ckpts = root / "quickstart-topk" / "checkpoints"
    want = json.loads((ckpts / "epoch=0-step=10.ckpt.eval.json").read_text())["results"]
    shutil.rmtree(ckpts / "epoch=0-step=10.saelens")  # as a kill after the checkpoint leaves it
    (ckpts / "epoch=0-step=10.ckpt.eval.json").unlink()
    args = train_args(root, 16, "--checkpoint.every_n_train_steps", "4", *benchmarks, *ddp)
    out = finish(start([*args, "--ckpt_path", "last"], MASTER_PORT=str(free_port())))
    assert "epoch=0-step=10.ckpt has no evaluation" in out
    assert ("evaluated decoder_geometry, loss_added at step 10 on 2 ranks" in out) == (devices > 1), out[-3000:]
    assert (ckpts / "epoch=0-step=10.saelens" / "cfg.json").is_file()
    again = json.loads((ckpts / "epoch=0-step=10.ckpt.eval.json").read_text())
    assert again["step"] == 10 and list(again["results"]) == ["loss_added", "decoder_geometry"]
    assert again["results"]["loss_added"]["kl_sae"] == pytest.approx(want["loss_added"]["kl_sae"], rel=1e-5)
    geometry = again["results"]["decoder_geometry"]  # under DDP from rank 1 (one benchmark each)
    assert geometry["nn_cos_median"] == pytest.approx(want["decoder_geometry"]["nn_cos_median"], rel=1e-5)
    assert not list(ckpts.glob("last-v*")) and "Please add the following callbacks" not in out
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 16
    assert (ckpts / "epoch=0-step=12.ckpt").is_file() and (ckpts / "epoch=0-step=16.ckpt").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # the resume logged on in the run's one TensorBoard folder (under DDP too: rank 0 writes it), each step once: the
    # evaluation at step 10 it did again replaces the one logged before its JSON was deleted
    assert [p.name for p in (root / "quickstart-topk").glob("version_*")] == ["version_0"]
    events = EventAccumulator(str(root / "quickstart-topk" / "version_0"), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("eval/loss_added/kl_sae")] == [5, 10, 12, 16]


def test_a_run_killed_during_its_final_evaluation_is_finished_by_the_resume(tmp_path, capsys):
    """The final evaluation is what a time limit most often cuts short, and its checkpoint is at max_steps: the resume,
    with nothing to train, used to say so and stop, leaving that checkpoint without evaluation (and export) for
    good. Now it trains nothing and writes them, with the checkpoint's weights (the same results as before)."""
    import json
    import shutil

    args = quickstart_args(tmp_path, steps=6)
    assert main(args) == 0
    ckpts = tmp_path / "quickstart-topk" / "checkpoints"
    want = json.loads((ckpts / "epoch=0-step=6.ckpt.eval.json").read_text())["results"]
    for f in ckpts.glob("*.eval.json"):  # a kill during the evaluation, after the export: the evaluation alone
        f.unlink()
    capsys.readouterr()
    assert main([*args, "--ckpt_path", "last"]) == 0
    assert f"nothing to train: {ckpts / 'last.ckpt'} is at step 6 and --trainer.max_steps is 6; its evaluation was cut " \
        "short: finishing it" in capsys.readouterr().err
    for f in ckpts.glob("*.eval.json"):  # as a kill during the final evaluation leaves the folder
        f.unlink()
    shutil.rmtree(ckpts / "epoch=0-step=6.saelens")
    capsys.readouterr()
    assert main([*args, "--ckpt_path", "last"]) == 0
    err = capsys.readouterr().err
    assert f"nothing to train: {ckpts / 'last.ckpt'} is at step 6 and --trainer.max_steps is 6; its SAELens export " \
        "and evaluation were cut short: finishing them" in err
    again = json.loads((ckpts / "epoch=0-step=6.ckpt.eval.json").read_text())
    assert again["step"] == 6 and again["results"]["loss_added"] == pytest.approx(want["loss_added"], rel=1e-5)
    assert json.loads((ckpts / "last.ckpt.eval.json").read_text())["results"] == again["results"]
    assert (ckpts / "epoch=0-step=6.saelens" / "cfg.json").is_file() and (ckpts / "last.saelens" / "cfg.json").is_file()
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 6
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["epoch=0-step=6.ckpt", "last.ckpt"]
    capsys.readouterr()
    assert main([*args, "--ckpt_path", "last"]) == 0  # nothing left: the plain note
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("(raise --trainer.max_steps to train on)")


@pytest.mark.slow
@pytest.mark.parametrize(("devices", "sig"), [(1, "SIGTERM"), (2, "SIGTERM"), (2, "SIGINT")])
def test_a_signal_to_the_whole_process_group_stops_cleanly(tmp_path, devices, sig):
    """A SIGTERM to every process of the run (``kill -TERM -<pgid>``; SLURM's time limit for ``python train.py``),
    data-loading workers included. Under Lightning-launched DDP it hung for good: Lightning's handler ran a broadcast
    inside the signal handler, once per signal received, and rank 0 forwarded the signal to the ranks, which thus got
    it twice. On one process the workers' deaths turned exit code 143 into 1 with a traceback. Now every rank stops
    at one step, saves it in last.ckpt and exits 143 (gsae.sigterm). Ctrl+C (SIGINT to the group, as a terminal
    sends it) stops cleanly with the shell's code 130 (Lightning's sys.exit(1) said "failed"), no worker tracebacks."""
    import signal
    import subprocess
    import time

    from tests.systems.launch import free_port, start, train_args, wait_for_checkpoint

    root = tmp_path / "run"
    ddp = ("--trainer.devices", "2", "--trainer.strategy", "ddp") if devices > 1 else ()
    args = train_args(root, 400, "--checkpoint.every_n_train_steps", "10", "--evaluation.enabled", "false",
                      "--data.num_workers", "2", *ddp)
    proc = start(args, new_session=True, MASTER_PORT=str(free_port()))
    ckpts = root / "quickstart-topk" / "checkpoints"
    wait_for_checkpoint(proc, ckpts)
    time.sleep(1.0)  # some steps past the checkpoint
    os.killpg(proc.pid, getattr(signal, sig))
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the run hung after {sig}:\n" + proc.communicate()[0][-3000:])
    assert proc.returncode == 128 + getattr(signal, sig), out[-3000:]
    assert "Traceback" not in out and "error" not in out, out[-3000:]
    saved = torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"]
    if sig == "SIGTERM":  # the step reached is saved
        assert saved >= 10 and f"stopped (SIGTERM; last.ckpt holds the step reached): {saved} steps" in out, out[-3000:]
    else:  # Ctrl+C keeps the last checkpoint
        assert saved % 10 == 0 and "stopped (Ctrl+C): " in out, out[-3000:]


def test_lightnings_rank_observer_lets_rank_0_finish_a_stop_the_others_finished():
    """Lightning's observer (rank 0, every 5 s) SIGKILLed rank 0 as soon as a launched rank exited non-zero: after a
    Ctrl+C (130) or SIGTERM (143) the other ranks exit once the step is saved, while rank 0 still exports it and prints
    the summary. Those codes now leave rank 0 alone; a failure (any other code) still ends every process."""
    from types import SimpleNamespace

    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    from gsae.sigterm import patient_observer

    patient_observer()
    killed = []

    def observe(*codes):
        obs = _ChildProcessObserver.__new__(_ChildProcessObserver)
        obs._child_processes = [SimpleNamespace(returncode=c, pid=100 + i, poll=lambda: None) for i, c in enumerate(codes)]
        obs._terminate_all = lambda: killed.append(codes)
        return obs._run()

    assert observe(None, None) is False and observe(0, 0) is True
    assert observe(143, None) is False and observe(130, 130) is True and observe(143, 0) is True
    assert not killed
    assert observe(1, None) is True and killed == [(1, None)]  # a rank that failed: all end, as before
    assert observe(143, 1) is True and killed[-1] == (143, 1)


def test_a_process_whose_data_iterator_is_left_alive_still_exits(tmp_path):
    """Data workers ignore SIGTERM (gsae.sigterm.quiet_worker), and multiprocessing's exit terminate()s and joins its
    children: a process that left an iterator alive (a test, a notebook, a stopped fit) waited for them forever, as
    the test suite itself did once. gsae.sigterm ends them first."""
    import subprocess
    import sys

    script = tmp_path / "left_alive.py"
    script.write_text(
        "import torch\n"
        "from torch.utils.data import DataLoader, IterableDataset\n"
        "from gsae.sigterm import quiet_worker\n"
        "class Endless(IterableDataset):\n"
        "    def __iter__(self):\n"
        "        while True:\n"
        "            yield torch.zeros(1)\n"
        "it = iter(DataLoader(Endless(), batch_size=None, num_workers=2, worker_init_fn=quiet_worker))\n"
        "next(it)\n"
        "print('exiting', flush=True)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "exiting" in done.stdout, done.stderr[-2000:]


def test_what_a_kill_left_unfinished_at_a_step_is_found_per_member(tmp_path):
    """``unfinished_at``: a sweep checkpoint with one member's export missing has its export to redo (not only when
    all are missing); with ``--checkpoint.export_saelens false`` there is none to redo; the evaluation is to redo when
    an evaluation callback has not evaluated it; no checkpoint of that step: nothing."""
    from types import SimpleNamespace

    from gsae.callbacks.checkpoint import unfinished_at

    ckpt = tmp_path / "epoch=0-step=6.ckpt"
    ckpt.write_bytes(b"")
    (tmp_path / "epoch=0-step=6.a.saelens").mkdir()
    done = SimpleNamespace(evaluated=lambda path, members: True)
    cut = SimpleNamespace(evaluated=lambda path, members: Path(path) != ckpt)
    assert unfinished_at(tmp_path, 6, ["a", "b"], [done, object()]) == (ckpt, True, False)
    assert unfinished_at(tmp_path, 6, ["a", "b"], [done], export_saelens=False) == (ckpt, False, False)
    assert unfinished_at(tmp_path, 6, ["a"], [done, cut]) == (ckpt, False, True)
    assert unfinished_at(tmp_path, 5, ["a"], [cut]) == (None, False, False)


def test_sigterm_handler_forwards_once_and_notes_the_signal(monkeypatch):
    """``gsae.sigterm.install``'s handler: the first signal is forwarded to the ranks rank 0 launched, a second one is
    not (they got it already); the evaluation callback's flag is set, and on one process Lightning's own flag, which
    its loop checks after each batch. It also puts the patient watch over the launched ranks in place."""
    from types import SimpleNamespace

    from gsae import sigterm

    kills = []
    connector = SimpleNamespace(received_sigterm=False)
    trainer = SimpleNamespace(_signal_connector=connector, local_rank=0, world_size=1,
                              strategy=SimpleNamespace(launcher=SimpleNamespace(kill=kills.append)),
                              fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace()))
    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    monkeypatch.setattr(_ChildProcessObserver, "_run", _ChildProcessObserver._run)  # put back after the test
    monkeypatch.delattr(_ChildProcessObserver, "_gsae_patient", raising=False)  # as in a fresh process
    sigterm.install(trainer)
    assert _ChildProcessObserver._gsae_patient  # Lightning's watch over the ranks is the patient one
    assert not connector.received_sigterm and not getattr(connector, "gsae_noted", False)
    connector._sigterm_notifier_fn(15, None)
    assert kills == [15] and connector.gsae_noted and connector.received_sigterm
    connector._sigterm_notifier_fn(15, None)
    assert kills == [15]  # forwarded once


def test_data_workers_leave_sigterm_and_ctrl_c_to_the_main_process():
    """``quiet_worker``: a data-loading worker ignores SIGINT and SIGTERM; a ``ddp_fork`` rank's workers keep SIGTERM."""
    import signal

    from gsae.sigterm import quiet_worker

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        quiet_worker(0, keep_sigterm=True)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        signal.signal(signal.SIGINT, signal.default_int_handler)
        quiet_worker(0)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def _agree_on_rank(rank: int, port: int, answers) -> None:
    """One of two gloo ranks: the start-of-batch exchange (``gsae.sigterm.install``'s) before and after rank 1 alone
    notes a SIGTERM."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from gsae import sigterm

    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    connector = SimpleNamespace(received_sigterm=False)
    trainer = SimpleNamespace(_signal_connector=connector, local_rank=rank, world_size=2,
                              strategy=SimpleNamespace(launcher=None, root_device=torch.device("cpu")),
                              fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace()))
    sigterm.install(trainer)
    said = []
    for signalled in (False, True):
        if signalled and rank == 1:
            connector._sigterm_notifier_fn(15, None)
            said.append(connector.received_sigterm)  # noted only: the rank does not stop alone at its batch's end
        try:
            trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor()
            said.append("go on")
        except SIGTERMException:
            said.append("stop")
    said.append(connector.received_sigterm)
    dist.destroy_process_group()
    answers.put((rank, said))


def test_a_sigterm_to_one_rank_stops_every_rank_at_the_same_batch():
    """Under DDP the exchange at the start of each batch takes any rank's noted signal (an all-reduce of the flags,
    not rank 0's alone): with no signal both go on; after rank 1 alone got one, both stop there."""
    import multiprocessing

    from tests.systems.launch import free_port

    ctx = multiprocessing.get_context("fork")
    answers, port = ctx.Queue(), free_port()
    ranks = [ctx.Process(target=_agree_on_rank, args=(r, port, answers)) for r in (0, 1)]
    for p in ranks:
        p.start()
    try:
        got = dict(answers.get(timeout=120) for _ in ranks)
    finally:
        for p in ranks:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert got == {0: ["go on", "stop", True], 1: ["go on", False, "stop", True]}


def test_a_sigterm_at_a_step_just_saved_leaves_its_last_ckpt_alone(tmp_path):
    """SIGTERM at a step whose checkpoint, ``last.ckpt`` link and evaluation are all written already (the signal
    noted during that step's evaluation): nothing to save, and ``last.ckpt``'s evaluation JSON stays (saving again
    relinked ``last.ckpt`` and removed it)."""
    from types import SimpleNamespace

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from gsae.callbacks.checkpoint import SAECheckpoint

    step = tmp_path / "epoch=0-step=5.ckpt"
    step.write_bytes(b"step 5")
    (tmp_path / "epoch=0-step=5.saelens").mkdir()
    (tmp_path / "last.ckpt").symlink_to(step.name)
    (tmp_path / "last.saelens").symlink_to("epoch=0-step=5.saelens")
    (tmp_path / "last.ckpt.eval.json").write_text('{"step": 5}')
    cb = SAECheckpoint(dirpath=str(tmp_path), every_n_train_steps=5)
    cb._last_global_step_saved, cb._step_checkpoint = 5, (5, str(step))
    trainer = SimpleNamespace(global_step=5, current_epoch=0, callback_metrics={}, is_global_zero=True,
                              lightning_module=SimpleNamespace(saes=lambda: {"": None}),
                              strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj))
    cb.on_exception(trainer, None, SIGTERMException())
    assert (tmp_path / "last.ckpt.eval.json").read_text() == '{"step": 5}'
    assert os.readlink(tmp_path / "last.ckpt") == step.name and cb._to_announce == []
