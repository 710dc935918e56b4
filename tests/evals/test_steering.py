"""steering: α = 0 has no effect; the batched, prefix-truncated computation equals a naive full-sequence
forward with a steering hook; determinism."""

from __future__ import annotations

import pytest
import torch

from gsae.evals import steering
from tests.evals.helpers import HOOK, build_tokens, build_topk

SMALL = dict(n_latents=3, n_positions=2, alphas=(0.0, 5.0, 50.0), top_n=5)


def test_alpha_zero_has_exactly_no_effect(tiny_lm):
    r = steering.run(build_topk(), tiny_lm, HOOK, build_tokens(4, 16), **SMALL)
    assert r["alphas"][0] == 0.0
    assert r["on_target_curve"][0] == r["off_target_added_curve"][0] == r["off_target_abs_curve"][0] == 0.0
    only_zero = steering.run(build_topk(), tiny_lm, HOOK, build_tokens(4, 16), **{**SMALL, "alphas": (0.0,)})
    assert only_zero["on_target"] == only_zero["off_target_added"] == only_zero["off_target_abs"] == 0.0


def _naive(lm, tokens, s, t, d, alpha, top):
    """Full-sequence forwards with and without a hook adding ``α d`` at position t; Δp at t."""

    def add(act, hook):
        act = act.clone()
        act[:, t] += alpha * d
        return act

    with torch.no_grad():
        p0 = lm.model(tokens[s : s + 1])[0, t].softmax(-1)
        p1 = lm.model.run_with_hooks(tokens[s : s + 1], fwd_hooks=[(HOOK, add)])[0, t].softmax(-1)
    dp = p1 - p0
    in_l = torch.zeros_like(dp, dtype=torch.bool)
    in_l[top] = True
    return float(dp[in_l].sum()), float(dp[~in_l].clamp_min(0).sum()), float(dp[~in_l].abs().sum())


def test_matches_naive_full_sequence_steering(tiny_lm):
    sae, toks = build_topk(), build_tokens(4, 16)
    r = steering.run(sae, tiny_lm, HOOK, toks, **{**SMALL, "n_positions": 1}, max_rows=4)  # several chunks
    s, t = r["positions"][0]
    naive = []
    for k, latent in enumerate(r["latents"]):
        d = sae.W_dec[latent].detach() / sae.W_dec[latent].detach().norm()
        on, off_add, off_abs = _naive(tiny_lm, toks, s, t, d, 50.0, r["top_tokens"][k])
        naive.append((on, off_add, off_abs))
        assert r["per_latent_on_target"][k] == pytest.approx(on, abs=1e-5)
        assert r["per_latent_off_target_added"][k] == pytest.approx(off_add, abs=1e-5)
    # the scalars and the curves at α = 50: means over the latents of the three sums
    mean = torch.tensor(naive, dtype=torch.float64).mean(0).tolist()
    assert [r["on_target"], r["off_target_added"], r["off_target_abs"]] == pytest.approx(mean, abs=1e-5)
    j = r["alphas"].index(50.0)
    curves = [r["on_target_curve"][j], r["off_target_added_curve"][j], r["off_target_abs_curve"][j]]
    assert curves == pytest.approx(mean, abs=1e-5)
    # targets are the top-n logit-lens tokens of each direction (fold_ln: γ in W_U, ln_final still centres)
    d0 = sae.W_dec[r["latents"][0]].detach()
    assert set(r["top_tokens"][0]) == set(((d0 - d0.mean()) @ tiny_lm.W_U).topk(5).indices.tolist())


def test_probability_bookkeeping(tiny_lm):
    """Σ_j Δp_j = 0, so the signed off-target mass is −on_target and |off| ≥ |on| (SPEC §1.6)."""
    r = steering.run(build_topk(), tiny_lm, HOOK, build_tokens(4, 16), **SMALL)
    for on, off_abs, off_add in zip(r["on_target_curve"], r["off_target_abs_curve"], r["off_target_added_curve"]):
        assert off_abs >= abs(on) - 1e-6 and off_abs >= off_add >= 0


