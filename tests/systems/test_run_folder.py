"""One run, one folder: ``--trainer.default_root_dir`` holds everything a training run writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gsae.cli import REPO_ROOT, build_cli, main


def _tree(folder: Path) -> dict[str, float]:
    """Every file under ``folder`` with its modification time (empty if the folder does not exist)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def _disk_free(monkeypatch, free) -> None:
    """``shutil.disk_usage`` answering ``free`` bytes free: a number, or a function of the folder asked about."""
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(2**40, 0, free(folder) if callable(free) else free))


@pytest.mark.slow
def test_default_root_dir_holds_the_whole_run(tmp_path, monkeypatch):
    cwd, root = tmp_path / "cwd", tmp_path / "elsewhere" / "run-root"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    repo_checkpoints = _tree(REPO_ROOT / "checkpoints")
    args = [
        "--config", str(REPO_ROOT / "configs" / "quickstart" / "topk.yaml"),
        "--trainer.max_steps", "4",
        "--trainer.val_check_interval", "2",
        "--checkpoint.every_n_train_steps", "2",
        "--trainer.default_root_dir", str(root),
        "--trainer.enable_progress_bar", "false",
    ]
    assert main(args) == 0
    assert os.listdir(cwd) == [], "the run wrote into the working directory"
    assert _tree(REPO_ROOT / "checkpoints") == repo_checkpoints, "the run wrote into the repository's checkpoints/"
    assert sorted(os.listdir(tmp_path)) == ["cwd", "elsewhere"]
    run = root / "quickstart-topk"  # the config's run name under the chosen root
    assert sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) == [
        "epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"
    ]
    assert (run / "checkpoints" / "last.saelens" / "cfg.json").exists()
    assert (run / "version_0" / "config.yaml").exists()
    assert list((run / "version_0").glob("events.out.tfevents.*"))
    # and --ckpt_path last finds this run's last.ckpt from anywhere
    assert main([*args, "--trainer.max_steps", "6", "--ckpt_path", "last"]) == 0
    assert (run / "checkpoints" / "epoch=0-step=6.ckpt").exists()
    assert os.listdir(cwd) == []


def test_an_explicit_logger_save_dir_is_kept(tmp_path):
    cfg = str(REPO_ROOT / "configs" / "quickstart" / "topk.yaml")
    cli = build_cli(["--config", cfg, "--trainer.default_root_dir", str(tmp_path / "a"),
                     "--trainer.logger.init_args.save_dir", str(tmp_path / "tb")])
    assert Path(cli.trainer.logger.root_dir) == tmp_path / "tb" / "quickstart-topk"
    cli = build_cli(["--config", cfg])  # the default root stays checkpoints/
    assert Path(cli.trainer.logger.root_dir) == Path("checkpoints") / "quickstart-topk"
    assert Path(cli.trainer.default_root_dir).resolve() == Path("checkpoints").resolve()


@pytest.mark.slow
def test_a_resume_from_a_moved_or_respelled_folder_updates_last_ckpt(tmp_path, monkeypatch, capsys, recwarn):
    """The run folder given relatively, then absolutely; then the folder copied elsewhere and resumed there: each
    resume writes ``last.ckpt`` again (no ``last-v1.ckpt`` beside a stale one) and ``--ckpt_path last`` goes on from
    the latest step."""
    import shutil

    import torch

    monkeypatch.chdir(tmp_path)
    args = ["--config", str(REPO_ROOT / "configs" / "quickstart" / "topk.yaml"), "--trainer.enable_progress_bar", "false",
            "--checkpoint.every_n_train_steps", "2", "--evaluation.enabled", "false"]

    def step_of(path: Path) -> int:
        return int(torch.load(path, weights_only=False, map_location="cpu")["global_step"])

    assert main([*args, "--trainer.default_root_dir", "runs", "--trainer.max_steps", "2"]) == 0
    ckpts = tmp_path / "runs" / "quickstart-topk" / "checkpoints"
    assert main([*args, "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.max_steps", "4",
                 "--ckpt_path", "last"]) == 0
    assert sorted(p.name for p in ckpts.glob("last*")) == ["last.ckpt", "last.saelens"]
    assert step_of(ckpts / "last.ckpt") == 4
    shutil.copytree(tmp_path / "runs", tmp_path / "moved")
    capsys.readouterr()
    recwarn.clear()
    assert main([*args, "--trainer.default_root_dir", "moved", "--trainer.max_steps", "6", "--ckpt_path", "last"]) == 0
    moved = tmp_path / "moved" / "quickstart-topk" / "checkpoints"
    # the saved paths are taken as this folder's: Lightning's "won't be reloaded" warning has nothing to say
    assert "dirpath has changed" not in capsys.readouterr().err
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]
    assert sorted(p.name for p in moved.glob("last*")) == ["last.ckpt", "last.saelens"]
    assert step_of(moved / "last.ckpt") == 6 and step_of(ckpts / "last.ckpt") == 4  # the original untouched
    assert sorted(p.name for p in moved.glob("*.ckpt")) == [f"epoch=0-step={s}.ckpt" for s in (2, 4, 6)] + ["last.ckpt"]


