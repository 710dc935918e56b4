"""Fidelity with the SAE spliced in: downstream CE and KL, and reconstruction metrics (SPEC §1.4, §5).

The SAE output ``x̂`` replaces the activation at ``hook`` at every position and the rest of the model
runs from there (``LanguageModel.run_from_hook``). Three CE-based numbers, kept apart by name:

- ``L_added = (CE_sae − CE_clean) / CE_clean`` — g-SAE §3 / smol-sae ``patch_loss``; a ratio of means.
- ``ce_increase = CE_sae − CE_clean`` — Apollo e2e "CE loss increase" (nats).
- ``ce_loss_score = (CE_abl − CE_sae) / (CE_abl − CE_clean)`` — SAELens, relative to zero ablation.

and ``kl_sae = mean_t KL(P_clean ‖ P_sae)``, ``kl_div_score = (KL_abl − KL_sae) / KL_abl`` (SAELens).

Masking follows SAELens ``run_evals`` (SPEC §5): positions whose *input* token is special keep the
clean activation (unpatched) and are left out of every mean; the CE at position t (predicting t+1) is
dropped when token t is special. Zero ablation zeroes *every* position, special ones included, as
SAELens does. Means are token-weighted over all batches (SAELens concatenates, then averages).
The clean logits are computed by the same ``run_from_hook`` from the clean activation, so an SAE
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

from gsae.evals.common import batches, sae_on_tokens, special_token_mask
from gsae.lm import LanguageModel, next_token_loss
from gsae.metrics import ReconMetric, kl_div_per_token, l0_per_token
from gsae.sae.base import SparseAutoencoder

_SUMS = ("ce_clean", "ce_sae", "ce_ablation", "n_ce", "kl_sae", "kl_ablation", "n_kl", "ev_legacy", "n_ev")


@torch.no_grad()
def clean_sums(lm: LanguageModel, hook: str, tokens: Tensor, x: Tensor, mask: Tensor) -> tuple[Tensor, dict]:
    """The SAE-independent part of one batch: the clean logits ``(B, T, V)`` and the summed clean and zero-ablated
    CE, the ablated KL and the position counts over the unmasked positions.

    Args:
        lm: the language model.
        hook: hook the activations ``x`` were read at.
        tokens: ``(B, T)`` input tokens.
        x: ``(B, T, D)`` clean activations.
        mask: bool ``(B, T)``, True where a position counts.
    """
    ce_mask = mask[:, :-1]  # CE at t predicts t+1: dropped when the input token t is special
    logits_clean = lm.run_from_hook(x, hook, tokens).logits  # (B, T, V)
    out = {"ce_clean": next_token_loss(logits_clean, tokens, "none")[ce_mask].double().sum()}
    logits = lm.run_from_hook(torch.zeros_like(x), hook, tokens).logits
    out["ce_ablation"] = next_token_loss(logits, tokens, "none")[ce_mask].double().sum()
    out["kl_ablation"] = kl_div_per_token(logits_clean, logits)[mask].double().sum()
    out["n_ce"], out["n_kl"] = ce_mask.sum().double(), mask.sum().double()
    return logits_clean, out


@torch.no_grad()
def patched_sums(lm: LanguageModel, hook: str, tokens: Tensor, logits_clean: Tensor, x_new: Tensor, mask: Tensor) -> dict:
    """Summed CE and KL to ``logits_clean`` with ``x_new (B, T, D)`` spliced in (other arguments as in
    :func:`clean_sums`)."""
    logits = lm.run_from_hook(x_new, hook, tokens).logits
    return {
        "ce_sae": next_token_loss(logits, tokens, "none")[mask[:, :-1]].double().sum(),
        "kl_sae": kl_div_per_token(logits_clean, logits)[mask].double().sum(),
    }


def legacy_explained_variance_sum(x: Tensor, x_hat: Tensor) -> Tensor:
    """``Σ_t [1 − ‖x_t − x̂_t‖² / ‖x_t − x̄‖²]`` over the rows of ``x, x̂ (N, D)`` (SAELens ``explained_variance_legacy``)."""
    x, x_hat = x.double(), x_hat.double()
    resid = (x - x_hat).pow(2).sum(-1)
    var = (x - x.mean(0)).pow(2).sum(-1)
    return (1 - resid / var).sum()


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
    one normaliser), so N SAEs cost about N + 2 suffix passes per batch instead of 3N."""
    del seed
    sums = {m: dict.fromkeys(_SUMS, 0.0) for m in saes}
    # rank 0 only under DDP: no collective
    recon = {m: ReconMetric(sae.d_in, sync_on_compute=False).to(lm.device) for m, sae in saes.items()}
    for tok in batches(tokens.to(lm.device), batch_size):
        mask = special_token_mask(lm, tok, exclude_special_tokens)  # (B, T)
        flat = mask.reshape(-1)
        clean: list[tuple[Tensor, Tensor, dict]] = []  # (x, clean logits, clean sums) per distinct activation tensor
        for m, sae in saes.items():
            r = sae_on_tokens(sae, lm, hook, tok)
            shared = next((c for c in clean if c[0] is r.x), None)
            if shared is None:
                shared = (r.x, *clean_sums(lm, hook, tok, r.x, mask))
                clean.append(shared)
            x_new = torch.where(mask[..., None], r.x_hat, r.x)
            for k, v in {**shared[2], **patched_sums(lm, hook, tok, shared[1], x_new, mask)}.items():
                sums[m][k] += float(v)
            xm, xhm = r.x.reshape(flat.shape[0], -1)[flat], r.x_hat.reshape(flat.shape[0], -1)[flat]
            l0 = l0_per_token(r.out.top_acts, r.out.latents)[flat]
            recon[m].update(xm, xhm, l0)
            sums[m]["ev_legacy"] += float(legacy_explained_variance_sum(xm, xhm))
            sums[m]["n_ev"] += xm.shape[0]
        del clean
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
    ce_clean, ce_sae, ce_abl = (s[k] / max(s["n_ce"], 1) for k in ("ce_clean", "ce_sae", "ce_ablation"))
    kl_sae, kl_abl = s["kl_sae"] / max(s["n_kl"], 1), s["kl_ablation"] / max(s["n_kl"], 1)
    return {
        "ce_clean": ce_clean,
        "ce_sae": ce_sae,
        "ce_ablation": ce_abl,
        "L_added": (ce_sae - ce_clean) / ce_clean,
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
