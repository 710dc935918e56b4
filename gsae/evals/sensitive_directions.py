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
as ``[:, :-1]`` in their code) and ``single_token`` (Gurnee: only position ``p`` is perturbed; KL is read at
``p, p+1, …`` — a per-offset curve; positions before ``p`` are reported as a check and must be 0).
Position 0 is perturbed and counted by default, as in Lee & Heimersheim's code (SPEC §8.3 [AMBIG];
``skip_first=True`` leaves it out).

Speed: the prefix up to the hook and the SAE run once per batch (kept from the statistics pass up to
:data:`CACHE_ELEMENTS`); every perturbed copy runs only the layers after the hook
(``LanguageModel.run_from_hook``), with the copies for all lengths and types stacked along the batch dim
and cut into forwards of about ``forward_tokens`` tokens. The clean reference is computed by the same
``run_from_hook`` from ``x``, so length 0 gives KL 0. Sequences are cut after the last position read
(causality: later positions cannot change it), which in ``single_token`` mode is ``p + n_offsets − 1``.
``benchmarks/eval_speed.py`` times this against a naive loop of full forwards with a patch hook.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from gsae.evals.directions import (
    DIRECTION_TYPES,
    EPS_BASELINES,
    FEATURE_POOLS,
    batch_acts,
    batch_deltas,
    fit_activation_stats,
)
from gsae.lm import LanguageModel
from gsae.metrics import kl_div_per_token
from gsae.sae.base import SparseAutoencoder

#: Lee & Heimersheim's "Normal" lengths: [1,3,…,19] + [20,24,…,48] + [51,61,…,91] (23 values).
DEFAULT_LENGTHS = (*range(1, 20, 2), *range(20, 49, 4), *range(51, 92, 10))
#: The activations and reconstructions of the evaluation set are kept between the two passes up to this
#: many elements (512 MiB in float32); above it the prefix and the SAE run again in the second pass.
CACHE_ELEMENTS = 2**27


class SweepSums(NamedTuple):
    """Per-position sums over sequences of one :func:`perturbation_sweep`.

    Attributes:
        kl: ``(J, T)`` float64, ``Σ_b KL(P_orig ‖ P_pert)`` per job and position.
        l2: ``(J, T)`` float64, ``Σ_b ‖h_pert − h_orig‖`` at the final residual per job and position.
        n_seq: number of sequences summed over.
    """

    kl: Tensor
    l2: Tensor
    n_seq: int


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


def final_hook(lm: LanguageModel) -> str:
    """The final residual, where the L2 distance is read (``blocks.11.hook_resid_post`` for GPT-2 small)."""
    return f"blocks.{lm.n_layers - 1}.hook_resid_post"