@pytest.mark.slow
def test_last_ckpt_links_the_newest_step_checkpoint(tmp_path, monkeypatch, caplog):
    """``last.ckpt`` and ``last.saelens`` are relative links to the newest step checkpoint and its export (each
    checkpoint written once: a Table 1 sweep's is ~3.5 GB); its evaluation JSON is its own, the step's results. A
    step checkpoint deleted by hand leaves a dangling ``last.ckpt``: ``--ckpt_path last`` and ``evaluate.py RUN``
    skip it. ``--checkpoint.save_last true`` writes it whole; a folder that takes no links falls back to that."""
    import json
    import logging
    import shutil

    import torch

    from gsae.evaluate import _run_folder

    monkeypatch.chdir(tmp_path)
    args = ["--config", str(REPO_ROOT / "configs" / "quickstart" / "topk.yaml"), "--trainer.enable_progress_bar", "false",
            "--checkpoint.every_n_train_steps", "2", "--trainer.default_root_dir", "runs"]
    step_of = lambda p: int(torch.load(p, weights_only=False, map_location="cpu")["global_step"])  # noqa: E731
    assert main([*args, "--trainer.max_steps", "4", "--evaluation.benchmarks", "[dead_latents]"]) == 0
    ckpts = tmp_path / "runs" / "quickstart-topk" / "checkpoints"
    assert os.readlink(ckpts / "last.ckpt") == "epoch=0-step=4.ckpt"
    assert os.readlink(ckpts / "last.saelens") == "epoch=0-step=4.saelens"
    assert (ckpts / "last.saelens" / "cfg.json").is_file()
    assert not (ckpts / "epoch=0-step=2.ckpt").is_symlink() and not (ckpts / "epoch=0-step=4.saelens").is_symlink()
    last_json = json.loads((ckpts / "last.ckpt.eval.json").read_text())
    step_json = json.loads((ckpts / "epoch=0-step=4.ckpt.eval.json").read_text())
    assert not (ckpts / "last.ckpt.eval.json").is_symlink() and last_json["checkpoint"] == "last.ckpt"
    assert last_json["results"] == step_json["results"] and last_json["step"] == 4
    assert sorted(p.name for p in ckpts.glob(".*")) == []  # no link left half made
    # evaluate.py RUN lists each step once, under its own name
    assert [(c.name, info[0]) for c, info in _run_folder(ckpts)] == [("epoch=0-step=2.ckpt", 2), ("epoch=0-step=4.ckpt", 4)]

    # the run moved: relative links still resolve; deleting the newest step checkpoint leaves last.ckpt dangling
    shutil.move(tmp_path / "runs", tmp_path / "moved")
    ckpts = tmp_path / "moved" / "quickstart-topk" / "checkpoints"
    assert step_of(ckpts / "last.ckpt") == 4
    (ckpts / "epoch=0-step=4.ckpt").unlink()
    with caplog.at_level(logging.WARNING, logger="gsae.cli"):
        assert main([*args[:-1], "moved", "--trainer.max_steps", "6", "--ckpt_path", "last",
                     "--evaluation.enabled", "false"]) == 0
    assert "skipping last.ckpt (a link to epoch=0-step=4.ckpt, which is gone)" in caplog.text
    assert os.readlink(ckpts / "last.ckpt") == "epoch=0-step=6.ckpt" and step_of(ckpts / "last.ckpt") == 6
    assert os.readlink(ckpts / "last.saelens") == "epoch=0-step=6.saelens"
    assert not (ckpts / "last.ckpt.eval.json").exists()  # the old state's JSON went with the old link
    assert [c.name for c, _ in _run_folder(ckpts)] == [f"epoch=0-step={s}.ckpt" for s in (2, 4, 6)]  # 4 written again

    # save_last true: written whole, the link replaced by a file; the JSON of the state last.ckpt held goes with it
    (ckpts / "last.ckpt.eval.json").write_text('{"step": 6}')
    assert main([*args[:-1], "moved", "--trainer.max_steps", "8", "--ckpt_path", "last", "--evaluation.enabled",
                 "false", "--checkpoint.save_last", "true"]) == 0
    assert not (ckpts / "last.ckpt").is_symlink() and not (ckpts / "last.saelens").is_symlink()
    assert step_of(ckpts / "last.ckpt") == 8 and (ckpts / "last.saelens" / "cfg.json").is_file()
    assert (ckpts / "epoch=0-step=6.saelens" / "cfg.json").is_file()  # the export the link pointed at is kept
    assert not (ckpts / "last.ckpt.eval.json").exists()  # evaluation off: no JSON of step 8, and none of step 6 left

    # a filesystem without symbolic links: a warning, then last.ckpt written whole
    def no_links(*a, **k):
        raise OSError("Operation not permitted")

    monkeypatch.setattr(os, "symlink", no_links)
    with caplog.at_level(logging.WARNING):
        assert main([*args[:-1], "moved", "--trainer.max_steps", "10", "--ckpt_path", "last",
                     "--evaluation.enabled", "false"]) == 0
    assert "could not link" in caplog.text and "writing last.ckpt whole" in caplog.text
    assert not (ckpts / "last.ckpt").is_symlink() and step_of(ckpts / "last.ckpt") == 10
    assert (ckpts / "last.saelens" / "cfg.json").is_file() and not list(ckpts.glob(".*"))


