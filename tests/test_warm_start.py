"""Warm starts (``--model.init_from``, a sweep member's ``init_from``): the started SAE computes what its source
computed — checked against the source's own forward (SAELens' code for SAELens SAEs, gsae's for checkpoints) — the
first batch keeps the source's ``b_dec``, a resume does not read the source, and bad sources fail in one line before
anything is written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from gsae.cli import main
from gsae.lm import LanguageModel
from gsae.sae import GradTopKSAE, ReLUSAE, TopKSAE
from gsae.systems import LocalSAESystem, SweepSAESystem
from gsae.warm_start import read_source, warm_start
from tests.systems.helpers import HOOK

D_IN, D_SAE = 64, 96


def saelens_sae(arch: str, apply_b_dec: bool = True, norm: str = "none", unit_rows: bool = False, k: int = 6):
    """A SAELens SAE built in-process, generic nonzero parameters (decoder rows of norms 0.3–3 unless ``unit_rows``)."""
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    cls, cfg_cls = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
    }[arch]
    meta = SAEMetadata(hook_name=HOOK, model_name="random-tiny", context_size=16, prepend_bos=True)
    extra = {"k": k} if arch == "topk" else {}
    sae = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=apply_b_dec, normalize_activations=norm,
                      metadata=meta, **extra))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        rows = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
        scale = 1.0 if unit_rows else 0.3 + 2.7 * torch.rand(D_SAE, 1, generator=gen)
        sae.W_dec.copy_(rows * scale)
    return sae


def _x(n: int = 40) -> torch.Tensor:
    return 2.0 + 3.0 * torch.randn(n, D_IN, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("apply_b_dec", [True, False], ids=["b_dec-in", "no-b_dec-in"])
def test_a_saelens_relu_sae_starts_a_relu_sae_computing_the_same(tmp_path, apply_b_dec):
    """SAELens ``standard`` (rows of any norm, ``b_dec`` subtracted or not) into Braun et al.'s ReLU SAE (rows
    normalised in the forward, ``x`` read as is): the same latents up to each row's norm and the same reconstruction
    as SAELens' own ``encode``/``decode``."""
    sl = saelens_sae("standard", apply_b_dec=apply_b_dec)
    sl.save_model(tmp_path / "std")
    sae = ReLUSAE(D_IN, d_sae=D_SAE)
    said = warm_start(sae, str(tmp_path / "std"), HOOK, "--model.init_from")
    assert said.startswith("--model.init_from: started from SAELens folder") and "standard, d_sae 96" in said
    x = _x()
    with torch.no_grad():
        want_lat = sl.encode(x)
        want = sl.decode(want_lat)
        out = sae(x)
    assert (want_lat > 0).float().mean() > 0.1, "the test SAE must have active latents"
    torch.testing.assert_close(out.x_hat, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.latents, want_lat * sl.W_dec.norm(dim=1), atol=1e-4, rtol=1e-4)


def test_a_saelens_topk_sae_starts_a_topk_sae_computing_the_same(tmp_path):
    """SAELens ``topk`` (unit rows, as SAELens trains them) into gsae's TopK SAE with ReLU after the selection, and
    into a g-SAE (β = 0 here, so its selection is TopK's): the tensors copied exactly, and SAELens' reconstruction."""
    sl = saelens_sae("topk", unit_rows=True)
    sl.save_model(tmp_path / "topk")
    for sae in (TopKSAE(D_IN, d_sae=D_SAE, k=6, relu_after_topk=True), GradTopKSAE(D_IN, d_sae=D_SAE, k=6, beta=0.0,
                                                                                 relu_after_topk=True)):
        warm_start(sae, str(tmp_path / "topk"), HOOK, "--model.init_from")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(getattr(sae, name).detach(), getattr(sl, name).detach(), atol=1e-6, rtol=1e-6)
        x = _x()
        with torch.no_grad():
            torch.testing.assert_close(sae(x).x_hat, sl.decode(sl.encode(x)), atol=1e-4, rtol=1e-4)


