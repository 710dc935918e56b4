"""Targets built from SAE latents and from activation statistics (Giglemiani et al. 2024 §4.2–4.3; SPEC §4.1, §4.3).

An activation's *code* is its active latents (:class:`SparseCode`); a synthetic activation is a new code
decoded by the SAE (``Σ vals·W_dec[idx] + b_dec``). Active = nonzero (TopK without ReLU keeps negative values;
they are kept as they are). Sparsity is ``log10`` feature density over the benchmark's tokens; dead = never
active there. Swaps only ever pick non-dead latents.

- **synthetic-random**: each active latent → a uniformly random non-dead latent (distinct within a code), value kept.
- **synthetic-baseline**: each active latent → one of its ``n`` most similarly-sparse non-dead latents
  (itself excluded, as the draft code), uniformly, value kept. The draft code's alternative neighbourhood,
  ``|Δlog10 density| < 0.01``, is not implemented (SPEC §8.4; the paper says 10 nearest).
- **synthetic-structured** (§4.3 steps 1–6): the top latent (largest value) → of its ``n`` most
  similarly-sparse non-dead latents, the one whose decoder cosine to it is closest to ``target_cos``
  (0.42 in the paper), same value; every other active latent ``l`` (in order of decreasing value) → the
  non-dead latent, not yet used in this code, whose cosine to the new top latent is closest to
  ``cos(l, top_base)`` [INFERRED: the paper says "equal to"; the pool is not stated]. With
  ``target_cos=None`` (the "w/o cos sim" variant of App. A) the new top latent is drawn uniformly from the
  sparsity neighbourhood [INFERRED].

A latent that is active in a code but dead on the density tokens gets the density ``0.5/n_tokens`` for
the neighbourhood search (its neighbours are then the sparsest non-dead latents). Sparsity ties are broken
by a seeded random order, so tied neighbourhoods are not biased towards low latent ids.

Random targets: ``N(μ, Σ)`` with ``Σ`` the (biased, as the draft) covariance of real activations. A
rank-deficient ``Σ`` (fewer activations than dimensions) is replaced by its nearest positive
semi-definite matrix (negative eigenvalues set to 0, Higham 1988; the draft's ``nearest_positive_definite``
fallback), plus an optional ``jitter·I``; samples are ``μ + V diag(√λ) z``, which needs no Cholesky.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gsae.evals.directions import generator
from gsae.metrics import fire_counts
from gsae.sae.base import SAEOutput, SparseAutoencoder

TARGET_TYPES = (
    "model_generated",
    "random",
    "sae_reconstruction",
    "synthetic_random",
    "synthetic_baseline",
    "synthetic_structured",
    "synthetic_structured_no_cos",
)
#: Bases of the activation-plateau experiment (§4.4), all perturbed towards random activations.
PLATEAU_BASES = ("model_generated", "synthetic_baseline", "synthetic_structured", "random")


class SparseCode(NamedTuple):
    """Active latents of ``N`` activations, padded to ``K`` per row.

    Attributes:
        idx: ``(N, K)`` long latent ids.
        vals: ``(N, K)`` latent values; 0 marks an inactive (padding) entry.
    """

    idx: Tensor
    vals: Tensor


class LatentDensity(NamedTuple):
    """How often each latent fires on the density tokens.

    Attributes:
        counts: ``(d_sae,)`` number of tokens on which each latent is nonzero.
        n_tokens: number of tokens counted.
        alive: bool ``(d_sae,)``, ``counts > 0``.
        log10: ``(d_sae,)`` float64 ``log10(counts / n_tokens)``; dead latents get ``log10(0.5 / n_tokens)``.
    """

    counts: Tensor
    n_tokens: int
    alive: Tensor
    log10: Tensor


class StructuredCode(NamedTuple):
    """A synthetic-structured code and its top latents.

    Attributes:
        code: the new :class:`SparseCode`.
        top_base: ``(N,)`` top latent of the base; ``top_synth``: ``(N,)`` the latent that replaced it.
        top_cos: ``(N,)`` ``cos(W_dec[top_synth], W_dec[top_base])``.
    """

    code: SparseCode
    top_base: Tensor
    top_synth: Tensor
    top_cos: Tensor


class Gaussian(NamedTuple):
    """``N(mean, scale·scaleᵀ)`` fitted to activations.

    Attributes:
        mean: ``(D,)``. scale: ``(D, D)`` ``V diag(√λ)`` of the (PSD-projected, jittered) covariance.
        n_rows: activations it was fitted to. n_clamped: negative eigenvalues set to 0. min_eig: the smallest eigenvalue before.
    """

    mean: Tensor
    scale: Tensor
    n_rows: int
    n_clamped: int
    min_eig: float


def sparse_code(out: SAEOutput) -> SparseCode:
    """The active latents of an SAE output: the top-k of TopK SAEs, else the nonzero latents (padded with 0)."""
    if out.top_idx is not None:
        return SparseCode(out.top_idx, out.top_acts)
    lat = out.latents
    K = max(int((lat != 0).sum(-1).max()), 1) if lat.shape[0] else 1
    idx = lat.abs().topk(K, dim=-1).indices
    return SparseCode(idx, lat.gather(-1, idx))


def decode(sae: SparseAutoencoder, code: SparseCode, like: Tensor | None = None) -> Tensor:
    """``(N, d_in)`` activations ``Σ_j vals[:, j]·W_dec[idx[:, j]] + b_dec`` of a code; for SAEs that normalise
    each input (SAELens ``layer_norm``/``constant_norm_rescale``), de-normalised with the statistics of
    ``like (N, d_in)``, the activations the code was derived from."""
    if getattr(sae, "normalizes_per_token", False):
        if like is None:
            raise ValueError("synthetic activations of an input-normalising SAE need the base activations (like=)")
        return sae.decode_sparse(code.vals, code.idx, like=like)
    return sae.decode_sparse(code.vals, code.idx)


def count_active(code: SparseCode, d_sae: int) -> Tensor:
    """``(d_sae,)`` number of rows of ``code`` in which each latent is active."""
    return fire_counts(code.idx, code.vals, None, d_sae)


def latent_density(counts: Tensor, n_tokens: int) -> LatentDensity:
    """:class:`LatentDensity` from fire counts over ``n_tokens`` tokens."""
    if n_tokens <= 0:
        raise ValueError("plateaus: no tokens to measure latent densities on")
    c = counts.double().cpu()
    return LatentDensity(counts.cpu(), n_tokens, (c > 0), torch.log10(c.clamp_min(0.5) / n_tokens))


def sparsity_neighbours(density: LatentDensity, n: int, seed: int) -> Tensor:
    """``(d_sae, n')`` for every latent the ``n' = min(n, n_alive − 1)`` non-dead latents (not itself) closest in log10 density.

    The ``n`` nearest values to ``q`` in a sorted array lie within ``n + 1`` places of ``q``'s insertion
    point, so only that window is searched. A non-dead latent's window is centred on its own place in the
    (randomly tie-broken) order, not on the insertion point of its density: latents of equal density (many
    rare ones fire the same number of times) each get their own draw from the tie, rather than all sharing the
    same ``n`` neighbours.
    """
    alive = density.alive.nonzero().squeeze(-1)
    if alive.numel() < 2:
        raise ValueError(
            f"plateaus: need at least 2 non-dead latents for sparsity neighbourhoods (got {alive.numel()})"
        )
    n = min(n, alive.numel() - 1)
    alive = alive[torch.randperm(alive.numel(), generator=generator(seed, "sparsity_ties"))]
    order = torch.sort(density.log10[alive], stable=True).indices  # random order within ties
    ids, s = alive[order], density.log10[alive[order]]  # (n_alive,) sorted by density
    q = density.log10  # (d_sae,)
    width = min(2 * n + 2, ids.numel())
    centre = torch.searchsorted(s, q)  # dead latents: where their density would go
    centre[ids] = torch.arange(ids.numel())  # non-dead ones: their own place among the ties
    start = (centre - (n + 1)).clamp(0, ids.numel() - width)
    cand = start[:, None] + torch.arange(width)  # (d_sae, width) positions in the sorted array
    dist = (s[cand] - q[:, None]).abs()
    dist[ids[cand] == torch.arange(q.numel())[:, None]] = float("inf")  # never itself
    pick = torch.sort(dist, dim=-1, stable=True).indices[:, :n]
    return ids[cand.gather(-1, pick)]


def synthetic_random(code: SparseCode, density: LatentDensity, seed: int) -> SparseCode:
    """Every active latent → a uniformly random non-dead latent, distinct within a row; values kept."""
    alive = density.alive.nonzero().squeeze(-1)
    N, K = code.idx.shape
    if alive.numel() < K:
        raise ValueError(f"plateaus: synthetic_random needs at least {K} non-dead latents (got {alive.numel()})")
    keys = torch.rand(N, alive.numel(), generator=generator(seed, "synthetic_random"))
    new = alive[keys.topk(K, dim=-1).indices].to(code.idx.device)  # a uniform K-subset per row
    return SparseCode(torch.where(code.vals != 0, new, code.idx), code.vals)


def synthetic_baseline(code: SparseCode, neighbours: Tensor, seed: int) -> SparseCode:
    """Every active latent → a uniform draw from its sparsity neighbourhood ``neighbours (d_sae, n)``; values kept."""
    pick = torch.randint(neighbours.shape[1], code.idx.shape, generator=generator(seed, "synthetic_baseline"))
    new = neighbours[code.idx.cpu(), pick].to(code.idx.device)
    return SparseCode(torch.where(code.vals != 0, new, code.idx), code.vals)


@torch.no_grad()
def synthetic_structured(
    code: SparseCode,
    W_dec: Tensor,
    density: LatentDensity,
    neighbours: Tensor,
    target_cos: float | None,
    seed: int,
    chunk: int = 256,
) -> StructuredCode:
    """Synthetic-structured codes (module docstring); ``neighbours (d_sae, n)`` is the top latent's sparsity pool."""
    W = F.normalize(W_dec.detach().float(), dim=-1)  # (d_sae, D)
    alive = density.alive.nonzero().squeeze(-1).to(W.device)
    idx, vals = code.idx.to(W.device), code.vals.float().to(W.device)
    active = vals != 0
    order = torch.where(active, vals, -torch.inf).argsort(dim=-1, descending=True, stable=True)  # (N, K) top first
    top_base = idx.gather(-1, order[:, :1]).squeeze(-1)
    cand = neighbours[top_base.cpu()].to(W.device)  # (N, n)
    if target_cos is None:
        pick = torch.randint(cand.shape[1], (cand.shape[0],), generator=generator(seed, "structured_no_cos"))
    else:
        cos_c = torch.cat(  # (N, n) cos(candidate, top_base), in chunks: W[cand] is (chunk, n, D)
            [
                (W[cand[r : r + chunk]] @ W[top_base[r : r + chunk], :, None]).squeeze(-1)
                for r in range(0, len(cand), chunk)
            ]
        )
        pick = (cos_c - target_cos).abs().argmin(-1).cpu()
    top_synth = cand[torch.arange(cand.shape[0]), pick.to(W.device)]
    new, W_alive = idx.clone(), W[alive]
    for r0 in range(0, idx.shape[0], chunk):
        rows = slice(r0, r0 + chunk)
        new[rows] = _match_to_top(
            W, W_alive, alive, idx[rows], active[rows], order[rows], top_base[rows], top_synth[rows]
        )
    top_cos = (W[top_synth] * W[top_base]).sum(-1)
    return StructuredCode(SparseCode(new.to(code.idx.device), code.vals), top_base, top_synth, top_cos)


def _match_to_top(
    W: Tensor,
    W_alive: Tensor,
    alive: Tensor,
    idx: Tensor,
    active: Tensor,
    order: Tensor,
    top_base: Tensor,
    top_synth: Tensor,
) -> Tensor:
    """Step 5 of §4.3 for a chunk of rows: each other active latent → the unused non-dead latent whose cosine to
    ``top_synth`` is closest to its own cosine to ``top_base``; the top entry becomes ``top_synth``."""
    n = idx.shape[0]
    rows = torch.arange(n, device=idx.device)
    c_base = (W[idx] * W[top_base][:, None]).sum(-1)  # (n, K) cos(l_base, top_base)
    c_pool = W[top_synth] @ W_alive.T  # (n, n_alive) cos(l, top_synth)
    used = alive[None, :] == top_synth[:, None]  # (n, n_alive)
    new = idx.clone()
    new[rows, order[:, 0]] = top_synth
    for r in range(1, idx.shape[1]):
        j = order[:, r]
        score = (c_pool - c_base[rows, j][:, None]).abs().masked_fill(used, torch.inf)
        k = score.argmin(-1)
        act = active[rows, j]
        new[rows[act], j[act]] = alive[k[act]]
        used[rows[act], k[act]] = True
    return new


def fit_gaussian(x: Tensor, jitter: float = 0.0) -> Gaussian:
    """``N(μ, Σ)`` of the rows of ``x (N, D)``: biased covariance, projected to PSD, plus ``jitter·I``."""
    if x.shape[0] < 2:
        raise ValueError(f"plateaus: need at least 2 activations to fit N(μ, Σ) (got {x.shape[0]})")
    xd = x.double()
    mu = xd.mean(0)
    c = xd - mu
    cov = c.T @ c / x.shape[0]
    evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)
    clamped = evals.clamp_min(0) + jitter
    scale = evecs * clamped.sqrt()
    return Gaussian(mu.to(x.dtype), scale.to(x.dtype), x.shape[0], int((evals < 0).sum()), float(evals.min()))


