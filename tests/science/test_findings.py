"""Science regression tests: the direction of the papers' headline findings on the shipped gsae-tiny model.

Each test runs a gsae benchmark (``gsae/evals``) on unseen corpus text, with SAEs trained in the test
through the real ``LocalSAESystem``, and asserts the paper's direction with a one-sided test at p < 0.01
*and* an effect-size floor (see ``tests/science/helpers.py`` and ``docs/science.md``):

(a) Lee & Heimersheim: KL(real / cov-random mixture direction) > KL(isotropic) at every length of the grid;
(b) Gurnee: KL(SAE substitution) > KL(ε-isotropic at the same distance);
(c) Giglemiani et al. App. C.1: KL MS step toward a model-generated activation < toward a random one
    (their L2 MS step headline, Table 1, does not reproduce on gsae-tiny: reported, not asserted);
(d) Olmo et al. Table 1: a g-SAE has fewer dead latents than a TopK SAE (same k, tokens, seeds) — a test of
    the *selection rule*: it holds on random weights too, and shuffled gradients revive even more latents;
(d') the gradient control: a g-SAE fed its true ∇ₓL leaves more latents dead than one fed the gradients of other
    tokens (the learned gradient concentrates the selection), which random weights do not show;
(e) Olmo et al. §4.2: g-SAE latents add more probability to their own logit-lens tokens than TopK latents when
    used as steering vectors, at the paper's α (0.4 of the norm), same k, tokens, seeds and latents; the two SAEs'
    means over their latents are compared context by context (paired Wilcoxon over 32 positions).

Control: ``GSAE_SCIENCE_MODEL=random-small pytest tests/science`` runs the same tests on a random-weight
model of gsae-tiny's shape (comma-separate names to run several); (a), (b), (c), (d') and (e) fail there, (d)
does not (the g-SAE effect on dead latents is a property of the gradient-weighted selection, present on random
weights too; docs/science.md). In (b) and (e) it is the effect floor that fails the control: their paired tests
can reach p < 0.01 on random weights for differences of a few percent.
"""

from __future__ import annotations

import json

import pytest

from tests.science import helpers as h

MODELS = [m.strip() for m in h.MODEL.split(",") if m.strip()]


@pytest.fixture(scope="module", params=MODELS)
def lm(request):
    return h.load_lm(request.param)


@pytest.fixture(scope="module")
def tokens(lm):
    return h.eval_tokens(lm, h.N_GROUPS * h.SEQS_PER_GROUP)


@pytest.fixture(scope="module")
def substitution_sae(lm):
    return h.train_sae(lm, "topk", **h.SUBSTITUTION_SAE)[0]


@pytest.fixture(scope="module")
def dead_saes(lm):
    """A TopK SAE and a g-SAE, identical options, seed, data and step count (g-SAE Table 1 regime)."""
    out = {}
    for kind in ("topk", "gsae"):
        sae, system, _ = h.train_sae(lm, kind, **h.DEAD_SAE)
        out[kind] = sae
        out[f"{kind}_train_dead"] = float(system.dead.dead_by_batches().float().mean())
    return out


@pytest.fixture(scope="module")
def shuffled_gsae(lm):
    """The (d) g-SAE's control: identical, but each token's selection uses another token's gradient."""
    return h.train_sae(lm, "gsae_shuffled", **h.DEAD_SAE)[0]


@pytest.fixture(scope="module")
def steer_saes(lm):
    """A TopK SAE and a g-SAE for steering (256 latents, k 16, 400 steps), identical but for the selection."""
    return {kind: h.train_sae(lm, kind, **h.STEER_SAE)[0] for kind in ("topk", "gsae")}


def _show(d: dict) -> str:
    return json.dumps(d, default=str, indent=None)[:3000]


def test_mixture_directions_are_more_sensitive_than_isotropic(lm, tokens):
    """(a) at every length (5%…100% of the median norm), both mixtures: t-test on per-group log ratios, p < 0.01,
    geometric-mean ratio >= 1.2 (gsae-tiny: 1.5-3.2×; random-small: 0.93-0.99×)."""
    r = h.measure_mixture_vs_isotropic(lm, tokens)
    assert r["median_norm"] > 0
    for m in h.MIXTURES:
        for frac, t in zip(r["length_fractions"], r["tests"][m]):
            assert t["p"] < h.ALPHA and t["geo_mean_ratio"] >= h.FLOOR_MIXTURE_RATIO, (
                f"{lm.name}: KL({m}) / KL(isotropic) at length {frac:.2f}·‖x‖ = {t['geo_mean_ratio']:.3f} "
                f"(p = {t['p']:.2g}, {t['n_greater']}/{t['n']} groups > 1): {_show(r['tests'])}"
            )
    assert r["holds"]


@pytest.mark.slow
def test_sae_substitution_is_worse_than_epsilon_isotropic(lm, tokens, substitution_sae):
    """(b) KL(SAE(x)) / KL(x + ε·g/‖g‖), ε = ‖SAE(x) − x‖: t-test on per-group log ratios, p < 0.01, geometric mean
    >= 1.5 (Gurnee GPT-2: 2.2-4.5×; gsae-tiny ≈ 3.7×; random-small ≈ 1.17×)."""
    r = h.measure_substitution(lm, substitution_sae, tokens)
    t = r["test"]
    assert r["epsilon_mean"] > 0 and r["fvu"] < 0.5, _show(r)  # a real SAE, not an identity nor a broken one
    assert t["p"] < h.ALPHA and t["geo_mean_ratio"] >= h.FLOOR_SUBSTITUTION_RATIO, (
        f"{lm.name}: KL_sae / KL_eps_isotropic = {t['geo_mean_ratio']:.3f} (p = {t['p']:.2g}): {_show(r)}"
    )


