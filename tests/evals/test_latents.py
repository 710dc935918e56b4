"""The latent dashboard benchmark on gsae-tiny, checked against a naive per-latent reference computation."""

from __future__ import annotations

import html
import itertools
import json
import re
import statistics
from html.parser import HTMLParser

import pytest
import torch
from tensorboard import plugin_util
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from gsae.data.harvest import loss_gradients
from gsae.evals import BENCHMARKS, latents_html, run_benchmark, run_benchmarks, tagged_figures
from gsae.evals import latents as latents_mod
from gsae.sae import GradTopKSAE, TopKSAE
from tests.conftest import randomize


def decoded(lm, shown: list[str], ids: list[int]) -> bool:
    """``shown`` is the tokenizer's decoding of each of ``ids``, except that a token that is part of a UTF-8
    character (decoded alone: U+FFFD; in gsae-tiny, the 128 bytes 0x80-0xff) shows as its byte, ``<0xF3>``."""
    assert len(shown) == len(ids)
    for s, i in zip(shown, ids):
        text = lm.tokenizer.decode([i])
        assert s == text if "\ufffd" not in text else re.fullmatch(r"<0x[89A-F][0-9A-F]>", s), (s, text)
    return True


HOOK = "blocks.2.hook_resid_post"


@pytest.fixture(scope="module")
def tiny():
    """gsae-tiny and the first 24 held-out contexts (64 tokens) of gsae-corpus, as the evaluation callback reads them."""
    from gsae.data.datamodule import TokenDataModule
    from gsae.lm import LanguageModel

    lm = LanguageModel("gsae-tiny")
    dm = TokenDataModule(lm=lm, dataset="gsae-corpus", context_size=64, batch_size=8)
    return lm, torch.tensor(list(itertools.islice(dm.contexts("val"), 24)))


def naive_dense(sae, lm, tokens, grad: bool = False) -> torch.Tensor:
    """``(n_seq·T, d_sae)`` latent activations, TopK (or the g-SAE score) written out by hand, special tokens zeroed."""
    if grad:
        x, g, _ = loss_gradients(lm, tokens, HOOK, float(sae.grad_normaliser))
    else:
        x, g = lm.activations(tokens, HOOK), None
    x = x.reshape(-1, x.shape[-1]).float()
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    score = pre if g is None else pre * (1 + sae.beta * (g.reshape(x.shape) @ sae.W_dec.T).abs())
    idx = score.topk(sae.k, dim=-1).indices
    dense = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx))
    special = torch.isin(tokens.reshape(-1), torch.tensor(lm.special_token_ids))
    dense[special] = 0
    return dense.detach()


def test_dashboard_matches_a_naive_reference(tiny) -> None:
    lm, tokens = tiny
    sae = randomize(TopKSAE(lm.d_model, d_sae=256, k=8), seed=3)
    r = run_benchmark("latents", sae, lm, HOOK, tokens, seed=0, batch_size=8, n_latents=20, n_contexts=8)
    dense = naive_dense(sae, lm, tokens)
    n_tokens = int((~torch.isin(tokens, torch.tensor(lm.special_token_ids))).sum())
    assert r["n_tokens"] == n_tokens and r["n_latents"] == 20 and r["n_alive"] == int((dense != 0).any(0).sum())
    t_len = tokens.shape[1]
    for e in r["latents"]:
        col = dense[:, e["latent"]]
        assert e["n_fires"] == int((col != 0).sum()) >= 8
        assert e["density"] == pytest.approx(e["n_fires"] / n_tokens)
        assert sum(e["hist"]["counts"]) == e["n_fires"]
        assert len(e["contexts"]) == 8
        ref_top = col.topk(8).values
        got = torch.tensor([c["acts"][c["marked"]] for c in e["contexts"]])
        torch.testing.assert_close(got, ref_top, atol=2e-4, rtol=1e-4)
        examples = [c for g in e["intervals"] for c in g["contexts"]]  # checked in detail on a planted latent below
        assert len(e["intervals"]) == 3 and 0 < len(examples) <= 12
        assert sum(g["n_tokens"] for g in e["intervals"]) == e["n_fires"]
        assert not {(c["seq"], c["pos"]) for c in examples} & {(c["seq"], c["pos"]) for c in e["contexts"]}
        for c in e["contexts"] + examples:  # every token of the window: its string and this latent's activation
            a = c["pos"] - c["marked"]
            ids = tokens[c["seq"], a : a + len(c["tokens"])].tolist()
            assert decoded(lm, c["tokens"], ids)
            ref = dense[c["seq"] * t_len + a : c["seq"] * t_len + a + len(ids), e["latent"]]
            torch.testing.assert_close(torch.tensor(c["acts"]), ref, atol=2e-4, rtol=1e-4)
            assert c["marked"] == min(c["pos"], 12) and len(ids) <= 12 + 1 + 4
        lens = sae.W_dec[e["latent"]].detach() @ lm.W_U.detach()
        assert decoded(lm, [s for s, _ in e["promoted"]], lens.topk(8).indices.tolist())
        assert decoded(lm, [s for s, _ in e["suppressed"]], (-lens).topk(8).indices.tolist())
        assert e["mean_beta_attribution"] is None
        nz = col[col != 0]
        assert e["max_act"] == pytest.approx(float(nz.max()), abs=2e-4)
        assert e["mean_act"] == pytest.approx(float(nz.mean()), abs=2e-4)  # over the tokens it fires on, not all
        # histogram: 24 bins from 0 (or a lower negative activation) to the maximum, counting the nonzero activations
        lo, hi = min(0.0, float(nz.min())), float(nz.max())
        edges, counts = e["hist"]["edges"], e["hist"]["counts"]
        assert len(edges) == 25 and len(counts) == 24
        assert edges[0] == pytest.approx(lo, abs=1e-4) and edges[-1] == pytest.approx(hi, abs=1e-4)
        ref = torch.histogram(nz.double(), bins=24, range=(lo, hi)).hist
        assert torch.equal(torch.tensor(counts, dtype=torch.float64), ref)
        # the logit lens' values: ln_final's centring (and gain, when not folded) of the decoder row, then W_U
        w = sae.W_dec[e["latent"]].detach()
        d = w - w.mean()
        if getattr(lm.model.ln_final, "w", None) is not None:
            d = d * lm.model.ln_final.w.detach()
        logits = d @ lm.W_U.detach()
        assert [v for _, v in e["promoted"]] == pytest.approx(logits.topk(8).values.tolist(), abs=1e-3)
        assert [v for _, v in e["suppressed"]] == pytest.approx((-logits).topk(8).values.neg().tolist(), abs=1e-3)
    assert r["shown_median_density"] == pytest.approx(statistics.median_low([e["density"] for e in r["latents"]]))
    json.dumps(r)


