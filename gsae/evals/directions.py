"""Perturbation directions for the sensitive-directions benchmark (SPEC §3.2, Lee & Heimersheim 2024).

Reference statistics come from the evaluation activations at the hook, position 0 excluded
(``remove_first_token=True`` in ``dajale423/error_pathology``): the mean ``μ``, the covariance
``Σ = cov(A) + 0.01·I`` (their ``cov += diag(diag(cov)).bool().float()*0.01``; adding ``0.01`` to every
diagonal entry also keeps zero-variance dimensions positive definite), the median activation norm, and a
pool of real activations. One unit direction ``u`` is drawn per token (``x' = x + L·u``):

=========================  =====================================================================
``isotropic``              ``u ∝ s·g − x``, ``g ~ N(0, I)``, ``s`` = median ``‖x‖`` (their 121 at L6)
``cov_random_difference``  ``u ∝ t − x``, ``t ~ N(μ, Σ)``
``cov_random_mixture``     ``u ∝ v₁ − v₂``, ``v₁, v₂ ~ N(μ, Σ)`` iid — no ``−x`` term
``real_difference``        ``u ∝ a − x``, ``a`` a random real activation (position > 0; redrawn where ``a = x``)
``real_mixture``           ``u ∝ a_i − a_j``, two random real activations (zero differences redrawn)
``sae_error``              ``u ∝ SAE(x) − x`` (0 where the SAE is exact)
``sae_feature_alive``      ``u = W_dec[i]/‖W_dec[i]‖``, ``i`` active on some eval token, inactive in the pool block
``sae_feature_active``     ``i`` active somewhere in the sequence's pool block
``sae_feature_dead``       ``i`` never active on the eval tokens
=========================  =====================================================================

The feature pools are per *pool block* of ``pool_seqs`` consecutive sequences (Lee & Heimersheim's batches
of 64), kept apart from the memory batch (``batch_size``). Every draw uses its own CPU generator seeded from
``(seed, sequence index, kind)``, so a kind's directions depend neither on which other kinds are requested,
nor on the device, nor on ``batch_size``.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from gsae.evals.common import batches, harvest, sae_on_tokens
from gsae.lm import LanguageModel
from gsae.sae.base import SparseAutoencoder

FEATURE_POOLS = {"sae_feature_alive": "alive", "sae_feature_active": "active", "sae_feature_dead": "dead"}
DIRECTION_TYPES = (
    "isotropic",
    "cov_random_difference",
    "cov_random_mixture",
    "real_difference",
    "real_mixture",
    "sae_error",
    *FEATURE_POOLS,
)
#: The direction types drawn from the activations alone (no SAE): the same for every SAE of equal activations.
ACTIVATION_TYPES = ("isotropic", "cov_random_difference", "cov_random_mixture", "real_difference", "real_mixture")
#: Substitution kinds (SPEC §3.2 ``error_eval.py``): name -> the direction type ``u`` of ``x + ε·u``.
EPS_BASELINES = {"eps_isotropic": None, "eps_cov_mixture": "cov_random_mixture", "eps_real_mixture": "real_mixture"}
#: Added to the diagonal of the covariance (Lee & Heimersheim's code).
COV_DIAGONAL = 0.01


class ActivationStats(NamedTuple):
    """Reference statistics of the evaluation activations at the hook (position 0 excluded).

    Attributes:
        mean: ``(D,)`` mean ``μ``.
        cov: ``(D, D)`` covariance ``Σ`` (unbiased) with ``COV_DIAGONAL`` added to the diagonal.
        chol: ``(D, D)`` lower Cholesky factor of ``cov`` (the sampler: ``μ + z Lᵀ``).
        median_norm: median ``‖x‖`` (scale of the ``isotropic`` target).
        real: ``(N_pool, D)`` real activations (all rows, or a seeded subset of ``max_real_pool``).
        n_rows: number of activations the statistics are over.
        fired: bool ``(d_sae,)``, latents active on some eval token; ``None`` when not computed.
    """

    mean: Tensor
    cov: Tensor
    chol: Tensor
    median_norm: float
    real: Tensor
    n_rows: int
    fired: Tensor | None


def generator(seed: int, *key: object) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and a key (stable across processes, unlike ``hash``)."""
    return torch.Generator().manual_seed(zlib.crc32(repr((seed, *key)).encode()))