def test_deterministic_and_seeded(tiny_lm):
    toks = build_tokens(6, 16)
    a = steering.run(build_topk(), tiny_lm, HOOK, toks, seed=3, **SMALL)
    b = steering.run(build_topk(), tiny_lm, HOOK, toks, seed=3, **SMALL)
    c = steering.run(build_topk(), tiny_lm, HOOK, toks, seed=4, **SMALL)
    assert a == b
    assert (a["latents"], a["positions"]) != (c["latents"], c["positions"])
    assert a["latents"] == sorted(a["latents"]) and len(set(a["latents"])) == len(a["latents"])


def test_all_positions_mode_and_figures(tiny_lm):
    r = steering.run(build_topk(), tiny_lm, HOOK, build_tokens(4, 16), mode="all", **SMALL)
    assert r["n_latents"] == 3 and len(r["on_target_curve"]) == 3
    assert set(steering.figures(r)) == {"curves", "on_target_at_alpha_report"}


def _naive_all(lm, tokens, s, t, d, alpha, top):
    """Full-sequence forward adding ``α d`` at every non-special position (causal: later ones cannot matter)."""
    keep = ~torch.isin(tokens[s], torch.tensor(lm.special_token_ids))

    def add(act, hook):
        return act + alpha * d * keep[None, :, None].to(act)

    with torch.no_grad():
        p0 = lm.model(tokens[s : s + 1])[0, t].softmax(-1)
        p1 = lm.model.run_with_hooks(tokens[s : s + 1], fwd_hooks=[(HOOK, add)])[0, t].softmax(-1)
    dp = p1 - p0
    in_l = torch.zeros_like(dp, dtype=torch.bool)
    in_l[top] = True
    return float(dp[in_l].sum()), float(dp[~in_l].clamp_min(0).sum())


def test_all_positions_mode_matches_naive_loop_with_special_tokens_mid_sequence(tiny_lm):
    from gsae.lm import BYTE_BOS

    sae, toks = build_topk(), build_tokens(3, 16)
    toks[:, 6] = BYTE_BOS  # a special token in the middle: never steered, never read
    r = steering.run(sae, tiny_lm, HOOK, toks, **{**SMALL, "n_positions": 3}, mode="all", max_rows=5)
    assert all(t != 6 and t != 0 for _, t in r["positions"])
    per_latent = torch.zeros(len(r["latents"]), 2)
    for s, t in r["positions"]:
        for k, latent in enumerate(r["latents"]):
            d = sae.W_dec[latent].detach() / sae.W_dec[latent].detach().norm()
            per_latent[k] += torch.tensor(_naive_all(tiny_lm, toks, s, t, d, 50.0, r["top_tokens"][k]))
    per_latent /= len(r["positions"])
    torch.testing.assert_close(torch.tensor(r["per_latent_on_target"]), per_latent[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        torch.tensor(r["per_latent_off_target_added"]), per_latent[:, 1], atol=1e-5, rtol=0
    )


def test_logit_lens_includes_ln_final_gain_without_fold_ln():
    from gsae.lm import LanguageModel

    lm = LanguageModel("random-tiny", fold_ln=False)
    with torch.no_grad():
        lm.model.ln_final.w.copy_(torch.rand(lm.d_model, generator=torch.Generator().manual_seed(0)) * 3)
    sae = build_topk()
    r = steering.run(sae, lm, HOOK, build_tokens(4, 16), **SMALL)
    for k, latent in enumerate(r["latents"]):
        d = sae.W_dec[latent].detach() / sae.W_dec[latent].detach().norm()
        want = (((d - d.mean()) * lm.model.ln_final.w) @ lm.W_U).topk(5).indices.tolist()  # LayerNorm centres
        assert r["top_tokens"][k] == want
    assert r["top_token_strings"] == [[bytes([i]).decode("latin-1") for i in row] for row in r["top_tokens"]]


def test_logit_lens_is_the_same_whether_ln_final_is_folded_or_not():
    """TransformerLens keeps ln_final's centring in the model and folds γ into W_U (fold_ln, gsae's default) or keeps
    both (fold_ln=False, how SAELens SAEs are evaluated): the same directions must get the same target tokens, up to
    a constant per direction (center_unembed). Without the centring 40% of decoder rows of a trained g-SAE changed
    their top-10 set."""
    from gsae.evals.latents import _logit_lens
    from gsae.lm import LanguageModel

    folded, unfolded = LanguageModel("gsae-tiny", fold_ln=True), LanguageModel("gsae-tiny", fold_ln=False)
    assert unfolded.model.ln_final.w.std() > 0.05  # a trained, non-trivial gain
    d = torch.randn(64, folded.d_model, generator=torch.Generator().manual_seed(0)) + 0.5  # not centred
    with torch.no_grad():
        a, b = steering.logit_lens(folded, d), steering.logit_lens(unfolded, d)
    torch.testing.assert_close(a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True), atol=1e-4, rtol=0)
    assert torch.equal(a.topk(10).indices.sort().values, b.topk(10).indices.sort().values)
    sae = build_topk(d_in=folded.d_model)  # the latent dashboards read the same lens
    hook = "blocks.1.hook_resid_post"
    top_a, top_b = _logit_lens(sae, folded, hook, [0, 3, 7], 8), _logit_lens(sae, unfolded, hook, [0, 3, 7], 8)
    assert torch.equal(top_a[1], top_b[1]) and torch.equal(top_a[3], top_b[3])


