"""SAELens export (loads with ``sae_lens.SAE.load_from_disk`` and computes the same thing) and
``load_checkpoint`` on a real checkpoint written by the CLI."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from gsae.export import export_saelens, load_checkpoint
from gsae.sae import GradTopKSAE, TopKSAE
from tests.conftest import build_topk, quickstart_args, randomize

REPO_ROOT = Path(__file__).resolve().parent.parent
META = {"lm": {"name": "random-tiny", "fold_ln": True, "center_writing_weights": False}, "hook": "blocks.1.hook_resid_pre",
        "context_size": 64, "sae_class": "gsae.sae.TopKSAE", "objective": "LocalSAESystem"}


def _load_saelens(path):
    from sae_lens import SAE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "non-empty model_from_pretrained_kwargs" advice
        return SAE.load_from_disk(str(path))


@torch.no_grad()
def test_relu_topk_export_is_exact(tmp_path) -> None:
    sae = randomize(build_topk(d_in=16, d_sae=64, k=5, relu_after_topk=True))
    with torch.no_grad():
        sae.b_enc.sub_(3.0)  # some kept pre-activations negative: ReLU'd to 0 on both sides
    path = export_saelens(sae, tmp_path / "sae", META)
    theirs = _load_saelens(path)
    x = torch.randn(200, 16)
    ours_latents = sae.encode(x)
    assert (sae(x).top_acts == 0).any(), "test setup: want some ReLU'd kept values"
    torch.testing.assert_close(theirs.encode(x), ours_latents, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(theirs.decode(ours_latents), sae(x).x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs(x), sae(x).x_hat, rtol=1e-5, atol=1e-5)
    assert theirs.cfg.k == 5 and theirs.cfg.d_in == 16 and theirs.cfg.d_sae == 64


@torch.no_grad()
def test_plain_topk_export_is_exact_when_kept_values_are_positive(tmp_path) -> None:
    sae = randomize(build_topk(d_in=16, d_sae=64, k=5, relu_after_topk=False))
    sae.b_enc.add_(10.0)  # every pre-activation positive
    theirs = _load_saelens(export_saelens(sae, tmp_path / "sae", META))
    x = torch.randn(200, 16)
    assert (sae(x).top_acts > 0).all()
    torch.testing.assert_close(theirs.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs(x), sae(x).x_hat, rtol=1e-5, atol=1e-4)


@torch.no_grad()
def test_plain_topk_export_differs_only_on_negative_kept_values(tmp_path) -> None:
    """The documented limit: SAELens ReLUs the kept values; without ``relu_after_topk`` a token whose
    kept values include a negative one encodes differently, every other token exactly the same."""
    sae = randomize(build_topk(d_in=16, d_sae=64, k=5, relu_after_topk=False))
    sae.b_enc.sub_(1.5)
    theirs = _load_saelens(export_saelens(sae, tmp_path / "sae", META))
    x = torch.randn(300, 16)
    negative = (sae(x).top_acts < 0).any(-1)
    assert negative.any() and (~negative).any()
    ours, saelens = sae.encode(x), theirs.encode(x)
    torch.testing.assert_close(saelens[~negative], ours[~negative], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(saelens, ours.relu(), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_gsae_exports_as_its_beta_zero_topk(tmp_path) -> None:
    sae = randomize(GradTopKSAE(16, d_sae=64, k=5, beta=3.0, relu_after_topk=True))
    theirs = _load_saelens(export_saelens(sae, tmp_path / "sae", {**META, "sae_class": "gsae.sae.GradTopKSAE"}))
    x = torch.randn(100, 16)
    torch.testing.assert_close(theirs.encode(x), sae.encode(x, grad=None), rtol=1e-5, atol=1e-6)
    assert theirs.cfg.metadata["gsae"]["sae_config"]["beta"] == 3.0


def test_export_metadata_survives_saelens_loading(tmp_path) -> None:
    path = export_saelens(build_topk(d_in=16), tmp_path / "sae", META)
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["apply_b_dec_to_input"] is True
    md = _load_saelens(path).cfg.metadata
    assert md.hook_name == "blocks.1.hook_resid_pre"
    assert md.model_name == "random-tiny"
    assert md.context_size == 64
    assert md.model_from_pretrained_kwargs == {"fold_ln": True, "center_writing_weights": False}
    assert md["gsae"]["sae_config"] == build_topk(d_in=16).config()


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_export_writes_the_runs_prepend_bos_and_context_size(tmp_path, prepend_bos) -> None:
    meta = {**META, "data": {"context_size": 1024, "prepend_bos": prepend_bos, "dataset": "x", "batch_size": 6}}
    md = _load_saelens(export_saelens(build_topk(d_in=16), tmp_path / "sae", meta)).cfg.metadata
    assert md.prepend_bos is prepend_bos
    assert md.context_size == 1024
    # evaluate.py reads the training dataset and batch size back, as from the checkpoint (and SAELens says nothing)
    import warnings

    from gsae.saelens_adapter import load_saelens_folder

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, read = load_saelens_folder(tmp_path / "sae")
    assert (read["dataset"], read["batch_size"], read["context_size"]) == ("x", 6, 1024)


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory) -> Path:
    """A 5-step quickstart run through the real CLI, in process; returns its checkpoint folder (~6 s idle)."""
    from gsae.cli import main

    root = tmp_path_factory.mktemp("quickstart")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO_ROOT)
        assert main(quickstart_args(root, steps=5)) == 0
    folder = root / "quickstart-topk" / "checkpoints"
    assert (folder / "last.ckpt").is_file()
    return folder


def test_load_checkpoint_of_a_system_state(tiny_lm, tmp_path) -> None:
    """Fast variant without a training run: what ``SAESystem.on_save_checkpoint`` writes, loaded back."""
    from gsae.systems import LocalSAESystem

    system = LocalSAESystem(lm=tiny_lm, sae=lambda d_in: GradTopKSAE(d_in, d_sae=32, k=3, beta=2.0),
                            hook="blocks.0.hook_resid_post")
    randomize(system.sae)
    ckpt = {"state_dict": system.state_dict()}
    system.on_save_checkpoint(ckpt)
    path = tmp_path / "system.ckpt"
    torch.save(ckpt, path)
    sae, meta = load_checkpoint(path)
    assert type(sae) is GradTopKSAE and sae.config() == system.sae.config()
    assert meta["hook"] == "blocks.0.hook_resid_post" and meta["lm"] == tiny_lm.describe()
    torch.testing.assert_close(sae.state_dict(), system.sae.state_dict(), rtol=0, atol=0)
    assert not any("lm." in k or "blocks." in k for k in ckpt["state_dict"])  # no language-model weights


@pytest.mark.slow
def test_load_checkpoint_from_a_cli_run(quickstart_run: Path) -> None:
    ckpts = sorted(quickstart_run.glob("*.ckpt"))
    assert len(ckpts) >= 2  # the step checkpoint and last.ckpt
    for ckpt in ckpts:
        sae, meta = load_checkpoint(ckpt)
        assert isinstance(sae, TopKSAE)
        assert sae.d_sae == 1024 and sae.k == 16 and sae.d_in == 128  # configs/quickstart/topk.yaml, gsae-tiny
        assert meta["hook"] == "blocks.2.hook_resid_post"
        assert meta["lm"]["name"] == "gsae-tiny"
        assert meta["architecture"] == "topk" and meta["objective"] == "LocalSAESystem"
        assert meta["tokens_seen"] > 0
        raw = torch.load(ckpt, map_location="cpu", weights_only=False)
        for name, p in sae.state_dict().items():
            torch.testing.assert_close(p, raw["state_dict"][f"sae.{name}"], rtol=0, atol=0)
        # the checkpoint never contains the language model's weights
        assert all(k.startswith(("sae.", "dead.")) or "." not in k for k in raw["state_dict"]), list(raw["state_dict"])
        # trained: b_dec was initialised from data, decoder rows are unit norm
        assert sae.b_dec.abs().sum() > 0
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(1024), atol=1e-5, rtol=0)


@pytest.mark.slow
@torch.no_grad()
def test_saelens_export_beside_the_checkpoint(quickstart_run: Path) -> None:
    sae, _ = load_checkpoint(quickstart_run / "last.ckpt")
    theirs = _load_saelens(quickstart_run / "last.saelens")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(theirs, name), getattr(sae, name), rtol=0, atol=0, msg=name)
    x = torch.randn(64, 128) * 3
    positive = (sae(x).top_acts > 0).all(-1)
    torch.testing.assert_close(theirs.encode(x)[positive], sae.encode(x)[positive], rtol=1e-5, atol=1e-5)
    assert theirs.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    assert theirs.cfg.metadata.prepend_bos is True and theirs.cfg.metadata.context_size == 64  # the quickstart's data


def _one_line_error(path) -> str:
    with pytest.raises(ValueError) as exc:
        load_checkpoint(path)
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def _one_line_error_mmap(path) -> str:
    """As evaluate.py reads it (mapped): torch's error for a file that is not a zip archive is about mmap."""
    with pytest.raises(ValueError) as exc:
        load_checkpoint(path, mmap=True)
    return str(exc.value)


