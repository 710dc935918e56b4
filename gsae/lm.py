"""The frozen language model: the only module of gsae that touches TransformerLens.

Everything the rest of the framework needs from the LM goes through :class:`LanguageModel`:
load by name (or build a random-init GPT-2-architecture model), resolve and validate a hook
name, the activation width ``d_in`` at a hook, activations at a hook (running no layer after
it), ``dL/dx`` at a hook (one backward from the LM loss to the hook only), and running the rest
of the model from a hook. A move from ``HookedTransformer`` to TransformerLens' successor API
is a change to this file alone.

Weight processing (SPEC §0): TransformerLens' ``from_pretrained`` folds LayerNorm and centres
the writing weights and the unembedding by default, which changes residual-stream values. The
flags are explicit options so that an SAE is always evaluated on the model it was trained on.
"""

from __future__ import annotations

import codecs
import functools
import logging
import os
import re
import socket
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from jsonargparse.typing import final
from torch import Tensor

from gsae import lm_chunked, lm_fused

log = logging.getLogger(__name__)

#: Architectures for random-weight models, built in-process (no download). ``random-gpt2`` is
#: GPT-2 small's shape (for speed measurements), ``random-gpt2-medium`` / ``-large`` / ``-xl`` the larger GPT-2s'
#: (the scaling configs offline); ``random-tiny`` is small enough for tests.
RANDOM_PRESETS: dict[str, dict[str, int]] = {
    "random-tiny": dict(n_layers=2, d_model=64, n_heads=4, d_mlp=256, n_ctx=128, d_vocab=257),
    "random-small": dict(n_layers=4, d_model=128, n_heads=4, d_mlp=512, n_ctx=256, d_vocab=257),
    "random-gpt2": dict(n_layers=12, d_model=768, n_heads=12, d_mlp=3072, n_ctx=1024, d_vocab=50257),
    "random-gpt2-medium": dict(n_layers=24, d_model=1024, n_heads=16, d_mlp=4096, n_ctx=1024, d_vocab=50257),
    "random-gpt2-large": dict(n_layers=36, d_model=1280, n_heads=20, d_mlp=5120, n_ctx=1024, d_vocab=50257),
    "random-gpt2-xl": dict(n_layers=48, d_model=1600, n_heads=25, d_mlp=6400, n_ctx=1024, d_vocab=50257),
}
#: Byte-level vocabulary of the random models with ``d_vocab=257``: ids 0..255 are bytes, 256 is BOS/EOS.
BYTE_BOS = 256

_LAYER_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")


class LMLoadError(RuntimeError):
    """The language model could not be loaded (unknown name, hub unreachable, bad option)."""


class HookRun(NamedTuple):
    """What :meth:`LanguageModel.run_from_hook` returns.

    Attributes:
        logits: ``(B, T, d_vocab)`` next-token logits of the model with ``x`` at the hook.
        cache: activations at the requested downstream hooks, ``{hook: (B, T, D)}``.
    """

    logits: Tensor
    cache: dict[str, Tensor]


class HiddenRun(NamedTuple):
    """What :meth:`LanguageModel.hidden_from_hook` returns.

    Attributes:
        hidden: ``(B, T, D)`` final hidden state (after the final LayerNorm; ``logits = hidden @ W_U + b_U``).
        cache: activations at the requested downstream hooks, ``{hook: (B, T, D)}``.
    """

    hidden: Tensor
    cache: dict[str, Tensor]


class ActsAndGrads(NamedTuple):
    """What :meth:`LanguageModel.activations_and_grads` returns.

    Attributes:
        acts: ``(B, T, D)`` activations at the hook (detached).
        grads: ``(B, T, D)`` ``dL/dx`` at the hook for the LM cross-entropy ``L`` (detached).
        loss: the scalar LM loss the gradient was taken of.
    """

    acts: Tensor
    grads: Tensor
    loss: Tensor


def _name_bytes(error: UnicodeDecodeError) -> tuple[str, int]:
    """A decoding error handler: bytes that are not UTF-8 as ``<0xE2>``."""
    return "".join(f"<0x{b:02X}>" for b in error.object[error.start : error.end]), error.end


_BYTE_NAMES = "gsae.byte_names"
codecs.register_error(_BYTE_NAMES, _name_bytes)


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: each printable character for the byte it stands for (``bytes_to_unicode``)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def _byte_level_bytes(symbol: str | None) -> bytes | None:
    """The bytes a byte-level BPE token symbol stands for, or None if ``symbol`` is not one."""
    decoder = _byte_decoder()
    if not symbol or any(c not in decoder for c in symbol):
        return None
    return bytes(decoder[c] for c in symbol)


