"""Fidelity with the SAE spliced in: downstream CE and KL, and reconstruction metrics (SPEC §1.4, §5).

The SAE output ``x̂`` replaces the activation at ``hook`` at every position and the rest of the model
runs from there (``LanguageModel.hidden_from_hook``; the CE and KL over the vocabulary in chunks of positions,
:func:`gsae.lm_chunked.ce_and_kl_per_token`). Three CE-based numbers, kept apart by name:

- ``L_added = (CE_sae − CE_clean) / CE_clean`` — g-SAE §3 / smol-sae ``patch_loss``; a ratio of means.
- ``ce_increase = CE_sae − CE_clean`` — Apollo e2e "CE loss increase" (nats).
- ``ce_loss_score = (CE_abl − CE_sae) / (CE_abl − CE_clean)`` — SAELens, relative to zero ablation.

and ``kl_sae = mean_t KL(P_clean ‖ P_sae)``, ``kl_div_score = (KL_abl − KL_sae) / KL_abl`` (SAELens).

Masking follows SAELens ``run_evals`` (SPEC §5): positions whose *input* token is special keep the
clean activation (unpatched) and are left out of every mean; the CE at position t (predicting t+1) is
dropped when token t is special. Zero ablation zeroes *every* position, special ones included, as
SAELens does. Means are token-weighted over all batches (SAELens concatenates, then averages). smol-sae's
``patch_loss`` patches and counts every position instead: ``exclude_special_tokens=False`` reproduces it (on gsae-tiny
the two differ in the third digit; on GPT-2, whose BOS activation has an outlier norm, by much more).
The clean logits are computed by the same ``hidden_from_hook`` from the clean activation, so an SAE
with ``x̂ = x`` gives exactly ``L_added = 0`` and ``KL = 0``.

Reconstruction metrics come from :func:`gsae.metrics.recon_metrics` over the unmasked tokens (accumulated in a
:class:`gsae.metrics.ReconMetric`), plus
``explained_variance_saelens_legacy`` = SAELens' ``explained_variance_legacy``:
``mean_t [1 − ‖x_t − x̂_t‖² / ‖x_t − x̄_batch‖²]`` with ``x̄_batch`` the mean over the unmasked tokens of
each batch of ``batch_size`` sequences (so it depends on the batch size). SAELens ≥ 6.5x
``explained_variance`` (``ExplainedVarianceCalculator``: ``1 − E‖x − x̂‖² / (E‖x‖² − ‖E x‖²)``) is exactly
our centered ``explained_variance``; SAELens 6.18's uncentered form is ``1 − fvu_uncentered``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from gsae import lm_chunked
from gsae.evals.common import batches, sae_on_tokens, special_token_mask
from gsae.lm import LanguageModel
from gsae.metrics import ReconMetric, l0_per_token
from gsae.sae.base import SparseAutoencoder

_SUMS = ("ce_clean", "ce_sae", "ce_ablation", "n_ce", "kl_sae", "kl_ablation", "n_kl", "ev_legacy", "n_ev")


@torch.no_grad()
def splice_sums(lm: LanguageModel, hook: str, tokens: Tensor, x: Tensor, spliced: list[Tensor], mask: Tensor) -> list[dict]:
    """One batch's summed CE and KL for each activation in ``spliced``, and the clean and zero-ablated ones.

    The suffix runs from ``hook`` once for ``x``, once for zeros and once per spliced tensor, up to the final hidden
    state only; :func:`gsae.lm_chunked.ce_and_kl_per_token` takes every CE and KL from those in chunks of positions
    (the clean logits of a chunk once for all runs, no full-vocabulary tensor).

    Args:
        lm: the language model.
        hook: hook the activations ``x`` were read at.
        tokens: ``(B, T)`` input tokens.
        x: ``(B, T, D)`` clean activations.
        spliced: ``(B, T, D)`` activations to put at the hook instead, one per SAE.
        mask: bool ``(B, T)``, True where a position counts (the CE at t, predicting t+1, needs token t unmasked).

    Returns:
        per spliced tensor, ``{ce_sae, kl_sae, ce_clean, ce_ablation, kl_ablation, n_ce, n_kl}`` as floats.
    """
    runs = [lm.hidden_from_hook(v, hook, tokens).hidden for v in (x, torch.zeros_like(x), *spliced)]
    W_U, b_U, d_vocab = lm.unembedding()
    res = lm_chunked.ce_and_kl_per_token(runs[0], runs[1:], W_U, b_U, tokens, d_vocab=d_vocab)
    ce_mask = mask[:, :-1]

    def ce_sum(ce: Tensor) -> float:
        return float(ce[:, :-1][ce_mask].double().sum())

    base = {
        "ce_clean": ce_sum(res.ce_clean),
        "ce_ablation": ce_sum(res.ce[0]),
        "kl_ablation": float(res.kl[0][mask].double().sum()),
        "n_ce": float(ce_mask.sum()),
        "n_kl": float(mask.sum()),
    }
    return [{**base, "ce_sae": ce_sum(res.ce[1 + j]), "kl_sae": float(res.kl[1 + j][mask].double().sum())}
            for j in range(len(spliced))]


def legacy_explained_variance_sum(x: Tensor, x_hat: Tensor) -> Tensor:
    """``Σ_t [1 − ‖x_t − x̂_t‖² / ‖x_t − x̄‖²]`` over the rows of ``x, x̂ (N, D)`` (SAELens ``explained_variance_legacy``)."""
    x, x_hat = x.double(), x_hat.double()
    resid = (x - x_hat).pow(2).sum(-1)
    var = (x - x.mean(0)).pow(2).sum(-1)
    return (1 - resid / var).sum()


#: result numbers that restate the evaluation"s settings: in the JSON, not TensorBoard curves (``tagged_scalars``)
SETTINGS = ("n_tokens",)
#: the options' valid values, checked with the option names and types before any work (``check_options``:
#: a bad value used to raise after the evaluation, or run and give NaN or the wrong latents)
OPTION_BOUNDS: dict[str, str | tuple[str, ...]] = {"batch_size": "> 0"}


@torch.no_grad()
def run(
    sae: SparseAutoencoder,
    lm: LanguageModel,
    hook: str,
    tokens: Tensor,
    *,
    seed: int = 0,
    batch_size: int = 8,
    exclude_special_tokens: bool = True,
) -> dict:
    """Splice ``sae`` in at ``hook`` on ``tokens (n_seq, T)``; return the metrics of the module docstring.

    Args:
        sae: any SAE (g-SAEs get ``∇ₓL`` through :func:`gsae.evals.common.sae_on_tokens`).
        lm: the language model.
        hook: hook the SAE reads and writes.
        tokens: ``(n_seq, T)`` evaluation contexts.
        seed: unused (the benchmark is deterministic); part of the benchmark contract.
        batch_size: sequences per forward pass (also the batch of ``explained_variance_saelens_legacy``).
        exclude_special_tokens: leave special-token positions unpatched and out of the means (SAELens default).
    """
    return run_many(
        {"": sae}, lm, hook, tokens, seed=seed, batch_size=batch_size, exclude_special_tokens=exclude_special_tokens
    )[""]


@torch.no_grad()
def run_many(
    saes: Mapping[str, SparseAutoencoder],
    lm: LanguageModel,
    hook: str,
    tokens: Tensor,
    *,
    seed: int = 0,
    batch_size: int = 8,
    exclude_special_tokens: bool = True,
) -> dict[str, dict]:
    """:func:`run` for several SAEs at one hook (a sweep's members), ``{name: result}``, each result equal to
    :func:`run` of that SAE alone. Per batch, the clean and zero-ablated passes run once for every SAE given the same
    clean activations tensor (within :func:`gsae.evals.common.shared_harvests`: all TopK SAEs, and all g-SAEs with
    one normaliser), so N SAEs cost about N + 2 suffix passes per batch instead of 3N (:func:`splice_sums`). SAEs given
    different tensors of equal values (a TopK's plain activations and a g-SAE's, taken with ``∇ₓL``: the same forward)
    share them too: the clean and ablated passes of equal inputs are the same passes."""
    del seed
    sums = {m: dict.fromkeys(_SUMS, 0.0) for m in saes}
    # each rank its own task under DDP (the evaluation callback splits them): no collective
    recon = {m: ReconMetric(sae.d_in, sync_on_compute=False).to(lm.device) for m, sae in saes.items()}
    for tok in batches(tokens.to(lm.device), batch_size):
        mask = special_token_mask(lm, tok, exclude_special_tokens)  # (B, T)
        flat = mask.reshape(-1)
        groups: list[tuple[Tensor, list[tuple[str, Tensor]]]] = []  # (clean x, [(member, x spliced)]) per tensor
        for m, sae in saes.items():
            r = sae_on_tokens(sae, lm, hook, tok)
            group = next((g for g in groups if g[0] is r.x or torch.equal(g[0], r.x)), None)
            if group is None:
                group = (r.x, [])
                groups.append(group)
            group[1].append((m, torch.where(mask[..., None], r.x_hat, r.x)))
            xm, xhm = r.x.reshape(flat.shape[0], -1)[flat], r.x_hat.reshape(flat.shape[0], -1)[flat]
            l0 = l0_per_token(r.out.top_acts, r.out.latents)[flat]
            recon[m].update(xm, xhm, l0)
            sums[m]["ev_legacy"] += float(legacy_explained_variance_sum(xm, xhm))
            sums[m]["n_ev"] += xm.shape[0]
            del r
        for x, members in groups:
            for m, add in zip((m for m, _ in members), splice_sums(lm, hook, tok, x, [v for _, v in members], mask)):
                for k, v in add.items():
                    sums[m][k] += v
    out = {}
    for m in saes:
        if recon[m].update_count == 0:
            raise ValueError("loss_added: no evaluation tokens")
        out[m] = {
            **_scores(sums[m]),
            **recon[m].compute(),
            "explained_variance_saelens_legacy": sums[m]["ev_legacy"] / max(sums[m]["n_ev"], 1),
        }
    return out


def _scores(s: dict) -> dict:
    """Means and the CE/KL scores from the accumulated sums."""
    if s["n_ce"] == 0:  # contexts of 2 tokens, BOS first: the one prediction is from BOS, which is left out
        raise ValueError("loss_added: no next-token prediction to score (every position of these contexts is a "
                         "special token or the last one); use longer contexts (--context-size)")
    ce_clean, ce_sae, ce_abl = (s[k] / s["n_ce"] for k in ("ce_clean", "ce_sae", "ce_ablation"))
    kl_sae, kl_abl = s["kl_sae"] / max(s["n_kl"], 1), s["kl_ablation"] / max(s["n_kl"], 1)
    return {
        "ce_clean": ce_clean,
        "ce_sae": ce_sae,
        "ce_ablation": ce_abl,
        "L_added": _ratio(ce_sae - ce_clean, ce_clean),  # NaN (JSON null) for a clean CE of exactly 0
        "ce_increase": ce_sae - ce_clean,
        "ce_loss_score": _ratio(ce_abl - ce_sae, ce_abl - ce_clean),
        "kl_sae": kl_sae,
        "kl_ablation": kl_abl,
        "kl_div_score": _ratio(kl_abl - kl_sae, kl_abl),
        "n_tokens": int(s["n_kl"]),
    }


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 else float("nan")


def figures(result: dict) -> dict:
    """CE clean / with the SAE / zero-ablated and KL with the SAE / zero-ablated, as bars."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.2))
    ax, ax2 = fig.subplots(1, 2)
    ax.bar(["clean", "SAE", "ablation"], [result["ce_clean"], result["ce_sae"], result["ce_ablation"]])
    ax.set(ylabel="next-token CE (nats)", title=f"L_added {result['L_added']:.3g}")
    ax2.bar(["SAE", "ablation"], [result["kl_sae"], result["kl_ablation"]])
    ax2.set(ylabel="KL to clean", title=f"kl_div_score {result['kl_div_score']:.3g}")
    fig.tight_layout()
    return {"ce_and_kl": fig}