def test_corrupt_checkpoint(tmp_path) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).to(torch.uint8).numpy().tobytes())
    # in its own words, not torch's ("mmap can only be used with files saved with ...", "invalid load key")
    assert "corrupt or unreadable: not a torch zip archive (4096 bytes; a copy cut short?)" in _one_line_error(bad)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    assert "corrupt or unreadable: it is empty (0 bytes)" in _one_line_error(empty)
    assert "it is empty (0 bytes)" in _one_line_error_mmap(empty)


@pytest.mark.slow
def test_truncated_checkpoint(quickstart_run: Path, tmp_path) -> None:
    data = (quickstart_run / "last.ckpt").read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    assert "corrupt or unreadable: not a torch zip archive" in _one_line_error(cut)
    assert "a copy cut short?" in _one_line_error_mmap(cut)


def test_foreign_torch_files(tmp_path) -> None:
    for i, obj in enumerate([{"state_dict": {"w": torch.zeros(2)}}, torch.zeros(3), [1, 2]]):
        path = tmp_path / f"foreign{i}.pt"
        torch.save(obj, path)
        assert "not a gsae checkpoint" in _one_line_error(path)


@pytest.mark.slow
def test_checkpoint_whose_weights_do_not_match_its_config(quickstart_run: Path, tmp_path) -> None:
    raw = torch.load(quickstart_run / "last.ckpt", map_location="cpu", weights_only=False)
    raw["gsae"]["sae_config"]["d_sae"] = 256
    path = tmp_path / "mismatch.ckpt"
    torch.save(raw, path)
    assert "does not match" in _one_line_error(path)


