"""Chunked CE gradient and KL = the unchunked definitions, and no full-vocabulary tensor beyond one chunk."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gsae import lm_chunked
from gsae.lm import LanguageModel, next_token_loss
from gsae.metrics import kl_div_per_token

V, D = 97, 16


class VocabTensors(TorchDispatchMode):
    """Records the row count of every op output whose last dim is the vocabulary or its padded width (``rows × V``
    tensors), views of the unembedding matrices themselves (``W_U`` and its padded copies) left out."""

    def __init__(self, *W_Us: torch.Tensor) -> None:
        super().__init__()
        self.widths, self.rows = {W.shape[-1] for W in W_Us}, []
        self.w_u = {W.untyped_storage().data_ptr() for W in W_Us}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] in self.widths:
                if t.untyped_storage().data_ptr() not in self.w_u:
                    self.rows.append(t.numel() // t.shape[-1])
        return out


def setup(seed=0, b=3, t=7):
    gen = torch.Generator().manual_seed(seed)
    W_U, b_U = torch.randn(D, V, generator=gen) * 0.5, torch.randn(V, generator=gen)
    h = torch.randn(b, t, D, generator=gen)
    tokens = torch.randint(0, V, (b, t), generator=gen)
    return h, W_U, b_U, tokens


def unembedding(W_U, b_U, padded: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(W, b, kwargs)`` for the chunked functions: the unembedding as is, or padded with zero columns (97 → 128)
    and ``d_vocab=97``, as ``LanguageModel.unembedding`` hands them over."""
    if not padded:
        return W_U, b_U, {}
    W, b, d_vocab = lm_chunked.pad_unembedding(W_U, b_U)
    assert W.shape == (D, 128) and torch.equal(W[:, :V], W_U) and not W[:, V:].any() and not b[V:].any()
    return W, b, {"d_vocab": d_vocab}


def test_a_vocabulary_that_is_already_a_multiple_is_not_copied():
    W_U, b_U = torch.randn(D, 128), torch.randn(128)
    W, b, d_vocab = lm_chunked.pad_unembedding(W_U, b_U)
    assert W is not None and W.data_ptr() == W_U.data_ptr() and b.data_ptr() == b_U.data_ptr() and d_vocab == 128


PADDED = pytest.mark.parametrize("padded", [False, True], ids=["vocab", "padded"])


def reference_ce_sum_and_grad(h, W_U, b_U, tokens):
    """The summed next-token CE of the full logits and its gradient in ``h``, by autograd (the unchunked definition)."""
    h_ref = h.clone().requires_grad_(True)
    ref = next_token_loss(h_ref @ W_U + b_U, tokens, "sum")
    return ref, torch.autograd.grad(ref, h_ref)[0]


@PADDED
@pytest.mark.parametrize("chunk", [None, 4 * V, V])  # one chunk; 4 rows (21 = 5·4 + 1: a ragged last chunk); 1 row
def test_ce_sum_and_grad_equal_the_unchunked_autograd(chunk, padded):
    h, W_U, b_U, tokens = setup()
    W, b, kw = unembedding(W_U, b_U, padded)
    loss, dh = lm_chunked.ce_sum_and_grad(h, W, b, tokens, chunk_elements=chunk, **kw)
    ref, g = reference_ce_sum_and_grad(h, W_U, b_U, tokens)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(dh, g, rtol=1e-5, atol=1e-6)
    assert torch.all(dh[:, -1] == 0)


