"""Sensitive directions: KL and downstream L2 along perturbation directions, and SAE substitution vs ε-baselines.

Two experiments from SPEC §3 on the activations at ``hook``:

- **Length sweep** (Lee & Heimersheim 2024, arXiv 2410.12555; SPEC §3.2): for each direction type of
  :mod:`gsae.evals.directions` one unit direction ``u`` per token, reused for every length ``L``;
  ``x' = x + L·u``. Per type and length: mean ``KL(P_orig ‖ P_pert)`` (:func:`gsae.metrics.kl_div_per_token`)
  and mean L2 distance at the final residual ``blocks.{n_layers−1}.hook_resid_post``. Lengths are absolute
  norms, default the 23 "Normal" lengths of their code.
- **Substitution** (Gurnee 2024, ``scripts/error_eval.py``; SPEC §3.3): ``x → SAE(x)`` against ``x + ε·u``
  with ``ε = ‖SAE(x) − x‖`` per token and ``u`` isotropic (``g/‖g‖``), cov-random mixture or real mixture;
  the ratios ``KL_sae / KL_eps`` (Gurnee: 2.2–4.5× for GPT-2 residual SAEs with isotropic ``u``).

Modes: ``all_tokens`` (default; every position perturbed, KL averaged over every position but the last,
as ``[:, :-1]`` in their code) and ``single_token`` (Gurnee: only position ``p = min(32, T − 2)`` is perturbed;
KL is read at ``p, p+1, …`` — a per-offset curve; positions before ``p`` are reported as a check and must be 0).
Position 0 is perturbed and counted in the length sweep by default, as in Lee & Heimersheim's code (SPEC §8.3
[AMBIG]; ``skip_first=True`` leaves it out). The substitution comparison handles special tokens (BOS) like
``loss_added``: unpatched and left out of its means (``substitution_exclude_special``).

Comparable across runs: every random draw is seeded per *sequence* (``(seed, sequence, kind)``) and the feature
pools are per block of ``pool_seqs`` sequences (their batches of 64), so the numbers do not depend on
``batch_size`` (memory only) — two SAEs evaluated on the same tokens get the same isotropic/covariance/real draws.

Speed: the prefix up to the hook and the SAE run once per batch (kept from the statistics pass up to
:data:`CACHE_ELEMENTS`); every perturbed copy runs only the layers after the hook through
:func:`gsae.evals.perturb.perturbation_runs` (the loop ``plateaus`` uses too): the clean run and its
log-probabilities are computed once per group of sequences and shared by every direction type and length,
whose copies are stacked into forwards of about ``forward_tokens`` tokens. Length 0 gives KL 0. Sequences
are cut after the last position read (causality), which in ``single_token`` mode is ``p + n_offsets − 1``.
``benchmarks/eval_speed.py`` times this against a naive loop of full forwards with a patch hook. The direction types
drawn from the activations alone (:data:`gsae.evals.directions.ACTIVATION_TYPES`) run in their own
:func:`perturbation_runs` call, apart from the SAE's kinds, so that a sweep's members of equal activations share it
(:func:`run_many`: the same passes, once).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from gsae.evals.common import special_token_mask
from gsae.evals.directions import (
    ACTIVATION_TYPES,
    DIRECTION_TYPES,
    EPS_BASELINES,
    FEATURE_POOLS,
    batch_acts,
    batch_deltas,
    fit_activation_stats,
)
from gsae.evals.perturb import final_hook, perturbation_runs
from gsae.lm import LanguageModel
from gsae.sae.base import SparseAutoencoder

__all__ = ["run", "run_many", "parts", "merge", "figures", "window", "final_hook", "DEFAULT_LENGTHS"]

#: Lee & Heimersheim's "Normal" lengths: [1,3,…,19] + [20,24,…,48] + [51,61,…,91] (23 values).
DEFAULT_LENGTHS = (*range(1, 20, 2), *range(20, 49, 4), *range(51, 92, 10))
#: The activations and reconstructions of the evaluation set are kept between the two passes up to this
#: many elements (512 MiB in float32); above it the prefix and the SAE run again in the second pass.
CACHE_ELEMENTS = 2**27
#: Gurnee's single-token position (of 128-token contexts); shorter contexts use ``T − 2``.
GURNEE_POSITION = 32


class Window(NamedTuple):
    """Which positions are perturbed and read, and how much of each sequence runs.

    Attributes:
        t_run: sequence length fed to the model (cut after the last position read).
        perturb: bool ``(t_run,)``, positions whose activation is perturbed.
        read: long ``(n_read,)``, positions whose KL / L2 are reported.
        position: ``p`` in ``single_token`` mode, else ``None``.
    """

    t_run: int
    perturb: Tensor
    read: Tensor
    position: int | None


def window(mode: str, T: int, position: int | None, n_offsets: int, skip_first: bool) -> Window:
    """The :class:`Window` of a mode for sequences of length ``T`` (the last position is never read)."""
    if mode == "all_tokens":
        start = 1 if skip_first else 0
        if T - 1 <= start:
            raise ValueError(f"sensitive_directions: sequences of length {T} leave no position to read")
        perturb = torch.ones(T - 1, dtype=torch.bool)  # the last position is never read: not run
        perturb[:start] = False
        return Window(T - 1, perturb, torch.arange(start, T - 1), None)
    if mode != "single_token":
        raise ValueError(f"sensitive_directions: mode must be all_tokens or single_token (got {mode!r})")
    p, lo = min(GURNEE_POSITION, T - 2) if position is None else position, 1 if skip_first else 0
    if not lo <= p <= T - 2:
        raise ValueError(
            f"sensitive_directions: position must be in [{lo}, {T - 2}] for sequences of length {T} (got {p})"
        )
    if n_offsets < 1:
        raise ValueError(f"sensitive_directions: n_offsets must be >= 1 (got {n_offsets})")
    n = min(n_offsets, T - 1 - p)
    perturb = torch.zeros(p + n, dtype=torch.bool)
    perturb[p] = True
    return Window(p + n, perturb, torch.arange(p, p + n), p)


#: result numbers that restate the evaluation"s settings: in the JSON, not TensorBoard curves (``tagged_scalars``)
SETTINGS = ("n_sequences", "seq_len", "n_tokens", "pool_seqs", "stats_sequences")
#: the options' valid values, checked with the option names and types before any work (``check_options``:
#: a bad value used to raise after the evaluation, or run and give NaN or the wrong latents)
OPTION_BOUNDS: dict[str, str | tuple[str, ...]] = {
    "lengths": ("non-empty", "each > 0"), "n_offsets": "> 0", "batch_size": "> 0", "pool_seqs": "> 0",
    "forward_tokens": "> 0", "max_real_pool": "> 0", "position": ">= 0", "sweep_seqs": "> 0",
}


@torch.no_grad()
def run(
    sae: SparseAutoencoder,
    lm: LanguageModel,
    hook: str,
    tokens: Tensor,
    *,
    seed: int = 0,
    lengths: list[float] | None = None,
    direction_types: list[str] | None = None,
    mode: Literal["all_tokens", "single_token"] = "all_tokens",
    position: int | None = None,
    n_offsets: int = 17,
    substitution: bool = True,
    substitution_exclude_special: bool = True,
    skip_first: bool = False,
    batch_size: int = 64,
    pool_seqs: int = 64,
    forward_tokens: int = 1024,
    max_real_pool: int = 65536,
    sweep_seqs: int | None = None,
) -> dict:
    """Length sweep per direction type and SAE-substitution comparison on ``tokens (n_seq, T)``.

    Args:
        sae: the SAE (its reconstruction error and decoder rows are direction types; g-SAEs get ``∇ₓL``).
        lm: the language model.
        hook: hook the SAE reads and the perturbations are added at.
        tokens: ``(n_seq, T)`` evaluation contexts; μ, Σ and the real pool come from all of them, the length sweep
            and the substitution from the first ``sweep_seqs``.
        seed: seed of every random direction (same seed and tokens → same directions, for any SAE and batch size).
        lengths: absolute perturbation norms ``L`` (default :data:`DEFAULT_LENGTHS`, 1…91).
        direction_types: subset of :data:`gsae.evals.directions.DIRECTION_TYPES` (default all).
        mode: ``all_tokens`` (Lee & Heimersheim) or ``single_token`` (Gurnee: one position ``p``).
        position: ``p`` in ``single_token`` mode (default ``min(32, T − 2)``: Gurnee's 32 of 128).
        n_offsets: positions read from ``p`` on in ``single_token`` mode (Gurnee: 17, positions 32…48).
        substitution: also compare ``x → SAE(x)`` with the ε-baselines.
        substitution_exclude_special: in the substitution, leave special-token positions (BOS) unpatched and
            out of the means, as ``loss_added`` does (default True).
        skip_first: leave position 0 (BOS) unperturbed and out of the length sweep's means (default False, as
            their code).
        batch_size: sequences per batch (memory only: the results do not depend on it).
        pool_seqs: sequences per feature-pool block (``sae_feature_alive``/``active`` are per block; theirs: 64).
        forward_tokens: about how many tokens one forward pass holds (memory: ``forward_tokens × d_vocab`` logits).
        max_real_pool: at most this many real activations (seeded subset) for the ``real_*`` kinds.
        sweep_seqs: sequences perturbed (the first of ``tokens``; default all). μ and Σ of GPT-2's 768 dimensions
            need many more tokens than the sweep can afford to perturb (Lee & Heimersheim fit them on 2M): with
            ``n_seqs: 128, sweep_seqs: 8`` (the shipped GPT-2 configs) they come from ~16k tokens, by a forward to
            the hook only, instead of ~1k (a Σ from fewer tokens than dimensions is singular, so its ``cov_random``
            directions lie in a subspace). The latents alive (the feature pools: ``sae_feature_alive`` draws the
            latents alive but silent in a pool block, ``sae_feature_dead`` the others) are those that fired on any
            of ``tokens``, as Lee & Heimersheim's "alive on the dataset": with the swept sequences in one pool block,
            the alive-but-silent pool would otherwise be empty.
    """
    return run_many(
        {"": sae}, lm, hook, tokens, seed=seed, lengths=lengths, direction_types=direction_types, mode=mode,
        position=position, n_offsets=n_offsets, substitution=substitution,
        substitution_exclude_special=substitution_exclude_special, skip_first=skip_first, batch_size=batch_size,
        pool_seqs=pool_seqs, forward_tokens=forward_tokens, max_real_pool=max_real_pool, sweep_seqs=sweep_seqs,
    )[""]


@torch.no_grad()
def run_many(
    saes: Mapping[str, SparseAutoencoder],
    lm: LanguageModel,
    hook: str,
    tokens: Tensor,
    *,
    seed: int = 0,
    lengths: list[float] | None = None,
    direction_types: list[str] | None = None,
    mode: Literal["all_tokens", "single_token"] = "all_tokens",
    position: int | None = None,
    n_offsets: int = 17,
    substitution: bool = True,
    substitution_exclude_special: bool = True,
    skip_first: bool = False,
    batch_size: int = 64,
    pool_seqs: int = 64,
    forward_tokens: int = 1024,
    max_real_pool: int = 65536,
    sweep_seqs: int | None = None,
) -> dict[str, dict]:
    """:func:`run` for several SAEs at one hook (a sweep's members), ``{name: result}``, each equal to :func:`run` of
    that SAE alone. The direction types drawn from the activations alone (:data:`ACTIVATION_TYPES`: isotropic,
    covariance and real-activation directions: 115 of the 211 perturbed runs per token at the 23 default lengths) do not
    depend on the SAE: SAEs whose activations are equal (all of them at one hook, TopK and g-SAE alike) share their
    statistics and their length sweep, run once; each SAE adds its own (``sae_error``, the feature pools and the
    substitution). :func:`run` is this for one SAE, so both take the same passes."""
    lengths = [float(v) for v in (DEFAULT_LENGTHS if lengths is None else lengths)]
    kinds = list(DIRECTION_TYPES if direction_types is None else direction_types)
    unknown = [k for k in kinds if k not in DIRECTION_TYPES]
    if unknown:
        raise ValueError(
            f"sensitive_directions: unknown direction_types {unknown}; choose from {', '.join(DIRECTION_TYPES)}"
        )
    if not lengths:
        raise ValueError("sensitive_directions: lengths must not be empty")
    if pool_seqs <= 0 or batch_size <= 0:
        raise ValueError(f"sensitive_directions: pool_seqs and batch_size must be > 0 (got {pool_seqs}, {batch_size})")
    if sweep_seqs is not None and sweep_seqs <= 0:
        raise ValueError(f"sensitive_directions: sweep_seqs must be > 0 (got {sweep_seqs})")
    n_stats, T = tokens.shape
    n_seq = n_stats if sweep_seqs is None else min(int(sweep_seqs), n_stats)
    swept, extra = tokens[:n_seq], tokens[n_seq:]
    win = window(mode, T, position, n_offsets, skip_first)
    # pass 1: μ, Σ, real pool, latents alive on the swept sequences and per pool block; kept for pass 2 when small enough
    d_in = next(iter(saes.values())).d_in
    kept = 2 * swept.numel() * d_in  # elements one SAE's pass 1 keeps: its activations and its SAE's output
    one = kept <= CACHE_ELEMENTS  # what run() of one SAE keeps (its pass 1 runs the SAE then)
    cached = kept * len(saes) <= CACHE_ELEMENTS  # every SAE's, for the grouping
    features = any(k in FEATURE_POOLS for k in kinds)
    acts = {m: batch_acts(sae, lm, hook, swept, batch_size, with_sae=one or features) for m, sae in saes.items()}
    if cached:
        acts = {m: list(a) for m, a in acts.items()}
    groups = _equal_activations(acts) if cached else [[m] for m in saes]
    head = {"hook": hook, "mode": mode, "position": win.position, "lengths": lengths, "n_sequences": n_seq,
            "seq_len": T, "n_tokens": n_seq * win.read.numel(), "pool_seqs": pool_seqs, "stats_sequences": n_stats}
    opts = dict(seed=seed, lengths=lengths, kinds=kinds, win=win, substitution=substitution,
                exclude=substitution_exclude_special, pool_seqs=pool_seqs, forward_tokens=forward_tokens, head=head)
    out = {}
    for group in groups:
        blocks: dict[str, dict[int, Tensor]] = {m: {} for m in group}
        first, *others = group
        # the statistics of every context: the swept ones (their activations, at hand) then the rest, to the hook only,
        # in batches on the grid of batch_size (other benchmarks' batches: shared harvests, where they are kept)
        cut = min(-(-n_seq // batch_size) * batch_size - n_seq, extra.shape[0])
        parts = [t for t in (extra[:cut], extra[cut:]) if t.shape[0]]
        # with feature directions, the SAE runs on these too: a latent is alive if it fired on any context (their
        # "alive on the dataset"), so that alive-but-inactive-in-its-block latents exist when the swept contexts
        # fit in one pool block (the shipped configs: sae_feature_alive had an empty pool)
        alive_rest: dict[str, list[Tensor]] = {m: [] for m in group}
        rest = [_fired_into(batch_acts(saes[first], lm, hook, t, batch_size, with_sae=features), alive_rest[first])
                for t in parts]
        stats = fit_activation_stats(
            itertools.chain(_pool_blocks(acts[first], pool_seqs, blocks[first]), *rest), max_real_pool=max_real_pool,
            seed=seed,
        )
        for m in others:  # equal activations: the same statistics; only the fired latents are each SAE's
            for _ in _pool_blocks(acts[m], pool_seqs, blocks[m]):
                pass
            if features:
                for t in parts:
                    for _ in _fired_into(batch_acts(saes[m], lm, hook, t, batch_size), alive_rest[m]):
                        pass
        # a latent is alive iff it fired in some pool block of the swept contexts or on the other contexts
        fired = {m: torch.stack([*b.values(), *alive_rest[m]]).any(0) if b else None for m, b in blocks.items()}
        members = {m: (saes[m], stats._replace(fired=fired[m]), blocks[m]) for m in group}
        again = {m: (acts[m] if cached else batch_acts(saes[m], lm, hook, swept, batch_size)) for m in group}
        out.update(_sweep_group(lm, hook, members, again, **opts))
    return {m: out[m] for m in saes}


def _pool_blocks(acts, pool_seqs: int, blocks: dict[int, Tensor]):
    """``acts``' batches with ``fired`` dropped (the statistics are the activations'), after OR-ing each sequence's
    fired latents into ``blocks`` ``{pool block: (d_sae,)}``."""
    s0 = 0
    for b in acts:
        if b.fired is not None:
            for i in range(b.x.shape[0]):
                blk = (s0 + i) // pool_seqs
                blocks[blk] = blocks[blk] | b.fired[i] if blk in blocks else b.fired[i]
        s0 += b.x.shape[0]
        yield b._replace(fired=None)


def _fired_into(acts, fired: list[Tensor]):
    """``acts``' batches with ``fired`` dropped, after appending each batch's latents fired (``(d_sae,)``, if the SAE
    ran) to ``fired``."""
    for b in acts:
        if b.fired is not None:
            fired.append(b.fired.any(0))
        yield b._replace(fired=None)


def _equal_activations(acts: dict[str, list]) -> list[list[str]]:
    """The SAEs in groups whose activations are equal in every batch (the same tensor, or equal values)."""
    groups: list[list[str]] = []
    for m, batches_m in acts.items():
        for g in groups:
            ref = acts[g[0]]
            if all(a.x is b.x or torch.equal(a.x, b.x) for a, b in zip(ref, batches_m)):
                g.append(m)
                break
        else:
            groups.append([m])
    return groups


def _sweep_group(lm, hook, members, acts, *, seed, lengths, kinds, win, substitution, exclude, pool_seqs,
                 forward_tokens, head) -> dict[str, dict]:
    """Pass 2 for SAEs of equal activations: ``members`` ``{name: (sae, stats, block_fired)}``, ``acts`` ``{name:
    its batches}``. Per batch, the :data:`ACTIVATION_TYPES` sweep runs once (from the first SAE's batch, of equal
    activations) and each SAE's own kinds once per SAE; ``{name: head + result}``."""
    shared_kinds = [k for k in kinds if k in ACTIVATION_TYPES]
    own_kinds = [k for k in kinds if k not in ACTIVATION_TYPES]
    first = next(iter(members))
    stats0 = members[first][1]
    read_all = torch.arange(win.t_run) if win.position is not None else win.read  # single_token: earlier ones too
    shared: dict[str, list] = {}  # name -> [Σ w·kl (n_scales, R), Σ w·l2, Σ w (R,)] of the shared kinds
    own: dict[str, dict[str, list]] = {m: {} for m in members}
    empty: dict[str, dict[str, int]] = {m: {} for m in members}
    eps = {m: torch.zeros(3, dtype=torch.float64) for m in members}  # Σε, n, n(ε = 0) over the substitution's tokens
    s0 = 0
    for bs in zip(*(acts[m] for m in members)):
        batch = dict(zip(members, bs))
        b0 = batch[first]
        keep = special_token_mask(lm, b0.tokens, exclude)[:, : win.t_run]
        common = dict(seed=seed, first_seq=s0, pool_seqs=pool_seqs, keep=keep)
        if shared_kinds:
            deltas, _ = batch_deltas(shared_kinds, b0, stats0, members[first][0].W_dec, win.perturb,
                                     substitution=False, **common)
            weights = {k: torch.ones(b0.x.shape[0], read_all.numel(), dtype=torch.float64) for k in deltas}
            _sweep_into(shared, lm, hook, b0, win, read_all, deltas, {k: lengths for k in deltas}, weights,
                        forward_tokens)
        for m, (sae, stats, block_fired) in members.items():
            if not own_kinds and not substitution:
                continue
            b = batch[m]
            deltas, has_pool = batch_deltas(own_kinds, b, stats, sae.W_dec, win.perturb, block_fired=block_fired,
                                             substitution=substitution, **common)
            weights = {k: torch.ones(b.x.shape[0], read_all.numel(), dtype=torch.float64) for k in deltas}
            for k, ok in has_pool.items():
                weights[k] *= ok.double()[:, None]
                empty[m][k] = empty[m].get(k, 0) + int((~ok).sum())
            if substitution:
                w_sub = keep[:, read_all.to(keep.device)].double().cpu()
                for k in ("sae", *EPS_BASELINES):
                    weights[k] = w_sub
                err = deltas["sae"].norm(dim=-1)[(keep & win.perturb.to(keep.device)[None])].double().cpu()
                eps[m] += torch.stack([err.sum(), torch.tensor(err.numel()), (err == 0).sum()]).double()
            scales = {k: (lengths if k in kinds else [1.0]) for k in deltas}
            _sweep_into(own[m], lm, hook, b, win, read_all, deltas, scales, weights, forward_tokens)
        s0 += b0.x.shape[0]
    n_seq = head["n_sequences"]
    out = {}
    for m, (_, stats, _) in members.items():
        sums = {**shared, **own[m]}
        curves = {k: _curve(sums[k], win, read_all) for k in kinds if k in sums and float(sums[k][2].sum()) > 0}
        result = {
            **head,
            "direction_types": list(curves),
            "skipped": {k: f"empty feature pool for {n} of {n_seq} sequences" for k, n in empty[m].items() if n},
            "curves": curves,
            "stats": {
                "n_rows": stats.n_rows,
                "median_norm": stats.median_norm,
                "norm_of_mean": float(stats.mean.norm()),  # ‖μ‖, the mean activation's norm (not a mean of norms)
                "cov_trace": float(stats.cov.trace()),
                "real_pool_size": int(stats.real.shape[0]),
                "n_alive_latents": None if stats.fired is None else int(stats.fired.sum()),
            },
            **{f"kl_mean_over_lengths_{k}": sum(c["kl"]) / len(lengths) for k, c in curves.items()},
        }
        if substitution:
            e = eps[m]
            result.update(_substitution(sums, win, read_all, float(e[0] / e[1].clamp_min(1)), int(e[2])))
        out[m] = result
    return out