@torch.no_grad()
def test_relu_export_holds_the_normalised_decoder_the_forward_uses(tmp_path) -> None:
    """A ReLU SAE's forward normalises its decoder rows (its parameter is left unconstrained); the export writes the
    rows it decodes with, so SAELens reconstructs as gsae does when the rows are far from unit norm."""
    from gsae.sae import ReLUSAE

    torch.manual_seed(0)
    sae = randomize(ReLUSAE(16, 32, l1_coef=1.0))
    sae.W_dec.mul_(torch.empty(32, 1).uniform_(0.5, 1.5))
    assert (sae.W_dec.norm(dim=1) - 1).abs().max() > 0.3
    theirs = _load_saelens(export_saelens(sae, tmp_path / "sae", {**META, "sae_class": "gsae.sae.ReLUSAE"}))
    x = torch.randn(200, 16)
    assert (sae.encode(x) > 0).any()
    torch.testing.assert_close(theirs.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs(x), sae(x).x_hat, rtol=1e-5, atol=1e-5)


def test_export_of_a_run_that_recorded_no_prepend_bos_says_true(tmp_path):
    from gsae.export import export_saelens
    from gsae.saelens_adapter import load_saelens_folder
    from tests.conftest import build_topk
    from tests.test_export import META, _load_saelens

    path = export_saelens(build_topk(d_in=16), tmp_path / "sae", META)  # no data section, no prepend_bos
    assert json.loads((path / "cfg.json").read_text())["metadata"]["prepend_bos"] is True
    assert _load_saelens(path).cfg.metadata.prepend_bos is True
    assert load_saelens_folder(path)[1]["prepend_bos"] is True


def test_export_passes_every_lm_loading_flag_to_saelens(tmp_path):
    from gsae.export import export_saelens
    from gsae.saelens_adapter import load_saelens_folder
    from tests.conftest import build_topk
    from tests.test_export import META

    lm = {"name": "random-tiny", "fold_ln": True, "center_writing_weights": True, "center_unembed": True,
          "fold_value_biases": True}
    path = export_saelens(build_topk(d_in=16), tmp_path / "sae", {**META, "lm": lm})
    kwargs = json.loads((path / "cfg.json").read_text())["metadata"]["model_from_pretrained_kwargs"]
    assert kwargs == {k: True for k in ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")}
    assert load_saelens_folder(path)[1]["lm"]["fold_value_biases"] is True


def test_export_records_the_runs_evaluation_settings(tmp_path):
    """evaluate.py reads a run's evaluation settings back from its export; an export without any writes no key."""
    evaluation = {"benchmarks": ["loss_added"], "n_seqs": 8, "options": {"loss_added": {"batch": 2}}}
    path = export_saelens(build_topk(d_in=16), tmp_path / "sae", {**META, "evaluation": evaluation})
    assert _load_saelens(path).cfg.metadata["gsae"]["evaluation"] == evaluation
    plain = export_saelens(build_topk(d_in=16), tmp_path / "plain", META)
    assert "evaluation" not in json.loads((plain / "cfg.json").read_text())["metadata"]["gsae"]


def test_saved_step_and_load_members_of_a_one_sae_checkpoint(tiny_lm, tmp_path):
    """``saved_step`` reads the checkpoint's ``global_step`` (not its epoch); ``load_members`` of a one-SAE checkpoint
    is ``{"": (sae, meta)}`` with the SAE's own weights."""
    from gsae.export import load_members, saved_step
    from gsae.systems import LocalSAESystem

    system = LocalSAESystem(lm=tiny_lm, sae=lambda d_in: TopKSAE(d_in, d_sae=32, k=3), hook="blocks.0.hook_resid_post")
    randomize(system.sae)
    ckpt = {"state_dict": system.state_dict(), "global_step": 7, "epoch": 2}
    system.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "one.ckpt")
    assert saved_step(tmp_path / "one.ckpt") == 7
    members = load_members(tmp_path / "one.ckpt")
    assert list(members) == [""]
    sae, meta = members[""]
    torch.testing.assert_close(sae.state_dict(), system.sae.state_dict(), rtol=0, atol=0)
    assert meta["hook"] == "blocks.0.hook_resid_post"