def sample_gaussian(g: Gaussian, n: int, seed: int, key: str) -> Tensor:
    """``n`` samples ``(n, D)`` of :class:`Gaussian` ``g``, from the CPU generator ``(seed, key)``."""
    z = torch.randn(n, g.mean.shape[0], generator=generator(seed, key)).to(g.scale)
    return g.mean + z @ g.scale.T


def sample_other(
    pool: Tensor, base_idx: Tensor, seed: int, key: str, min_dist: float = 1e-3, tries: int = 100
) -> Tensor:
    """``(M,)`` random rows of ``pool (P, D)``, redrawn where ``‖pool[t] − pool[base_idx]‖ ≤ min_dist`` (draft code)."""
    gen = generator(seed, key)
    t = torch.randint(pool.shape[0], base_idx.shape, generator=gen)
    for _ in range(tries):
        close = ((pool[t] - pool[base_idx]).norm(dim=-1) <= min_dist).cpu()
        if not close.any():
            return t
        t[close] = torch.randint(pool.shape[0], (int(close.sum()),), generator=gen)
    raise ValueError(f"plateaus: found no real activation farther than {min_dist} from some base after {tries} draws")


def estimate_target_cos(pool: Tensor, b_dec: Tensor, seed: int, max_rows: int = 4096) -> float:
    """Mean ``cos(a_i − b_dec, a_j − b_dec)`` over pairs ``i ≠ j`` of real activations (the paper's 0.42, §4.3)."""
    if pool.shape[0] > max_rows:
        pool = pool[torch.randperm(pool.shape[0], generator=generator(seed, "target_cos"))[:max_rows]]
    u = F.normalize((pool - b_dec.detach().to(pool)).double(), dim=-1)
    n = u.shape[0]
    if n < 2:
        raise ValueError("plateaus: need at least 2 activations to estimate the target cosine")
    s = u.sum(0)
    return float((s @ s - (u * u).sum()) / (n * (n - 1)))


