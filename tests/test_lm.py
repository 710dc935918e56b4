"""The frozen LM wrapper: hooks, stop_at_layer, running from a hook, and the dL/dx harvest (g-SAE)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from gsae import lm_fused
from gsae.lm import RANDOM_PRESETS, LanguageModel, LMLoadError, next_token_loss

HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def lm64():
    lm = LanguageModel("random-tiny", seed=1)
    lm.model.double()  # float64 for finite differences
    return lm


def tokens(b=2, t=12, seed=0):
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


def test_model_is_frozen_and_never_trainable(tiny_lm):
    assert not tiny_lm.model.training
    assert all(not p.requires_grad for p in tiny_lm.model.parameters())


def test_unknown_hook_error_lists_valid_names(tiny_lm):
    with pytest.raises(ValueError, match=r"--model.hook: unknown hook 'blocks.9.hook_resid_pre'.*blocks.1.hook_resid_post"):
        tiny_lm.validate_hook("blocks.9.hook_resid_pre")


def test_hook_widths_and_blocks_and_hooks_that_are_not_one_vector_per_token(tiny_lm):
    """``d_in`` is the width of one token's (flattened) activation: ``n_heads·d_head`` at ``attn.hook_z``, ``d_mlp`` at
    ``mlp.hook_post``; attention patterns and LayerNorm scales are refused; ``hook_layer`` is the block's index and
    ``None`` off the blocks."""
    assert tiny_lm.d_in("blocks.1.hook_resid_pre") == 64 and tiny_lm.d_in("blocks.0.attn.hook_z") == 4 * 16
    assert tiny_lm.d_in("blocks.1.mlp.hook_post") == 256
    assert tiny_lm.activations(tokens(), "blocks.0.attn.hook_z").shape == (2, 12, 64)
    for hook in ("blocks.0.attn.hook_pattern", "blocks.0.ln1.hook_scale", "ln_final.hook_scale"):
        with pytest.raises(ValueError, match="is not one vector per token"):
            tiny_lm.validate_hook(hook)
    assert [tiny_lm.hook_layer(h) for h in ("hook_embed", "ln_final.hook_normalized", "blocks.1.attn.hook_z")] == [
        None, None, 1]


def test_unknown_random_preset_is_named():
    with pytest.raises(LMLoadError, match="--model.lm.name"):
        LanguageModel("random-huge")


def test_unknown_model_name_is_a_short_line_naming_the_built_in_ones():
    """TransformerLens' own error lists every model it knows (~10 kB on one line)."""
    with pytest.raises(LMLoadError) as e:
        LanguageModel("gpt3-tiny").model  # noqa: B018 - loads
    msg = str(e.value)
    assert msg.startswith("--model.lm.name: 'gpt3-tiny' is not a TransformerLens model") and len(msg) < 300, msg
    assert "gsae-tiny" in msg and "random-gpt2" in msg and "gpt2-medium" in msg


def record_blocks(lm, monkeypatch) -> dict[int, list[bool]]:
    """``{block index: [grad mode of each call]}`` of the blocks that ran, on either path (fused or TransformerLens)."""
    calls: dict[int, list[bool]] = {}
    if lm.fused:
        w = lm.fused_weights()
        for name in ("attention", "mlp"):
            orig = getattr(lm_fused, name)

            def wrapped(w_, b, x, _orig=orig):
                i = next(i for i, blk in enumerate(w.blocks) if blk is b)
                calls.setdefault(i, []).append(torch.is_grad_enabled())
                return _orig(w_, b, x)

            monkeypatch.setattr(lm_fused, name, wrapped)
        return calls
    for i, block in enumerate(lm.model.blocks):
        orig = block.forward

        def wrapped(*a, _orig=orig, _i=i, **k):
            calls.setdefault(_i, []).append(torch.is_grad_enabled())
            return _orig(*a, **k)

        monkeypatch.setattr(block, "forward", wrapped)
    return calls


@pytest.fixture(params=[True, False], ids=["fused", "transformer_lens"])
def any_lm(request, tiny_lm):
    """The tiny LM on both forward paths (the same weights)."""
    lm = LanguageModel("random-tiny", seed=0, fused=request.param)
    lm._model = tiny_lm.model
    return lm


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out",
                                  "hook_embed", "hook_pos_embed"])
