"""Writing run files so that a kill, a full disk or a preemption never leaves a cut-short file where a good one was.

Every file of a run folder (checkpoints, SAELens exports, evaluation JSON, dashboards) is written under a hidden
temporary name *in its own folder* and renamed over the target, which is atomic on one filesystem. Lightning's own
save goes through fsspec, which writes to ``$TMPDIR`` and then moves the file: across filesystems (a tmpfs
``/tmp``, a cluster's scratch) that move is a copy over the old checkpoint, which a kill cuts short, and a full
``/tmp`` stops every save although the run folder has room.
"""

from __future__ import annotations

import os
import shutil
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


def replace_dir(tmp: str | Path, path: str | Path) -> None:
    """Move the finished folder ``tmp`` to ``path`` (an older ``path`` is removed first: a crash in between leaves no
    folder, never a half-written one)."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def remove_partials(folder: str | Path) -> list[Path]:
    """Remove what a killed write left in ``folder`` (``.<name>.partial`` files and folders); returns them."""
    removed = []
    for p in Path(folder).glob(f".*{PARTIAL}"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p)
    return removed


class SameFolderCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` for local paths without the detour through ``$TMPDIR``: ``torch.save`` to
    ``.<name>.partial`` beside the target, ``fsync``, rename. Remote paths (``s3://``, ...) go to Lightning's."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path) or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with replacing(path, sync=True) as tmp:
            torch.save(checkpoint, tmp)
