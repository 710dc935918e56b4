"""Latent dashboards: what a sample of latents responds to, on held-out text (g-SAE paper §4.6 rated exactly these).

For a seeded sample of alive latents (plus any named in ``latents``), from the evaluation tokens:

- the ``n_contexts`` top-activating tokens, each with its context window, the activating token marked and the
  latent's activation on every token of the window;
- ``n_per_interval`` random tokens (same windows) from each of ``n_intervals`` intervals of its nonzero activations,
  highest first, as sae_vis's interval groups (the dashboards of Rajamanoharan et al. 2024, whose rating protocol
  the paper follows): top examples alone overstate what a latent does at its typical activations;
- the histogram of the latent's nonzero activations and its density (fraction of tokens it fires on);
- the logit lens of its decoder direction, ``W_dec[i] @ W_U``: the tokens it promotes and suppresses most (as
  strings; residual-stream hooks only, where ``d_in == d_model``);
- for g-SAEs, the mean of its selection-score attribution ``β·|W_dec ∇ₓL|`` over the tokens it fires on
  (:meth:`gsae.sae.GradTopKSAE.attribution_at`, at the latents it keeps, with ``∇ₓL`` at the training scale, as every benchmark takes it).

Outputs: the JSON result; :func:`artifacts` -> one self-contained HTML file (inline CSS and SVG, no script, no
network) written beside each checkpoint as ``<checkpoint>.latents.html``; :func:`texts` -> one markdown entry
per latent for TensorBoard's text dashboard; :func:`figures` -> the activation histograms.

Why not ``sae-dashboard`` (pip, the SAELens ecosystem's SAEVis fork): its HTML loads d3 and Plotly from CDNs
(``d3js.org``, ``cdn.plot.ly``), so the file does not open offline; it encodes through SAELens'
``SAE.encode``, which has no ``∇ₓL`` argument, so a g-SAE's latents would be selected by plain TopK, not
as trained; and it adds a heavy dependency for what is ~300 lines here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gsae.evals.common import batches, needs_grad, sae_on_tokens, special_token_mask
from gsae.evals.latents_html import render_html, render_markdown
from gsae.evals.steering import logit_lens
from gsae.lm import LanguageModel
from gsae.metrics import fire_counts
from gsae.sae.base import SparseAutoencoder

#: result numbers that restate the evaluation's settings, or count what ``dead_latents`` measures on its own window
#: of tokens (``n_alive`` here: on this benchmark's contexts; a curve of it beside ``eval/dead_latents/alive_fraction``
#: disagreed with it): in the JSON, not TensorBoard curves (``tagged_scalars``)
SETTINGS = ("n_tokens", "n_latents", "n_alive")
#: the options' valid values, checked with the option names and types before any work (``check_options``:
#: a bad value used to raise after the evaluation, or run and give NaN or the wrong latents)
OPTION_BOUNDS: dict[str, str | tuple[str, ...]] = {
    "batch_size": "> 0", "n_latents": ">= 0", "latents": "each >= 0", "n_contexts": "> 0",
    "context_before": ">= 0", "context_after": ">= 0", "n_logit_tokens": ">= 0", "hist_bins": "> 0",
    "n_intervals": ">= 0", "n_per_interval": "> 0",
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
    latents: list[int] | None = None,
    n_contexts: int = 8,
    n_intervals: int = 3,
    n_per_interval: int = 4,
    context_before: int = 12,
    context_after: int = 4,
    n_logit_tokens: int = 8,
    hist_bins: int = 24,
    exclude_special_tokens: bool = True,
) -> dict:
    """Dashboards of ``n_latents`` sampled alive latents (and the named ``latents``) on ``tokens (n_seq, T)``.

    Args:
        sae: any SAE (g-SAEs are encoded with ``∇ₓL``, as in training).
        lm: the language model.
        hook: hook the SAE reads.
        tokens: ``(n_seq, T)`` held-out contexts.
        seed: seed of the latent sample and (with the latent's index) of its interval examples.
        batch_size: sequences per forward pass (memory only).
        n_latents: latents to sample, uniformly among those firing on at least ``n_contexts`` tokens (topped up
            with other alive latents when fewer do); the same latents at every checkpoint while they stay alive.
        latents: latent indices always shown (before the sample), e.g. ``[12, 907]``.
        n_contexts: top-activating tokens (contexts) shown per latent.
        n_intervals: intervals of each latent's nonzero activations to show random examples from (0: none). Split at
            quantiles, so each holds about as many tokens: activations are heavy-tailed, and sae_vis's equal-width
            intervals in activation leave the upper ones nearly empty. Equal quantile edges (ties) are merged.
        n_per_interval: random tokens (contexts) shown per interval, never one of the top contexts; seeded by
            ``seed`` and the latent, so a latent's draw does not depend on which other latents are shown.
        context_before: tokens of context shown before the activating token.
        context_after: tokens of context shown after it.
        n_logit_tokens: promoted and suppressed tokens of the logit lens.
        hist_bins: bins of each activation histogram.
        exclude_special_tokens: special-token positions (BOS/EOS) are never an activating token (as in training).
    """
    named = list(dict.fromkeys(int(i) for i in (latents or [])))  # each once, in the order given
    bad = [i for i in named if not 0 <= i < sae.d_sae]
    if bad:
        raise ValueError(f"latents.latents: {bad} out of range for d_sae={sae.d_sae}")
    if n_latents < 0 or n_intervals < 0 or n_contexts <= 0 or hist_bins <= 0 or n_per_interval <= 0:
        raise ValueError("latents: n_latents and n_intervals must be >= 0, n_contexts, n_per_interval, hist_bins > 0")
    tokens = tokens.to(lm.device)
    n_seq, t_len = tokens.shape
    keep = special_token_mask(lm, tokens, exclude_special_tokens).reshape(-1).cpu()  # (n_seq·T,)
    # One pass: per-latent fire counts (and g-SAE attribution sums) over every token, but activations kept only
    # for a candidate set of latents (the named ones and the head of the sample's seeded order) -- never every
    # nonzero: a ReLU SAE early in training fires on thousands of latents per token, and 128 contexts of 1024
    # tokens would be billions of entries. Latents the sample takes beyond the candidates get a second pass.
    perm = _order(sae.d_sae, seed).tolist()
    candidates = list(dict.fromkeys(named + perm[: max(4 * n_latents, 64)]))
    counts, attr_sum, acts = _harvest(sae, lm, hook, tokens, batch_size, keep, candidates)
    chosen = named + _sample(counts, set(named), n_latents, n_contexts, seed)
    column = {i: j for j, i in enumerate(candidates)}
    missing = [i for i in chosen if i not in column]
    if missing:
        _, _, more = _harvest(sae, lm, hook, tokens, batch_size, keep, missing, attribution=False)
        column.update({i: acts.shape[1] + j for j, i in enumerate(missing)})
        acts = torch.cat([acts, more], 1)
    logit = _logit_lens(sae, lm, hook, chosen, n_logit_tokens)
    n_tokens = int(keep.sum())
    entries = []
    for j, i in enumerate(chosen):
        entries.append(
            _latent_entry(lm, tokens, i, acts[:, column[i]], int(counts[i]), n_tokens, attr_sum, logit, j, n_contexts,
                          context_before, context_after, hist_bins, n_intervals=n_intervals,
                          n_per_interval=n_per_interval, seed=seed)
        )
    dens = torch.tensor([e["density"] for e in entries]) if entries else torch.zeros(1)
    return {
        "n_tokens": n_tokens,
        "n_alive": int((counts > 0).sum()),
        "n_latents": len(entries),
        "shown_median_density": float(dens.median()),  # of the latents shown (drawn among those firing enough)
        "setup": {"hook": hook, "d_sae": sae.d_sae, "seed": seed, "gsae": attr_sum is not None,  # not scalars
                  "n_intervals": n_intervals},
        "latents": entries,
    }


def _harvest(
    sae, lm, hook, tokens, batch_size, keep, columns: list[int], attribution: bool = True
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Over all tokens (special positions dropped): fire counts per latent ``(d_sae,)``; for g-SAEs,
    ``Σ β·|W_dec g|`` per latent over the tokens it fires on (None otherwise, or when not ``attribution``); and
    the activations of the latents ``columns`` on every token, ``(n_seq·T, len(columns))`` (zero where they do
    not fire)."""
    n_tok = tokens.shape[0] * tokens.shape[1]
    counts = torch.zeros(sae.d_sae, dtype=torch.long)
    acts = torch.zeros(n_tok, len(columns))
    columns_t = torch.tensor(columns, dtype=torch.long)
    where = torch.full((sae.d_sae,), -1, dtype=torch.long)  # latent -> its column in acts (-1: not kept)
    where[columns_t] = torch.arange(len(columns))
    attr_sum, offset = None, 0
    attribute = attribution and needs_grad(sae) and hasattr(sae, "attribution_at")
    for tok in batches(tokens, batch_size):
        r = sae_on_tokens(sae, lm, hook, tok)
        n = tok.shape[0] * tok.shape[1]
        ok = keep[offset : offset + n, None]
        if r.out.latents is not None:  # dense SAE: (n, d_sae)
            lat = r.out.latents.detach()
            fired = (lat != 0).logical_and_(ok.to(lat.device)).cpu()  # no masked copy of the (n, d_sae) matrix
            counts += fired.sum(0)
            acts[offset : offset + n] = torch.where(ok, lat[:, columns_t.to(lat.device)].cpu().float(), 0.0)
        else:  # TopK family: (n, k) indices and values
            idx, val = r.out.top_idx.cpu(), torch.where(ok, r.out.top_acts.detach().cpu().float(), 0.0)
            counts += fire_counts(idx, val, None, sae.d_sae)
            col = where[idx]
            sel = (val != 0) & (col >= 0)
            acts[offset + sel.nonzero()[:, 0], col[sel]] = val[sel]
            if attribute:  # β·|W_dec g| at the k kept latents of each token: N·k dot products, not the (N, d_sae)
                b, t, d = r.grad.shape  # matmul and its copy to the host (200 MB per GPT-2 batch of 4096 tokens)
                attr = sae.attribution_at(r.grad.reshape(b * t, d), r.out.top_idx).cpu().double()  # (N, k)
                s = torch.zeros(sae.d_sae, dtype=torch.float64).index_add_(0, idx.reshape(-1), (attr * (val != 0)).reshape(-1))
                attr_sum = s if attr_sum is None else attr_sum + s
        offset += n
    return counts, attr_sum, acts


def _order(d_sae: int, seed: int) -> Tensor:
    """The seeded order in which :func:`_sample` takes latents."""
    return torch.randperm(d_sae, generator=torch.Generator().manual_seed(seed))


def _sample(counts: Tensor, exclude: set[int], n: int, min_fires: int, seed: int) -> list[int]:
    """``n`` latents, uniformly at random (seeded) among those firing ``>= min_fires`` times, topped up with other
    alive latents if too few do. Latents are taken in the order of one seeded permutation of all ``d_sae``, so
    successive checkpoints show the same latents while they stay alive (one TensorBoard text card each)."""
    perm = _order(counts.shape[0], seed)
    c = counts.detach().cpu()[perm]  # in the permutation's order; one mask, not a Python read per latent
    free = torch.ones(len(perm), dtype=torch.bool)
    if exclude:
        free = ~torch.isin(perm, torch.tensor(sorted(exclude), dtype=perm.dtype))
    first = (c >= min_fires) & free
    chosen = perm[first][:n]
    if len(chosen) < n:
        more = perm[(c > 0) & free & ~first][: n - len(chosen)]
        chosen = torch.cat([chosen, more])
    return sorted(chosen.tolist())


def _logit_lens(sae, lm, hook: str, chosen: list[int], n: int) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """Top and bottom ``(values, ids)`` of the logit lens of ``W_dec[chosen]`` (steering's :func:`logit_lens`:
    through ``ln_final``'s centring and gain; None when the hook is not on the residual stream, as steering's
    :data:`RESIDUAL_HOOK`: ``hook_z`` is d_model wide in GPT-2, yet W_U does not read it)."""
    from gsae.evals.steering import RESIDUAL_HOOK

    if not chosen or sae.d_in != lm.d_model or not RESIDUAL_HOOK.search(hook):
        return None
    with torch.no_grad():
        logits = logit_lens(lm, sae.W_dec.detach()[chosen].to(lm.W_U.device)).float().cpu()  # (n_chosen, d_vocab)
    n = min(n, logits.shape[1])
    top, bottom = logits.topk(n, dim=-1), logits.topk(n, dim=-1, largest=False)
    return top.values, top.indices, bottom.values, bottom.indices


def _contexts(lm, tokens: Tensor, act: Tensor, flats: list[int], before: int, after: int) -> list[dict]:
    """The context window of each token ``flats`` (indices into ``tokens (n_seq, T)`` flattened): its tokens as
    strings, the activating one's place in them (``marked``) and the latent's activation ``act`` on each."""
    t_len = tokens.shape[1]
    windows = []
    for flat in flats:
        s, p = divmod(flat, t_len)
        windows.append((s, p, max(0, p - before), min(t_len, p + after + 1)))
    ids = [tokens[s, a:b].tolist() for s, _, a, b in windows]
    strings = iter(lm.token_strings([i for w in ids for i in w]))  # one decode call for every window
    return [{
        "seq": s,
        "pos": p,
        "marked": p - a,
        "tokens": [next(strings) for _ in range(b - a)],
        "acts": [round(float(v), 4) for v in act[s * t_len + a : s * t_len + b]],
    } for s, p, a, b in windows]


def _quantiles(sorted_vals: Tensor, q: Tensor) -> Tensor:
    """``torch.quantile(x, q)`` (linear interpolation) of ``sorted_vals``, x sorted ascending, without its
    2^24-element limit."""
    pos = q.double() * (len(sorted_vals) - 1)
    lo, hi = sorted_vals[pos.floor().long()], sorted_vals[pos.ceil().long()]
    return torch.minimum(lo + (hi - lo) * (pos - pos.floor()).to(sorted_vals.dtype), hi)  # rounding: stays sorted


def _intervals(act: Tensor, shown: Tensor, n_intervals: int, n_per: int, seed: int, latent: int) -> list[dict]:
    """Intervals of the nonzero activations in ``act (n_seq·T,)``, split at their quantiles, highest first: each
    ``{"lo", "hi", "n_tokens", "n_top", "flats"}``, its bounds (rounded as contexts' activations are, so every example's
    shown activation lies in ``[lo, hi]``), the tokens it holds (``[lo, hi)``, the last ``[lo, hi]``; top contexts
    included; ``n_top`` of them are top contexts) and up to ``n_per`` of them drawn uniformly at random (seeded by ``seed`` and ``latent``) from those
    not in ``shown`` (the top contexts), highest activation first. ``[]`` when off or when every nonzero is shown."""
    fired = act != 0
    if n_intervals == 0 or int(fired.sum()) <= len(shown):
        return []
    nz = act[fired].sort().values
    edges = _quantiles(nz, torch.linspace(0, 1, n_intervals + 1)).unique_consecutive()  # ties merge intervals
    if len(edges) == 1:  # every activation equal: one interval [v, v]
        edges = edges.repeat(2)
    n_tokens = torch.bucketize(nz, edges[1:-1], right=True).bincount(minlength=len(edges) - 1)
    n_top = torch.bucketize(act[shown], edges[1:-1], right=True).bincount(minlength=len(edges) - 1)
    free = fired.clone()
    free[shown] = False
    cand = free.nonzero().flatten()
    which = torch.bucketize(act[cand], edges[1:-1], right=True)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + latent) % 2**63)
    out = []
    for k in reversed(range(len(edges) - 1)):
        pool = cand[which == k]
        pick = pool[torch.randperm(len(pool), generator=gen)[:n_per]]
        pick = pick[act[pick].argsort(descending=True, stable=True)]
        out.append({"lo": round(float(edges[k]), 4), "hi": round(float(edges[k + 1]), 4),
                    "n_tokens": int(n_tokens[k]), "n_top": int(n_top[k]), "flats": pick.tolist()})
    return out


