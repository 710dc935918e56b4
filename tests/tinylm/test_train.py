"""``python -m gsae.tinylm.train`` end to end on a toy budget: tokenizer, training, report, loadable assets."""

from __future__ import annotations

import json

import pytest
import torch

import gsae.tinylm
from gsae.lm import LanguageModel
from gsae.tinylm.train import main


@pytest.mark.slow
def test_train_writes_loadable_assets(tmp_path, monkeypatch):
    out = tmp_path / "gsae-toy"
    report = main([
        "--out", str(out), "--max-steps", "4", "--warmup", "2", "--tokenizer-docs", "300", "--n-layers", "1",
        "--d-model", "32", "--n-heads", "2", "--d-mlp", "64", "--n-ctx", "64", "--batch-size", "4",
        "--eval-every", "2", "--eval-contexts", "4", "--baseline-contexts", "40",
    ])
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "tokenizer.json", "config.json", "report.json"}
    assert report["steps"] == 4 and report["tokens_seen"] == 4 * 4 * 64
    assert report["final_heldout_ce"] < report["history"][0]["heldout_ce"]  # it learned something
    assert json.loads((out / "report.json").read_text())["unigram_entropy"] == report["unigram_entropy"]

    monkeypatch.setitem(gsae.tinylm.MODELS, "gsae-toy", out)
    lm = LanguageModel("gsae-toy", fold_ln=False, center_writing_weights=False, center_unembed=False)
    assert lm.n_layers == 1 and lm.d_vocab == report["d_vocab"]
    tokens = torch.tensor([[lm.bos_token_id, *lm.encode_text(["Alice is a baker."])[0]]])
    assert lm.activations(tokens, "blocks.0.hook_resid_post").shape == (1, tokens.shape[1], 32)