@pytest.mark.slow
def test_the_first_checkpoint_warns_when_the_rest_will_not_fit(tmp_path, monkeypatch, caplog):
    """Measured by the checkpoint just written and its export: with room for 2.5 more, a run with 4 still to come is
    told at step 2 that it will stop at step 8's (once); keeping 2 (``--checkpoint.save_top_k 2``) fits."""
    import logging

    def room(folder):  # 2.5 checkpoints with their exports
        ckpt = next(Path(folder).glob("epoch=0-step=2.ckpt"), None)
        if ckpt is None:
            return 2**40
        size = ckpt.stat().st_size + sum(f.stat().st_size for f in ckpt.with_suffix(".saelens").glob("*"))
        return int(2.5 * size)

    _disk_free(monkeypatch, room)
    args = ["--config", str(REPO_ROOT / "configs" / "quickstart" / "topk.yaml"), "--trainer.enable_progress_bar", "false",
            "--checkpoint.every_n_train_steps", "2", "--trainer.max_steps", "10", "--evaluation.enabled", "false"]
    with caplog.at_level(logging.WARNING, logger="gsae.callbacks.checkpoint"):
        assert main([*args, "--trainer.default_root_dir", str(tmp_path / "all")]) == 0
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("checkpoints: ")]
    assert len(said) == 1, said
    assert " each with its exports; the 4 still to come (to step 10) need " in said[0]
    assert "the run will stop on a full disk at the checkpoint of step 8" in said[0] and "--checkpoint.save_top_k" in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gsae.callbacks.checkpoint"):
        assert main([*args, "--trainer.default_root_dir", str(tmp_path / "two"), "--checkpoint.save_top_k", "2"]) == 0
    assert not [r for r in caplog.records if r.getMessage().startswith("checkpoints: ")]
    assert sorted(p.name for p in (tmp_path / "two").rglob("*.ckpt")) == ["epoch=0-step=10.ckpt", "epoch=0-step=8.ckpt",
                                                                       "last.ckpt"]
    caplog.clear()  # a whole last.ckpt (save_last true, not a link) is a second copy of each checkpoint: stops sooner
    with caplog.at_level(logging.WARNING, logger="gsae.callbacks.checkpoint"):
        assert main([*args, "--trainer.default_root_dir", str(tmp_path / "copy"), "--checkpoint.save_last", "true"]) == 0
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("checkpoints: ")]
    assert len(said) == 1 and "the run will stop on a full disk at the checkpoint of step 6" in said[0], said