class Targets(NamedTuple):
    """Bases and targets of one benchmark run (``M`` perturbations each).

    Attributes:
        base_idx: ``(M,)`` the prompt (row of the pool) of each perturbation; its activation is the base ``A``.
        targets: ``{type: (M, D)}`` for every type of :data:`TARGET_TYPES`.
        plateau_bases: ``{type: (M, D)}`` for :data:`PLATEAU_BASES`; plateau_target: ``(M, D)`` random targets.
        info: diagnostics (target cosine, latents, Gaussian, mean distances), JSON-serialisable.
    """

    base_idx: Tensor
    targets: dict[str, Tensor]
    plateau_bases: dict[str, Tensor]
    plateau_target: Tensor
    info: dict


@torch.no_grad()
def build_targets(
    sae: SparseAutoencoder,
    pool: Tensor,
    recon: Tensor,
    code: SparseCode,
    density: LatentDensity,
    n: int,
    seed: int,
    *,
    baseline_neighbours: int = 10,
    structured_neighbours: int = 100,
    target_cos: float | str = 0.42,
    cov_jitter: float = 0.0,
) -> Targets:
    """Every target of ``n`` bases drawn from ``pool (P, D)`` (real activations; ``recon (P, D)`` their SAE
    reconstructions, ``code`` their codes): a seeded permutation of the pool, repeated if ``n > P``."""
    P = pool.shape[0]
    base_idx = torch.cat([torch.randperm(P, generator=generator(seed, "bases", r)) for r in range(-(-n // P))])[:n]
    A = pool[base_idx]
    code = SparseCode(code.idx[base_idx], code.vals[base_idx])
    gauss = fit_gaussian(pool.float(), cov_jitter)
    est_cos = estimate_target_cos(pool.float(), sae.b_dec, seed)
    cos = est_cos if target_cos == "estimate" else float(target_cos)
    nb_struct = sparsity_neighbours(density, structured_neighbours, seed)
    other = sample_other(pool, base_idx, seed, "model_generated")
    structured = synthetic_structured(code, sae.W_dec, density, nb_struct, cos, seed)
    codes = {
        "synthetic_random": synthetic_random(code, density, seed),
        "synthetic_baseline": synthetic_baseline(code, sparsity_neighbours(density, baseline_neighbours, seed), seed),
        "synthetic_structured": structured.code,
        "synthetic_structured_no_cos": synthetic_structured(code, sae.W_dec, density, nb_struct, None, seed).code,
    }
    targets = {
        "model_generated": pool[other],
        "random": sample_gaussian(gauss, n, seed, "random").to(A),
        "sae_reconstruction": recon[other].to(A),
        **{k: decode(sae, c, like=A).to(A) for k, c in codes.items()},
    }
    info = {
        "target_cos": {
            "option": target_cos,
            "used": cos,
            "estimated": est_cos,
            "achieved_mean": float(structured.top_cos.mean()),
            "achieved_abs_error_mean": float((structured.top_cos - cos).abs().mean()),
        },
        "latents": {
            "n_alive": int(density.alive.sum()),
            "density_tokens": density.n_tokens,
            "mean_l0_base": float((code.vals != 0).sum(-1).float().mean()),
        },
        "gaussian": {"n_rows": gauss.n_rows, "n_clamped_eigenvalues": gauss.n_clamped, "min_eigenvalue": gauss.min_eig},
        "mean_distance": {k: float((t - A).norm(dim=-1).mean()) for k, t in targets.items()},
        "mean_base_norm": float(A.norm(dim=-1).mean()),
    }
    plateau_bases = {k: A if k == "model_generated" else targets[k] for k in PLATEAU_BASES}
    plateau_target = sample_gaussian(gauss, n, seed, "plateau_target").to(A)
    return Targets(base_idx, targets, plateau_bases, plateau_target, info)
