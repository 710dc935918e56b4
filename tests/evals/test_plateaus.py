"""Plateaus benchmark (SPEC §4): perturbation schedules, batched curves against a naive loop, end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch
from matplotlib.figure import Figure

from gsae.evals import plateaus as pl
from gsae.metrics import kl_div_per_token
from tests.evals.helpers import HOOK, build_tokens, build_topk

SMALL = dict(n_perturbations=6, prompt_len=6, step_size="auto", ap_threshold="auto")


@pytest.fixture(scope="module")
def tokens():
    return build_tokens(n_seqs=8, context_size=24)  # 3 windows of 6 tokens (and the token after each) → 24 prompts


@pytest.fixture(scope="module")
def sae():
    return build_topk(d_in=64, d_sae=256, k=8)


@pytest.fixture(scope="module")
def result(tiny_lm, sae, tokens):
    return pl.run(sae, tiny_lm, HOOK, tokens, seed=0, **SMALL)


def test_relative_steps_start_at_the_base_and_end_exactly_on_the_target():
    g = torch.Generator().manual_seed(0)
    A, T = torch.randn(5, 16, generator=g) * 7, torch.randn(5, 16, generator=g) * 3
    steps = pl.perturbation_steps(A, T, "relative", step_size=123.0)
    assert steps.shape == (5, 101, 16)
    assert torch.equal(steps[:, 0], A) and torch.equal(steps[:, 100], T)
    torch.testing.assert_close(steps[:, 50], (A + T) / 2)


def test_absolute_steps_move_s_per_step_towards_the_target():
    g = torch.Generator().manual_seed(0)
    A, T = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    steps = pl.perturbation_steps(A, T, "absolute", step_size=0.5)
    assert torch.equal(steps[:, 0], A)
    dist = (steps - A[:, None]).norm(dim=-1)
    torch.testing.assert_close(dist, 0.5 * torch.arange(101.0).expand(3, -1), atol=1e-4, rtol=1e-5)
    u = (T - A) / (T - A).norm(dim=-1, keepdim=True)
    torch.testing.assert_close((steps[:, 7] - A) / 3.5, u, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="schedule"):
        pl.perturbation_steps(A, T, "log", 0.5)


def test_prompt_windows_prefixes_first_each_with_the_token_after_it():
    tok = torch.arange(2 * 25).reshape(2, 25)
    p = pl.prompt_windows(tok, 10, "all")
    assert p.shape == (4, 11)
    assert torch.equal(p[:2], tok[:, :11]) and torch.equal(p[2:], tok[:, 10:21])
    assert torch.equal(pl.prompt_windows(tok, 10, "prefix"), tok[:, :11])
    assert pl.prompt_windows(tok[:, :20], 10, "all").shape == (2, 11)  # the second window has no token after it
    with pytest.raises(ValueError, match="prompt_len must be in \\[2, 24\\]"):
        pl.prompt_windows(tok, 25, "all")


def test_a_g_sae_encodes_the_prompts_with_the_gradient_of_their_next_token_loss(tiny_lm, tokens):
    """A prompt's last position (the perturbed one) predicts the token after the prompt: a g-SAE's code there uses
    ``∇ₓL`` of the prompt's CE with that label. Without it the gradient there is exactly 0 and every g-SAE code was
    its plain TopK code. Reference: TransformerLens's forward with a hook, autograd of the summed CE / normaliser."""
    import torch.nn.functional as F

    from gsae.sae import GradTopKSAE

    sae = GradTopKSAE(64, d_sae=256, k=8, beta=3.0)
    sae.grad_normaliser.fill_(1.0)
    windows = pl.prompt_windows(tokens, 6, "all")
    prompts = pl.encode_prompts(sae, tiny_lm, HOOK, windows, position=5, batch_size=7)
    assert torch.equal(prompts.tokens, windows[:, :6])

    store = {}

    def keep(x, hook):
        x.requires_grad_(True)
        store["x"] = x
        return x

    with torch.enable_grad():
        logits = tiny_lm.model.run_with_hooks(windows, fwd_hooks=[(HOOK, keep)])
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten(), reduction="sum")
        (g,) = torch.autograd.grad(ce, store["x"])
    x, g = store["x"].detach()[:, 5], g[:, 5]
    assert (g.norm(dim=-1) > 0).all()
    torch.testing.assert_close(prompts.x[:, 5], x)
    ref = sae(x, grad=g)
    torch.testing.assert_close(prompts.recon, ref.x_hat, atol=1e-5, rtol=1e-5)  # SAE(T) of the sae_reconstruction targets
    got = torch.zeros(len(x), 256).scatter_(1, prompts.code.idx, prompts.code.vals)
    want = torch.zeros(len(x), 256).scatter_(1, ref.top_idx, ref.top_acts)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    plain = sae(x)  # the TopK code: the g-SAE's must differ somewhere, or this test tests nothing
    assert (torch.sort(ref.top_idx, 1).values != torch.sort(plain.top_idx, 1).values).any(1).float().mean() > 0.2