class BatchActs(NamedTuple):
    """One batch of evaluation sequences at the hook.

    Attributes:
        tokens: ``(B, T)`` tokens.
        x: ``(B, T, D)`` activations.
        x_hat: ``(B, T, D)`` SAE reconstruction, or ``None`` when the SAE was not run.
        fired: bool ``(B, d_sae)``, latents active somewhere in each sequence, or ``None``.
    """

    tokens: Tensor
    x: Tensor
    x_hat: Tensor | None
    fired: Tensor | None


@torch.no_grad()
def batch_acts(
    sae: SparseAutoencoder, lm: LanguageModel, hook: str, tokens: Tensor, batch_size: int, with_sae: bool = True
) -> Iterator[BatchActs]:
    """:class:`BatchActs` of consecutive batches of ``tokens (n_seq, T)``; only the layers before the hook
    run, plus the SAE (with ``∇ₓL`` for g-SAEs) when ``with_sae``."""
    for tok in batches(tokens.to(lm.device), batch_size):
        if not with_sae:
            yield BatchActs(tok, harvest(lm, hook, tok)[0], None, None)
            continue
        r = sae_on_tokens(sae, lm, hook, tok)
        yield BatchActs(tok, r.x, r.x_hat, fired_per_sequence(r.out, tok.shape[0], sae.d_sae))


def fired_per_sequence(out, n_seq: int, d_sae: int) -> Tensor:
    """Bool ``(n_seq, d_sae)``: latents nonzero somewhere in each sequence of an SAE output on ``n_seq`` sequences."""
    if out.latents is not None:
        return (out.latents.reshape(n_seq, -1, d_sae) != 0).any(1)
    idx = out.top_idx.reshape(n_seq, -1)
    fired = torch.zeros(n_seq, d_sae + 1, dtype=torch.bool, device=idx.device)
    live = out.top_acts.reshape(n_seq, -1) != 0
    return fired.scatter_(1, torch.where(live, idx, d_sae), True)[:, :d_sae]


@torch.no_grad()
def fit_activation_stats(acts: Iterable[BatchActs], *, max_real_pool: int, seed: int) -> ActivationStats:
    """:class:`ActivationStats` of the activations at positions > 0 of ``acts`` (one pass).

    The real pool keeps the ``max_real_pool`` rows with the smallest seeded random keys (a uniform
    subset, independent of the batching); ``fired`` is the union of the batches' (``None`` if absent).
    """
    s1 = s2 = shift = fired = pool = keys = None
    norms, n, gen = [], 0, generator(seed, "real_pool")
    for b in acts:
        a = b.x[:, 1:].reshape(-1, b.x.shape[-1]).float()  # (B·(T−1), D)
        if shift is None:  # centre on the first batch's mean: float32 products without cancellation
            shift = a.mean(0)
            s1 = torch.zeros_like(shift, dtype=torch.float64)
            s2 = torch.zeros(a.shape[1], a.shape[1], dtype=torch.float64, device=a.device)
            pool, keys = a[:0], torch.empty(0)
        c = a - shift
        s1 += c.sum(0).double()
        s2 += (c.T @ c).double()
        n += a.shape[0]
        norms.append(a.norm(dim=-1).cpu())
        keys = torch.cat([keys, torch.rand(a.shape[0], generator=gen)])
        pool = torch.cat([pool, a])
        if keys.shape[0] > max_real_pool:
            keep = keys.topk(max_real_pool, largest=False).indices
            keys, pool = keys[keep], pool[keep.to(pool.device)]
        if b.fired is not None:
            f = b.fired.any(0)
            fired = f if fired is None else fired | f
    if n < 2:
        raise ValueError("sensitive_directions: need at least 2 activations at positions > 0 for μ and Σ")
    mean_c = s1 / n
    cov = (s2 - n * torch.outer(mean_c, mean_c)) / (n - 1)
    cov += COV_DIAGONAL * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    dtype = torch.promote_types(b.x.dtype, torch.float32)  # a bfloat16 Σ would be too coarse to sample
    return ActivationStats(
        mean=(mean_c + shift.double()).to(dtype),
        cov=cov.to(dtype),
        chol=torch.linalg.cholesky(cov).to(dtype),
        median_norm=float(torch.cat(norms).median()),
        real=pool.to(dtype),
        n_rows=n,
        fired=fired,
    )


