"""The benchmark scripts run (the acceptance figures of the throughput issue come from them, and benchmarks/gpu.sh runs
them on a lent GPU, where a script that rotted since the last loan costs the loan): each at the tiniest shape on the
CPU, its ``name=value`` lines printed. Their figures are not checked here: timings are for the benchmarks."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest

from gsae.cli import REPO_ROOT
from tests.systems.launch import env

TINY = ["--model", "random-tiny", "--d-sae", "256", "--context-size", "8", "--batch-size", "4", "--steps", "1",
        "--rounds", "1", "--warmup", "1", "--hook", "blocks.1.hook_resid_pre"]

CASES = {
    "topk": (["train_throughput.py", *TINY], ["ratio_vs_saelens", "ratio_vs_forward", "ratio_vs_forward_flop_bound"]),
    "all": (["train_throughput.py", *TINY, "--objective", "all"],
            ["gsae_cost_vs_topk", "e2e_cost_vs_topk", "gsae_flop_floor", "e2e_flop_floor"]),
    "sweep": (["train_throughput.py", *TINY, "--objective", "sweep", "--count-ops", "1", "--stack", "on"],  # a GPU's default
              ["sweep_speedup_vs_separate", "kernel_ops_per_step_sweep", "sweep_flop_expectation"]),
    "logging": (["logging_cost.py", "--steps", "12", "--rounds", "1", "--log-every", "4", "--warmup", "2"],
                ["log_step_speedup_topk", "logging_share_sweep_gsae", "logging_share_sweep_lightning"]),
    "kernels": (["sae_kernels.py", "--device", "cpu", "--tokens", "64", "--d-in", "32", "--d-sae", "256", "--k", "4",
                 "--iters", "1"], ["sae_step_ms_sparse_64", "topk_ms_torch_64"]),
    "eval": (["eval_speed.py", "--n-seq", "1", "--seq-len", "8", "--d-sae", "256", "--k", "4", "--lengths", "1",
              "--types", "isotropic", "--train-steps", "0"],  # random-gpt2: the script's model, no smaller one
             ["max_rel_diff_kl", "sweep_flop_bound", "sweep_speedup_vs_naive"]),
    "eval_metrics": (["eval_speed.py", "--metrics"], ["metric_sync_packed_ms", "torchmetrics_vs_packed"]),
    "data": (["data_throughput.py", "--docs", "2100", "--batches", "2", "--rounds", "1", "--batch-size", "2",
              "--context-size", "32", "--worlds", "1"], ["val_pass_s"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_benchmark_script_runs_and_prints_its_figures(case):
    (script, *args), names = CASES[case]
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=REPO_ROOT,
                          env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    printed = dict(re.findall(r"^([a-z0-9_]+)=\s*(\S+)", proc.stdout, re.M))
    for name in names:
        assert name in printed, (name, proc.stdout[-2000:])
        value = printed[name].rstrip("%")
        if value not in ("nan", "n/a"):  # a ratio of two noise-level times may be nan (said so on its line)
            assert math.isfinite(float(value)), (name, printed[name])