@pytest.mark.parametrize(("save_top_k", "save_last", "free", "said"), [
    (-1, "link", 4499, "the 3 still to come (to step 10)"),  # steps 6, 9 and the final 10: room for 2
    (-1, "link", 4500, None),
    (2, True, 5999, "the 2 still to come (to step 10)"),  # 2 kept, 1 on disk (last.ckpt, a copy, not counted): 2 more
    (2, True, 6000, None),  # ... each with its whole last.ckpt copy: 2 * 2 * 1500 bytes
])
def test_the_room_check_counts_the_checkpoints_still_to_come_by_hand(tmp_path, monkeypatch, caplog, save_top_k, save_last,
                                                                     free, said):
    """``_check_room`` at step 3 of 10, every 3 steps, measured by a 1000-byte checkpoint with a 500-byte export: the
    final step off the cadence is one more checkpoint; with ``save_top_k`` the ones still to come are those kept
    beyond the step checkpoints on disk (a whole ``last.ckpt`` is not one of them) plus the next, written before the
    oldest goes; a whole ``last.ckpt`` doubles each."""
    import logging
    from types import SimpleNamespace

    from gsae.callbacks.checkpoint import SAECheckpoint

    ckpt = tmp_path / "epoch=0-step=3.ckpt"
    ckpt.write_bytes(b"x" * 1000)
    (tmp_path / "epoch=0-step=3.saelens").mkdir()
    (tmp_path / "epoch=0-step=3.saelens" / "sae_weights.safetensors").write_bytes(b"x" * 500)
    if save_last is True:
        (tmp_path / "last.ckpt").write_bytes(b"x" * 1000)
    _disk_free(monkeypatch, free)
    cb = SAECheckpoint(dirpath=str(tmp_path), every_n_train_steps=3, save_top_k=save_top_k, save_last=save_last)
    trainer = SimpleNamespace(max_steps=10, global_step=3, is_global_zero=True,
                              lightning_module=SimpleNamespace(saes=lambda: {"": None}))
    with caplog.at_level(logging.WARNING, logger="gsae.callbacks.checkpoint"):
        cb._check_room(trainer, str(ckpt))
        cb._check_room(trainer, str(ckpt))  # once per run
    warned = [r.getMessage() for r in caplog.records]
    if said is None:
        assert warned == []
    else:
        assert len(warned) == 1 and said in warned[0], warned
        stops = 10 if save_top_k < 0 else 9  # room for 2 (6, 9) / for 1 with its copy (6): the next one fails
        assert f"at the checkpoint of step {stops}." in warned[0], warned


def test_a_whole_last_ckpt_is_not_measured_for_the_room_check(tmp_path, monkeypatch, caplog):
    """The room check measures step checkpoints only: ``last.ckpt`` written whole at a step with no step checkpoint
    (a SIGTERM's save, as the run stops) says nothing about the checkpoints to come."""
    import logging
    from types import SimpleNamespace

    from gsae.callbacks.checkpoint import SAECheckpoint

    _disk_free(monkeypatch, 10)
    cb = SAECheckpoint(dirpath=str(tmp_path), every_n_train_steps=3, export_saelens=False)
    trainer = SimpleNamespace(max_steps=10, global_step=4, is_global_zero=True, loggers=[],
                              save_checkpoint=lambda path, weights_only=False: Path(path).write_bytes(b"x" * 1000))
    cb._saving_last = True  # as Lightning's _save_last_checkpoint calls it
    with caplog.at_level(logging.WARNING, logger="gsae.callbacks.checkpoint"):
        cb._save_checkpoint(trainer, str(tmp_path / "last.ckpt"))
    assert (tmp_path / "last.ckpt").stat().st_size == 1000 and not caplog.records


def test_retraining_from_an_earlier_step_sets_the_later_checkpoints_aside(tmp_path, monkeypatch, caplog):
    """A resume from an earlier checkpoint with another checkpoint interval: the abandoned continuation's later
    checkpoints (which the new run never writes again) move beside the checkpoint folder, so `evaluate.py RUN` lists
    one history and `--ckpt_path last` after a kill does not resume the abandoned branch (last.ckpt linked to its
    newest step)."""
    from gsae.cli import newest_checkpoint, roll_back
    from gsae.evaluate import _run_folder
    from tests.conftest import quickstart_args

    monkeypatch.chdir(REPO_ROOT)
    off = ("--evaluation.enabled", "false")
    assert main(quickstart_args(tmp_path, "--checkpoint.every_n_train_steps", "10", *off, steps=30)) == 0
    run = tmp_path / "quickstart-topk"
    ckpts = run / "checkpoints"
    step10 = ckpts / "epoch=0-step=10.ckpt"
    copy = tmp_path / "copy"  # the moment after the set-aside, before the resumed run writes anything
    import shutil

    shutil.copytree(ckpts, copy / "checkpoints", symlinks=True)
    roll_back(str(copy / "checkpoints" / step10.name), 10)
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["epoch=0-step=10.ckpt", "epoch=0-step=10.saelens"]
    assert newest_checkpoint(copy / "checkpoints").endswith("epoch=0-step=10.ckpt")  # not the abandoned step 30
    with caplog.at_level("WARNING"):
        assert main(quickstart_args(tmp_path, "--checkpoint.every_n_train_steps", "15", "--ckpt_path", str(step10), *off,
                                    steps=25)) == 0
    aside = run / "checkpoints.superseded-after-step10"
    assert f"(epoch=0-step=20.ckpt, epoch=0-step=30.ckpt) are moved to {aside}" in caplog.text
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["epoch=0-step=10.ckpt", "epoch=0-step=15.ckpt",
                                                            "epoch=0-step=25.ckpt", "last.ckpt"]
    assert os.readlink(ckpts / "last.ckpt") == "epoch=0-step=25.ckpt"
    assert sorted(p.name for p in aside.glob("*.ckpt")) == ["epoch=0-step=20.ckpt", "epoch=0-step=30.ckpt"]
    assert [info[0] for _, info in _run_folder(run)] == [10, 15, 25]  # evaluate.py RUN: one history