@PADDED
@pytest.mark.parametrize("chunk", [None, 4 * V, V])
# a ragged last chunk gets buffers of its own size: torch's resizing of a smaller `out=` tensor is deprecated (it warns now)
@pytest.mark.filterwarnings("error:An output with one or more elements was resized")
def test_kl_per_token_and_its_gradient_equal_the_unchunked_definition(chunk, padded):
    h_clean, W_U, b_U, _ = setup(1)
    W, b, kw = unembedding(W_U, b_U, padded)
    h_new = (h_clean + 0.3 * torch.randn(h_clean.shape, generator=torch.Generator().manual_seed(5))).requires_grad_(True)
    weights = torch.rand(h_clean.shape[:-1], generator=torch.Generator().manual_seed(6))  # a generic upstream gradient
    kl = lm_chunked.kl_per_token(h_clean, h_new, W, b, chunk_elements=chunk, **kw)
    (g,) = torch.autograd.grad((kl * weights).sum(), h_new)
    h_ref = h_new.detach().clone().requires_grad_(True)
    ref = kl_div_per_token(h_clean @ W_U + b_U, h_ref @ W_U + b_U)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), h_ref)
    assert kl.shape == ref.shape == h_clean.shape[:-1]
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


@PADDED
@pytest.mark.parametrize("chunk", [None, 4 * V, V])
def test_evaluation_ce_and_kl_of_many_runs_equal_the_unchunked_definitions(chunk, padded):
    """``ce_and_kl_per_token`` (loss_added): the clean CE, each run's CE and KL to the clean run = the definitions on
    full logits; a run identical to the clean one has exactly zero KL and the clean CE; no (B·T, V) tensor."""
    h_clean, W_U, b_U, tokens = setup(7)
    gen = torch.Generator().manual_seed(8)
    runs = [torch.zeros_like(h_clean), h_clean + 0.3 * torch.randn(h_clean.shape, generator=gen), h_clean.clone()]
    W, b, kw = unembedding(W_U, b_U, padded)
    with VocabTensors(W) as seen:
        res = lm_chunked.ce_and_kl_per_token(h_clean, runs, W, b, tokens, chunk_elements=chunk, **kw)
    if chunk is not None:
        assert max(seen.rows) <= chunk // V, seen.rows
    logits = [h @ W_U + b_U for h in (h_clean, *runs)]
    torch.testing.assert_close(res.ce_clean[:, :-1], next_token_loss(logits[0], tokens, "none"), rtol=1e-5, atol=1e-5)
    assert torch.all(res.ce_clean[:, -1] == 0) and torch.all(res.ce[:, :, -1] == 0)
    for j in range(len(runs)):
        torch.testing.assert_close(res.ce[j, :, :-1], next_token_loss(logits[1 + j], tokens, "none"), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res.kl[j], kl_div_per_token(logits[0], logits[1 + j]), rtol=1e-5, atol=1e-5)
    assert torch.all(res.kl[2] == 0) and torch.equal(res.ce[2], res.ce_clean)
    assert float(res.kl[0].min()) > 0.1  # the ablated and perturbed runs are far from the clean one


@PADDED
@pytest.mark.parametrize("chunk", [None, 2 * V])
def test_kl_to_a_kept_reference_equals_the_unchunked_definition(chunk, padded):
    """``kl_to_reference`` (the perturbation loop): J runs against one kept reference = ``kl_div_per_token`` of full
    logits per run; the reference itself gives 0 to the vocabulary matmul's rounding (exactly 0 where the BLAS rounds a
    row alike at every memory alignment; MKL on an AMD EPYC VM gave ~5e-14); no run's logits beyond one chunk."""
    h, W_U, b_U, _ = setup(9, b=2, t=5)
    ref_h = h.reshape(10, D)
    gen = torch.Generator().manual_seed(10)
    runs = torch.stack([ref_h + 0.5 * torch.randn(ref_h.shape, generator=gen), ref_h.clone(), torch.zeros_like(ref_h)])
    W, b, kw = unembedding(W_U, b_U, padded)
    kept = lm_chunked.reference(ref_h, W, b, **kw)
    assert kept.logits.shape == (10, V)
    with VocabTensors(W) as seen:
        kl = lm_chunked.kl_to_reference(kept, runs, W, b, chunk_elements=chunk, **kw)
    if chunk is not None:
        assert max(seen.rows) <= 2, seen.rows
    want = torch.stack([kl_div_per_token(ref_h @ W_U + b_U, r @ W_U + b_U) for r in runs])
    assert kl.dtype == torch.float64
    torch.testing.assert_close(kl.float(), want, rtol=1e-5, atol=1e-6)
    assert float(kl[1].abs().max()) < 1e-12 and float(kl[0].min()) > 0