def test_hook_z_sae_is_skipped_not_steered(tiny_lm):
    from gsae.evals import run_benchmark

    hook = "blocks.1.attn.hook_z"
    sae = build_topk(d_in=tiny_lm.d_in(hook))
    assert "residual stream" in steering.applicable(sae, tiny_lm, hook)
    assert "skipped" in run_benchmark("steering", sae, tiny_lm, hook, build_tokens(2, 16))
    with pytest.raises(ValueError, match="residual stream"):
        steering.run(sae, tiny_lm, hook, build_tokens(2, 16), **SMALL)


def test_the_steering_direction_is_the_unit_decoder_row_whatever_its_norm(tiny_lm):
    """α is a length along the latent's unit decoder direction: an SAE whose decoder rows are not unit norm (a ReLU
    SAE's parameter, a SAELens SAE) steers exactly as with the rows normalised."""
    sae = build_topk()
    tokens = build_tokens(4, 16)
    ref = steering.run(sae, tiny_lm, HOOK, tokens, **SMALL)
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.2, 5.0, sae.d_sae).unsqueeze(1))
    scaled = steering.run(sae, tiny_lm, HOOK, tokens, **SMALL)
    assert scaled["latents"] == ref["latents"]
    assert scaled["on_target_curve"] == pytest.approx(ref["on_target_curve"], rel=1e-5, abs=1e-9)
    assert scaled["off_target_abs_curve"] == pytest.approx(ref["off_target_abs_curve"], rel=1e-5, abs=1e-9)


