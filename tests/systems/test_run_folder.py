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
def test_a_resume_from_a_moved_or_respelled_folder_updates_last_ckpt(tmp_path, monkeypatch):
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
    assert main([*args, "--trainer.default_root_dir", "moved", "--trainer.max_steps", "6", "--ckpt_path", "last"]) == 0
    moved = tmp_path / "moved" / "quickstart-topk" / "checkpoints"
    assert sorted(p.name for p in moved.glob("last*")) == ["last.ckpt", "last.saelens"]
    assert step_of(moved / "last.ckpt") == 6 and step_of(ckpts / "last.ckpt") == 4  # the original untouched
    assert sorted(p.name for p in moved.glob("*.ckpt")) == [f"epoch=0-step={s}.ckpt" for s in (2, 4, 6)] + ["last.ckpt"]
