"""Training throughput of gsae against SAELens and against the bare LM forward, on identical tokens.

What is timed (steady-state steps: the first ``--warmup`` steps of the first round, the first ``--rewarm`` of every
later round and the last step of every run are discarded; see ``COOLDOWN``):

- ``gsae``: our real training path. A :class:`gsae.systems.LocalSAESystem` (``TopKSAE(d, d_sae, k)``)
  driven by a real ``lightning.Trainer`` over a DataLoader of :class:`TokenBatch` es. A step is the
  interval between two consecutive ``on_train_batch_start`` callbacks (the last one closed by
  ``on_train_epoch_end``), so it includes the batch fetch, the harvest (LM forward to the hook), the
  shuffle buffer, the SAE forward/backward, Adam, the decoder constraints and the dead-latent counters. The
  metrics and their logging (``SAESystem.log_step_metrics``) run on 1 step in ``log_every_n_steps`` and on a fit's first and last; those are not
  timed, and the last one's time is printed (``# a fit's last step``) for what logging costs.
- ``saelens``: SAELens' own full training loop, ``LanguageModelSAETrainingRunner(cfg,
  override_model=lm.model, override_dataset=<in-memory pretokenized Dataset of the same contexts>)``
  with ``TopKTrainingSAEConfig(d_in, d_sae, k)`` (SAELens defaults otherwise: dense TopK activations,
  decoder-norm rescaling, AuxK) and Adam. Its ``ActivationsStore`` harvests with
  ``model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=layer+1)`` and mixes through its
  ``mixing_buffer`` (``n_batches_in_buffer`` chosen so the buffer is 2 batches, mix fraction 0.5: one LM
  forward per training step in steady state, the same mixing depth as our buffer of one batch). A step
  is the interval between two consecutive ``next(data_provider)`` calls of ``SAETrainer.fit`` (the
  last one closed when ``fit`` returns).
- ``forward``: ``lm.activations(tokens, hook)`` alone (our LM forward up to the hook, no grad: the fused
  GPT-2 forward of ``gsae.lm_fused`` unless ``--no-fused``); ``tl_fwd``: the same through TransformerLens
  (``LanguageModel(..., fused=False)`` on the same weights), for ``fused_forward_speedup=``.
- ``--objective gsae`` / ``e2e``: the same Lightning path with ``GradTopKSAE(d, d_sae, k, beta=1e5)`` in
  the ``LocalSAESystem`` (harvest = forward + backward to the hook) or ``TopKSAE`` in the
  ``E2ESAESystem`` (``kl_coef=1``; ``--e2e-downstream`` adds every later ``hook_resid_pre`` as a
  downstream hook).
- ``--objective sweep``: a whole Table-1-style sweep, ``--sweep-ks`` (3 5 10 32 64) × {TopK, g-SAE}
  = 10 SAEs (``TopKSAE(d, d_sae, k, k_aux=0)``, ``GradTopKSAE(d, d_sae, k, beta, k_aux=0)``), trained two
  ways on the same tokens, side by side in this process: ``sweep`` = ONE :class:`gsae.systems.SweepSAESystem`
  run with the 10 as members (one harvest of activations and ``∇ₓL`` per batch, one shuffle buffer, every
  member stepped on it), and ``sep:<member>`` = 10 separate :class:`~gsae.systems.LocalSAESystem` runs, one
  per SAE (each with its own harvest: 5 forwards to the hook, 5 forward + backward). Each of the 11 is a
  method of the interleaving below (a step of a separate run = one SAE trained on one batch; a step of the
  sweep = all 10 trained on it; 10 = 2 × the number of ``--sweep-ks``). With ``T_sweep`` = the sweep's
  median step and ``T_sep`` = the SUM over the 10 separate runs of their median steps (what 10 separate
  runs spend per batch of tokens, all 10 SAEs trained once), both in seconds per ``batch_size ×
  context_size`` LM tokens ``n_tok``:

    ``sweep_tokens_per_s = 10 · n_tok / T_sweep`` and ``separate_tokens_per_s = 10 · n_tok / T_sep``
    (SAE-tokens per second: each LM token trained into each of the 10 SAEs counts once, so a single-SAE
    run's tokens/s is on the same scale), ``sweep_speedup_vs_separate = T_sep / T_sweep`` (= their ratio:
    the wall time of the 10 separate runs ÷ the sweep's, for the same tokens; issue 11's target ≥ 4).

  ``sweep_cpu_time_speedup_vs_separate`` is the same ratio of this process's CPU seconds per step (all
  threads; steadier than wall time when other jobs share the cores).
  ``sweep_flop_expectation`` is the same ratio of FLOPs per token (:func:`sweep_flops`: 5 TopK + 5 g-SAE
  floors of :func:`flop_floor` ÷ one g-SAE harvest + 10 SAEs), ``sweep_speedup_vs_flops`` the measured ÷ it.
  ``--sweep-hooks H1 H2 ...`` puts those members at every hook (a sweep over layers: one forward to the deepest hook
  and one backward to the shallowest; each separate run at its member's hook).
  Defaults for this objective (CPU budget: the 11 runs are ~30 TopK-steps' work per measured step):
  ``--batch-size 16`` (2048 tokens per step; every cost here is linear in the tokens, so the ratio does not
  depend on it beyond per-step constants) and ``--steps 5 --warmup 1``; ``--d-sae`` stays 12288.

Allocator: the whole process runs with one allocator setting, so every method gets the same: ``--malloc tuned``
(default) as ``train.py`` runs (``gsae.allocator``: freed large tensors reused, not re-faulted), ``--malloc default``
glibc's. (Switching it per method, to run SAELens "as its users do", proved unmeasurable: the methods share one
heap, and each inherits the state the others left.)

Methods are interleaved: each of ``--rounds`` rounds (default: one per measured step) runs every method
once (order rotated between rounds) for ``steps/rounds`` steps, plus ``--warmup`` discarded steps in the
first round (``--rewarm`` in later ones) and one discarded last step; the figures are medians over all measured
steps. The machine may be shared: the per-round
ratios to TopK are printed too (``#`` lines), as a check on drift in the background load.
Tokens per second count LM tokens (``batch_size × context_size`` per step).

Usage::

    python benchmarks/train_throughput.py                    # TopK: gsae vs SAELens vs forward (~3-4 min on 2 cores)
    python benchmarks/train_throughput.py --objective all    # TopK, g-SAE and e2e side by side
    python benchmarks/train_throughput.py --profile 3        # also a torch.profiler table of 3 gsae steps
    python benchmarks/train_throughput.py --objective sweep --count-ops 3   # also aten calls per step (GPU launches)
    python benchmarks/train_throughput.py --objective sweep  # 10 SAEs: one SweepSAESystem vs 10 separate runs (5-13 min)

The last lines of the default run are ``gsae_tokens_per_s=``, ``saelens_tokens_per_s=``,
``forward_only_tokens_per_s=``, ``ratio_vs_saelens=`` (gsae / SAELens) and ``ratio_vs_forward=``, then what FLOPs
allow: ``ratio_vs_forward_flop_bound=`` (forward FLOPs ÷ forward + SAE FLOPs: the ratio if the SAE ran at the
forward's FLOP rate with nothing else in the step), ``ratio_vs_forward_vs_bound=`` (the distance) and
``saelens_flop_ratio=`` (SAELens' FLOPs per token ÷ ours: the ratio if both ran at the same FLOP rate).
With several objectives it prints ``objective=NAME tokens_per_s=…`` per objective,
``gsae_cost_vs_topk=`` / ``e2e_cost_vs_topk=`` (time per token ÷ TopK's), ``gsae_flop_floor=`` /
``e2e_flop_floor=`` (the same ratio of FLOPs per token, from the model's shape: :func:`flop_floor`) and
``*_cost_vs_floor=`` (the distance). ``--objective sweep`` ends with ``sweep_tokens_per_s=``,
``separate_tokens_per_s=``, ``sweep_speedup_vs_separate=``, ``sweep_cpu_time_speedup_vs_separate=``,
``sweep_flop_expectation=`` and ``sweep_speedup_vs_flops=``. Objectives are the keys of ``SYSTEMS``
(objective -> system builder; ``all`` runs ``OBJECTIVES``, not the sweep).
On a GPU: ``--device cuda --precision bf16-mixed [--lm-dtype bfloat16]`` (SAELens then runs with its own
``autocast`` and ``autocast_lm``; every timestamp waits for the GPU's queued work). ``benchmarks/gpu.sh`` runs the
three benchmarks so, and the CUDA tests.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import logging
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")  # SAELens' progress bar
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

OBJECTIVES = ("topk", "gsae", "e2e")  # what --objective all runs (SYSTEMS, defined below, adds "sweep")
SWEEP = "sweep"
#: per-objective defaults of options left unset on the command line
OBJECTIVE_DEFAULTS = {SWEEP: {"steps": 5, "warmup": 1, "batch_size": 16}}
GENERIC_DEFAULTS = {"steps": 6, "warmup": 2, "batch_size": 32}
#: steps every run takes after its measured ones, not timed: a Lightning fit's last step computes and logs the
#: metrics (as its first does, and then 1 step in ``log_every_n_steps``, 50, in a run) and closes the fit, so a
#: round whose measured step is its last times the logging path, not training (on a GPU that was up to 4x a step).
#: Every method (SAELens and the bare forward too) runs it, so they stay on the same tokens; the Lightning methods'
#: cooldown times are reported as ``logging step`` lines.
COOLDOWN = 1


# ---------------------------------------------------------------------------------------------- setup
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--objective",
        choices=[*OBJECTIVES, SWEEP, "all"],
        default="topk",
        help="training objective(s) to time; sweep: 10 SAEs in one SweepSAESystem vs 10 separate runs",
    )
    p.add_argument(
        "--baselines",
        choices=["auto", "on", "off"],
        default="auto",
        help="also time SAELens and the bare forward (auto: only with --objective topk)",
    )
    p.add_argument("--steps", type=int, default=None, help="measured steps per method (default 6; sweep: 5)")
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved rounds the measured steps are split into (default: one measured step per round)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="discarded steps at the start of the first round (buffer fills, b_dec init, Adam state; default 2, sweep: 1)",
    )
    p.add_argument(
        "--rewarm",
        type=int,
        default=1,
        help="discarded steps at the start of each later round (default 1: a fit's first step builds the optimizer "
        "state and logs; see COOLDOWN for its last)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="contexts per step (default 32; sweep: 16)")
    p.add_argument("--context-size", type=int, default=128, help="tokens per context")
    p.add_argument(
        "--malloc",
        choices=["tuned", "default"],
        default="tuned",
        help="glibc allocator for the whole process, every method alike: tuned as train.py does (gsae.allocator) or glibc's default",
    )
    p.add_argument("--d-sae", type=int, default=12288)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--hook", default=None, help="default: blocks.<n_layers // 2>.hook_resid_pre (blocks.6 of GPT-2)")
    p.add_argument("--model", default="random-gpt2", help="gsae LanguageModel name (offline: random-gpt2)")
    p.add_argument("--buffer-size", type=int, default=None, help="gsae shuffle buffer in tokens (default: one batch)")
    p.add_argument("--beta", type=float, default=1e5, help="g-SAE beta")
    p.add_argument(
        "--sweep-ks",
        type=int,
        nargs="+",
        default=[3, 5, 10, 32, 64],
        help="sweep: the k of its TopK and g-SAE members (2 members per k; Table 1's by default)",
    )
    p.add_argument(
        "--sweep-hooks",
        nargs="+",
        default=None,
        help="sweep: members at each of these hooks (every --sweep-ks k × {TopK, g-SAE} per hook; default --hook), "
        "e.g. blocks.3.hook_resid_post blocks.5.hook_resid_post blocks.7.hook_resid_post blocks.9.hook_resid_post",
    )
    p.add_argument(
        "--e2e-downstream", action="store_true", help="e2e+ds: every later hook_resid_pre as downstream hook"
    )
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the LM, the SAEs and SAELens on this device)")
    p.add_argument("--precision", default="32-true", help="Lightning precision of the gsae runs, e.g. bf16-mixed")
    p.add_argument("--lm-dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="LM weights dtype")
    p.add_argument("--no-fused", action="store_true", help="gsae's LM runs through TransformerLens (--model.lm.fused false)")
    p.add_argument("--compile", action="store_true", help="torch.compile the fused LM steps (--model.lm.compile true)")
    p.add_argument("--stack", default="auto", choices=["auto", "on", "off"],
                   help="sweep: --model.stack_members (auto: stacked on a GPU, each member on its own on the CPU)")
    p.add_argument("--stack-topk", default="auto", choices=["auto", "per-run", "per-block"],
                   help="a stacked sweep's selection: a top-k per run of equal k, or per block of equally scored rows "
                   "at the largest k (gsae.sae.stacked.GROUPED_TOPK_DEVICES; auto: per block on a GPU)")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing, profile N steps of each objective with torch.profiler and print the top ops",
    )
    p.add_argument(
        "--count-ops",
        type=int,
        default=0,
        metavar="N",
        help="after timing, count the aten calls of N steady steps of each gsae method (a GPU launches a kernel for each "
        "that is not a view: where a step is host-bound, what its cost scales with) and print ops_per_step_<method>=; "
        "a stacked sweep counts its GPU paths (one-pass decoder constraints, one torch sort) on any device",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.hook is None:  # the middle layer of whichever model: blocks.6 of GPT-2 small (the figures)
        from gsae.lm import RANDOM_PRESETS

        n_layers = RANDOM_PRESETS.get(args.model, {}).get("n_layers", 12)
        if args.model.startswith("gsae-"):
            from gsae.tinylm import read_config

            n_layers = read_config(args.model)["arch"]["n_layers"]
        args.hook = f"blocks.{n_layers // 2}.hook_resid_pre"
    for key, value in {**GENERIC_DEFAULTS, **OBJECTIVE_DEFAULTS.get(args.objective, {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.rounds is None:
        args.rounds = args.steps
    args.rounds = max(1, min(args.rounds, args.steps))
    if args.buffer_size is None:
        args.buffer_size = args.batch_size * args.context_size
    return args


def quiet() -> None:
    import lightning.pytorch  # noqa: F401 - its import sets its logger to INFO: import first, then quieten

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "sae_lens", "transformer_lens", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def make_tokens(n_batches: int, batch_size: int, context_size: int, vocab: int, bos: int, seed: int) -> torch.Tensor:
    """``(n_batches, B, T)`` random token ids with BOS at position 0 (as packed, BOS-prefixed contexts)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n_batches, batch_size, context_size), generator=gen)
    tokens[..., 0] = bos
    return tokens