@pytest.mark.slow
def test_kl_ms_step_toward_model_generated_comes_before_random(lm):
    """(c) KL MS step (Giglemiani App. C.1: 45.5 vs 58.5): paired Wilcoxon p < 0.01 and mean difference >= 3 steps
    (gsae-tiny ≈ 48 vs 56.5; random-small ≈ 72 vs 73). The L2 MS step (Table 1: 41 vs 52) is not asserted: on
    gsae-tiny it shows no significant difference (≈ 37 vs 39, p ≈ 0.35; docs/science.md)."""
    r = h.measure_plateaus(lm)
    kl = r["kl_ms"]
    assert kl["p"] < h.ALPHA and kl["mean_difference"] >= h.FLOOR_MS_DIFFERENCE, (
        f"{lm.name}: KL MS step model_generated {kl['model_generated']:.2f} vs random {kl['random']:.2f} "
        f"(p = {kl['p']:.2g}): {_show(r)}"
    )
    # the benchmark's own table agrees with the raw per-perturbation steps the test used
    assert kl["table_abs_mean"]["model_generated"] == pytest.approx(kl["model_generated"])
    assert kl["table_abs_mean"]["random"] == pytest.approx(kl["random"])


@pytest.mark.slow
def test_gsae_has_fewer_dead_latents_than_topk(lm, dead_saes):
    """(d) dead = no activation in 5 consecutive batches of 504 unseen tokens: one-sided Fisher exact p < 0.01 and
    dead(g-SAE) / dead(TopK) <= 0.8 (Olmo et al. k = 3..64: 0.73-0.97; gsae-tiny, k = 4: 0.55-0.67 over 3 seeds).

    A test of the selection rule, not of what the model learned: it passes on random-small (0.64) too, and
    (d') shows the true gradients are not what revives the latents."""
    r = h.measure_dead_latents(
        lm,
        dead_saes["topk"],
        dead_saes["gsae"],
        train_dead={k: dead_saes[f"{k}_train_dead"] for k in ("topk", "gsae")},
    )
    assert r["dead_fraction"]["topk"] > 0.05, _show(r)  # the regime has dead latents to compare
    assert r["p"] < h.ALPHA and r["ratio"] <= h.FLOOR_DEAD_RATIO, (
        f"{lm.name}: dead fraction g-SAE {r['dead_fraction']['gsae']:.3f} vs TopK {r['dead_fraction']['topk']:.3f} "
        f"(p = {r['p']:.2g}): {_show(r)}"
    )


@pytest.mark.slow
def test_true_gradients_leave_more_latents_dead_than_shuffled(lm, dead_saes, shuffled_gsae):
    """(d') g-SAE with true ∇ₓL vs the same g-SAE fed other tokens' gradients: one-sided Fisher exact p < 0.01 and
    dead(true) / dead(shuffled) >= 1.4 (gsae-tiny 1.55-1.80 over 3 seeds; random-small 1.06-1.07)."""
    r = h.measure_gradient_control(lm, dead_saes["gsae"], shuffled_gsae)
    assert r["dead_fraction"]["true"] > 0.05, _show(r)
    assert r["p"] < h.ALPHA and r["ratio"] >= h.FLOOR_GRADIENT_DEAD_RATIO, (
        f"{lm.name}: dead fraction g-SAE true ∇ {r['dead_fraction']['true']:.3f} vs shuffled ∇ "
        f"{r['dead_fraction']['shuffled']:.3f} (ratio {r['ratio']:.2f}, p = {r['p']:.2g}): {_show(r)}"
    )


@pytest.mark.slow
def test_gsae_latents_steer_their_tokens_more_than_topk(lm, tokens, steer_saes):
    """(e) on-target added probability at α = 0.4·‖x‖ (the paper's α = 50 at GPT-2 L7) of all 256 latents of each SAE
    at the same 32 positions: one-sided Wilcoxon signed-rank test of the per-position differences of the latent means
    (g-SAE − TopK) p < 0.01, and ratio of the overall means g-SAE / TopK >= 1.2 (paper: > 5; gsae-tiny 1.35-1.40,
    p 2e-6-5e-5 over 3 seeds; random-small 1.00-1.01, which the floor rejects: its paired p reaches 0.002). The
    per-latent median ratio and a Mann-Whitney p over latents are reported (too weak at 256 latents to test on).
    The curve over α is reported; g-SAE must not be below TopK at any α >= the paper's."""
    r = h.measure_steering(lm, steer_saes["topk"], steer_saes["gsae"], tokens)
    assert min(r["n_latents"].values()) >= 200, _show(r)  # (nearly) all latents alive: the same population
    assert r["n_positions"] == h.STEER_OPTIONS["n_positions"], _show(r)
    assert r["per_position_agreement"] < 1e-5, _show(r)  # the per-position values are the benchmark's
    assert r["on_target"]["topk"] > 0, _show(r)  # steering does move the target tokens
    assert r["p"] < h.ALPHA and r["ratio"] >= h.FLOOR_STEER_RATIO, (
        f"{lm.name}: on-target Δp at α = {r['alpha_report']:.2f}: g-SAE {r['on_target']['gsae']:.4f} vs TopK "
        f"{r['on_target']['topk']:.4f} (ratio {r['ratio']:.2f}, median ratio {r['median_ratio']:.2f}, "
        f"g-SAE higher at {r['positions_gsae_greater']}/{r['n_positions']} positions, Wilcoxon p = {r['p']:.2g}): "
        f"{_show(r)}"
    )
    at = [q for f, q in zip(r["alpha_fractions"][1:], r["curve_ratio"]) if f >= h.STEER_ALPHA_FRACTION]
    assert min(at) > 1.0, _show(r)