def test_activations_stop_at_the_hook(any_lm, hook, monkeypatch):
    calls = record_blocks(any_lm, monkeypatch)
    x = any_lm.activations(tokens(), hook)
    assert x.shape == (2, 12, 64)
    if hook.startswith("hook_"):
        assert not calls, "a block ran for an embedding hook"
        return
    assert 0 in calls or hook == "blocks.1.hook_resid_pre", "the recorder saw no block run"
    assert 1 not in calls, "a layer after the hook ran"


@pytest.mark.parametrize("b", [1, 2])
def test_embedding_activations_are_copies_not_views_of_the_weights(any_lm, b):
    """The fused path's ``hook_pos_embed`` is ``W_pos[:T]`` expanded over the batch: it is returned as a copy, so a
    caller that edits its activations in place (an SAE's input normalisation) leaves the model alone."""
    t = tokens(b=b)
    before = any_lm.logits(t)
    for hook in ("hook_embed", "hook_pos_embed"):
        x = any_lm.activations(t, hook)
        x += 1.0
    torch.testing.assert_close(any_lm.logits(t), before, rtol=0, atol=0)


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"])
def test_run_from_hook_reproduces_clean_logits(any_lm, hook):
    t = tokens()
    x = any_lm.activations(t, hook)
    with torch.no_grad():
        out = any_lm.run_from_hook(x, hook, tokens=t).logits
    torch.testing.assert_close(out, any_lm.logits(t), atol=1e-5, rtol=1e-5)


def test_grad_matches_finite_differences(lm64):
    t = tokens(b=1, t=8)
    _, grad, _ = lm64.activations_and_grads(t, HOOK, "mean")
    x = lm64.activations(t, HOOK)

    def loss_at(x_):
        with torch.no_grad():
            return next_token_loss(lm64.run_from_hook(x_, HOOK).logits, t, "mean")

    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        p, d = int(torch.randint(0, 8, (), generator=gen)), int(torch.randint(0, 64, (), generator=gen))
        e = torch.zeros_like(x)
        e[0, p, d] = 1e-3  # TransformerLens keeps some float32 ops even in a float64 model: smaller eps is noise
        fd = (loss_at(x + e) - loss_at(x - e)) / 2e-3
        assert float(fd) == pytest.approx(float(grad[0, p, d]), rel=3e-3, abs=1e-6)
    assert torch.all(grad[:, -1] == 0), "the last position has no label and nothing after it"


@pytest.mark.parametrize("hook", [HOOK, "blocks.0.hook_mlp_out"])
def test_mean_and_sum_differ_by_the_prediction_count(any_lm, hook):
    """Gradients and losses: the mean's are the sum's over the ``B·(T−1)`` predictions, and the mean loss is
    TransformerLens' own (``return_type="loss"``), at a residual point and at an MLP output."""
    t = tokens(b=3, t=10)
    mean, total = any_lm.activations_and_grads(t, hook, "mean"), any_lm.activations_and_grads(t, hook, "sum")
    g_mean, g_sum = mean.grads, total.grads
    torch.testing.assert_close(g_sum, g_mean * 3 * 9, rtol=1e-4, atol=1e-5 * float(g_sum.abs().max()))
    with torch.no_grad():
        want = float(any_lm.model(t, return_type="loss"))
    assert float(mean.loss) == pytest.approx(want, rel=1e-5) and float(total.loss) == pytest.approx(want * 27, rel=1e-5)


STREAM_HOOKS = ["blocks.1.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post",
                "blocks.0.hook_attn_out"]