def test_sample_is_seeded_alive_and_named_latents_come_first(tiny) -> None:
    lm, tokens = tiny
    tokens = tokens[:8]
    sae = randomize(TopKSAE(lm.d_model, d_sae=256, k=8), seed=3)
    with torch.no_grad():
        sae.b_enc[5] = -1e6  # never selected: dead, so never sampled (but shown when named)
    a = run_benchmark("latents", sae, lm, HOOK, tokens, seed=0, n_latents=40, n_contexts=2)
    b = run_benchmark("latents", sae, lm, HOOK, tokens, seed=0, n_latents=40, n_contexts=2)
    c = run_benchmark("latents", sae, lm, HOOK, tokens, seed=1, n_latents=40, n_contexts=2)
    ids = [e["latent"] for e in a["latents"]]
    assert a == b and ids != [e["latent"] for e in c["latents"]]
    fewer = run_benchmark("latents", sae, lm, HOOK, tokens, seed=0, n_latents=20, n_contexts=2)
    assert set(e["latent"] for e in fewer["latents"]) <= set(ids)  # one seeded order: stable across runs
    assert 5 not in ids and all(e["n_fires"] >= 2 for e in a["latents"])
    named = run_benchmark("latents", sae, lm, HOOK, tokens, seed=0, n_latents=3, latents=[5, 200], n_contexts=2)
    assert [e["latent"] for e in named["latents"]][:2] == [5, 200] and named["n_latents"] == 5
    dead = named["latents"][0]
    assert dead["contexts"] == dead["intervals"] == [] and dead["n_fires"] == 0
    twice = run_benchmark("latents", sae, lm, HOOK, tokens, seed=0, n_latents=3, latents=[5, 200, 5], n_contexts=2)
    assert twice["latents"] == named["latents"] and twice["n_latents"] == 5  # a latent named twice: one dashboard
    with pytest.raises(ValueError, match="latents.latents"):
        run_benchmark("latents", sae, lm, HOOK, tokens, latents=[256])


def test_gsae_contexts_and_attribution_use_the_gradient(tiny) -> None:
    lm, tokens = tiny
    tokens = tokens[:8]
    sae = randomize(GradTopKSAE(lm.d_model, d_sae=256, k=8, beta=3e3), seed=4)
    r = run_benchmark("latents", sae, lm, HOOK, tokens, seed=0, batch_size=8, n_latents=16, n_contexts=4)
    dense = naive_dense(sae, lm, tokens, grad=True)
    assert not torch.equal(dense != 0, naive_dense(sae, lm, tokens) != 0)  # the gradient changes the selection
    x, g, _ = loss_gradients(lm, tokens, HOOK, float(sae.grad_normaliser))
    attr = sae.beta * (g.reshape(-1, g.shape[-1]) @ sae.W_dec.detach().T).abs()  # (n_seq·T, d_sae)
    assert r["setup"]["gsae"]
    for e in r["latents"]:
        fires = dense[:, e["latent"]] != 0
        assert e["n_fires"] == int(fires.sum())
        assert e["mean_beta_attribution"] == pytest.approx(float(attr[fires, e["latent"]].mean()), rel=1e-4)
        torch.testing.assert_close(
            torch.tensor([c["acts"][c["marked"]] for c in e["contexts"]]), dense[:, e["latent"]].topk(4).values,
            atol=2e-4, rtol=1e-4,
        )


def test_html_is_self_contained_with_every_latent_and_context(tiny) -> None:
    lm, tokens = tiny
    sae = randomize(GradTopKSAE(lm.d_model, d_sae=256, k=8, beta=3e3), seed=4)
    r = run_benchmarks(["latents"], sae, lm, HOOK, tokens, seed=0, batch_size=8)["latents"]
    page = BENCHMARKS["latents"].artifacts(r)[".latents.html"]
    for offline_breaker in ("http://", "https://", "<script", "<link", "@import", "url("):
        assert offline_breaker not in page
    counts: dict[str, int] = {}

    class Count(HTMLParser):
        def handle_starttag(self, tag, attrs):
            cls = dict(attrs).get("class") or ""
            for name in cls.split():
                counts[name] = counts.get(name, 0) + 1
            counts[tag] = counts.get(tag, 0) + 1

    Count().feed(page)
    assert counts["latent"] == r["n_latents"] >= 16
    n_examples = sum(len(g["contexts"]) for e in r["latents"] for g in e["intervals"])
    assert counts["ctx"] == sum(len(e["contexts"]) for e in r["latents"]) + n_examples >= 16 * 8 + n_examples > 0
    assert counts["ivh"] == sum(len(e["intervals"]) for e in r["latents"]) >= 16  # a header per interval
    assert counts["mark"] == counts["ctx"]  # one activating token marked per context
    assert counts["svg"] == r["n_latents"]  # one activation histogram each
    assert "mean β·|W_dec∇ₓL|" in page and "promotes" in page
    first = r["latents"][0]
    assert f'id="latent-{first["latent"]}"' in page