@pytest.mark.parametrize("forward_tokens", [500, 10])
@pytest.mark.parametrize("hook", [HOOK, "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out"])
def test_batched_curves_match_a_naive_loop(tiny_lm, tokens, hook, forward_tokens):
    """Against one run per step of the whole prompt. ``blocks.1.hook_mlp_out`` is inside a block and off the residual
    stream: the forward needs each prompt's own tokens (their residual stream is added back after the MLP).
    ``forward_tokens=10`` splits the 3 curves into groups of 2 and 1. Curve 1 starts off its prompt's activation, as
    a plateau curve from a synthetic base does: every step is compared with step 0, not with the prompt's own run."""
    prompts = tokens[:3, :6]
    x = tiny_lm.activations(prompts, hook)  # (3, 6, D)
    pos = 4  # not the last: the batched runner cuts the prompt after it
    g = torch.Generator().manual_seed(0)
    target = x[:, pos] + 3 * torch.randn(3, x.shape[-1], generator=g)
    base = x[[2, 0, 1], pos].clone()
    base[1] += 2 * torch.randn(x.shape[-1], generator=g)
    steps = pl.perturbation_steps(base, target, "absolute", 0.05)
    idx = torch.tensor([2, 0, 1])
    tok = prompts if tiny_lm.resume_layer(hook) is None else None
    got = pl.perturbation_curves(tiny_lm, hook, x, idx, steps, pos, tokens=tok, forward_tokens=forward_tokens)
    fin = f"blocks.{tiny_lm.n_layers - 1}.hook_resid_post"
    for m in range(3):
        x0 = x[idx[m]].clone()
        x0[pos] = steps[m, 0]
        clean = tiny_lm.run_from_hook(x0[None], hook, tokens=prompts[idx[m]][None], cache_hooks=[fin])
        for n in (0, 1, 37, 100):
            xp = x[idx[m]].clone()
            xp[pos] = steps[m, n]
            run = tiny_lm.run_from_hook(xp[None], hook, tokens=prompts[idx[m]][None], cache_hooks=[fin])
            l2 = (run.cache[fin][0, pos] - clean.cache[fin][0, pos]).norm()
            kl = kl_div_per_token(clean.logits[0, pos], run.logits[0, pos])
            torch.testing.assert_close(got.l2[m, n], l2, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got.kl[m, n], kl.float(), atol=1e-5, rtol=1e-3)
    assert (got.l2[:, 0] == 0).all() and (got.kl[:, 0] == 0).all()