@pytest.mark.parametrize(
    "grad_hooks",
    [["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"], ["blocks.0.hook_resid_mid", "blocks.1.hook_mlp_out"],
     ["blocks.0.hook_attn_out", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]],
    ids=["points", "mid+mlp", "attn+points"],
)
def test_several_hooks_in_one_pass_equal_each_hook_alone(any_lm, grad_hooks, monkeypatch):
    """A sweep's harvest at several hooks: every activation and every gradient equals the one-hook harvest there (the
    reference: :meth:`activations` and :meth:`activations_and_grads` on their own), from one forward and one backward,
    with the layers before the shallowest gradient hook run without autograd."""
    t = tokens(b=3, t=10)
    acts = any_lm.activations_at(t, STREAM_HOOKS)
    assert list(acts) == STREAM_HOOKS
    for h in STREAM_HOOKS:
        torch.testing.assert_close(acts[h], any_lm.activations(t, h), atol=1e-6, rtol=0)
    acts, grads, loss = any_lm.activations_and_grads_at(t, STREAM_HOOKS, grad_hooks)
    assert list(grads) == grad_hooks
    assert not any(v.requires_grad for v in [*acts.values(), *grads.values(), loss]), "the results keep the graph"
    for h in grad_hooks:
        ref = any_lm.activations_and_grads(t, h, "sum")
        torch.testing.assert_close(acts[h], ref.acts, atol=1e-5, rtol=0)
        torch.testing.assert_close(grads[h], ref.grads, atol=1e-6 * float(ref.grads.abs().max()), rtol=0)
        torch.testing.assert_close(loss, ref.loss, atol=1e-5, rtol=1e-6)
    for h in STREAM_HOOKS:
        torch.testing.assert_close(acts[h], any_lm.activations(t, h), atol=1e-5, rtol=0)
    # one backward: autograd.grad runs once for all the gradient hooks
    seen = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: seen.append(len(a[1])) or real(*a, **k))
    any_lm.activations_and_grads_at(t, STREAM_HOOKS, grad_hooks)
    assert seen == [len(grad_hooks)]
    assert all(p.grad is None for p in any_lm.model.parameters())


def _tl_grad(lm: LanguageModel, t: torch.Tensor, hook: str) -> torch.Tensor:
    """Reference ``dL/dx`` (summed CE) at ``hook``: TransformerLens' whole forward with autograd, the activation at
    ``hook`` replaced by a leaf, full-vocabulary logits, ``backward``."""
    leaf = {}

    def patch(act, hook):  # noqa: ARG001
        leaf["x"] = act.detach().requires_grad_(True)
        return leaf["x"]

    with torch.enable_grad():
        logits = lm.model.run_with_hooks(t, fwd_hooks=[(hook, patch)])
        next_token_loss(logits, t, "sum").backward()
    return leaf["x"].grad


@pytest.mark.parametrize("hook", ["blocks.0.hook_attn_out", "blocks.0.hook_mlp_out", "blocks.1.hook_attn_out",
                                  "blocks.1.hook_mlp_out", "blocks.1.hook_resid_mid"])
def test_gradient_at_attention_and_mlp_outputs_is_the_next_points(any_lm, hook, monkeypatch):
    """An attention or MLP output's gradient is taken at the residual point after it (``x_{p+1} = x_p + out``), so
    the fused forward serves it (no TransformerLens run); it equals TransformerLens' own autograd at the hook."""
    t = tokens(b=2, t=10)
    ref = _tl_grad(any_lm, t, hook)
    if any_lm.fused:
        monkeypatch.setattr(any_lm.model, "run_with_hooks", lambda *a, **k: pytest.fail("TransformerLens ran"))
    got = any_lm.activations_and_grads(t, hook, "sum")
    monkeypatch.undo()
    torch.testing.assert_close(got.grads, ref, atol=2e-6 * float(ref.abs().max()), rtol=0)
    torch.testing.assert_close(got.acts, any_lm.activations(t, hook), atol=1e-6, rtol=0)
    assert any_lm.grad_point("blocks.1.hook_mlp_out") == "blocks.1.hook_resid_post"  # the last block: no resid_pre 2
    assert any_lm.grad_point("blocks.0.hook_mlp_out") == "blocks.0.hook_resid_post"
    assert any_lm.grad_point("blocks.1.hook_attn_out") == "blocks.1.hook_resid_mid"


