"""The fused GPT-2 forward equals TransformerLens: every supported hook, the logits, running on from a hook, ∇ₓL.

The reference is TransformerLens itself (``LanguageModel(..., fused=False)`` on the same ``HookedTransformer``,
and for ∇ₓL TransformerLens' forward with autograd through the full logits). "Relative error" is
``max|fused − reference| / max|reference|`` over the tensor; the bar is 1e-5 in float32.
"""

from __future__ import annotations

import pytest
import torch

from gsae import lm_fused
from gsae.lm import RANDOM_PRESETS, LanguageModel, build_hooked_transformer, next_token_loss

TOL = 1e-5
#: (fold_ln, center_writing_weights, center_unembed): none, each one alone, all
FLAGS = [(False, False, False), (True, False, False), (False, True, False), (False, False, True), (True, True, True)]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def pair(
    name: str, flags: tuple[bool, bool, bool], dtype: str = "float32", arch: dict | None = None
) -> tuple[LanguageModel, LanguageModel]:
    """``(fused, transformer_lens)`` LanguageModels sharing one model processed with ``flags``.

    Random presets get generic weights first (LayerNorm scales and every bias are 1 / 0 at init, which would
    make folding and centring no-ops), then TransformerLens' own weight processing, as ``from_pretrained``.
    ``arch``: config fields overriding the random preset's (another activation function, attention scale).
    """
    fold, center_w, center_u = flags
    if name in RANDOM_PRESETS:
        gen = torch.Generator().manual_seed(7)
        fields = {**RANDOM_PRESETS[name], **(arch or {})}
        state = (build_hooked_transformer(fields, seed=3) if arch else LanguageModel(name, seed=3).model).state_dict()
        state = {k: v + 0.2 * torch.randn(v.shape, generator=gen) * (v.std() if v.numel() > 1 and v.std() > 0 else 1)
                 for k, v in state.items() if v.is_floating_point()}
        model = build_hooked_transformer(
            fields, state_dict=state, seed=None, dtype=dtype, fold_ln=fold,
            center_writing_weights=center_w, center_unembed=center_u, fold_value_biases=True,
        )
        model.eval().requires_grad_(False)
    else:
        model = LanguageModel(name, fold_ln=fold, center_writing_weights=center_w, center_unembed=center_u, dtype=dtype).model
    fused, ref = LanguageModel(name, fused=True), LanguageModel(name, fused=False)
    fused._model = ref._model = model
    return fused, ref


def residual_hooks(lm: LanguageModel) -> list[str]:
    per_layer = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
    return ["hook_embed", "hook_pos_embed", *(f"blocks.{i}.{h}" for i in range(lm.n_layers) for h in per_layer)]


def some_tokens(lm: LanguageModel, b: int = 2, t: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, lm.d_vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def reference_grad(ref: LanguageModel, tokens: torch.Tensor, hook: str) -> torch.Tensor:
    """∇ₓ mean CE through TransformerLens' full logits with autograd (the unchunked, unfused computation)."""
    x = ref.activations(tokens, hook).requires_grad_(True)
    logits = ref.model.run_with_hooks(x, start_at_layer=ref.resume_layer(hook), return_type="logits") if (
        ref.resume_layer(hook) is not None
    ) else ref.model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda act, hook: x)])
    (g,) = torch.autograd.grad(next_token_loss(logits, tokens, "mean"), x)
    return g


MODELS = ["random-tiny", "random-small", "gsae-tiny"]


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "fold{:d}-cw{:d}-cu{:d}".format(*f))
@pytest.mark.parametrize("name", MODELS)
def test_every_supported_hook_and_the_logits_match_transformer_lens(name, flags):
    fused, ref = pair(name, flags)
    assert fused.fused_weights() is not None, "the fused path must serve GPT-2-architecture models"
    tokens = some_tokens(fused)
    for hook in residual_hooks(fused):
        assert fused.fused_weights([hook]) is not None, hook
        assert rel_err(fused.activations(tokens, hook), ref.activations(tokens, hook)) <= TOL, hook
    assert rel_err(fused.logits(tokens), ref.logits(tokens)) <= TOL