def _latent_entry(lm, tokens, i, act, count, n_tokens, attr_sum, logit, j, n_contexts, before, after, bins, *,
                  n_intervals: int, n_per_interval: int, seed: int) -> dict:
    """The JSON record of latent ``i`` from its activation on every token, ``act (n_seq·T,)``."""
    nz = act[act != 0]
    fired = (act != 0).nonzero().flatten()
    order = fired[act[fired].argsort(descending=True, stable=True)][:n_contexts]
    contexts = _contexts(lm, tokens, act, order.tolist(), before, after)
    groups = _intervals(act, order, n_intervals, n_per_interval, seed, i)
    for g in groups:
        g["contexts"] = _contexts(lm, tokens, act, g.pop("flats"), before, after)
    hi = float(nz.max()) if nz.numel() else 1.0
    lo = min(0.0, float(nz.min())) if nz.numel() else 0.0
    hist = torch.histc(nz, bins=bins, min=lo, max=hi if hi > lo else lo + 1) if nz.numel() else torch.zeros(bins)
    entry = {
        "latent": i,
        "density": count / max(n_tokens, 1),
        "n_fires": count,
        "max_act": float(nz.max()) if nz.numel() else 0.0,
        "mean_act": float(nz.mean()) if nz.numel() else 0.0,
        "hist": {"edges": torch.linspace(lo, hi if hi > lo else lo + 1, bins + 1).tolist(),
                 "counts": [int(c) for c in hist]},
        "contexts": contexts,
        "intervals": groups,
        "mean_beta_attribution": (float(attr_sum[i]) / count if count else None) if attr_sum is not None else None,
        "promoted": None,
        "suppressed": None,
    }
    if logit is not None:
        tv, ti, bv, bi = (t[j] for t in logit)
        entry["promoted"] = [[s, round(float(v), 4)] for s, v in zip(lm.token_strings(ti.tolist()), tv)]
        entry["suppressed"] = [[s, round(float(v), 4)] for s, v in zip(lm.token_strings(bi.tolist()), bv)]
    return entry