def test_alive_latents_leave_special_positions_out(tiny_lm):
    """A latent alive only on BOS is not alive (nor steered); ``n_alive`` and ``alive_fraction`` count the latents
    selected on some non-special token, written out by hand (TopK of the raw pre-activations)."""
    sae, toks = build_topk(d_sae=2048, k=4), build_tokens(2, 8)
    x = tiny_lm.activations(toks, HOOK).reshape(-1, 64)
    idx = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).topk(4, dim=-1).indices
    special = torch.isin(toks.reshape(-1), torch.tensor(tiny_lm.special_token_ids))
    alive = set(idx[~special].flatten().tolist())
    assert set(idx.flatten().tolist()) != alive  # some latents are selected on BOS only
    assert steering.alive_latents(sae, tiny_lm, HOOK, toks, 2, True).tolist() == sorted(alive)
    assert set(steering.alive_latents(sae, tiny_lm, HOOK, toks, 2, False).tolist()) == set(idx.flatten().tolist())
    r = steering.run(sae, tiny_lm, HOOK, toks, n_latents=4, n_positions=1, alphas=(50.0,), top_n=3)
    assert r["n_alive"] == len(alive) and r["alive_fraction"] == len(alive) / 2048 and set(r["latents"]) <= alive


def test_sample_positions_cycle_through_distinct_sequences_at_uniform_unmasked_positions():
    """Every usable sequence once before any twice; sequences with no unmasked position never; t any unmasked
    position of the sequence, uniformly (not always the same one)."""
    from collections import Counter

    mask = torch.ones(5, 12, dtype=torch.bool)
    mask[:, 0] = False
    mask[2] = False  # nothing to steer in sequence 2
    mask[3, 5:] = False
    gen = torch.Generator().manual_seed(0)
    pos = steering.sample_positions(mask, 10, gen)
    seqs = [s for s, _ in pos]
    assert sorted(seqs[:4]) == sorted(seqs[4:8]) == [0, 1, 3, 4] and len(set(seqs[8:])) == 2
    assert all(mask[s, t] for s, t in pos)
    many = steering.sample_positions(mask, 800, gen)
    assert all(mask[s, t] for s, t in many)
    per_t = Counter(t for s, t in many if s == 0)  # 200 draws over the 11 unmasked positions of sequence 0
    assert set(per_t) == set(range(1, 12)) and max(per_t.values()) < 40
    with pytest.raises(ValueError, match="no unmasked position"):
        steering.sample_positions(torch.zeros(2, 4, dtype=torch.bool), 1, gen)


@pytest.mark.parametrize("mode", ["position", "all"])
def test_no_forward_runs_more_than_max_rows(tiny_lm, monkeypatch, mode):
    """``max_rows`` bounds the rows of every steering forward (the unsteered row included); steering one position
    goes through ``last_position_logits`` (the shared prefix run once), steering all of them through whole rows."""
    rows: dict[str, list[int]] = {"hidden": [], "last": []}
    hidden, last = tiny_lm.hidden_from_hook, tiny_lm.last_position_logits

    def spy_hidden(x, *a, **k):
        rows["hidden"].append(x.shape[0])
        return hidden(x, *a, **k)

    def spy_last(x, hook, new, *a, **k):
        rows["last"].append(new.shape[0])
        return last(x, hook, new, *a, **k)

    monkeypatch.setattr(tiny_lm, "hidden_from_hook", spy_hidden)
    monkeypatch.setattr(tiny_lm, "last_position_logits", spy_last)
    r = steering.run(build_topk(), tiny_lm, HOOK, build_tokens(4, 16), **SMALL, mode=mode, max_rows=4)
    assert max(rows["hidden"] + rows["last"]) <= 4
    chunks = r["n_positions"] * r["n_latents"]  # (4 - 1) // 2 alphas: one latent per forward
    assert len(rows["last"]) == (chunks if mode == "position" else 0)


def test_positions_are_the_same_for_every_sae_on_the_same_tokens(tiny_lm):
    """Two SAEs with different numbers of alive latents (the latent draw differs) are steered at the same positions."""
    toks = build_tokens(6, 16)
    a = steering.run(build_topk(d_sae=128), tiny_lm, HOOK, toks, seed=3, **SMALL)
    b = steering.run(build_topk(d_sae=300), tiny_lm, HOOK, toks, seed=3, **SMALL)
    assert a["n_alive"] != b["n_alive"] and a["positions"] == b["positions"]
