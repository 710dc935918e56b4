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
        tokens = build_tokens(2, 16) + 0  # made in inference mode too (an inference tensor)
        assert tokens.is_inference()
        again = run_benchmarks(["loss_added"], GradTopKSAE(64, 128, 8), tiny_lm, HOOK, tokens)
    assert r["loss_added"]["l0"] == 8.0 and again == r


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


def test_held_out_counts_by_hand():
    """The contexts each benchmark reads and the contexts read in all (:func:`held_out_counts`), against counts by hand:
    a given ``n_seqs`` caps every benchmark's own count and is what is read; without one, each its own or 64, and
    ``dead_latents`` without one its window: ``⌈dead_batches × batch_tokens / (T − 1) × 1.25⌉`` contexts read."""
    from gsae.evals import held_out_counts

    names = ["loss_added", "dead_latents", "steering"]
    opts = {"loss_added": {"n_seqs": 3}, "steering": {"n_seqs": 50}}
    assert held_out_counts(names, 10, opts, 16) == (10, {"loss_added": 3, "dead_latents": 10, "steering": 10})
    assert held_out_counts(["loss_added"], 10, opts, 16) == (10, {"loss_added": 3})  # read n_seqs, not the count
    n, counts = held_out_counts(names, None, opts, 17)
    assert counts == {"loss_added": 3, "dead_latents": None, "steering": 50}
    assert n == 1600  # 5 × 4096 / 16 = 1280, × 1.25
    window = {"dead_latents": {"dead_batches": 2, "batch_tokens": 30}}
    assert held_out_counts(["dead_latents"], None, window, 16) == (5, {"dead_latents": None})  # 60 / 15 × 1.25
    assert held_out_counts(["dead_latents", "loss_added"], None, window, 16) == (64, {"dead_latents": None,
                                                                                    "loss_added": 64})
    assert held_out_counts(["dead_latents"], None, {"dead_latents": {"n_seqs": 7}}, 16) == (7, {"dead_latents": 7})


def test_tokens_per_benchmark_gives_each_its_first_contexts_and_dead_latents_its_window(tiny_lm):
    """``dead_latents``' window (``None``) holds ``dead_batches × batch_tokens`` counted tokens with its own options
    (here 36 tokens: 5 contexts of 8 without the BOS, 4 of 9 with it); the others their first ``n`` contexts."""
    from gsae.evals import tokens_per_benchmark

    toks = build_tokens(10, 9)  # BOS, then 8 non-special tokens each
    window = {"dead_batches": 2, "batch_tokens": 18}
    per = tokens_per_benchmark({"loss_added": 3, "dead_latents": None}, toks, tiny_lm, {"dead_latents": window})
    assert torch.equal(per["loss_added"], toks[:3]) and torch.equal(per["dead_latents"], toks[:5])
    per = tokens_per_benchmark({"dead_latents": None}, toks, tiny_lm,
                               {"dead_latents": {**window, "exclude_special_tokens": False, "n_seqs": 99}})
    assert torch.equal(per["dead_latents"], toks[:4])


def test_check_options_refuses_in_one_line_what_a_benchmarks_run_would_not_take():
    """Each refusal names the option (unknown names, the positional arguments and ``seed``, wrong types against
    ``run``'s annotations, ``n_seqs`` ≤ 0, values out of ``OPTION_BOUNDS``), and the right values pass."""
    from gsae.evals import check_options

    check_options({"steering": {"alphas": [0, 2.5], "alpha_report": 3, "mode": "all", "n_seqs": 1},
                   "sensitive_directions": {"lengths": [1, 2.5], "sweep_seqs": None, "position": 0},
                   "dead_latents": {"window_tokens": None, "activity_test": "sum_positive"}},
                  "--o", extra={"n_seqs": int})
    bad = [
        ({"loss_added": "fast"}, r"--o.loss_added: expected a mapping of options, got 'fast'"),
        ({"loss_added": {"hook": "x"}}, r"--o.loss_added: unknown option 'hook'"),
        ({"loss_added": {"tokens": [1]}}, r"--o.loss_added: unknown option 'tokens'"),
        ({"loss_added": {"seed": 1}}, r"--o.loss_added: unknown option 'seed'"),
        ({"loss_added": {"batch_size": "8"}}, r"--o.loss_added.batch_size: expected int, got '8'"),
        ({"loss_added": {"batch_size": True}}, r"--o.loss_added.batch_size: expected int, got True"),
        ({"loss_added": {"batch_size": 0}}, r"--o.loss_added.batch_size must be > 0 \(got 0\)"),
        ({"loss_added": {"n_seqs": 0}}, r"--o.loss_added.n_seqs must be > 0 \(got 0\)"),
        ({"steering": {"mode": "every"}}, r"--o.steering.mode: expected 'position' or 'all', got 'every'"),
        ({"steering": {"alphas": [1.0, "x"]}}, r"--o.steering.alphas: expected"),
        ({"sensitive_directions": {"lengths": 5.0}}, r"--o.sensitive_directions.lengths: expected"),
        ({"sensitive_directions": {"lengths": [1.0, -1.0]}},
         r"--o.sensitive_directions.lengths must have every value > 0 \(got \[1.0, -1.0\]\)"),
        ({"sensitive_directions": {"lengths": []}}, r"--o.sensitive_directions.lengths must be non-empty"),
    ]
    for options, message in bad:
        with pytest.raises(ValueError, match=message):
            check_options(options, "--o", extra={"n_seqs": int})


