"""Activation plateaus and synthetic activations (Giglemiani et al. 2024, arXiv 2409.15019; SPEC §4).

**Prompts.** ``prompt_len``-token windows of the eval contexts (the prefix of each context first, then the
following non-overlapping windows; ``windows="prefix"`` keeps prefixes only), each with its context's next token
after it. Later windows start mid-text without BOS, like the paper's 10-token slices of OpenWebText; they give 12×
more prompts from 128-token contexts, for more bases and a better-conditioned ``Σ``. The next token is the label
of the prompt's last position: a g-SAE encodes with ``∇ₓL`` of the prompt's next-token CE *including* it (without
it the last position, the default ``position``, predicts nothing, its gradient is exactly 0, and every code, base and
synthetic target of a g-SAE was its plain TopK code). It is run only up to the hook, with the SAE; the perturbed
forward passes stop at ``position`` (causal: nothing earlier depends on it). The base activation ``A`` is the activation at
``hook`` at ``position`` (default the last) of a prompt; every type below uses the same bases (paired, as §4.2).
Latent densities (sparsity, dead = never active) are counted over every non-special token of the prompts.

**Targets** ``T`` (§4.2–4.3, App. A, D): ``model_generated`` (``A`` of another prompt, redrawn if
``‖T − A‖ ≤ 1e-3``), ``random`` (``N(μ, Σ)`` of all prompts' activations at ``position``; the paper used
32,000), ``sae_reconstruction`` (``SAE(T)`` of the same ``model_generated`` target), and the synthetic
activations of :mod:`gsae.evals.synthetic_activations` built from ``A``'s own code (``synthetic_random``,
``synthetic_baseline``, ``synthetic_structured``, ``synthetic_structured_no_cos``).

**Perturbation** (§4.1, App. A) of the activation at ``position`` only, ``n = 0..100``: ``absolute``
``A + s·n·(T − A)/‖T − A‖`` (paper: ``s = 0.5`` for GPT-2, whose activations have norm ≈ 56); ``relative``
``(1 − n/100)·A + (n/100)·T``. ``step_size="auto"`` sets ``s = 1.25 · mean‖T − A‖ / 100`` over the
model-generated targets, i.e. 100 steps cover 1.25× the mean distance, as in the paper (50 vs ≈ 40): use it
for models whose activation scale is not GPT-2's. Curves (§4.1): L2 distance at
``blocks.{n_layers−1}.hook_resid_post`` and ``KL(P_0 ‖ P_n)`` of the next token (:func:`gsae.metrics.kl_div_per_token`),
both at ``position``, between step ``n`` and step 0.

**Plateau experiment** (§4.4): bases ``model_generated`` (``A``), ``synthetic_baseline``,
``synthetic_structured`` and ``random``, each perturbed towards a fresh ``N(μ, Σ)`` sample with the
``plateau_schedule`` (default absolute; SPEC §4.2 [AMBIG]); AP step = first step with L2 > ``ap_threshold``
(paper: 20). ``ap_threshold="auto"`` is a gsae choice for non-GPT-2 scales: 0.25 × the median final L2 of
these curves.

**Speed.** The prompts run once up to the hook (``lm.activations``); each curve is ``101`` copies of the
prompt, cut after ``position`` (later tokens cannot change it), that run only the layers after the hook through
:func:`gsae.evals.perturb.perturbation_runs` (the loop ``sensitive_directions`` uses): step 0 once as the
reference, steps 1… many curves per forward pass (about ``forward_tokens`` tokens). Tables, ``format_table``
and ``figures`` are in :mod:`gsae.evals.step_metrics`.
"""

from __future__ import annotations

import time
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from gsae.evals import synthetic_activations as syn
from gsae.evals.common import batches, sae_on_tokens, special_token_mask
from gsae.evals.perturb import perturbation_runs
from gsae.evals.step_metrics import figures, format_table, report
from gsae.evals.synthetic_activations import PLATEAU_BASES, TARGET_TYPES
from gsae.lm import LanguageModel
from gsae.sae.base import SparseAutoencoder

SCHEDULES = ("absolute", "relative")
N_STEPS = 100

__all__ = ["run", "figures", "format_table", "perturbation_steps", "perturbation_curves", "TARGET_TYPES"]


class Prompts(NamedTuple):
    """The prompts and their activations.

    Attributes:
        tokens: ``(P, L)`` prompt tokens. x: ``(P, L, D)`` activations at the hook.
        code: the SAE's :class:`~gsae.evals.synthetic_activations.SparseCode` at ``position`` (``P`` rows).
        recon: ``(P, D)`` SAE reconstruction at ``position``.
        density: latent densities over every non-special prompt token.
    """

    tokens: Tensor
    x: Tensor
    code: syn.SparseCode
    recon: Tensor
    density: syn.LatentDensity