@pytest.mark.parametrize("flags", [FLAGS[0], FLAGS[-1]], ids=["raw", "processed"])
@pytest.mark.parametrize("name", MODELS)
def test_running_on_from_a_hook_and_the_loss_gradient_match_transformer_lens(name, flags):
    fused, ref = pair(name, flags)
    tokens = some_tokens(fused, seed=1)
    last = fused.n_layers - 1
    for hook in ("blocks.0.hook_resid_pre", f"blocks.{last}.hook_resid_mid", "blocks.0.hook_resid_post"):
        x = ref.activations(tokens, hook) * 1.3  # off the clean activation, so a wrong start point shows
        later = [f"blocks.{last}.hook_resid_post", f"blocks.{last}.hook_mlp_out"]
        with torch.no_grad():
            a, b = fused.run_from_hook(x, hook, tokens, cache_hooks=later), ref.run_from_hook(x, hook, tokens, cache_hooks=later)
        assert rel_err(a.logits, b.logits) <= TOL, hook
        for h in later:
            assert rel_err(a.cache[h], b.cache[h]) <= TOL, (hook, h)
        acts, grads, loss = fused.activations_and_grads(tokens, hook)
        assert rel_err(grads, reference_grad(ref, tokens, hook)) <= TOL, hook
        assert float(loss) == pytest.approx(float(ref.model(tokens, return_type="loss")), rel=TOL)


def whole_copies_last_logits(ref: LanguageModel, x, hook: str, rows, tokens=None):
    """The reference of ``last_position_logits``: ``ref`` runs, from ``hook``, one whole copy of ``x (1, T, d)`` per
    row of ``rows (R, d)`` in place of its last position; the logits there, ``(R, vocab)``."""
    copies = x.repeat(rows.shape[0], 1, 1)
    copies[:, -1] = rows
    with torch.no_grad():
        return ref.run_from_hook(copies, hook, None if tokens is None else tokens.expand(rows.shape[0], -1)).logits[:, -1]


@pytest.mark.parametrize("flags", [FLAGS[0], FLAGS[-1]], ids=["raw", "processed"])
@pytest.mark.parametrize("name", MODELS)
def test_last_position_with_a_cached_prefix_matches_transformer_lens_on_whole_copies(name, flags):
    """``last_position_logits``: R copies of one sequence differing at the last position, read there — the fused
    path (prefix once, each row one new position) against TransformerLens running every copy whole. Also the
    one-token sequence (empty prefix), hooks inside a block (TransformerLens path) and several row chunks."""
    fused, ref = pair(name, flags)
    gen = torch.Generator().manual_seed(4)
    last = fused.n_layers - 1
    hooks = ("blocks.0.hook_resid_pre", f"blocks.{last}.hook_resid_mid", f"blocks.{last}.hook_resid_post",
             "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out")
    for hook in hooks:
        for t in (1, 9):
            tokens = some_tokens(fused, b=1, t=t, seed=t)
            x = ref.activations(tokens, hook)
            rows = x[0, -1] + 3 * torch.randn(5, x.shape[-1], generator=gen)
            want = whole_copies_last_logits(ref, x, hook, rows, tokens)
            for lm in (fused, ref):
                assert rel_err(lm.last_position_logits(x, hook, rows, tokens, max_rows=2), want) <= TOL, (hook, t, lm.fused)
    assert fused._fused_start("blocks.0.hook_resid_pre", ()) is not None  # the cached-prefix path was the one tested


