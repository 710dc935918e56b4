"""Run files are written whole or not at all (gsae.files): a kill, a full disk or a $TMPDIR on another filesystem
never leaves a cut-short checkpoint, export or evaluation JSON where a good one was."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from gsae.files import SameFolderCheckpointIO, partial_path, remove_partials, write_text


def test_checkpoints_are_written_beside_the_target_not_in_tmpdir(tmp_path, monkeypatch):
    """Lightning's save wrote to $TMPDIR and moved the file: across filesystems a copy over the old checkpoint (a
    kill cut it short), and a full /tmp stopped every save. Ours never touches $TMPDIR."""
    import tempfile

    def no_tmp(*a, **kw):
        raise AssertionError("a temporary file outside the checkpoint's folder")

    monkeypatch.setattr(tempfile, "mkstemp", no_tmp)  # what Lightning's save (fsspec's transaction) calls
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", no_tmp)
    io = SameFolderCheckpointIO()
    target = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, target)
    assert torch.load(target, weights_only=True)["global_step"] == 1
    assert not partial_path(target).exists()


def test_a_runs_checkpoints_are_written_by_the_same_folder_writer(tmp_path, monkeypatch):
    """``SAECheckpoint.setup`` puts the writer above in place of Lightning's: a fit's step checkpoints and
    ``last.ckpt`` never touch $TMPDIR. A writer of the user's own (not Lightning's default) is kept."""
    import tempfile

    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from tests.systems.helpers import build_data, build_system, build_trainer

    def no_tmp(*a, **kw):
        raise AssertionError("a temporary file outside the checkpoint's folder")

    monkeypatch.setattr(tempfile, "mkstemp", no_tmp)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", no_tmp)
    system = build_system("topk")
    trainer = build_trainer(tmp_path, 3, checkpoint_every=3)
    trainer.fit(system, datamodule=build_data(system, batch_size=4))
    assert type(trainer.strategy.checkpoint_io) is SameFolderCheckpointIO
    assert torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=False)["global_step"] == 3

    class Mine(TorchCheckpointIO):
        pass

    monkeypatch.undo()
    system = build_system("topk")
    trainer = build_trainer(tmp_path / "mine", 1, checkpoint_every=1, plugins=[Mine()])
    trainer.fit(system, datamodule=build_data(system, batch_size=4))
    assert type(trainer.strategy.checkpoint_io) is Mine


def test_a_failed_save_leaves_the_old_checkpoint_and_no_partial(tmp_path, monkeypatch):
    io = SameFolderCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, target)

    def cut_short(obj, f, *a, **kw):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", cut_short)
    with pytest.raises(OSError, match=r"could not write checkpoint .*last\.ckpt: the disk is full \(0.0 MiB written"):
        io.save_checkpoint({"global_step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True)["global_step"] == 1
    assert not partial_path(target).exists()


FULL = """
import resource, shutil, signal, sys
import torch
import gsae.files
from gsae.files import SameFolderCheckpointIO
target = sys.argv[1]
SameFolderCheckpointIO().save_checkpoint({"global_step": 1}, target)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
if sys.argv[2] == "full":  # as statvfs reports a full disk
    usage = shutil.disk_usage(".")
    gsae.files.shutil.disk_usage = lambda p: usage._replace(free=4096)
try:
    SameFolderCheckpointIO().save_checkpoint({"global_step": 2, "w": torch.ones(2**20)}, target)
except OSError as e:
    print(f"error: {e}")
