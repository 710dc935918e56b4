"""SAELensAdapter: a SAELens SAE behind our interface gives our SAE's outputs and metrics."""

from __future__ import annotations

import pytest
import torch

from gsae.evals import loss_added
from gsae.export import export_saelens
from gsae.saelens_adapter import (
    SAELensAdapter,
    is_saelens_folder,
    lm_kwargs,
    load_saelens_folder,
    load_saelens_pretrained,
)
from tests.evals.helpers import HOOK, build_tokens, build_topk


@pytest.fixture
def exported(tiny_lm, tmp_path):
    sae = build_topk(relu_after_topk=True)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
    export_saelens(sae, tmp_path / "x.saelens", {"hook": HOOK, "lm": tiny_lm.describe(), "context_size": 32})
    return sae, tmp_path / "x.saelens"


def test_adapter_matches_our_sae(exported, tiny_lm):
    sae, path = exported
    assert is_saelens_folder(path)
    adapter, meta = load_saelens_folder(path)
    assert isinstance(adapter, SAELensAdapter) and (adapter.d_in, adapter.d_sae) == (64, 128)
    assert meta["hook"] == HOOK and meta["lm"]["name"] == "random-tiny" and meta["context_size"] == 32
    torch.testing.assert_close(adapter.W_dec, sae.W_dec.detach())
    x = torch.randn(10, 64)
    out = adapter(x)
    torch.testing.assert_close(out.x_hat, sae(x).x_hat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.latents, sae.encode(x), atol=1e-5, rtol=1e-5)
    toks = build_tokens(2, 16)
    a, b = loss_added.run(adapter, tiny_lm, HOOK, toks), loss_added.run(sae, tiny_lm, HOOK, toks)
    assert a["kl_sae"] == pytest.approx(b["kl_sae"], rel=1e-4) and a["l0"] == b["l0"]


def test_lm_kwargs_follow_saelens_no_processing():
    assert lm_kwargs({"model_name": "gpt2", "model_from_pretrained_kwargs": {"center_writing_weights": True}}) == {
        "name": "gpt2",
        "fold_ln": False,
        "center_writing_weights": True,
        "center_unembed": False,
    }
    assert lm_kwargs({"model_name": "gpt2"}, model="gpt2-medium")["name"] == "gpt2-medium"
    with pytest.raises(ValueError, match="--model"):
        lm_kwargs({})


def test_pretrained_fails_fast_offline(monkeypatch):
    with pytest.raises(ValueError, match="unknown SAELens release"):
        load_saelens_pretrained("sae_lens:no-such-release/x")
    with pytest.raises(ValueError, match="has no SAE"):
        load_saelens_pretrained("sae_lens:gpt2-small-res-jb/no-such-id")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("gsae.lm._hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ValueError, match="unreachable"):
        load_saelens_pretrained("sae_lens:gpt2-small-res-jb/blocks.8.hook_resid_pre")