class Curves(NamedTuple):
    """Perturbation curves, ``(M, 101)`` each, 0 at step 0.

    Attributes:
        l2: L2 distance at the final residual. kl: ``KL(P_0 ‖ P_n)`` of the next token.
    """

    l2: Tensor
    kl: Tensor


def prompt_windows(tokens: Tensor, prompt_len: int, windows: Literal["all", "prefix"]) -> Tensor:
    """``(P, prompt_len + 1)``: the prompts (every context's prefix, then, ``all``, its next non-overlapping windows),
    each followed by its context's next token, the label of the prompt's last position (module docstring)."""
    n_seq, T = tokens.shape
    if not 2 <= prompt_len <= T - 1:
        raise ValueError(f"plateaus: prompt_len must be in [2, {T - 1}] for contexts of {T} tokens (a prompt and the "
                         f"token after it; got {prompt_len})")
    if windows not in ("all", "prefix"):
        raise ValueError(f"plateaus: windows must be all or prefix (got {windows!r})")
    n_win = (T - 1) // prompt_len if windows == "all" else 1
    return torch.cat([tokens[:, w * prompt_len : (w + 1) * prompt_len + 1] for w in range(n_win)])


@torch.no_grad()
def encode_prompts(
    sae: SparseAutoencoder, lm: LanguageModel, hook: str, windows: Tensor, position: int, batch_size: int
) -> Prompts:
    """Run the :func:`prompt_windows` up to the hook and the SAE on them (a g-SAE with ``∇ₓL`` of their next-token CE,
    the token after each prompt its last position's label); count latent densities on the prompts' non-special
    tokens. The prompts are the windows without that token."""
    xs, codes, recons, counts, n_tok = [], [], [], torch.zeros(sae.d_sae, dtype=torch.long), 0
    L = windows.shape[1] - 1  # prompt length
    for tok in batches(windows.to(lm.device), batch_size):
        r = sae_on_tokens(sae, lm, hook, tok)
        B = r.x.shape[0]
        code = syn.sparse_code(r.out)
        keep = special_token_mask(lm, tok)
        keep[:, L] = False  # the label token is not a prompt token
        keep = keep.reshape(-1)
        counts += syn.count_active(syn.SparseCode(code.idx[keep], code.vals[keep]), sae.d_sae).cpu()
        n_tok += int(keep.sum())
        at = torch.arange(B, device=tok.device) * (L + 1) + position  # rows of `position` in the flattened batch
        xs.append(r.x[:, :L])
        codes.append(syn.SparseCode(code.idx[at], code.vals[at]))
        recons.append(r.x_hat[:, position])
    K = max(c.idx.shape[1] for c in codes)  # dense SAEs: codes of different batches have different widths
    pad = [syn.SparseCode(*(torch.nn.functional.pad(t, (0, K - t.shape[1])) for t in c)) for c in codes]
    code = syn.SparseCode(torch.cat([c.idx for c in pad]), torch.cat([c.vals for c in pad]))
    return Prompts(windows[:, :L], torch.cat(xs), code, torch.cat(recons), syn.latent_density(counts, n_tok))


def perturbation_steps(
    base: Tensor, target: Tensor, schedule: Literal["absolute", "relative"], step_size: float, n_steps: int = N_STEPS
) -> Tensor:
    """``(M, n_steps + 1, D)`` perturbed activations: ``A + s·n·unit(T − A)`` or ``(1 − n/N)·A + (n/N)·T``.

    The relative schedule is exactly ``A`` at ``n = 0`` and exactly ``T`` at ``n = N``.
    """
    n = torch.arange(n_steps + 1, device=base.device, dtype=base.dtype)[None, :, None]
    A, T = base[:, None], target[:, None]
    if schedule == "absolute":
        d = T - A
        return A + step_size * n * d / d.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(d.dtype).tiny)
    if schedule == "relative":
        w = n / n_steps
        return (1 - w) * A + w * T
    raise ValueError(f"plateaus: schedule must be absolute or relative (got {schedule!r})")