def split_steps(steps: int, rounds: int) -> list[int]:
    base, extra = divmod(steps, rounds)
    return [base + (1 if r < extra else 0) for r in range(rounds)]


# ---------------------------------------------------------------------------------------------- gsae (Lightning)
def sync() -> None:
    """Wait for the GPU's queued work, so that a timestamp closes the step it follows (a no-op on the CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is missing): a fresh page of a large tensor
    costs one, ~40 µs on a VM, so a step that re-faults its activations shows it here."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class StepTimer:
    """Lightning callback: a mark (wall time, this process's CPU time, its minor page faults) at every
    ``on_train_batch_start`` and once at epoch end; per-step differences of each."""

    def __new__(cls):
        import lightning.pytorch as pl

        def mark() -> tuple[float, float, int]:
            sync()
            return time.perf_counter(), time.process_time(), minor_faults()

        class _StepTimer(pl.Callback):
            def __init__(self) -> None:
                self.marks: list[tuple[float, float, int]] = []
                self.end: tuple[float, float, int] | None = None

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                self.marks.append(mark())

            def on_train_epoch_end(self, trainer, pl_module) -> None:
                if self.end is None:
                    self.end = mark()

            def on_train_end(self, trainer, pl_module) -> None:
                if self.end is None:
                    self.end = mark()

            def _steps(self, i: int) -> list:
                ts = [m[i] for m in (*self.marks, self.end)]
                return [b - a for a, b in zip(ts[:-1], ts[1:])]

            def step_times(self) -> list[float]:
                return self._steps(0)

            def cpu_times(self) -> list[float]:
                return self._steps(1)

            def faults(self) -> list[int]:
                return self._steps(2)

        return _StepTimer()


def build_topk(lm, args):
    from gsae.sae import TopKSAE
    from gsae.systems import LocalSAESystem

    d_sae, k = args.d_sae, args.k
    return LocalSAESystem(
        lm=lm, sae=lambda d: TopKSAE(d, d_sae, k), hook=args.hook, buffer_size=args.buffer_size, seed=args.seed
    )


def build_gsae(lm, args):
    from gsae.sae import GradTopKSAE
    from gsae.systems import LocalSAESystem

    d_sae, k = args.d_sae, args.k
    return LocalSAESystem(
        lm=lm,
        sae=lambda d: GradTopKSAE(d, d_sae, k, beta=args.beta),
        hook=args.hook,
        buffer_size=args.buffer_size,
        seed=args.seed,
    )


def build_e2e(lm, args):
    from gsae.sae import TopKSAE

    d_sae, k = args.d_sae, args.k
    try:
        from gsae.systems import E2ESAESystem
    except ImportError as e:
        raise NotImplementedError(f"gsae.systems.E2ESAESystem is not importable yet ({e})") from None
    downstream = None
    if args.e2e_downstream:
        layer = lm.hook_layer(args.hook) or 0
        downstream = [f"blocks.{i}.hook_resid_pre" for i in range(layer + 1, lm.n_layers)]
    return E2ESAESystem(
        lm=lm,
        sae=lambda d: TopKSAE(d, d_sae, k),
        hook=args.hook,
        kl_coef=1.0,
        downstream_hooks=downstream,
        downstream_coef=2.5 if downstream else 0.0,
        seed=args.seed,
    )


def sweep_members(args) -> list[dict]:
    """The sweep's members: TopK and g-SAE at every ``--sweep-ks`` k (``k_aux=0``, as the Table 1 config), at every
    ``--sweep-hooks`` hook (named ``<kind>-k<k>``, plus ``-<hook>`` when there are several hooks)."""
    hooks = args.sweep_hooks or [args.hook]
    members = []
    for hook in hooks:
        for kind, cls in (("topk", "TopKSAE"), ("gsae", "GradTopKSAE")):
            for k in args.sweep_ks:
                init = {"d_sae": args.d_sae, "k": k, "k_aux": 0, **({"beta": args.beta} if kind == "gsae" else {})}
                name = f"{kind}-k{k}" + (f"-{hook.replace('.', '_')}" if len(hooks) > 1 else "")
                members.append({"name": name, "hook": hook, "sae": {"class_path": f"gsae.sae.{cls}", "init_args": init}})
    return members


def build_sweep(lm, args):
    """One :class:`SweepSAESystem` training every member of :func:`sweep_members` from one harvest per batch."""
    from gsae.systems import SweepSAESystem

    return SweepSAESystem(
        lm=lm, members=sweep_members(args), buffer_size=args.buffer_size, seed=args.seed,
        stack_members={"auto": None, "on": True, "off": False}[args.stack],
    )


def build_separate(lm, args) -> dict:
    """``{member name: LocalSAESystem}``: the sweep's members as separate one-SAE runs (same SAE, options, seed)."""
    from gsae.systems import LocalSAESystem
    from gsae.systems.sweep import build_member_sae

    def one(spec):
        return LocalSAESystem(
            lm=lm,
            sae=lambda d: build_member_sae(spec["sae"], d, spec["name"]),
            hook=spec["hook"],
            buffer_size=args.buffer_size,
            seed=args.seed,
        )

    return {spec["name"]: one(spec) for spec in sweep_members(args)}


def sweep_flops(floors: dict[str, dict[str, float]], members: list[dict]) -> dict[str, float]:
    """FLOPs per LM token of the sweep and of its members as separate runs (from :func:`flop_floor`'s parts at each
    member's hook: ``floors[hook]``).

    Sweep: one harvest (with a g-SAE, forward + backward to the shallowest g-SAE hook ``h``: ``prefix(h) +
    2·suffix(h)``; else the forward to the deepest hook, the largest ``prefix``) + every member's encoder (``sae``) +
    each g-SAE member's scores (another ``sae``). Separate: each TopK member ``topk`` = prefix + sae at its hook, each
    g-SAE member ``gsae`` = prefix + 2·suffix + 2·sae at its hook.
    """
    grad = [m for m in members if m["sae"]["class_path"].endswith("GradTopKSAE")]
    if grad:
        first = min((floors[m["hook"]] for m in grad), key=lambda f: f["prefix"])
        harvest = first["prefix"] + 2 * first["suffix"]
    else:
        harvest = max(floors[m["hook"]]["prefix"] for m in members)
    sweep = harvest + sum(floors[m["hook"]]["sae"] for m in members) + sum(floors[m["hook"]]["sae"] for m in grad)
    separate = sum(floors[m["hook"]]["gsae" if m in grad else "topk"] for m in members)
    return {"sweep": sweep, "separate": separate, "expectation": separate / sweep}


#: objective -> builder of its Lightning system ``(lm, args) -> LightningModule``; ``--objective all`` times
#: each of ``OBJECTIVES``; ``sweep`` is also timed against :func:`build_separate`'s runs (``--objective sweep``)
SYSTEMS = {"topk": build_topk, "gsae": build_gsae, "e2e": build_e2e, SWEEP: build_sweep}


def build_system(objective: str, lm, args):
    return SYSTEMS[objective](lm, args)


def run_lightning(
    system, batches: torch.Tensor, callbacks=(), cpu_times: list | None = None, faults: list | None = None
) -> list[float]:
    """Fit ``system`` for ``len(batches)`` steps with a real ``lightning.Trainer``; per-step seconds (and, into
    ``cpu_times`` / ``faults`` if given, per-step CPU seconds of this process, all threads, and minor page faults)."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from gsae.data.batch import TokenBatch

    data = [TokenBatch(batches[i], i) for i in range(batches.shape[0])]
    # as gsae's data module on a GPU: pinned batches (a pageable copy to the device waits for the queued kernels)
    loader = DataLoader(data, batch_size=None, shuffle=False, num_workers=0, pin_memory=ARGS.device.startswith("cuda"))
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="gpu" if ARGS.device.startswith("cuda") else "cpu",
        precision=ARGS.precision,
        devices=1,
        max_steps=len(data),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer, *callbacks],
    )
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit(system, train_dataloaders=loader)
    # a finished Trainer and its optimizer (Adam state: 2x the SAE parameters) are cyclic garbage that Python's
    # collector may not reach for several rounds: collect now, outside the timed steps, so that runs do not pile
    # up optimizer states (+1.5 GiB per sweep round at d_sae 12288) and slow each other through memory
    system.trainer = None
    del trainer
    gc.collect()
    if cpu_times is not None:
        cpu_times.extend(timer.cpu_times())
    if faults is not None:
        faults.extend(timer.faults())
    return timer.step_times()


# ---------------------------------------------------------------------------------------------- SAELens
class TimedProvider:
    """Wraps the ActivationsStore handed to ``SAETrainer``: a timestamp at every ``next()``."""

    def __init__(self, store) -> None:
        self.store = store
        self.starts: list[float] = []

    def __iter__(self):
        return self

    def __next__(self):
        sync()
        self.starts.append(time.perf_counter())
        return next(self.store)

    def __getattr__(self, name):
        return getattr(self.store, name)


class SAELensBench:
    """SAELens' ``LanguageModelSAETrainingRunner`` on our HookedTransformer and an in-memory token dataset."""

    def __init__(self, lm, tokens: torch.Tensor, steps_per_run: int, args) -> None:
        import datasets
        from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
        from sae_lens.config import LoggingConfig
        from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

        B, T = args.batch_size, args.context_size
        rows = tokens.reshape(-1, T)
        dataset = datasets.Dataset.from_dict({"tokens": rows.tolist()})
        self.cfg = LanguageModelSAERunnerConfig(
            sae=TopKTrainingSAEConfig(d_in=lm.d_in(args.hook), d_sae=args.d_sae, k=args.k),
            model_name=args.model,
            hook_name=args.hook,
            dataset_path="in-memory",
            is_dataset_tokenized=True,
            streaming=False,
            context_size=T,
            store_batch_size_prompts=B,
            train_batch_size_tokens=B * T,
            # mixing buffer = n_batches_in_buffer * context_size tokens = 2 training batches, half kept:
            # one LM forward per training step in steady state
            n_batches_in_buffer=2 * B,
            training_tokens=steps_per_run * B * T,
            prepend_bos=True,
            exclude_special_tokens=[lm.bos_token_id],
            lr=1e-4,
            device=args.device,
            dtype="float32",
            # under --precision bf16-mixed, SAELens' own bf16 autocast for the SAE step and the harvest, as ours
            autocast=args.precision.startswith("bf16"),
            autocast_lm=args.precision.startswith("bf16"),
            logger=LoggingConfig(log_to_wandb=False),
            checkpoint_path=None,
            output_path=None,
            n_checkpoints=0,
            save_final_checkpoint=False,
            verbose=False,
            seed=args.seed,
        )
        with contextlib.redirect_stdout(io.StringIO()):
            self.runner = LanguageModelSAETrainingRunner(self.cfg, override_dataset=dataset, override_model=lm.model)
        self.timed = TimedProvider(self.runner.activations_store)
        self.runner.activations_store = self.timed

    def run(self) -> list[float]:
        self.timed.starts = []
        self.runner.run()
        sync()
        end = time.perf_counter()
        ts = [*self.timed.starts, end]
        return [b - a for a, b in zip(ts[:-1], ts[1:])]


# ---------------------------------------------------------------------------------------------- forward only
def run_forward(lm, hook: str, batches: torch.Tensor) -> list[float]:
    """Seconds per ``lm.activations`` call (under the gsae runs' autocast when ``--precision`` is bf16-mixed)."""
    device = torch.device(ARGS.device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=ARGS.precision.startswith("bf16"))
    out = []
    for i in range(batches.shape[0]):
        tokens = batches[i].to(device)
        t0 = time.perf_counter()
        with amp:
            lm.activations(tokens, hook)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


# ---------------------------------------------------------------------------------------------- FLOP floors
def flop_floor(lm, hook: str, context_size: int, d_sae: int) -> dict[str, float]:
    """FLOPs per token of each objective's unavoidable matmuls, from the model's shape.

    A block's attention step costs ``2·4·D²`` (packed QKV and the output projection) ``+ 4·T·D`` (scores and
    values over the whole context, as the dense kernels do), its MLP step ``2·2·D·d_mlp``; the unembedding
    ``2·D·V``. ``prefix`` = the steps before the hook, ``suffix`` = the steps after it + the unembedding. The SAE
    costs its dense encoder ``2·D·d_sae`` (the k-sparse decoder and the sparse backward are O(k·D)); SAELens'
    default TopK SAE (dense activations) five such matmuls (encoder; dense decoder; the decoder's two gradients
    and the encoder's, all dense); a g-SAE
    also scores every latent with ``|W_dec g|`` (``2·D·d_sae``). A backward that needs input gradients only
    costs about its forward. TopK = prefix + SAE; g-SAE = prefix + suffix forward + suffix backward + SAE +
    scores; e2e = prefix + clean suffix + patched suffix + its backward + SAE.
    """
    from gsae import lm_fused

    cfg = lm.model.cfg
    D, F_, V, L, T = cfg.d_model, cfg.d_mlp, cfg.d_vocab, cfg.n_layers, context_size
    attn, mlp = 2 * 4 * D * D + 4 * T * D, 2 * 2 * D * F_
    steps = [attn if s % 2 == 0 else mlp for s in range(2 * L)]
    hp = lm_fused.hook_point(hook)
    point = hp[0] if hp is not None and hp[1] == "point" else 2 * ((lm.hook_layer(hook) or 0) + 1)
    prefix, suffix = sum(steps[:point]), sum(steps[point:]) + 2 * D * V
    sae = 2 * D * d_sae
    topk = prefix + sae
    gsae = prefix + 2 * suffix + sae + 2 * D * d_sae
    e2e = prefix + 3 * suffix + sae
    saelens = prefix + 5 * sae
    return {"prefix": prefix, "suffix": suffix, "sae": sae, "topk": topk, "gsae": gsae, "e2e": e2e, "saelens": saelens}


# ---------------------------------------------------------------------------------------------- profiling
def _wrap(obj, name: str, label: str) -> None:
    """Put ``obj.name`` inside a ``record_function(label)`` region (instance attribute; class untouched)."""
    from torch.profiler import record_function

    fn = getattr(obj, name)

    def wrapped(*a, **kw):
        with record_function(label):
            return fn(*a, **kw)

    setattr(obj, name, wrapped)


#: phases of a step, as labelled by :func:`profile_objective`
PHASES = (
    "# step",
    "# harvest (LM)",
    "# buffer.mix",
    "# SAE forward",
    "# objective",
    "# metrics+log (shared_step rest)",
    "# backward",
    "# Adam update",
    "# decoder constraints",
)


def profile_objective(objective: str, lm, tokens: torch.Tensor, n_steps: int, args) -> None:
    """torch.profiler over ``n_steps`` steady-state steps (after ``--warmup`` unprofiled ones) of ``objective``:
    a per-phase table (ms per step) and the top ops by self CPU time."""
    import lightning.pytorch as pl
    from torch.profiler import ProfilerActivity, profile, record_function

    warm = max(args.warmup, 1)
    cuda = args.device.startswith("cuda")

    class Prof(pl.Callback):
        def __init__(self) -> None:
            self.prof = profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])])
            self.regions: dict[str, object] = {}
            self.on = False

        def _open(self, label: str) -> None:
            if self.on:
                self.regions[label] = record_function(label)
                self.regions[label].__enter__()

        def _close(self, label: str) -> None:
            r = self.regions.pop(label, None)
            if r is not None:
                r.__exit__(None, None, None)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._close("# step")
            if batch_idx == warm:
                self.prof.__enter__()
                self.on = True
            elif batch_idx == warm + n_steps and self.on:  # the fit's last step (logging) is not profiled
                self.prof.__exit__(None, None, None)
                self.on = False
            self._open("# step")

        def on_before_backward(self, trainer, pl_module, loss) -> None:
            self._open("# backward")

        def on_after_backward(self, trainer, pl_module) -> None:
            self._close("# backward")

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            self._open("# Adam update")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._close("# Adam update")

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self._close("# step")
            if self.on:
                self.prof.__exit__(None, None, None)
                self.on = False

    system = build_system(objective, lm, args)
    if hasattr(system, "harvest"):
        _wrap(system, "harvest", "# harvest (LM)")
    if hasattr(system, "buffer"):
        _wrap(system.buffer, "mix", "# buffer.mix")
    _wrap(system.sae, "forward", "# SAE forward")
    _wrap(system, "objective", "# objective")
    _wrap(system.sae, "normalize_decoder", "# decoder constraints")
    _wrap(system.sae, "remove_parallel_grad", "# decoder constraints")
    orig_shared = system.shared_step
    orig_objective = system.objective
    store: dict[str, object] = {}

    def objective_once(batch, stage):  # run the objective outside the metrics region
        return store.pop("out") if "out" in store else orig_objective(batch, stage)

    def shared_step(batch, stage):
        store["out"] = orig_objective(batch, stage)
        with record_function("# metrics+log (shared_step rest)"):
            return orig_shared(batch, stage)

    system.objective = objective_once
    system.shared_step = shared_step
    prof = Prof()
    run_lightning(system, tokens[: warm + n_steps + COOLDOWN], callbacks=[prof])
    events = prof.prof.key_averages()
    total: dict[str, float] = {}  # a label's host time (on a GPU its kernel-timeline twin has the same key, 0 host time)
    for e in events:
        total[e.key] = max(total.get(e.key, 0.0), e.cpu_time_total)
    step = total.get("# step", 0.0)
    print(f"\n=== torch.profiler: objective={objective}, {n_steps} steps after {warm} warm-up (ms per step) ===")
    if cuda:  # GPU time: every kernel's, summed (a step whose kernels sum to less than its wall time waits on Python)
        kernels = sum(e.self_device_time_total for e in events
                      if e.device_type == torch.autograd.DeviceType.CUDA and not e.key.startswith("# "))
        print(f"{'# GPU kernels (sum of self times)':36s} {kernels / 1e3 / n_steps:10.1f} ms")
    for label in PHASES:
        if label in total:
            ms = total[label] / 1e3 / n_steps
            print(f"{label:36s} {ms:10.1f} ms  {100 * total[label] / max(step, 1e-9):5.1f}%  (host wall)")
    print(events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=30))