"""


@pytest.mark.parametrize("case", ["full", "limit"])
def test_torch_saves_own_failure_is_said_in_words(tmp_path, case):
    """``torch.save`` cut short by the filesystem raises ``[enforce fail at inline_container.cc:672] . unexpected pos
    2599419008 vs 2599418896`` (what CI printed when a Table 1 sweep's checkpoint filled its disk). Written past a
    real file-size limit (torch's own writer and error): the error names the checkpoint and the space left, calls a
    full disk full, and the old checkpoint stays whole."""
    import subprocess
    import sys

    target = tmp_path / "epoch=0-step=2.ckpt"
    out = subprocess.run([sys.executable, "-c", FULL, str(target), case], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    line = out.stdout.strip()
    assert line.startswith(f"error: could not write checkpoint {target}: "), line
    if case == "full":
        assert "the disk is full (1.0 MiB written, 0.0 MiB of " in line, line
    else:
        assert "unexpected pos" in line and "a quota or file-size limit?" in line, line
    assert "the checkpoints already written are kept" in line and "--checkpoint.save_top_k" in line
    assert torch.load(target, weights_only=True)["global_step"] == 1 and not partial_path(target).exists()


def test_text_and_exports_are_replaced_whole(tmp_path, monkeypatch):
    from gsae import export as export_mod
    from gsae.sae import TopKSAE

    path = tmp_path / "x.eval.json"
    write_text(path, "old")
    with pytest.raises(TypeError):
        write_text(path, None)  # fails while writing
    assert path.read_text() == "old" and not partial_path(path).exists()

    sae, meta = TopKSAE(8, 16, 2), {"hook": "blocks.0.hook_resid_pre", "sae_class": "gsae.sae.TopKSAE"}
    folder = export_mod.export_saelens(sae, tmp_path / "a.saelens", meta)
    before = (folder / "sae_weights.safetensors").read_bytes()

    def full_disk(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_mod, "save_file", full_disk)
    with torch.no_grad():
        sae.W_enc.add_(1.0)
    with pytest.raises(OSError):
        export_mod.export_saelens(sae, folder, meta)
    assert (folder / "sae_weights.safetensors").read_bytes() == before and (folder / "cfg.json").is_file()
    assert [p.name for p in remove_partials(tmp_path)] == [".a.saelens.partial"]  # what the next run's setup removes


def test_exported_weights_follow_the_umask(tmp_path):
    """safetensors writes 0600 whatever the umask: teammates on a shared machine could not read an export."""
    from gsae.export import export_saelens
    from gsae.sae import TopKSAE

    old = os.umask(0o022)
    try:
        folder = export_saelens(TopKSAE(8, 16, 2), tmp_path / "e.saelens", {"sae_class": "gsae.sae.TopKSAE"})
    finally:
        os.umask(old)
    assert stat.S_IMODE((folder / "sae_weights.safetensors").stat().st_mode) == 0o644


def test_checkpoint_state_of_an_older_key_is_taken():
    """Checkpoints written before SAECheckpoint's state key left out the interval still resume its bookkeeping."""
    from gsae.callbacks.checkpoint import SAECheckpoint

    cb = SAECheckpoint(every_n_train_steps=4)
    old_key = "SAECheckpoint{'monitor': None, 'mode': 'max', 'every_n_train_steps': 5, 'every_n_epochs': 0, " \
              "'train_time_interval': None}"
    ckpt = {"callbacks": {old_key: {"last_model_path": "/x/last.ckpt"}, "RunSummary": {}}}
    cb.on_load_checkpoint(None, None, ckpt)
    assert ckpt["callbacks"] == {cb.state_key: {"last_model_path": "/x/last.ckpt"}, "RunSummary": {}}
    assert "every_n_train_steps" not in cb.state_key


def test_quota_and_size_limits_are_not_called_a_full_disk(tmp_path):
    import errno

    from gsae.files import write_error

    tmp = tmp_path / ".x.ckpt.partial"
    tmp.write_bytes(b"x" * 2**20)
    said = {code: str(write_error(OSError(code, "…"), tmp, tmp_path / "x.ckpt")) for code in (errno.EDQUOT, errno.EFBIG)}
    assert ": the disk quota is exceeded (1.0 MiB written, " in said[errno.EDQUOT]
    assert ": the file-size limit is reached (1.0 MiB written, " in said[errno.EFBIG]
    assert write_error(OSError(errno.EACCES, "denied"), tmp, tmp_path / "x.ckpt") is None  # said as it is
    assert write_error(ValueError("x"), tmp, tmp_path / "x.ckpt") is None


def test_a_text_write_cut_short_leaves_the_old_file(tmp_path, monkeypatch):
    """A kill or a full disk in the middle of writing an evaluation JSON leaves the old JSON whole."""
    from pathlib import Path

    path = tmp_path / "x.eval.json"
    write_text(path, '{"old": 1}')

    def half_then_full(self, text, *a, **kw):
        with open(self, "w") as fh:
            fh.write(text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full)
    with pytest.raises(OSError):
        write_text(path, '{"new": 2, "more": 3}')
    monkeypatch.undo()
    assert path.read_text() == '{"old": 1}' and not partial_path(path).exists()
    write_text(path, '{"new": 2}')
    assert path.read_text() == '{"new": 2}' and sorted(p.name for p in tmp_path.iterdir()) == ["x.eval.json"]


def test_a_checkpoint_is_fsynced_before_it_is_renamed_over_the_old_one(tmp_path, monkeypatch):
    """Renamed before its data reached the disk, a power cut could leave an empty last.ckpt where a whole one was."""
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_ino)), fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), replace(a, b)))
    target = tmp_path / "last.ckpt"
    SameFolderCheckpointIO().save_checkpoint({"global_step": 3}, target)
    assert events == [("fsync", target.stat().st_ino), ("replace", str(partial_path(target)))]  # the file renamed
    assert torch.load(target, weights_only=True)["global_step"] == 3


