"""One SAE training step's kernels alone (no LM, no Lightning): forward, loss and backward of a TopK SAE, with the
sparse ``∂W_enc``/``∂W_dec`` (``embedding_bag`` per latent) against the dense matmuls used under CUDA autocast
(:data:`gsae.sae.base.DENSE_GRADS_UNDER_AUTOCAST`), side by side on the same inputs.

    python benchmarks/sae_kernels.py --device cuda --tokens 4096 32768      # GPT-2 small's shape, bf16 autocast

Prints ``sae_step_ms_<sparse|dense>_<tokens>=`` (median of ``--iters`` steps, the device synchronised around each)
and ``dense_speedup_<tokens>=``; ``sae_step_ms_dense_torch_topk_<tokens>=`` is the dense step with plain
``torch.topk`` instead of the two-level selection (:data:`gsae.sae.topk.BLOCKED_TOPK_DEVICES`), and
``topk_ms_<torch|blocked>_<tokens>=`` time the selection alone on the encoder's bf16 scores. On the CPU only the
sparse path runs (the dense one is for tensor cores).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import gsae.sae.base as sae_base  # noqa: E402
import gsae.sae.topk as sae_topk  # noqa: E402
from gsae.sae import TopKSAE  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def topk_ms(scores: torch.Tensor, k: int, iters: int, blocked: bool) -> float:
    saved = set(sae_topk.BLOCKED_TOPK_DEVICES)
    sae_topk.BLOCKED_TOPK_DEVICES.clear()
    if blocked:
        sae_topk.BLOCKED_TOPK_DEVICES.add(scores.device.type)
    times = []
    for i in range(iters + 2):
        sync(scores.device)
        t0 = time.perf_counter()
        sae_topk.topk_indices(scores, k)
        sync(scores.device)
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    sae_topk.BLOCKED_TOPK_DEVICES.clear()
    sae_topk.BLOCKED_TOPK_DEVICES.update(saved)
    return statistics.median(times)


def step_ms(sae: TopKSAE, x: torch.Tensor, iters: int, amp: bool) -> float:
    times = []
    for i in range(iters + 2):
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            out = sae(x)
            loss = (out.x_hat.float() - x).pow(2).sum()
        loss.backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
        sae.zero_grad(set_to_none=True)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, nargs="+", default=[4096])
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--d-sae", type=int, default=12288)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-amp", action="store_true", help="float32 (the dense path is off then)")
    args = p.parse_args()
    device = torch.device(args.device)
    amp = not args.no_amp
    sae = TopKSAE(args.d_in, args.d_sae, args.k, k_aux=0).to(device)
    print(f"# device={device} amp_bf16={amp} d_in={args.d_in} d_sae={args.d_sae} k={args.k} torch={torch.__version__}")
    modes = ["sparse", "dense", "dense_torch_topk"] if device.type == "cuda" and amp else ["sparse"]
    blocked = set(sae_topk.BLOCKED_TOPK_DEVICES)
    for n in args.tokens:
        x = torch.randn(n, args.d_in, device=device)
        ms = {}
        for mode in modes:
            sae_base.DENSE_GRADS_UNDER_AUTOCAST = mode.startswith("dense")
            if mode == "dense_torch_topk":
                sae_topk.BLOCKED_TOPK_DEVICES.discard(device.type)
            ms[mode] = step_ms(sae, x, args.iters, amp)
            sae_topk.BLOCKED_TOPK_DEVICES.update(blocked)
            print(f"sae_step_ms_{mode}_{n}={ms[mode]:.3f}")
        if "dense" in ms:
            print(f"dense_speedup_{n}={ms['sparse'] / ms['dense']:.3f}")
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            scores = torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc)
        for how in ("torch", "blocked"):
            print(f"topk_ms_{how}_{n}={topk_ms(scores, args.k, args.iters, how == 'blocked'):.3f}")
    sae_base.DENSE_GRADS_UNDER_AUTOCAST = True
    return 0


if __name__ == "__main__":
    sys.exit(main())
