"""Multi-node DDP simulated on one machine: 2 "nodes" × 1 process on 127.0.0.1, launched as the README says
(torchrun on each node; the variables ``srun`` sets; or plain ``python train.py`` with MASTER_ADDR/MASTER_PORT/
NODE_RANK as another launcher sets them), through
``python train.py``; the run ends where the 2-process single-node run ends."""

from __future__ import annotations

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