def _sweep_into(sums, lm, hook, b, win, read_all, deltas, scales, weights, forward_tokens) -> None:
    """Run every ``(name, scale)`` of one batch through :func:`perturbation_runs`; add the weighted sums."""
    names = list(deltas)
    job_delta = torch.tensor([i for i, k in enumerate(names) for _ in scales[k]], device=b.x.device)
    job_scale = torch.tensor([s for k in names for s in scales[k]], device=b.x.device, dtype=b.x.dtype)
    stacked = torch.stack([deltas[k] for k in names])  # (K, B, t_run, D)
    x = b.x[:, : win.t_run]

    def make(jobs: Tensor, s0: int, s1: int) -> Tensor:
        return x[None, s0:s1] + job_scale[jobs, None, None, None] * stacked[job_delta[jobs], s0:s1]

    tok = b.tokens[:, : win.t_run] if lm.resume_layer(hook) is None else None
    res = perturbation_runs(
        lm, hook, x, len(job_delta), make, read_all, tokens=tok, forward_tokens=forward_tokens
    )
    kl, l2 = res.kl.cpu(), res.l2.cpu()  # (J, B, R)
    j0 = 0
    for k in names:
        n, w = len(scales[k]), weights[k]  # w: (B, R)
        acc = sums.setdefault(k, [0.0, 0.0, 0.0])
        acc[0] = acc[0] + (kl[j0 : j0 + n] * w).sum(1)
        acc[1] = acc[1] + (l2[j0 : j0 + n] * w).sum(1)
        acc[2] = acc[2] + w.sum(0)
        j0 += n


