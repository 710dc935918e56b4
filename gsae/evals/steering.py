"""Steering with decoder directions (g-SAE §4.2, Figs. 5–6; SPEC §1.6).

For a seeded sample of *alive* latents i (fired on some unmasked evaluation token):

    d_i = W_dec[i] / ‖W_dec[i]‖                    unit direction in the hook's space
    L_i = top-n token ids of W_Uᵀ (γ ⊙ d_i)          "logit lens" of the direction (n = 10, the paper's only value)
    Δp(α) = M(x + α d_i)_t − M(x)_t                  next-token probabilities at position t
    on_target(α)        = Σ_{j∈L_i} Δp_j
    off_target_added(α) = Σ_{j∉L_i} max(Δp_j, 0)     probability added to all other tokens (SPEC §1.6 [AMBIG])
    off_target_abs(α)   = Σ_{j∉L_i} |Δp_j|

``α d_i`` is added at one position t of one sequence (``mode="position"``, the SPEC §1.6 recommendation)
or at every unmasked position ≤ t (``mode="all"``), and the distribution is read at the same t. Positions
(sequence, t) are drawn with a seeded RNG among non-special tokens, independently of the SAE (two SAEs on the
same tokens are steered at the same positions); values are averaged over positions
(per latent), then over latents. The model is causal, so only the prefix ``tokens[:, :t+1]`` is run.
The nonzero α of the grid are batched into one forward whose first row is the unsteered ``x`` (the
baseline ``M(x)``); in ``position`` mode only that position differs between rows, so the shared prefix runs
once and each row is one new position (``LanguageModel.last_position_logits``). α = 0 *is* that baseline,
``Δp = M(x) − M(x) = 0``, so it is not run again and its effect is exactly zero. Paper defaults: α up to 100, scalars at α = 50.

``γ`` is ``ln_final``'s gain when the model keeps it (``fold_ln=False``, as SAELens SAEs are evaluated);
with ``fold_ln=True`` it is already folded into ``W_U``. The logit lens reads the residual stream, so only
SAEs on residual-stream hooks (``hook_resid_pre/mid/post``, ``hook_attn_out``, ``hook_mlp_out``) are steered;
others (``hook_z``, MLP internals) are reported as skipped (:func:`applicable`). The target tokens are in the
result as ids (``top_tokens``) and as strings (``top_token_strings``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from gsae.evals.common import batches, sae_on_tokens, special_token_mask
from gsae.evals.directions import generator
from gsae.lm import LanguageModel
from gsae.metrics import fired_mask
from gsae.sae.base import SparseAutoencoder

ALPHAS: tuple[float, ...] = tuple(float(a) for a in range(0, 101, 10))
#: Hooks whose activations live in the residual stream's basis (the logit lens can read them).
RESIDUAL_HOOK = re.compile(r"(^|\.)hook_(resid_(pre|mid|post)|attn_out|mlp_out)$")


def applicable(sae: SparseAutoencoder, lm: LanguageModel, hook: str) -> str | None:
    """Why steering does not apply to an SAE at ``hook`` (``None`` if it does): the logit lens ``W_Uᵀ d``
    means something only for directions in the residual stream."""
    if not RESIDUAL_HOOK.search(hook):
        return f"steering: hook {hook!r} is not in the residual stream; the logit lens of its directions means nothing"
    if lm.d_model != sae.d_in:
        return f"steering: hook {hook!r} has width {sae.d_in} != d_model {lm.d_model}; W_U cannot read it"
    return None


def logit_lens(lm: LanguageModel, dirs: Tensor) -> Tensor:
    """``(n, d_vocab)`` logits ``W_Uᵀ (γ ⊙ (d − mean d))`` of directions ``dirs (n, d_model)``: what ``ln_final``
    does to a direction before the unembedding, its centring (LayerNorm, folded or not) and its gain γ (when not
    folded into ``W_U``). With ``fold_ln`` TransformerLens keeps the centring in ``ln_final`` and γ in ``W_U``;
    without it both stay in ``ln_final``: the lens is the same either way (tested), so an SAE's target tokens do not
    depend on how the LM was loaded."""
    ln = lm.model.ln_final
    d = dirs
    if "LayerNorm" in type(ln).__name__:  # LayerNorm / LayerNormPre centre over d_model (RMSNorm does not)
        d = d - d.mean(-1, keepdim=True)
    gain = getattr(ln, "w", None)
    if gain is not None:
        d = d * gain.to(d)
    return d.to(lm.W_U.dtype) @ lm.W_U


@torch.no_grad()
def alive_latents(
    sae: SparseAutoencoder, lm: LanguageModel, hook: str, tokens: Tensor, batch_size: int, exclude: bool
) -> Tensor:
    """Indices of the latents that fire on some unmasked token of ``tokens``."""
    alive = torch.zeros(sae.d_sae, dtype=torch.bool, device=sae.W_dec.device)
    for tok in batches(tokens, batch_size):
        out = sae_on_tokens(sae, lm, hook, tok).out
        keep = special_token_mask(lm, tok, exclude).reshape(-1).to(alive.device)
        rows = [None if t is None else t[keep] for t in (out.top_idx, out.top_acts, out.latents)]
        alive |= fired_mask(*rows, sae.d_sae)
    return alive.nonzero().squeeze(-1).cpu()


def sample_positions(mask: Tensor, n_positions: int, gen: torch.Generator) -> list[tuple[int, int]]:
    """``n_positions`` (sequence, t) pairs: distinct sequences first (cycling if there are fewer), t uniform
    over the sequence's unmasked positions."""
    valid = [s for s in range(mask.shape[0]) if mask[s].any()]
    if not valid:
        raise ValueError("steering: no unmasked position in the evaluation tokens")
    order: list[int] = []
    while len(order) < n_positions:
        order += [valid[i] for i in torch.randperm(len(valid), generator=gen).tolist()]
    out = []
    for s in order[:n_positions]:
        ts = mask[s].nonzero().squeeze(-1)
        out.append((s, int(ts[int(torch.randint(len(ts), (), generator=gen))])))
    return out