@torch.no_grad()
def perturbation_curves(
    lm: LanguageModel,
    hook: str,
    x: Tensor,
    prompt_idx: Tensor,
    steps: Tensor,
    position: int,
    *,
    tokens: Tensor | None = None,
    forward_tokens: int = 8192,
) -> Curves:
    """L2 (final residual) and next-token KL at ``position`` of every step of every curve, against step 0.

    Runs through :func:`gsae.evals.perturb.perturbation_runs` (the loop ``sensitive_directions`` uses): each
    curve's step 0 is the reference, run once; steps 1… are its copies. Step 0 is exactly 0.

    Args:
        lm: the language model. hook: where ``steps`` go (at ``position``; earlier positions keep ``x``).
        x: ``(P, L, D)`` prompt activations at the hook. prompt_idx: ``(M,)`` the prompt of each curve.
        steps: ``(M, S, D)`` activations at ``position`` (from :func:`perturbation_steps`).
        tokens: ``(P, L)`` prompt tokens, needed only for hooks inside a block.
        forward_tokens: about how many tokens one forward pass holds.
    """
    M, S, _ = steps.shape
    t_run = position + 1
    ref = x[prompt_idx, :t_run].clone()  # (M, t, D)
    ref[:, position] = steps[:, 0].to(ref)

    def make(jobs: Tensor, s0: int, s1: int) -> Tensor:
        xp = ref[None, s0:s1].repeat(jobs.shape[0], 1, 1, 1)  # (nj, b, t, D)
        xp[:, :, position] = steps[s0:s1, (jobs + 1).to(steps.device)].transpose(0, 1).to(xp)
        return xp

    tok = None if tokens is None else tokens[prompt_idx, :t_run]
    res = perturbation_runs(
        lm, hook, ref, S - 1, make, torch.tensor([position]), tokens=tok, forward_tokens=forward_tokens
    )
    zero = torch.zeros(M, 1, dtype=torch.float32)
    kl = torch.cat([zero, res.kl[:, :, 0].T.float().cpu()], 1)
    l2 = torch.cat([zero, res.l2[:, :, 0].T.float().cpu()], 1)
    return Curves(l2, kl)


#: the options' valid values, checked with the option names and types before any work (``check_options``:
#: a bad value used to raise after the evaluation, or run and give NaN or the wrong latents)
OPTION_BOUNDS: dict[str, str | tuple[str, ...]] = {
    "n_perturbations": "> 0", "prompt_len": ">= 2", "position": ">= 0", "step_size": "> 0", "ap_threshold": "> 0",
    "baseline_neighbours": "> 0", "structured_neighbours": "> 0", "target_cos": "in [-1, 1]", "cov_jitter": ">= 0",
    "batch_size": "> 0", "forward_tokens": "> 0", "schedules": "non-empty", "target_types": "non-empty"
}


@torch.no_grad()
def run(
    sae: SparseAutoencoder,
    lm: LanguageModel,
    hook: str,
    tokens: Tensor,
    *,
    seed: int = 0,
    n_perturbations: int = 200,
    prompt_len: int = 10,
    position: int | None = None,
    windows: Literal["all", "prefix"] = "all",
    step_size: float | Literal["auto"] = 0.5,
    schedules: tuple[str, ...] = SCHEDULES,
    target_types: tuple[str, ...] = TARGET_TYPES,
    plateau: bool = True,
    plateau_schedule: Literal["absolute", "relative"] = "absolute",
    ap_threshold: float | Literal["auto"] = 20.0,
    baseline_neighbours: int = 10,
    structured_neighbours: int = 100,
    target_cos: float | Literal["estimate"] = 0.42,
    nl_variant: Literal["draft", "slope"] = "draft",
    auc_variant: Literal["draft", "paper"] = "draft",
    cov_jitter: float = 0.0,
    batch_size: int = 64,
    forward_tokens: int = 8192,
) -> dict:
    """Sensitivity to perturbations towards each target type, and activation plateaus (module docstring).

    Args:
        sae: the SAE whose latents build the synthetic activations (g-SAEs get ``∇ₓL`` to encode).
        lm: the language model. hook: where activations are perturbed (paper: ``blocks.1.hook_resid_pre``).
        tokens: ``(n_seq, T)`` eval contexts, cut into prompts (module docstring).
        seed: seed of every sample (bases, targets, swaps); same seed, SAE and tokens → same numbers.
        n_perturbations: curves per target type and schedule, and per plateau base (paper: 1000).
        prompt_len: tokens per prompt (paper: 10). position: perturbed position (default the last).
        windows: ``all`` (prefixes, then later non-overlapping windows) or ``prefix`` (one prompt per context).
        step_size: ``s`` of the absolute schedule (paper 0.5 for GPT-2) or ``auto`` (module docstring).
        schedules: subset of ``absolute``, ``relative``. target_types: subset of :data:`TARGET_TYPES`.
        plateau: run the plateau experiment. plateau_schedule: its schedule (SPEC §4.2 [AMBIG]: absolute).
        ap_threshold: L2 threshold of the AP step (paper: 20) or ``auto`` (module docstring).
        baseline_neighbours: synthetic-baseline sparsity neighbourhood (paper: 10).
        structured_neighbours: synthetic-structured top-latent neighbourhood (paper: 100).
        target_cos: cosine of the new top latent to the base's (paper: 0.42) or ``estimate`` (from the data).
        nl_variant: ``draft`` (SPEC §4.2) or ``slope`` (paper wording). auc_variant: ``draft`` or ``paper``.
        cov_jitter: added to the eigenvalues of Σ of the random targets.
        batch_size: prompts per forward up to the hook. forward_tokens: tokens per forward after the hook.
    """
    t0 = time.perf_counter()
    pos = _check_options(target_types, schedules, n_perturbations, prompt_len, position, step_size)
    prompts = encode_prompts(sae, lm, hook, prompt_windows(tokens, prompt_len, windows), pos, batch_size)
    setup = syn.build_targets(
        sae,
        prompts.x[:, pos],
        prompts.recon,
        prompts.code,
        prompts.density,
        n_perturbations,
        seed,
        baseline_neighbours=baseline_neighbours,
        structured_neighbours=structured_neighbours,
        target_cos=target_cos,
        cov_jitter=cov_jitter,
    )
    s = step_size if step_size != "auto" else 1.25 * setup.info["mean_distance"]["model_generated"] / N_STEPS
    t_prep = time.perf_counter() - t0
    A = prompts.x[setup.base_idx, pos]
    jobs = {("sens", sch, t): (A, setup.targets[t], sch) for sch in schedules for t in target_types}
    if plateau:
        jobs.update(
            {("plat", b): (setup.plateau_bases[b], setup.plateau_target, plateau_schedule) for b in PLATEAU_BASES}
        )
    tok = prompts.tokens.to(lm.device) if lm.resume_layer(hook) is None else None
    curves = _run_jobs(lm, hook, prompts.x, setup.base_idx, pos, float(s), jobs, tok, forward_tokens)
    sens = {sch: {t: curves["sens", sch, t] for t in target_types} for sch in schedules}
    plat = {b: curves["plat", b] for b in PLATEAU_BASES} if plateau else {}
    t_fwd = max(time.perf_counter() - t0 - t_prep, 1e-9)
    n_curves = n_perturbations * len(jobs)
    timings = {
        "seconds_total": t_prep + t_fwd,
        "seconds_prepare": t_prep,
        "seconds_forward": t_fwd,
        "n_curves": n_curves,
        "curves_per_second": n_curves / t_fwd,
        "forward_tokens_per_second": n_curves * (N_STEPS + 1) * (pos + 1) / t_fwd,
    }
    meta = {
        "hook": hook,
        "position": pos,
        "prompt_len": prompt_len,
        "n_prompts": int(prompts.tokens.shape[0]),
        "n_perturbations": n_perturbations,
        "n_steps": N_STEPS,
        "step_size": float(s),
        "step_size_option": step_size,
        "nl_variant": nl_variant,
        "auc_variant": auc_variant,
        "plateau_schedule": plateau_schedule,
        "ap_threshold_option": ap_threshold,
        **setup.info,
        "timings": timings,
    }
    return report(meta, sens, plat, ap_threshold, nl_variant, auc_variant)