@final
class LanguageModel:
    """A frozen TransformerLens language model, loaded lazily and never saved in a checkpoint.

    Names: any TransformerLens model name (``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``, ...),
    loaded from the Hugging Face hub (or its local cache); or a random-weight GPT-2 architecture
    built in-process: ``random-tiny`` (2 layers, d_model 64, byte vocabulary, for tests),
    ``random-small`` (4 layers, d_model 128), ``random-gpt2`` (GPT-2 small's shape, for speed
    measurements) and ``random-gpt2-medium`` / ``-large`` / ``-xl`` (the larger GPT-2s' shapes). Random models use
    ``seed`` for their weights and keep them as drawn: the weight-processing options do not apply to them, and
    :meth:`describe` reports them off.
    """

    def __init__(
        self,
        name: str = "gpt2",
        fold_ln: bool = True,
        center_writing_weights: bool = True,
        center_unembed: bool = True,
        fold_value_biases: bool = True,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        seed: int = 0,
        fused: bool = True,
        compile: bool = False,
    ) -> None:
        """Describe the model; weights load on first use.

        Args:
            name: TransformerLens model name (``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``, ...)
                or a random-weight preset (``random-tiny``, ``random-small``, ``random-gpt2``).
            fold_ln: fold LayerNorm weights into the following layer (TransformerLens default True).
            center_writing_weights: centre the weights that write to the residual stream; changes
                residual values (SPEC §0: JB and Apollo SAEs need True, OpenAI v5 SAEs False).
            center_unembed: centre the unembedding (logits shift by a constant; softmax unchanged).
            fold_value_biases: fold the value biases into the attention output bias (TransformerLens' default): the
                residual stream is unchanged, ``hook_v``/``hook_z`` shift by ``−b_V`` (SAELens evaluates without it,
                so its ``hook_z`` SAEs are read with ``false``).
            dtype: dtype of the LM weights and activations (``bfloat16`` halves memory on GPU).
            seed: weight seed of random-weight presets (ignored for pretrained models).
            fused: run residual-stream hooks (``blocks.L.hook_resid_pre/mid/post``, ``hook_attn_out``,
                ``hook_mlp_out``, embeddings) through the fused GPT-2 forward of :mod:`gsae.lm_fused`
                (same values as TransformerLens; ~2x faster; its packed QKV matrices are a copy, +25% of the
                block weights' memory); ``false`` runs everything through TransformerLens. Other hooks and other
                architectures always use TransformerLens.
            compile: ``torch.compile`` the fused attention and MLP, and the softmax-and-gradient math of each chunk of
                the g-SAE's CE and the e2e KL (:func:`gsae.lm_chunked.compiled`); for GPUs: the first batch pays the
                compilation (on 2 CPU cores about a minute).
        """
        self.name = name
        # a random preset's weights are used as drawn (its LayerNorms are the identity, its biases 0): recorded as
        # unprocessed, so that a checkpoint or export does not claim a processing its activations never had
        processed = name not in RANDOM_PRESETS
        self.fold_ln = fold_ln and processed
        self.center_writing_weights = center_writing_weights and processed
        self.center_unembed = center_unembed and processed
        self.fold_value_biases = fold_value_biases and processed
        self.dtype = dtype
        self.seed = seed
        self.fused = fused
        self.compile = compile
        self._model = None
        self._fused: tuple[tuple, lm_fused.FusedGPT2] | None = None
        self._fused_cast: dict[torch.dtype, lm_fused.FusedGPT2] = {}  # the fused weights' linears in an autocast dtype
        self._fused_unsupported: str | None = None
        self._unembedding: tuple[tuple, lm_chunked.Unembedding] | None = None
        self._unembedding_cast: dict[torch.dtype, lm_chunked.Unembedding] = {}  # the padded copy in an autocast dtype
        self._params: tuple[object, list] | None = None  # (model, its parameters): listing them walks every module
        self._d_in_cache: dict[str, int] = {}
        if name.startswith("random-") and name not in RANDOM_PRESETS:
            raise LMLoadError(f"--model.lm.name: unknown random preset {name!r}; choose from {sorted(RANDOM_PRESETS)}")

    # ------------------------------------------------------------------ loading
    def describe(self) -> dict:
        """The options that rebuild this model (stored in checkpoints and SAELens exports)."""
        return dict(
            name=self.name,
            fold_ln=self.fold_ln,
            center_writing_weights=self.center_writing_weights,
            center_unembed=self.center_unembed,
            fold_value_biases=self.fold_value_biases,
            dtype=self.dtype,
            seed=self.seed,
        )

    @property
    def model(self):
        """The TransformerLens model: frozen (no grad), in eval mode; loaded on first access."""
        if self._model is None:
            self._model = self._load()
            self._model.eval()
            for p in self._model.parameters():
                p.requires_grad_(False)
        return self._model

    def _load(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from transformer_lens import HookedTransformer

            if self.name in RANDOM_PRESETS:
                return build_hooked_transformer(RANDOM_PRESETS[self.name], seed=self.seed, dtype=self.dtype)
            loader = _local_loader(self.name)
            if loader is not None:
                return loader(self)
            kwargs = dict(
                fold_ln=self.fold_ln,
                center_writing_weights=self.center_writing_weights,
                center_unembed=self.center_unembed,
                fold_value_biases=self.fold_value_biases,
                dtype=self.dtype,
                device="cpu",
            )
            try:
                return _from_pretrained_offline_first(HookedTransformer, self.name, kwargs)
            except OSError as e:
                raise LMLoadError(
                    f"--model.lm.name: could not load {self.name!r}: {_first_line(e)} "
                    "(offline, try `python train.py --config configs/quickstart/topk.yaml`)"
                ) from None
            except ValueError as e:
                msg = _first_line(e)
                if "not found" in msg:  # TransformerLens lists every model it knows (~10 kB): the ones near ours
                    raise LMLoadError(
                        f"--model.lm.name: {self.name!r} is not a TransformerLens model (e.g. gpt2, gpt2-medium, "
                        f"gpt2-large, gpt2-xl) nor a built-in one (gsae-tiny, {', '.join(sorted(RANDOM_PRESETS))})"
                    ) from None
                raise LMLoadError(f"--model.lm.name: {msg}") from None

    def to(self, device: torch.device | str) -> LanguageModel:
        """Move the model to ``device`` (a no-op if already there)."""
        device = torch.device(device)
        if self.device != device:
            self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ properties
    @property
    def tokenizer(self):
        """The HF tokenizer, or ``None`` for byte-vocabulary random models (see :meth:`encode_text`)."""
        return self.model.tokenizer

    @property
    def n_ctx(self) -> int:
        return self.model.cfg.n_ctx

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers

    @property
    def d_model(self) -> int:
        return self.model.cfg.d_model

    @property
    def d_vocab(self) -> int:
        return self.model.cfg.d_vocab

    @property
    def W_U(self) -> Tensor:
        """Unembedding ``(d_model, d_vocab)``."""
        return self.model.W_U

    @property
    def b_U(self) -> Tensor:
        """Unembedding bias ``(d_vocab,)``."""
        return self.model.b_U

    def unembedding(self) -> lm_chunked.Unembedding:
        """``W_U`` and ``b_U`` padded with zero columns to a multiple of :data:`gsae.lm_chunked.VOCAB_MULTIPLE`
        (GPT-2: 50,257 → 50,304) and the real vocabulary size: what the chunked losses take (their vocabulary
        matmuls run faster on aligned rows). A copy (GPT-2: +154 MB in float32), rebuilt when the model's
        unembedding moves or changes in place. Under autocast to another dtype, that copy cast to it (kept too:
        +77 MB in bf16), which the chunked losses would otherwise cast at every call (they compute in the autocast
        dtype: the same values)."""
        W, b = self.W_U, self.b_U
        key = (W.data_ptr(), W._version, W.dtype, b.data_ptr(), b._version, b.dtype)
        if self._unembedding is None or self._unembedding[0] != key:
            self._unembedding, self._unembedding_cast = None, {}  # free the old copies before building the new one
            self._unembedding = (key, lm_chunked.pad_unembedding(W, b))
        padded = self._unembedding[1]
        dtype = lm_chunked.compute_dtype(W, W.device)
        if dtype == W.dtype:
            return padded
        if dtype not in self._unembedding_cast:
            self._unembedding_cast[dtype] = padded._replace(W_U=padded.W_U.to(dtype), b_U=padded.b_U.to(dtype))
        return self._unembedding_cast[dtype]

    @property
    def bos_token_id(self) -> int:
        tok = self.tokenizer
        if tok is None:
            return BYTE_BOS
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if bos is None:
            raise LMLoadError(f"--model.lm.name: the tokenizer of {self.name!r} has no BOS or EOS token")
        return bos

    @property
    def eos_token_id(self) -> int:
        tok = self.tokenizer
        if tok is None or tok.eos_token_id is None:
            return self.bos_token_id
        return tok.eos_token_id

    @property
    def special_token_ids(self) -> list[int]:
        """Ids of every special token (masked and left unpatched by the metrics, SPEC §5)."""
        tok = self.tokenizer
        if tok is None:
            return [BYTE_BOS]
        ids = set(tok.all_special_ids)
        ids.add(self.bos_token_id)
        return sorted(i for i in ids if i is not None and i < self.d_vocab)

    def encode_text(self, texts: Sequence[str]) -> list[list[int]]:
        """Tokenize documents without special tokens (bytes for byte-vocabulary models)."""
        tok = self.tokenizer
        if tok is None:
            return [list(t.encode("utf-8")) for t in texts]
        return tok(list(texts), add_special_tokens=False)["input_ids"]

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Each token id as the text it stands for (``" the"``), for dashboards and steering's top tokens. A token
        that is part of a UTF-8 character (it decodes to U+FFFD alone; GPT-2 has hundreds, gsae-tiny 128) shows its
        bytes as SentencePiece writes its byte tokens (``"<0xE2><0x80>"``), so that eight such tokens are not eight
        identical ``"�"``.
        Byte-vocabulary models: the byte, ``"<bos>"`` for BOS, ``"<id>"`` for any other id."""
        tok = self.tokenizer
        if tok is None:
            return [bytes([i]).decode("latin-1") if i < 256 else "<bos>" if i == BYTE_BOS else f"<{i}>" for i in ids]
        out = tok.batch_decode([[i] for i in ids])
        for j, text in enumerate(out):
            if "\ufffd" in text:
                raw = _byte_level_bytes(tok.convert_ids_to_tokens(int(ids[j])))
                if raw is not None:
                    out[j] = raw.decode("utf-8", errors=_BYTE_NAMES)
        return out

    # ------------------------------------------------------------------ hooks
    def hook_names(self) -> list[str]:
        return list(self.model.hook_dict)

    def validate_hook(self, hook: str, option: str = "--model.hook") -> str:
        """Return ``hook`` if the model has it, else raise a one-line error listing valid names."""
        names = self.hook_names()
        if hook not in names:
            resid = [n for n in names if "resid" in n]
            raise ValueError(
                f"{option}: unknown hook {hook!r} for model {self.name!r}; valid residual-stream hooks: "
                f"{', '.join(resid)} (and {len(names) - len(resid)} more: hook_embed, blocks.L.hook_mlp_out, "
                "blocks.L.attn.hook_z, ...)"
            )
        if hook not in self._d_in_cache:  # one vector per token? (attention patterns are per pair of positions)
            tokens = torch.zeros(1, 3, dtype=torch.long, device=self.device)
            with torch.no_grad():
                shape = tuple(self.activations(tokens, hook).shape)
            if hook.endswith(("hook_pattern", "hook_attn_scores")) or len(shape) != 3 or shape[1] != 3 or shape[2] < 2:
                raise ValueError(
                    f"{option}: {hook!r} is not one vector per token (attention patterns and scores are per pair of "
                    "positions, LayerNorm scales one number); an SAE reads a vector per token: blocks.L.hook_resid_pre/mid/post, "
                    "hook_attn_out, hook_mlp_out, attn.hook_z, mlp.hook_post, ..."
                )
            self._d_in_cache[hook] = shape[2]
        return hook

    def hook_layer(self, hook: str) -> int | None:
        """Index of the block a hook lives in (``None`` for embeddings and the final LN)."""
        m = _LAYER_HOOK.match(hook)
        return int(m.group(1)) if m else None

    def resume_layer(self, hook: str) -> int | None:
        """The ``start_at_layer`` that continues the model from ``hook``, or ``None`` if the hook is
        inside a block (then :meth:`run_from_hook` falls back to a full forward with a patch hook)."""
        m = _LAYER_HOOK.match(hook)
        if m and m.group(2) == "hook_resid_pre":
            return int(m.group(1))
        if m and m.group(2) == "hook_resid_post":
            return int(m.group(1)) + 1
        return None

    def d_in(self, hook: str) -> int:
        """Width of the (flattened) activation at ``hook``."""
        self.validate_hook(hook)  # measures it
        return self._d_in_cache[hook]

    # ------------------------------------------------------------------ the fused path
    def fused_weights(self, hooks: Sequence[str] = ()) -> lm_fused.FusedGPT2 | None:
        """The fused forward's weights if it can serve ``hooks`` (``fused`` on, a GPT-2-architecture model,
        every hook on the residual stream), else ``None`` (TransformerLens runs). Rebuilt when the model's
        parameters move or change in place. Under autocast to a dtype other than the weights' (``bf16-mixed`` with
        float32 LM weights) the blocks' linears come cast to it once (:func:`gsae.lm_fused.cast_linears`: the values
        autocast would cast them to at every call), kept until the weights change."""
        if not self.fused or any(lm_fused.hook_point(h) is None for h in hooks):
            return None
        model = self.model
        if self._fused_unsupported is None:
            self._fused_unsupported = _fused_unsupported(model) or ""
            if self._fused_unsupported:
                log.info("the fused LM forward does not support %s (%s): TransformerLens runs", self.name, self._fused_unsupported)
        if self._fused_unsupported:
            return None
        if self._params is None or self._params[0] is not model:
            # .to() and in-place loads keep the Parameter objects (new data, a new version): list them once per model
            self._params = (model, list(model.parameters()))
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in self._params[1])
        if self._fused is None or self._fused[0] != key:
            self._fused = (key, fused_weights(model))
            self._fused_cast = {}
        w = self._fused[1]
        dtype = lm_chunked.compute_dtype(w.W_E, w.W_E.device)  # the autocast dtype, if autocast is on
        if not w.blocks or dtype == w.blocks[0].W_qkv.dtype:
            return w
        if dtype not in self._fused_cast:
            self._fused_cast[dtype] = lm_fused.cast_linears(w, dtype)
        return self._fused_cast[dtype]

    def _run_fused(self, w: lm_fused.FusedGPT2, x: Tensor, start: int, stop: int, cache_hooks: Sequence[str] = ()):
        if self.compile:
            return lm_fused.run(w, x, start, stop, cache_hooks, steps=lm_fused.compiled_steps())
        return lm_fused.run(w, x, start, stop, cache_hooks)

    def _fused_start(self, hook: str, cache_hooks: Sequence[str]) -> tuple[lm_fused.FusedGPT2, int] | None:
        """``(weights, start point)`` when the fused path runs the model on from ``hook``."""
        w = self.fused_weights([hook, *cache_hooks])
        if w is None:
            return None
        point, kind = lm_fused.hook_point(hook)
        if kind != "point" or any(lm_fused.hook_point(h)[0] < point for h in cache_hooks):
            return None  # starts inside a step, or a cache hook before the start (TransformerLens' patch path)
        return w, point

    # ------------------------------------------------------------------ running
    @torch.no_grad()
    def activations(self, tokens: Tensor, hook: str) -> Tensor:
        """Activations ``(B, T, D)`` at ``hook``; no layer after the hook runs (``stop_at_layer``)."""
        w = self.fused_weights([hook])
        if w is not None:
            embed, pos = lm_fused.embed(w, tokens)
            if hook in ("hook_embed", "hook_pos_embed"):
                return (embed if hook == "hook_embed" else pos).clone()
            return self._run_fused(w, embed + pos, 0, lm_fused.last_step([hook]), [hook])[1][hook]
        m = _LAYER_HOOK.match(hook)
        if m and m.group(2) == "hook_resid_pre":
            # the residual returned by stop_at_layer=L *is* blocks.L.hook_resid_pre
            return self.model(tokens, stop_at_layer=int(m.group(1)))
        stop = int(m.group(1)) + 1 if m else (0 if hook in ("hook_embed", "hook_pos_embed") else None)
        store: dict[str, Tensor] = {}

        def save(act: Tensor, hook) -> None:  # noqa: ARG001 - TransformerLens hook signature
            store["x"] = act

        self.model.run_with_hooks(tokens, stop_at_layer=stop, return_type=None, fwd_hooks=[(hook, save)])
        return _flatten_heads(store["x"])

    def hook_depth(self, hook: str) -> float | None:
        """Where ``hook`` sits on GPT-2's residual stream, as a sortable number (a residual point ``p`` is ``p``, the
        attention or MLP output of step ``p → p+1`` is ``p + 0.5``); ``None`` for hooks off the residual stream
        (inside a block, the embeddings, the final LayerNorm). Hooks several SAEs of one sweep read are ordered by it."""
        point = lm_fused.hook_point(hook)
        if point is None or point[1] not in ("point", "attn", "mlp"):
            return None
        return point[0] + (0.5 if point[1] != "point" else 0.0)

    @torch.no_grad()
    def activations_at(self, tokens: Tensor, hooks: Sequence[str]) -> dict[str, Tensor]:
        """``{hook: (B, T, D)}`` activations at several residual-stream hooks (:meth:`hook_depth`) from one forward,
        which stops after the deepest of them; each equals :meth:`activations` at that hook."""
        hooks = list(dict.fromkeys(hooks))
        if len(hooks) == 1:
            return {hooks[0]: self.activations(tokens, hooks[0])}
        self._check_stream_hooks(hooks)
        w = self.fused_weights(hooks)
        if w is not None:
            embed, pos = lm_fused.embed(w, tokens)
            _, cache = self._run_fused(w, embed + pos, 0, lm_fused.last_step(hooks), hooks)
            return {h: cache[h] for h in hooks}
        store: dict[str, Tensor] = {}

        def save(act: Tensor, hook) -> None:  # noqa: ARG001 - TransformerLens hook signature
            store[hook.name] = act

        stop = max(int(_LAYER_HOOK.match(h).group(1)) + 1 for h in hooks)
        self.model.run_with_hooks(tokens, stop_at_layer=stop, return_type=None, fwd_hooks=[(h, save) for h in hooks])
        return {h: store[h] for h in hooks}

    def activations_and_grads_at(
        self, tokens: Tensor, hooks: Sequence[str], grad_hooks: Sequence[str]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """Activations at ``hooks`` and ``dL/dx`` (``L`` the *summed* next-token CE) at ``grad_hooks`` (a subset),
        all from one forward and one backward: ``(acts, grads, loss)``, each ``{hook: (B, T, D)}`` detached.

        The model runs without autograd up to the shallowest gradient point (:meth:`grad_point`), whose activation
        becomes the leaf; the deeper hooks are read on the way on, and one ``torch.autograd.grad`` from the final
        hidden state gives the gradient at every gradient point. A residual-stream activation carries all that later
        layers see, so the gradient at a deeper hook is the same ``dL/dx`` :meth:`activations_and_grads` takes there
        alone (tested); two names of one residual point (``blocks.L.hook_resid_post``, ``blocks.L+1.hook_resid_pre``)
        get the same gradient."""
        hooks = list(dict.fromkeys(hooks))
        grad_hooks = list(dict.fromkeys(grad_hooks))
        if set(grad_hooks) - set(hooks) or not grad_hooks:
            raise ValueError(f"activations_and_grads_at: grad_hooks {grad_hooks} must be a non-empty subset of {hooks}")
        if len(hooks) == 1 and (self.hook_depth(hooks[0]) is None or self.grad_point(hooks[0]) == hooks[0]):
            acts, grads, loss = self.activations_and_grads(tokens, hooks[0], "sum")
            return {hooks[0]: acts}, {hooks[0]: grads}, loss
        self._check_stream_hooks(hooks)
        points = {h: self.grad_point(h) for h in grad_hooks}
        by_depth: dict[float, str] = {}  # one name per residual point
        for p in points.values():
            by_depth.setdefault(self.hook_depth(p), p)
        depth = min(by_depth)
        first = by_depth[depth]
        after = [h for h in hooks if self.hook_depth(h) > depth]
        acts = self.activations_at(tokens, [*(h for h in hooks if self.hook_depth(h) <= depth), first])
        x = acts[first].detach().requires_grad_(True)
        deeper = sorted(d for d in by_depth if d > depth)
        with torch.enable_grad():
            cache_hooks = list(dict.fromkeys([*after, *(by_depth[d] for d in deeper)]))
            run = self.hidden_from_hook(x, first, tokens=tokens, cache_hooks=cache_hooks)
            W_U, b_U, d_vocab = self.unembedding()
            loss, dh = lm_chunked.ce_sum_and_grad(run.hidden, W_U, b_U, tokens, d_vocab=d_vocab, compile=self.compile)
            inputs = [x, *(run.cache[by_depth[d]] for d in deeper)]
            found = dict(zip([depth, *deeper], torch.autograd.grad(run.hidden, inputs, dh.to(run.hidden.dtype))))
        acts.update({h: run.cache[h].detach() for h in after})
        grads = {h: found[self.hook_depth(points[h])].detach() for h in grad_hooks}
        return {h: acts[h] for h in hooks}, grads, loss.detach()

    def grad_point(self, hook: str) -> str:
        """The residual point whose ``dL/dx`` is ``dL/d(hook)``: ``hook`` itself for a residual point; for an attention
        or MLP output the point right after it (``x_{p+1} = x_p + out``, so ``dL/d out = dL/dx_{p+1}``), where the
        fused forward can start (a residual-stream hook, :meth:`hook_depth`)."""
        point, kind = lm_fused.hook_point(hook)
        if kind == "point":
            return hook
        q = point + 1
        return f"blocks.{q // 2}.hook_resid_mid" if q % 2 else f"blocks.{q // 2 - 1}.hook_resid_post"

    def _check_stream_hooks(self, hooks: Sequence[str]) -> None:
        off = [h for h in hooks if self.hook_depth(h) is None]
        if off:
            raise ValueError(
                f"several hooks in one pass must be on the residual stream (blocks.L.hook_resid_pre/mid/post, "
                f"hook_attn_out, hook_mlp_out); got {', '.join(off)}"
            )

    @torch.no_grad()
    def logits(self, tokens: Tensor) -> Tensor:
        """Clean next-token logits ``(B, T, d_vocab)``."""
        w = self.fused_weights()
        if w is not None:
            embed, pos = lm_fused.embed(w, tokens)
            resid, _ = self._run_fused(w, embed + pos, 0, w.final_point)
            return lm_fused.unembed(w.W_U, w.b_U, lm_fused.final_hidden(w, resid))
        return self.model(tokens, return_type="logits")

    def hidden_from_hook(
        self,
        x: Tensor,
        hook: str,
        tokens: Tensor | None = None,
        cache_hooks: Sequence[str] = (),
        positions: Tensor | None = None,
    ) -> HiddenRun:
        """:meth:`run_from_hook` up to the unembedding's input: the final hidden state, no full-vocabulary logits.

        ``logits = hidden @ W_U + b_U``; the losses over the vocabulary take ``hidden`` in chunks of positions
        (:mod:`gsae.lm_chunked`). Arguments as :meth:`run_from_hook`.
        """
        fused = self._fused_start(hook, cache_hooks)
        if fused is not None:
            w, start = fused
            if positions is not None and hook.endswith("hook_resid_mid"):  # as the patch-hook path below
                if tokens is None:
                    raise ValueError(f"run_from_hook: hook {hook!r} is inside a block; pass tokens")
                x = torch.where(positions[..., None], x.to(w.W_E.dtype), self.activations(tokens, hook))
            resid, cache = self._run_fused(w, x.to(w.W_E.dtype), start, w.final_point, cache_hooks)
            return HiddenRun(lm_fused.final_hidden(w, resid), cache)
        cache: dict[str, Tensor] = {}

        def keep(act: Tensor, hook) -> None:
            cache[hook.name] = act

        fwd_hooks: list[tuple[str, Callable]] = [(h, keep) for h in cache_hooks]
        start = self.resume_layer(hook)
        if start is not None:
            resid = self.model.run_with_hooks(x, start_at_layer=start, stop_at_layer=self.n_layers, fwd_hooks=fwd_hooks)
        else:
            if tokens is None:
                raise ValueError(f"run_from_hook: hook {hook!r} is inside a block; pass tokens")
            patch = _patch_hook(x, positions)
            resid = self.model.run_with_hooks(tokens, stop_at_layer=self.n_layers, fwd_hooks=[(hook, patch), *fwd_hooks])
        return HiddenRun(self.model.ln_final(resid), cache)

    def run_from_hook(
        self,
        x: Tensor,
        hook: str,
        tokens: Tensor | None = None,
        cache_hooks: Sequence[str] = (),
        positions: Tensor | None = None,
    ) -> HookRun:
        """Run the model with ``x`` in place of the activation at ``hook``.

        For ``hook_resid_pre``/``hook_resid_post`` hooks only the layers after the hook run
        (``start_at_layer``; the fused forward also starts at ``hook_resid_mid``); for other hooks inside a
        block the whole model runs on ``tokens`` with a patch hook. Autograd is left on: callers wrap in
        ``torch.no_grad()`` when they need no graph.

        Args:
            x: ``(B, T, D)`` activation to put at the hook.
            hook: hook name.
            tokens: ``(B, T)`` input tokens; needed only for hooks inside a block.
            cache_hooks: later hooks whose (patched-model) activations to return.
            positions: optional ``(B, T)`` bool mask; where False the clean activation is kept
                (only used for hooks inside a block; with ``start_at_layer`` the caller passes the
                clean values itself).
        """
        fused = self._fused_start(hook, cache_hooks)
        if fused is not None:
            w = fused[0]
            run = self.hidden_from_hook(x, hook, tokens, cache_hooks, positions)
            return HookRun(lm_fused.unembed(w.W_U, w.b_U, run.hidden), run.cache)
        cache: dict[str, Tensor] = {}

        def keep(act: Tensor, hook) -> None:
            cache[hook.name] = act

        fwd_hooks: list[tuple[str, Callable]] = [(h, keep) for h in cache_hooks]
        start = self.resume_layer(hook)
        if start is not None:
            logits = self.model.run_with_hooks(x, start_at_layer=start, return_type="logits", fwd_hooks=fwd_hooks)
            return HookRun(logits, cache)
        if tokens is None:
            raise ValueError(f"run_from_hook: hook {hook!r} is inside a block; pass tokens")
        patch = _patch_hook(x, positions)
        logits = self.model.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(hook, patch), *fwd_hooks])
        return HookRun(logits, cache)

    @torch.no_grad()
    def last_position_logits(
        self, x: Tensor, hook: str, last: Tensor, tokens: Tensor | None = None, max_rows: int = 256
    ) -> Tensor:
        """Next-token logits ``(R, d_vocab)`` at the last position of one sequence run on from ``hook``, where the
        activation is ``x (1, T, D)`` except at the last position, which row r replaces by ``last[r] (D,)``.

        Equal to ``run_from_hook`` of the R patched copies, read at ``T − 1`` (TransformerLens runs exactly that,
        in chunks of ``max_rows`` copies). The fused path runs the ``T − 1`` shared positions once and each row as
        one new position attending to their cached keys and values (:func:`gsae.lm_fused.run_last`): R tokens of
        work, not ``R·T``, and no logits but the read ones. ``tokens (1, T)`` are needed only for hooks inside a block.
        """
        R = last.shape[0]
        fused = self._fused_start(hook, ())
        if fused is not None:
            w, start = fused
            kvs = lm_fused.prefix_keys_values(w, x[:, :-1].to(w.W_E.dtype), start)
            resid = torch.cat([lm_fused.run_last(w, last[r : r + max_rows].to(w.W_E.dtype), kvs, start)
                               for r in range(0, R, max_rows)])
            return self.unembed(lm_fused.final_hidden(w, resid))
        out = []
        for r in range(0, R, max_rows):
            xs = x.expand(min(max_rows, R - r), -1, -1).clone()
            xs[:, -1] = last[r : r + max_rows].to(xs.dtype)
            tok = None if tokens is None else tokens.expand(xs.shape[0], -1)
            out.append(self.unembed(self.hidden_from_hook(xs, hook, tokens=tok).hidden[:, -1]))
        return torch.cat(out)

    def unembed(self, hidden: Tensor) -> Tensor:
        """Logits ``hidden @ W_U + b_U`` of final hidden states (:meth:`hidden_from_hook`)."""
        return lm_fused.unembed(self.W_U, self.b_U, hidden)

    def activations_and_grads(
        self, tokens: Tensor, hook: str, reduction: Literal["mean", "sum"] = "mean"
    ) -> ActsAndGrads:
        """Activations at ``hook`` and ``dL/dx`` of the next-token cross-entropy, in one backward pass.

        The layers before the hook run without autograd (under ``no_grad``); the activation is made
        a leaf requiring grad; the layers after it run with autograd up to the final hidden state, whose
        gradient :func:`gsae.lm_chunked.ce_sum_and_grad` computes in chunks of positions (no full-vocabulary
        logits); one ``torch.autograd.grad`` takes it from there to the hook only: model parameters never
        get a ``.grad``.
        ``L`` is the CE of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]``, reduced by ``mean``
        over the ``B·(T−1)`` predictions (TransformerLens ``return_type="loss"``; SPEC §1.2 default; the gradient
        then float32, the sum's divided in float32: a float16 model's quotient would be subnormal) or
        ``sum`` (in the model's dtype). The last position has no label, so its gradient comes only through later positions:
        it is exactly 0 for a causal model. The gradient includes the effect of ``x_t`` on every later
        position's loss through attention (SPEC §1.2 [INFERRED]).
        """
        if self.hook_depth(hook) is not None and self.grad_point(hook) != hook:
            # an attention / MLP output: its gradient is the next residual point's (both forward paths start there)
            acts, grads, loss = self.activations_and_grads_at(tokens, [hook], [hook])
            if reduction == "mean":  # divided in float32 (a float16 LM's quotient would be subnormal)
                n = tokens.shape[0] * (tokens.shape[1] - 1)
                loss, grads[hook] = loss / n, grads[hook].float() / n
            return ActsAndGrads(acts[hook], grads[hook], loss)
        x = self.activations(tokens, hook).detach().requires_grad_(True)
        with torch.enable_grad():
            hidden = self.hidden_from_hook(x, hook, tokens=tokens).hidden
            W_U, b_U, d_vocab = self.unembedding()
            loss, dh = lm_chunked.ce_sum_and_grad(hidden, W_U, b_U, tokens, d_vocab=d_vocab, compile=self.compile)
            (grad,) = torch.autograd.grad(hidden, x, dh.to(hidden.dtype))
            if reduction == "mean":  # the sum's gradient, divided in float32 (a float16 LM's quotient would be subnormal)
                n = tokens.shape[0] * (tokens.shape[1] - 1)
                loss, grad = loss / n, grad.float() / n
        return ActsAndGrads(x.detach(), grad.detach(), loss.detach())


def _patch_hook(x: Tensor, positions: Tensor | None) -> Callable:
    """A TransformerLens hook putting ``x`` in place of the activation (the clean one kept where ``positions`` is False)."""

    def patch(act: Tensor, hook) -> Tensor:  # noqa: ARG001
        new = x.reshape(act.shape).to(act.dtype)
        if positions is not None:
            new = torch.where(positions.reshape(*positions.shape, *([1] * (act.dim() - 2))), new, act)
        return new

    return patch


def _fused_unsupported(model) -> str | None:
    """Why the fused forward cannot run ``model`` (a ``HookedTransformer``), or ``None`` if it can."""
    cfg = model.cfg
    checks = {
        "normalization_type": cfg.normalization_type in ("LN", "LNPre"),
        "positional_embedding_type": cfg.positional_embedding_type == "standard",
        "act_fn": cfg.act_fn in lm_fused.ACTIVATIONS,
        "attention_dir": cfg.attention_dir == "causal",
        "attn_only": not cfg.attn_only,
        "parallel_attn_mlp": not cfg.parallel_attn_mlp,
        "gated_mlp": not cfg.gated_mlp,
        "n_key_value_heads": cfg.n_key_value_heads is None,
        "post_embedding_ln": not getattr(cfg, "post_embedding_ln", False),
        "use_normalization_before_and_after": not cfg.use_normalization_before_and_after,
        "soft caps": not (cfg.output_logits_soft_cap > 0 or cfg.attn_scores_soft_cap > 0),
        "attn_types": cfg.attn_types is None or all(t == "global" for t in cfg.attn_types),
        "n_devices": cfg.n_devices == 1,
        "left padding": model.tokenizer is None or model.tokenizer.padding_side != "left",
        "d_vocab_out": cfg.d_vocab_out == cfg.d_vocab,
        "original_architecture": cfg.original_architecture in (None, "GPT2LMHeadModel", "gpt2"),
    }
    bad = [k for k, ok in checks.items() if not ok]
    return ", ".join(bad) if bad else None


def fused_weights(model) -> lm_fused.FusedGPT2:
    """The fused forward's view of a GPT-2-architecture ``HookedTransformer``'s weights (only QKV is packed anew)."""
    cfg = model.cfg

    def ln(mod) -> tuple[Tensor | None, Tensor | None]:
        return (mod.w, mod.b) if hasattr(mod, "w") else (None, None)

    blocks = []
    for blk in model.blocks:
        a, m = blk.attn, blk.mlp
        blocks.append(
            lm_fused.pack_block(
                a.W_Q, a.W_K, a.W_V, a.b_Q, a.b_K, a.b_V, a.W_O, a.b_O, m.W_in, m.b_in, m.W_out, m.b_out,
                ln(blk.ln1), ln(blk.ln2),
            )
        )
    lnf_w, lnf_b = ln(model.ln_final)
    scale = float(cfg.attn_scale) if cfg.use_attn_scale else 1.0
    return lm_fused.FusedGPT2(
        model.W_E, model.W_pos, tuple(blocks), lnf_w, lnf_b, model.W_U, model.b_U,
        cfg.n_heads, cfg.d_head, float(cfg.eps), scale, cfg.act_fn,
    )


def next_token_loss(logits: Tensor, tokens: Tensor, reduction: Literal["mean", "sum", "none"] = "mean") -> Tensor:
    """Cross-entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]``; ``none`` gives ``(B, T−1)``."""
    lp = F.log_softmax(upcast(logits[:, :-1]), dim=-1)
    nll = -lp.gather(-1, tokens[:, 1:, None]).squeeze(-1)  # (B, T-1)
    if reduction == "none":
        return nll
    return nll.sum() if reduction == "sum" else nll.mean()


def upcast(t: Tensor) -> Tensor:
    """Half-precision tensors to float32 (for softmax / losses); float32 and float64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _flatten_heads(act: Tensor) -> Tensor:
    """``(B, T, n_heads, d_head)`` -> ``(B, T, n_heads·d_head)`` (attention ``hook_z``); else unchanged."""
    return act.flatten(2) if act.dim() > 3 else act


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__


