"""A fused GPT-2 forward over the residual stream, built from a loaded model's weights (no TransformerLens here).

TransformerLens runs every block through ~20 ``HookPoint`` modules, einops rearranges and a masked
softmax; the maths is a handful of matmuls. This module runs the same maths with one packed QKV matmul,
``F.scaled_dot_product_attention(is_causal=True)``, ``F.layer_norm`` (weights and biases absent when
LayerNorm was folded: TransformerLens' ``LNPre``) and the model's activation (``gelu_new`` is
``F.gelu(approximate="tanh")``). It receives tensors only: :func:`gsae.lm.fused_weights` reads them
from the ``HookedTransformer`` (TransformerLens stays the loader and the reference; ``tests/test_lm_fused.py``
checks every supported hook, the logits and ``∇ₓL`` against it).

Points on the residual stream are numbered ``2·L`` (``blocks.L.hook_resid_pre``), ``2·L+1``
(``blocks.L.hook_resid_mid``) and ``2·L+2`` (``blocks.L.hook_resid_post`` = ``blocks.L+1.hook_resid_pre``);
step ``2·L → 2·L+1`` adds the attention output (``blocks.L.hook_attn_out``), step ``2·L+1 → 2·L+2`` the MLP
output (``blocks.L.hook_mlp_out``). ``hook_embed`` / ``hook_pos_embed`` are the two terms of point 0.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

#: activation functions the fused path runs (TransformerLens ``cfg.act_fn`` names)
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),  # the same formula as gelu_new, factored differently
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}

_HOOK = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_mid|hook_resid_post|hook_attn_out|hook_mlp_out)$")


class Block(NamedTuple):
    """One pre-LN transformer block; matrices in ``F.linear``'s ``(out, in)`` layout (views where possible).

    Attributes:
        ln1_w, ln1_b, ln2_w, ln2_b: LayerNorm scale and bias (``None`` when LayerNorm was folded).
        W_qkv, b_qkv: packed ``(3·H·d_head, D)`` queries, keys, values and their bias.
        W_O, b_O: ``(D, H·d_head)`` attention output.
        W_in, b_in, W_out, b_out: ``(d_mlp, D)`` and ``(D, d_mlp)`` MLP matrices.
    """

    ln1_w: Tensor | None
    ln1_b: Tensor | None
    W_qkv: Tensor
    b_qkv: Tensor
    W_O: Tensor
    b_O: Tensor
    ln2_w: Tensor | None
    ln2_b: Tensor | None
    W_in: Tensor
    b_in: Tensor
    W_out: Tensor
    b_out: Tensor


class FusedGPT2(NamedTuple):
    """The weights and the few numbers a GPT-2-architecture forward needs.

    Attributes:
        W_E: ``(d_vocab, D)`` token embedding. W_pos: ``(n_ctx, D)`` learned positions.
        blocks: the transformer blocks. lnf_w, lnf_b: final LayerNorm (``None`` when folded).
        W_U: ``(D, d_vocab)`` unembedding. b_U: ``(d_vocab,)``.
        n_heads, d_head: attention shape. eps: LayerNorm epsilon. attn_scale: scores are ``q·k / attn_scale``.
        act_fn: a key of :data:`ACTIVATIONS`.
    """

    W_E: Tensor
    W_pos: Tensor
    blocks: tuple[Block, ...]
    lnf_w: Tensor | None
    lnf_b: Tensor | None
    W_U: Tensor
    b_U: Tensor
    n_heads: int
    d_head: int
    eps: float
    attn_scale: float
    act_fn: str

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def final_point(self) -> int:
        return 2 * self.n_layers


def pack_block(
    W_Q: Tensor, W_K: Tensor, W_V: Tensor, b_Q: Tensor, b_K: Tensor, b_V: Tensor, W_O: Tensor, b_O: Tensor,
    W_in: Tensor, b_in: Tensor, W_out: Tensor, b_out: Tensor,
    ln1: tuple[Tensor | None, Tensor | None], ln2: tuple[Tensor | None, Tensor | None],
) -> Block:
    """A :class:`Block` from TransformerLens-layout weights (``W_Q (H, D, d_head)``, ``W_O (H, d_head, D)``,
    ``W_in (D, d_mlp)``, ``W_out (d_mlp, D)``); only the QKV matrix is a new tensor."""
    H, D, dh = W_Q.shape
    W_qkv = torch.cat([W.permute(0, 2, 1).reshape(H * dh, D) for W in (W_Q, W_K, W_V)]).contiguous()
    b_qkv = torch.cat([b.reshape(H * dh) for b in (b_Q, b_K, b_V)])
    return Block(ln1[0], ln1[1], W_qkv, b_qkv, W_O.reshape(H * dh, D).T, b_O, ln2[0], ln2[1], W_in.T, b_in, W_out.T, b_out)


def cast_linears(w: FusedGPT2, dtype: torch.dtype) -> FusedGPT2:
    """``w`` with every block's ``F.linear`` weights and biases in ``dtype`` (LayerNorms, embeddings and the
    unembedding unchanged): what autocast casts them to at every call. Under autocast a block's linear then finds its
    weights cast already (autocast's ``.to`` of a tensor in its dtype is a no-op): the same values, bit for bit,
    without two cast kernels per linear per forward (48 in a forward to GPT-2's layer 6; a GPU launches each)."""

    def cast(t: Tensor) -> Tensor:
        return t.detach().to(dtype)

    blocks = tuple(
        b._replace(W_qkv=cast(b.W_qkv), b_qkv=cast(b.b_qkv), W_O=cast(b.W_O), b_O=cast(b.b_O), W_in=cast(b.W_in),
                   b_in=cast(b.b_in), W_out=cast(b.W_out), b_out=cast(b.b_out))
        for b in w.blocks
    )
    return w._replace(blocks=blocks)


# ---------------------------------------------------------------------------------------------- hooks
def hook_point(hook: str) -> tuple[int, str] | None:
    """``(point, kind)`` of a hook the fused path computes, ``kind`` in ``point`` / ``attn`` / ``mlp`` /
    ``embed`` / ``pos_embed`` (the output of step ``point → point+1`` for attn / mlp); ``None`` otherwise."""
    if hook in ("hook_embed", "hook_pos_embed"):
        return 0, hook[5:]
    m = _HOOK.match(hook)
    if m is None:
        return None
    layer, name = int(m.group(1)), m.group(2)
    return {
        "hook_resid_pre": (2 * layer, "point"),
        "hook_resid_mid": (2 * layer + 1, "point"),
        "hook_resid_post": (2 * layer + 2, "point"),
        "hook_attn_out": (2 * layer, "attn"),
        "hook_mlp_out": (2 * layer + 1, "mlp"),
    }[name]


def last_step(hooks: Sequence[str]) -> int:
    """The residual point after which none of ``hooks`` (all supported) is computed any more."""
    end = 0
    for h in hooks:
        point, kind = hook_point(h)
        end = max(end, point + 1 if kind in ("attn", "mlp") else point)
    return end


# ---------------------------------------------------------------------------------------------- the maths
def embed(w: FusedGPT2, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Token and position embeddings ``(B, T, D)`` each (``hook_embed``, ``hook_pos_embed``)."""
    return w.W_E[tokens], w.W_pos[: tokens.shape[1]].expand(tokens.shape[0], -1, -1)


def attention(w: FusedGPT2, b: Block, x: Tensor) -> Tensor:
    """``blocks.L.hook_attn_out`` from ``blocks.L.hook_resid_pre``."""
    B, T, D = x.shape
    h = F.layer_norm(x, (D,), b.ln1_w, b.ln1_b, w.eps)
    # unbind (not three selects): its backward writes the three gradients into one tensor, no zero-filled copies
    q, k, v = (t.transpose(1, 2) for t in F.linear(h, b.W_qkv, b.b_qkv).view(B, T, 3, w.n_heads, w.d_head).unbind(2))
    z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / w.attn_scale)
    return F.linear(z.transpose(1, 2).reshape(B, T, w.n_heads * w.d_head), b.W_O, b.b_O)


def mlp(w: FusedGPT2, b: Block, x: Tensor) -> Tensor:
    """``blocks.L.hook_mlp_out`` from ``blocks.L.hook_resid_mid``."""
    h = F.layer_norm(x, (x.shape[-1],), b.ln2_w, b.ln2_b, w.eps)
    return F.linear(ACTIVATIONS[w.act_fn](F.linear(h, b.W_in, b.b_in)), b.W_out, b.b_out)


class Steps(NamedTuple):
    """The two step functions :func:`run` applies (plain, or ``torch.compile`` d: :func:`compiled_steps`)."""

    attention: Callable[[FusedGPT2, Block, Tensor], Tensor]
    mlp: Callable[[FusedGPT2, Block, Tensor], Tensor]


_COMPILED: Steps | None = None


def compiled_steps() -> Steps:
    """:func:`attention` and :func:`mlp` under ``torch.compile`` (compiled once per process, on first use)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = Steps(torch.compile(attention, dynamic=False), torch.compile(mlp, dynamic=False))
    return _COMPILED


def run(
    w: FusedGPT2, x: Tensor, start: int, stop: int, cache_hooks: Sequence[str] = (), steps: Steps | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """The residual at point ``stop`` from ``x`` at point ``start``, and the ``cache_hooks`` met on the way
    (points in ``[start, stop]``, step outputs of steps in ``[start, stop)``)."""
    steps = steps or Steps(attention, mlp)
    want: dict[tuple[int, str], list[str]] = {}
    for h in cache_hooks:
        want.setdefault(hook_point(h), []).append(h)
    cache: dict[str, Tensor] = {}
    for h in want.get((start, "point"), []):
        cache[h] = x
    for s in range(start, stop):
        block = w.blocks[s // 2]
        kind = "attn" if s % 2 == 0 else "mlp"
        delta = steps.attention(w, block, x) if kind == "attn" else steps.mlp(w, block, x)
        for h in want.get((s, kind), []):
            cache[h] = delta
        x = x + delta
        for h in want.get((s + 1, "point"), []):
            cache[h] = x
    return x, cache


# ------------------------------------------------------------------------- one new position, cached prefix
def prefix_keys_values(w: FusedGPT2, x: Tensor, start: int) -> list[tuple[Tensor, Tensor] | None]:
    """Per step from ``start`` on, the keys and values ``(H, P, d_head)`` of one sequence ``x (1, P, D)`` at point
    ``start`` (``None`` for MLP steps): what a position after the sequence attends to (:func:`run_last`)."""
    kvs: list[tuple[Tensor, Tensor] | None] = []
    for s in range(start, w.final_point):
        block = w.blocks[s // 2]
        if s % 2:
            kvs.append(None)
            if s + 1 < w.final_point:  # the last MLP's output is read by no later key
                x = x + mlp(w, block, x)
            continue
        P, D = x.shape[1], x.shape[2]
        h = F.layer_norm(x, (D,), block.ln1_w, block.ln1_b, w.eps)
        q, k, v = F.linear(h, block.W_qkv, block.b_qkv).view(1, P, 3, w.n_heads, w.d_head).unbind(2)
        kvs.append((k[0].transpose(0, 1), v[0].transpose(0, 1)))
        if s + 2 < w.final_point:  # else only the skipped last MLP would read it
            z = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True, scale=1.0 / w.attn_scale)
            x = x + F.linear(z.transpose(1, 2).reshape(1, P, w.n_heads * w.d_head), block.W_O, block.b_O)
    return kvs


def run_last(w: FusedGPT2, x: Tensor, kvs: Sequence[tuple[Tensor, Tensor] | None], start: int) -> Tensor:
    """The residual at the final point of ``R`` alternative next positions ``x (R, D)`` at point ``start``, each
    appended to the same prefix (``kvs``: :func:`prefix_keys_values`); ``(R, D)``.

    Row r is the last position of ``cat(prefix, x[r])`` run causally: its query attends to the prefix's keys
    (one ``(H, R, d_head) @ (H, d_head, P)`` product, no copy of the prefix per row) and to its own key.
    """
    R, D = x.shape
    x = x[:, None]  # (R, 1, D)
    for s, kv in zip(range(start, w.final_point), kvs, strict=True):
        block = w.blocks[s // 2]
        if kv is None:
            x = x + mlp(w, block, x)
            continue
        k_p, v_p = kv
        h = F.layer_norm(x, (D,), block.ln1_w, block.ln1_b, w.eps)
        q, k, v = F.linear(h, block.W_qkv, block.b_qkv).view(R, 3, w.n_heads, w.d_head).permute(1, 2, 0, 3).unbind(0)  # (H, R, dh)
        scores = torch.cat([q @ k_p.transpose(1, 2), (q * k).sum(-1, keepdim=True)], -1) / w.attn_scale  # (H, R, P+1)
        att = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
        z = att[..., :-1] @ v_p + att[..., -1:] * v  # (H, R, dh)
        x = x + F.linear(z.transpose(0, 1).reshape(R, 1, -1), block.W_O, block.b_O)
    return x[:, 0]


def final_hidden(w: FusedGPT2, resid: Tensor) -> Tensor:
    """The final LayerNorm of the residual after the last block (the unembedding's input)."""
    return F.layer_norm(resid, (resid.shape[-1],), w.lnf_w, w.lnf_b, w.eps)


def unembed(W_U: Tensor, b_U: Tensor, h: Tensor) -> Tensor:
    """Logits ``h @ W_U + b_U`` (``W_U`` used in place: no transposed copy of the vocabulary matrix)."""
    return torch.matmul(h, W_U) + b_U
