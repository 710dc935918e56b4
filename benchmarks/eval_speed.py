"""Speed of the sensitive-directions benchmark against a naive loop, at GPT-2 small's shape.

Ours: :func:`gsae.evals.sensitive_directions.run` end to end (statistics pass, direction sampling, the
clean prefix once per batch, only the layers after the hook for every perturbed copy, lengths × types
stacked into large forwards). Naive: Lee & Heimersheim's loop (SPEC §3.2 pseudo-code) on the *same*
directions — one full forward of ``HookedTransformer.run_with_hooks`` with a patch hook per length and
direction type, KL and final-residual L2 per run. The two curves must agree; the last line is the speedup.

Random weights (``random-gpt2``: no download), a TopK SAE with random weights, random tokens::

    python benchmarks/eval_speed.py                       # 4 × 64 tokens, 4 types × 3 lengths (~1-3 min, 2 cores)
    python benchmarks/eval_speed.py --n-seq 8 --lengths 1 11 31 91
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from gsae.evals import sensitive_directions as sd
from gsae.evals.directions import batch_acts, batch_deltas, fit_activation_stats
from gsae.lm import LanguageModel
from gsae.metrics import kl_div_per_token
from gsae.sae import TopKSAE

HOOK = "blocks.6.hook_resid_pre"
TYPES = ["isotropic", "cov_random_mixture", "real_mixture", "sae_error"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-seq", type=int, default=4, help="evaluation sequences")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    p.add_argument("--d-sae", type=int, default=12288, help="SAE latents")
    p.add_argument("--k", type=int, default=32, help="SAE active latents")
    p.add_argument("--lengths", type=float, nargs="+", default=[1.0, 11.0, 51.0], help="perturbation lengths")
    p.add_argument("--types", nargs="+", default=TYPES, help="direction types")
    p.add_argument("--forward-tokens", type=int, default=2048, help="tokens per forward pass of the sweep")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--callback-seqs", type=int, default=32, help="held-out contexts of the callback-cost measurement (0 skips it)")
    p.add_argument("--batch-size", type=int, default=32, help="contexts per training step (callback-cost measurement)")
    p.add_argument("--context-size", type=int, default=128, help="tokens per context (callback-cost measurement)")
    return p.parse_args(argv)


def callback_cost(lm: LanguageModel, args: argparse.Namespace) -> tuple[float, float]:
    """``(seconds of the default EvaluationCallback benchmarks on one checkpoint, seconds of one training step)``.

    One training step = the real ``LocalSAESystem`` step on ``batch_size × context_size`` tokens: harvest at the
    hook, TopK SAE forward, loss, backward, Adam step. The callback = ``run_benchmarks`` of the callback's
    default set on ``callback_seqs`` held-out contexts, as ``EvaluationCallback`` runs it at every checkpoint.
    """
    from gsae.callbacks.evaluation import DEFAULT_BENCHMARKS
    from gsae.data import TokenBatch
    from gsae.evals import run_benchmarks
    from gsae.systems import LocalSAESystem

    system = LocalSAESystem(lm, lambda d: TopKSAE(d, args.d_sae, args.k), hook=HOOK).to(args.device)
    opt = torch.optim.Adam(system.sae.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    batch = lambda n: torch.randint(0, lm.d_vocab, (n, args.context_size), generator=gen).to(args.device)  # noqa: E731

    def step() -> None:
        loss, *_ = system.objective(TokenBatch(batch(args.batch_size), 0), "train")
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()  # warm-up (and b_dec initialisation)
    steps = [timed(step)[1] for _ in range(3)]
    step_s = sorted(steps)[1]
    tokens = batch(args.callback_seqs)
    _, eval_s, _ = timed(
        run_benchmarks, list(DEFAULT_BENCHMARKS), system.sae, lm, HOOK, tokens, seed=0, batch_size=args.batch_size
    )
    return eval_s, step_s


@torch.no_grad()
def naive_curves(lm: LanguageModel, tokens: torch.Tensor, directions: dict, lengths: list[float]) -> dict:
    """Lee & Heimersheim's loop: a full forward with a patch hook per (type, length); mean KL over ``[:, :-1]``."""
    final = sd.final_hook(lm)
    clean: dict = {}

    def keep_clean(act, hook):
        clean["h"] = act

    logits_clean = lm.model.run_with_hooks(tokens, fwd_hooks=[(final, keep_clean)])
    out = {}
    for kind, u in directions.items():
        kls, l2s = [], []
        for length in lengths:
            store: dict = {}

            def patch(act, hook, u=u, length=length):
                return act + length * u

            def keep(act, hook, store=store):
                store["h"] = act

            logits = lm.model.run_with_hooks(tokens, fwd_hooks=[(HOOK, patch), (final, keep)])
            kls.append(float(kl_div_per_token(logits_clean, logits)[:, :-1].mean()))
            l2s.append(float((store["h"] - clean["h"])[:, :-1].norm(dim=-1).mean()))
            del logits
        out[kind] = {"kl": kls, "l2": l2s}
    return out