def _hub_reachable(timeout: float = 3.0) -> bool:
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_pretrained_offline_first(cls, name: str, kwargs: dict):
    """``from_pretrained``, failing fast (no minute of retries) when the hub is unreachable.

    With ``HF_HUB_OFFLINE=1`` the local cache is used directly.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True") and not _hub_reachable():
        raise OSError(
            f"{name!r}: the Hugging Face hub is unreachable (set HF_HUB_OFFLINE=1 to use a locally cached copy)"
        )
    return cls.from_pretrained(name, **kwargs)


#: Loaders for models that ship inside gsae (e.g. ``gsae-tiny``): name -> callable(LanguageModel) -> model.
LOCAL_MODELS: dict[str, Callable] = {}


# ====================================================================== models that ship with gsae
# ``gsae-*`` names (``gsae-tiny``) are loaded by ``gsae.tinylm.load`` (imported lazily below); that
# package builds every model it loads or trains through :func:`build_hooked_transformer`, so this file
# stays the only one that imports TransformerLens.

#: GPT-2's block design; an architecture dict overrides these and gives the sizes.
GPT2_BLOCK = dict(act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard")


def build_hooked_transformer(
    arch: dict,
    tokenizer=None,
    state_dict: dict[str, Tensor] | None = None,
    seed: int | None = 0,
    *,
    dtype: str = "float32",
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    fold_value_biases: bool = False,
):
    """A GPT-2-architecture ``HookedTransformer`` (GPT-2's hook names) from an architecture dict.

    Args:
        arch: ``HookedTransformerConfig`` fields: ``n_layers``, ``d_model``, ``n_heads``, ``d_mlp``,
            ``n_ctx``, ``d_vocab`` (``d_head`` defaults to ``d_model // n_heads``; act_fn, LN and
            learned positions default to GPT-2's).
        tokenizer: a Hugging Face tokenizer (``PreTrainedTokenizerFast``) or ``None``.
        state_dict: HookedTransformer-format weights (any float dtype); ``None`` keeps the seeded
            random init (a trainable model, e.g. for ``python -m gsae.tinylm.train``).
        seed: seed of the random init (TransformerLens seeds torch, numpy and ``random`` with it);
            ``None`` draws the init from the current global generators without reseeding them.
        dtype: dtype of the returned model.
        fold_ln, center_writing_weights, center_unembed, fold_value_biases: TransformerLens weight
            processing of ``state_dict`` (as ``from_pretrained`` does; all off: the weights as given).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from transformer_lens import HookedTransformer, HookedTransformerConfig

    fields = {**GPT2_BLOCK, **arch}
    fields.setdefault("d_head", fields["d_model"] // fields["n_heads"])
    cfg = HookedTransformerConfig(**fields, seed=seed, dtype=getattr(torch, dtype), device="cpu")
    if state_dict is None and cfg.dtype != torch.float32:
        # the random init is drawn in float32 and rounded, so a seed gives the same model in every dtype (drawn in
        # bfloat16, torch 2.11's CUDA build gave other weights than its float32 init; 2.13's CPU build the same)
        init = HookedTransformer(HookedTransformerConfig(**fields, seed=seed, dtype=torch.float32, device="cpu"))
        state_dict, seed = init.state_dict(), None
        cfg = HookedTransformerConfig(**fields, seed=None, dtype=getattr(torch, dtype), device="cpu")
        model = HookedTransformer(cfg, tokenizer=tokenizer)
        model.load_state_dict({k: v.to(cfg.dtype) if v.is_floating_point() else v for k, v in state_dict.items()})
        return model
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    if state_dict is not None:
        model.load_and_process_state_dict(
            {k: v.to(cfg.dtype) for k, v in state_dict.items()},
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            center_unembed=center_unembed,
            fold_value_biases=fold_value_biases,
        )
    return model


def _local_loader(name: str) -> Callable | None:
    """The loader of a model that ships with gsae: ``LOCAL_MODELS`` first, then ``gsae-*`` from gsae.tinylm, or a
    folder ``python -m gsae.tinylm.train --out DIR`` wrote (its ``config.json`` and ``model.safetensors``)."""
    folder = Path(name)
    is_tinylm_folder = name not in LOCAL_MODELS and (folder / "model.safetensors").is_file() and (
        folder / "config.json"
    ).is_file()
    if name not in LOCAL_MODELS and (name.startswith("gsae-") or is_tinylm_folder):
        from gsae import tinylm

        return tinylm.load  # raises LMLoadError naming the option for an unknown gsae-* name
    return LOCAL_MODELS.get(name)