def test_run_returns_every_table_row(result):
    json.dumps(result)
    types = list(pl.TARGET_TYPES)
    assert result["target_types"] == types and result["schedules"] == ["absolute", "relative"]
    for name in ("ms", "auc", "nl", "kl_ms"):
        table = result["tables"][name]
        assert list(table) == types
        for row in table.values():
            assert set(row) == {f"{s}_{k}" for s in ("abs", "rel") for k in ("mean", "std", "ks")}
        assert table["model_generated"]["abs_ks"] == 0.0 and table["model_generated"]["rel_ks"] == 0.0
    for sch in ("absolute", "relative"):
        for t in types:
            assert len(result["steps"]["ms"][sch][t]) == 6
            assert all(0 <= v <= 99 for v in result["steps"]["ms"][sch][t])
    p = result["plateau"]
    assert list(p["ap_steps"]) == list(pl.PLATEAU_BASES) and p["table"]["model_generated"]["ks"] == 0.0
    assert result["step_size"] == pytest.approx(1.25 * result["mean_distance"]["model_generated"] / 100)
    assert result["n_prompts"] == 24 and result["position"] == 5
    assert -1 <= result["target_cos"]["estimated"] <= 1
    t = result["timings"]
    assert t["n_curves"] == 6 * (2 * 7 + 4) and t["curves_per_second"] > 0
    assert "ms_abs_ks_random" in result and "ap_mean_random" in result


def test_format_table_and_figures(result):
    text = pl.format_table(result)
    for t in pl.TARGET_TYPES:
        assert t in text
    assert "Max slope" in text and "Activation plateau" in text
    figs = pl.figures(result)
    assert set(figs) == {"ms_cdf_absolute", "ms_cdf_relative", "mean_l2_absolute", "mean_l2_relative", "ap_cdf"}
    assert all(isinstance(f, Figure) for f in figs.values())


def test_run_is_deterministic_in_the_seed(tiny_lm, sae, tokens):
    opts = dict(SMALL, n_perturbations=4, schedules=("relative",), plateau=False)
    a = pl.run(sae, tiny_lm, HOOK, tokens, seed=1, **opts)
    b = pl.run(sae, tiny_lm, HOOK, tokens, seed=1, **opts)
    assert a["steps"] == b["steps"] and a["tables"] == b["tables"] and a["mean_curves"] == b["mean_curves"]
    c = pl.run(sae, tiny_lm, HOOK, tokens, seed=2, **opts)
    assert c["mean_curves"] != a["mean_curves"]


def test_bad_options_raise(tiny_lm, sae, tokens):
    with pytest.raises(ValueError, match="target_types"):
        pl.run(sae, tiny_lm, HOOK, tokens, target_types=("random", "nope"), **SMALL)
    with pytest.raises(ValueError, match="position"):
        pl.run(sae, tiny_lm, HOOK, tokens, position=6, **SMALL)
    with pytest.raises(ValueError, match="must include model_generated"):  # the KS reference of every table
        pl.run(sae, tiny_lm, HOOK, tokens, target_types=("random", "synthetic_baseline"), **SMALL)
    with pytest.raises(ValueError, match="step_size must be > 0"):  # a zero step never leaves the base
        pl.run(sae, tiny_lm, HOOK, tokens, **dict(SMALL, step_size=0.0))


def test_plateau_densities_count_the_prompt_tokens_only(tiny_lm):
    """The latent densities behind the plateaus' choice of latents count the prompts' tokens (special tokens left
    out), not the label token after each prompt: against the SAE run on the prompts' own activations."""
    from gsae.evals.common import special_token_mask

    sae = build_topk(d_in=64, d_sae=256, k=8)
    windows = pl.prompt_windows(build_tokens(n_seqs=8, context_size=24), 6, "all")
    prompts = pl.encode_prompts(sae, tiny_lm, HOOK, windows, position=5, batch_size=7)
    x = tiny_lm.activations(windows[:, :6], HOOK)  # causal: the prompt's activations do not see the label
    keep = special_token_mask(tiny_lm, windows[:, :6])
    out = sae(x[keep])
    fired = out.top_idx[out.top_acts != 0]
    counts = torch.zeros(256, dtype=torch.long).index_add_(0, fired, torch.ones(len(fired), dtype=torch.long))
    assert prompts.density.n_tokens == int(keep.sum())
    assert torch.equal(prompts.density.counts, counts)