def _curve(acc: list, win: Window, read_all: Tensor) -> dict:
    """Weighted means of one name's sums: per length in ``all_tokens`` mode; at ``p`` and per offset in
    ``single_token`` (``n_tokens``: tokens per mean; fewer than the run's for a feature kind whose pool was
    empty for some sequences, or for the substitution when special tokens are left out)."""
    kl, l2, w = acc
    if win.position is None:
        n = float(w.sum())
        return {
            "kl": (kl.sum(-1) / max(n, 1)).tolist(),
            "l2": (l2.sum(-1) / max(n, 1)).tolist(),
            "n_tokens": int(n),
        }
    p = win.position
    rd = win.read  # positions p, p+1, … (indices into read_all = 0..t_run−1)
    wr = w[rd].clamp_min(1)
    return {
        "kl": (kl[:, p] / wr[0]).tolist(),
        "l2": (l2[:, p] / wr[0]).tolist(),
        "kl_by_offset": (kl[:, rd] / wr).tolist(),
        "l2_by_offset": (l2[:, rd] / wr).tolist(),
        "kl_before_position": (kl[:, :p].sum(-1) / max(float(w[:p].sum()), 1)).tolist(),
        "n_tokens": int(w[p]),
    }


def _substitution(sums: dict, win: Window, read_all: Tensor, eps_mean: float, zero_err: int) -> dict:
    """SAE substitution vs ε-baselines: mean KL / L2 per kind and ``KL_sae / KL_eps`` (``None`` when 0/0)."""
    curves = {k: _curve(sums[k], win, read_all) for k in ("sae", *EPS_BASELINES)}
    kl = {k: c["kl"][0] for k, c in curves.items()}
    out = {
        "substitution": {
            "kl": kl,
            "l2": {k: c["l2"][0] for k, c in curves.items()},
            "ratio": {k: (kl["sae"] / kl[k] if kl[k] > 0 else None) for k in EPS_BASELINES},
            "epsilon_mean": eps_mean,
            "n_exact_tokens": zero_err,
            "n_tokens": curves["sae"]["n_tokens"],
        },
        "epsilon_mean": eps_mean,
    }
    if win.position is not None:
        out["substitution"]["kl_by_offset"] = {k: c["kl_by_offset"][0] for k, c in curves.items()}
    for k, v in kl.items():
        out[f"kl_{k}"] = v
    for k, v in out["substitution"]["ratio"].items():
        if v is not None:
            out[f"ratio_sae_over_{k}"] = v
    return out


