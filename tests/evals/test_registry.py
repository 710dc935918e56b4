"""The benchmark registry and the shared runner: names, option routing, eval mode, g-SAEs, inference mode."""

from __future__ import annotations

import json

import pytest
import torch

from gsae.evals import BENCHMARKS, OPT_IN, check_benchmarks, run_benchmark, run_benchmarks, scalars, tagged_scalars
from gsae.sae import GradTopKSAE
from tests.evals.helpers import HOOK, build_tokens, build_topk

CHEAP = ["loss_added", "dead_latents", "decoder_geometry"]


def test_registry_names_every_benchmark():
    assert list(BENCHMARKS) == [
        "loss_added", "dead_latents", "steering", "sensitive_directions", "decoder_geometry", "plateaus", "latents"
    ]
    assert OPT_IN == {"plateaus"}  # evaluate.py runs it only when named
    for name in CHEAP + ["steering", "plateaus"]:
        assert callable(BENCHMARKS[name].run) and callable(BENCHMARKS[name].figures)
    with pytest.raises(ValueError, match="--benchmarks: unknown benchmark"):
        check_benchmarks(["loss_added", "nope"])


def test_option_bounds_name_real_options_and_hold_the_defaults():
    """Every benchmark's ``OPTION_BOUNDS`` names options its ``run`` takes, reads as a bound, and accepts the default
    (a bound that rejects the default, or names a renamed option, would be a silent mistake)."""
    import inspect

    from gsae.evals import _breaks

    for name, module in BENCHMARKS.items():
        params = inspect.signature(module.run).parameters
        for key, bounds in module.OPTION_BOUNDS.items():
            assert key in params and params[key].kind is params[key].KEYWORD_ONLY, (name, key)
            default = params[key].default
            for bound in (bounds,) if isinstance(bounds, str) else bounds:
                assert not _breaks(default, bound), (name, key, default, bound)
    assert _breaks(0, "> 0") and not _breaks(1, "> 0") and _breaks(0.6, "in (0, 0.5]") and not _breaks(0.5, "in (0, 0.5]")
    assert _breaks([], "non-empty") and _breaks([1, -1], "each >= 0") and not _breaks(None, "> 0")
    assert not _breaks("auto", "> 0")  # a choice such as step_size "auto" is not a number to bound
    with pytest.raises(ValueError, match="cannot read"):
        _breaks(1, "positive")


def test_options_go_only_where_accepted(tiny_lm):
    r = run_benchmark("loss_added", build_topk(), tiny_lm, HOOK, build_tokens(2, 16), batch_size=1, n_latents=5)
    assert r["n_tokens"] == 30


def test_gsae_runs_through_every_cheap_benchmark_deterministically(tiny_lm):
    sae = GradTopKSAE(64, 128, 8, beta=1e3)
    sae.train()
    toks = build_tokens(4, 16)
    a = run_benchmarks(CHEAP, sae, tiny_lm, HOOK, toks, seed=0, batch_size=2)
    b = run_benchmarks(CHEAP, sae, tiny_lm, HOOK, toks, seed=0, batch_size=2)
    assert a == b and sae.training  # training mode restored
    json.dumps(a)  # JSON-serialisable
    tags = tagged_scalars(a)
    assert "eval/loss_added/L_added" in tags
    # settings restated in the results (window sizes, token counts) are not curves; they stay in the result
    assert "eval/dead_latents/batch_tokens" not in tags and "eval/loss_added/n_tokens" not in tags
    assert "batch_tokens" in scalars(a["dead_latents"]) and "eval/dead_latents/dead_fraction_tokens" in tags
    assert all(isinstance(v, float) for v in scalars(a["dead_latents"]).values())


def test_one_alive_and_one_median_density_curve(tiny_lm):
    """``dead_latents`` measures the alive latents and the median density on its window of tokens; steering's and the
    dashboards' counts on their own contexts (and the dashboards' median over the latents shown) stay in the JSON:
    as curves of the same names they disagreed with it at every checkpoint."""
    res = run_benchmarks(["dead_latents", "steering", "latents"], build_topk(), tiny_lm, HOOK, build_tokens(4, 16),
                         seed=0, batch_size=2, options={"steering": {"n_latents": 2, "n_positions": 2},
                                                        "latents": {"n_latents": 2, "n_contexts": 2}})
    tags = tagged_scalars(res)
    alive = {t.rsplit("/", 1)[1] for t in tags if "alive" in t or "median_density" in t}
    assert alive == {"alive_fraction", "median_density", "median_density_alive", "shown_median_density"}, sorted(alive)
    assert "eval/latents/shown_median_density" in tags  # a name of its own: the median over the latents shown
    assert {"n_alive", "alive_fraction"} <= set(res["steering"]) and {"n_alive", "shown_median_density"} <= set(res["latents"])


def test_runs_inside_inference_mode(tiny_lm):
    """Lightning may checkpoint from validation (inference mode); g-SAE encoding needs ∇ₓL anyway."""
    with torch.inference_mode():
        r = run_benchmarks(["loss_added"], GradTopKSAE(64, 128, 8), tiny_lm, HOOK, build_tokens(2, 16))
    assert r["loss_added"]["l0"] == 8.0


def test_every_default_benchmark_draws_figures(tiny_lm):
    """The callback promises TensorBoard figures for each default benchmark (a result's own ``skipped`` field,
    as sensitive_directions' empty feature pools, must not hide them)."""
    from gsae.callbacks.evaluation import DEFAULT_BENCHMARKS
    from gsae.evals import is_skipped, tagged_figures

    opts = {
        "dead_latents": {"batch_tokens": 20},
        "steering": {"n_latents": 2, "n_positions": 1, "alphas": [0, 50]},
        "sensitive_directions": {"lengths": [1.0, 5.0], "direction_types": ["isotropic", "sae_feature_dead"]},
        "decoder_geometry": {"n_per_bin": 2},
    }
    res = run_benchmarks(list(DEFAULT_BENCHMARKS), build_topk(), tiny_lm, HOOK, build_tokens(4, 16), options=opts)
    assert not any(is_skipped(r) for r in res.values())
    drawn = {tag.split("/")[1] for tag in tagged_figures(res)}
    assert drawn == set(DEFAULT_BENCHMARKS)


def test_an_open_interval_bound_refuses_its_open_end():
    from gsae.evals import check_options

    check_options({"decoder_geometry": {"tail_quantile": 0.5}}, "--options")  # closed end: fine
    with pytest.raises(ValueError, match=r"--options.decoder_geometry.tail_quantile must be in \(0, 0.5\] \(got 0.0\)"):
        check_options({"decoder_geometry": {"tail_quantile": 0.0}}, "--options")