def test_texts_reach_tensorboard(tiny, tmp_path) -> None:
    """Logged as the evaluation callback does (``add_text`` per entry), every latent is a text entry in the events."""
    lm, tokens = tiny
    sae = randomize(TopKSAE(lm.d_model, d_sae=256, k=8), seed=3)
    r = run_benchmark("latents", sae, lm, HOOK, tokens[:12], seed=0, n_latents=16, n_contexts=8)
    texts = latents_mod.texts(r)
    assert len(texts) == 16
    with SummaryWriter(str(tmp_path)) as w:
        for tag, md in texts.items():
            w.add_text(f"eval/latents/{tag}", md, global_step=7)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = acc.Tags()["tensors"]
    assert sorted(tags) == sorted(f"eval/latents/{t}/text_summary" for t in texts)  # torch's add_text suffix
    e = r["latents"][0]
    (event,) = acc.Tensors(f"eval/latents/latent_{e['latent']:03d}/text_summary")
    md = event.tensor_proto.string_val[0].decode()
    assert event.step == 7 and md.startswith(f"### latent {e['latent']}")
    assert md.count("\n| ") == 1 + len(e["contexts"])  # header + one row per context
    assert "**promotes:**" in md and md.count("**") >= 2 * (len(e["contexts"]) + 2)
    # rendered as TensorBoard renders it: one table row per context, the activating token bold, no stray escapes
    page = plugin_util.markdown_to_safe_html(md)
    assert page.count("<tr>") == 1 + len(e["contexts"]) and page.count("<strong>") >= len(e["contexts"]) + 2
    first = e["contexts"][0]
    marked = first["tokens"][first["marked"]].strip()
    assert f"<strong>{html.escape(marked, quote=False)}</strong>" in page
    assert "\\" not in page
    # the logit lens's tokens quoted, as in the HTML: a leading space stays visible ("' from'", not "from")
    shown = ", ".join(f"{html.escape(repr(t), quote=False)} ({v:+.2f})" for t, v in e["promoted"])
    assert f"<strong>promotes:</strong> {shown}" in page, page
    eos = latents_mod.render_markdown({**e, "contexts": [{**first, "tokens": ["<|endoftext|>", "a|b"] + first["tokens"][2:]}]}, r)
    assert "&lt;|endoftext|&gt;" in plugin_util.markdown_to_safe_html(eos).replace("&#124;", "|")
    # whitespace-only tokens stay visible, as in the HTML (HTML collapsed a run of them to one space, or nothing)
    spaces = {**first, "tokens": ["a", " ", "  ", " b"], "acts": [0.0, 1.0, 0.0, 0.0], "marked": 1}
    row = plugin_util.markdown_to_safe_html(latents_mod.render_markdown({**e, "contexts": [spaces]}, r))
    assert "a<strong>·</strong>·· b" in row, row
    figs = tagged_figures({"latents": r})
    assert list(figs) == ["eval/latents/activation_histograms"]
    # tags are zero-padded to the width of the largest latent index, d_sae - 1 (so they sort by latent)
    for d_sae, tag in [(10, "latent_7"), (1000, "latent_007"), (1001, "latent_0007")]:
        assert list(latents_mod.texts({**r, "setup": {**r["setup"], "d_sae": d_sae}, "latents": [{**e, "latent": 7}]})) == [tag]


def keep_everything(sae, lm, tokens, grad: bool, batch_size: int, **kw) -> tuple[list[dict], int]:
    """The dashboard computed the direct way: every latent's activation on every token kept (``(n_seq·T, d_sae)``,
    from the SAE's own dense output, batch by batch as the benchmark reads them: a g-SAE's ∇ₓL is per batch),
    then the sample and each entry made from those columns: ``(entries, number of alive latents)``."""
    from gsae.evals.common import sae_on_tokens

    runs = [sae_on_tokens(sae, lm, HOOK, tokens[i : i + batch_size]) for i in range(0, len(tokens), batch_size)]
    dense = torch.cat([(sae.densify(r.out) if r.out.latents is None else r.out.latents).detach() for r in runs])
    dense = dense.float()
    dense[torch.isin(tokens.reshape(-1), torch.tensor(lm.special_token_ids))] = 0
    counts = (dense != 0).sum(0)
    named = kw.get("latents") or []
    chosen = named + latents_mod._sample(counts, set(named), kw["n_latents"], kw["n_contexts"], kw["seed"])
    attr_sum = None
    if grad:
        attr = torch.cat([sae.attribution(r.grad.reshape(-1, r.grad.shape[-1])) for r in runs])
        attr_sum = (attr * (dense != 0)).sum(0).double()
    logit = latents_mod._logit_lens(sae, lm, HOOK, chosen, 8)
    n_tokens = int((~torch.isin(tokens, torch.tensor(lm.special_token_ids))).sum())
    return [
        latents_mod._latent_entry(lm, tokens, i, dense[:, i], int(counts[i]), n_tokens, attr_sum, logit, j,
                                  kw["n_contexts"], 12, 4, 24, n_intervals=3, n_per_interval=4, seed=kw["seed"])
        for j, i in enumerate(chosen)
    ], int((counts > 0).sum())


