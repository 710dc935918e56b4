"""Multi-node DDP simulated on one machine: 2 "nodes" × 1 process on 127.0.0.1, launched as the README says
(torchrun on each node; the variables ``srun`` sets; or plain ``python train.py`` with MASTER_ADDR/MASTER_PORT/
NODE_RANK as another launcher sets them), through
``python train.py``; the run ends where the 2-process single-node run ends."""

from __future__ import annotations

import re
import shutil

import pytest

from tests.systems.launch import assert_same_sae, finish, free_port, start, train_args

STEPS = 6


@pytest.fixture(scope="module")
def single_node(tmp_path_factory):
    """``python train.py --trainer.devices 2 --trainer.strategy ddp``: Lightning starts the second process."""
    root = tmp_path_factory.mktemp("single-node")
    finish(start(train_args(root, STEPS, "--trainer.devices", "2", "--trainer.strategy", "ddp"),
                 MASTER_PORT=str(free_port())))
    return root / "quickstart-topk" / "checkpoints" / "last.ckpt"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "srun", "env"])
def test_two_nodes_equal_two_processes_on_one_node(tmp_path, single_node, launcher):
    port = str(free_port())
    nodes = []
    for node_rank in (0, 1):
        root = tmp_path / f"node{node_rank}"  # each "node" has its own disk
        args = train_args(root, STEPS, "--trainer.devices", "1", "--trainer.num_nodes", "2", "--trainer.strategy", "ddp")
        if launcher == "torchrun":  # README: torchrun --nnodes 2 --nproc-per-node 1 --node-rank R --master-addr … train.py
            torchrun = [shutil.which("torchrun") or "torchrun", "--nnodes", "2", "--nproc-per-node", "1",
                        "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", port]
            nodes.append(start(args, launcher=torchrun))
        elif launcher == "srun":  # what `srun` exports to each task of `sbatch --nodes 2 --ntasks-per-node 1` (SLURMEnvironment)
            slurm = dict(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="2", SLURM_PROCID=str(node_rank),
                         SLURM_LOCALID="0", SLURM_NODEID=str(node_rank), SLURM_NODELIST="127.0.0.1",
                         SLURM_JOB_ID="4242", SLURM_JOB_NAME="gsae", MASTER_PORT=port)
            nodes.append(start(args, **slurm))
        else:  # the variables a launcher exports on each node (Lightning's LightningEnvironment reads these)
            nodes.append(start(args, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node_rank)))
    logs = [finish(p) for p in nodes]
    for node_rank, log in enumerate(logs):  # each "node" really was its own rank of one 2-process group
        assert f"GLOBAL_RANK: {node_rank}, MEMBER: {node_rank + 1}/2" in log, log[-2000:]
    ckpt = tmp_path / "node0" / "quickstart-topk" / "checkpoints" / "last.ckpt"
    assert_same_sae(ckpt, single_node)
    assert not list((tmp_path / "node1").rglob("*.ckpt")), "only global rank 0 writes checkpoints"


def test_the_failed_ranks_are_named_as_ranges() -> None:
    """Rank 0's line names the ranks that failed before training in ranges (``ranks 0-2, 5 of 8 failed``)."""
    from gsae.cli import _ranges

    assert _ranges([3]) == "3"
    assert _ranges([2, 3]) == "2-3"
    assert _ranges([0, 1, 2, 5]) == "0-2, 5"
    assert _ranges([1, 3, 4, 7]) == "1, 3-4, 7"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "srun", "env-2-per-node"])
def test_a_check_failing_on_one_node_stops_every_node_at_once(tmp_path, single_node, launcher):
    """Resuming where only node 0 sees the run folder (each node its own disk): node 1's ``--ckpt_path last`` finds no
    checkpoint. Node 1 used to stop while node 0 waited for it in DDP's set-up (Lightning's 30-minute timeout); now
    every rank learns of it before training and all stop, rank 0 naming the failed rank and why. ``env-2-per-node``:
    plain ``python train.py`` per node with 2 devices each, whose second local rank Lightning starts (here before
    the checks agree, not in ``fit``); node 0's checkpoint stays as it was."""
    import subprocess

    run = single_node.parent.parent
    shutil.copytree(run, tmp_path / "node0" / run.name)
    before = (tmp_path / "node0" / run.name / "checkpoints" / "last.ckpt").read_bytes()
    port, devices = str(free_port()), "2" if launcher == "env-2-per-node" else "1"
    nodes = []
    for node_rank in (0, 1):
        args = train_args(tmp_path / f"node{node_rank}", STEPS + 2, "--trainer.devices", devices,
                          "--trainer.num_nodes", "2", "--trainer.strategy", "ddp", "--ckpt_path", "last")
        if launcher == "torchrun":
            torchrun = [shutil.which("torchrun") or "torchrun", "--nnodes", "2", "--nproc-per-node", "1",
                        "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", port]
            nodes.append(start(args, launcher=torchrun))
        elif launcher == "srun":
            slurm = dict(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="2", SLURM_PROCID=str(node_rank),
                         SLURM_LOCALID="0", SLURM_NODEID=str(node_rank), SLURM_NODELIST="127.0.0.1",
                         SLURM_JOB_ID="4243", SLURM_JOB_NAME="gsae", MASTER_PORT=port)
            nodes.append(start(args, **slurm))
        else:
            nodes.append(start(args, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node_rank)))
    try:
        outs = [p.communicate(timeout=240)[0] for p in nodes]
    except subprocess.TimeoutExpired:
        for p in nodes:
            p.kill()
        raise AssertionError("a node waited for the one that stopped") from None
    assert [p.returncode for p in nodes] == [1, 1], outs
    first = int(devices)  # node 1's first global rank
    no_ckpt = "--ckpt_path last: no readable checkpoint in"
    assert f"error (rank {first}): {no_ckpt}" in outs[1], outs[1][-2000:]
    ranks = f"{first}-{2 * first - 1}" if first > 1 else str(first)
    want = f"error: rank{'s' * (first > 1)} {ranks} of {2 * first} failed before training, so all stop ({no_ckpt}"
    assert want in outs[0], outs[0][-2000:]
    # one line each (torchrun adds its own ChildFailedError report for any worker that exits with an error)
    assert not re.search(r'File ".*(/gsae/|train\.py)"', outs[0] + outs[1]), outs
    assert (tmp_path / "node0" / run.name / "checkpoints" / "last.ckpt").read_bytes() == before
    assert not list((tmp_path / "node0" / run.name / "checkpoints").glob("*step=8*"))
