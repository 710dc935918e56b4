"""loss_added: known answers (identity SAE) and agreement with SAELens ``run_evals`` on the same model,
SAE weights and tokens."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gsae.evals import loss_added
from tests.evals.helpers import HOOK, IdentitySAE, build_tokens, build_topk


def test_identity_sae_adds_nothing(tiny_lm):
    r = loss_added.run(IdentitySAE(64), tiny_lm, HOOK, build_tokens(4, 32))
    assert r["L_added"] == 0.0 and r["ce_increase"] == 0.0
    assert abs(r["kl_sae"]) < 1e-7
    assert r["ce_loss_score"] == 1.0 and r["kl_div_score"] == pytest.approx(1.0, abs=1e-6)
    assert r["mse"] == 0.0 and r["explained_variance"] == 1.0 and r["cossim"] == pytest.approx(1.0)
    assert r["n_tokens"] == 4 * 31  # BOS positions masked


def test_definitions_are_distinct_and_consistent(tiny_lm):
    r = loss_added.run(build_topk(), tiny_lm, HOOK, build_tokens(4, 32), batch_size=3)
    assert r["ce_increase"] == pytest.approx(r["ce_sae"] - r["ce_clean"])
    assert r["L_added"] == pytest.approx(r["ce_increase"] / r["ce_clean"])
    assert r["ce_loss_score"] == pytest.approx((r["ce_ablation"] - r["ce_sae"]) / (r["ce_ablation"] - r["ce_clean"]))
    assert r["kl_div_score"] == pytest.approx((r["kl_ablation"] - r["kl_sae"]) / r["kl_ablation"])
    assert r["l0"] == 8.0


def test_batch_size_does_not_change_token_means(tiny_lm):
    sae, toks = build_topk(), build_tokens(6, 32)
    a = loss_added.run(sae, tiny_lm, HOOK, toks, batch_size=6)
    b = loss_added.run(sae, tiny_lm, HOOK, toks, batch_size=2)
    for k in ("ce_sae", "kl_sae", "L_added", "explained_variance", "l0", "cossim"):
        assert a[k] == pytest.approx(b[k], rel=1e-5), k


def _saelens_run_evals(lm, sae_dir, tokens, batch_size):
    """SAELens ``run_evals`` on an in-memory dataset of our token ids (every sequence once per pass)."""
    import datasets
    from sae_lens import SAE, ActivationsStore
    from sae_lens.evals import get_eval_everything_config, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    sl = SAE.load_from_disk(str(sae_dir))
    n_batches = tokens.shape[0] // batch_size
    store = ActivationsStore(
        model=lm.model,
        dataset=datasets.Dataset.from_dict({"input_ids": tokens.tolist()}),
        streaming=False,
        hook_name=HOOK,
        hook_head_index=None,
        context_size=tokens.shape[1],
        d_in=64,
        n_batches_in_buffer=1,
        total_training_tokens=tokens.numel(),
        store_batch_size_prompts=batch_size,
        train_batch_size_tokens=64,
        prepend_bos=True,
        normalize_activations="none",
        device="cpu",
        dtype="float32",
    )
    # After the reconstruction batches SAELens' reset_input_dataset() does not rewind the sequence iterator;
    # with exactly n_batches·batch_size rows the iterator is exhausted and the sparsity/variance pass wraps
    # around to the same sequences, so both passes see every sequence once.
    cfg = get_eval_everything_config(
        batch_size_prompts=batch_size,
        n_eval_reconstruction_batches=n_batches,
        n_eval_sparsity_variance_batches=n_batches,
    )
    metrics, _ = run_evals(sl, store, lm.model, ActivationScaler(), cfg, exclude_special_tokens=lm.special_token_ids)
    return {k: v for group in metrics.values() for k, v in group.items()}


def _mark_saelens_v6(cfg_path):
    """Without ``metadata.sae_lens_version`` SAELens treats cfg.json as pre-6.0 and rebuilds ``metadata``
    from top-level keys, dropping ``hook_name`` (which ``run_evals`` needs); gsae's export omits it."""
    import sae_lens

    cfg = json.loads(cfg_path.read_text())
    cfg["metadata"].setdefault("sae_lens_version", sae_lens.__version__)
    cfg_path.write_text(json.dumps(cfg))