@pytest.mark.parametrize("kind", ["topk", "topk_second_pass", "relu", "gsae"])
def test_streaming_dashboard_equals_keeping_every_activation(tiny, kind, monkeypatch) -> None:
    """The benchmark keeps activations only for candidate latents (memory O(tokens · candidates), not O(nonzeros):
    a ReLU SAE fires on about half its latents here), yet gives exactly what keeping every activation gives --
    also when the sample reaches past the candidates (their first 64 latents dead: a second pass) and for a
    dense ReLU SAE and a g-SAE (the gradient in the selection and the attribution)."""
    from gsae.sae import ReLUSAE

    lm, tokens = tiny
    tokens = tokens[:16]
    if kind == "relu":
        sae = randomize(ReLUSAE(lm.d_model, d_sae=256), seed=5)
    elif kind == "gsae":
        sae = randomize(GradTopKSAE(lm.d_model, d_sae=256, k=8, beta=3e3), seed=4)
    else:
        sae = randomize(TopKSAE(lm.d_model, d_sae=256, k=8), seed=3)
    kw = dict(seed=0, n_latents=6, n_contexts=4, latents=[int(latents_mod._order(256, 0)[100])])  # not a candidate
    if kind == "topk_second_pass":
        with torch.no_grad():
            sae.b_enc[latents_mod._order(256, 0)[:64]] = -1e6  # the candidates are dead: the sample is elsewhere
    widths = []
    harvest = latents_mod._harvest

    def spy(*a, **k):
        out = harvest(*a, **k)
        widths.append(out[2].shape[1])
        return out

    monkeypatch.setattr(latents_mod, "_harvest", spy)
    with torch.no_grad() if kind != "gsae" else torch.enable_grad():
        r = run_benchmark("latents", sae, lm, HOOK, tokens, batch_size=5, **kw)
    want, n_alive = keep_everything(sae, lm, tokens, grad=kind == "gsae", batch_size=5, **kw)
    attr = [(e.pop("mean_beta_attribution"), w.pop("mean_beta_attribution")) for e, w in zip(r["latents"], want)]
    assert r["latents"] == want and r["n_alive"] == n_alive and r["n_latents"] == 7
    for got, ref in attr:  # per-batch float sums, accumulated in float64 in both; the order of the sums differs
        assert got == ref if ref is None else got == pytest.approx(ref, rel=1e-6)
    assert widths == ([65, 6] if kind == "topk_second_pass" else [65])  # named + 64 candidates, then the rest
    if kind == "relu":
        assert n_alive > 200 and r["latents"][1]["density"] > 0.1  # dense: every nonzero would be ~half the matrix
    if kind == "gsae":
        assert all(got is not None for (got, _), e in zip(attr, r["latents"]) if e["n_fires"])


def test_sample_equals_the_per_latent_loop():
    """The vectorised sample (one mask over the seeded permutation; the loop it replaced read every latent's count
    one by one: ~47k host ops per evaluation at d_sae 15360) picks exactly what that loop picked."""

    def loop(counts, exclude, n, min_fires, seed):
        perm = latents_mod._order(counts.shape[0], seed).tolist()
        chosen = [i for i in perm if counts[i] >= min_fires and i not in exclude][:n]
        if len(chosen) < n:
            taken = set(chosen) | exclude
            chosen += [i for i in perm if 0 < counts[i] and i not in taken][: n - len(chosen)]
        return sorted(chosen)

    gen = torch.Generator().manual_seed(0)
    for d_sae, n, min_fires in [(512, 16, 4), (512, 400, 6), (64, 64, 1), (1000, 8, 50)]:
        counts = torch.randint(0, 10, (d_sae,), generator=gen) * (torch.rand(d_sae, generator=gen) > 0.3)
        for exclude in (set(), {3, 7, 100 % d_sae}):
            for seed in (0, 5):
                assert latents_mod._sample(counts, exclude, n, min_fires, seed) == loop(counts, exclude, n, min_fires, seed)