def test_two_names_of_one_residual_point_get_one_gradient(any_lm):
    """``blocks.0.hook_resid_post`` is ``blocks.1.hook_resid_pre``: a sweep may name both; each gets the gradient."""
    t = tokens(b=2, t=10)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.1.hook_mlp_out"]
    acts, grads, _ = any_lm.activations_and_grads_at(t, hooks, hooks)
    ref = _tl_grad(any_lm, t, "blocks.1.hook_resid_pre")
    for h in hooks[:2]:
        torch.testing.assert_close(grads[h], ref, atol=2e-6 * float(ref.abs().max()), rtol=0)
        torch.testing.assert_close(acts[h], any_lm.activations(t, h), atol=1e-6, rtol=0)
    torch.testing.assert_close(grads[hooks[2]], _tl_grad(any_lm, t, hooks[2]), atol=2e-6 * float(ref.abs().max()), rtol=0)


def test_several_hooks_must_be_on_the_residual_stream(tiny_lm):
    with pytest.raises(ValueError, match="residual stream.*blocks.0.attn.hook_z"):
        tiny_lm.activations_at(tokens(), ["blocks.1.hook_resid_pre", "blocks.0.attn.hook_z"])
    with pytest.raises(ValueError, match="non-empty subset"):
        tiny_lm.activations_and_grads_at(tokens(), ["blocks.1.hook_resid_pre"], ["blocks.0.hook_resid_pre"])
    with pytest.raises(ValueError, match="non-empty subset"):
        tiny_lm.activations_and_grads_at(tokens(), ["blocks.1.hook_resid_pre", "blocks.0.hook_resid_post"], [])


def test_prefix_runs_without_autograd_and_params_get_no_grad(any_lm, monkeypatch):
    grad_mode = record_blocks(any_lm, monkeypatch)
    out = any_lm.activations_and_grads(tokens(), HOOK)
    calls = 2 if any_lm.fused else 1  # fused: attention and MLP are two calls per block
    assert grad_mode[0] == [False] * calls, "the layer before the hook must run without autograd"
    assert grad_mode[1] == [True] * calls
    assert out.grads.abs().sum() > 0
    assert all(p.grad is None for p in any_lm.model.parameters())


def test_a_random_preset_is_the_same_model_in_every_dtype():
    """The seeded init is drawn in float32 and rounded: bfloat16 / float16 weights are the float32 ones rounded (a
    bfloat16 draw gave other weights on torch 2.11's CUDA build), and the model computes in the asked dtype."""
    ref = LanguageModel("random-small", seed=0).model.state_dict()
    for dtype in ("bfloat16", "float16"):
        model = LanguageModel("random-small", seed=0, dtype=dtype).model
        assert model.cfg.dtype == getattr(torch, dtype) and model.W_E.dtype == getattr(torch, dtype)
        for k, v in model.state_dict().items():
            if ref[k].is_floating_point() and v.dtype != torch.float32:
                assert torch.equal(v, ref[k].to(v.dtype)), (dtype, k)


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out"])
def test_a_float16_lms_mean_gradient_is_divided_in_float32(hook):
    """A float16 LM's CE gradient over a large count (grad_mean_tokens; 8160 in the gpt2 configs) was divided in
    float16, its quotient in the subnormals: 6% off at 1e6 with 12% of the entries flushed to 0. The mean-reduced
    gradient and the g-SAE harvest divide the float16 sum's gradient in float32."""
    from gsae.data.harvest import loss_gradients, loss_gradients_at

    t = tokens(b=4, t=24)
    lm16, lm32 = LanguageModel("gsae-tiny", dtype="float16"), LanguageModel("gsae-tiny")
    rel = lambda a, b: float((a.float() - b).norm() / b.norm())  # noqa: E731
    want = lm32.activations_and_grads(t, hook, "sum").grads
    for n in (1e6, 1e7):
        got = loss_gradients(lm16, t, hook, n).grads
        assert got.dtype == torch.float32 and rel(got, want / n) < 1e-2, (n, rel(got, want / n))
        assert not ((got == 0) & (want.abs() > 1e-3)).any()
        at = loss_gradients_at(lm16, t, [hook], [hook], n)[1][hook]
        assert rel(at, want / n) < 1e-2, (n, rel(at, want / n))
    mean = lm16.activations_and_grads(t, hook, "mean").grads
    assert mean.dtype == torch.float32 and rel(mean, want / (4 * 23)) < 1e-2


