"""The latent dashboard benchmark on gsae-tiny, checked against a naive per-latent reference computation."""

from __future__ import annotations

import html
import itertools
import json
from html.parser import HTMLParser

import pytest
import torch
from tensorboard import plugin_util
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from gsae.data.harvest import loss_gradients
from gsae.evals import BENCHMARKS, run_benchmark, run_benchmarks, tagged_figures
from gsae.evals import latents as latents_mod
from gsae.sae import GradTopKSAE, TopKSAE
from tests.conftest import randomize

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
        for c in e["contexts"]:  # every token of the window: its string and this latent's activation
            a = c["pos"] - c["marked"]
            ids = tokens[c["seq"], a : a + len(c["tokens"])].tolist()
            assert c["tokens"] == [lm.tokenizer.decode([i]) for i in ids]
            ref = dense[c["seq"] * t_len + a : c["seq"] * t_len + a + len(ids), e["latent"]]
            torch.testing.assert_close(torch.tensor(c["acts"]), ref, atol=2e-4, rtol=1e-4)
            assert c["marked"] == min(c["pos"], 12) and len(ids) <= 12 + 1 + 4
        lens = sae.W_dec[e["latent"]].detach() @ lm.W_U.detach()
        assert [s for s, _ in e["promoted"]] == [lm.tokenizer.decode([i]) for i in lens.topk(8).indices.tolist()]
        assert [s for s, _ in e["suppressed"]] == [lm.tokenizer.decode([i]) for i in (-lens).topk(8).indices.tolist()]
        assert e["mean_beta_attribution"] is None
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
    assert named["latents"][0]["contexts"] == [] and named["latents"][0]["n_fires"] == 0
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
    assert counts["ctx"] == sum(len(e["contexts"]) for e in r["latents"]) >= 16 * 8
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
    figs = tagged_figures({"latents": r})
    assert list(figs) == ["eval/latents/activation_histograms"]


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
    logit = latents_mod._logit_lens(sae, lm, chosen, 8)
    n_tokens = int((~torch.isin(tokens, torch.tensor(lm.special_token_ids))).sum())
    return [
        latents_mod._latent_entry(lm, tokens, i, dense[:, i], int(counts[i]), n_tokens, attr_sum, logit, j,
                                  kw["n_contexts"], 12, 4, 24)
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