def test_kl_of_identical_states_is_zero_with_zero_gradient():
    h, W_U, b_U, _ = setup(2)
    hn = h.clone().requires_grad_(True)
    kl = lm_chunked.kl_per_token(h, hn, W_U, b_U, chunk_elements=2 * V)
    kl.sum().backward()
    assert float(kl.detach().abs().max()) < 1e-6 and float(hn.grad.abs().max()) < 1e-6


def test_no_full_vocabulary_tensor_beyond_one_chunk():
    h, W_U, b_U, tokens = setup(3, b=4, t=8)
    chunk = 3 * V
    with VocabTensors(W_U) as seen:
        lm_chunked.ce_sum_and_grad(h, W_U, b_U, tokens, chunk_elements=chunk)
        hn = h.clone().requires_grad_(True)
        lm_chunked.kl_per_token(h, hn, W_U, b_U, chunk_elements=chunk).sum().backward()
    assert seen.rows and max(seen.rows) <= 3, seen.rows
    # and the LM's own harvest and e2e-style KL: no (B·T, d_vocab) tensor, the default chunk is far smaller here
    lm = LanguageModel("random-tiny", seed=0)
    t = torch.randint(0, 256, (4, 16))
    hook = "blocks.1.hook_resid_pre"
    x = lm.activations(t, hook)
    lm_chunked_rows = lm_chunked.chunk_rows(lm.d_vocab, 8 * lm.d_vocab)
    assert lm.unembedding().W_U.shape[1] == 320  # 257 padded: the harvest's chunks are of the padded width
    old = lm_chunked.CHUNK_ELEMENTS
    lm_chunked.CHUNK_ELEMENTS = 8 * lm.d_vocab
    try:
        with VocabTensors(lm.W_U, lm.unembedding().W_U) as seen:
            lm.activations_and_grads(t, hook)
            clean = lm.hidden_from_hook(x, hook).hidden
            patched = lm.hidden_from_hook((x * 1.1).requires_grad_(True), hook).hidden
            lm_chunked.kl_per_token(clean, patched, lm.W_U, lm.b_U).mean().backward()
    finally:
        lm_chunked.CHUNK_ELEMENTS = old
    assert seen.rows and max(seen.rows) <= lm_chunked_rows, seen.rows
    with VocabTensors(lm.W_U) as control:  # the recorder does see full logits
        lm.logits(t)
    assert max(control.rows) == t.numel()