@pytest.mark.parametrize("normaliser", [None, 0, 0.0, 5.0])
def test_the_harvest_is_the_ce_sum_and_its_gradient_at_the_hook_over_the_normaliser(normaliser):
    """``loss_gradients``: activations at the hook, ``∇ₓ(Σ CE)/n`` and ``Σ CE/n`` against TransformerLens: its own
    mean CE (``return_type="loss"``) and autograd through its whole forward (:func:`_tl_grad`). ``n`` is the given
    normaliser, or for None and 0 (a g-SAE whose ``grad_normaliser`` was never set) the batch's ``B·(T−1)``
    predictions: a plain mean, never a division by 0."""
    from gsae.data.harvest import loss_gradients, predictions

    lm, t, hook = LanguageModel("gsae-tiny"), tokens(b=3, t=10), "blocks.0.hook_resid_post"
    with torch.no_grad():
        mean_ce = lm.model(t, return_type="loss")
    assert predictions(t) == 3 * 9
    n = normaliser or 27
    acts, grads, loss = loss_gradients(lm, t, hook, normaliser)
    torch.testing.assert_close(acts, lm.activations(t, hook), rtol=1e-5, atol=1e-5)
    want = _tl_grad(lm, t, hook) / n
    assert float((grads - want).norm() / want.norm()) < 1e-4  # the fused path's own summation order
    torch.testing.assert_close(loss, mean_ce * 27 / n, rtol=1e-5, atol=1e-6)


def test_a_model_retrained_with_tinylm_out_loads_by_its_folder(tmp_path):
    """``python -m gsae.tinylm.train --out DIR`` writes a model that ``--model.lm.name DIR`` loads (it was refused as
    'not a TransformerLens model')."""
    import shutil

    from gsae.lm import LanguageModel

    folder = tmp_path / "my-tiny"
    shutil.copytree(Path(__file__).resolve().parent.parent / "gsae" / "tinylm" / "assets" / "gsae-tiny", folder)
    shipped, mine = LanguageModel("gsae-tiny"), LanguageModel(str(folder))
    tokens = torch.randint(0, shipped.d_vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mine.model(tokens), shipped.model(tokens), rtol=0, atol=0)
    assert mine.encode_text(["the cat"]) == shipped.encode_text(["the cat"])


def test_token_strings_tell_partial_utf8_tokens_apart_and_name_only_bos_bos():
    """A token that is part of a UTF-8 character decodes to U+FFFD alone: its bytes are shown instead, so a
    dashboard's logit lens does not list eight identical "�"; a whole character still decodes as text. Byte
    models: the byte, "<bos>" for BOS only, "<id>" for the ids a GPT-2-shaped random preset has above it."""
    lm = LanguageModel("gsae-tiny")
    tok = lm.tokenizer
    partial = [i for i in range(len(tok)) if "\ufffd" in tok.decode([i])]
    assert len(partial) > 1
    shown = lm.token_strings(partial)
    assert "\ufffd" not in "".join(shown) and len(set(shown)) == len(partial)
    for i, s in zip(partial, shown):  # the names are the token's bytes: reading them back gives its decoding
        raw = re.sub(r"<0x([0-9A-F]{2})>", lambda m: chr(int(m[1], 16)), s).encode("latin-1")
        assert raw.decode("utf-8", errors="replace") == tok.decode([i]) and "<0x" in s
    whole = lm.encode_text([" the cat, and"])[0]
    assert "".join(lm.token_strings(whole)) == " the cat, and"

    from gsae.lm import _byte_level_bytes

    assert _byte_level_bytes("\u0120the") == b" the"  # GPT-2's alphabet: Ġ is the space
    assert _byte_level_bytes("\u2581the") is None and _byte_level_bytes("") is None  # SentencePiece's ▁ is not in it

    byte_lm = LanguageModel("random-tiny")
    assert byte_lm.token_strings([65, 10, byte_lm.bos_token_id]) == ["A", "\n", "<bos>"]
    assert LanguageModel("random-gpt2").token_strings([300, 256]) == ["<300>", "<bos>"]