def unit(v: Tensor) -> Tensor:
    """``v / ‖v‖`` along the last dim; rows with ``‖v‖ = 0`` stay 0."""
    n = v.norm(dim=-1, keepdim=True)
    return torch.where(n > 0, v / n.clamp_min(torch.finfo(v.dtype).tiny), torch.zeros_like(v))


def sample_cov_random(stats: ActivationStats, n: int, gen: torch.Generator) -> Tensor:
    """``n`` samples ``(n, D)`` of ``N(μ, Σ)``: ``μ + z Lᵀ`` with ``z ~ N(0, I)``."""
    z = torch.randn(n, stats.mean.shape[0], generator=gen).to(stats.chol)
    return stats.mean + z @ stats.chol.T


def sample_real_other(stats: ActivationStats, avoid: Tensor, gen: torch.Generator, max_tries: int = 10) -> Tensor:
    """One random real activation per row of ``avoid (n, D)``, redrawn where it equals that row (a zero
    difference has no direction; Lee & Heimersheim drop the zero rows of ``a − a[perm]``)."""
    m = stats.real.shape[0]
    if m < 2:
        raise ValueError("sensitive_directions: the real-activation pool needs at least 2 rows")
    idx = torch.randint(m, (avoid.shape[0],), generator=gen)
    for _ in range(max_tries):
        same = (stats.real[idx] == avoid).all(-1).cpu()
        if not same.any():
            break
        idx[same] = torch.randint(m, (int(same.sum()),), generator=gen)
    return stats.real[idx]


def feature_pools(stats: ActivationStats, fired_block: Tensor) -> dict[str, Tensor]:
    """Latent ids of each pool (SPEC §3.2) for a pool block whose fired mask is ``fired_block (d_sae,)``
    (or ``(B, d_sae)`` per sequence, OR-ed): alive-but-inactive in the block, active in the block, dead."""
    fired_block = fired_block.any(0) if fired_block.dim() == 2 else fired_block
    alive = stats.fired.to(fired_block.device)
    masks = {"alive": alive & ~fired_block, "active": fired_block, "dead": ~alive}
    return {k: m.nonzero().squeeze(-1) for k, m in masks.items()}


def make_direction(
    kind: str,
    x: Tensor,
    gen: torch.Generator,
    stats: ActivationStats,
    x_hat: Tensor | None = None,
    W_dec: Tensor | None = None,
    pool: Tensor | None = None,
) -> Tensor:
    """Unit directions ``(B, T, D)`` of type ``kind`` (module table), one per token of ``x (B, T, D)``.

    ``x_hat`` is needed for ``sae_error``; ``W_dec (d_sae, D)`` and a non-empty ``pool`` of latent ids
    for the ``sae_feature_*`` kinds.
    """
    shape, n = x.shape, x.shape[0] * x.shape[1]
    flat = x.reshape(n, -1)
    if kind == "isotropic":
        g = torch.randn(n, shape[-1], generator=gen).to(stats.mean)
        u = unit(stats.median_norm * g - flat)
    elif kind == "cov_random_difference":
        u = unit(sample_cov_random(stats, n, gen) - flat)
    elif kind == "cov_random_mixture":
        u = unit(sample_cov_random(stats, n, gen) - sample_cov_random(stats, n, gen))
    elif kind == "real_difference":
        u = unit(sample_real_other(stats, flat, gen) - flat)
    elif kind == "real_mixture":
        a_i = stats.real[torch.randint(stats.real.shape[0], (n,), generator=gen)]
        u = unit(a_i - sample_real_other(stats, a_i, gen))
    elif kind == "sae_error":
        u = unit(x_hat.reshape(n, -1) - flat)
    elif kind in FEATURE_POOLS:
        ids = pool[torch.randint(pool.shape[0], (n,), generator=gen).to(pool.device)]
        u = unit(W_dec.detach()[ids].to(stats.mean))
    else:
        raise ValueError(
            f"sensitive_directions: unknown direction type {kind!r}; choose from {', '.join(DIRECTION_TYPES)}"
        )
    return u.reshape(shape).to(x.dtype)


