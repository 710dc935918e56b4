#!/usr/bin/env bash
# On a machine with a CUDA GPU: the CUDA tests (tests/gpu) and the three training benchmarks in bf16, GPT-2 small's
# shape (random-gpt2, blocks.6.hook_resid_pre, d_sae 12288, k 32), each stage time-boxed, every log kept.
#
#   bash benchmarks/gpu.sh [LOG_DIR]          # logs to LOG_DIR (default gpu-logs/), a summary of name=value lines
#   GPU_QUICK=1 bash benchmarks/gpu.sh        # a dry run of this script (CPU is fine): 1-2 steps per stage
#
# Stages: the CUDA tests; `train_throughput.py` (TopK vs SAELens vs our forward) at the paper's 4096 tokens per step
# (32 x 128, twice: the figures are noisy) and at 32768 (256 x 128); `--objective all` (TopK, g-SAE, e2e costs) and
# `--objective sweep` (10 SAEs in one run vs 10 runs) at both sizes (at 4096 also with the members unstacked), and
# over layers 3-9 (8 SAEs) at 4096;
# kernel launches per step (`--count-ops`);
# what logging a step's metrics costs (benchmarks/logging_cost.py);
# the SAE step's kernels alone, sparse vs dense
# gradients (benchmarks/sae_kernels.py); CUDA profiles of 3 TopK steps at 4096 and 2 g-SAE steps at 32768; the
# default evaluation's cost per checkpoint at configs/gpt2/gsae.yaml (benchmarks/eval_speed.py); last,
# `--objective all --compile` at 32768.
# All gsae runs under `--precision bf16-mixed` (SAELens with its own autocast), LM weights in
# float32 under autocast. Each stage's limit (seconds) is STAGE_LIMIT_<name>, overridable.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-gpu-logs}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
DEV=cuda
if [ "${GPU_QUICK:-0}" = 1 ]; then
    DEV=$($PY -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
    Q=(--steps 1 --warmup 1 --d-sae 1536 --context-size 32)
    QS=(--batch-size 4)
    QK=(--d-sae 1536 --iters 1)
else
    Q=()
    QS=()
    QK=()
fi
BENCH=(--device "$DEV" --precision bf16-mixed --threads "${THREADS:-8}")

stage() {  # stage NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    local var="STAGE_LIMIT_$name"
    limit=${!var:-$limit}
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout -k 5 "$limit" "$@" >"$LOG/$name.log" 2>&1
    local rc=$?
    echo "=== $name: rc=$rc in $((SECONDS - t0))s"
    grep -E '^[a-z0-9_]+=|passed|failed|error' "$LOG/$name.log" | tail -25
    # every stage's log also in one file, written as the stages end: a run cut short (or a transfer that takes
    # only a few files back) still has all of them
    { echo "=================== $name (rc=$rc)"; cat "$LOG/$name.log"; } >>"$LOG/all.log"
}

$PY - <<'EOF' 2>&1 | tee "$LOG/env.log"
from importlib.metadata import version
import torch
import gsae.lm, sae_lens.training.activations_store  # noqa: F401 - everything the stages import
print(" ".join(f"{p}={version(p)}" for p in ("torch", "lightning", "transformer_lens", "sae_lens", "datasets")),
      f"cuda={torch.cuda.is_available()} gpu={torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
EOF

if [ "${GPU_QUICK:-0}" = 1 ]; then
    stage tests 300 $PY -m pytest -q -x tests/gpu/test_cuda.py::test_adam_on_the_device_equals_torch_unfused_adam
else
    stage tests 150 $PY -m pytest -q -p no:cacheprovider -rfE tests/gpu
fi
stage topk_4096 70 $PY benchmarks/train_throughput.py "${BENCH[@]}" --steps 6 --rounds 3 "${QS[@]}" "${Q[@]}"
stage topk_4096_again 70 $PY benchmarks/train_throughput.py "${BENCH[@]}" --steps 6 --rounds 3 "${QS[@]}" "${Q[@]}"
stage topk_32768 70 $PY benchmarks/train_throughput.py "${BENCH[@]}" --steps 4 --rounds 2 --batch-size 256 "${Q[@]}"
stage all_4096 70 $PY benchmarks/train_throughput.py "${BENCH[@]}" --objective all --steps 6 --rounds 3 "${QS[@]}" "${Q[@]}"
stage all_32768 70 $PY benchmarks/train_throughput.py "${BENCH[@]}" --objective all --steps 4 --rounds 2 --batch-size 256 "${Q[@]}"
stage sweep_4096 100 $PY benchmarks/train_throughput.py "${BENCH[@]}" --objective sweep --steps 4 --rounds 2 \
    --batch-size 32 "${QS[@]}" "${Q[@]}"
# the same sweep with each member stepped on its own (--model.stack_members false; a GPU's default stacks them)
stage sweep_4096_unstacked 100 $PY benchmarks/train_throughput.py "${BENCH[@]}" --objective sweep --steps 4 --rounds 2 \
    --batch-size 32 --stack off "${QS[@]}" "${Q[@]}"
stage sweep_32768 100 $PY benchmarks/train_throughput.py "${BENCH[@]}" --objective sweep --steps 4 --rounds 2 \
    --batch-size 256 "${Q[@]}"
# kernel launches per steady step (views and host reads apart): the sweep, one TopK and one g-SAE run alone
stage ops_4096 60 $PY benchmarks/train_throughput.py "${BENCH[@]}" --objective sweep --steps 1 --rounds 1 --count-ops 2 \
    --batch-size 32 "${QS[@]}" "${Q[@]}"
# what logging a step's metrics costs (Lightning's log_dict vs gsae's path), tiny shape: all host time on a GPU
stage logging 60 $PY benchmarks/logging_cost.py --device "$DEV"
stage kernels 60 $PY benchmarks/sae_kernels.py --device "$DEV" --tokens 4096 32768 "${QK[@]}"
stage profile_4096 60 $PY benchmarks/train_throughput.py "${BENCH[@]}" --baselines off --steps 2 --rounds 1 --profile 3 \
    "${QS[@]}" "${Q[@]}"
stage profile_gsae_32768 60 $PY benchmarks/train_throughput.py "${BENCH[@]}" --objective gsae --steps 1 --rounds 1 \
    --profile 2 --batch-size 256 "${Q[@]}"
# a sweep over layers: TopK and g-SAE (k 32) at layers 3, 5, 7, 9, one run vs 8 separate runs
stage layers_sweep_4096 100 $PY benchmarks/train_throughput.py "${BENCH[@]}" --objective sweep --steps 4 --rounds 2 \
    --batch-size 32 --sweep-ks 32 --sweep-hooks blocks.3.hook_resid_post blocks.5.hook_resid_post \
    blocks.7.hook_resid_post blocks.9.hook_resid_post "${QS[@]}" "${Q[@]}"
# what the default evaluation costs per checkpoint against the training steps between checkpoints, at
# configs/gpt2/gsae.yaml's batch, cadence and budgets (callback_cost_fraction; the configs' figures are a 2-core CPU's)
if [ "${GPU_QUICK:-0}" = 1 ]; then
    QE=(--n-seq 1 --seq-len 8 --d-sae 256 --k 4 --lengths 1 --types isotropic --train-steps 0)
else
    QE=(--train-steps 20)
fi
stage eval_gsae 150 $PY benchmarks/eval_speed.py --device "$DEV" --threads "${THREADS:-8}" --config configs/gpt2/gsae.yaml \
    "${QE[@]}"
# last (its first batches compile for a minute or two): the g-SAE and e2e costs with `--compile` (the fused steps and
# each vocabulary chunk's softmax and gradient under torch.compile, gsae.lm_chunked.compiled)
stage all_32768_compile 180 $PY benchmarks/train_throughput.py "${BENCH[@]}" --objective all --compile --steps 2 \
    --rounds 1 --warmup 2 --batch-size 256 "${Q[@]}"
grep -hE '^[a-z0-9_]+=[0-9.na/]' "$LOG"/*.log >"$LOG/summary.txt"
echo "=== logs in $LOG/"