def test_symlink_replaces_a_file_a_link_or_a_folder_and_leaves_no_partial(tmp_path, monkeypatch):
    """``last.ckpt``/``last.saelens`` become relative links over whatever is there: a step checkpoint's link, a whole
    file or folder (``save_last true`` before), or a link a killed run left half made."""
    import shutil

    from gsae.files import symlink

    (tmp_path / "step=2.saelens").mkdir()
    (tmp_path / "step=4.saelens").mkdir()
    link = tmp_path / "last.saelens"
    (link / "sub").mkdir(parents=True)  # a whole export (save_last true) ...
    (link / "sub" / "cfg.json").write_text("{}")
    symlink(tmp_path / "step=2.saelens", link)  # ... replaced by a link
    assert os.readlink(link) == "step=2.saelens"
    os.symlink("elsewhere", partial_path(link))  # what a kill between making the link and the rename left
    symlink(tmp_path / "step=4.saelens", link)
    assert os.readlink(link) == "step=4.saelens" and (tmp_path / "step=2.saelens").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.saelens", "step=2.saelens", "step=4.saelens"]

    def refused(*a, **kw):
        raise OSError(13, "Permission denied")

    link.unlink()
    link.mkdir()
    monkeypatch.setattr(shutil, "rmtree", refused)  # the old folder cannot go: the error, and no link left behind
    with pytest.raises(OSError):
        symlink(tmp_path / "step=4.saelens", link)
    assert link.is_dir() and not link.is_symlink() and not os.path.lexists(partial_path(link))


def test_remove_takes_a_link_not_what_it_points_at(tmp_path):
    from gsae.files import remove

    (tmp_path / "step=4.saelens").mkdir()
    (tmp_path / "step=4.saelens" / "cfg.json").write_text("{}")
    os.symlink("step=4.saelens", tmp_path / "last.saelens")
    remove(tmp_path / "last.saelens")
    assert not os.path.lexists(tmp_path / "last.saelens") and (tmp_path / "step=4.saelens" / "cfg.json").is_file()
    remove(tmp_path / "step=4.saelens")
    remove(tmp_path / "never-there")
    assert list(tmp_path.iterdir()) == []


def test_remove_partials_removes_only_what_killed_writes_left(tmp_path):
    (tmp_path / ".last.ckpt.partial").write_bytes(b"half")
    (tmp_path / ".a.saelens.partial").mkdir()
    (tmp_path / ".a.saelens.partial" / "sae_weights.safetensors").write_bytes(b"half")
    (tmp_path / "last.ckpt").write_bytes(b"whole")
    (tmp_path / "notes.partial").write_text("mine, not hidden")
    assert sorted(p.name for p in remove_partials(tmp_path)) == [".a.saelens.partial", ".last.ckpt.partial"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "notes.partial"]


def test_sizes_are_said_in_mib_below_one_gib_and_gib_from_it():
    from gsae.files import size_text

    assert size_text(2**30) == "1.0 GiB" and size_text(2**30 - 2**20) == "1023.0 MiB"
    assert size_text(5.3 * 2**20) == "5.3 MiB" and size_text(2.6 * 2**30) == "2.6 GiB"


def test_remote_checkpoint_paths_go_to_lightnings_writer(tmp_path, monkeypatch):
    """``s3://``-style paths are not local files: written through fsspec, with no ``s3:`` folder made locally."""
    import fsspec

    monkeypatch.chdir(tmp_path)
    SameFolderCheckpointIO().save_checkpoint({"global_step": 5}, "memory://gsae-test/ckpts/last.ckpt")
    try:
        with fsspec.open("memory://gsae-test/ckpts/last.ckpt", "rb") as fh:
            assert torch.load(fh, weights_only=True)["global_step"] == 5
    finally:
        fsspec.filesystem("memory").rm("/gsae-test", recursive=True)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_save_not_for_lack_of_room_is_raised_as_it_is(tmp_path, monkeypatch):
    io = SameFolderCheckpointIO()
    target = tmp_path / "last.ckpt"

    def denied(obj, f, *a, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(torch, "save", denied)
    with pytest.raises(PermissionError, match="Permission denied"):
        io.save_checkpoint({"global_step": 2}, target)
    assert list(tmp_path.iterdir()) == []


def test_an_export_replaces_an_older_export_or_a_link_to_one(tmp_path):
    """``save_last true`` writes ``last.saelens`` again at every checkpoint: over the previous whole export, or over the
    link a linked ``last.saelens`` was (the step export it pointed at is kept)."""
    from safetensors.torch import load_file

    from gsae.export import export_saelens
    from gsae.sae import TopKSAE

    sae, meta = TopKSAE(8, 16, 2), {"hook": "blocks.0.hook_resid_pre", "sae_class": "gsae.sae.TopKSAE"}
    step = export_saelens(sae, tmp_path / "step=2.saelens", meta)
    os.symlink("step=2.saelens", tmp_path / "last.saelens")
    for shift in (1.0, 2.0):
        with torch.no_grad():
            sae.W_enc.add_(shift)
        last = export_saelens(sae, tmp_path / "last.saelens", meta)
        assert not last.is_symlink() and (last / "cfg.json").is_file()
        torch.testing.assert_close(load_file(last / "sae_weights.safetensors")["W_enc"], sae.W_enc.detach())
    assert (step / "cfg.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["last.saelens", "step=2.saelens"]