@torch.no_grad()
def perturbation_sweep(
    lm: LanguageModel,
    hook: str,
    x: Tensor,
    deltas: Tensor,
    job_delta: Tensor,
    job_scale: Tensor,
    *,
    tokens: Tensor | None = None,
    forward_tokens: int = 2048,
) -> SweepSums:
    """KL and final-residual L2 of ``x + job_scale[j]·deltas[job_delta[j]]`` for every job ``j``.

    The clean run and the ``J·B`` perturbed sequences run only the layers after ``hook``, in forwards of
    ``max(1, forward_tokens // T)`` sequences; the clean logits are computed once per group of sequences.

    Args:
        lm: the language model.
        hook: hook ``x`` was read at.
        x: ``(B, T, D)`` clean activations.
        deltas: ``(K, B, T, D)`` perturbations (zero where a position is left alone).
        job_delta: ``(J,)`` long, which delta each job adds; ``job_scale``: ``(J,)`` its factor (the length).
        tokens: ``(B, T)`` tokens, needed only for hooks inside a block (full forward with a patch hook).
        forward_tokens: about how many tokens one forward pass holds (bounds memory: logits are ``tokens × d_vocab``).
    """
    B, T, _ = x.shape
    J = job_delta.shape[0]
    fin = final_hook(lm)
    kl = torch.zeros(J, T, dtype=torch.float64, device=x.device)
    l2 = torch.zeros_like(kl)
    per_fwd = max(1, forward_tokens // T)
    job_delta, job_scale = job_delta.to(x.device), job_scale.to(x)
    for s0 in range(0, B, per_fwd):
        xs = x[s0 : s0 + per_fwd]  # (b, T, D)
        b = xs.shape[0]
        tok = None if tokens is None else tokens[s0 : s0 + b]
        clean = lm.run_from_hook(xs, hook, tokens=tok, cache_hooks=[fin])
        h_clean = clean.cache.get(fin, xs)  # the hook may itself be the final residual
        for c0 in range(0, J * b, per_fwd):
            f = torch.arange(c0, min(c0 + per_fwd, J * b), device=x.device)
            j, i = f // b, f % b  # job, sequence within the group
            xp = xs[i] + job_scale[j, None, None] * deltas[job_delta[j], s0 + i]  # (c, T, D)
            run = lm.run_from_hook(xp, hook, tokens=None if tok is None else tok[i], cache_hooks=[fin])
            kl.index_add_(0, j, kl_div_per_token(clean.logits[i], run.logits).double())
            l2.index_add_(0, j, (run.cache.get(fin, xp) - h_clean[i]).float().norm(dim=-1).double())
            del run, xp
    return SweepSums(kl, l2, B)


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
    p, lo = T // 2 if position is None else position, 1 if skip_first else 0
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
    skip_first: bool = False,
    batch_size: int = 64,
    forward_tokens: int = 2048,
    max_real_pool: int = 65536,
) -> dict:
    """Length sweep per direction type and SAE-substitution comparison on ``tokens (n_seq, T)``.

    Args:
        sae: the SAE (its reconstruction error and decoder rows are direction types; g-SAEs get ``∇ₓL``).
        lm: the language model.
        hook: hook the SAE reads and the perturbations are added at.
        tokens: ``(n_seq, T)`` evaluation contexts; μ, Σ and the real pool come from them too.
        seed: seed of every random direction (same seed, SAE and tokens → same numbers).
        lengths: absolute perturbation norms ``L`` (default :data:`DEFAULT_LENGTHS`, 1…91).
        direction_types: subset of :data:`gsae.evals.directions.DIRECTION_TYPES` (default all).
        mode: ``all_tokens`` (Lee & Heimersheim) or ``single_token`` (Gurnee: one position ``p``).
        position: ``p`` in ``single_token`` mode (default the middle, ``T // 2``; Gurnee used 32 of 128).
        n_offsets: positions read from ``p`` on in ``single_token`` mode (Gurnee: 17, positions 32…48).
        substitution: also compare ``x → SAE(x)`` with the ε-baselines.
        skip_first: leave position 0 (BOS) unperturbed and out of the means (default False, as their code).
        batch_size: sequences per batch; the ``sae_feature_alive``/``active`` pools are per batch (theirs: 64).
        forward_tokens: about how many tokens one forward pass holds (memory: ``forward_tokens × d_vocab`` logits).
        max_real_pool: at most this many real activations (seeded subset) for the ``real_*`` kinds.
    """
    lengths = [float(v) for v in (DEFAULT_LENGTHS if lengths is None else lengths)]
    kinds = list(DIRECTION_TYPES if direction_types is None else direction_types)
    unknown = [k for k in kinds if k not in DIRECTION_TYPES]
    if unknown:
        raise ValueError(
            f"sensitive_directions: unknown direction_types {unknown}; choose from {', '.join(DIRECTION_TYPES)}"
        )
    if not lengths:
        raise ValueError("sensitive_directions: lengths must not be empty")
    n_seq, T = tokens.shape
    win = window(mode, T, position, n_offsets, skip_first)
    # pass 1: μ, Σ, real pool, latents alive on the eval set; kept for pass 2 when small enough
    cached = 2 * tokens.numel() * sae.d_in <= CACHE_ELEMENTS
    acts = batch_acts(sae, lm, hook, tokens, batch_size, with_sae=cached or any(k in FEATURE_POOLS for k in kinds))
    acts = list(acts) if cached else acts
    stats = fit_activation_stats(acts, max_real_pool=max_real_pool, seed=seed)
    sums: dict[str, list] = {}  # name -> [Σkl (n_scales, t_run), Σl2, n_seq]
    empty, n_batches, eps = Counter(), 0, torch.zeros(3, dtype=torch.float64)  # eps: Σε, n, n(ε = 0)
    for bi, b in enumerate(acts if cached else batch_acts(sae, lm, hook, tokens, batch_size)):
        deltas, skipped = batch_deltas(
            kinds, b, stats, sae.W_dec, win.perturb, seed=seed, batch_index=bi, substitution=substitution
        )
        empty.update(skipped)
        n_batches += 1
        scales = {k: (lengths if k in kinds else [1.0]) for k in deltas}
        _sweep_into(sums, lm, hook, b.x[:, : win.t_run], b.tokens[:, : win.t_run], deltas, scales, forward_tokens)
        if substitution:
            err = deltas["sae"].norm(dim=-1)[:, win.perturb.to(b.x.device)].double().cpu()  # (B, n_perturbed)
            eps += torch.stack([err.sum(), torch.tensor(err.numel()), (err == 0).sum()]).double()
    curves = {k: _curve(sums[k], win) for k in kinds if k in sums}
    result = {
        "hook": hook,
        "mode": mode,
        "position": win.position,
        "lengths": lengths,
        "n_sequences": n_seq,
        "seq_len": T,
        "n_tokens": n_seq * win.read.numel(),
        "direction_types": list(curves),
        "skipped": {k: f"empty feature pool in {empty[k]} of {n_batches} batches" for k in kinds if empty[k]},
        "curves": curves,
        "stats": {
            "n_rows": stats.n_rows,
            "median_norm": stats.median_norm,
            "mean_norm": float(stats.mean.norm()),
            "cov_trace": float(stats.cov.trace()),
            "real_pool_size": int(stats.real.shape[0]),
            "n_alive_latents": None if stats.fired is None else int(stats.fired.sum()),
        },
        **{f"kl_mean_over_lengths_{k}": sum(c["kl"]) / len(lengths) for k, c in curves.items()},
    }
    if substitution:
        result.update(_substitution(sums, win, float(eps[0] / eps[1].clamp_min(1)), int(eps[2])))
    return result


