"""gsae's own small trained language model: ``LanguageModel("gsae-tiny")``.

``gsae-tiny`` is a GPT-2-architecture model (same blocks and hook names as GPT-2: LayerNorm,
``gelu_new``, learned positions, ``<|endoftext|>`` as BOS/EOS) with a byte-level BPE tokenizer, both
trained by ``python -m gsae.tinylm.train`` on the procedural corpus of :mod:`gsae.tinylm.corpus`.
Weights, tokenizer, architecture and training report ship in ``gsae/tinylm/assets/<name>/``:

* ``model.safetensors``: HookedTransformer-format parameters, unprocessed (LayerNorm not folded);
* ``tokenizer.json`` / ``tokenizer_config.json``: the tokenizer (``PreTrainedTokenizerFast``);
* ``config.json``: ``{"arch": {...}, ...}``, the ``HookedTransformerConfig`` sizes;
* ``report.json``: the training run (losses, unigram entropy, tokens, wall time, load, seed).

The model is built by :func:`gsae.lm.build_hooked_transformer` (TransformerLens stays inside
``gsae/lm.py``), with the ``LanguageModel``'s weight-processing options applied as for GPT-2.
"""

from __future__ import annotations

import json
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
#: name -> asset folder of the models that ship with gsae
MODELS: dict[str, Path] = {"gsae-tiny": ASSETS / "gsae-tiny"}
EOT = "<|endoftext|>"


def assets_dir(name: str) -> Path:
    from gsae.lm import LMLoadError

    if name not in MODELS and (Path(name) / "model.safetensors").is_file():  # a folder gsae.tinylm.train wrote
        return Path(name)
    if name not in MODELS:
        raise LMLoadError(f"--model.lm.name: unknown gsae model {name!r}; choose from {sorted(MODELS)}")
    path = MODELS[name]
    if not (path / "model.safetensors").is_file():
        raise LMLoadError(f"--model.lm.name: the weights of {name!r} are missing ({path}/model.safetensors); "
                          "reinstall gsae with its package data or run `python -m gsae.tinylm.train`")
    return path


def load_tokenizer(path: str | Path):
    """The ``PreTrainedTokenizerFast`` saved in ``path`` (loaded from disk: TransformerLens re-opens it by path)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


def read_config(name: str) -> dict:
    return json.loads((assets_dir(name) / "config.json").read_text())


def load(lm):
    """The HookedTransformer of ``lm.name`` (a ``gsae-*`` model), processed as ``lm``'s options say."""
    from safetensors.torch import load_file

    from gsae.lm import build_hooked_transformer

    path = assets_dir(lm.name)
    return build_hooked_transformer(
        read_config(lm.name)["arch"],
        tokenizer=load_tokenizer(path),
        state_dict=load_file(str(path / "model.safetensors")),
        seed=None,  # the weights are loaded: do not reseed the global generators
        dtype=lm.dtype,
        fold_ln=lm.fold_ln,
        center_writing_weights=lm.center_writing_weights,
        center_unembed=lm.center_unembed,
        fold_value_biases=lm.fold_value_biases,  # True by default, as TransformerLens' from_pretrained does for GPT-2
    )
