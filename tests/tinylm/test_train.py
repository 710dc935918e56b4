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


@pytest.mark.slow
def test_train_follows_its_schedule_and_holds_out_its_evaluation_text(tmp_path, monkeypatch):
    """The optimizer's learning rate is the documented warm-up then cosine; biases and LayerNorm gains are not decayed;
    the report's held-out CE is the saved model's loss on corpus seed ``seed + 1`` (packed as gsae packs, EOT first)
    and its baselines count documents 10**6 on; the BPE vocabulary stops at ``--vocab-size``."""
    import itertools
    import math

    from gsae.data.tokens import pack
    from gsae.tinylm import load_tokenizer
    from gsae.tinylm.corpus import documents
    from gsae.tinylm.train import baselines

    lrs, groups = [], []

    class Recording(torch.optim.AdamW):
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            groups.extend((g["weight_decay"], [p.dim() for p in g["params"]]) for g in self.param_groups)

        def step(self, closure=None):
            lrs.append([g["lr"] for g in self.param_groups])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    out, seed, n_ctx, steps = tmp_path / "gsae-toy", 3, 64, 5
    report = main([
        "--out", str(out), "--seed", str(seed), "--max-steps", str(steps), "--warmup", "3", "--lr", "0.01",
        "--min-lr-frac", "0.1", "--time-budget-min", "1000", "--vocab-size", "300", "--tokenizer-docs", "300",
        "--n-layers", "1", "--d-model", "32", "--n-heads", "2", "--d-mlp", "64", "--n-ctx", str(n_ctx),
        "--batch-size", "2", "--eval-every", "2", "--eval-contexts", "3", "--baseline-contexts", "30",
    ])
    want = [0.01 * min(1, (s + 1) / 3) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))) for s in range(steps)]
    assert [g for g, _ in lrs] == pytest.approx(want, rel=1e-4) and all(a == b for a, b in lrs)
    assert [h["step"] for h in report["history"]] == [1, 2, 4] and report["steps"] == steps
    assert [h["lr"] for h in report["history"]] == pytest.approx([want[0], want[1], want[3]], rel=1e-4)
    (decay, decayed), (no_decay, kept) = groups
    assert decay == 0.1 and no_decay == 0.0 and min(decayed) >= 2 and kept and max(kept) == 1

    tok = load_tokenizer(out)
    assert report["d_vocab"] == len(tok) <= 300 and report["weights_storage"] == "float32"
    assert tok.decode(tok("Alice is a baker.", add_special_tokens=False)["input_ids"]) == "Alice is a baker."
    eot = tok.eos_token_id

    def packed(seed_, n, start=0):
        docs = tok(list(documents(seed_, 40, start=start)), add_special_tokens=False)["input_ids"]
        return torch.tensor(list(itertools.islice(pack(iter(docs), n_ctx, eot, True, eot), n)))

    val = packed(seed + 1, 3)
    monkeypatch.setitem(gsae.tinylm.MODELS, "gsae-toy", out)
    lm = LanguageModel("gsae-toy", fold_ln=False, center_writing_weights=False, center_unembed=False)
    with torch.no_grad():
        assert float(lm.model(val, return_type="loss")) == pytest.approx(report["final_heldout_ce"], abs=2e-4)
    base = baselines(packed(seed, 30, start=10**6), val, len(tok))
    assert {k: report[k] for k in base} == pytest.approx({k: round(v, 4) for k, v in base.items()}, abs=1e-9)


def test_contexts_pack_consecutive_documents_with_eot_first():
    """The training stream reads documents ``start_doc, start_doc + 1, ...`` in order, a chunk at a time."""
    import itertools

    from gsae.data.tokens import pack
    from gsae.tinylm import MODELS, load_tokenizer
    from gsae.tinylm.corpus import documents
    from gsae.tinylm.train import contexts

    tok = load_tokenizer(MODELS["gsae-tiny"])
    eot = tok.eos_token_id
    docs = tok(list(documents(5, 30, start=7)), add_special_tokens=False)["input_ids"]
    want = list(itertools.islice(pack(iter(docs), 32, eot, True, eot), 60))  # ~12 documents: several chunks of 2
    got = list(itertools.islice(contexts(tok, 5, 32, start_doc=7, chunk=2), 60))
    assert got == want and all(c[0] == eot and len(c) == 32 for c in got)


def test_baselines_count_next_tokens():
    """Unigram entropy of the targets and the add-1/2 unigram and bigram held-out CEs, on counts worked by hand."""
    import math

    from gsae.tinylm.train import baselines

    got = baselines(torch.tensor([[0, 1, 0, 1, 2]]), torch.tensor([[1, 2], [0, 1]]), d_vocab=3)
    # targets 1, 0, 1, 2: counts (1, 2, 1); bigrams 0->1 twice, 1->0, 1->2
    assert got["unigram_entropy"] == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert got["unigram_heldout_ce"] == pytest.approx(-(math.log(1.5 / 5.5) + math.log(2.5 / 5.5)) / 2)
    assert got["bigram_heldout_ce"] == pytest.approx(-(math.log(1.5 / 3.5) + math.log(2.5 / 3.5)) / 2)
    assert got["baseline_tokens"] == 4 and got["tokens_used"] == 3


def test_evaluate_is_the_mean_loss_over_contexts_and_keeps_the_mode():
    from gsae.lm import build_hooked_transformer
    from gsae.tinylm.train import evaluate

    model = build_hooked_transformer(dict(n_layers=1, d_model=16, n_heads=2, d_mlp=32, n_ctx=8, d_vocab=20), seed=0)
    ctx = torch.randint(0, 20, (5, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = float(model(ctx, return_type="loss"))
    for training in (True, False):
        model.train(training)
        assert evaluate(model, ctx, batch=2) == pytest.approx(want, rel=1e-5)  # batches of 2, 2 and 1
        assert model.training is training


@pytest.mark.parametrize("option", ["--max-steps", "--time-budget-min", "--warmup", "--eval-every"])
def test_a_zero_length_option_is_a_one_line_error(tmp_path, option):
    """Each divides the schedule or the evaluation: zero stops before the tokenizer is trained, naming the option."""
    with pytest.raises(SystemExit, match=rf"^error: {option} must be > 0 \(got 0(\.0)?\)$"):
        main(["--out", str(tmp_path / "m"), option, "0"])
    assert not (tmp_path / "m").exists()