def planted(n_tokens: int, n_fire: int, seed: int = 0) -> torch.Tensor:
    """A latent's activation on each of ``n_tokens`` tokens: heavy-tailed values (squared exponentials, like a real
    latent's) on ``n_fire`` random tokens, zero elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    act = torch.zeros(n_tokens)
    act[torch.randperm(n_tokens, generator=gen)[:n_fire]] = torch.empty(n_fire).exponential_(generator=gen) ** 2 + 0.01
    return act


def entry_of(lm, tokens, act, latent: int = 7, **kw) -> dict:
    """The dashboard entry of a latent whose activation on every token of ``tokens`` is ``act`` (8 top contexts;
    3 intervals of 4 examples and seed 0 unless ``kw`` says otherwise)."""
    kw = {"n_intervals": 3, "n_per_interval": 4, "seed": 0} | kw
    n = int((act != 0).sum())
    return latents_mod._latent_entry(lm, tokens, latent, act, n, act.numel(), None, None, 0, 8, 12, 4, 24, **kw)


def check_examples(lm, tokens, act, e) -> set[tuple[int, int]]:
    """Every interval example: a context window as the top contexts have (the same keys, the window's tokens and
    this latent's activations), its activation inside its interval's ``[lo, hi]``, none a top context and none
    twice; returns their ``(seq, pos)``."""
    t_len = tokens.shape[1]
    top = {(c["seq"], c["pos"]) for c in e["contexts"]}
    seen: list[tuple[int, int]] = []
    for g in e["intervals"]:
        for c in g["contexts"]:
            assert c.keys() == e["contexts"][0].keys()
            a = c["pos"] - c["marked"]
            assert c["marked"] == min(c["pos"], 12) and len(c["tokens"]) == min(t_len - a, c["marked"] + 5)
            assert c["tokens"] == lm.token_strings(tokens[c["seq"], a : a + len(c["tokens"])].tolist())
            flat = c["seq"] * t_len + a
            assert c["acts"] == [round(float(v), 4) for v in act[flat : flat + len(c["tokens"])]]
            assert g["lo"] <= c["acts"][c["marked"]] <= g["hi"] and c["acts"][c["marked"]] != 0
            seen.append((c["seq"], c["pos"]))
    assert len(set(seen)) == len(seen) and not set(seen) & top
    return set(seen)


def test_interval_examples_are_seeded_draws_from_quantile_intervals(tiny) -> None:
    """A planted heavy-tailed latent: three intervals at the quantiles of its nonzero activations (computed here
    with ``torch.quantile``), highest first, adjacent, holding all its tokens between them; four random examples
    from each, inside it and never a top context; the draw fixed by the seed and the latent, not the global RNG."""
    lm, tokens = tiny
    tokens = tokens[:8]
    act = planted(tokens.numel(), 300)
    e = entry_of(lm, tokens, act)
    nz = act[act != 0]
    q = torch.quantile(nz, torch.linspace(0, 1, 4)).flip(0)  # highest first
    groups = e["intervals"]
    assert [g["hi"] for g in groups] == pytest.approx(q[:-1].tolist(), abs=1e-4)
    assert [g["lo"] for g in groups] == pytest.approx(q[1:].tolist(), abs=1e-4)
    inside = [int(((nz >= lo) & (nz < hi)).sum()) for hi, lo in zip(q[:-1], q[1:])]
    inside[0] += int((nz == q[0]).sum())  # the highest interval holds the maximum
    assert [g["n_tokens"] for g in groups] == inside and sum(inside) == 300 and min(inside) >= 99
    assert all(len(g["contexts"]) == 4 for g in groups)
    drawn = check_examples(lm, tokens, act, e)
    shown = [[c["acts"][c["marked"]] for c in g["contexts"]] for g in groups]
    assert all(a == sorted(a, reverse=True) for a in shown)  # highest first within an interval
    rest = act.clone()
    rest[[c["seq"] * tokens.shape[1] + c["pos"] for c in e["contexts"]]] = 0
    highest = [[round(float(v), 4) for v in rest[(rest >= g["lo"]) & (rest <= g["hi"])].topk(4).values] for g in groups]
    assert all(a != h for a, h in zip(shown, highest))  # a random draw, not each interval's highest

    torch.manual_seed(123)  # the global RNG plays no part
    assert entry_of(lm, tokens, act) == e
    other = entry_of(lm, tokens, act, seed=1)
    bounds = [(g["lo"], g["hi"], g["n_tokens"]) for g in groups]
    assert [(g["lo"], g["hi"], g["n_tokens"]) for g in other["intervals"]] == bounds  # another seed: other examples
    assert check_examples(lm, tokens, act, other) != drawn
    assert check_examples(lm, tokens, act, entry_of(lm, tokens, act, latent=8)) != drawn  # each latent its own draw
    union = set().union(*(check_examples(lm, tokens, act, entry_of(lm, tokens, act, seed=s)) for s in range(30)))
    assert len(union) > 150  # uniform over the ~290 candidates: 30 draws of 12 reach most of them
    assert entry_of(lm, tokens, act, n_intervals=0)["intervals"] == []


def test_interval_edge_cases(tiny) -> None:
    """A latent that never fires, or fires only on its top contexts: no intervals; one that fires on two more: three
    intervals with two examples between them (an interval may hold only top contexts); ties: equal quantile edges
    merge (all equal: one interval ``[v, v]``)."""
    lm, tokens = tiny
    tokens = tokens[:4]
    n = tokens.numel()
    assert entry_of(lm, tokens, torch.zeros(n))["intervals"] == []
    assert entry_of(lm, tokens, planted(n, 8))["intervals"] == []
    act = planted(n, 10)
    e = entry_of(lm, tokens, act)
    assert len(e["intervals"]) == 3 and sum(g["n_tokens"] for g in e["intervals"]) == 10
    assert len(check_examples(lm, tokens, act, e)) == 2 and e["intervals"][0]["contexts"] == []  # its top tokens shown
    # each interval says how many of its tokens are top contexts (a header of "4 tokens" over 1 example read as a bug)
    assert sum(g["n_top"] for g in e["intervals"]) == 8 and e["intervals"][0]["n_top"] == e["intervals"][0]["n_tokens"]
    assert all(g["n_tokens"] - g["n_top"] == len(g["contexts"]) for g in e["intervals"])  # fewer than 4 left in each

    same = (planted(n, 50) != 0).float() * 0.5
    e = entry_of(lm, tokens, same)
    assert [(g["lo"], g["hi"], g["n_tokens"], len(g["contexts"])) for g in e["intervals"]] == [(0.5, 0.5, 50, 4)]
    check_examples(lm, tokens, same, e)
    tied = same * 2
    tied[(tied != 0).nonzero().flatten()[:20]] = 2 + torch.rand(20)  # 30 at exactly 1, 20 between 2 and 3
    e = entry_of(lm, tokens, tied)
    edges = torch.quantile(tied[tied != 0], torch.linspace(0, 1, 4)).unique().flip(0)  # [max, q(2/3), 1]
    assert len(edges) == 3 and [g["hi"] for g in e["intervals"]] == pytest.approx(edges[:-1].tolist(), abs=1e-4)
    assert [g["lo"] for g in e["intervals"]] == pytest.approx(edges[1:].tolist(), abs=1e-4)
    assert sum(g["n_tokens"] for g in e["intervals"]) == 50
    assert [len(g["contexts"]) for g in e["intervals"]] == [4, 4]
    check_examples(lm, tokens, tied, e)


def test_interval_sections_in_html_and_markdown(tiny) -> None:
    """Under each latent's top contexts, a header per interval (its rank, range and token count) and its examples,
    rendered as top contexts are (outlined token); on TensorBoard, one list item per interval with its examples'
    activating tokens in bold."""
    lm, tokens = tiny
    sae = randomize(TopKSAE(lm.d_model, d_sae=256, k=8), seed=3)
    r = run_benchmark("latents", sae, lm, HOOK, tokens[:12], seed=0, n_latents=4, n_contexts=4)
    page = latents_mod.artifacts(r)[".latents.html"]
    fmt = latents_html._fmt
    for e in r["latents"]:
        card = page.split(f'id="latent-{e["latent"]}"')[1].split("</section>")[0]
        groups = e["intervals"]
        assert len(groups) == 3 and card.count('class="ivh"') == 3
        at = card.index("activating tokens")
        for k, g in enumerate(groups):
            head = f"Interval {k + 1}/3 · activations {fmt(g['lo'])}–{fmt(g['hi'])} · {g['n_tokens']:,} tokens"
            assert head in card and card.index(head) > at
            at = card.index(head)
            for c in g["contexts"]:
                tok = latents_html._visible(c["tokens"][c["marked"]])
                assert f'title="activation {c["acts"][c["marked"]]:.4g}">{html.escape(tok)}' in card[at:]
        assert card.count("tok mark") == len(e["contexts"]) + sum(len(g["contexts"]) for g in groups)
        md = latents_mod.render_markdown(e, r)
        rendered = plugin_util.markdown_to_safe_html(md)
        assert rendered.count("<li>") == 3 and "\\" not in rendered
        for k, g in enumerate(groups):
            item = rendered.split("<li>")[k + 1].split("</li>")[0]
            assert f"{k + 1}/3 · activations {fmt(g['lo'])}–{fmt(g['hi'])}" in item
            for c in g["contexts"]:
                tok = c["tokens"][c["marked"]].strip()
                if tok:
                    assert f"<strong>{html.escape(tok, quote=False)}</strong>" in item
    few = entry_of(lm, tokens[:4], planted(tokens[:4].numel(), 10))
    page = latents_mod.render_html({**r, "latents": [few], "n_latents": 1})
    assert "all its tokens are among the top ones above" in page and page.count('class="ivh"') == 3
    top = few["intervals"][0]
    assert f"{top['n_tokens']:,} token{'s' if top['n_tokens'] != 1 else ''}, {top['n_top']} of them among the top above" in page
    # a latent whose every token is a top context says so (its section was missing, while a neighbour's said it)
    only_top = entry_of(lm, tokens[:4], planted(tokens[:4].numel(), 8))
    said = "random examples across its activations: none, all its 8 tokens are among the top above"
    assert said in latents_mod.render_html({**r, "latents": [only_top], "n_latents": 1})
    assert said in latents_mod.render_markdown(only_top, r)
    assert said not in latents_mod.render_markdown(only_top, {**r, "setup": {**r["setup"], "n_intervals": 0}})
    off = run_benchmark("latents", sae, lm, HOOK, tokens[:12], seed=0, n_latents=4, n_contexts=4, n_intervals=0)
    assert "Interval" not in latents_mod.artifacts(off)[".latents.html"]
    assert "<li>" not in plugin_util.markdown_to_safe_html(latents_mod.render_markdown(off["latents"][0], off))


class _Rows(HTMLParser):
    """Each ``.ctxs`` grid of a page as a list of rows, a row being ``{cell class: [token span classes]}``."""

    def __init__(self) -> None:
        super().__init__()
        self.grids: list[list[dict[str, list[str]]]] = []
        self.stack: list[str] = []
        self.cell: str | None = None

    def handle_starttag(self, tag, attrs) -> None:
        cls = dict(attrs).get("class") or ""
        self.stack.append(cls)
        if cls == "ctxs":
            self.grids.append([])
        elif cls == "ctx":
            self.grids[-1].append({})
        elif self.stack[-2:-1] == ["ctx"] and tag == "span":
            self.cell = cls
            self.grids[-1][-1][cls] = []
        elif self.cell is not None and cls.startswith("tok") and self.stack[-2] == self.cell:
            self.grids[-1][-1][self.cell].append(cls)

    def handle_endtag(self, tag) -> None:
        if self.stack.pop() == self.cell:
            self.cell = None


def test_activating_tokens_start_in_one_column(tiny) -> None:
    """All of a latent's contexts (top and interval examples) are rows of one grid whose columns fit the widest
    row: the activation, the tokens before the activating one (right-aligned), then the activating token and the
    rest, so every activating token starts in the same column however much context precedes it (a context at the
    start of its sequence has less)."""
    lm, tokens = tiny
    sae = randomize(TopKSAE(lm.d_model, d_sae=256, k=8), seed=3)
    r = run_benchmark("latents", sae, lm, HOOK, tokens[:12], seed=0, n_latents=4, n_contexts=6)
    page = latents_mod.artifacts(r)[".latents.html"]
    assert ".ctxs{display:grid;grid-template-columns:max-content max-content 1fr" in page
    assert ".ctx .l{text-align:right}" in page
    parser = _Rows()
    parser.feed(page)
    fired = [e for e in r["latents"] if e["contexts"]]
    assert len(parser.grids) == len(fired) > 0
    befores = set()
    for grid, e in zip(parser.grids, fired):
        contexts = [*e["contexts"], *(c for g in e["intervals"] for c in g["contexts"])]
        assert len(grid) == len(contexts)
        for row, c in zip(grid, contexts):
            assert list(row) == ["a", "l", "r"]
            assert len(row["l"]) == c["marked"] and "mark" not in " ".join(row["l"])
            assert row["r"][0] == "tok mark" and len(row["r"]) == len(c["tokens"]) - c["marked"]
            befores.add(c["marked"])
    assert len(befores) > 1  # contexts with different amounts of preceding context were checked


def test_no_logit_lens_off_the_residual_stream(tiny) -> None:
    """A ``hook_z`` SAE (attention's per-head outputs, as wide as d_model in GPT-2 and here) got a logit lens in its
    dashboard, although W_U never reads hook_z: steering skips it for that reason, and so does the dashboard now."""
    lm, tokens = tiny
    hook = "blocks.1.attn.hook_z"
    assert lm.d_in(hook) == lm.d_model  # the case the width check let through
    sae = randomize(TopKSAE(lm.d_in(hook), d_sae=64, k=4), seed=1)
    r = run_benchmark("latents", sae, lm, hook, tokens[:6], seed=0, n_latents=3, n_contexts=2)
    assert r["latents"] and all(e["promoted"] is None and e["suppressed"] is None for e in r["latents"])
    assert "no logit lens (the hook is not on the residual stream)" in latents_mod.artifacts(r)[".latents.html"]
    on_stream = run_benchmark("latents", randomize(TopKSAE(lm.d_model, d_sae=64, k=4), seed=1), lm, HOOK, tokens[:6],
                              seed=0, n_latents=3, n_contexts=2)
    assert all(e["promoted"] for e in on_stream["latents"])
    three = run_benchmark("latents", randomize(TopKSAE(lm.d_model, d_sae=64, k=4), seed=1), lm, HOOK, tokens[:6],
                          seed=0, n_latents=3, n_contexts=2, n_logit_tokens=3)
    for e, full in zip(three["latents"], on_stream["latents"]):  # n_logit_tokens: the first 3 of the lens' 8
        assert e["promoted"] == full["promoted"][:3] and e["suppressed"] == full["suppressed"][:3]


def test_interval_counts_agree_with_the_tokens_drawn_from_each_interval():
    """An interval's ``n_tokens`` counts the tokens its examples are drawn from ([lo, hi), the last [lo, hi]), also
    for activations equal to an inner edge."""
    act = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.0])
    out = latents_mod._intervals(act, torch.tensor([], dtype=torch.long), n_intervals=2, n_per=10, seed=0, latent=0)
    assert [(o["lo"], o["hi"]) for o in out] == [(3.0, 5.0), (1.0, 3.0)]
    assert [o["n_tokens"] for o in out] == [len(o["flats"]) for o in out] == [3, 2]
    # a top context whose activation is an inner edge (3.0) counts in the interval that holds it, the upper one
    shown = torch.tensor([3, 5])  # activations 3.0 and 5.0
    out = latents_mod._intervals(act, shown, n_intervals=2, n_per=10, seed=0, latent=0)
    assert [o["n_top"] for o in out] == [2, 0] and [o["n_tokens"] - len(o["flats"]) for o in out] == [2, 0]


@pytest.mark.parametrize("bad", [{"n_contexts": 0}, {"hist_bins": 0}, {"n_per_interval": 0}, {"n_latents": -1},
                                 {"n_intervals": -1}])
def test_run_rejects_bad_counts_before_any_work(bad) -> None:
    """A bad count is refused before the language model is touched (``lm=None`` here), not after the evaluation
    (``n_contexts=0`` sampled latents firing ``>= 0`` times: dead ones)."""
    sae = TopKSAE(8, d_sae=16, k=2)
    with pytest.raises(ValueError, match="n_contexts, n_per_interval, hist_bins > 0"):
        latents_mod.run(sae, None, HOOK, torch.zeros(1, 4, dtype=torch.long), **bad)


def card(contexts: list[dict], intervals: list[dict] | None = None, gsae: bool = False, **kw) -> tuple[dict, dict]:
    """A hand-made dashboard entry (maximum activation 4) and its result, for the renderers alone."""
    entry = {"latent": 3, "density": 0.01, "n_fires": 9, "max_act": 4.0, "mean_act": 1.5,
             "hist": {"edges": [0.0, 2.0, 4.0], "counts": [5, 4]}, "contexts": contexts, "intervals": intervals or [],
             "mean_beta_attribution": 0.5 if gsae else None,
             "promoted": [[" from", 1.5], ["<i>", 1.25]], "suppressed": [["\n", -2.0], ["&", -1.0]]} | kw
    result = {"n_tokens": 900, "n_alive": 50, "n_latents": 1, "shown_median_density": 0.01,
              "setup": {"hook": HOOK, "d_sae": 64, "seed": 0, "gsae": gsae, "n_intervals": 3}, "latents": [entry]}
    return entry, result


def ctx(tokens: list[str], acts: list[float], marked: int) -> dict:
    return {"seq": 0, "pos": marked, "marked": marked, "tokens": tokens, "acts": acts}


TOKEN_SPAN = re.compile(r'<span class="(tok(?: mark)?)"(?: style="background:rgba\(234,122,44,([0-9.]+)\)")? '
                        r'title="activation [^"]*">([^<]*)(?:<sub>([^<]*)</sub>)?</span>')


def test_html_escapes_text_and_shows_whitespace_tokens() -> None:
    """Token strings, the logit lens' tokens and ``about`` are HTML-escaped; a newline shows as ``↵``, a run of spaces
    as ``·`` (HTML would collapse it); the logit lens' tokens are quoted (a leading space stays visible), promoted ones
    under "promotes", suppressed ones under "suppresses"."""
    top = ctx(["<script>", "\n", "  ", " a&b"], [0.0, 1.0, 0.0, 4.0], 3)
    _, result = card([top])
    page = latents_html.render_html(result, about="ckpt <v1> & co")
    assert "<script" not in page and "&lt;script&gt;" in page and " a&amp;b<sub>4</sub>" in page
    assert ">↵<sub>1</sub>" in page and '<span class="sp">··</span>' in page
    assert "<title>Latents · ckpt &lt;v1&gt; &amp; co</title>" in page and "<b>ckpt &lt;v1&gt; &amp; co</b>" in page
    assert "50 of 64 latents alive on 900 held-out tokens · 1 latents shown" in page
    pos = page.split('<table class="pos">')[1].split("</table>")[0]
    neg = page.split('<table class="neg">')[1].split("</table>")[0]
    assert "promotes" in pos and "suppresses" in neg
    assert "<td>&#x27; from&#x27;</td><td class=v>+1.500</td>" in pos and "<td>&#x27;&lt;i&gt;&#x27;</td>" in pos
    assert "<td>&#x27;\\n&#x27;</td><td class=v>-2.000</td>" in neg and "<td>&#x27;&amp;&#x27;</td>" in neg


def test_html_token_shading_and_numbers_follow_the_latents_maximum() -> None:
    """Every token is shaded by its activation over the latent's maximum (in interval examples too, so they compare
    with the top contexts), capped at 0.85; a token carries its activation as a number only when nonzero; the row's
    first cell is the activating token's activation, not the window's largest."""
    tops = [ctx(["w0", "w1", "w2", "w3"], [0.0, 1.0, 0.0, 4.0], 3), ctx(["x0", "x1"], [0.5, 2.0], 1)]
    example = ctx(["y0", "y1", "y2"], [2.0, 1.0, 0.0], 1)  # a neighbour above the activating token
    group = {"lo": 0.5, "hi": 2.0, "n_tokens": 5, "n_top": 1, "contexts": [example]}
    _, result = card(tops, [group])
    page = latents_html.render_html(result)
    want = []
    for c in [*tops, example]:
        for k, (t, a) in enumerate(zip(c["tokens"], c["acts"])):
            want.append(("tok mark" if k == c["marked"] else "tok", f"{0.85 * a / 4.0:.2f}" if a else "", t,
                         latents_html._fmt(a) if a else ""))
    assert TOKEN_SPAN.findall(page) == want
    assert re.findall(r'<span class="a">([^<]*)</span>', page) == ["4", "2", "1"]


def test_dead_latent_card_says_it_never_fires() -> None:
    """A latent that never fires (named, or dead): "never fires here", and no "all its 0 tokens are among the top"."""
    entry, result = card([], n_fires=0, density=0.0, max_act=0.0, mean_act=0.0,
                         hist={"edges": [0.0, 0.5, 1.0], "counts": [0, 0]})
    page = latents_html.render_html(result)
    assert "never fires here" in page and "random examples" not in page
    assert "random examples" not in latents_html.render_markdown(entry, result)


def test_gsae_index_table_has_an_attribution_column() -> None:
    """The index table of a g-SAE's page: one header cell per column, the attribution's included."""
    _, result = card([ctx(["a", "b"], [0.0, 4.0], 1)], gsae=True)
    page = latents_html.render_html(result)
    index = page.split('<table class="index">')[1].split("</table>")[0]
    head, row = index.split("</tr>")[:2]
    assert head.count("<th>") == row.count("<td>") == 5 and "<th>mean β·|W_dec∇ₓL|</th>" in head
    assert "<td>0.5</td>" in row


def test_histogram_svg_draws_one_bar_per_nonempty_bin() -> None:
    svg = latents_html.histogram_svg([0.0, 1.0, 2.0, 3.0, 4.0], [1, 0, 3, 2])
    bars = re.findall(r'<rect x="([\d.]+)" y="[\d.]+" width="[\d.]+" height="([\d.]+)"', svg)
    h = 130 - 8 - 30  # the plot's height inside its margins
    assert [float(b) for _, b in bars] == pytest.approx([h / 3, h, 2 * h / 3], abs=0.06)  # heights ∝ count
    assert [float(x) for x, _ in bars] == sorted(float(x) for x, _ in bars)
    assert 'text-anchor="end">3</text>' in svg  # the y axis' top: the largest count


def test_markdown_rows_keep_pipes_and_the_activating_tokens_value() -> None:
    """On TensorBoard: a ``|`` in a token stays in its table cell (not a new column); a row starts with the
    activating token's activation; an interval example shows 4 tokens before the activating one and 1 after."""
    top = ctx(["a|b", " c", "d"], [3.0, 1.0, 0.0], 1)
    example = ctx([f"t{i}" for i in range(10)], [0.0] * 6 + [1.5, 0.0, 0.0, 0.0], 6)
    group = {"lo": 1.0, "hi": 2.0, "n_tokens": 3, "n_top": 0, "contexts": [example]}
    entry, result = card([top], [group])
    page = plugin_util.markdown_to_safe_html(latents_html.render_markdown(entry, result))
    row = page.split("<tbody>")[1].split("</tr>")[0]
    assert re.findall(r"<td>(.*?)</td>", row) == ["1", "a&#124;b <strong>c</strong>d"]
    assert "…t2t3t4t5<strong>t6</strong>t7… (1.5)" in page
