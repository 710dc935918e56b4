"""``torchrun --nproc-per-node N evaluate.py RUN``: each checkpoint's evaluation split between the processes as the
training callback splits it (benchmarks and a sweep's members), rank 0 writing what a one-process ``evaluate.py``
writes (the reference: the command without torchrun, on the same checkpoints)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from gsae.cli import REPO_ROOT
from gsae.evaluate import main as evaluate_main
from tests.evals.test_callback_and_cli import SMALL_OPTIONS
from tests.systems.launch import env, free_port
from tests.systems.test_ddp_evaluation import _same

BENCHMARKS = "loss_added,dead_latents,steering,sensitive_directions,decoder_geometry"
ARGS = ["--benchmarks", BENCHMARKS, "--n-seqs", "4", "--context-size", "32", "--device", "cpu",
        "--options", json.dumps(SMALL_OPTIONS)]


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    """The offline sweep quickstart (2 TopK and 2 g-SAE members), 4 steps, checkpoints at 2 and 4."""
    from gsae.cli import main

    tmp = tmp_path_factory.mktemp("sweep")
    assert main(["--config", "configs/quickstart/sweep.yaml", "--trainer.max_steps", "4",
                 "--trainer.default_root_dir", str(tmp), "--trainer.enable_progress_bar", "false",
                 "--checkpoint.every_n_train_steps", "2", "--evaluation.enabled", "false"]) == 0
    return tmp / "quickstart-sweep"


def torchrun(*args: str, **extra: str) -> subprocess.CompletedProcess:
    cmd = [shutil.which("torchrun") or "torchrun", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "evaluate.py", *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env(**extra), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_torchrun_evaluate_py_equals_one_process(sweep_run, tmp_path):
    assert evaluate_main([str(sweep_run), *ARGS, "--output", str(tmp_path / "one.json")]) == 0
    proc = torchrun(str(sweep_run), *ARGS, "--output", str(tmp_path / "two.json"), "--logdir", str(tmp_path / "tb"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["settings"] == one["settings"]  # also each SAE's tokens: the contexts every benchmark read
    one, two = one["results"], two["results"]
    assert list(two) == BENCHMARKS.split(",") and list(two["loss_added"]) == list(one["loss_added"])
    assert len(one["loss_added"]) == 8  # 2 checkpoints × 4 members
    _same(two, one)
    assert proc.stdout.count("loss_added.L_added") == 1  # the table, from rank 0 only
    assert "on 2 ranks" in proc.stderr
    runs = sorted(p.name for p in (tmp_path / "tb").iterdir())
    assert len(runs) == 4 and all(len(list((tmp_path / "tb" / r).glob("events.*"))) == 1 for r in runs)


@pytest.mark.slow
def test_torchrun_evaluate_py_stops_every_rank_when_one_fails(sweep_run, tmp_path, monkeypatch):
    """A rank that cannot load an SAE (planted on rank 1) stops every rank at once: rank 0 names it and its error,
    one line; nothing is written."""
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import gsae.evaluate as ev\n"
        "    def load(*args, **kwargs):\n"
        "        raise OSError('planted: disk gone on rank 1')\n"
        "    ev.load = load\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(planted))
    ckpt = sweep_run / "checkpoints" / "epoch=0-step=2.ckpt"
    out = tmp_path / "res.json"
    proc = torchrun(str(ckpt), *ARGS, "--output", str(out))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert errors == ["error: rank 1 failed: planted: disk gone on rank 1"], proc.stderr[-3000:]
    assert not out.exists()