def test_rows_a_little_off_unit_norm_are_still_normalised_for_a_relu_sae(tmp_path):
    """Decoder rows of norms 0.96–1.04 (a source trained without the constraint, or rounded) are not "unit already":
    the ReLU SAE normalises its rows in the forward, so their norms must move into the encoder as for any other norm,
    or every latent's contribution is off by up to 4%. SAELens' own forward is the reference; a ReLU SAE is not
    warned about (the norms fold exactly through the ReLU)."""
    import warnings

    sl = saelens_sae("standard", unit_rows=True)
    with torch.no_grad():
        sl.W_dec.mul_(1 + 0.04 * (2 * torch.rand(D_SAE, 1, generator=torch.Generator().manual_seed(2)) - 1))
    sl.save_model(tmp_path / "near")
    sae = ReLUSAE(D_IN, d_sae=D_SAE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warm_start(sae, str(tmp_path / "near"), HOOK, "--model.init_from")
    x = _x()
    with torch.no_grad():
        want = sl.decode(sl.encode(x))
        torch.testing.assert_close(sae(x).x_hat, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sae.decoder_weight().norm(dim=1), torch.ones(D_SAE))


def test_a_topk_sae_without_the_unit_norm_constraint_takes_the_rows_as_they_are(tmp_path):
    """A TopK SAE that does not keep its rows at unit norm (``unit_norm_decoder=False``, as smol-sae) gets the source's
    four tensors unchanged, rows of norms 0.3–3 included: folding the norms into the encoder would change which
    latents TopK keeps. Its reconstruction is SAELens' own."""
    sl = saelens_sae("topk")
    assert (sl.W_dec.norm(dim=1) - 1).abs().max() > 0.5
    sl.save_model(tmp_path / "topk")
    sae = TopKSAE(D_IN, d_sae=D_SAE, k=6, relu_after_topk=True, unit_norm_decoder=False)
    warm_start(sae, str(tmp_path / "topk"), HOOK, "--model.init_from")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(sae, name).detach(), getattr(sl, name).detach()), name
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(sae(x).x_hat, sl.decode(sl.encode(x)), atol=1e-4, rtol=1e-4)


def test_a_saelens_training_checkpoint_starts_an_sae_reading_raw_activations(tmp_path):
    """A SAELens training checkpoint (``expected_average_only_in``, its scale in ``activation_scaler.json``): the
    scale is folded in, so the started SAE reconstructs raw activations as SAELens with its scaler does."""
    from sae_lens.training.activation_scaler import ActivationScaler

    sl = saelens_sae("topk", norm="expected_average_only_in", unit_rows=True)
    sl.save_model(tmp_path / "scaled")
    scaler = ActivationScaler(scaling_factor=0.25)
    scaler.save(str(tmp_path / "scaled" / "activation_scaler.json"))
    sae = TopKSAE(D_IN, d_sae=D_SAE, k=6, relu_after_topk=True)
    warm_start(sae, str(tmp_path / "scaled"), HOOK, "--model.init_from")
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(sae(x).x_hat, scaler.unscale(sl.decode(sl.encode(scaler.scale(x)))), atol=1e-4,
                                   rtol=1e-4)