@pytest.mark.parametrize(
    "arch",
    [
        {"act_fn": "gelu_fast"},
        {"act_fn": "gelu", "use_attn_scale": False},  # scores q·k unscaled
        {"act_fn": "relu", "attn_scale": 2.5},  # a scale other than sqrt(d_head) = 4
        {"act_fn": "silu"},
        {"act_fn": "gelu_new", "eps": 0.5},  # a LayerNorm eps other than GPT-2's 1e-5
    ],
    ids=lambda a: "-".join(f"{k}={v}" for k, v in a.items()),
)
def test_other_activations_and_attention_scales_match_transformer_lens(arch):
    """The fused path serves every activation in ``lm_fused.ACTIVATIONS`` and any ``attn_scale`` / ``use_attn_scale``
    (GPT-2 presets all use gelu_new and sqrt(d_head), where a wrong formula or a hard-wired scale would not show):
    the MLP output, the residual and the logits equal TransformerLens' own forward, and so do the cached-prefix
    last-position logits (``run_last``'s own scaled scores)."""
    fused, ref = pair("random-tiny", FLAGS[-1], arch=arch)
    assert fused.model.cfg.act_fn == arch["act_fn"]
    assert fused.fused_weights() is not None, "the fused path must serve this model"
    tokens = some_tokens(fused, seed=5)
    for hook in ("blocks.0.hook_mlp_out", "blocks.0.hook_attn_out", "blocks.1.hook_resid_post"):
        assert rel_err(fused.activations(tokens, hook), ref.activations(tokens, hook)) <= TOL, hook
    assert rel_err(fused.logits(tokens), ref.logits(tokens)) <= TOL
    hook = "blocks.0.hook_resid_post"
    x = ref.activations(tokens[:1], hook)
    rows = x[0, -1] + 2 * torch.randn(3, x.shape[-1], generator=torch.Generator().manual_seed(6))
    assert rel_err(fused.last_position_logits(x, hook, rows), whole_copies_last_logits(ref, x, hook, rows)) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("flags", [FLAGS[0], FLAGS[-1]], ids=["raw", "processed"])
def test_gpt2_shaped_model_matches_transformer_lens(flags):
    """random-gpt2 (GPT-2 small's shape, 50,257-token vocabulary) on short sequences."""
    fused, ref = pair("random-gpt2", flags)
    tokens = some_tokens(fused, b=1, t=6)
    for hook in ("blocks.0.hook_resid_pre", "blocks.6.hook_resid_pre", "blocks.5.hook_resid_mid", "blocks.11.hook_resid_post"):
        assert rel_err(fused.activations(tokens, hook), ref.activations(tokens, hook)) <= TOL, hook
    assert rel_err(fused.logits(tokens), ref.logits(tokens)) <= TOL
    hook = "blocks.9.hook_resid_pre"
    assert rel_err(fused.activations_and_grads(tokens, hook).grads, reference_grad(ref, tokens, hook)) <= TOL


def test_resid_mid_positions_keep_the_clean_activation_as_the_patch_hook_does():
    fused, ref = pair("random-tiny", FLAGS[-1])
    tokens = some_tokens(fused)
    hook = "blocks.1.hook_resid_mid"
    x = torch.randn(*tokens.shape, fused.d_model, generator=torch.Generator().manual_seed(2))
    positions = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    with torch.no_grad():
        a = fused.run_from_hook(x, hook, tokens, positions=positions).logits
        b = ref.run_from_hook(x, hook, tokens, positions=positions).logits
    assert rel_err(a, b) <= TOL


def test_hooks_inside_blocks_and_other_architectures_fall_back_to_transformer_lens():
    fused, ref = pair("random-tiny", FLAGS[0])
    tokens = some_tokens(fused)
    for hook in ("blocks.0.attn.hook_z", "blocks.1.mlp.hook_post", "blocks.0.ln1.hook_normalized"):
        assert fused.fused_weights([hook]) is None, hook
        torch.testing.assert_close(fused.activations(tokens, hook), ref.activations(tokens, hook), rtol=0, atol=0)
        with torch.no_grad():
            x = ref.activations(tokens, hook)
            torch.testing.assert_close(fused.run_from_hook(x, hook, tokens).logits, ref.run_from_hook(x, hook, tokens).logits)
    # a cache hook inside a block: the whole run falls back, values as TransformerLens
    with torch.no_grad():
        x = ref.activations(tokens, "blocks.0.hook_resid_post")
        run = fused.run_from_hook(x, "blocks.0.hook_resid_post", cache_hooks=["blocks.1.attn.hook_z"])
    assert "blocks.1.attn.hook_z" in run.cache
    rotary = dict(RANDOM_PRESETS["random-tiny"], positional_embedding_type="rotary", rotary_dim=16)
    lm = LanguageModel("random-tiny")
    lm._model = build_hooked_transformer(rotary).eval().requires_grad_(False)
    assert lm.fused_weights(["blocks.0.hook_resid_pre"]) is None