def test_under_bf16_autocast_the_outputs_are_float32_and_gradients_keep_the_input_dtype():
    h, W_U, b_U, tokens = setup(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, dh = lm_chunked.ce_sum_and_grad(h, W_U, b_U, tokens)
        hn = (h + 0.1).requires_grad_(True)
        kl = lm_chunked.kl_per_token(h, hn, W_U, b_U)
    kl.mean().backward()
    assert loss.dtype == kl.dtype == torch.float32
    assert dh.dtype == hn.grad.dtype == torch.float32
    ref_loss = next_token_loss(h @ W_U + b_U, tokens, "sum")
    assert float(loss) == pytest.approx(float(ref_loss), rel=2e-2)  # bf16 matmul, float32 softmax


def test_kl_of_nearby_states_is_accurate_against_float64():
    """On nearby states (KL ~2e-4 nats over 50,257 tokens) the float32 chunked KL stays within 2.5e-3 relative of a
    float64 reference: the logit gap is taken before the exps (Σ p_c (log p_c − log p_n) was at 4.5–4.7e-3)."""
    g = torch.Generator().manual_seed(0)
    n, d, v = 64, 64, 50257
    W_U, b_U = torch.randn(d, v, generator=g) / 4, torch.randn(v, generator=g) * 0.1
    h_clean = torch.randn(n, d, generator=g)
    h_new = h_clean + 0.01 * torch.randn(n, d, generator=g)
    lp = lambda h: torch.log_softmax(h.double() @ W_U.double() + b_U.double(), -1)  # noqa: E731
    ref = (lp(h_clean).exp() * (lp(h_clean) - lp(h_new))).sum(-1)
    kl = lm_chunked.kl_per_token(h_clean, h_new, W_U, b_U, chunk_elements=16 * v)
    assert float(ref.mean()) < 1e-3
    assert float(((kl.double() - ref).abs() / ref).max()) < 2.5e-3


def test_evaluation_kl_is_accurate_against_float64_near_and_far():
    """The evaluation KL (``_kl_rows``: ``Σ p (expm1(u) − u) + log1p(b) − b`` for nearby states, the direct form for
    far ones) against a float64 reference at GPT-2's vocabulary: nearby states (KL ~1e-4 nats) within 1e-4 relative
    (the log-softmax difference form is at ~1e-3 there), far states (KL of several nats, logits rising by > 2) within
    1e-5, and states in between (a centred logit rising by 8–20 nats: the direct form, ~5e-7; ``expm1``'s form lost
    ~2e-5 to cancellation there) within 5e-6; both through ``kl_to_reference`` and ``ce_and_kl_per_token``."""
    g = torch.Generator().manual_seed(0)
    n, d, v = 48, 64, 50257
    W_U, b_U = torch.randn(d, v, generator=g) / 4, torch.randn(v, generator=g) * 0.1
    h_clean = torch.randn(n, d, generator=g)
    near = h_clean + 0.005 * torch.randn(n, d, generator=g)
    far = 3 * torch.randn(n, d, generator=g)
    mid = h_clean + 1.5 * torch.randn(n, d, generator=g)
    lp = lambda h: torch.log_softmax(h.double() @ W_U.double() + b_U.double(), -1)  # noqa: E731
    states = (("near", near), ("far", far), ("mid", mid))
    want = {name: (lp(h_clean).exp() * (lp(h_clean) - lp(h))).sum(-1) for name, h in states}
    assert float(want["near"].max()) < 1e-3 and float(want["far"].min()) > 1.0
    p_clean = lp(h_clean).exp()
    u = lp(mid) - lp(h_clean)
    rise = (u - (p_clean * u).sum(-1, keepdim=True)).amax(-1)  # the largest centred logit rise of each mid row
    assert float(rise.min()) > 8 and float(rise.max()) < 20
    kept = lm_chunked.reference(h_clean, W_U, b_U)
    via_ref = lm_chunked.kl_to_reference(kept, torch.stack([near, far, mid]), W_U, b_U, chunk_elements=16 * v)
    tokens = torch.randint(0, v, (1, n), generator=g)
    via_ce = lm_chunked.ce_and_kl_per_token(h_clean[None], [near[None], far[None], mid[None]], W_U, b_U, tokens).kl[:, 0]
    for got in (via_ref, via_ce.double()):
        assert float(((got[0] - want["near"]).abs() / want["near"]).max()) < 1e-4
        assert float(((got[1] - want["far"]).abs() / want["far"]).max()) < 1e-5
        assert float(((got[2] - want["mid"]).abs() / want["mid"]).max()) < 5e-6
    textbook = kl_div_per_token(h_clean @ W_U + b_U, near @ W_U + b_U).double()
    assert float(((textbook - want["near"]).abs() / want["near"]).max()) > 3e-4  # what the new form improves on


@PADDED
def test_the_per_chunk_math_for_torch_compile_equals_the_definitions(padded):
    """``ce_chunk`` / ``kl_chunk`` (the functional forms ``--model.lm.compile`` compiles), run eagerly on one chunk of raw
    vocabulary products: the CE sum, the KL per row and both gradients with respect to the logits = autograd on the
    unchunked definitions; rows without a label contribute nothing."""
    h, W_U, b_U, tokens = setup(11)
    W, b, kw = unembedding(W_U, b_U, padded)
    flat = h.reshape(-1, D)
    labels = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -1)], dim=1).reshape(-1)
    loss, p = lm_chunked.ce_chunk(flat @ W + b, labels, V, torch.float32)
    logits = (flat @ W_U + b_U).requires_grad_(True)
    valid = labels >= 0
    ref = torch.nn.functional.cross_entropy(logits[valid], labels[valid], reduction="sum")
    (g,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(p, g, rtol=1e-5, atol=1e-6)
    assert p.shape == (flat.shape[0], V) and not p[~valid].any()
    h_new = flat + 0.3 * torch.randn(flat.shape, generator=torch.Generator().manual_seed(12))
    kl, g_kl = lm_chunked.kl_chunk(flat @ W + b, h_new @ W + b, V, torch.float32)
    new = (h_new @ W_U + b_U).requires_grad_(True)
    ref_kl = kl_div_per_token(flat @ W_U + b_U, new)
    (g_ref,) = torch.autograd.grad(ref_kl.sum(), new)
    torch.testing.assert_close(kl, ref_kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_kl, g_ref, rtol=1e-5, atol=1e-6)


def test_compiled_chunks_equal_the_eager_loop():
    """``compile=True`` (a real ``torch.compile``: ~20 s on 2 CPU cores, once per process): the CE gradient and the KL
    with its gradient equal the eager in-place loop, over full and ragged chunks (21 positions, 4 per chunk) of a padded
    vocabulary, and in bf16 autocast the outputs keep their dtypes."""
    h, W_U, b_U, tokens = setup(13)
    W, b, kw = unembedding(W_U, b_U, True)
    chunk = 4 * W.shape[1]
    eager = lm_chunked.ce_sum_and_grad(h, W, b, tokens, chunk_elements=chunk, **kw)
    fused = lm_chunked.ce_sum_and_grad(h, W, b, tokens, chunk_elements=chunk, compile=True, **kw)
    torch.testing.assert_close(fused[0], eager[0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(fused[1], eager[1], rtol=1e-5, atol=1e-6)
    h_new = h + 0.3 * torch.randn(h.shape, generator=torch.Generator().manual_seed(14))
    weights = torch.rand(h.shape[:-1], generator=torch.Generator().manual_seed(15))
    out = []
    for compile in (False, True):
        x = h_new.clone().requires_grad_(True)
        kl = lm_chunked.kl_per_token(h, x, W, b, chunk_elements=chunk, compile=compile, **kw)
        (g,) = torch.autograd.grad((kl * weights).sum(), x)
        out.append((kl, g))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, dh = lm_chunked.ce_sum_and_grad(h, W, b, tokens, compile=True, **kw)
    assert loss.dtype == dh.dtype == torch.float32
    assert float(loss) == pytest.approx(float(eager[0]), rel=2e-2)


@pytest.mark.parametrize("shift", [-30.0, -16.0, -10.0, 10.0, 30.0])
def test_evaluation_kl_ignores_a_common_shift_of_the_logits(shift):
    """Logits that all move by the same amount (an unembedding loaded without ``center_unembed``, as SAELens evaluates
    GPT-2, spreads a state's change over every logit) leave the KL unchanged. ``_kl_rows``' nearby-state form had
    ``b → −1`` there: at −10 a 1–5% error, at −16 NaN or 84 nats for a true 0.12. Reference: float64 log-softmax."""
    g = torch.Generator().manual_seed(1)
    r, v = 64, 50257
    l_ref = torch.randn(r, v, generator=g) * 2
    l_new = l_ref + 0.3 * torch.randn(r, v, generator=g) + shift
    l_new[::4] += 3 * torch.randn(r // 4, v, generator=g)  # some far rows too
    lp_ref, lp_new = torch.log_softmax(l_ref.double(), -1), torch.log_softmax(l_new.double(), -1)
    want = (lp_ref.exp() * (lp_ref - lp_new)).sum(-1)
    got = lm_chunked._kl_rows(l_ref, torch.softmax(l_ref, -1), l_new.clone())
    assert torch.isfinite(got).all()
    assert float(((got - want).abs() / want).max()) < 1e-4, float(((got - want).abs() / want).max())


def test_a_chunk_holds_at_most_chunk_elements_of_the_padded_width():
    """``chunk_elements`` counts the logits of the matmul's width, the padded one (``CHUNK_ELEMENTS``: 667 positions
    of GPT-2's vocabulary padded to 50,304), not the real vocabulary's: with 4·97 elements per chunk every chunked
    function's ``(rows, 128)`` products hold 3 rows (4 rows of 128 columns would be 512 elements)."""
    h, W_U, b_U, tokens = setup(3, b=4, t=8)
    W, b, kw = unembedding(W_U, b_U, True)
    chunk = 4 * V
    hn = (h + 0.1 * torch.randn(h.shape, generator=torch.Generator().manual_seed(4))).requires_grad_(True)
    kept = lm_chunked.reference(h.reshape(-1, D), W, b, **kw)
    runs = {
        "ce_sum_and_grad": lambda: lm_chunked.ce_sum_and_grad(h, W, b, tokens, chunk_elements=chunk, **kw),
        "kl_per_token": lambda: lm_chunked.kl_per_token(h, hn, W, b, chunk_elements=chunk, **kw).sum().backward(),
        "ce_and_kl_per_token": lambda: lm_chunked.ce_and_kl_per_token(h, [hn.detach()], W, b, tokens,
                                                                      chunk_elements=chunk, **kw),
        "kl_to_reference": lambda: lm_chunked.kl_to_reference(kept, hn.detach().reshape(1, -1, D), W, b,
                                                              chunk_elements=chunk, **kw),
    }
    for name, run in runs.items():
        with VocabTensors(W) as seen:
            run()
        assert seen.rows and max(seen.rows) == chunk // W.shape[1] == 3, (name, seen.rows)


def test_token_zero_is_a_next_token_like_any_other():
    """Token id 0 (GPT-2's ``!``) is a real label: only a sequence's last position (label −1 inside the chunked
    functions) predicts nothing. On tokens that are mostly 0, the CE sums, CE per token and the CE gradient equal the
    unchunked definitions (a ``label > 0`` test would drop every position that predicts token 0)."""
    h, W_U, b_U, tokens = setup(15)
    tokens[:, ::2] = 0
    assert (tokens[:, 1:] == 0).sum() >= 6
    ref, g = reference_ce_sum_and_grad(h, W_U, b_U, tokens)
    loss, dh = lm_chunked.ce_sum_and_grad(h, W_U, b_U, tokens, chunk_elements=4 * V)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(dh, g, rtol=1e-5, atol=1e-6)
    labels = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -1)], dim=1).reshape(-1)
    chunk_loss, _ = lm_chunked.ce_chunk(h.reshape(-1, D) @ W_U + b_U, labels, V, torch.float32)
    torch.testing.assert_close(chunk_loss, ref, rtol=1e-6, atol=1e-5)
    res = lm_chunked.ce_and_kl_per_token(h, [h + 0.1], W_U, b_U, tokens, chunk_elements=4 * V)
    torch.testing.assert_close(res.ce_clean[:, :-1], next_token_loss(h @ W_U + b_U, tokens, "none"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.ce[0, :, :-1], next_token_loss((h + 0.1) @ W_U + b_U, tokens, "none"), rtol=1e-5,
                               atol=1e-5)


def test_logits_spread_over_hundreds_of_nats_give_the_unchunked_values():
    """A sharp distribution (logits spread over hundreds of nats, where ``exp`` of them overflows float32): each row is
    shifted by its largest logit before the ``exp``, so the chunked CE, its gradient and the KL stay finite and equal
    the unchunked (log-softmax) definitions."""
    h, W_U, b_U, tokens = setup(16)
    h = h * 40
    logits = h @ W_U + b_U
    assert float((logits.amax(-1) - logits.amin(-1)).min()) > 200
    ref, g = reference_ce_sum_and_grad(h, W_U, b_U, tokens)
    loss, dh = lm_chunked.ce_sum_and_grad(h, W_U, b_U, tokens, chunk_elements=4 * V)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(dh, g, rtol=1e-5, atol=1e-5)
    h_new = (h + 0.5 * torch.randn(h.shape, generator=torch.Generator().manual_seed(17))).requires_grad_(True)
    kl = lm_chunked.kl_per_token(h, h_new, W_U, b_U, chunk_elements=4 * V)
    (g_kl,) = torch.autograd.grad(kl.sum(), h_new)
    h_ref = h_new.detach().clone().requires_grad_(True)
    want = kl_div_per_token(logits, h_ref @ W_U + b_U)
    (g_want,) = torch.autograd.grad(want.sum(), h_ref)
    torch.testing.assert_close(kl, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g_kl, g_want, rtol=1e-4, atol=1e-4)
    res = lm_chunked.ce_and_kl_per_token(h, [h_new.detach()], W_U, b_U, tokens, chunk_elements=4 * V)
    torch.testing.assert_close(res.ce_clean[:, :-1], next_token_loss(logits, tokens, "none"), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(res.kl[0], want.detach(), rtol=1e-4, atol=1e-4)


def test_under_autocast_the_vocabulary_matmuls_run_in_the_autocast_dtype():
    """Under bf16 autocast every chunked function computes the logits in bf16 (then upcasts for the softmax), as the
    LM's own unembedding does under autocast: the same numbers, bit for bit, as a bf16 unembedding outside autocast,
    and not the float32 ones."""
    h, W_U, b_U, tokens = setup(4)
    W, b, kw = unembedding(W_U, b_U, True)
    h_new = h + 0.2 * torch.randn(h.shape, generator=torch.Generator().manual_seed(18))
    weights = torch.rand(h.shape[:-1], generator=torch.Generator().manual_seed(19))

    def every_output(W, b):
        loss, dh = lm_chunked.ce_sum_and_grad(h, W, b, tokens, chunk_elements=4 * W.shape[1], **kw)
        x = h_new.clone().requires_grad_(True)
        kl = lm_chunked.kl_per_token(h, x, W, b, chunk_elements=4 * W.shape[1], **kw)
        (g,) = torch.autograd.grad((kl * weights).sum(), x)
        res = lm_chunked.ce_and_kl_per_token(h, [h_new], W, b, tokens, **kw)
        ref = lm_chunked.reference(h.reshape(-1, D), W, b, **kw)
        to_ref = lm_chunked.kl_to_reference(ref, h_new.reshape(1, -1, D), W, b, **kw)
        return {"ce": loss, "dh": dh, "kl": kl, "kl_grad": g, "ce_clean": res.ce_clean, "ce_run": res.ce,
                "kl_run": res.kl, "ref_logits": ref.logits, "kl_to_reference": to_ref}

    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = every_output(W, b)
    bf16 = every_output(W.bfloat16(), b.bfloat16())
    fp32 = every_output(W, b)
    for key, value in autocast.items():
        assert value.dtype == fp32[key].dtype, key  # float32 outputs; gradients in h's dtype; the KL in float64
        assert torch.equal(value, bf16[key]), key
        assert not torch.equal(value, fp32[key]), key