def test_the_options_reach_the_model_and_describe_rebuilds_it(monkeypatch):
    """Every option changes the model as TransformerLens' weight processing says, ``describe()`` gives back every one,
    and a pretrained name hands them all to ``from_pretrained``: folding LayerNorm leaves ``LNPre``, centring the
    writing weights gives a residual stream of mean 0 over ``d_model``, centring the unembedding logits of mean 0
    over the vocabulary, folding the value biases ``b_V = 0``; a random preset's ``seed`` and ``dtype`` are
    TransformerLens' own seeded init in that dtype."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    import gsae.lm as lm_module

    t = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
    flags = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
    for on in (True, False):
        lm = LanguageModel("gsae-tiny", **dict.fromkeys(flags, on))
        assert (lm.model.cfg.normalization_type == "LNPre") == on
        resid_mean = float(lm.activations(t, "blocks.1.hook_resid_pre").mean(-1).abs().max())
        assert (resid_mean < 1e-5) == on, resid_mean
        assert (float(lm.logits(t).mean(-1).abs().max()) < 1e-4) == on
        assert (float(lm.model.blocks[0].attn.b_V.abs().max()) == 0) == on
    options = dict(name="random-tiny", fold_ln=False, center_writing_weights=False, center_unembed=True,
                   fold_value_biases=False, dtype="bfloat16", seed=3)
    lm = LanguageModel(**options)
    assert lm.describe() == {**options, "center_unembed": False}  # a random preset's weights as drawn: none applies
    assert LanguageModel("random-tiny").describe() == {**options, **dict.fromkeys(flags, False), "dtype": "float32",
                                                       "seed": 0}
    assert lm.model.cfg.normalization_type == "LN" and float(lm.logits(t % 257).float().mean(-1).abs().max()) > 1e-3
    cfg = HookedTransformerConfig(**lm_module.GPT2_BLOCK, **RANDOM_PRESETS["random-tiny"], d_head=16, seed=3)
    want = HookedTransformer(cfg).W_E
    assert lm.model.W_E.dtype == torch.bfloat16 and torch.equal(lm.model.W_E, want.bfloat16())
    assert not torch.equal(LanguageModel("random-tiny", seed=0).model.W_E, want)
    seen = {}
    monkeypatch.setattr(lm_module, "_from_pretrained_offline_first", lambda cls, name, kw: seen.update(kw, name=name))
    LanguageModel(**{**options, "name": "gpt2"})._load()
    assert seen == {**{k: v for k, v in options.items() if k != "seed"}, "name": "gpt2", "device": "cpu"}


def test_special_tokens_of_byte_models_and_of_a_tokenizer_with_its_own_bos():
    """Byte models: BOS = EOS = 256, the only special id, text as its UTF-8 bytes. A tokenizer whose BOS is not its
    EOS (GPT-2's are one token): ``bos_token_id`` is its BOS, ``eos_token_id`` its EOS, and the special ids are all
    of the tokenizer's that the model's vocabulary has (a pad token added past ``d_vocab`` is not one)."""
    from types import SimpleNamespace

    from gsae import tinylm

    byte_lm = LanguageModel("random-tiny")
    assert byte_lm.bos_token_id == byte_lm.eos_token_id == 256 and byte_lm.special_token_ids == [256]
    assert byte_lm.encode_text(["é!"]) == [[0xC3, 0xA9, 0x21]]
    tok = tinylm.load_tokenizer(tinylm.assets_dir("gsae-tiny"))
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    tok.add_special_tokens({"bos_token": "<bos>"})
    bos = tok.convert_tokens_to_ids("<bos>")
    tok.add_special_tokens({"pad_token": "<pad>"})
    lm = LanguageModel("gsae-tiny")
    lm._model = SimpleNamespace(tokenizer=tok, cfg=SimpleNamespace(d_vocab=bos + 1))
    assert (lm.bos_token_id, lm.eos_token_id) == (bos, eot) and bos != eot
    assert lm.special_token_ids == sorted([eot, bos])


def test_to_moves_the_model():
    lm = LanguageModel("random-tiny")
    assert lm.to("meta") is lm and lm.device == torch.device("meta") and lm.model.W_E.is_meta