@pytest.mark.parametrize(
    "arch, reason",
    [({"n_key_value_heads": 2}, "n_key_value_heads"), ({"normalization_type": "RMS"}, "normalization_type"),
     ({"act_fn": "solu_ln"}, "act_fn"), ({"d_vocab_out": 100}, "d_vocab_out")],
    ids=["gqa", "rms", "solu_ln", "d_vocab_out"],
)
def test_an_architecture_the_fused_forward_does_not_compute_runs_on_transformer_lens(arch, reason):
    """Grouped-query attention, RMSNorm, an activation the fused MLP does not know and an output vocabulary other than
    the input's each differ from GPT-2's forward: the fused path declines the model (naming why) and every
    activation and the logits are TransformerLens' own."""
    model = build_hooked_transformer({**RANDOM_PRESETS["random-tiny"], **arch}, seed=3).eval().requires_grad_(False)
    fused, ref = LanguageModel("random-tiny"), LanguageModel("random-tiny", fused=False)
    fused._model = ref._model = model
    assert fused.fused_weights(["blocks.1.hook_resid_pre"]) is None and fused._fused_unsupported == reason
    tokens = some_tokens(fused)
    for hook in ("blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"):
        torch.testing.assert_close(fused.activations(tokens, hook), ref.activations(tokens, hook), rtol=0, atol=0)
    torch.testing.assert_close(fused.logits(tokens), model(tokens), rtol=0, atol=0)


def test_cache_hooks_in_the_first_step_run_fused(monkeypatch):
    """Running on from ``blocks.1.hook_resid_pre`` while caching that block's own attention output (what a sweep's
    harvest asks when one SAE reads the residual point and another the attention after it): the fused path serves
    it, with TransformerLens' values."""
    fused, ref = pair("random-tiny", FLAGS[-1])
    tokens = some_tokens(fused)
    hook, later = "blocks.1.hook_resid_pre", ["blocks.1.hook_attn_out", "blocks.1.hook_resid_mid"]
    x = ref.activations(tokens, hook) * 1.3
    with torch.no_grad():
        want = ref.run_from_hook(x, hook, tokens, cache_hooks=later)
        monkeypatch.setattr(fused.model, "run_with_hooks", lambda *a, **k: pytest.fail("TransformerLens ran"))
        got = fused.run_from_hook(x, hook, tokens, cache_hooks=later)
    assert rel_err(got.logits, want.logits) <= TOL
    for h in later:
        assert rel_err(got.cache[h], want.cache[h]) <= TOL, h


def test_a_model_put_in_place_of_another_is_the_one_that_runs():
    """The fused weights are of the model the LanguageModel holds now (a test or a tool that sets ``_model`` after a
    first run gets its new model's values, not the cached weights of the old one)."""
    fused, ref = pair("random-tiny", FLAGS[0])
    tokens = some_tokens(fused)
    hook = "blocks.1.hook_resid_post"
    fused.activations(tokens, hook)
    other = LanguageModel("random-tiny", seed=5, fused=False)
    fused._model = other.model
    assert rel_err(fused.activations(tokens, hook), other.activations(tokens, hook)) <= TOL
    assert LanguageModel("random-tiny", fused=False).fused_weights(["blocks.0.hook_resid_pre"]) is None


