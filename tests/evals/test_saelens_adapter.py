"""SAELensAdapter: a SAELens SAE behind our interface gives our SAE's outputs and metrics."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from gsae.evals import loss_added
from gsae.evals import synthetic_activations as syn
from gsae.export import export_saelens
from gsae.sae.base import SparseAutoencoder
from gsae.saelens_adapter import (
    SAELensAdapter,
    is_saelens_folder,
    lm_kwargs,
    load_saelens_folder,
    load_saelens_pretrained,
)
from tests.evals.helpers import HOOK, build_tokens, build_topk, export_tiny


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
        "fold_value_biases": False,  # from_pretrained_no_processing's too: hook_z SAEs read unfolded value biases
    }
    assert lm_kwargs({"model_name": "gpt2"}, model="gpt2-medium")["name"] == "gpt2-medium"
    with pytest.raises(ValueError, match="--model"):
        lm_kwargs({})


def test_pretrained_fails_fast_offline(monkeypatch):
    with pytest.raises(ValueError, match="unknown SAELens release"):
        load_saelens_pretrained("sae_lens:no-such-release/x")
    with pytest.raises(ValueError, match="has no SAE"):
        load_saelens_pretrained("sae_lens:gpt2-small-res-jb/no-such-id")
    # offline with nothing cached (as here): what to do, not the hub's "check your connection and try again ..."
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 keeps the hub"):
        load_saelens_pretrained("sae_lens:gpt2-small-res-jb/blocks.8.hook_resid_pre")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("gsae.lm._hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ValueError, match="unreachable"):
        load_saelens_pretrained("sae_lens:gpt2-small-res-jb/blocks.8.hook_resid_pre")


# ---------------------------------------------------------------------- SAELens architectures and normalisation
ARCHS = ("standard", "jumprelu", "gated", "topk")
NORMS = ("none", "layer_norm", "constant_norm_rescale")


def saelens_sae(arch: str, norm: str, d_in: int = 64, d_sae: int = 96, seed: int = 0):
    """A SAELens SAE of ``arch`` built in-process, with generic (nonzero, seeded) parameters."""
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    cls, cfg_cls = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
        "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
    }[arch]
    extra = {"k": 6} if arch == "topk" else {}
    meta = SAEMetadata(hook_name=HOOK, model_name="random-tiny", context_size=16, prepend_bos=True)
    sae = cls(cfg_cls(d_in=d_in, d_sae=d_sae, normalize_activations=norm, metadata=meta, **extra))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen) + (0.05 if name == "threshold" else 0.0))
            if name == "threshold":
                p.abs_()
    return sae


def edited_folder(tmp_path: Path, name: str, edit, arch: str = "topk") -> Path:
    """A SAELens folder of :func:`saelens_sae` (``arch``, no normalisation) saved as ``tmp_path/name``, its cfg.json
    rewritten as ``edit(cfg)`` returns it."""
    saelens_sae(arch, "none").save_model(tmp_path / name)
    cfg = tmp_path / name / "cfg.json"
    cfg.write_text(json.dumps(edit(json.loads(cfg.read_text()))))
    return tmp_path / name


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_equals_saelens_encode_decode(arch, norm):
    sl = saelens_sae(arch, norm)
    adapter = SAELensAdapter(sl)
    x = 5.0 + 20.0 * torch.randn(12, 64, generator=torch.Generator().manual_seed(1))  # offset, large norms
    with torch.no_grad():
        want_lat = sl.encode(x)
        want = sl.decode(want_lat)
        out = adapter(x)
        torch.testing.assert_close(out.latents, want_lat, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out.x_hat, want, atol=1e-5, rtol=1e-5)
        assert (want_lat != 0).any(), "the test SAE must have active latents"
        # a code decoded on its own (plateaus' synthetic activations) is de-normalised with the base's statistics
        code = syn.sparse_code(out)
        torch.testing.assert_close(syn.decode(adapter, code, like=x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(adapter.decode(out.latents, like=x), want, atol=1e-5, rtol=1e-5)
    if norm == "none":
        torch.testing.assert_close(syn.decode(adapter, code), want, atol=1e-5, rtol=1e-5)
    else:  # without the statistics the scale would be wrong: refuse rather than decode wrongly
        with pytest.raises(ValueError, match="like="):
            syn.decode(adapter, code)
        naive = SparseAutoencoder.decode_sparse(adapter, code.vals, code.idx)  # the old path, no de-normalisation
        assert ((naive - want).norm(dim=-1) / want.norm(dim=-1)).mean() > 0.1


@pytest.mark.parametrize("arch", ["topk", "standard"])
@pytest.mark.parametrize("norm", ["expected_average_only_in", "covariance_whitening"])
def test_a_saelens_training_checkpoint_reads_raw_activations_through_its_saved_scaler(tmp_path, arch, norm):
    """A SAELens training checkpoint keeps its activation scale (and whitening) beside the unfolded weights; SAELens
    applies it outside the SAE (``run_evals``' ``activation_scaler``). The folder must compute SAELens' own
    ``unscale(decode(encode(scale(x))))`` on raw activations; without the scaler file it is refused."""
    from sae_lens.training.activation_scaler import ActivationScaler, ActivationWhitening

    def build():
        sl = saelens_sae(arch, norm)
        if arch == "standard":
            sl.cfg.apply_b_dec_to_input = False  # the whitening's b_enc shift (SAELens folds it only then)
        return sl

    sl = build()
    gen = torch.Generator().manual_seed(2)
    if norm == "expected_average_only_in":
        scaler = ActivationScaler(scaling_factor=0.25)
    else:
        M = 0.5 * torch.eye(64) + 0.1 * torch.randn(64, 64, generator=gen)
        scaler = ActivationScaler(whitening=ActivationWhitening(3 * torch.randn(64, generator=gen), M, torch.linalg.inv(M)))
    sl.save_model(tmp_path / "ckpt")
    x = 5.0 + 20.0 * torch.randn(12, 64, generator=gen)
    with torch.no_grad():
        want_lat = sl.encode(scaler.scale(x))
        want = scaler.unscale(sl.decode(want_lat))
    with pytest.raises(ValueError, match=rf"normalize_activations='{norm}', and no activation_scaler.json beside"):
        load_saelens_folder(tmp_path / "ckpt")
    scaler.save(str(tmp_path / "ckpt" / "activation_scaler.json"))
    adapter, _ = load_saelens_folder(tmp_path / "ckpt")
    with torch.no_grad():
        got = adapter(x)
        unscaled = SAELensAdapter(build())(x).latents  # the same weights reading x as it is
    rel = lambda a, b: ((a - b).norm(dim=-1) / b.norm(dim=-1)).max()  # noqa: E731
    assert rel(got.x_hat, want) < 1e-5 and rel(got.latents, want_lat) < 1e-5, (rel(got.x_hat, want), rel(got.latents, want_lat))
    assert rel(unscaled, want_lat) > 0.2 and (want_lat != 0).any()


def test_synthetic_targets_of_layer_norm_saelens_sae_match_saelens_decode():
    """A modified code (plateaus' synthetic_baseline) of base A decodes as SAELens would after encoding A."""
    sl = saelens_sae("topk", "layer_norm")
    adapter = SAELensAdapter(sl)
    A = 3.0 + 30.0 * torch.randn(40, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        code = syn.sparse_code(adapter(A))
        density = syn.latent_density(syn.count_active(code, 96), 40)
        new = syn.synthetic_baseline(code, syn.sparsity_neighbours(density, 10, 0), 0)
        got = syn.decode(adapter, new, like=A)
        sl.encode(A)  # SAELens' own path: encode the base, decode the modified code
        dense = torch.zeros(40, 96).scatter_add_(-1, new.idx, new.vals)
        want = sl.decode(dense)
        # independent: decode in the normalised space, then undo layer_norm with A's mean and std
        mu, sd = A.mean(-1, keepdim=True), (A - A.mean(-1, keepdim=True)).std(-1, keepdim=True)
        manual = (dense @ sl.W_dec + sl.b_dec) * sd + mu
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, manual, atol=1e-4, rtol=1e-5)


def test_evaluate_py_on_layer_norm_topk_folder_equals_saelens_forward(tmp_path):
    """Acceptance (issue 10 item 4): loss_added through evaluate.py on a SAELens layer_norm TopK folder equals
    splicing SAELens' own ``decode(encode(x))`` in with a TransformerLens hook; plateaus runs on it."""
    from gsae.evaluate import held_out_tokens
    from gsae.evaluate import main as evaluate_main
    from gsae.lm import LanguageModel, next_token_loss
    from gsae.metrics import kl_div_per_token

    sl = saelens_sae("topk", "layer_norm")
    sl.save_model(tmp_path / "ln_topk")
    out = tmp_path / "res.json"
    opts = {"plateaus": {"n_perturbations": 4, "prompt_len": 6, "plateau": False, "schedules": ["absolute"]}}
    args = [str(tmp_path / "ln_topk"), "--benchmarks", "loss_added,plateaus", "--n-seqs", "4", "--device", "cpu"]
    assert evaluate_main([*args, "--options", json.dumps(opts), "--output", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    got = next(iter(res["loss_added"].values()))
    _, meta = load_saelens_folder(tmp_path / "ln_topk")
    tiny_lm = LanguageModel(**meta["lm"])  # SAELens' no-processing model, as evaluate.py loads it
    assert not tiny_lm.center_writing_weights
    toks = held_out_tokens(tiny_lm, "synthetic", 16, 4)
    keep = ~torch.isin(toks, torch.tensor(tiny_lm.special_token_ids))

    def splice(act, hook):
        flat = act.reshape(-1, act.shape[-1])
        return torch.where(keep[..., None], sl.decode(sl.encode(flat)).reshape(act.shape), act)

    with torch.no_grad():
        clean = tiny_lm.model(toks)
        patched = tiny_lm.model.run_with_hooks(toks, fwd_hooks=[(HOOK, splice)])
    ce_mask = keep[:, :-1]
    ce_sae = float(next_token_loss(patched, toks, "none")[ce_mask].mean())
    kl_sae = float(kl_div_per_token(clean, patched)[keep].mean())
    assert got["ce_sae"] == pytest.approx(ce_sae, rel=1e-5)
    assert got["kl_sae"] == pytest.approx(kl_sae, rel=1e-4, abs=1e-7)
    plat = next(iter(res["plateaus"].values()))
    assert plat["n_perturbations"] == 4


def test_prepend_bos_comes_from_the_metadata(tmp_path):
    sl = saelens_sae("standard", "none")
    sl.cfg.metadata.prepend_bos = False
    sl.save_model(tmp_path / "nobos")
    _, meta = load_saelens_folder(tmp_path / "nobos")
    assert meta["prepend_bos"] is False


def test_a_transcoder_is_refused_in_one_line(tmp_path, capsys):
    """A SAELens transcoder reads one hook and predicts another (``hook_name_out``): splicing its output into the hook
    it reads gave meaningless numbers with exit code 0. It is refused, naming the folder and both hooks."""
    from sae_lens import Transcoder, TranscoderConfig
    from sae_lens.saes.sae import SAEMetadata

    from gsae.evaluate import main as evaluate_main

    meta = SAEMetadata(hook_name="blocks.1.hook_resid_mid", hook_name_out="blocks.1.hook_mlp_out",
                       model_name="random-tiny", context_size=16, prepend_bos=True)
    cfg = TranscoderConfig(d_in=64, d_sae=96, d_out=64, apply_b_dec_to_input=False, metadata=meta)
    Transcoder(cfg).save_model(tmp_path / "tc")
    assert evaluate_main([str(tmp_path / "tc"), "--benchmarks", "loss_added", "--n-seqs", "2"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (f"error: SAELens folder '{tmp_path / 'tc'}': a transcoder (reads blocks.1.hook_resid_mid, writes "
            "blocks.1.hook_mlp_out) predicts another activation than it reads") in err, err


def test_the_default_dataset_failing_says_it_is_the_default(tmp_path, capsys):
    """A SAELens SAE records no gsae training dataset, so evaluate.py reads OpenWebText unless given ``--dataset``;
    offline that failed with ``--dataset: could not open …``, an option the user never gave. The line now says it is
    the default and names the folder's own ``dataset_path``."""
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    from gsae.evaluate import main as evaluate_main

    meta = SAEMetadata(hook_name="blocks.2.hook_resid_pre", model_name="gsae-tiny", context_size=32, prepend_bos=True)
    meta.dataset_path = "gsae-corpus"
    sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=128, d_sae=96, metadata=meta)).save_model(tmp_path / "std")
    assert evaluate_main([str(tmp_path / "std"), "--benchmarks", "loss_added", "--n-seqs", "2"]) == 1
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")][0]
    assert line.startswith("error: could not open 'Skylion007/openwebtext'"), line
    assert line.endswith(f"Skylion007/openwebtext is evaluate.py's default for PATH '{tmp_path / 'std'}', which "
                         "records no gsae training dataset: pass --dataset (its cfg.json names dataset_path "
                         "'gsae-corpus')"), line
    assert evaluate_main([str(tmp_path / "std"), "--benchmarks", "loss_added", "--n-seqs", "2",
                          "--dataset", "gsae-corpus"]) == 0


def test_under_torchrun_a_saelens_sae_fails_before_the_paths_before_it_are_evaluated(tmp_path, monkeypatch):
    """As one process does, ``torchrun … evaluate.py`` loads SAELens SAEs and reads their held-out tokens before
    evaluating anything: a later PATH whose default dataset cannot be read (OpenWebText offline) stopped every rank
    only after the PATHs before it were evaluated, whose results were then lost. Two ranks are stood in for (rank 0
    of 2, the exchange of errors a one-rank raise): no evaluation starts, and the error is the one-process one."""
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    import gsae.evals
    import gsae.evaluate as ev

    export_tiny(tmp_path / "t.saelens", sae_class="gsae.sae.TopKSAE")
    meta = SAEMetadata(hook_name="blocks.2.hook_resid_pre", model_name="gsae-tiny", context_size=32, prepend_bos=True)
    sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=128, d_sae=96, metadata=meta)).save_model(tmp_path / "std")
    args = ev.build_parser().parse_intermixed_args(
        [str(tmp_path / "t.saelens"), str(tmp_path / "std"), "--benchmarks", "loss_added", "--n-seqs", "2"])

    def agree(error):  # rank 0 of 2 where no other rank failed
        if error is not None:
            raise error

    calls = []
    monkeypatch.setattr(ev, "_ranks", lambda: (0, 2))
    monkeypatch.setattr(ev, "_agree", agree)
    monkeypatch.setattr(gsae.evals, "run_split", lambda *a, **k: calls.append(a) or pytest.fail("evaluated"))
    with pytest.raises(ev.ArgumentError, match=r"^could not open 'Skylion007/openwebtext'.* pass --dataset$"):
        ev.evaluate(args)
    assert calls == []


def test_a_hook_z_saelens_sae_is_evaluated_on_the_model_saelens_evaluates_with(tmp_path, capsys):
    """SAELens evaluates with ``from_pretrained_no_processing``, which leaves the value biases unfolded; TransformerLens'
    default folds them into b_O, shifting ``hook_z`` by −b_V (the residual stream is the same). A ``hook_z`` SAE's
    evaluation loaded the folded model, so it read other activations than the SAE was trained on. Checked against a
    model built with no processing at all (SAELens' view) and the SAE's own SAELens encode/decode."""
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata
    from safetensors.torch import load_file

    from gsae import tinylm
    from gsae.evaluate import main as evaluate_main
    from gsae.lm import LanguageModel, build_hooked_transformer

    hook = "blocks.1.attn.hook_z"
    folded = LanguageModel("gsae-tiny", fold_ln=False, center_writing_weights=False, center_unembed=False)
    unfolded = LanguageModel("gsae-tiny", fold_ln=False, center_writing_weights=False, center_unembed=False,
                             fold_value_biases=False)
    tokens = torch.randint(1, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = folded.bos_token_id
    with torch.no_grad():
        z_f = folded.activations(tokens, hook)
        z_u = unfolded.activations(tokens, hook)
        assert torch.allclose(folded.activations(tokens, "blocks.2.hook_resid_pre"),
                              unfolded.activations(tokens, "blocks.2.hook_resid_pre"), atol=1e-4)
    assert (z_f - z_u).abs().max() > 1e-3  # b_V is not zero in gsae-tiny
    path = tinylm.assets_dir("gsae-tiny")
    bare = build_hooked_transformer(tinylm.read_config("gsae-tiny")["arch"], tokenizer=tinylm.load_tokenizer(path),
                                    state_dict=load_file(str(path / "model.safetensors")), seed=None)
    bare.eval()
    store = {}
    with torch.no_grad():
        bare.run_with_hooks(tokens, return_type=None, fwd_hooks=[(hook, lambda a, hook: store.__setitem__("z", a))])
    torch.testing.assert_close(z_u, store["z"].flatten(-2), atol=1e-5, rtol=1e-5)

    meta = SAEMetadata(hook_name=hook, model_name="gsae-tiny", context_size=32, prepend_bos=True)
    d_in = z_u.shape[-1]
    sl = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=d_in, d_sae=64, metadata=meta))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sl.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    sl.save_model(tmp_path / "z")
    out = tmp_path / "res.json"
    assert evaluate_main([str(tmp_path / "z"), "--benchmarks", "loss_added", "--n-seqs", "4", "--device", "cpu",
                          "--dataset", "gsae-corpus", "--output", str(out)]) == 0
    from gsae.evaluate import held_out_tokens
    from gsae.saelens_adapter import load_saelens_folder

    got = json.loads(out.read_text())["results"]["loss_added"][str(tmp_path / "z")]
    toks = held_out_tokens(unfolded, "gsae-corpus", 32, 4)  # what evaluate.py read (BOS, 4 contexts of 32)
    with torch.no_grad():
        bare.run_with_hooks(toks, return_type=None, fwd_hooks=[(hook, lambda a, hook: store.__setitem__("z", a))])
        x = store["z"].flatten(-2)[toks != folded.bos_token_id]
        x_hat = sl.decode(sl.encode(x))
    want = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert got["explained_variance"] == pytest.approx(float(want), rel=1e-4)
    assert load_saelens_folder(tmp_path / "z")[1]["lm"]["fold_value_biases"] is False
    # steering does not apply off the residual stream: its empty column says why under the table
    assert evaluate_main([str(tmp_path / "z"), "--benchmarks", "steering", "--n-seqs", "2", "--device", "cpu",
                          "--dataset", "gsae-corpus"]) == 0
    assert f"steering skipped for z: hook {hook!r} is not in the residual stream" in capsys.readouterr().out


def test_folders_saelens_loads_but_gsae_cannot_evaluate_are_refused_naming_the_folder(tmp_path, capsys):
    """Each in one line naming the folder and what is wrong (they were 'unknown hook None', a TypeError, 'selected
    index k out of range' mid-evaluation, torch's 'Error(s) in loading state_dict for TopKSAE:' cut before the key)."""
    from gsae.saelens_adapter import load_saelens_folder

    folder = functools.partial(edited_folder, tmp_path)
    cases = {
        "list": (lambda c: [c], "cfg.json holds a list, not a mapping of SAE options"),
        "no_hook": (lambda c: {**c, "metadata": {**c["metadata"], "hook_name": None}}, "cfg.json names no hook_name"),
        "head": (lambda c: {**c, "metadata": {**c["metadata"], "hook_head_index": 1}}, "a single-head SAE"),
        "k": (lambda c: {**c, "k": 500}, "cfg.json has k 500 > d_sae 96"),
        "no_model": (lambda c: {**c, "metadata": {**c["metadata"], "model_name": None}}, "names no model"),
        "shape": (lambda c: {**c, "d_sae": 48}, "size mismatch for W_dec"),
    }
    bos = folder("bos", lambda c: {**c, "metadata": {**c["metadata"], "prepend_bos": "false"}})
    assert load_saelens_folder(bos)[1]["prepend_bos"] is False  # a string, as a hand-written cfg.json may hold
    sl = saelens_sae("topk", "none")
    with torch.no_grad():
        sl.W_dec[3, 2] = float("nan")
    sl.save_model(tmp_path / "nan")
    from gsae.evaluate import main as evaluate_main

    assert evaluate_main([str(tmp_path / "nan"), "--benchmarks", "loss_added", "--n-seqs", "2"]) == 1
    assert capsys.readouterr().err.strip().endswith(f"PATH {str(tmp_path / 'nan')!r}: the SAE's W_dec hold NaN or inf values")
    for name, (edit, words) in cases.items():
        with pytest.raises(ValueError) as e:
            load_saelens_folder(folder(name, edit))
        text = str(e.value)
        assert text.startswith(f"SAELens folder {str(tmp_path / name)!r}") and words in text and "\n" not in text, text


def test_a_folder_of_an_architecture_saelens_lacks_or_with_model_options_gsae_cannot_apply_says_so(tmp_path, caplog):
    """An architecture SAELens does not know gave SAELens' bare ``KeyError: 'jumprelu_v9'``; model options other than
    the four weight-processing flags (``dtype``, ``first_n_layers``, ...) were dropped without a word."""
    import logging

    saelens_sae("standard", "none").save_model(tmp_path / "sae")
    cfg_file = tmp_path / "sae" / "cfg.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "architecture": "jumprelu_v9"}))
    with pytest.raises(ValueError, match=r"cfg.json architecture 'jumprelu_v9' is not one SAELens [\d.]+ knows "
                                         r"\(.*jumprelu, .*standard, .*topk"):
        load_saelens_folder(tmp_path / "sae")
    meta = {**cfg["metadata"], "model_from_pretrained_kwargs": {"center_writing_weights": True, "dtype": "bfloat16",
                                                                "first_n_layers": 1}}
    cfg_file.write_text(json.dumps({**cfg, "metadata": meta}))
    with caplog.at_level(logging.WARNING, logger="gsae.saelens_adapter"):
        _, got = load_saelens_folder(tmp_path / "sae")
    assert got["lm"]["center_writing_weights"] is True
    said = [r.getMessage() for r in caplog.records if r.name == "gsae.saelens_adapter"]
    assert len(said) == 1 and "model_from_pretrained_kwargs not applied: dtype, first_n_layers (" in said[0], said


def test_a_hook_z_saelens_sae_with_reshaping_reads_our_flat_activations():
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    from gsae.saelens_adapter import SAELensAdapter

    meta = SAEMetadata(hook_name="blocks.1.attn.hook_z", model_name="gsae-tiny", context_size=32, prepend_bos=True)
    sl = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=64, d_sae=32, reshape_activations="hook_z", metadata=meta))
    ref = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=64, d_sae=32, metadata=meta))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sl.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    ref.load_state_dict(sl.state_dict())
    x = torch.randn(10, 64, generator=gen)
    got = SAELensAdapter(sl)(x).x_hat
    torch.testing.assert_close(got, ref.decode(ref.encode(x)).detach())