def test_bounds_at_their_ends():
    from gsae.evals import _breaks

    assert not _breaks(0, ">= 0") and _breaks(-1e-9, ">= 0")
    assert _breaks(0, "< 0") and not _breaks(-0.5, "< 0") and not _breaks(1, "<= 1") and _breaks(1.5, "<= 1")
    assert not _breaks(-1, "in [-1, 1)") and _breaks(1, "in [-1, 1)") and not _breaks(0.99, "in [-1, 1)")
    assert not _breaks([1.0], "non-empty") and not _breaks((2,), "each > 0") and _breaks((2, 0), "each > 0")


def test_a_registered_module_that_is_missing_is_one_line_but_a_missing_dependency_is_not_hidden(monkeypatch):
    from gsae import evals

    monkeypatch.setitem(evals._MODULES, "ghost", "tests.evals.no_such_benchmark")
    with pytest.raises(ValueError, match="benchmark 'ghost' is not available \\(module tests.evals.no_such_benchmark"):
        evals.BENCHMARKS["ghost"]
    monkeypatch.setitem(evals._MODULES, "ghost", "no_such_package.benchmark")  # its package missing: not this module
    with pytest.raises(ModuleNotFoundError):
        evals.BENCHMARKS["ghost"]
    with pytest.raises(KeyError):
        evals.BENCHMARKS["never_registered"]


def test_output_helpers():
    """Strict JSON (a non-finite float, in a dict, list or tuple, is ``null``), the top-level numbers of a result
    (not booleans), failures and skips, the texts' tags, the about line, and merge_parts' first failure."""
    from gsae.evals import about_sae, failure, is_skipped, json_text, merge_parts
    from gsae.sae import TopKSAE

    text = json_text({"a": float("inf"), "b": (1.0, float("nan")), "c": [float("-inf"), 2], "d": {"e": float("nan")}})
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": [None, 2], "d": {"e": None}}
    assert scalars({"a": 1, "b": 2.5, "flag": True, "curve": [1.0], "name": "x"}) == {"a": 1.0, "b": 2.5}
    assert failure({"failed": "RuntimeError: x"}) == "RuntimeError: x" and failure({"failed": 0}) is None
    assert not is_skipped({"failed": 0, "skipped": ["pool"]}) and is_skipped({"skipped": "hook_z"})
    assert about_sae(GradTopKSAE(64, 128, 8, beta=1e4), "run", "", "step 3") == (
        "run · step 3 · GradTopKSAE · d_sae 128 · k 8 · β 1e+04")
    assert about_sae(TopKSAE(64, d_sae=32, k=4), "") == "TopKSAE · d_sae 32 · k 4"
    failed = {"failed": "ValueError: part 1"}
    assert merge_parts("sensitive_directions", [{"kl": 1.0}, failed]) == failed
    # a benchmark not registered (any more) has no settings to leave out: its numbers are tagged, nothing raises
    assert tagged_scalars({"retired": {"x": 1, "n_tokens": 2.0}}, "p") == {"p/retired/x": 1.0, "p/retired/n_tokens": 2.0}


def test_run_options_leave_out_the_held_out_counts():
    """``n_seqs`` is read by :func:`held_out_counts`, not by ``run`` (a ``run(..., **options)`` would receive it)."""
    from gsae.evals import run_options

    assert run_options(["latents", "loss_added"], {"latents": {"n_seqs": 2, "n_latents": 3}, "steering": {"top_n": 1}}) == {
        "latents": {"n_latents": 3}, "loss_added": {}}


def test_skipped_results_have_no_artifacts_or_texts_and_a_suffix_is_written_once(monkeypatch):
    from gsae import evals
    from gsae.evals import artifacts, benchmark_figures, tagged_texts

    monkeypatch.setitem(evals._MODULES, "fake", "tests.evals.fake_benchmark")
    monkeypatch.setitem(evals._MODULES, "fake2", "tests.evals.fake_benchmark")
    ok = {"n_tokens": 3, "hook": "h"}
    assert tagged_texts({"fake": ok}, "p") == {"p/fake/summary": "**3** tokens"}
    assert artifacts({"fake": ok}, "sae") == {".fake.html": "<p>3 tokens at h (sae)</p>"}
    for skipped in ({"skipped": "not here"}, {"failed": "RuntimeError: x"}):
        assert tagged_texts({"fake": skipped}) == {} and artifacts({"fake": skipped}) == {}
        assert benchmark_figures("steering", skipped) == {}
    with pytest.raises(ValueError, match="artifact suffix '.fake.html' is already written"):
        artifacts({"fake": ok, "fake2": ok})