def test_a_gsae_checkpoint_starts_another_class_and_a_sweep_member_is_named(tmp_path):
    """A TopK checkpoint starts a g-SAE (same tensors: a TopK SAE turned g-SAE), a ReLU one a TopK SAE (``b_enc``
    absorbs ``b_dec W_enc``, so the pre-activations are the source's); a sweep checkpoint needs ``CKPT:MEMBER``."""
    from gsae.export import read_checkpoint

    lm = LanguageModel("random-tiny", seed=0)
    src = LocalSAESystem(lm, lambda d: ReLUSAE(d, d_sae=D_SAE, seed=3), hook=HOOK)
    with torch.no_grad():
        src.sae.b_dec.copy_(torch.randn(D_IN))
        src.sae.W_dec.mul_(2.0)  # rows of norm 2: the ReLU SAE normalises them in its forward
    ckpt = {"gsae": src.describe(), "state_dict": src.state_dict()}
    torch.save(ckpt, tmp_path / "relu.ckpt")
    assert read_checkpoint(tmp_path / "relu.ckpt")["gsae"]["sae_class"].endswith("ReLUSAE")
    topk = TopKSAE(D_IN, d_sae=D_SAE, k=D_SAE)
    warm_start(topk, str(tmp_path / "relu.ckpt"), HOOK, "--model.init_from")
    x = _x()
    with torch.no_grad():
        pre_src = x @ src.sae.W_enc + src.sae.b_enc
        pre = (x - topk.b_dec) @ topk.W_enc + topk.b_enc
        torch.testing.assert_close(pre, pre_src, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(topk.W_dec, src.sae.decoder_weight())
        torch.testing.assert_close(topk.decode(torch.relu(pre)), src.sae(x).x_hat, atol=1e-4, rtol=1e-4)

    sweep = SweepSAESystem(lm, [
        {"name": "a", "sae": {"class_path": "TopKSAE", "init_args": {"d_sae": D_SAE, "k": 4, "seed": 1}}},
        {"name": "b", "sae": {"class_path": "TopKSAE", "init_args": {"d_sae": 32, "k": 4, "seed": 2}}},
    ], hook=HOOK)
    torch.save({"gsae": sweep.describe(), "state_dict": sweep.state_dict()}, tmp_path / "sweep.ckpt")
    with pytest.raises(ValueError, match=r"^--model.init_from: .*sweep.ckpt' is a sweep of 2 SAEs: name one as .*:MEMBER \(a, b\)$"):
        read_source(str(tmp_path / "sweep.ckpt"), "--model.init_from")
    g = GradTopKSAE(D_IN, d_sae=D_SAE, k=4, beta=10.0)
    warm_start(g, f"{tmp_path / 'sweep.ckpt'}:a", HOOK, "--model.init_from")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(g, name), getattr(sweep.members["a"].sae, name)), name


def test_bad_sources_fail_in_one_line(tmp_path):
    opt = "--model.init_from"
    saelens_sae("jumprelu").save_model(tmp_path / "jr")
    saelens_sae("standard", norm="expected_average_only_in").save_model(tmp_path / "scaled")
    (tmp_path / "empty").mkdir()
    cases = {
        str(tmp_path / "jr"): r"is a 'jumprelu' SAE: only standard and topk SAEs start a gsae SAE",
        str(tmp_path / "scaled"): r"normalize_activations='expected_average_only_in'",
        str(tmp_path / "empty"): r"is a folder without cfg.json and sae_weights.safetensors",
        str(tmp_path / "nothing.ckpt"): r"no file or folder",
    }
    for spec, why in cases.items():
        with pytest.raises(ValueError, match=why) as e:
            warm_start(TopKSAE(D_IN, d_sae=D_SAE, k=4), spec, HOOK, opt)
        assert str(e.value).startswith(opt) and "\n" not in str(e.value)
    saelens_sae("topk").save_model(tmp_path / "topk")
    with pytest.raises(ValueError, match=r"has d_in 64 and d_sae 96; this run's SAE has d_in 64 and d_sae 128$"):
        warm_start(TopKSAE(D_IN, d_sae=128, k=4), str(tmp_path / "topk"), HOOK, opt)
    with pytest.raises(ValueError, match=r"has d_in 64 and d_sae 96; this run's SAE has d_in 32 and d_sae 96$"):
        warm_start(TopKSAE(32, d_sae=D_SAE, k=4), str(tmp_path / "topk"), HOOK, opt)
    with pytest.warns(UserWarning, match=rf"was trained at {HOOK}; this run reads blocks.0.hook_resid_post$"):
        warm_start(TopKSAE(D_IN, d_sae=D_SAE, k=4), str(tmp_path / "topk"), "blocks.0.hook_resid_post", opt)
    with pytest.warns(UserWarning, match=r": its decoder rows have norms 0\.3\d*–[23](\.\d+)?; this run keeps them at 1"):
        warm_start(TopKSAE(D_IN, d_sae=D_SAE, k=4), str(tmp_path / "topk"), HOOK, opt)


def test_the_first_batch_keeps_the_sources_b_dec_and_sets_the_loss_scale(tmp_path):
    sl = saelens_sae("topk", unit_rows=True)
    sl.save_model(tmp_path / "topk")
    lm = LanguageModel("random-tiny", seed=0)
    system = LocalSAESystem(lm, lambda d: TopKSAE(d, d_sae=D_SAE, k=6), hook=HOOK, init_from=str(tmp_path / "topk"))
    system.warm_start(resuming=False)
    x = _x()
    system.maybe_initialize(x)
    assert torch.equal(system.sae.b_dec.detach(), sl.b_dec.detach())
    assert float(system.act_scale) == pytest.approx(float((x - x.mean(0)).pow(2).sum(-1).mean()), rel=1e-5)
    cold = LocalSAESystem(lm, lambda d: TopKSAE(d, d_sae=D_SAE, k=6), hook=HOOK)
    cold.maybe_initialize(x)  # the geometric median, as without init_from
    assert not torch.allclose(cold.sae.b_dec, sl.b_dec)


