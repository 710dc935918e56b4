"""Run ``python train.py`` (or ``torchrun … train.py``) as a separate process, as a user or a cluster launcher does."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from gsae.cli import REPO_ROOT

QUICKSTART = str(REPO_ROOT / "configs" / "quickstart" / "topk.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(root: Path, steps: int, *extra: str) -> list[str]:
    """The offline TopK quickstart (shuffle buffer on), ``steps`` steps, everything under ``root``."""
    return [
        "--config", QUICKSTART,
        "--trainer.max_steps", str(steps),
        "--trainer.default_root_dir", str(root),
        "--trainer.enable_progress_bar", "false",
        "--trainer.accelerator", "cpu",
        *extra,
    ]


def env(**extra: str) -> dict[str, str]:
    launcher_vars = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
    out = {k: v for k, v in os.environ.items() if k not in launcher_vars and not k.startswith("SLURM_")}
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), out.get("PYTHONPATH")) if p)
    out.update(PYTHONPATH=pythonpath, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    return out


def start(args: list[str], launcher: list[str] | None = None, new_session: bool = False,
          **env_extra: str) -> subprocess.Popen:
    """``train.py args`` started (``new_session``: in a process group of its own, to signal it as a terminal or a
    scheduler does, ``os.killpg``)."""
    cmd = [*(launcher or [sys.executable]), "train.py", *args]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env(**env_extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=new_session)


def wait_for_checkpoint(proc: subprocess.Popen, ckpts: Path, timeout: float = 600) -> None:
    """Until the run's first checkpoint is written whole (its ``last.saelens`` export, the last thing written)."""
    import time

    deadline = time.monotonic() + timeout
    while not (ckpts / "last.saelens" / "cfg.json").exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{proc.args} failed ({proc.returncode}):\n{out[-3000:]}"
    return out


def sae_state(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    return {k: v for k, v in state["state_dict"].items() if k.startswith("sae.")} | {"step": state["global_step"]}


def assert_same_sae(a: Path, b: Path, atol: float = 1e-6) -> None:
    sa, sb = sae_state(a), sae_state(b)
    assert sa.keys() == sb.keys() and sa["step"] == sb["step"]
    for k in sa:
        if k != "step":
            assert torch.allclose(sa[k], sb[k], atol=atol, rtol=1e-5), f"{k} differs by {(sa[k] - sb[k]).abs().max():.2e}"
