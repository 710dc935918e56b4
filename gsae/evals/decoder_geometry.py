"""Decoder geometry and loss sensitivity along decoder directions (g-SAE §4.4, Fig. 8 bottom, Table 2).

- Nearest-neighbour cosine of every latent: ``c_i = max_{j≠i} cos(W_dec[i], W_dec[j])`` (Braun et al.'s
  feature-splitting proxy); reported as a histogram (the paper's Fig. 8 bottom) and its mean/median.
- Latents are sampled (seeded, ``n_per_bin`` each; paper: 30) from the left tail (``c_i ≤`` the
  ``tail_quantile`` quantile), the middle (between the ``0.5 ∓ tail_quantile/2`` quantiles) and the right
  tail (``c_i ≥`` the ``1 − tail_quantile`` quantile) of that distribution. "Tail" is not defined in the
  paper; the quantile rule is ours [AMBIG]. Dead latents are kept (the paper notes they sit in the left spike).
- For each sampled latent, ``mean_t |∇ₓL(x_t) · d_i|`` with ``d_i`` the unit decoder row and ``∇ₓL`` from
  :meth:`LanguageModel.activations_and_grads` on the evaluation tokens; Table 2 reports the bin means
  (×1e-5: g-SAE 2.070 / 2.538 / 2.861, TopK 2.187 / 2.313 / 2.366 at layer 7, "300 token sequences").

Gradient scale (SPEC §1.2 [AMBIG]): ``L`` is the mean CE over a batch of ``grad_batch_size`` sequences
(TransformerLens ``return_type="loss"``), so per-token gradients scale as ``1/(grad_batch_size·(T−1))``.
It is computed as the summed-CE gradient divided by that count, so the number does not depend on how
the tokens are chunked for memory (``batch_size``). Compare values at equal ``grad_batch_size`` and ``T``.
The last position (gradient exactly 0 for a causal model: no label) and special-token positions are
left out of the token mean.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gsae.evals.common import batches, harvest, special_token_mask
from gsae.lm import LanguageModel
from gsae.sae.base import SparseAutoencoder

BINS = ("left", "middle", "right")


@torch.no_grad()
def nearest_neighbour_cosine(W_dec: Tensor, chunk: int = 1024) -> Tensor:
    """``(d_sae,)`` cosine of each decoder row with its most similar other row (``W_dec (d_sae, d_in)``)."""
    w = W_dec.detach().float()
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    n = w.shape[0]
    out = torch.full((n,), float("nan"), device=w.device)
    if n < 2:
        return out
    for a in range(0, n, chunk):
        c = w[a : a + chunk] @ w.T  # (chunk, d_sae)
        rows = torch.arange(c.shape[0], device=w.device)
        c[rows, a + rows] = -float("inf")
        out[a : a + chunk] = c.max(-1).values
    return out


def tail_bins(nn_cos: Tensor, n_per_bin: int, tail_quantile: float, gen: torch.Generator) -> dict[str, Tensor]:
    """Seeded samples of latent ids from the left tail, middle and right tail of ``nn_cos``."""
    c = nn_cos.double().cpu()
    q = torch.tensor(
        [tail_quantile, 0.5 - tail_quantile / 2, 0.5 + tail_quantile / 2, 1 - tail_quantile], dtype=c.dtype
    )
    lo, m_lo, m_hi, hi = torch.quantile(c, q).tolist()
    members = {"left": c <= lo, "middle": (c >= m_lo) & (c <= m_hi), "right": c >= hi}
    out = {}
    for name in BINS:
        ids = members[name].nonzero().squeeze(-1)
        out[name] = ids[torch.randperm(len(ids), generator=gen)[:n_per_bin]].sort().values
    return out


@torch.no_grad()
def mean_abs_directional_derivative(
    lm: LanguageModel, hook: str, tokens: Tensor, dirs: Tensor, batch_size: int, grad_batch_size: int, exclude: bool
) -> Tensor:
    """``(n_dirs,)`` ``mean_t |∇ₓL(x_t) · d|`` for unit ``dirs (n_dirs, D)`` (see the module docstring for L)."""
    acc = torch.zeros(dirs.shape[0], dtype=torch.float64, device=lm.device)
    n = 0
    for tok in batches(tokens.to(lm.device), batch_size):
        g = harvest(lm, hook, tok, grad_batch_size * (tok.shape[1] - 1))[1]  # (B, T, D); shared by a sweep's SAEs
        m = special_token_mask(lm, tok, exclude)
        m[:, -1] = False
        acc += (g[m].double() @ dirs.double().T).abs().sum(0)
        n += int(m.sum())
    return (acc / max(n, 1)).cpu()


#: result numbers that restate the evaluation"s settings: in the JSON, not TensorBoard curves (``tagged_scalars``)
SETTINGS = ("grad_batch_size",)
#: the options' valid values, checked with the option names and types before any work (``check_options``:
#: a bad value used to raise after the evaluation, or run and give NaN or the wrong latents)
OPTION_BOUNDS: dict[str, str | tuple[str, ...]] = {
    "batch_size": "> 0", "n_per_bin": "> 0", "tail_quantile": "in (0, 0.5]", "grad_batch_size": "> 0",
    "hist_bins": "> 0"
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
    n_per_bin: int = 30,
    tail_quantile: float = 0.1,
    grad_batch_size: int = 32,
    exclude_special_tokens: bool = True,
    hist_bins: int = 100,
) -> dict:
    """Nearest-neighbour decoder cosines and mean ``|∇L·d_i|`` for latents from the tails and middle.

    Args:
        sae: any SAE (only ``W_dec`` is used; the LM gives the gradients).
        lm: the language model.
        hook: hook whose ``∇ₓL`` is taken.
        tokens: ``(n_seq, T)`` evaluation contexts (paper: 300 sequences).
        seed: seed of the latent samples.
        batch_size: sequences per forward/backward pass (memory only).
        n_per_bin: latents sampled from each of the three bins (paper: 30).
        tail_quantile: fraction of latents in each tail (and width of the middle bin).
        grad_batch_size: sequences the CE is averaged over for ``∇ₓL`` (default 32, smol-sae's LM batch).
        exclude_special_tokens: leave special-token positions out of the token mean.
        hist_bins: bins of the cosine histogram over [-1, 1].
    """
    if not 0 < tail_quantile <= 0.5:
        raise ValueError(f"decoder_geometry: tail_quantile must be in (0, 0.5] (got {tail_quantile})")
    gen = torch.Generator().manual_seed(seed)
    nn_cos = nearest_neighbour_cosine(sae.W_dec).cpu()
    bins = tail_bins(nn_cos, n_per_bin, tail_quantile, gen)
    ids = torch.cat([bins[b] for b in BINS])
    w = sae.W_dec.detach()[ids.to(sae.W_dec.device)].float()
    dirs = (w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)).to(lm.device)
    dd = mean_abs_directional_derivative(lm, hook, tokens, dirs, batch_size, grad_batch_size, exclude_special_tokens)
    hist = torch.histogram(nn_cos.double().clamp(-1, 1), bins=hist_bins, range=(-1.0, 1.0))
    result = {
        "nn_cos_mean": float(nn_cos.mean()),
        "nn_cos_median": float(nn_cos.median()),
        "nn_cos_hist": {"edges": hist.bin_edges.tolist(), "counts": [int(c) for c in hist.hist]},
        "grad_batch_size": grad_batch_size,
        "bins": {},
    }
    start = 0
    for b in BINS:
        k = len(bins[b])
        vals = dd[start : start + k]
        start += k
        result[f"dd_{b}"] = float(vals.mean()) if k else float("nan")
        result[f"nn_cos_{b}_mean"] = float(nn_cos[bins[b]].mean()) if k else float("nan")
        result["bins"][b] = {
            "latents": bins[b].tolist(),
            "nn_cos": nn_cos[bins[b]].tolist(),
            "mean_abs_dd": vals.tolist(),
        }
    return result


def figures(result: dict) -> dict:
    """Nearest-neighbour cosine histogram (g-SAE Fig. 8 bottom) and the bin means of ``|∇L·d|`` (Table 2)."""
    from matplotlib.figure import Figure

    h = result["nn_cos_hist"]
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    ax.stairs(h["counts"], h["edges"], fill=True, color="0.6")
    for i, b in enumerate(BINS):  # each bin its own colour (one default colour made them indistinguishable)
        cos = result["bins"][b]["nn_cos"]
        if cos:
            ax.axvspan(min(cos), max(cos), alpha=0.25, color=f"C{i}", label=b)
    filled = [i for i, c in enumerate(h["counts"]) if c > 0]
    if filled:  # the range the cosines span, not the histogram's whole [-1, 1]
        lo, hi = h["edges"][filled[0]], h["edges"][filled[-1] + 1]
        ax.set_xlim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax.set(xlabel="nearest-neighbour decoder cosine", ylabel="latents", title="decoder geometry")
    ax.legend(fontsize=7)
    fig2 = Figure(figsize=(4, 3.5))
    ax2 = fig2.add_subplot()
    ax2.bar(list(BINS), [result[f"dd_{b}"] for b in BINS])
    ax2.set(xlabel="nearest-neighbour cosine bin", ylabel="mean |∇L · d_i|", title="directional derivative by bin")
    fig.tight_layout()
    fig2.tight_layout()
    return {"nn_cos_histogram": fig, "directional_derivative": fig2}
