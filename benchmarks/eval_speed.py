"""Speed of the sensitive-directions benchmark against a naive loop, at GPT-2 small's shape.

Ours: :func:`gsae.evals.sensitive_directions.run` end to end (statistics pass, direction sampling, the
clean prefix once per batch, only the layers after the hook for every perturbed copy, lengths × types
stacked into large forwards). Naive: Lee & Heimersheim's loop (SPEC §3.2 pseudo-code) on the *same*
directions — one full forward of ``HookedTransformer.run_with_hooks`` with a patch hook per length and
direction type, KL and final-residual L2 per run. The two curves must agree; the last line is the speedup.

Random weights (``random-gpt2``: no download), a TopK SAE with random weights, random tokens::

    python benchmarks/eval_speed.py                       # sweep: 4 × 64 tokens, 4 types × 3 lengths; + callback cost
    python benchmarks/eval_speed.py --n-seq 8 --lengths 1 11 31 91 --train-steps 0   # the sweep only

``callback_cost_fraction`` = one ``EvaluationCallback`` run (the default benchmarks with ``--config``'s evaluation
budgets, and the scalars, texts and figures it writes to a TensorBoard logger, drawn in this process as on a CPU
run) ÷ the training time between two checkpoints (median step × ``checkpoint.every_n_train_steps``), both
measured in this process on random-gpt2 at the config's batch (see :func:`callback_cost`).

The sweep cannot beat the naive loop by more than its FLOP ratio: the naive run is prefix + suffix + unembedding,
ours the suffix + unembedding per copy (plus one prefix per sequence); ``sweep_flop_bound`` prints that ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
import torch.nn.functional as F

from gsae.allocator import tune_malloc
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
    p.add_argument("--config", default="configs/gpt2/gsae.yaml", help="config whose batch, cadence and evaluation "
                   "budgets the callback-cost measurement uses")
    p.add_argument("--metrics", action="store_true", help="only compare the per-step metric reduction: one packed "
                   "all_reduce against torchmetrics states, 2 gloo ranks, at the gpt2 config's shape")
    p.add_argument("--train-steps", type=int, default=3, help="training steps timed for the callback cost (0 skips it)")
    p.add_argument("--sweep-eval", action="store_true", help="only time a sweep checkpoint's evaluation: every member "
                   "at once with shared LM passes against each member's benchmarks alone (nothing shared)")
    p.add_argument("--sweep-ks", type=int, nargs="+", default=[3, 32], help="--sweep-eval: a TopK and a g-SAE member "
                   "per k")
    p.add_argument("--sweep-config", default="configs/gpt2/table1_sweep.yaml", help="--sweep-eval: the evaluation "
                   "budgets (n_seqs and per-benchmark options)")
    p.add_argument("--sweep-scale", type=float, default=0.25, help="--sweep-eval: multiply the config's n_seqs by this")
    p.add_argument("--sweep-hooks", nargs="+", default=None, help="--sweep-eval: a sweep over layers: the members at "
                   "each of these hooks, all evaluated from one LM pass per batch (run_benchmarks_at, the callback) "
                   "against each hook's members in their own pass (the callback before); default: one hook")
    p.add_argument("--sweep-shared-only", action="store_true", help="--sweep-eval: time the shared evaluation only "
                   "(e.g. at --sweep-scale 1, the config's real budgets), not the unshared reference")
    return p.parse_args(argv)


def callback_cost(args: argparse.Namespace) -> dict:
    """What the default ``EvaluationCallback`` costs at ``--config``'s batch, cadence and budgets, in one process.

    The model, SAE (class and options), hook, buffer, batch (``data.batch_size × data.context_size``), the
    checkpoint cadence (``checkpoint.every_n_train_steps``) and the ``evaluation:`` section come from the config;
    the LM is ``random-gpt2`` (GPT-2 small's shape, random weights, the config's weight-processing flags); tokens
    are random ids with BOS first. Training: the real ``LocalSAESystem`` step (harvest with ``∇ₓL`` for a g-SAE,
    shuffle buffer, SAE forward, loss, backward, Adam), or ``E2ESAESystem``'s for an e2e config (clean pass, patched
    suffix, KL and downstream terms), timed over ``--train-steps`` steps after one warm-up step,
    median, times the cadence. Callback: ``EvaluationCallback.evaluate`` exactly as at a checkpoint (every default
    benchmark, the config's per-benchmark ``n_seqs`` and options), timed once, per benchmark too.
    """
    import importlib
    from types import SimpleNamespace

    import yaml

    from gsae.callbacks.evaluation import EvaluationCallback
    from gsae.data import TokenBatch
    from gsae.evals import held_out_counts
    from gsae.loggers import TensorBoardLogger
    from gsae.optim import Adam
    from gsae.systems import E2ESAESystem, LocalSAESystem

    cfg = yaml.safe_load(open(args.config))
    m = cfg["model"]["init_args"]
    mod, _, cls = m["sae"]["class_path"].rpartition(".")
    sae_cls, sae_args = getattr(importlib.import_module(mod), cls), m["sae"].get("init_args", {})
    flags = {k: v for k, v in m["lm"].items() if k in ("fold_ln", "center_writing_weights", "center_unembed")}
    lm = LanguageModel("random-gpt2", **flags).to(args.device)
    if cfg["model"]["class_path"].endswith("E2ESAESystem"):  # e2e / e2e+ds: the patched suffix and the KL
        system_cls = E2ESAESystem
        keys = ("kl_coef", "downstream_hooks", "downstream_coef", "downstream_coefs", "local_mse_coef")
    else:
        system_cls = LocalSAESystem
        keys = ("buffer_size", "grad_reduction")
    extra = {k: m[k] for k in keys if k in m}
    system = system_cls(lm, lambda d: sae_cls(d, **sae_args), hook=m["hook"], **extra).to(args.device)
    opt = Adam(system.sae.parameters(), lr=1e-4)  # the configs' optimizer
    B, T = cfg["data"]["batch_size"], cfg["data"]["context_size"]
    every = cfg["checkpoint"]["every_n_train_steps"]
    gen = torch.Generator().manual_seed(1)

    def batch(n: int) -> torch.Tensor:
        t = torch.randint(0, lm.d_vocab, (n, T), generator=gen)
        t[:, 0] = lm.bos_token_id
        return t.to(args.device)

    def step() -> None:
        loss, *_ = system.objective(TokenBatch(batch(B), 0), "train")
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()  # warm-up (b_dec initialisation, Adam state)
    steps = sorted(timed(step)[1] for _ in range(args.train_steps))
    step_s = steps[len(steps) // 2]
    ev = cfg.get("evaluation") or {}
    cb = EvaluationCallback(**{k: v for k, v in ev.items() if k != "enabled"})
    held_out = batch(held_out_counts(cb.benchmarks, cb.n_seqs, cb.options, T)[0])  # as many as the callback reads
    dm = SimpleNamespace(contexts=lambda which: iter(held_out.cpu().tolist()), batch_size=B)
    with tempfile.TemporaryDirectory() as tmp:
        # a real TensorBoard logger, as a run has: the callback writes its scalars, texts and figures (drawn in this
        # process, as on a CPU run; a GPU run draws them in a worker, figures_in_background's default there)
        logger = TensorBoardLogger(tmp, name="eval_speed")
        trainer = SimpleNamespace(is_global_zero=True, global_step=every, datamodule=dm, loggers=[logger])
        _, eval_s, _ = timed(cb.evaluate, trainer, system)
        logger.finalize("success")
    benchmarks_s = sum(cb.last_seconds.values())
    return dict(
        config=args.config, sae=cls, hook=m["hook"], batch=f"{B}x{T}", every=every, step_s=step_s, steps=steps,
        eval_s=eval_s, per=cb.last_seconds, n_seqs=held_out.shape[0], benchmarks=cb.benchmarks,
        logging_s=eval_s - benchmarks_s,
    )


def sweep_eval(args: argparse.Namespace) -> dict:
    """A sweep checkpoint's evaluation, both ways, on random-gpt2: a TopK and a g-SAE member per k at ``HOOK``, or at
    each of ``--sweep-hooks`` (a sweep over layers). Ours: :func:`gsae.evals.run_benchmarks_at`, what
    ``EvaluationCallback`` runs (activations and ∇ₓL of each batch once for all benchmarks, members and hooks;
    loss_added's clean and ablated passes and sensitive_directions' activation directions once per batch and kind).
    The reference: at one hook, each benchmark's ``run`` per member with nothing shared (``unshared``); at several,
    one :func:`gsae.evals.run_benchmarks_many` per hook (``per_hook``: the callback before the hooks shared a pass).
    Budgets: ``--sweep-config``'s ``evaluation:`` section, counts × ``--sweep-scale``. The results must be equal."""
    from gsae.evals import BENCHMARKS, run_benchmarks_at, run_benchmarks_many
    from gsae.sae import GradTopKSAE

    lm = LanguageModel("random-gpt2").to(args.device)
    hooks = [lm.validate_hook(h, "--sweep-hooks") for h in args.sweep_hooks or [HOOK]]
    layers = len(hooks) > 1
    names, tokens, per_benchmark, options, batch_size = sweep_budgets(args, lm)
    saes = {}
    for i, hook in enumerate(hooks):
        tag, shift = (f"-h{i}", i) if layers else ("", 0)
        for k in args.sweep_ks:
            saes[f"topk-k{k}{tag}"] = (TopKSAE(lm.d_model, d_sae=args.d_sae, k=k, seed=k + shift).to(args.device), hook)
            gsae = GradTopKSAE(lm.d_model, d_sae=args.d_sae, k=k, beta=1e5, seed=100 + k + shift).to(args.device)
            saes[f"gsae-k{k}{tag}"] = (gsae, hook)
    prefix, ours, ref = ("sweep_eval_hooks", "hooks_shared", "per_hook") if layers else ("sweep_eval", "shared", "unshared")
    print(f"{prefix}: " + (f"hooks={','.join(hooks)} members={len(saes)}" if layers else f"members={','.join(saes)}")
          + f" d_sae={args.d_sae} tokens={tuple(tokens.shape)} batch_size={batch_size} "
          + " ".join(f"{n}:{per_benchmark[n].shape[0]}" for n in names))
    kw = dict(seed=0, options=options, batch_size=batch_size)
    seconds: dict[str, float] = {}
    shared, t_shared, cpu_shared = timed(run_benchmarks_at, names, saes, lm, per_benchmark, seconds=seconds, **kw)
    _print_seconds(ours, names, seconds)
    print(f"{prefix}_shared_s={t_shared:.1f} {prefix}_shared_cpu_s={cpu_shared:.1f} per_member_s={t_shared / len(saes):.1f}")
    if args.sweep_shared_only:
        return dict(shared_s=t_shared)

    def reference() -> dict:
        out, secs = {}, {}
        for hook in hooks:
            group = {m: sae for m, (sae, h) in saes.items() if h == hook}
            if layers:
                out.update(run_benchmarks_many(names, group, lm, hook, per_benchmark, seconds=secs, **kw))
                continue
            for m, sae in group.items():
                sae.eval()
                with torch.no_grad():
                    out[m] = {n: BENCHMARKS[n].run(sae, lm, hook, per_benchmark[n].clone(), seed=0,
                                                   batch_size=batch_size, **options[n]) for n in names}
        if layers:
            _print_seconds(ref, names, secs)
        return {m: out[m] for m in saes}

    alone, t_alone, cpu_alone = timed(reference)
    equal = json.dumps(shared, sort_keys=True, default=str) == json.dumps(alone, sort_keys=True, default=str)
    print(f"results_equal={equal}")
    print(f"{prefix}_{ref}_s={t_alone:.1f} {prefix}_{ref}_cpu_s={cpu_alone:.1f}")
    print(f"{prefix}_speedup={t_alone / t_shared:.2f}")
    return dict(shared_s=t_shared, **{f"{ref}_s": t_alone}, equal=equal)


def _print_seconds(label: str, names: list[str], seconds: dict[str, float]) -> None:
    """``  <label>_<benchmark>_s=`` lines: each benchmark's wall seconds over every member (``seconds``' keys are
    ``<member>/<benchmark>``)."""
    for n in names:
        print(f"  {label}_{n}_s={sum(v for key, v in seconds.items() if key.endswith('/' + n)):.1f}")


def sweep_budgets(args: argparse.Namespace, lm: LanguageModel) -> tuple:
    """``(benchmarks, tokens, {benchmark: its tokens}, {benchmark: options}, batch_size)`` of ``--sweep-config``'s
    ``evaluation:`` section as the callback reads it (:func:`gsae.evals.held_out_counts`: dead_latents its window),
    every count × ``--sweep-scale``; random 128-token contexts, BOS first."""
    import yaml

    from gsae.callbacks.evaluation import DEFAULT_BENCHMARKS
    from gsae.evals import held_out_counts, run_options, tokens_per_benchmark

    cfg = yaml.safe_load(open(args.sweep_config))
    ev = cfg.get("evaluation") or {}
    batch_size = ev.get("batch_size") or (cfg.get("data") or {}).get("batch_size") or 8  # as the callback
    names = list(ev.get("benchmarks") or DEFAULT_BENCHMARKS)
    n_read, counts = held_out_counts(names, ev.get("n_seqs"), ev.get("options"), 128)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, lm.d_vocab, (n_read, 128), generator=gen)
    tokens[:, 0] = lm.bos_token_id
    tokens = tokens.to(args.device)
    per_benchmark = tokens_per_benchmark(counts, tokens, lm, ev.get("options"))
    per_benchmark = {n: t[: max(1, round(t.shape[0] * args.sweep_scale))] for n, t in per_benchmark.items()}
    options = run_options(names, ev.get("options"))
    return names, tokens, per_benchmark, options, batch_size