def parts(options: Mapping) -> list[dict]:
    """Option overrides that cut one run (of :func:`run` or :func:`run_many`, given ``options``) into two independent
    runs whose results :func:`merge` joins: the direction types drawn from the activations alone, and the SAE's own
    kinds with the substitution; about half the perturbed runs each at the default lengths. Every draw is seeded per
    (sequence, kind), so the joined result is one run's to float32 round-off (the perturbed copies are stacked into
    forwards differently). ``[]`` when there is nothing to cut. The evaluation callback runs the parts on two ranks
    when this benchmark is more than a rank's share of the work (:func:`gsae.evals.evaluation_tasks`)."""
    kinds = list(options.get("direction_types") or DIRECTION_TYPES)
    drawn = [k for k in kinds if k in ACTIVATION_TYPES]
    own = [k for k in kinds if k not in ACTIVATION_TYPES]
    substitution = bool(options.get("substitution", True))
    if not drawn or not (own or substitution):
        return []
    return [{"direction_types": drawn, "substitution": False}, {"direction_types": own, "substitution": substitution}]


def merge(results: list[dict]) -> dict:
    """One result from those of :func:`parts`' runs (in their order): the curves of both, in
    :data:`DIRECTION_TYPES` order, the SAE part's statistics (it ran the SAE: the alive latents), skips and
    substitution."""
    drawn, own = results
    curves = {**drawn["curves"], **own["curves"]}
    order = [k for k in DIRECTION_TYPES if k in curves]
    out: dict = {}
    for key, value in own.items():
        if key.startswith("kl_mean_over_lengths_"):
            continue
        out[key] = value
        if key == "stats":  # where a single run puts them
            for k in order:
                out[f"kl_mean_over_lengths_{k}"] = (drawn if k in drawn["curves"] else own)[f"kl_mean_over_lengths_{k}"]
    out.update(direction_types=order, curves={k: curves[k] for k in order},
               skipped={**drawn["skipped"], **own["skipped"]})
    return out


