"""Writing run files so that a kill, a full disk or a preemption never leaves a cut-short file where a good one was.

Every file of a run folder (checkpoints, SAELens exports, evaluation JSON, dashboards) is written under a hidden
temporary name *in its own folder* and renamed over the target, which is atomic on one filesystem. Lightning's own
save goes through fsspec, which writes to ``$TMPDIR`` and then moves the file: across filesystems (a tmpfs
``/tmp``, a cluster's scratch) that move is a copy over the old checkpoint, which a kill cuts short, and a full
``/tmp`` stops every save although the run folder has room.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from typing_extensions import override

PARTIAL = ".partial"  # suffix of the temporary names (hidden: a leading dot; never matched by *.ckpt)


def partial_path(path: str | Path) -> Path:
    """The temporary name ``path`` is written under before the rename: ``.<name>.partial`` in the same folder."""
    p = Path(path)
    return p.with_name(f".{p.name}{PARTIAL}")


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` under the process umask: what ``open()`` would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replacing(path: str | Path, sync: bool = False) -> Iterator[Path]:
    """Write a file to the yielded temporary name beside ``path``; on success it is (``sync``: fsynced and) renamed
    over ``path``, on failure removed, so the old content, or none, survives."""
    tmp = partial_path(path)
    try:
        yield tmp
        if sync:
            _sync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`replacing`)."""
    with replacing(path) as tmp:
        tmp.write_text(text)


def remove(path: str | Path, ignore_errors: bool = False) -> None:
    """Remove the file, folder or link ``path`` (a link, not what it points at: ``last.saelens`` linked to a step
    checkpoint's export leaves that export); nothing if there is none."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=ignore_errors)
    else:
        path.unlink(missing_ok=True)


def replace_dir(tmp: str | Path, path: str | Path) -> None:
    """Move the finished folder ``tmp`` to ``path`` (an older ``path``, or a link there, is removed first: a crash in
    between leaves no folder, never a half-written one)."""
    remove(path)
    os.replace(tmp, path)


def symlink(target: str | Path, path: str | Path) -> None:
    """Make ``path`` a symbolic link to ``target`` (relative to ``path``'s folder, so the two can move together),
    replacing what is there: the link is made under a temporary name and renamed over a file or link (atomic); a
    folder is removed first (a crash in between leaves none, as :func:`replace_dir`)."""
    path = Path(path)
    tmp = partial_path(path)
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, path.parent), tmp)
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_partials(folder: str | Path) -> list[Path]:
    """Remove what a killed write left in ``folder`` (``.<name>.partial`` files and folders); returns them."""
    removed = []
    for p in Path(folder).glob(f".*{PARTIAL}"):
        remove(p, ignore_errors=True)
        removed.append(p)
    return removed


def unwritable(folder: str | Path) -> str | None:
    """Why files cannot be made in ``folder`` (or, where it does not exist yet, in its nearest existing parent, where
    it would be made), or ``None`` if they can: tried with a real file, since permission bits do not tell (root
    ignores them; a read-only mount, ``/proc`` or a quota refuse anyway)."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        return f"{p} is a file, not a folder"
    try:
        fd, name = tempfile.mkstemp(dir=p, prefix=".gsae-write-check.")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        return f"cannot write in {p} ({e.strerror or e})"
    return None


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written, said in words (``torch.save`` on a full disk says ``[enforce fail at
    inline_container.cc:672] . unexpected pos 2599419008 vs 2599418896``)."""

    def __str__(self) -> str:
        return str(self.args[0])


def size_text(n: float) -> str:
    """A byte count for people: ``2.6 GiB``, ``5.3 MiB``."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def write_error(e: BaseException, tmp: Path, path: str | Path) -> CheckpointWriteError | None:
    """What to raise for ``e``, raised while writing checkpoint ``path`` to ``tmp`` (still there), or ``None`` to
    raise ``e`` as it is: a full disk (under 16 MiB left beside the partial file) or a quota is named, with the space
    left and how much was written."""
    code = e.errno if isinstance(e, OSError) else None
    if code not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) and not (
            isinstance(e, RuntimeError) and "enforce fail" in str(e)):
        return None
    usage = shutil.disk_usage(tmp.parent)
    written = tmp.stat().st_size if tmp.exists() else 0
    if code == errno.ENOSPC or usage.free < 16 * 2**20:
        why = "the disk is full"
    elif code in (errno.EDQUOT, errno.EFBIG):
        why = "the disk quota is exceeded" if code == errno.EDQUOT else "the file-size limit is reached"
    else:
        why = f"{str(e).splitlines()[0]}; a quota or file-size limit?"
    return CheckpointWriteError(
        f"could not write checkpoint {path}: {why} ({size_text(written)} written, {size_text(usage.free)} of {size_text(usage.total)} "
        "free there); the checkpoints already written are kept: free space, or keep fewer with --checkpoint.save_top_k"
    )


class SameFolderCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` for local paths without the detour through ``$TMPDIR``: ``torch.save`` to
    ``.<name>.partial`` beside the target, ``fsync``, rename. Remote paths (``s3://``, ...) go to Lightning's."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path) or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with replacing(path, sync=True) as tmp:
            try:
                torch.save(checkpoint, tmp)
            except (RuntimeError, OSError) as e:
                said = write_error(e, tmp, path)
                if said is None:
                    raise
                raise said from e