def flop_bound(lm: LanguageModel, hook_layer: int, n_runs: int, T: int) -> float:
    """FLOP ratio naive ÷ sweep: ``(n_runs + 1)`` full forwards of ``T`` tokens against one prefix of ``T`` tokens
    plus ``(n_runs + 1)`` suffixes (layers from the hook on, and the unembedding) of ``T − 1`` tokens."""
    d, V, L = lm.d_model, lm.d_vocab, lm.n_layers

    def layers(n: int, t: int) -> float:
        return n * t * (24 * d * d + 4 * t * d)

    full = layers(L, T) + 2 * T * d * V
    ours = layers(hook_layer, T) + (n_runs + 1) * (layers(L - hook_layer, T - 1) + 2 * (T - 1) * d * V)
    return (n_runs + 1) * full / ours


@torch.no_grad()
def naive_curves(lm: LanguageModel, tokens: torch.Tensor, directions: dict, lengths: list[float]) -> dict:
    """Lee & Heimersheim's loop: a full forward with a patch hook per (type, length); mean KL over ``[:, :-1]``,
    taken in float64 from the float32 logits (their float32 log-softmax difference loses ~1e-3 of a 1e-4 KL)."""
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
            kls.append(float(kl_div_per_token(logits_clean.double(), logits.double())[:, :-1].mean()))
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


