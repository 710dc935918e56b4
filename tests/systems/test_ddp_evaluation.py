"""The evaluation of a checkpoint under DDP: the ranks split its benchmarks (and a sweep's members) and rank 0 gathers
them, so its time shrinks with the ranks. What rank 0 writes equals a one-process evaluation of the same weights
(the independent reference: the callback's sequential path over the same held-out tokens)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from gsae.callbacks import EvaluationCallback
from gsae.evals import BENCHMARK_COST, Task, evaluation_tasks, json_text, split_tasks, task_cost
from gsae.systems import SweepSAESystem
from tests.systems.helpers import build_data, build_system, build_trainer

STEPS = 4
#: every default benchmark, at budgets that take seconds on random-tiny
OPTIONS = {
    "loss_added": {"n_seqs": 8},
    "dead_latents": {"batch_tokens": 64},
    "steering": {"n_seqs": 8, "n_latents": 4, "n_positions": 2},
    "sensitive_directions": {"n_seqs": 2, "lengths": [1, 3]},
    "decoder_geometry": {"n_seqs": 8, "n_per_bin": 2},
    "latents": {"n_seqs": 8, "n_latents": 4},
}
SWEEP = [
    {"name": "topk", "sae": {"class_path": "TopKSAE", "init_args": {"d_sae": 64, "k": 4, "k_aux": 8, "seed": 1}}},
    {"name": "gsae", "sae": {"class_path": "GradTopKSAE", "init_args": {"d_sae": 48, "k": 3, "beta": 1e4, "seed": 2}}},
    {"name": "gsae2", "sae": {"class_path": "GradTopKSAE", "init_args": {"d_sae": 64, "k": 4, "beta": 1e3, "seed": 3}}},
]


class RecordTasks(pl.Callback):
    """Writes the tasks each rank evaluated at each checkpoint to ``<folder>/tasks<rank>.json``."""

    def __init__(self, folder, evaluation: EvaluationCallback) -> None:
        self.folder, self.evaluation, self.seen = folder, evaluation, []

    def on_sae_checkpoint(self, trainer, pl_module, path) -> None:
        self.seen.append([[t.benchmark, list(t.members), t.part] for t in self.evaluation.last_tasks])

    def on_train_end(self, trainer, pl_module) -> None:
        (self.folder / f"tasks{trainer.global_rank}.json").write_text(json.dumps(self.seen))


def _same(a, b, where: str = "") -> None:
    """JSON values equal, floats to float32 round-off (the ranks' matmuls may split their sums differently)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {sorted(a)} vs {sorted(b) if isinstance(b, dict) else b}"
        for k in a:
            _same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float | int):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6), f"{where}: {a} vs {b}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def _covered(tasks: list, names, members) -> None:
    """Every (benchmark, member) ran exactly once, whole or in all its parts, on one rank or another."""
    whole = sorted((b, m) for b, ms, part in tasks for m in ms if part is None)
    parts = sorted((b, m, part) for b, ms, part in tasks for m in ms if part is not None)
    split = {(b, m) for b, m, _ in parts}
    assert sorted(whole + sorted(split)) == sorted((b, m) for b in names for m in members), (whole, parts)
    assert parts == sorted((b, m, i) for b, m in split for i in range(2))


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["gsae", "sweep"])
def test_ddp_ranks_split_the_evaluation_and_rank_0_writes_the_one_process_results(tmp_path, objective, monkeypatch):
    # the first evaluation (the step-2 checkpoint's) has no timings: sensitive_directions, by its default cost more
    # than a rank's share, runs in its two parts on the two ranks; later ones split by the measured times
    monkeypatch.setitem(BENCHMARK_COST, "sensitive_directions", 1000.0)
    torch.manual_seed(0)
    if objective == "sweep":
        system = SweepSAESystem(build_system("topk").lm, SWEEP, hook="blocks.1.hook_resid_post", lr_warmup_steps=2,
                                dead_tokens=200, grad_mean_tokens=60, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    else:
        system = build_system("gsae", grad_mean_tokens=60)
    evaluation = EvaluationCallback(options=OPTIONS, log_figures=False, every_n_steps=3)  # step 3 too: every rank
    ckpts = tmp_path / "ckpts"
    trainer = build_trainer(tmp_path, STEPS, devices=2, strategy="ddp_fork", checkpoint_every=2,
                            callbacks=[evaluation, RecordTasks(tmp_path, evaluation)])
    trainer.fit(system, datamodule=build_data(system, batch_size=2))

    # every (benchmark, member) ran once (whole or in parts), on one rank or the other, and both ranks had work
    members = list(system.saes())
    tasks = [json.loads((tmp_path / f"tasks{r}.json").read_text()) for r in (0, 1)]
    assert len(tasks[0]) == len(tasks[1]) == 4  # steps 2 and 4: the step's checkpoint and last.ckpt (one evaluation)
    for i in (0, 2):
        _covered(tasks[0][i] + tasks[1][i], OPTIONS, members)
        assert tasks[0][i] and tasks[1][i]
    # the first: the costliest task's two parts, one on each rank
    where = {(tuple(ms), p): r for r in (0, 1) for b, ms, p in tasks[r][0] if b == "sensitive_directions" and p is not None}
    assert where and all(where[ms, 0] != where[ms, 1] for ms, _ in where), tasks

    # the one-process reference: the same weights (the checkpoint's), the sequential path, the same held-out tokens
    for step in (2, 4):
        system.load_state_dict(torch.load(ckpts / f"epoch=0-step={step}.ckpt", weights_only=False)["state_dict"])
        one = EvaluationCallback(options=OPTIONS, log_figures=False)
        fake = SimpleNamespace(is_global_zero=True, global_step=step, datamodule=build_data(system, batch_size=2),
                               loggers=[])
        want = json.loads(json_text(one.evaluate(fake, system)))
        assert one.last_tasks == [Task(b, tuple(members)) for b in OPTIONS]
        for member in members:
            suffix = f".{member}.eval.json" if member else ".eval.json"
            payload = json.loads((ckpts / f"epoch=0-step={step}.ckpt{suffix}").read_text())
            assert list(payload["results"]) == list(OPTIONS)  # the benchmarks' order, whichever rank ran them
            _same(payload["results"], want[member], f"step {step} {member or 'sae'}")


def test_tasks_split_by_cost_cover_everything_once():
    names = ["loss_added", "dead_latents", "steering", "sensitive_directions", "decoder_geometry", "latents"]
    members = [f"m{i}" for i in range(10)]
    # a benchmark with run_many keeps its members together in ⌈members / world⌉ chunks; the others run per member
    tasks = evaluation_tasks(names, members, 4)
    assert [t.members for t in tasks if t.benchmark == "loss_added"] == [
        ("m0", "m1", "m2"), ("m3", "m4", "m5"), ("m6", "m7", "m8"), ("m9",)]
    assert [t.members for t in tasks if t.benchmark == "steering"] == [(m,) for m in members]
    assert sorted((t.benchmark, m) for t in tasks for m in t.members) == sorted((b, m) for b in names for m in members)
    assert all(t.part is None for t in tasks)  # no task above a rank's share: none cut into parts
    assert evaluation_tasks(names, [""], 1) == [Task(b, ("",)) for b in names]  # one SAE: a task per benchmark
    # one SAE on 4 ranks: sensitive_directions (66 of 182 by default) is above a rank's share (45.5): in its two parts,
    # the activation-drawn directions and the SAE's own with the substitution; on 2 ranks (91 each) it stays whole
    four = evaluation_tasks(names, [""], 4)
    assert [t for t in four if t.benchmark == "sensitive_directions"] == [
        Task("sensitive_directions", ("",), 0, 2), Task("sensitive_directions", ("",), 1, 2)]
    assert all(t.part is None for t in evaluation_tasks(names, [""], 2))
    only_drawn = {"sensitive_directions": {"direction_types": ["isotropic"], "substitution": False}}
    assert all(t.part is None for t in evaluation_tasks(names, [""], 4, only_drawn))  # nothing to cut

    # without timings: the benchmarks' default costs; with them, what each task took last time
    assert task_cost(Task("steering", ("m0", "m1")), {}) == 36.0
    assert task_cost(Task("steering", ("m0", "m1")), {"m0/steering": 1.0, "m1/steering": 2.5}) == 3.5
    assert task_cost(Task("steering", ("",)), {"steering": 4.0}) == 4.0
    # a part: its own time, else its share of the whole's; a whole measured in parts: their sum
    sd = "sensitive_directions"
    assert task_cost(Task(sd, ("",), 1, 2), {sd: 10.0}) == 5.0
    assert task_cost(Task(sd, ("",), 1, 2), {sd: 10.0, f"{sd}#1": 3.0}) == 3.0
    assert task_cost(Task(sd, ("",)), {f"{sd}#0": 4.0, f"{sd}#1": 3.0}) == 7.0
    assert task_cost(Task(sd, ("",), 0, 2), {}) == 33.0

    costs = [7.0, 5.0, 4.0, 4.0, 3.0, 3.0, 1.0]
    for world in (1, 2, 3, 8):
        share = split_tasks(costs, world)
        assert sorted(i for s in share for i in s) == list(range(len(costs))) and len(share) == world
        assert share == split_tasks(costs, world)  # deterministic: every rank computes the same split
        loads = [sum(costs[i] for i in s) for s in share]
        best = max(max(costs), sum(costs) / world)  # a lower bound on any split's busiest rank
        assert max(loads) <= 4 / 3 * best + 1e-9, (world, loads)
    assert split_tasks(costs, 2) == [[0, 3, 5], [1, 2, 4, 6]]  # 7+4+3 = 14 and 5+4+3+1 = 13: LPT's split
    assert split_tasks([1.0, 5.0], 1) == [[0, 1]]  # a rank's tasks in the order listed, not the costliest first
    # a whole measured in parts counts only when every member's was; else the default cost (66 per member)
    assert task_cost(Task(sd, ("a", "b")), {f"a/{sd}#0": 1.0, f"a/{sd}#1": 2.0}) == 132.0
    assert task_cost(Task(sd, ("a", "b")), {f"a/{sd}#0": 1.0, f"a/{sd}#1": 2.0, f"b/{sd}#0": 4.0}) == 7.0
    # on 2 ranks, a benchmark measured above a rank's share (1000 of 1116 s) is cut into its parts
    two = evaluation_tasks(names, [""], 2, seconds={sd: 1000.0})
    assert [t for t in two if t.benchmark == sd] == [Task(sd, ("",), 0, 2), Task(sd, ("",), 1, 2)]


@pytest.mark.slow
def test_an_evaluation_that_fails_on_one_rank_under_gsae_debug_stops_every_rank(tmp_path, monkeypatch):
    """With GSAE_DEBUG=1 an evaluation error raises instead of being recorded. Under DDP the failing rank's error
    reaches the others through the results' gather, so rank 0 stops too (naming the rank and its error) instead of
    waiting in the gather until the process group times out (30 min): ``python train.py`` on 2 gloo ranks, the
    evaluation made to fail on rank 1 only."""
    import time

    from tests.systems.launch import free_port, start, train_args

    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('LOCAL_RANK') == '1':  # the rank Lightning starts as a second process\n"
        "    import gsae.evals as evals\n"
        "    def run_tasks(*args, **kwargs):\n"
        "        raise RuntimeError('planted failure on rank 1')\n"
        "    evals.run_tasks = run_tasks  # what gsae.evals.run_split runs\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(planted))
    args = train_args(tmp_path / "run", 4, "--checkpoint.every_n_train_steps", "2", "--trainer.devices", "2",
                      "--trainer.strategy", "ddp", "--evaluation.benchmarks", "[loss_added,decoder_geometry]")
    started = time.monotonic()
    proc = start(args, MASTER_PORT=str(free_port()), GSAE_DEBUG="1")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0, out[-3000:]
    # rank 0's one line names rank 1's error (it said "NoneType: None": the traceback was read after its except block)
    assert "RuntimeError: the evaluation failed on rank 1: RuntimeError: planted failure on rank 1" in out, out[-3000:]
    assert time.monotonic() - started < 300  # stopped at the failure, not at the process group's timeout
    assert (tmp_path / "run" / "quickstart-topk" / "checkpoints" / "epoch=0-step=2.ckpt").is_file()  # kept


def test_run_split_gathers_every_ranks_share_merges_the_parts_and_raises_a_ranks_failure(tiny_lm, monkeypatch):
    """:func:`run_split` for the two ranks of one evaluation, in one process: the gather replayed from what each rank
    sends. Rank 0's answer (the benchmarks' order, both ranks' results, the parts merged, every task's seconds) equals
    the one-process run (:func:`run_benchmarks_at`) to float32 round-off; a rank whose share raises makes rank 0
    raise, naming it and its error."""
    from gsae import evals
    from tests.evals.helpers import HOOK, build_tokens, build_topk

    monkeypatch.setitem(BENCHMARK_COST, "sensitive_directions", 1000.0)  # above a rank's share: in its two parts
    names = ["sensitive_directions", "loss_added", "dead_latents"]
    options = {"dead_latents": {"batch_tokens": 20}, "sensitive_directions": {"lengths": [1.0, 3.0], "pool_seqs": 2}}
    saes, tokens = {"": (build_topk(seed=1), HOOK)}, build_tokens(4, 16)
    sent: dict[int, tuple] = {}

    def gather_as(rank):
        def gather(out, obj):
            sent[rank] = obj
            out[:] = [sent.get(r, ({}, {}, None)) for r in range(2)]
        return gather

    runs = {}
    for rank in (1, 0):
        monkeypatch.setattr(torch.distributed, "all_gather_object", gather_as(rank))
        runs[rank] = evals.run_split(names, saes, tiny_lm, tokens, world=2, rank=rank, options=options, batch_size=2)
    everything, seconds, mine = runs[0]
    theirs = runs[1][2]
    assert mine == [Task("sensitive_directions", ("",), 0, 2), Task("loss_added", ("",))]
    assert theirs == [Task("sensitive_directions", ("",), 1, 2), Task("dead_latents", ("",))]
    assert set(seconds) == {"sensitive_directions#0", "sensitive_directions#1", "loss_added", "dead_latents"}
    assert list(everything) == [""] and list(everything[""]) == names
    want = evals.run_benchmarks_at(names, saes, tiny_lm, tokens, options=options, batch_size=2)
    _same(json.loads(json_text(everything)), json.loads(json_text(want)))

    sent.clear()
    monkeypatch.setattr(evals, "run_tasks", lambda *a, **k: (_ for _ in ()).throw(ValueError("planted failure")))
    monkeypatch.setattr(torch.distributed, "all_gather_object", gather_as(1))
    with pytest.raises(ValueError, match="planted failure"):
        evals.run_split(names, saes, tiny_lm, tokens, world=2, rank=1, options=options, batch_size=2)
    monkeypatch.setattr(evals, "run_tasks", lambda *a, **k: {})
    monkeypatch.setattr(torch.distributed, "all_gather_object", gather_as(0))
    with pytest.raises(RuntimeError, match="the evaluation failed on rank 1: ValueError: planted failure"):
        evals.run_split(names, saes, tiny_lm, tokens, world=2, rank=0, options=options, batch_size=2)
