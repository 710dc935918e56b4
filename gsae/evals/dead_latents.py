"""Dead latents and activation density on a held-out token stream (SPEC §1.5; g-SAE §4.1 Table 1, §4.3 Fig. 8).

The unmasked tokens of ``tokens`` (special tokens dropped, as in training) are read in order and cut
into consecutive *batches* of ``batch_tokens`` tokens; each batch's fired mask
(:func:`gsae.metrics.fired_mask`) advances a :class:`gsae.metrics.DeadLatentTracker`, the same counters
training uses, so both definitions are the training-time ones:

- **batches** (g-SAE Table 1, smol-sae): dead if it did not fire in the last ``dead_batches``
  consecutive batches (paper: 5 batches of 4096 tokens).
- **tokens** (Gao et al.): dead if it did not fire in the last ``window_tokens`` tokens (default: the
  whole stream, i.e. never fired in it). Counted per batch, like training.

"Fired in a batch" is ``activity_test``: ``nonzero`` (default, SPEC §1.5: some token's activation is nonzero) or
``sum_positive`` (smol-sae's ``x_hid.sum(0) > 0``: the batch's summed activation is positive, which differs only
when a TopK SAE without ReLU keeps negative values). The densities always count nonzero activations.

The batches always hold ``batch_tokens`` tokens (4096, as the paper's), whatever the memory ``batch_size``:
if the stream is shorter than ``dead_batches × batch_tokens``, the "batches" definition is not computed
(``dead_fraction_batches`` is ``None`` and ``note`` says how many tokens it needs) rather than shrinking
the batches to a different definition; the densities and the "tokens" definition then use every token.
Otherwise tokens after the last full batch are dropped, so every number uses the same ``n_tokens``.

Density of latent i = (#tokens where it fired) / n_tokens. Reported: its median over all latents and
over latents that fired (g-SAE §4.3: 0.24% / 0.43% / 1.10% for g-SAE / TopK / e2e at L0 = 32), a
log10-density histogram (never-fired latents counted apart in ``n_never_fired``), and the CDF of
log10 density at the histogram edges (g-SAE Fig. 8 top).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from gsae.evals.common import batches, sae_on_tokens, special_token_mask
from gsae.lm import LanguageModel
from gsae.metrics import DeadLatentTracker, FireCountMetric, fired_mask
from gsae.sae.base import SparseAutoencoder

Rows = tuple[Tensor | None, Tensor | None, Tensor | None]  # (top_idx, top_acts, latents) of some tokens


def _rows(out, keep: Tensor) -> Rows:
    return tuple(None if t is None else t[keep] for t in (out.top_idx, out.top_acts, out.latents))


def _slice(rows: Rows, a: int, b: int) -> Rows:
    return tuple(None if t is None else t[a:b] for t in rows)


#: result numbers that restate the evaluation"s settings: in the JSON, not TensorBoard curves (``tagged_scalars``)
SETTINGS = ("n_tokens", "batch_tokens", "dead_batches", "window_tokens")
#: the options' valid values, checked with the option names and types before any work (``check_options``:
#: a bad value used to raise after the evaluation, or run and give NaN or the wrong latents)
OPTION_BOUNDS: dict[str, str | tuple[str, ...]] = {
    "batch_size": "> 0", "dead_batches": "> 0", "batch_tokens": "> 0", "window_tokens": "> 0", "log10_min": "< 0",
    "bin_width": "> 0"
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
    dead_batches: int = 5,
    batch_tokens: int = 4096,
    window_tokens: int | None = None,
    exclude_special_tokens: bool = True,
    log10_min: float = -7.0,
    bin_width: float = 0.25,
    activity_test: Literal["nonzero", "sum_positive"] = "nonzero",
) -> dict:
    """Both dead-latent fractions, alive fraction and the density distribution of ``sae`` on ``tokens``.

    Args:
        sae: any SAE.
        lm: the language model.
        hook: hook the SAE reads.
        tokens: ``(n_seq, T)`` evaluation contexts, read in order as one stream.
        seed: unused (deterministic); part of the benchmark contract.
        batch_size: sequences per forward pass (memory only; does not change the result).
        dead_batches: consecutive batches without firing that make a latent dead (paper: 5).
        batch_tokens: tokens per batch of the "batches" definition (smol-sae: 4096).
        window_tokens: token window of the "tokens" definition (default: the whole stream).
        exclude_special_tokens: drop special-token positions from the stream (as training does).
        log10_min: lowest edge of the log10-density histogram (lower densities go to the first bin).
        bin_width: width of the histogram bins in log10 units.
        activity_test: what "fired in a batch" means for both dead definitions: ``nonzero`` (default; some
            activation != 0) or ``sum_positive`` (smol-sae: the batch's summed activation > 0).
    """
    del seed
    if activity_test not in ("nonzero", "sum_positive"):
        raise ValueError(f"dead_latents: activity_test must be 'nonzero' or 'sum_positive' (got {activity_test!r})")
    special = special_token_mask(lm, tokens, exclude_special_tokens)
    n_total = int(special.sum())
    if n_total == 0 or batch_tokens <= 0 or dead_batches <= 0:
        raise ValueError(
            f"dead_latents: need evaluation tokens, batch_tokens > 0 and dead_batches > 0 "
            f"(got {n_total} tokens, batch_tokens={batch_tokens}, dead_batches={dead_batches})"
        )
    enough = n_total >= dead_batches * batch_tokens
    n_used = n_total // batch_tokens * batch_tokens if enough else n_total
    window = n_used if window_tokens is None else window_tokens
    tracker = DeadLatentTracker(sae.d_sae, dead_batches, window).to(sae.W_dec.device)
    counts = FireCountMetric(sae.d_sae, sync_on_compute=False).to(sae.W_dec.device)  # each rank its own task under DDP: no collective
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=sae.W_dec.device)
    summed = torch.zeros(sae.d_sae, dtype=torch.float64, device=sae.W_dec.device)  # sum_positive: this batch's sums
    seen = 0  # tokens fed so far; the current batch holds seen % batch_tokens of them
    for tok in batches(tokens.to(lm.device), batch_size):
        if seen >= n_used:
            break
        out = sae_on_tokens(sae, lm, hook, tok).out
        rows = _rows(out, special_token_mask(lm, tok, exclude_special_tokens).reshape(-1).to(fired.device))
        n = min(next(t for t in rows if t is not None).shape[0], n_used - seen)
        a = 0
        while a < n:  # split the rows at batch boundaries
            b = min(n, a + batch_tokens - seen % batch_tokens)
            piece = _slice(rows, a, b)
            if activity_test == "sum_positive":
                summed += _activation_sums(*piece, sae.d_sae, summed.device)
            else:
                fired |= fired_mask(*piece, sae.d_sae)
            counts.update(*piece)
            seen += b - a
            a = b
            if seen % batch_tokens == 0 or seen == n_used:  # a full batch, or (short stream) the end
                if activity_test == "sum_positive":
                    fired, summed = summed > 0, summed.zero_()
                tracker.update(fired, batch_tokens if seen % batch_tokens == 0 else seen % batch_tokens)
                fired.zero_()
    out = _summary(tracker, counts.compute()[0], n_used, batch_tokens, dead_batches, window, log10_min, bin_width)
    if not enough:
        need = dead_batches * batch_tokens
        out["dead_fraction_batches"] = out["n_dead_batches"] = None
        per_context = n_total / max(tokens.shape[0], 1)  # counted tokens per context here (special ones left out)
        out["note"] = (
            f"dead_fraction_batches needs {dead_batches} batches of {batch_tokens} tokens ({need} tokens, about "
            f"{math.ceil(need / max(per_context, 1e-9))} contexts of {tokens.shape[1]}); got {n_total} in "
            f"{tokens.shape[0]} contexts: raise n_seqs, or hold out more validation data"
        )
    return out


def _activation_sums(top_idx: Tensor | None, top_acts: Tensor | None, latents: Tensor | None, d_sae: int, device) -> Tensor:
    """``(d_sae,)`` float64: each latent's summed activation over the rows (smol-sae's ``x_hid.sum(0)``)."""
    if latents is not None:
        return latents.sum(0, dtype=torch.float64).to(device)
    out = torch.zeros(d_sae, dtype=torch.float64, device=device)
    return out.index_add_(0, top_idx.reshape(-1).to(device), top_acts.reshape(-1).to(device, torch.float64))


def contexts_for_window(
    lm: LanguageModel, tokens: Tensor, *, dead_batches: int = 5, batch_tokens: int = 4096,
    exclude_special_tokens: bool = True,
) -> int:
    """How many leading contexts of ``tokens (n_seq, T)`` :func:`run` needs for the "batches" definition:
    the fewest that hold ``dead_batches × batch_tokens`` counted tokens (special tokens left out, as :func:`run`
    does), or all of them when they hold fewer (:func:`run` then says how many it needs)."""
    counted = special_token_mask(lm, tokens, exclude_special_tokens).sum(1).cumsum(0)
    enough = (counted >= dead_batches * batch_tokens).nonzero()
    return int(enough[0, 0]) + 1 if len(enough) else int(tokens.shape[0])


def _summary(tracker, counts, n_used, batch_tokens, dead_batches, window, log10_min, bin_width) -> dict:
    density = counts.double().cpu() / n_used
    alive = density > 0
    n_bins = max(1, math.ceil(-log10_min / bin_width))
    edges = torch.linspace(log10_min, log10_min + n_bins * bin_width, n_bins + 1, dtype=torch.float64)
    log_d = density[alive].log10().clamp(edges[0], edges[-1])
    hist = torch.histogram(log_d, bins=edges).hist if alive.any() else torch.zeros(n_bins)
    cdf = [float((density <= 10 ** float(e)).double().mean()) for e in edges]
    return {
        "dead_fraction_batches": float(tracker.dead_by_batches().double().mean()),
        "dead_fraction_tokens": float(tracker.dead_by_tokens().double().mean()),
        "n_dead_batches": int(tracker.dead_by_batches().sum()),
        "n_dead_tokens": int(tracker.dead_by_tokens().sum()),
        "alive_fraction": float(alive.double().mean()),
        "median_density": float(density.median()),
        "median_density_alive": float(density[alive].median()) if alive.any() else 0.0,
        "frac_density_above_1pct": float((density > 0.01).double().mean()),
        "frac_density_above_10pct": float((density > 0.1).double().mean()),
        "n_tokens": n_used,
        "batch_tokens": batch_tokens,
        "dead_batches": dead_batches,
        "window_tokens": window,
        "n_never_fired": int((~alive).sum()),
        "log10_density_hist": {"edges": edges.tolist(), "counts": [int(c) for c in hist]},
        "density_cdf": {"log10_density": edges.tolist(), "fraction": cdf},
    }


def figures(result: dict) -> dict:
    """Log10-density histogram and density CDF (g-SAE Fig. 8 top)."""
    from matplotlib.figure import Figure

    h, c = result["log10_density_hist"], result["density_cdf"]
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    edges = h["edges"]
    ax.stairs(h["counts"], edges, fill=True)
    ax.set(
        xlabel="log10 activation density", ylabel="latents", title=f"density ({result['n_never_fired']} never fired)"
    )
    fig2 = Figure(figsize=(5, 3.5))
    ax2 = fig2.add_subplot()
    ax2.plot(c["log10_density"], c["fraction"])
    ax2.set(xlabel="log10 activation density", ylabel="fraction of latents ≤", title="density CDF", ylim=(0, 1))
    fig.tight_layout()
    fig2.tight_layout()
    return {"density_histogram": fig, "density_cdf": fig2}
