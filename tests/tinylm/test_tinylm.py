"""gsae-tiny: the trained model that ships with gsae loads offline by name, has GPT-2's hooks, and has learned the corpus."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from gsae.data.tokens import pack
from gsae.lm import LanguageModel, LMLoadError, build_hooked_transformer, next_token_loss
from gsae.tinylm import EOT, MODELS, read_config
from gsae.tinylm.corpus import ANIMALS, TOWNS, documents

FRESH_SEED = 4242  # never trained on (training used seed 0, its report's held-out CE seed 1)


@pytest.fixture(scope="module")
def tiny():
    return LanguageModel("gsae-tiny")


@pytest.fixture(scope="module")
def fresh(tiny):
    """16 packed contexts of 256 tokens from new corpus text, packed as gsae's data module packs them."""
    docs = tiny.encode_text(list(documents(FRESH_SEED, 60)))
    ctx = list(itertools.islice(pack(iter(docs), 256, tiny.bos_token_id, True, tiny.eos_token_id), 16))
    assert len(ctx) == 16
    return torch.tensor(ctx)


def unigram_entropy(tokens: torch.Tensor) -> float:
    p = torch.bincount(tokens.flatten()).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def test_loads_offline_with_gpt2_hooks_and_tokenizer(tiny):
    assert tiny.n_layers == 4 and tiny.n_ctx == 256
    assert tiny.model.cfg.act_fn == "gelu_new" and tiny.model.cfg.positional_embedding_type == "standard"
    # the same hook points as any GPT-2-architecture model of that depth
    assert set(tiny.hook_names()) == set(LanguageModel("random-small").hook_names())
    for hook in ("hook_embed", "blocks.0.hook_resid_pre", "blocks.3.hook_resid_post", "blocks.2.attn.hook_z", "blocks.1.hook_mlp_out"):
        tiny.validate_hook(hook)
    assert tiny.tokenizer.convert_ids_to_tokens(tiny.bos_token_id) == EOT == tiny.tokenizer.eos_token
    assert tiny.eos_token_id == tiny.bos_token_id and tiny.special_token_ids == [tiny.bos_token_id]
    ids = tiny.encode_text(["Alice is a baker in Ashford.", "The foxes are red."])
    assert tiny.tokenizer.decode(ids[0]) == "Alice is a baker in Ashford." and tiny.bos_token_id not in ids[0]
    assert all(0 <= i < tiny.d_vocab for i in ids[1])
    assert tiny.d_vocab == len(tiny.tokenizer) == read_config("gsae-tiny")["arch"]["d_vocab"]


def test_assets_are_small_and_documented():
    path = MODELS["gsae-tiny"]
    assert (path / "model.safetensors").stat().st_size <= 10 * 2**20
    report = json.loads((path / "report.json").read_text())
    assert report["final_heldout_ce"] < 0.6 * report["unigram_entropy"]


def test_weight_processing_keeps_the_computation(tiny, fresh):
    raw = LanguageModel("gsae-tiny", fold_ln=False, center_writing_weights=False, center_unembed=False)
    assert raw.model.cfg.normalization_type == "LN" and tiny.model.cfg.normalization_type == "LNPre"
    x = fresh[:2, :64]
    torch.testing.assert_close(tiny.logits(x).log_softmax(-1), raw.logits(x).log_softmax(-1), atol=1e-4, rtol=1e-4)


def test_heldout_ce_far_below_unigram_entropy_unlike_a_random_model(tiny, fresh):
    entropy = unigram_entropy(fresh[:, 1:])
    ce = float(next_token_loss(tiny.logits(fresh), fresh))
    arch = read_config("gsae-tiny")["arch"]
    with torch.no_grad():
        random_ce = float(next_token_loss(build_hooked_transformer(arch, seed=1)(fresh), fresh))
    assert 3.5 < entropy < 7, entropy
    assert ce < 0.6 * entropy, (ce, entropy)
    assert random_ce > entropy and random_ce > 0.8 * math.log(arch["d_vocab"]), (random_ce, entropy)


def _next_logprobs(lm: LanguageModel, text: str) -> torch.Tensor:
    ids = torch.tensor([[lm.bos_token_id, *lm.encode_text([text])[0]]])
    return lm.logits(ids)[0, -1].log_softmax(-1)


def _token(lm: LanguageModel, word: str) -> int:
    (tok,) = lm.encode_text([" " + word])[0]  # every corpus word is one token
    return tok


def test_has_learned_agreement_world_knowledge_and_the_topic(tiny):
    """Subject-verb agreement (is/are), the foods shared by all documents, and copying the document's town.

    (Binding an attribute to one of several entities, e.g. "What colour is the dog?", is not learned at
    this training budget: it is at chance, see the report's notes.)
    """
    agree = food = town = 0
    for kind, (plural, _, eats) in ANIMALS.items():
        for what, noun, verb in ((f"a big red {kind}", kind, "is"), (f"three big red {plural}", plural, "are")):
            lp = _next_logprobs(tiny, f"Life in Ashford. Alice is a baker in Ashford. Alice has {what}. The {noun}")
            agree += int(lp[_token(tiny, verb)] > lp[_token(tiny, "are" if verb == "is" else "is")])
        food += int(_next_logprobs(tiny, f"Life in Ashford. Alice has a big red {kind}. The {kind} eats").argmax() == _token(tiny, eats))
    for name in TOWNS[::24]:
        town += int(_next_logprobs(tiny, f"Life in {name}. Alice is a baker in {name}. Ben lives in").argmax() == _token(tiny, name))
    assert agree >= 0.9 * 2 * len(ANIMALS), agree
    assert food >= 0.8 * len(ANIMALS), food
    assert town >= 8, town


def test_unknown_gsae_name_is_a_one_line_error():
    with pytest.raises(LMLoadError, match="--model.lm.name: unknown gsae model 'gsae-huge'"):
        _ = LanguageModel("gsae-huge").model