def test_an_unwritable_tensorboard_folder_or_branch_folder_is_refused_before_anything_moves(tmp_path, monkeypatch,
                                                                                             capsys):
    """A resume into a run whose TensorBoard folder cannot be written used to fail with the writer threads'
    tracebacks, and a retraining from an earlier step moved the later checkpoints aside before failing there: now
    one line, before anything is moved. A checkpoint of a branch set aside is refused with how to go back to it."""
    from gsae import files
    from tests.conftest import quickstart_args

    monkeypatch.chdir(REPO_ROOT)
    off = ("--evaluation.enabled", "false", "--checkpoint.every_n_train_steps", "5")
    assert main(quickstart_args(tmp_path, *off, steps=10)) == 0
    run = tmp_path / "quickstart-topk"
    files_of = lambda: {k: v for k, v in _tree(run).items() if not (run / k).is_dir()}  # noqa: E731 - dirs: the write checks
    before = files_of()
    real = files.unwritable
    denied = {run / "version_0"}
    monkeypatch.setattr(files, "unwritable", lambda f: "cannot write in it (Permission denied)"
                        if Path(f).absolute() in denied else real(f))
    step5 = run / "checkpoints" / "epoch=0-step=5.ckpt"
    for resume in ("last", str(step5)):
        capsys.readouterr()
        assert main(quickstart_args(tmp_path, *off, "--ckpt_path", resume, steps=15)) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == (f"error: --trainer.default_root_dir: the run's TensorBoard events go to {run / 'version_0'}, "
                           "but cannot write in it (Permission denied)")
        assert files_of() == before  # nothing moved, nothing written
    denied = {run}  # the run folder, where the retraining would set the later checkpoints aside
    monkeypatch.setattr(files, "unwritable", lambda f: "cannot write in it (Permission denied)"
                        if Path(f).absolute() == run else real(f))
    from gsae.cli import roll_back

    with pytest.raises(PermissionError, match=r"retraining from it sets the later checkpoints aside beside .*checkpoints, "
                       r"but cannot write in it \(Permission denied\)$"):
        roll_back(str(step5), 5)
    assert files_of() == before
    monkeypatch.setattr(files, "unwritable", real)
    # through train.py it is refused among the checks every rank agrees on (torchrun: the other ranks went on into
    # the fit, to wait there for rank 0), before the roll-back itself is reached
    import gsae.cli

    def refuse(ckpt):
        raise PermissionError(f"--ckpt_path {ckpt}: refused (the test's)")

    with monkeypatch.context() as m:
        m.setattr(gsae.cli, "_check_set_aside_writable", refuse)
        m.setattr(gsae.cli, "roll_back", lambda *a, **k: pytest.fail("the roll-back ran before the check"))
        capsys.readouterr()
        assert main(quickstart_args(tmp_path, *off, "--ckpt_path", str(step5), steps=15)) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: --ckpt_path {step5}: refused (the test's)"
    assert files_of() == before
    assert main(quickstart_args(tmp_path, *off, "--ckpt_path", str(step5), steps=8)) == 0  # a branch set aside
    aside = run / "checkpoints.superseded-after-step5" / "epoch=0-step=10.ckpt"
    assert aside.is_file()
    capsys.readouterr()
    assert main(quickstart_args(tmp_path, *off, "--ckpt_path", str(aside), steps=12)) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --ckpt_path: {aside} is in a branch a retraining set aside; to go back to it, move "
        f"{run / 'checkpoints'} aside and rename checkpoints.superseded-after-step5 to checkpoints, then resume with "
        "--ckpt_path last")


def test_a_resume_with_a_lower_save_top_k_keeps_the_newest_checkpoints(tmp_path, monkeypatch, capsys, recwarn):
    """A full disk's error advises --checkpoint.save_top_k; on a resume it freed nothing (Lightning counts only the
    checkpoints its saved state lists: none when the run kept all) and warned that the callback was missing (the
    monitor, which save_top_k sets, was in the state's key). Now the folder's step checkpoints count, newest first,
    the surplus going once the resumed run has written a newer one; and back to -1, nothing is removed."""
    from tests.conftest import quickstart_args

    monkeypatch.chdir(REPO_ROOT)
    off = ("--evaluation.enabled", "false", "--checkpoint.every_n_train_steps", "5")
    ckpts = tmp_path / "quickstart-topk" / "checkpoints"
    steps = lambda: sorted(int(p.name.split("step=")[1][:-5]) for p in ckpts.glob("epoch=*.ckpt"))  # noqa: E731
    assert main(quickstart_args(tmp_path, *off, steps=20)) == 0
    assert steps() == [5, 10, 15, 20]
    recwarn.clear()
    assert main(quickstart_args(tmp_path, *off, "--checkpoint.save_top_k", "2", "--ckpt_path", "last", steps=30)) == 0
    assert steps() == [25, 30] and sorted(p.name for p in ckpts.glob("*.saelens")) == [
        "epoch=0-step=25.saelens", "epoch=0-step=30.saelens", "last.saelens"]
    assert os.readlink(ckpts / "last.ckpt") == "epoch=0-step=30.ckpt"
    assert not [w for w in recwarn if "add the following callbacks" in str(w.message)]
    assert "add the following callbacks" not in capsys.readouterr().err
    assert main(quickstart_args(tmp_path, *off, "--checkpoint.save_top_k", "-1", "--ckpt_path", "last", steps=40)) == 0
    assert steps() == [25, 30, 35, 40]
    assert "add the following callbacks" not in capsys.readouterr().err


