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