def batch_deltas(
    kinds: list[str],
    b: BatchActs,
    stats: ActivationStats,
    W_dec: Tensor,
    perturb: Tensor,
    *,
    seed: int,
    first_seq: int,
    block_fired: dict[int, Tensor] | None = None,
    pool_seqs: int = 64,
    substitution: bool,
    keep: Tensor | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The perturbations of one memory batch, and per feature kind which sequences had a non-empty pool.

    Only the first ``t_run = len(perturb)`` positions are built; positions where the bool ``perturb`` is
    False get 0.

    Returns ``({name: (B, t_run, D)}, {feature kind: bool (B,)})``: the unit directions ``u`` of ``kinds``
    (scaled by the lengths later) and, with ``substitution``, ``SAE(x) − x`` (``sae``) and ``ε·u`` for each of
    :data:`EPS_BASELINES`, zero where ``keep (B, t_run)`` is False (special tokens: unpatched, as loss_added).
    Sequence ``first_seq + i`` draws from ``generator(seed, first_seq + i, kind)``; its feature pools come
    from ``block_fired[(first_seq + i) // pool_seqs]``. ``b`` needs ``x_hat`` (and ``fired`` for the feature kinds).
    """
    t_run = perturb.shape[0]
    x, x_hat = b.x[:, :t_run], b.x_hat[:, :t_run]
    B = x.shape[0]
    pools = {}
    if any(k in FEATURE_POOLS for k in kinds):
        blocks = {(first_seq + i) // pool_seqs for i in range(B)}
        pools = {blk: feature_pools(stats, block_fired[blk]) for blk in blocks}
    cache: dict[str, Tensor] = {}
    has_pool: dict[str, Tensor] = {}

    def direction(kind: str) -> Tensor:
        if kind in cache:
            return cache[kind]
        rows, ok = [], torch.ones(B, dtype=torch.bool)
        for i in range(B):
            pool = pools[(first_seq + i) // pool_seqs].get(FEATURE_POOLS[kind]) if kind in FEATURE_POOLS else None
            if pool is not None and pool.numel() == 0:
                rows.append(torch.zeros_like(x[i : i + 1]))
                ok[i] = False
                continue
            gen = generator(seed, first_seq + i, kind)
            rows.append(make_direction(kind, x[i : i + 1], gen, stats, x_hat[i : i + 1], W_dec, pool))
        cache[kind] = torch.cat(rows)
        if kind in FEATURE_POOLS:
            has_pool[kind] = ok
        return cache[kind]

    out = {kind: direction(kind) for kind in kinds}
    if substitution:
        eps = (x_hat - x).norm(dim=-1, keepdim=True)  # (B, t, 1)
        sub_mask = torch.ones_like(eps) if keep is None else keep[:, :t_run, None].to(eps)
        out["sae"] = (x_hat - x) * sub_mask
        g = torch.cat([torch.randn(x[i].shape, generator=generator(seed, first_seq + i, "eps_isotropic")) for i in range(B)])
        out["eps_isotropic"] = eps * unit(g.reshape(x.shape).to(x)) * sub_mask
        for name, kind in EPS_BASELINES.items():
            if kind is not None:
                out[name] = eps * direction(kind) * sub_mask
    mask = perturb.to(x.device)[None, :, None]
    return {k: v * mask for k, v in out.items()}, {k: v for k, v in has_pool.items() if k in kinds}