def _check_options(target_types, schedules, n_perturbations: int, prompt_len: int, position, step_size) -> int:
    """Validate :func:`run`'s options; return the perturbed position."""
    bad = [t for t in target_types if t not in TARGET_TYPES] + [s for s in schedules if s not in SCHEDULES]
    if bad or "model_generated" not in target_types or n_perturbations < 1:
        raise ValueError(
            f"plateaus: target_types must include model_generated and come from {', '.join(TARGET_TYPES)}; schedules "
            f"from {', '.join(SCHEDULES)}; n_perturbations >= 1 (got unknown {bad}, n_perturbations={n_perturbations})"
        )
    pos = prompt_len - 1 if position is None else position
    if not 0 <= pos < prompt_len:
        raise ValueError(f"plateaus: position must be in [0, {prompt_len - 1}] (got {position})")
    if step_size != "auto" and not float(step_size) > 0:
        raise ValueError(f"plateaus: step_size must be > 0 or 'auto' (got {step_size!r})")
    return pos


def _run_jobs(
    lm: LanguageModel,
    hook: str,
    x: Tensor,
    base_idx: Tensor,
    pos: int,
    step_size: float,
    jobs: dict,
    tokens: Tensor | None,
    forward_tokens: int,
    block: int = 256,
) -> dict[tuple, Curves]:
    """Curves of every job ``key -> (bases (M, D), targets (M, D), schedule)``, curve ``i`` on prompt ``base_idx[i]``.
    Blocks of ``block`` curves bound the ``(block, 101, D)`` steps in memory."""
    out = {}
    for key, (A, T, schedule) in jobs.items():
        parts = []
        for b0 in range(0, A.shape[0], block):
            steps = perturbation_steps(A[b0 : b0 + block], T[b0 : b0 + block], schedule, step_size)
            idx = base_idx[b0 : b0 + block]
            parts.append(
                perturbation_curves(lm, hook, x, idx, steps, pos, tokens=tokens, forward_tokens=forward_tokens)
            )
        out[key] = Curves(torch.cat([c.l2 for c in parts]), torch.cat([c.kl for c in parts]))
    return out