def test_a_resume_with_another_gradient_reduction_is_refused(tmp_path, capsys):
    """A g-SAE's ∇ₓL scale travels in its checkpoint; a changed --model.grad_mean_tokens was refused, but a changed
    --model.grad_reduction was kept as the checkpoint's without a word while the resume's config recorded the new one
    (audit F). Both are refused in one line now."""
    def gsae(steps: int, *extra: str) -> list[str]:
        return ["--config", "configs/quickstart/gsae.yaml", "--evaluation.enabled", "false", "--trainer.max_steps",
                str(steps), "--checkpoint.every_n_train_steps", "2", "--trainer.default_root_dir", str(tmp_path),
                "--trainer.enable_progress_bar", "false", *extra]

    assert main(gsae(2)) == 0
    capsys.readouterr()
    assert main(gsae(4, "--model.grad_reduction", "sum", "--ckpt_path", "last")) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --model.grad_reduction sum differs from the checkpoint's (mean, over 1008 predictions); resume with the "
        "checkpoint's")
    assert main(gsae(4, "--model.grad_mean_tokens", "500", "--ckpt_path", "last")) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --model.grad_mean_tokens (500) differs from the checkpoint's (1008)")


def test_setting_aside_moves_only_checkpoints_past_the_resumed_step(tmp_path):
    """What a retraining from step 4 sets aside: the steps after 4 with what lies beside them, never a checkpoint of
    step 4 itself (a whole-copy last.ckpt where links are not made, e.g. a remote file system) nor an earlier one;
    a last.ckpt linked to a moved step goes with it."""
    import torch

    from gsae.callbacks.checkpoint import set_aside_later_checkpoints

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name, step in (("epoch=0-step=2.ckpt", 2), ("epoch=0-step=4.ckpt", 4), ("last.ckpt", 4), ("epoch=0-step=6.ckpt", 6),
                       ("epoch=0-step=8.ckpt", 8)):
        torch.save({"global_step": step, "gsae": {}}, folder / name)
    (folder / "epoch=0-step=6.ckpt.eval.json").write_text("{}")
    (folder / "epoch=0-step=8.saelens").mkdir()
    (folder / "latest.ckpt").symlink_to("epoch=0-step=8.ckpt")
    dest, moved = set_aside_later_checkpoints(folder, 4, folder / "epoch=0-step=4.ckpt")
    assert moved == ["epoch=0-step=6.ckpt", "epoch=0-step=8.ckpt"]
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]
    assert sorted(p.name for p in dest.iterdir()) == ["epoch=0-step=6.ckpt", "epoch=0-step=6.ckpt.eval.json",
                                                      "epoch=0-step=8.ckpt", "epoch=0-step=8.saelens"]
    assert set_aside_later_checkpoints(folder, 4, folder / "epoch=0-step=4.ckpt") is None  # nothing later now