@torch.no_grad()
def steer_at(
    lm: LanguageModel,
    hook: str,
    prefix: Tensor,
    dirs: Tensor,
    top: Tensor,
    alphas: Tensor,
    where: Tensor,
    max_rows: int,
) -> Tensor:
    """``(n_lat, n_alpha, 3)`` [on_target, off_target_added, off_target_abs] of steering at the last position.

    Args:
        prefix: ``(1, t+1)`` tokens ending at the read-out position t.
        dirs: ``(n_lat, D)`` unit directions; ``top``: ``(n_lat, n)`` their target token ids.
        alphas: ``(n_alpha,)`` nonzero steering scales.
        where: bool ``(t+1,)`` positions that receive ``α d`` (the last one only, or all unmasked ones).
        max_rows: sequences per forward pass (the unsteered row is added to each chunk).

    Steering the last position only changes nothing before it, so the rows differ only there:
    :meth:`~gsae.lm.LanguageModel.last_position_logits` runs the shared prefix once (fused forward) and reads the
    logits at t alone. Steering every position runs each row whole, read at t.
    """
    n_a = alphas.shape[0]
    if n_a == 0 or dirs.shape[0] == 0:
        return torch.zeros(dirs.shape[0], n_a, 3, dtype=torch.float64)
    x = lm.activations(prefix, hook)  # (1, t+1, D)
    per = max(1, (max_rows - 1) // n_a)  # latents per forward
    out = []
    for c in range(0, dirs.shape[0], per):
        d, tp = dirs[c : c + per], top[c : c + per]
        delta = (alphas[None, :, None] * d[:, None, :]).reshape(-1, d.shape[-1]).to(x.dtype)  # (c·A, D)
        delta = torch.cat([torch.zeros_like(delta[:1]), delta])  # row 0: unsteered
        if bool(where[:-1].any()):
            xs = x.repeat(delta.shape[0], 1, 1)
            xs[:, where] += delta[:, None, :]
            hidden = lm.hidden_from_hook(xs, hook, tokens=prefix.expand(xs.shape[0], -1)).hidden[:, -1]
            logits = lm.unembed(hidden)
        else:
            logits = lm.last_position_logits(x, hook, x[0, -1] + delta, prefix, max_rows=max_rows)
        p = logits.float().softmax(-1)
        dp = (p[1:] - p[:1]).reshape(d.shape[0], n_a, -1)  # (c, A, V)
        in_l = torch.zeros(d.shape[0], 1, dp.shape[-1], dtype=torch.bool, device=dp.device)
        in_l.scatter_(-1, tp[:, None, :].to(dp.device), True)
        on = (dp * in_l).sum(-1)
        off_add = (dp.clamp_min(0) * ~in_l).sum(-1)
        off_abs = (dp.abs() * ~in_l).sum(-1)
        out.append(torch.stack([on, off_add, off_abs], -1))
    return torch.cat(out).double().cpu()


#: result numbers that restate the evaluation's settings, or count the pool of latents steered (alive on this
#: benchmark's contexts: a curve of it beside ``eval/dead_latents/alive_fraction`` disagreed with it): in the JSON,
#: not TensorBoard curves (``tagged_scalars``)
SETTINGS = ("alpha_report", "n_latents", "n_positions", "n_alive", "alive_fraction")
#: the options' valid values, checked with the option names and types before any work (``check_options``:
#: a bad value used to raise after the evaluation, or run and give NaN or the wrong latents)
OPTION_BOUNDS: dict[str, str | tuple[str, ...]] = {
    "batch_size": "> 0", "n_latents": "> 0", "n_positions": "> 0", "top_n": "> 0", "alphas": "non-empty",
    "max_rows": "> 0"
}


@torch.no_grad()
def run(
    sae: SparseAutoencoder,
    lm: LanguageModel,
    hook: str,
    tokens: Tensor,
    *,
    seed: int = 0,
    batch_size: int = 8,
    n_latents: int = 32,
    n_positions: int = 10,
    top_n: int = 10,
    alphas: Sequence[float] = ALPHAS,
    alpha_report: float = 50.0,
    mode: Literal["position", "all"] = "position",
    exclude_special_tokens: bool = True,
    max_rows: int = 256,
) -> dict:
    """On- and off-target steering curves over ``alphas`` and their values at ``alpha_report``.

    Args:
        sae: any SAE (its decoder rows are the directions; ``tokens`` decide which latents are alive).
        lm: the language model; the hook must be in the residual stream (``W_U`` reads the direction).
        hook: hook the steering vector is added at.
        tokens: ``(n_seq, T)`` evaluation contexts.
        seed: seed of the latent and position samples.
        batch_size: sequences per forward pass when finding alive latents.
        n_latents: alive latents sampled (paper Fig. 6: 1000).
        n_positions: (sequence, position) pairs per latent (paper: 10 sequences; one position each).
        top_n: size n of the target token set L_i (paper: 10).
        alphas: steering scales (paper: 0..100 in steps of 5/3 and 10).
        alpha_report: α of the scalar results (paper Fig. 6: 50); the nearest grid value is used.
        mode: add ``α d`` at the read-out position only, or at every unmasked position up to it.
        exclude_special_tokens: never steer or read at special-token positions; they do not make a latent alive.
        max_rows: sequences per steering forward pass.
    """
    reason = applicable(sae, lm, hook)
    if reason:
        raise ValueError(reason)
    gen = torch.Generator().manual_seed(seed)  # latents (which are alive depends on the SAE)
    gen_pos = generator(seed, "steering_positions")  # positions: the same for every SAE on the same tokens
    tokens = tokens.to(lm.device)
    alive = alive_latents(sae, lm, hook, tokens, batch_size, exclude_special_tokens)
    latents = alive[torch.randperm(len(alive), generator=gen)[:n_latents]].sort().values
    w = sae.W_dec.detach()[latents.to(sae.W_dec.device)].float()
    dirs = (w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)).to(lm.device)  # (n_lat, D)
    top = logit_lens(lm, dirs).topk(top_n, dim=-1).indices  # (n_lat, n)
    grid = torch.tensor([float(a) for a in alphas], dtype=torch.float64)
    nonzero = grid[grid != 0].unique()
    mask = special_token_mask(lm, tokens, exclude_special_tokens)
    total = torch.zeros(len(latents), len(nonzero), 3, dtype=torch.float64)
    positions = sample_positions(mask.cpu(), n_positions, gen_pos)
    for s, t in positions:
        where = mask[s, : t + 1].clone() if mode == "all" else torch.arange(t + 1, device=mask.device) == t
        alph = nonzero.to(device=lm.device, dtype=torch.float32)
        total += steer_at(lm, hook, tokens[s : s + 1, : t + 1], dirs, top, alph, where, max_rows)
    per_latent = torch.zeros(len(latents), len(grid), 3, dtype=torch.float64)  # α = 0 stays exactly 0
    for j, a in enumerate(grid.tolist()):
        if a != 0:
            per_latent[:, j] = total[:, int((nonzero == a).nonzero())] / len(positions)
    out = _summary(grid, per_latent, latents, top, alpha_report, len(alive), positions, sae.d_sae)
    out["top_token_strings"] = [lm.token_strings(row) for row in out["top_tokens"]]
    return out