#: aten calls that launch no kernel although their schema is not a view's (``--count-ops`` counts them with the views)
NO_KERNEL_OPS = (torch.ops.aten.detach, torch.ops.aten.lift_fresh, torch.ops.aten.promote_types, torch.ops.aten.result_type)


def count_ops(name: str, system, tokens: torch.Tensor, n_steps: int, args) -> dict[str, float]:
    """aten calls per training step of ``system`` over ``n_steps`` steady-state steps (after ``--warmup`` uncounted ones;
    the fit's last, logging, step uncounted), forward, backward and optimizer alike, split into views and other calls
    that launch nothing (:data:`NO_KERNEL_OPS`, profiler marks), host reads of a device value (``.item()``, ``bool()``: a wait for the GPU) and the rest (a kernel launch each on
    a GPU). Printed as ``ops_per_step_<name>=``, ``kernel_ops_per_step_<name>=`` and ``host_reads_per_step_<name>=``."""
    import lightning.pytorch as pl
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.views = self.reads = self.kernels = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                self.reads += 1
            elif func.is_view or func.namespace != "aten" or func.overloadpacket in NO_KERNEL_OPS:
                self.views += 1  # views, profiler marks, dtype arithmetic: nothing a GPU runs
            else:
                self.kernels += 1
            return func(*args, **(kwargs or {}))

    warm = max(args.warmup, 3)  # past the shuffle buffer's first fill and the fit's first (logging) step
    count = Count()
    import gsae.sae.stacked as stacked

    # a stacked sweep's CPU-only choices (each SAE's cache-blocked constraints, numpy's radix sort, a top-k per run of
    # equal k) would count what a GPU does not run: count the GPU's paths (the same results, tests/sae/test_stacked.py)
    cpu_paths = stacked.PER_SAE_CONSTRAINT_DEVICES, stacked.RADIX_SORT_DEVICES, stacked.GROUPED_TOPK_DEVICES
    stacked.PER_SAE_CONSTRAINT_DEVICES, stacked.RADIX_SORT_DEVICES = set(), set()
    if args.stack_topk != "per-run":
        stacked.GROUPED_TOPK_DEVICES = {*stacked.GROUPED_TOPK_DEVICES, "cpu"}

    class Counter(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == warm:
                count.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == warm + n_steps - 1:
                count.__exit__(None, None, None)

    try:
        run_lightning(system, tokens[: warm + n_steps + COOLDOWN], callbacks=[Counter()])
    finally:
        stacked.PER_SAE_CONSTRAINT_DEVICES, stacked.RADIX_SORT_DEVICES, stacked.GROUPED_TOPK_DEVICES = cpu_paths
    out = {"kernel": count.kernels / n_steps, "view": count.views / n_steps, "read": count.reads / n_steps}
    print(f"ops_per_step_{name}={(count.kernels + count.views + count.reads) / n_steps:.1f}")
    print(f"kernel_ops_per_step_{name}={out['kernel']:.1f}")
    print(f"host_reads_per_step_{name}={out['read']:.1f}")
    return out


# ---------------------------------------------------------------------------------------------- main
def fmt(x: float) -> str:
    return f"{x:.1f}"


def report_sweep(lm, args, members, med, round_med, tokens_per_step, skipped, cpu) -> None:
    """The sweep's figures (see the module docstring): SAE-tokens per second both ways, their ratio, FLOPs."""
    seps = [f"sep:{m['name']}" for m in members]
    if SWEEP in skipped or SWEEP not in med or any(s not in med for s in seps):
        print(f"sweep_tokens_per_s=n/a ({skipped.get(SWEEP, 'not measured')})")
        return
    n = len(members)
    t_sweep, t_sep = med[SWEEP], sum(med[s] for s in seps)
    t_topk = sum(med[s] for s in seps if s.startswith("sep:topk"))
    print(
        f"# per batch of {tokens_per_step} tokens: sweep {t_sweep:.2f} s (all {n} SAEs); separate {t_sep:.2f} s "
        f"= sum of the {n} runs' median steps (TopK runs {t_topk:.2f} s, g-SAE runs {t_sep - t_topk:.2f} s)"
    )
    pairs = [sum(round_med[s][r] for s in seps) / round_med[SWEEP][r] for r in range(len(round_med[SWEEP]))]
    print(f"# separate ÷ sweep, per round: {' '.join(f'{p:.2f}' for p in pairs)}")
    cpu_med = {name: statistics.median(v) for name, v in cpu.items() if v}
    cpu_speedup = None
    if SWEEP in cpu_med and all(s in cpu_med for s in seps):
        c_sweep, c_sep = cpu_med[SWEEP], sum(cpu_med[s] for s in seps)
        cpu_speedup = c_sep / c_sweep
        print(
            f"# CPU seconds of this process per batch (all threads; less sensitive to other jobs than wall time): "
            f"sweep {c_sweep:.2f}, separate {c_sep:.2f}"
        )
    floors = {m["hook"]: flop_floor(lm, m["hook"], args.context_size, args.d_sae) for m in members}
    flops = sweep_flops(floors, members)
    for hook, floor in floors.items():
        print(f"# MFLOP/token at {hook}: " + " ".join(f"{k}={v / 1e6:.1f}" for k, v in floor.items()))
    print(
        f"# MFLOP/token: sweep={flops['sweep'] / 1e6:.1f} (one harvest + {n} SAEs) separate={flops['separate'] / 1e6:.1f}"
    )
    speedup = t_sep / t_sweep
    print(f"# LM tokens per second of the sweep run (each trained into all {n} SAEs):")
    print(f"objective={SWEEP} tokens_per_s={fmt(tokens_per_step / t_sweep)}")
    print(f"sweep_tokens_per_s={fmt(n * tokens_per_step / t_sweep)}")
    print(f"separate_tokens_per_s={fmt(n * tokens_per_step / t_sep)}")
    print(f"sweep_speedup_vs_separate={speedup:.3f}")
    if cpu_speedup is not None:
        print(f"sweep_cpu_time_speedup_vs_separate={cpu_speedup:.3f}")
    print(f"sweep_flop_expectation={flops['expectation']:.3f}")
    print(f"sweep_speedup_vs_flops={speedup / flops['expectation']:.3f}")


ARGS = parse_args([])  # the module-level defaults; main() replaces them with the command line


def main(argv: list[str] | None = None) -> int:
    global ARGS
    args = ARGS = parse_args(argv)
    quiet()
    if args.stack_topk != "auto":
        import gsae.sae.stacked as stacked

        stacked.GROUPED_TOPK_DEVICES = set() if args.stack_topk == "per-run" else {"cpu", "cuda"}
    torch.set_num_threads(args.threads)
    from gsae.allocator import tune_malloc
    from gsae.lm import LanguageModel

    malloc_tuned = tune_malloc(args.malloc == "tuned")

    objectives = list(OBJECTIVES) if args.objective == "all" else [args.objective]
    members = sweep_members(args)
    baselines = args.baselines == "on" or (args.baselines == "auto" and args.objective == "topk")
    B, T = args.batch_size, args.context_size
    tokens_per_step = B * T
    per_round = split_steps(args.steps, args.rounds)
    warm = [args.warmup] + [args.rewarm] * (args.rounds - 1)
    steps_per_run = [w + m + COOLDOWN for w, m in zip(warm, per_round)]

    t_setup = time.perf_counter()
    lm = LanguageModel(args.model, seed=args.seed, dtype=args.lm_dtype, fused=not args.no_fused, compile=args.compile)
    lm.model  # noqa: B018 - load now
    lm.to(args.device)
    # the same weights through TransformerLens only: the reference forward of the fused one
    lm_tl = LanguageModel(args.model, seed=args.seed, dtype=args.lm_dtype, fused=False)
    lm_tl._model = lm.model
    n_batches = max(steps_per_run) + 1
    # SAELens streams through its dataset across rounds (+2 batches to fill its mixing buffer): give it enough rows
    sl_batches = sum(steps_per_run) + 4
    tokens = make_tokens(max(n_batches, sl_batches), B, T, lm.d_vocab, lm.bos_token_id, args.seed)

    print(
        f"# gsae train throughput: model={args.model} hook={args.hook} tokens/step={B}x{T}={tokens_per_step} "
        f"d_sae={args.d_sae} k={args.k} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"malloc_tuned={int(malloc_tuned)}"
    )
    if SWEEP in objectives:
        print(
            f"# sweep: {len(members)} members {[m['name'] for m in members]} (d_sae={args.d_sae}, k_aux=0, "
            f"beta={args.beta:g}): one SweepSAESystem run vs {len(members)} LocalSAESystem runs (sep:<member>)"
        )
    print(
        f"# rounds={args.rounds} measured steps/round={per_round} warmup steps/round={warm} "
        f"objectives={objectives} baselines={baselines} gsae buffer_size={args.buffer_size}"
    )

    methods: dict[str, callable] = {}
    skipped: dict[str, str] = {}

    def batches_for_round(r: int) -> torch.Tensor:
        return tokens[: steps_per_run[r]]

    cpu: dict[str, list[float]] = {}  # Lightning methods: measured per-step CPU seconds of this process

    def lightning_method(name: str, system):
        cpu[name] = []

        def run(r: int) -> list[float]:
            c: list[float] = []
            f: list[int] = []
            out = run_lightning(system, batches_for_round(r), cpu_times=c, faults=f)
            cpu[name].extend(c[warm[r] : warm[r] + per_round[r]])
            print(f"# round {r} {name}: minor page faults per step {' '.join(str(x) for x in f)}")
            return out

        return run

    for obj in objectives:
        try:
            system = build_system(obj, lm, args)
        except NotImplementedError as e:
            skipped[obj] = str(e)
            print(f"# objective={obj}: SKIPPED: {e}")
            continue
        methods[obj] = lightning_method(obj, system)
        if obj == SWEEP:
            for name, sep in build_separate(lm, args).items():
                methods[f"sep:{name}"] = lightning_method(f"sep:{name}", sep)
    if baselines:
        import sae_lens

        sl = SAELensBench(lm, tokens[:sl_batches], steps_per_run[0], args)
        print(
            f"# SAELens {sae_lens.__version__}: LanguageModelSAETrainingRunner + TopKTrainingSAE, "
            f"n_batches_in_buffer={sl.cfg.n_batches_in_buffer}, exclude_special_tokens={sl.cfg.exclude_special_tokens}"
        )

        def saelens_method(bench):
            def run_saelens(r: int) -> list[float]:
                # every round runs warmup + m steps (training_tokens is per run)
                bench.runner.cfg.training_tokens = steps_per_run[r] * tokens_per_step
                return bench.run()

            return run_saelens

        methods["saelens"] = saelens_method(sl)
        methods["forward"] = lambda r: run_forward(lm, args.hook, batches_for_round(r))
        methods["tl_fwd"] = lambda r: run_forward(lm_tl, args.hook, batches_for_round(r))
    print(f"# setup {time.perf_counter() - t_setup:.1f}s")

    names = list(methods)
    width = max(8, *(len(n) for n in names))
    times: dict[str, list[float]] = {n: [] for n in names}
    cooldown: dict[str, list[float]] = {n: [] for n in names}  # each run's untimed last step(s)
    round_med: dict[str, list[float]] = {n: [] for n in names}
    t0 = time.perf_counter()
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            tr = time.perf_counter()
            step_times = methods[name](r)
            if len(step_times) != steps_per_run[r]:
                print(f"# warning: {name} round {r}: {len(step_times)} step times for {steps_per_run[r]} steps")
            kept, last = step_times[warm[r] : warm[r] + per_round[r]], step_times[warm[r] + per_round[r] :]
            times[name].extend(kept)
            cooldown[name].extend(last)
            if kept:
                round_med[name].append(statistics.median(kept))
            print(
                f"# round {r} {name:{width}s} {time.perf_counter() - tr:6.1f}s  warmup "
                f"{' '.join(f'{t:.2f}' for t in step_times[: warm[r]])}  steps "
                f"{' '.join(f'{t:.2f}' for t in kept)}  last (not timed) {' '.join(f'{t:.2f}' for t in last)}",
                flush=True,
            )
    print(f"# measured in {time.perf_counter() - t0:.1f}s")

    if args.profile:  # before the summary, so the figures stay the last lines
        for obj in objectives:
            if obj == SWEEP:
                print("# --profile: not for the sweep (profile --objective topk / gsae for its parts)")
            elif obj not in skipped:
                profile_objective(obj, lm, tokens, args.profile, args)

    if args.count_ops:  # before the summary, so the figures stay the last lines
        print(f"# --count-ops: aten calls per steady step ({args.count_ops} steps after {max(args.warmup, 3)})")
        for obj in objectives:
            if obj in skipped:
                continue
            if obj == SWEEP:  # the sweep, and one TopK and one g-SAE member run alone (every k costs the same ops)
                alone = build_separate(lm, args)
                for kind in ("topk", "gsae"):
                    key = next(name for name in alone if name.startswith(f"{kind}-k{args.sweep_ks[0]}"))
                    count_ops(f"sep_{kind}", alone[key], tokens, args.count_ops, args)
                count_ops("sweep", build_sweep(lm, args), tokens, args.count_ops, args)
            else:
                count_ops(obj, build_system(obj, lm, args), tokens, args.count_ops, args)

    med = {n: statistics.median(v) for n, v in times.items() if v}
    tps = {n: tokens_per_step / s for n, s in med.items()}
    print(f"# {'method':{width}s} {'median s/step':>13s} {'min':>6s} {'max':>6s} {'n':>3s} {'tokens/s':>9s}")
    for n in names:
        v = times[n]
        if v:
            print(f"# {n:{width}s} {med[n]:13.3f} {min(v):6.2f} {max(v):6.2f} {len(v):3d} {tps[n]:9.1f}")

    lightning_names = [n for n in names if n in cpu]
    if any(cooldown[n] for n in lightning_names):
        print(
            "# a fit's last step (computes and logs the metrics, closes the fit; in a run 1 step in log_every_n_steps), "
            "median s: " + " ".join(f"{n}={statistics.median(cooldown[n]):.3f}" for n in lightning_names if cooldown[n])
        )

    ref = "topk" if "topk" in names else None
    if ref is not None:
        for n in names:
            pairs = [a / b for a, b in zip(round_med[n], round_med[ref])]
            if n != ref and pairs:
                print(
                    f"# {n} time/step ÷ topk's, per round: {' '.join(f'{p:.2f}' for p in pairs)}  "
                    f"(median {statistics.median(pairs):.2f})"
                )

    if SWEEP in objectives:
        report_sweep(lm, args, members, med, round_med, tokens_per_step, skipped, cpu)
    elif len(objectives) > 1 or args.objective != "topk":
        for obj in objectives:
            if obj in tps:
                print(f"objective={obj} tokens_per_s={fmt(tps[obj])}")
            else:
                print(f"objective={obj} tokens_per_s=n/a ({skipped.get(obj, 'not measured')})")
        floor = flop_floor(lm, args.hook, T, args.d_sae)
        print(
            "# MFLOP/token: "
            + " ".join(f"{k}={v / 1e6:.1f}" for k, v in floor.items())
            + "  (floors: FLOPs per token ÷ TopK's; see flop_floor)"
        )
        if "topk" in med:
            for obj in ("gsae", "e2e"):
                if obj in objectives:
                    cost = med[obj] / med["topk"] if obj in med else None
                    print(f"{obj}_cost_vs_topk={'n/a' if cost is None else f'{cost:.3f}'}")
                    print(f"{obj}_flop_floor={floor[obj] / floor['topk']:.3f}")
                    if cost is not None:
                        print(f"{obj}_cost_vs_floor={cost / (floor[obj] / floor['topk']):.3f}")
    if baselines and "topk" in tps:
        print(f"gsae_tokens_per_s={fmt(tps['topk'])}")
        print(f"saelens_tokens_per_s={fmt(tps['saelens'])}")
        print(f"forward_only_tokens_per_s={fmt(tps['forward'])}")
        print(f"transformer_lens_forward_tokens_per_s={fmt(tps['tl_fwd'])}")
        print(f"fused_forward_speedup={tps['forward'] / tps['tl_fwd']:.3f}")
        print(f"ratio_vs_saelens={tps['topk'] / tps['saelens']:.3f}")
        print(f"ratio_vs_forward={tps['topk'] / tps['forward']:.3f}")
        floor = flop_floor(lm, args.hook, T, args.d_sae)
        bound = floor["prefix"] / floor["topk"]
        print(f"# FLOPs per token: forward to the hook {floor['prefix'] / 1e6:.1f} M, + TopK SAE "
              f"{floor['sae'] / 1e6:.1f} M (ours), + dense SAE forward and backward "
              f"{(floor['saelens'] - floor['prefix']) / 1e6:.1f} M (SAELens' default TopK)")
        print(f"ratio_vs_forward_flop_bound={bound:.3f}")
        print(f"ratio_vs_forward_vs_bound={tps['topk'] / tps['forward'] / bound:.3f}")
        print(f"saelens_flop_ratio={floor['saelens'] / floor['topk']:.3f}")

    return 0


if __name__ == "__main__":
    sys.exit(main())