def split_speedup(names: list[str], seconds: dict[str, float], world: int) -> float:
    """How much faster ``world`` ranks evaluate one SAE than one process, if each rank has its own device: the
    benchmarks' measured ``seconds`` over the busiest rank's share of :func:`gsae.evals.split_tasks` (a benchmark cut
    into parts counted at half its time each: its repeated statistics pass not included, so an upper estimate)."""
    from gsae.evals import evaluation_tasks, split_tasks, task_cost

    costs = [task_cost(t, seconds) for t in evaluation_tasks(list(names), [""], world, seconds=seconds)]
    total = sum(float(seconds[n]) for n in names)
    return total / max(sum(costs[i] for i in share) for share in split_tasks(costs, world))


def max_rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-6) for x, y in zip(a, b))


def _metrics_rank(rank: int, world: int, port: int, n_tok: int, d_in: int, d_sae: int, k: int, reps: int, q) -> None:
    """One gloo rank: time the training step's reduction both ways on the same random batch."""
    import torch.distributed as dist

    from gsae.metrics import FireCountMetric, ReconMetric, ReconSums, fired_mask, recon_sums

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(n_tok, d_in, generator=g)
    x_hat = x + 0.1 * torch.randn(n_tok, d_in, generator=g)
    idx, acts = torch.randint(0, d_sae, (n_tok, k), generator=g), torch.rand(n_tok, k, generator=g)
    l0 = (acts != 0).sum(-1)

    def packed():  # SAESystem.shared_step's training path
        sums = recon_sums(x, x_hat, l0)
        buf = torch.cat([fired_mask(idx, acts, None, d_sae).double(), sums.flat()])
        dist.all_reduce(buf)
        return buf[:d_sae] > 0, ReconSums.unflat(buf[d_sae:])

    rm, fc = ReconMetric(d_in), FireCountMetric(d_sae)

    def metrics():  # the same with torchmetrics states, synced every step (dead latents need the global mask)
        rm.reset(), fc.reset()
        rm.update(x, x_hat, l0)
        fc.update(idx, acts, None)
        return fc.compute()[0] > 0, rm.compute()

    out = {}
    for name, fn in (("packed", packed), ("torchmetrics", metrics), ("packed", packed), ("torchmetrics", metrics)):
        fn()
        dist.barrier()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        out.setdefault(name, []).append((time.perf_counter() - t) / reps)
    if rank == 0:
        q.put({k: min(v) for k, v in out.items()})
    dist.destroy_process_group()