def _sweep_into(
    sums: dict, lm: LanguageModel, hook: str, x: Tensor, tokens: Tensor, deltas: dict, scales: dict, forward_tokens: int
) -> None:
    """Run every ``(name, scale)`` of one batch in one :func:`perturbation_sweep`; add the sums to ``sums``."""
    names = list(deltas)
    job_delta = torch.tensor([i for i, k in enumerate(names) for _ in scales[k]])
    job_scale = torch.tensor([s for k in names for s in scales[k]])
    res = perturbation_sweep(
        lm,
        hook,
        x,
        torch.stack([deltas[k] for k in names]),
        job_delta,
        job_scale,
        tokens=tokens if lm.resume_layer(hook) is None else None,
        forward_tokens=forward_tokens,
    )
    j0 = 0
    for k in names:
        n = len(scales[k])
        acc = sums.setdefault(k, [0.0, 0.0, 0])
        acc[0], acc[1], acc[2] = acc[0] + res.kl[j0 : j0 + n], acc[1] + res.l2[j0 : j0 + n], acc[2] + res.n_seq
        j0 += n


def _curve(acc: list, win: Window) -> dict:
    """Means of one name's sums: per length in ``all_tokens`` mode; at ``p`` and per offset in ``single_token``
    (``n_tokens``: tokens per mean; fewer than the run's for a feature kind whose pool was empty in some batch)."""
    kl, l2, n = acc
    if win.position is None:
        return {
            "kl": (kl[:, win.read].sum(-1) / (n * win.read.numel())).tolist(),
            "l2": (l2[:, win.read].sum(-1) / (n * win.read.numel())).tolist(),
            "n_tokens": n * win.read.numel(),
        }
    p = win.position
    return {
        "kl": (kl[:, p] / n).tolist(),
        "l2": (l2[:, p] / n).tolist(),
        "kl_by_offset": (kl[:, win.read] / n).tolist(),
        "l2_by_offset": (l2[:, win.read] / n).tolist(),
        "kl_before_position": (kl[:, :p].sum(-1) / max(n * p, 1)).tolist(),
        "n_tokens": n,
    }


def _substitution(sums: dict, win: Window, eps_mean: float, zero_err: int) -> dict:
    """SAE substitution vs ε-baselines: mean KL / L2 per kind and ``KL_sae / KL_eps`` (``None`` when 0/0)."""
    curves = {k: _curve(sums[k], win) for k in ("sae", *EPS_BASELINES)}
    kl = {k: c["kl"][0] for k, c in curves.items()}
    out = {
        "substitution": {
            "kl": kl,
            "l2": {k: c["l2"][0] for k, c in curves.items()},
            "ratio": {k: (kl["sae"] / kl[k] if kl[k] > 0 else None) for k in EPS_BASELINES},
            "epsilon_mean": eps_mean,
            "n_exact_tokens": zero_err,
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