def artifacts(result: dict, about: str = "") -> dict[str, str]:
    """``{".latents.html": page}``: written beside each checkpoint as ``<checkpoint>.latents.html``; ``about`` (which
    SAE: checkpoint, member, step, class and shape) heads the page and is its title."""
    return {".latents.html": render_html(result, about)}


def texts(result: dict) -> dict[str, str]:
    """``{"latent_00042": markdown}`` per latent, for TensorBoard's text dashboard."""
    width = len(str(max(result["setup"]["d_sae"] - 1, 1)))
    return {f"latent_{e['latent']:0{width}d}": render_markdown(e, result) for e in result["latents"]}


def figures(result: dict) -> dict:
    """Small multiples of the sampled latents' activation histograms (first 16)."""
    from matplotlib.figure import Figure

    entries = result["latents"][:16]
    if not entries:
        return {}
    cols = 4
    rows = (len(entries) + cols - 1) // cols
    fig = Figure(figsize=(10, 2.2 * rows + 0.6))
    for k, e in enumerate(entries):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.stairs(e["hist"]["counts"], e["hist"]["edges"], fill=True)
        ax.set_title(f"latent {e['latent']}  (density {e['density']:.2%})", fontsize=8)
        ax.tick_params(labelsize=7)
        if k // cols == rows - 1:
            ax.set_xlabel("activation", fontsize=8)
        if k % cols == 0:
            ax.set_ylabel("tokens", fontsize=8)
    fig.suptitle(f"activation histograms of {len(entries)} sampled latents ({result['n_tokens']} held-out tokens)",
                 fontsize=9)
    fig.tight_layout()
    return {"activation_histograms": fig}