def test_setting_aside_again_at_one_step_links_and_unreadable_files(tmp_path):
    """Each roll-back to one step gets its own folder (``-2``, ``-3``: the second roll-back's files never land in the
    first's); what links to a moved checkpoint goes (``latest.saelens`` too, dangling once its export moved), a link to
    a kept one stays; an unreadable ``.ckpt`` is left where it is; a checkpoint name with glob characters takes its
    JSON along."""
    import torch

    from gsae.callbacks.checkpoint import set_aside_later_checkpoints

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name, step in (("epoch=0-step=2.ckpt", 2), ("epoch=0-step=4.ckpt", 4)):
        torch.save({"global_step": step, "gsae": {}}, folder / name)
    (folder / "broken.ckpt").write_bytes(b"cut short")  # unreadable: neither moved nor an error
    (folder / "previous.ckpt").symlink_to("epoch=0-step=2.ckpt")  # a link to a kept checkpoint stays
    dests = []
    for n in range(3):  # three abandoned continuations after step 4
        torch.save({"global_step": 6, "gsae": {}}, folder / "run[a]-step=6.ckpt")
        (folder / "run[a]-step=6.ckpt.eval.json").write_text(str(n))
        (folder / "run[a]-step=6.saelens").mkdir()
        (folder / "latest.ckpt").symlink_to("run[a]-step=6.ckpt")
        (folder / "latest.saelens").symlink_to("run[a]-step=6.saelens")
        (folder / "latest.ckpt.eval.json").symlink_to("run[a]-step=6.ckpt.eval.json")
        dest, moved = set_aside_later_checkpoints(folder, 4, folder / "epoch=0-step=4.ckpt")
        assert moved == ["run[a]-step=6.ckpt"]
        dests.append(dest.name)
        assert sorted(p.name for p in folder.iterdir()) == ["broken.ckpt", "epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt",
                                                          "previous.ckpt"]
        assert os.readlink(folder / "previous.ckpt") == "epoch=0-step=2.ckpt"
        assert sorted(p.name for p in dest.iterdir()) == ["run[a]-step=6.ckpt", "run[a]-step=6.ckpt.eval.json",
                                                          "run[a]-step=6.saelens"]
        assert (dest / "run[a]-step=6.ckpt.eval.json").read_text() == str(n)  # this continuation's, not an earlier one's
    assert dests == ["checkpoints.superseded-after-step4", "checkpoints.superseded-after-step4-2",
                     "checkpoints.superseded-after-step4-3"]


def test_a_new_start_beside_an_earlier_start_without_checkpoints_says_so(tmp_path, monkeypatch, caplog):
    """A run stopped before its first checkpoint (Ctrl+C) leaves its curves in version_0; the command the summary
    suggests starts over beside them in version_1, which TensorBoard draws over them: one line says so and what to
    remove. A first start in the folder says nothing."""
    from tests.conftest import quickstart_args

    monkeypatch.chdir(REPO_ROOT)
    off = ("--evaluation.enabled", "false", "--checkpoint.every_n_train_steps", "50")
    run = tmp_path / "quickstart-topk"
    with caplog.at_level("WARNING", logger="gsae.cli"):
        assert main(quickstart_args(tmp_path, *off, steps=3)) == 0
    assert "earlier start" not in caplog.text
    for p in (run / "checkpoints").iterdir():  # as if it had stopped before its first checkpoint
        p.unlink() if p.is_file() or p.is_symlink() else __import__("shutil").rmtree(p)
    caplog.clear()
    with caplog.at_level("WARNING", logger="gsae.cli"):
        assert main(quickstart_args(tmp_path, *off, steps=3)) == 0
    assert (f"{run} holds the TensorBoard curves of an earlier start that wrote no checkpoint (version_0): this run "
            "logs beside them, in the next version_N; remove version_0 to see this run alone") in caplog.text
    assert sorted(p.name for p in run.glob("version_*")) == ["version_0", "version_1"]


def test_a_resume_lowering_save_top_k_keeps_the_newest_after_one_new_checkpoint(tmp_path, monkeypatch):
    from gsae.cli import main
    from tests.conftest import quickstart_args

    monkeypatch.chdir(REPO_ROOT)
    off = ("--evaluation.enabled", "false", "--checkpoint.every_n_train_steps", "5")
    ckpts = tmp_path / "quickstart-topk" / "checkpoints"
    steps = lambda: sorted(int(p.name.split("step=")[1][:-5]) for p in ckpts.glob("epoch=*.ckpt"))  # noqa: E731
    assert main(quickstart_args(tmp_path, *off, steps=20)) == 0
    (ckpts / ".epoch=0-step=23.ckpt.partial").write_bytes(b"cut short")  # what a killed save leaves
    (ckpts / ".epoch=0-step=23.saelens.partial").mkdir()
    assert main(quickstart_args(tmp_path, *off, "--checkpoint.save_top_k", "2", "--ckpt_path", "last", steps=25)) == 0
    assert steps() == [20, 25]
    assert not list(ckpts.glob(".*"))  # the resume's setup removed the partial files