def test_fused_weights_follow_in_place_edits_and_dtype_moves():
    fused, ref = pair("random-tiny", FLAGS[-1])
    tokens = some_tokens(fused)
    hook = "blocks.1.hook_resid_post"
    before = fused.activations(tokens, hook)
    with torch.no_grad():
        fused.model.blocks[0].attn.W_Q.mul_(2.0)  # in place: the packed QKV must be rebuilt
    after = fused.activations(tokens, hook)
    assert rel_err(after, before) > 1e-3
    assert rel_err(after, ref.activations(tokens, hook)) <= TOL
    fused.model.double()  # new parameter tensors (TransformerLens' own LNPre would cast back to float32 here)
    x64 = fused.activations(tokens, hook)
    assert x64.dtype == torch.float64
    assert rel_err(x64, after) <= TOL


def test_under_autocast_the_linears_come_cast_once_with_the_same_values(monkeypatch):
    """Under bf16 autocast (``--trainer.precision bf16-mixed``) with float32 LM weights, the fused forward's linears
    get their weights and biases cast once (``lm_fused.cast_linears``), and the chunked CE its padded unembedding
    (``LanguageModel.unembedding``), instead of casting them at every call: the activations and ∇ₓL are bit for bit
    those of the float32 weights under autocast, the per-forward weight casts are gone, and the cast copy follows
    in-place edits of the weights."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Casts(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func.overloadpacket is torch.ops.aten._to_copy
            return func(*args, **(kwargs or {}))

    fused, _ = pair("gsae-tiny", FLAGS[-1])
    tokens = some_tokens(fused)
    hook = "blocks.2.hook_resid_post"

    def run(lm):
        counted = Casts()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lm.activations(tokens, hook)  # builds the cast copy, if any
            with counted:
                acts = lm.activations(tokens, hook)
            return acts, lm.activations_and_grads(tokens, hook), counted.n

    plain = fused.fused_weights([hook])  # float32, outside autocast
    assert plain.blocks[0].W_qkv.dtype == torch.float32
    acts, grads, casts = run(fused)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = fused.fused_weights([hook])
        assert cast.blocks[0].W_in.dtype == cast.blocks[2].b_out.dtype == torch.bfloat16
        assert cast.W_E is plain.W_E and cast.blocks[0].ln1_w is plain.blocks[0].ln1_w  # only the linears are cast
        assert fused.fused_weights([hook]) is cast  # built once
    assert fused.fused_weights([hook]) is plain  # outside autocast: the float32 weights

    with torch.autocast("cpu", dtype=torch.bfloat16):  # the chunked CE's unembedding: the padded copy in bf16, once
        u = fused.unembedding()
        assert u.W_U.dtype == torch.bfloat16 and fused.unembedding() is u
    padded = fused.unembedding()
    assert padded.W_U.dtype == torch.float32 and torch.equal(u.W_U, padded.W_U.bfloat16())

    fused._fused_cast.clear()
    monkeypatch.setattr(lm_fused, "cast_linears", lambda w, dtype: w)  # the float32 weights under autocast
    monkeypatch.setattr(fused, "unembedding", lambda: padded)  # and the float32 unembedding
    ref_acts, ref_grads, ref_casts = run(fused)
    monkeypatch.undo()
    assert torch.equal(acts, ref_acts)
    assert torch.equal(grads.acts, ref_grads.acts) and torch.equal(grads.grads, ref_grads.grads)
    # the casts of a forward through 3 blocks of 4 linears: autocast cast every weight and bias (24) and the two float32
    # LayerNorm outputs a block feeds to QKV and W_in (6; the other inputs are bf16 already); cast once, the 6 only
    assert (ref_casts, casts) == (30, 6)

    fused._fused_cast.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = fused.fused_weights([hook])
        with torch.no_grad():
            fused.model.blocks[1].mlp.W_in.mul_(2.0)
        edited = fused.fused_weights([hook])
    assert edited is not before and torch.equal(edited.blocks[1].W_in, fused.model.blocks[1].mlp.W_in.T.bfloat16())


def test_bfloat16_model_close_to_transformer_lens():
    fused, ref = pair("gsae-tiny", FLAGS[-1], dtype="bfloat16")
    tokens = some_tokens(fused)
    hook = "blocks.2.hook_resid_post"
    a, b = fused.activations(tokens, hook), ref.activations(tokens, hook)
    assert a.dtype == b.dtype == torch.bfloat16
    assert rel_err(a, b) < 3e-2
    assert rel_err(fused.logits(tokens), ref.logits(tokens)) < 3e-2
    g = fused.activations_and_grads(tokens, hook).grads
    assert g.dtype == torch.float32 and torch.isfinite(g).all()  # the mean: the bfloat16 sum's, divided in float32


def test_hook_points_cover_the_residual_stream():
    assert lm_fused.hook_point("blocks.3.hook_resid_pre") == (6, "point")
    assert lm_fused.hook_point("blocks.2.hook_resid_post") == lm_fused.hook_point("blocks.3.hook_resid_pre")
    assert lm_fused.hook_point("blocks.3.hook_mlp_out") == (7, "mlp")
    assert lm_fused.hook_point("blocks.3.attn.hook_z") is None
    assert lm_fused.last_step(["blocks.3.hook_mlp_out", "blocks.1.hook_resid_pre"]) == 8


def test_compile_option_runs_the_steps_through_torch_compile(compile_calls):
    """``--model.lm.compile true`` wraps the fused attention and MLP in ``torch.compile`` (replaced here by a
    counting wrapper: a real CPU compilation takes ~60 s for the forward and ~20 s more for the backward on 2 cores;
    measured equal to TransformerLens within 5e-7), and each chunk of the g-SAE's CE (a real compilation of the chunk
    math: tests/test_lm_chunked.py)."""
    compiled = compile_calls
    fused, ref = pair("random-tiny", FLAGS[-1])
    fused.compile = True
    tokens = some_tokens(fused)
    hook = "blocks.1.hook_resid_post"
    assert rel_err(fused.activations(tokens, hook), ref.activations(tokens, hook)) <= TOL
    assert compiled == ["attention", "mlp", "attention", "mlp"]
    # the g-SAE harvest's CE: every chunk's softmax and gradient through the compiled ce_chunk, ∇ₓL unchanged
    compiled.clear()
    hook = "blocks.1.hook_resid_pre"
    got, want = fused.activations_and_grads(tokens, hook), ref.activations_and_grads(tokens, hook)
    assert "ce_chunk" in compiled
    assert rel_err(got.grads, want.grads) <= TOL and float(got.loss) == pytest.approx(float(want.loss), rel=1e-6)


def test_padded_unembedding_follows_in_place_edits_and_dtype_moves():
    """``LanguageModel.unembedding`` (the chunked losses' padded copy, 257 → 320 columns) is built once, equals the
    model's ``W_U`` / ``b_U`` on the real columns and zero past them, and is rebuilt when they change in place or move:
    the harvest's ∇ₓL follows an edit of the unembedding."""
    fused, ref = pair("random-tiny", FLAGS[-1])
    tokens = some_tokens(fused)
    hook = "blocks.1.hook_resid_pre"
    u = fused.unembedding()
    assert fused.unembedding() is u and u.d_vocab == 257 and u.W_U.shape == (fused.d_model, 320)
    assert torch.equal(u.W_U[:, :257], fused.W_U) and torch.equal(u.b_U[:257], fused.b_U)
    assert not u.W_U[:, 257:].any() and not u.b_U[257:].any()
    with torch.no_grad():
        fused.model.unembed.W_U.mul_(1.5)  # the model both share; `ref` builds its padded copy after the edit
    u2 = fused.unembedding()
    assert u2 is not u and torch.equal(u2.W_U[:, :257], fused.W_U)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the autocast copy follows an edit too
        fused.unembedding()
        with torch.no_grad():
            fused.model.unembed.W_U.mul_(2.0)
        assert torch.equal(fused.unembedding().W_U[:, :257], fused.W_U.bfloat16())
    g, g_ref = fused.activations_and_grads(tokens, hook).grads, ref.activations_and_grads(tokens, hook).grads
    assert rel_err(g, g_ref) <= TOL
    fused.model.double()
    assert fused.unembedding().W_U.dtype == torch.float64