def test_build_targets_of_a_layer_norm_saelens_sae_denormalise_with_the_base():
    """Plateaus' synthetic targets of an input-normalising SAE: the base's swapped code, de-normalised with the
    *base's* mean and std (SAELens after encoding the base), not with another activation's."""
    sl = saelens_sae("topk", "layer_norm")
    adapter = SAELensAdapter(sl)
    pool = 3.0 + 30.0 * torch.randn(40, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = adapter(pool)
        code = syn.sparse_code(out)
        density = syn.latent_density(syn.count_active(code, 96), 40)
        t = syn.build_targets(adapter, pool, out.x_hat, code, density, 12, seed=0)
        A = pool[t.base_idx]
        base_code = syn.SparseCode(code.idx[t.base_idx], code.vals[t.base_idx])
        new = syn.synthetic_baseline(base_code, syn.sparsity_neighbours(density, 10, 0), 0)
        dense = torch.zeros(12, 96).scatter_add_(-1, new.idx, new.vals)
        mu = A.mean(-1, keepdim=True)
        manual = (dense @ sl.W_dec + sl.b_dec) * (A - mu).std(-1, keepdim=True) + mu
    torch.testing.assert_close(t.targets["synthetic_baseline"], manual, atol=1e-4, rtol=1e-5)


def test_a_gated_saelens_sae_exposes_its_gate_bias_as_b_enc():
    """A gated SAE has no ``b_enc``: the adapter's ``b_enc`` is SAELens' ``b_gate`` (zeros only without either)."""
    sl = saelens_sae("gated", "none")
    assert not isinstance(getattr(sl, "b_enc", None), torch.Tensor)
    adapter = SAELensAdapter(sl)
    assert adapter.b_enc is sl.b_gate and (sl.b_gate != 0).any()
    std = saelens_sae("standard", "none")
    assert SAELensAdapter(std).b_enc is std.b_enc


def test_the_adapter_returns_reconstructions_in_the_inputs_dtype():
    """A float32 SAELens SAE reading float64 activations computes in float32 and hands back float64, as ours do."""
    sl = saelens_sae("topk", "none")
    x = torch.randn(8, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = SAELensAdapter(sl)(x)
        want = sl.decode(sl.encode(x.float()))
    assert out.x_hat.dtype == torch.float64
    torch.testing.assert_close(out.x_hat, want.double())


def test_a_folder_with_k_one_above_d_sae_or_head_index_zero_is_refused(tmp_path):
    """The boundaries of the refusals: ``k = d_sae + 1`` (``k = d_sae`` loads) and head index 0 (a head, not None)."""
    folder = functools.partial(edited_folder, tmp_path)
    with pytest.raises(ValueError, match=r"cfg.json has k 97 > d_sae 96"):
        load_saelens_folder(folder("k97", lambda c: {**c, "k": 97}))
    assert load_saelens_folder(folder("k96", lambda c: {**c, "k": 96}))[0].d_sae == 96
    with pytest.raises(ValueError, match=r"a single-head SAE \(hook_head_index 0\)"):
        load_saelens_folder(folder("head0", lambda c: {**c, "metadata": {**c["metadata"], "hook_head_index": 0}}))


def test_long_saelens_errors_are_cut_to_300_characters():
    from gsae.saelens_adapter import _first_line

    assert _first_line(ValueError("x" * 400)) == "x" * 297 + "..."
    assert _first_line(ValueError("y" * 300)) == "y" * 300
    assert _first_line(RuntimeError("Error(s) in loading state_dict for TopKSAE:\n  size mismatch\nmore")) == (
        "Error(s) in loading state_dict for TopKSAE: size mismatch")


def test_signed_latents_of_an_abstopk_saelens_sae_pass_through_unchanged():
    """SAELens' ``abstopk`` keeps the k largest |pre-activations| with their sign: the adapter's latents and
    reconstruction are SAELens' own, negative latents included (no ReLU of ours on top)."""
    from sae_lens.saes.abstopk_sae import AbsTopKSAE, AbsTopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name=HOOK, model_name="random-tiny", context_size=16, prepend_bos=True)
    sl = AbsTopKSAE(AbsTopKSAEConfig(d_in=64, d_sae=96, k=6, metadata=meta))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sl.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        x = torch.randn(12, 64, generator=gen)
        want = sl.encode(x)
        out = SAELensAdapter(sl)(x)
        manual = sl.decode(want)
    assert (want < 0).any() and (want > 0).any()
    torch.testing.assert_close(out.latents, want)
    torch.testing.assert_close(out.x_hat, manual)


def test_a_folder_that_records_no_prepend_bos_evaluates_with_bos(tmp_path):
    """``prepend_bos`` True (TransformerLens' default tokenisation) when cfg.json says nothing."""
    meta_without_bos = lambda c: {**c, "metadata": {k: v for k, v in c["metadata"].items() if k != "prepend_bos"}}  # noqa: E731
    assert load_saelens_folder(edited_folder(tmp_path, "sae", meta_without_bos, arch="standard"))[1]["prepend_bos"] is True


def test_a_transcoder_recording_no_output_hook_is_still_refused():
    """A transcoder whose metadata names no ``hook_name_out`` and whose ``d_out`` equals ``d_in`` is refused by its
    architecture alone."""
    from sae_lens import Transcoder, TranscoderConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name="blocks.1.hook_resid_mid", model_name="random-tiny", context_size=16, prepend_bos=True)
    tc = Transcoder(TranscoderConfig(d_in=64, d_sae=96, d_out=64, apply_b_dec_to_input=False, metadata=meta))
    assert getattr(tc.cfg.metadata, "hook_name_out", None) is None
    with pytest.raises(ValueError, match=r"a transcoder \(reads blocks.1.hook_resid_mid\) predicts another activation"):
        SAELensAdapter(tc)