def figures(result: dict) -> dict:
    """KL and L2 vs length per direction type (Lee & Heimersheim Fig. 1 style, log-y KL); the substitution
    KLs as bars; in ``single_token`` mode the substitution KL per offset from ``p`` (Gurnee)."""
    from matplotlib.figure import Figure

    figs = {}
    for metric, ylabel in (("kl", "mean KL(P_orig ‖ P_pert)"), ("l2", "mean L2 at final residual")):
        fig = Figure(figsize=(5.5, 3.8))
        ax = fig.add_subplot()
        for kind, c in result["curves"].items():
            ax.plot(result["lengths"], c[metric], marker=".", label=kind)
        if metric == "kl":
            ax.set_yscale("log", nonpositive="mask")
        where = "all tokens" if result["position"] is None else f"position {result['position']}"
        ax.set(xlabel="perturbation length L", ylabel=ylabel, title=f"{result['hook']} ({where})")
        ax.legend(fontsize=6)
        fig.tight_layout()
        figs[f"{metric}_vs_length"] = fig
    sub = result.get("substitution")
    if sub is not None:
        fig = Figure(figsize=(4.5, 3.5))
        ax = fig.add_subplot()
        ax.bar(list(sub["kl"]), list(sub["kl"].values()))
        ax.set(ylabel="mean KL", title=f"SAE(x) vs x + ε·u (mean ε {sub['epsilon_mean']:.3g})")
        ax.tick_params(axis="x", labelsize=7, rotation=20)
        fig.tight_layout()
        figs["substitution_kl"] = fig
        if "kl_by_offset" in sub:
            fig = Figure(figsize=(5, 3.5))
            ax = fig.add_subplot()
            for k, v in sub["kl_by_offset"].items():
                ax.plot(range(len(v)), v, marker=".", label=k)
            ax.set(
                xlabel=f"offset from position {result['position']}", ylabel="mean KL", title="single-token substitution"
            )
            ax.legend(fontsize=7)
            fig.tight_layout()
            figs["substitution_kl_vs_offset"] = fig
    return figs