def test_agrees_with_saelens_run_evals(tiny_lm, tmp_path):
    from gsae.export import export_saelens

    sae = build_topk(relu_after_topk=True)  # SAELens' topk applies ReLU to the kept values
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        sae.b_enc.normal_(0, 0.1)
    export_saelens(sae, tmp_path / "sae", {"hook": HOOK, "lm": tiny_lm.describe()})
    _mark_saelens_v6(tmp_path / "sae" / "cfg.json")
    toks, bs = build_tokens(8, 32), 4
    ours = loss_added.run(sae, tiny_lm, HOOK, toks, batch_size=bs)
    theirs = _saelens_run_evals(tiny_lm, tmp_path / "sae", toks, bs)
    pairs = {  # ours -> SAELens name; the same definition, so 1e-4 relative
        "ce_loss_score": "ce_loss_score",
        "ce_clean": "ce_loss_without_sae",
        "ce_sae": "ce_loss_with_sae",
        "ce_ablation": "ce_loss_with_ablation",
        "kl_sae": "kl_div_with_sae",
        "kl_ablation": "kl_div_with_ablation",
        "kl_div_score": "kl_div_score",
        "l0": "l0",
        "explained_variance": "explained_variance",
        "explained_variance_saelens_legacy": "explained_variance_legacy",
        "mse": "mse",
        "cossim": "cossim",
        "l2_ratio": "l2_ratio",
    }
    for ours_key, sl_key in pairs.items():
        assert math.isclose(ours[ours_key], theirs[sl_key], rel_tol=1e-4), (ours_key, ours[ours_key], theirs[sl_key])


def test_special_tokens_inside_contexts_are_masked_as_saelens_does(tiny_lm, tmp_path):
    """Packed contexts hold document boundaries: a BOS in mid-context stays unpatched and out of every mean, its KL
    included (it attends to patched positions before it, so its KL is not 0 as the first position's is). Agreement
    with SAELens ``run_evals`` on such contexts."""
    from gsae.export import export_saelens
    from gsae.lm import BYTE_BOS

    sae = build_topk(relu_after_topk=True)
    export_saelens(sae, tmp_path / "sae", {"hook": HOOK, "lm": tiny_lm.describe()})
    _mark_saelens_v6(tmp_path / "sae" / "cfg.json")
    toks = build_tokens(4, 32)
    toks[:, 13] = BYTE_BOS
    toks[2, 25] = BYTE_BOS
    assert BYTE_BOS in tiny_lm.special_token_ids
    ours = loss_added.run(sae, tiny_lm, HOOK, toks, batch_size=2)
    theirs = _saelens_run_evals(tiny_lm, tmp_path / "sae", toks, 2)
    assert ours["n_tokens"] == 4 * 32 - 9
    for ours_key, sl_key in {"ce_clean": "ce_loss_without_sae", "ce_sae": "ce_loss_with_sae",
                             "kl_sae": "kl_div_with_sae", "kl_ablation": "kl_div_with_ablation", "mse": "mse"}.items():
        assert math.isclose(ours[ours_key], theirs[sl_key], rel_tol=1e-4), (ours_key, ours[ours_key], theirs[sl_key])


def test_without_special_token_exclusion_l_added_is_smol_sae_patch_loss(tiny_lm):
    """``exclude_special_tokens=False`` reproduces smol-sae's ``patch_loss`` (SPEC §1.4): TransformerLens' mean CE
    (``return_type="loss"``) with the SAE output at every position, BOS included, against the clean one; every
    position counts."""
    sae, toks = build_topk(), build_tokens(4, 32)
    r = loss_added.run(sae, tiny_lm, HOOK, toks, batch_size=4, exclude_special_tokens=False)

    def splice(act, hook):  # noqa: ARG001
        return sae(act.reshape(-1, act.shape[-1])).x_hat.reshape(act.shape)

    with torch.no_grad():
        clean = float(tiny_lm.model(toks, return_type="loss"))
        patched = float(tiny_lm.model.run_with_hooks(toks, return_type="loss", fwd_hooks=[(HOOK, splice)]))
        x = tiny_lm.activations(toks, HOOK).reshape(-1, 64)
        mse = float((x - sae(x).x_hat).pow(2).sum(-1).mean())
    assert r["n_tokens"] == 4 * 32
    assert r["ce_clean"] == pytest.approx(clean, rel=1e-5)
    assert r["L_added"] == pytest.approx((patched - clean) / clean, rel=1e-4)
    assert r["mse"] == pytest.approx(mse, rel=1e-5)
    masked = loss_added.run(sae, tiny_lm, HOOK, toks, batch_size=4)
    assert masked["n_tokens"] == 4 * 31 and masked["L_added"] != pytest.approx(r["L_added"], rel=1e-4)


def test_contexts_with_nothing_to_score_are_said_not_divided_by() -> None:
    """``evaluate.py --context-size 2`` on a BOS-first SAE: the one prediction is from BOS, which is left out, so no
    CE was summed and L_added divided by a zero ce_clean (a ZeroDivisionError traceback)."""
    import pytest

    from gsae.evals.loss_added import _scores

    empty = dict.fromkeys(("ce_clean", "ce_sae", "ce_ablation", "kl_sae", "kl_ablation", "n_ce", "n_kl"), 0.0)
    with pytest.raises(ValueError, match=r"^loss_added: no next-token prediction to score .*--context-size"):
        _scores(empty)
    one = {**empty, "ce_clean": 2.0, "ce_sae": 3.0, "ce_ablation": 4.0, "n_ce": 1, "n_kl": 1}
    assert _scores(one)["L_added"] == 0.5