def same_directions(sae, lm, tokens, types, seed: int) -> dict:
    """The directions ``run`` draws for the (single) batch, rebuilt with the public helpers; ``run`` leaves
    the last position out (it is never read), so it gets no perturbation here either."""
    acts = list(batch_acts(sae, lm, HOOK, tokens, batch_size=64))
    stats = fit_activation_stats(acts, max_real_pool=65536, seed=seed)
    win = sd.window("all_tokens", tokens.shape[1], None, 17, False)
    deltas, _ = batch_deltas(
        types, acts[0], stats, sae.W_dec, win.perturb, seed=seed, first_seq=0, block_fired={0: acts[0].fired},
        substitution=False,
    )
    return {k: F.pad(u, (0, 0, 0, 1)) for k, u in deltas.items()}  # (B, T, D)


def timed(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, its wall time and its process CPU time (all threads), in seconds."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def max_rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-6) for x, y in zip(a, b))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    assert args.n_seq <= 64, "one batch of run()'s default batch_size (64), so the naive loop sees the same directions"
    t = time.perf_counter()
    lm = LanguageModel("random-gpt2").to(args.device)
    t_load = time.perf_counter() - t
    sae = TopKSAE(lm.d_model, d_sae=args.d_sae, k=args.k, seed=0).to(args.device)
    tokens = torch.randint(0, lm.d_vocab, (args.n_seq, args.seq_len), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(args.device)
    options = dict(lengths=args.lengths, direction_types=args.types, substitution=False)
    sd.run(sae, lm, HOOK, tokens[:1, :8], lengths=[1.0], direction_types=["isotropic"], substitution=False)  # warm-up

    res, t_sweep, cpu_sweep = timed(
        sd.run, sae, lm, HOOK, tokens, seed=0, forward_tokens=args.forward_tokens, **options
    )
    directions = same_directions(sae, lm, tokens, args.types, seed=0)
    ref, t_naive, cpu_naive = timed(naive_curves, lm, tokens, directions, args.lengths)

    diff_kl = max(max_rel_diff(res["curves"][k]["kl"], ref[k]["kl"]) for k in args.types)
    diff_l2 = max(max_rel_diff(res["curves"][k]["l2"], ref[k]["l2"]) for k in args.types)
    n_runs = len(args.types) * len(args.lengths)
    print(
        f"device={lm.device} threads={torch.get_num_threads()} model=random-gpt2 hook={HOOK} d_sae={args.d_sae} k={args.k}"
    )
    print(
        f"tokens={args.n_seq}x{args.seq_len} types={len(args.types)} lengths={len(args.lengths)} perturbed_runs={n_runs}"
    )
    print(f"lm_load_s={t_load:.2f}")
    for k in args.types:
        ours, naive = (" ".join(f"{v:.4g}" for v in c[k]["kl"]) for c in (res["curves"], ref))
        print(f"  {k:<20} kl: sweep [{ours}]  naive [{naive}]")
    print(f"max_rel_diff_kl={diff_kl:.2e} max_rel_diff_l2={diff_l2:.2e}")
    ok = diff_kl < 1e-3 and diff_l2 < 1e-3
    print(f"results_agree={ok}")
    print(
        f"load_average_1min={os.getloadavg()[0]:.2f} (other processes on the machine skew wall times; CPU times less so)"
    )
    print(
        f"sweep_s={t_sweep:.2f} sweep_cpu_s={cpu_sweep:.2f} (run(), end to end: statistics pass + directions + sweep)"
    )
    print(
        f"naive_s={t_naive:.2f} naive_cpu_s={cpu_naive:.2f} ({n_runs} full forwards with a patch hook, directions given)"
    )
    out = dict(sweep_s=t_sweep, naive_s=t_naive, speedup=t_naive / t_sweep, agree=ok)
    if args.callback_seqs:
        eval_s, step_s = callback_cost(lm, args)
        print(
            f"callback_default_s={eval_s:.2f} (loss_added, dead_latents, decoder_geometry on {args.callback_seqs}x"
            f"{args.context_size} held-out tokens) train_step_s={step_s:.2f} ({args.batch_size}x{args.context_size} tokens)"
        )
        print(f"callback_cost_in_train_steps={eval_s / step_s:.1f}")
        out.update(callback_s=eval_s, train_step_s=step_s)
    print(f"sweep_speedup_vs_naive_cpu_time={cpu_naive / cpu_sweep:.2f}")
    print(f"sweep_speedup_vs_naive={t_naive / t_sweep:.2f}")
    return out


if __name__ == "__main__":
    main()