def _args(config: str, root: Path, steps: int = 4) -> list[str]:
    return ["--config", f"configs/quickstart/{config}.yaml", "--trainer.max_steps", str(steps),
            "--checkpoint.every_n_train_steps", str(steps), "--trainer.val_check_interval", str(steps),
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--evaluation.enabled", "false"]


@pytest.mark.slow
def test_train_py_fine_tunes_from_a_run_and_a_resume_does_not_read_the_source(tmp_path, capsys, caplog):
    """A g-SAE started from a TopK run's checkpoint (through train.py) has its source's weights on the first step's
    input side (its first training loss is the trained SAE's, far below a fresh SAE's); a bad ``init_from`` stops the
    run in one line with nothing written; a resume after the source is gone works and says it is not read."""
    from gsae.export import load_checkpoint

    assert main(_args("topk", tmp_path / "a", steps=30)) == 0
    src = tmp_path / "a" / "quickstart-topk" / "checkpoints" / "last.ckpt"
    capsys.readouterr()

    assert main([*_args("gsae", tmp_path / "bad"), "--model.init_from", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --model.init_from: ") and "not a SAELens SAE" in err[-1]
    assert not (tmp_path / "bad").exists()

    copy = tmp_path / "source.ckpt"
    shutil.copy(src, copy)
    args = [*_args("gsae", tmp_path / "b"), "--model.init_from", str(copy), "--trainer.log_every_n_steps", "1"]
    caplog.set_level("INFO")
    assert main([*args, "--model.optimizer.init_args.lr", "1e-12"]) == 0  # ~no update: the weights stay the source's
    assert f"--model.init_from: started from checkpoint {str(copy)!r} (TopKSAE, d_sae 1024)" in caplog.text
    started, _ = load_checkpoint(tmp_path / "b" / "quickstart-gsae" / "checkpoints" / "last.ckpt")
    trained, _ = load_checkpoint(copy)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(started, name), getattr(trained, name), atol=1e-6, rtol=0)

    copy.unlink()
    more = [a if a != "4" else "6" for a in args]
    caplog.clear()
    assert main([*more, "--ckpt_path", "last"]) == 0
    assert "--model.init_from: not read: resuming, the checkpoint holds the SAE's weights since" in caplog.text


def test_a_sweep_member_starts_from_its_own_source(tmp_path):
    sl = saelens_sae("topk", unit_rows=True)
    sl.save_model(tmp_path / "topk")
    lm = LanguageModel("random-tiny", seed=0)
    members = [
        {"name": "warm", "init_from": str(tmp_path / "topk"),
         "sae": {"class_path": "GradTopKSAE", "init_args": {"d_sae": D_SAE, "k": 6, "beta": 10.0}}},
        {"name": "cold", "sae": {"class_path": "TopKSAE", "init_args": {"d_sae": D_SAE, "k": 6}}},
    ]
    sweep = SweepSAESystem(lm, members, hook=HOOK)
    before = sweep.members["cold"].sae.W_enc.detach().clone()
    sweep.warm_start(resuming=False)
    assert torch.equal(sweep.members["warm"].sae.W_enc.detach(), sl.W_enc.detach())
    assert torch.equal(sweep.members["cold"].sae.W_enc.detach(), before)
    sweep._initialize_members({HOOK: _x()})
    assert torch.equal(sweep.members["warm"].sae.b_dec.detach(), sl.b_dec.detach())
    assert not torch.equal(sweep.members["cold"].sae.b_dec.detach(), sl.b_dec.detach())
    with pytest.raises(ValueError, match=r"^--model.members\[0\].init_from: .*has d_in 64 and d_sae 96; .*d_sae 32$"):
        SweepSAESystem(lm, [{**members[0], "sae": {"class_path": "TopKSAE", "init_args": {"d_sae": 32, "k": 6}}}],
                       hook=HOOK).warm_start(resuming=False)