def _summary(grid, per_latent, latents, top, alpha_report, n_alive, positions, d_sae) -> dict:
    j = int((grid - alpha_report).abs().argmin())
    curves = per_latent.mean(0) if len(latents) else torch.zeros(len(grid), 3, dtype=torch.float64)
    return {
        "on_target": float(curves[j, 0]),
        "off_target_added": float(curves[j, 1]),
        "off_target_abs": float(curves[j, 2]),
        "alpha_report": float(grid[j]),
        "n_latents": len(latents),
        "n_alive": n_alive,
        "alive_fraction": n_alive / d_sae,
        "n_positions": len(positions),
        "alphas": grid.tolist(),
        "on_target_curve": curves[:, 0].tolist(),
        "off_target_added_curve": curves[:, 1].tolist(),
        "off_target_abs_curve": curves[:, 2].tolist(),
        "latents": latents.tolist(),
        "top_tokens": top.cpu().tolist(),
        "positions": [list(p) for p in positions],
        "per_latent_on_target": per_latent[:, j, 0].tolist(),
        "per_latent_off_target_added": per_latent[:, j, 1].tolist(),
    }


def figures(result: dict) -> dict:
    """Mean steering curves (g-SAE Fig. 5) and the per-latent on-target distribution at ``alpha_report`` (Fig. 6)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    a = result["alphas"]
    ax.plot(a, result["on_target_curve"], label="on-target Σ Δp (top-n)")
    ax.plot(a, result["off_target_added_curve"], label="off-target Σ max(Δp, 0)")
    ax.plot(a, result["off_target_abs_curve"], label="off-target Σ |Δp|", linestyle="--")
    ax.set(xlabel="α", ylabel="probability", title=f"steering ({result['n_latents']} latents)")
    ax.legend(fontsize=7)
    fig2 = Figure(figsize=(5, 3.5))
    ax2 = fig2.add_subplot()
    ax2.hist(result["per_latent_on_target"], bins=20)
    ax2.set(xlabel=f"on-target Σ Δp at α={result['alpha_report']:g}", ylabel="latents")
    ax2.yaxis.set_major_locator(MaxNLocator(integer=True))  # a count: no 0.5 ticks
    fig.tight_layout()
    fig2.tight_layout()
    return {"curves": fig, "on_target_at_alpha_report": fig2}