def metric_sync(args: argparse.Namespace) -> dict:
    """Seconds per training step of the packed all-reduce and of torchmetrics, 2 gloo ranks (min of 2 rounds)."""
    import socket

    import torch.multiprocessing as mp
    import yaml

    cfg = yaml.safe_load(open(args.config))
    d_sae = cfg["model"]["init_args"]["sae"]["init_args"]["d_sae"]
    k = cfg["model"]["init_args"]["sae"]["init_args"]["k"]
    n_tok = cfg["data"]["batch_size"] * cfg["data"]["context_size"] // 2  # per rank
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_metrics_rank, args=(r, 2, port, n_tok, 768, d_sae, k, 10, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = q.get(timeout=600)
    for p in procs:
        p.join()
    return res


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tune_malloc()  # as train.py, where the callback runs (gsae.allocator; GSAE_MALLOC_TUNING=0: off)
    if args.metrics:
        r = metric_sync(args)
        print(f"metric_sync_packed_ms={1000 * r['packed']:.2f} metric_sync_torchmetrics_ms={1000 * r['torchmetrics']:.2f}"
              " (per training step, 2 gloo ranks, fired mask + ReconSums)")
        print(f"torchmetrics_vs_packed={r['torchmetrics'] / r['packed']:.2f}")
        return r
    if args.sweep_eval:
        return sweep_eval(args)
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
    if args.train_steps:
        c = callback_cost(args)
        train_s = c["step_s"] * c["every"]
        print(f"callback_config={c['config']} sae={c['sae']} hook={c['hook']} batch={c['batch']} "
              f"checkpoint_every={c['every']} n_seqs={c['n_seqs']} benchmarks={','.join(c['benchmarks'])}")
        print("train_step_s=" + f"{c['step_s']:.2f} (median of " + " ".join(f"{v:.2f}" for v in c["steps"]) + ")")
        for name, sec in c["per"].items():
            print(f"  callback_{name}_s={sec:.2f}")
        print(f"  callback_logging_s={c['logging_s']:.2f} (scalars, texts and figures to TensorBoard, drawn in-process)")
        print(f"callback_s={c['eval_s']:.2f} train_s_between_checkpoints={train_s:.0f} (train_step_s x {c['every']})")
        print(f"callback_cost_fraction={c['eval_s'] / train_s:.4f}")
        for world in (2, 4, 8):  # under DDP the ranks split the benchmarks (EvaluationCallback(distributed=True))
            print(f"callback_split_speedup_w{world}={split_speedup(c['benchmarks'], c['per'], world):.2f} (estimated: "
                  f"the benchmarks' seconds above, split as {world} ranks on their own devices split them)")
        out.update(callback_s=c["eval_s"], train_step_s=c["step_s"], callback_cost_fraction=c["eval_s"] / train_s)
    print(f"sweep_speedup_vs_naive_cpu_time={cpu_naive / cpu_sweep:.2f}")
    print(f"sweep_flop_bound={flop_bound(lm, lm.hook_layer(HOOK), n_runs, args.seq_len):.2f} (FLOP ratio naive / sweep:"
          " the most an exact sweep can gain over full forwards at this hook)")
    print(f"sweep_speedup_vs_naive={t_naive / t_sweep:.2f}")
    return out


if __name__ == "__main__":
    main()