def test_a_resume_counts_the_folders_step_checkpoints_newest_first(tmp_path):
    """``_keep_newest`` (a resume with ``save_top_k`` 2): the step checkpoints on disk, by the step each holds (not
    its name), the newest two kept and the rest the surplus, newest first; a whole ``last.ckpt`` (a copy of step 20),
    a link and an unreadable file are none of them."""
    import torch

    from gsae.callbacks.checkpoint import SAECheckpoint

    for name, step in (("a.ckpt", 15), ("b.ckpt", 5), ("c.ckpt", 20), ("d.ckpt", 10), ("last.ckpt", 20)):
        torch.save({"global_step": step, "gsae": {}}, tmp_path / name)
    (tmp_path / "newest.ckpt").symlink_to("c.ckpt")
    (tmp_path / "broken.ckpt").write_bytes(b"cut short")
    cb = SAECheckpoint(dirpath=str(tmp_path), every_n_train_steps=5, save_top_k=2)
    cb._keep_newest()
    assert {Path(p).name: float(v) for p, v in cb.best_k_models.items()} == {"c.ckpt": 20.0, "a.ckpt": 15.0}
    assert [Path(p).name for p in cb._surplus] == ["d.ckpt", "b.ckpt"]
    assert Path(cb.best_model_path).name == "c.ckpt" and Path(cb.kth_best_model_path).name == "a.ckpt"
    assert float(cb.kth_value) == 15.0
    cb = SAECheckpoint(dirpath=str(tmp_path), every_n_train_steps=5, save_top_k=5)  # room for all: no k-th yet
    cb._keep_newest()
    assert len(cb.best_k_models) == 4 and cb._surplus == [] and cb.kth_best_model_path == ""


def test_the_checkpoint_folder_is_the_given_one_else_under_the_run_name(tmp_path):
    """``checkpoint_folder``: ``--checkpoint.dirpath`` if given, else ``<default_root_dir>/<logger name>/checkpoints``,
    ``run`` standing for a logger without a name or no logger."""
    from types import SimpleNamespace

    from gsae.callbacks.checkpoint import SAECheckpoint, checkpoint_folder

    def trainer(logger):
        return SimpleNamespace(logger=logger, default_root_dir=str(tmp_path))

    named = SimpleNamespace(name="quickstart-topk")
    assert checkpoint_folder(trainer(named), SAECheckpoint()) == tmp_path / "quickstart-topk" / "checkpoints"
    assert checkpoint_folder(trainer(None), SAECheckpoint()) == tmp_path / "run" / "checkpoints"
    assert checkpoint_folder(trainer(SimpleNamespace(name="")), SAECheckpoint()) == tmp_path / "run" / "checkpoints"
    assert checkpoint_folder(trainer(named), SAECheckpoint(dirpath=str(tmp_path / "mine"))) == tmp_path / "mine"


def test_a_resume_from_the_newest_step_s_own_checkpoint_rolls_nothing_back(tmp_path):
    """A resume from the step checkpoint of the newest step, beside a ``last.ckpt`` of that step (a copy, as with
    ``--checkpoint.save_last true``), retrains nothing: no later checkpoint to set aside (a roll-back would warn that
    the checkpoints after that step are gone); from an earlier step, the newest is the one reached."""
    import torch

    from gsae.cli import _later_checkpoints

    for i, (name, step) in enumerate([("epoch=0-step=10.ckpt", 10), ("epoch=0-step=20.ckpt", 20), ("last.ckpt", 20)]):
        torch.save({"gsae": {}, "global_step": step}, tmp_path / name)
        os.utime(tmp_path / name, (100.0 + i, 100.0 + i))
    assert _later_checkpoints(str(tmp_path / "epoch=0-step=20.ckpt"), 20) is None
    assert _later_checkpoints(str(tmp_path / "epoch=0-step=10.ckpt"), 10) == (tmp_path / "last.ckpt", 20)


def test_a_roll_back_says_the_step_resumed_and_the_step_reached(tmp_path, monkeypatch, caplog):
    from gsae.cli import main
    from tests.conftest import quickstart_args

    monkeypatch.chdir(REPO_ROOT)
    off = ("--evaluation.enabled", "false", "--checkpoint.every_n_train_steps", "10")
    assert main(quickstart_args(tmp_path, *off, steps=30)) == 0
    step10 = tmp_path / "quickstart-topk" / "checkpoints" / "epoch=0-step=10.ckpt"
    with caplog.at_level("WARNING", logger="gsae.cli"):
        assert main(quickstart_args(tmp_path, *off, "--ckpt_path", str(step10), steps=20)) == 0
    assert "resuming from step 10 of a run that reached step 30 (last.ckpt)" in caplog.text, caplog.text


def test_an_empty_tensorboard_version_folder_is_not_called_an_earlier_start(tmp_path, monkeypatch, caplog):
    from gsae.cli import main
    from tests.conftest import quickstart_args

    monkeypatch.chdir(REPO_ROOT)
    (tmp_path / "quickstart-topk" / "version_0").mkdir(parents=True)  # a start that logged nothing
    with caplog.at_level("WARNING", logger="gsae.cli"):
        assert main(quickstart_args(tmp_path, "--evaluation.enabled", "false", steps=3)) == 0
    assert "earlier start" not in caplog.text