def naive_curves(lm, hook, windows, bases, targets, prompt_idx, step_size, pos=5):
    """L2 and KL curves, one run of the whole prompt per step: the prompt's activation at ``pos`` moved by
    ``step_size·n`` along ``unit(T − A)``, ``n = 0..100``; each step against step 0."""
    from gsae.evals.perturb import final_hook

    fin = final_hook(lm)
    x = lm.activations(windows[:, :-1], hook)
    l2, kl = [], []
    for A, T, p in zip(bases, targets, prompt_idx.tolist()):
        n = torch.arange(101.0)[:, None]
        xs = x[p].repeat(101, 1, 1)
        xs[:, pos] = A + step_size * n * (T - A) / (T - A).norm()
        run = lm.run_from_hook(xs, hook, tokens=windows[p, :-1].repeat(101, 1), cache_hooks=[fin])
        h, logits = run.cache[fin][:, pos], run.logits[:, pos]
        l2.append((h - h[0]).norm(dim=-1))
        kl.append(kl_div_per_token(logits[0].expand_as(logits), logits))
    return torch.stack(l2), torch.stack(kl)


@pytest.mark.parametrize("hook", [HOOK, "blocks.1.hook_mlp_out"])
def test_run_curves_match_a_naive_loop_over_the_bases_and_targets(tiny_lm, sae, tokens, hook):
    """``run``'s mean curves of each target type and of each plateau base, and its automatic step, against naive
    runs of the prompts: base ``A`` = the activation at the last position of the prompt ``base_idx`` names, the
    target types' ``T`` and the plateau's bases and random target from ``build_targets``, every plateau curve on the
    absolute schedule (the default; SPEC §4.2)."""
    from gsae.evals import synthetic_activations as syn

    types = ("model_generated", "random", "synthetic_structured")
    res = pl.run(sae, tiny_lm, hook, tokens, seed=3, n_perturbations=4, prompt_len=6, step_size="auto",
                 ap_threshold="auto", schedules=("absolute",), target_types=types)
    windows = pl.prompt_windows(tokens, 6, "all")
    prompts = pl.encode_prompts(sae, tiny_lm, hook, windows, position=5, batch_size=64)
    setup = syn.build_targets(sae, prompts.x[:, 5], prompts.recon, prompts.code, prompts.density, 4, 3)
    A = tiny_lm.activations(windows[:, :6], hook)[setup.base_idx, 5]
    s = 1.25 * float((setup.targets["model_generated"] - A).norm(dim=-1).mean()) / 100
    assert res["step_size"] == pytest.approx(s, rel=1e-5)
    for t in types:
        l2, kl = naive_curves(tiny_lm, hook, windows, A, setup.targets[t], setup.base_idx, s)
        got = res["mean_curves"]["absolute"][t]
        torch.testing.assert_close(torch.tensor(got["l2"]), l2.mean(0), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(got["kl"]), kl.mean(0).float(), atol=1e-5, rtol=1e-3)
    plateau_bases = {"model_generated": A, **{b: setup.targets[b] for b in pl.PLATEAU_BASES if b != "model_generated"}}
    for b, base in plateau_bases.items():
        l2, _ = naive_curves(tiny_lm, hook, windows, base, setup.plateau_target, setup.base_idx, s)
        torch.testing.assert_close(torch.tensor(res["plateau"]["mean_curves"][b]), l2.mean(0), atol=1e-4, rtol=1e-4)


def test_curves_of_many_perturbations_run_in_blocks_as_one(tiny_lm, tokens):
    """``_run_jobs`` cuts a job into blocks of curves (memory): each block keeps its own prompts and targets."""
    windows = pl.prompt_windows(tokens, 6, "all")[:, :6]
    x = tiny_lm.activations(windows, HOOK)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(x), generator=g)[:7]
    A, T = x[idx, 5], x[idx, 5] + 2 * torch.randn(7, x.shape[-1], generator=g)
    jobs = {"j": (A, T, "absolute")}
    small = pl._run_jobs(tiny_lm, HOOK, x, idx, 5, 0.1, jobs, None, 8192, block=3)["j"]
    for i in range(7):
        steps = pl.perturbation_steps(A[i : i + 1], T[i : i + 1], "absolute", 0.1)
        one = pl.perturbation_curves(tiny_lm, HOOK, x, idx[i : i + 1], steps, 5)
        torch.testing.assert_close(small.l2[i], one.l2[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(small.kl[i], one.kl[0], atol=1e-6, rtol=1e-4)
