"""The training objectives' maths: e2e KL / downstream MSE, and what the frozen model never gets."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from gsae.data import TokenBatch
from gsae.lm import LanguageModel
from gsae.optim import Adam
from gsae.sae.base import SAEOutput, SparseAutoencoder
from gsae.systems import LocalSAESystem
from tests.systems.helpers import HOOK, build_data, build_system, build_trainer


class IdentitySAE(SparseAutoencoder):
    """x̂ = x exactly (its latents are x itself), for known-answer tests."""

    unit_norm_decoder = False

    def __init__(self, d_in: int) -> None:
        super().__init__(d_in, d_in)
        self.scale = torch.nn.Parameter(torch.ones(()))

    @property
    def architecture(self) -> str:
        return "identity"

    def config(self) -> dict:
        return {"d_in": self.d_in}

    def forward(self, x, grad=None, dead_mask=None, aux_norm=None) -> SAEOutput:
        z = x.new_zeros(())
        return SAEOutput(x * self.scale, None, None, x, x.detach(), z, z)


def _batch(system, seed=0):
    data = build_data(system)
    data.setup("fit")
    ctx = data.contexts("train", seed * 4)
    rows = [next(ctx) for _ in range(4)]
    return TokenBatch(torch.tensor(rows), 0)


def test_identity_sae_spliced_gives_zero_kl_and_zero_downstream_mse():
    system = build_system("e2e")
    system.sae = IdentitySAE(64)
    system.initialized.fill_(True)
    loss, _, _, extra = system.objective(_batch(system), "val")
    assert float(extra["kl"]) < 1e-10
    assert float(extra["ds_mse/blocks.1.hook_resid_post"]) < 1e-10
    assert float(loss) < 1e-10


def test_e2e_kl_equals_two_independent_forward_passes():
    system = build_system("e2e", exclude_special_tokens=False)
    system.initialized.fill_(True)
    batch = _batch(system, seed=1)
    _, out, _, extra = system.objective(batch, "val")
    model = system.lm.model

    # independent: full forwards through TransformerLens, one clean and one with the SAE output patched in
    def patch(act, hook):
        return system.sae(act.reshape(-1, act.shape[-1])).x_hat.reshape(act.shape)

    with torch.no_grad():
        clean = model(batch.tokens)
        patched = model.run_with_hooks(batch.tokens, fwd_hooks=[(HOOK, patch)])
    ref = F.kl_div(F.log_softmax(patched, -1).flatten(0, 1), F.log_softmax(clean, -1).flatten(0, 1), log_target=True, reduction="batchmean")
    torch.testing.assert_close(extra["kl"], ref, rtol=1e-5, atol=1e-7)


def test_e2e_kl_under_the_compile_option_takes_the_compiled_chunks_and_the_same_values(compile_calls):
    """``--model.lm.compile true``: the e2e KL runs each chunk through ``lm_chunked.compiled("kl")`` (replaced here
    by a counting wrapper; the real compilation is tested equal in tests/test_lm_chunked.py); loss and SAE gradients
    equal the eager path's."""
    system = build_system("e2e")
    system.initialized.fill_(True)
    batch = _batch(system, seed=2)
    got = []
    for compile in (False, True):
        system.lm.compile = compile
        system.sae.zero_grad()
        loss, *_ = system.objective(batch, "train")
        loss.backward()
        got.append((loss.detach(), system.sae.W_enc.grad.clone()))
    assert "kl_chunk" in compile_calls
    torch.testing.assert_close(got[1][0], got[0][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[1][1], got[0][1], rtol=1e-4, atol=1e-7)


def test_e2e_sae_gets_gradients_and_the_model_none():
    system = build_system("e2e")
    system.initialized.fill_(True)
    loss, *_ = system.objective(_batch(system), "train")
    loss.backward()
    assert system.sae.W_enc.grad is not None and system.sae.W_enc.grad.abs().sum() > 0
    assert system.sae.W_dec.grad.abs().sum() > 0
    assert all(p.grad is None for p in system.lm.model.parameters())


def test_training_leaves_the_language_model_untouched(tmp_path):
    for objective in ("gsae", "e2e"):
        system = build_system(objective)
        before = {k: v.clone() for k, v in system.lm.model.state_dict().items()}
        build_trainer(tmp_path, 3).fit(system, datamodule=build_data(system))
        after = system.lm.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), objective
        assert all(p.grad is None for p in system.lm.model.parameters()), objective
        assert not any(k.startswith("lm.") for k in system.state_dict())


def test_gsae_beta_attribution_is_logged_in_a_sensible_range(tmp_path):
    """``train/beta_attribution_median`` is the median of β·|W_dec g| over the selected latents of the batch's first
    256 tokens: against the dense product gathered at the selection and the lower middle of its sorted values."""
    system = build_system("gsae")
    system.initialized.fill_(True)
    _, out, acts, extra = system.objective(_batch(system), "train")
    logged = float(extra["beta_attribution_median"])
    assert 0 < logged < 1e3
    sae = system.sae
    dense = sae.beta * (acts.grad[:256].double() @ sae.W_dec.detach().double().T).abs()
    values = dense.gather(-1, out.top_idx[:256]).flatten().sort().values
    assert acts.grad.shape[0] > 8 and logged == pytest.approx(float(values[(len(values) - 1) // 2]), rel=1e-5)


def test_gsae_encodes_at_evaluation_exactly_as_in_training():
    """The gradient scale travels with the SAE (grad_normaliser), so the benchmarks select the latents training did."""
    from gsae.evals.common import sae_on_tokens

    system = build_system("gsae")
    system.initialized.fill_(True)
    batch = _batch(system)
    acts = system.harvest(batch.tokens)  # sets the normaliser from the training batch: B·(T−1)
    assert float(system.sae.grad_normaliser) == 4 * 15
    train_idx = system.sae(acts.x, grad=acts.grad).top_idx
    row0 = sae_on_tokens(system.sae, system.lm, HOOK, batch.tokens[:1]).out.top_idx  # a batch of one sequence
    mask = system.token_mask(batch.tokens[:1])[0]
    assert torch.equal(train_idx[: int(mask.sum())].sort(-1).values, row0[mask].sort(-1).values)


def test_e2e_objective_is_the_same_on_the_fused_and_the_transformer_lens_path():
    """KL, downstream MSE and the SAE's gradients from the fused forward and chunked KL = TransformerLens' full logits."""
    results = []
    for fused in (True, False):
        system = build_system("e2e", exclude_special_tokens=False)
        system.lm.fused = fused
        system.initialized.fill_(True)
        loss, _, _, extra = system.objective(_batch(system, seed=2), "train")
        loss.backward()
        results.append((extra, system.sae.W_enc.grad.clone(), system.sae.W_dec.grad.clone()))
    (ea, ga, da), (eb, gb, db) = results
    for key in ("kl", "ds_mse/blocks.1.hook_resid_post"):
        torch.testing.assert_close(ea[key], eb[key], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(da, db, rtol=1e-4, atol=1e-8)


class RecordDtypes(pl.Callback):
    """What bf16-mixed does to a training step: the SAE's parameter and gradient dtypes, the losses."""

    def __init__(self) -> None:
        self.out: list[torch.dtype] = []
        self.params: set[torch.dtype] = set()
        self.grads: set[torch.dtype] = set()
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.params |= {p.dtype for p in pl_module.sae.parameters()}
        self.losses.append(float(outputs["loss"]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads |= {p.grad.dtype for p in pl_module.sae.parameters() if p.grad is not None}

    def wrap(self, sae) -> None:
        """Record the dtypes of every ``sae`` forward: input, ∇ₓL (or None), pre-activations, reconstruction."""
        sae_forward = sae.forward

        def forward(*a, **k):
            out = sae_forward(*a, **k)
            grad = k.get("grad")
            self.out.append((a[0].dtype, None if grad is None else grad.dtype, out.pre_acts.dtype, out.x_hat.dtype))
            return out

        sae.forward = forward


@pytest.mark.parametrize("lm_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("objective", ["topk", "gsae", "e2e"])
def test_bf16_mixed_training_keeps_fp32_sae_parameters_and_runs(tmp_path, objective, lm_dtype):
    """CPU autocast bf16 (``--trainer.precision bf16-mixed``), with the LM in float32 or bfloat16 (``--model.lm.dtype``)."""
    system = build_system(objective)
    system.lm = LanguageModel("random-tiny", seed=0, dtype=lm_dtype)
    rec = RecordDtypes()
    rec.wrap(system.sae)
    build_trainer(tmp_path, 3, callbacks=[rec], precision="bf16-mixed").fit(system, datamodule=build_data(system))
    assert rec.params == {torch.float32}, "SAE parameters must stay float32 under autocast"
    assert rec.grads == {torch.float32}
    # the harvest hands the SAE float32 activations (and gradients); the encoder matmul runs in bf16; the
    # decoder sums k float32 rows (embedding_bag), so the reconstruction and the losses are float32
    grad = torch.float32 if objective == "gsae" else None
    assert set(rec.out) == {(torch.float32, grad, torch.bfloat16, torch.float32)}, set(rec.out)
    assert len(rec.losses) == 3 and all(math.isfinite(v) for v in rec.losses)
    assert system.lm.model.W_E.dtype == getattr(torch, lm_dtype)


@pytest.mark.parametrize("kind", ["topk-auxk", "relu"])
def test_local_loss_is_the_normalised_squared_error_plus_the_saes_own_terms(kind):
    """LocalSAESystem's loss = Σ‖x − x̂‖² · W/(N·scale) + AuxK + (ReLU) the L1 penalty, against a naive sum of the
    output's terms; a ReLU SAE's L1 was left out before, so it trained dense."""
    from gsae.sae import ReLUSAE, TopKSAE
    from gsae.systems import LocalSAESystem

    torch.manual_seed(0)
    lm = LanguageModel("random-tiny", seed=0)
    make = (lambda d: TopKSAE(d, 64, 2, k_aux=8)) if kind == "topk-auxk" else (lambda d: ReLUSAE(d, 64, l1_coef=3.0))
    system = LocalSAESystem(lm, make, hook=HOOK, dead_tokens=1)
    batch = _batch(system)
    system.objective(batch, "train")  # initialises b_dec and the scale; every latent unfired so far is dead after
    system.dead.update(torch.zeros(64, dtype=torch.bool), 10)  # all dead: AuxK has a loss to add
    loss, out, acts, extra = system.objective(_batch(system, seed=1), "train")
    norm = system.aux_norm(torch.tensor(float(acts.x.shape[0])))
    naive = ((acts.x - out.x_hat.float()) ** 2).sum() * norm + out.aux_loss + out.sparsity_loss
    assert (out.aux_loss > 0) if kind == "topk-auxk" else (out.sparsity_loss > 0)
    torch.testing.assert_close(loss, naive, rtol=1e-5, atol=0)
    torch.testing.assert_close(extra["recon_loss"], ((acts.x - out.x_hat) ** 2).sum() * norm, rtol=1e-5, atol=0)


@pytest.mark.parametrize("objective", ["topk", "sweep"])
def test_dead_batch_window_counts_optimizer_steps_under_gradient_accumulation(tmp_path, monkeypatch, objective):
    """With ``accumulate_grad_batches`` 2 a "batch" of the dead window is an optimizer step (both micro-batches): a
    latent is counted once per step, and as fired if it fired in either micro-batch; the token window advances by
    every micro-batch. Checked against counters rebuilt from the recorded fired masks, pairing micro-batches."""
    from gsae.metrics import DeadLatentTracker
    from tests.systems.test_sweep import _sweep

    seen: dict[int, list[tuple[torch.Tensor, int]]] = {}
    real, real_many = DeadLatentTracker.update, DeadLatentTracker.update_many

    def spy(self, fired, n_tokens, *args, **kwargs):
        seen.setdefault(id(self), []).append((fired.clone(), int(n_tokens)))
        return real(self, fired, n_tokens, *args, **kwargs)

    def spy_many(trackers, idle, n_tokens, *args, **kwargs):  # a sweep advances all its members' counters at once
        for tracker, mask in zip(trackers, idle):
            seen.setdefault(id(tracker), []).append((mask == 0, int(n_tokens)))
        return real_many(trackers, idle, n_tokens, *args, **kwargs)

    monkeypatch.setattr(DeadLatentTracker, "update", spy)
    monkeypatch.setattr(DeadLatentTracker, "update_many", staticmethod(spy_many))
    torch.manual_seed(0)
    system = _sweep() if objective == "sweep" else build_system("topk")
    steps, accumulate = 5, 2
    trainer = build_trainer(tmp_path, steps, accumulate_grad_batches=accumulate)
    trainer.fit(system, datamodule=build_data(system, batch_size=2))
    trackers = [m.dead for m in system.members.values()] if objective == "sweep" else [system.dead]
    for tracker in trackers:
        calls = seen[id(tracker)]
        assert len(calls) == steps * accumulate
        batches = torch.zeros(tracker.batches_since_fired.shape, dtype=torch.long)
        tokens = torch.zeros_like(batches)
        for i in range(0, len(calls), accumulate):  # one optimizer step
            step = calls[i : i + accumulate]
            batches = torch.where(torch.stack([f for f, _ in step]).any(0), 0, batches + 1)
            for fired, n in step:
                tokens = torch.where(fired, 0, tokens + n)
        assert torch.equal(tracker.batches_since_fired, batches)
        assert torch.equal(tracker.tokens_since_fired, tokens)
        assert int(batches.max()) <= steps and bool((batches > 0).any())  # some latent missed a step: not vacuous


@pytest.mark.parametrize("cls", ["TopKSAE", "GradTopKSAE"])
def test_unit_norm_decoder_is_an_option(tmp_path, cls):
    """SPEC §1.2 [AMBIG]: smol-sae (the g-SAE authors' code) trains an unconstrained decoder; gsae keeps its rows at unit
    norm by default (Gao et al.). ``unit_norm_decoder: false`` leaves them free (and is kept through a checkpoint's
    config); the default keeps every row at norm 1 after every step."""
    import gsae.sae as saes
    from gsae.export import build_sae
    from gsae.sae.stacked import stack_key

    norms = {}
    for unit in (True, False):
        lm = LanguageModel("random-tiny", seed=0)
        system = LocalSAESystem(lm, lambda d, u=unit: getattr(saes, cls)(d, 64, 4, k_aux=8, unit_norm_decoder=u),
                                hook=HOOK, optimizer=lambda p: Adam(p, lr=1e-2), lr_warmup_steps=0, dead_tokens=200)
        build_trainer(tmp_path / str(unit), 6).fit(system, datamodule=build_data(system))
        norms[unit] = system.sae.W_dec.detach().norm(dim=1)
        rebuilt = build_sae({"sae_class": f"gsae.sae.{cls}", "sae_config": system.sae.config()})
        assert rebuilt.unit_norm_decoder is unit and system.sae.unit_norm_decoder is unit
    torch.testing.assert_close(norms[True], torch.ones(64), atol=1e-5, rtol=0)
    assert (norms[False] - 1).abs().max() > 1e-3  # an unconstrained decoder drifts at lr 1e-2
    # a sweep stacks only members that agree on it (the stack renormalises all its rows or none)
    a, b = (getattr(saes, cls)(16, 64, 4, unit_norm_decoder=u) for u in (True, False))
    assert stack_key(a) != stack_key(b)


def test_dead_activity_test_sum_positive_counts_as_smol_sae(tmp_path):
    """``dead_activity_test: sum_positive``: a latent fired in a batch iff its activations summed over the batch are
    positive (smol-sae: ``inactive[x_hid.sum(0) > 0] = 0``). Reference: that test in a loop over the SAE outputs
    recorded in training. Without ReLU after
    TopK a latent can fire with a negative sum (planted: latent 0), so the two tests give other counters on the same
    training."""
    from gsae.sae import TopKSAE

    def planted(d: int) -> TopKSAE:  # every latent kept (k = d_sae); latent 0's values always negative
        sae = TopKSAE(d, 64, 64, k_aux=0)
        with torch.no_grad():
            sae.b_enc[0] = -100.0
        return sae

    counters = {}
    for test in ("nonzero", "sum_positive"):
        lm = LanguageModel("random-tiny", seed=0)
        system = LocalSAESystem(lm, planted, hook=HOOK, optimizer=lambda p: Adam(p, lr=1e-2), dead_tokens=200,
                                dead_activity_test=test)
        seen = []
        forward = system.sae.forward

        def record(*args, forward=forward, seen=seen, sae=system.sae, **kwargs):
            out = forward(*args, **kwargs)
            seen.append(sae.densify(out).detach().clone())
            return out

        system.sae.forward = record
        build_trainer(tmp_path / test, 8).fit(system, datamodule=build_data(system))
        assert len(seen) == 8
        since = torch.zeros(64, dtype=torch.long)  # batches since the last that fired (never: batches seen)
        for z in seen:
            fired = z.sum(0) > 0 if test == "sum_positive" else (z != 0).any(0)
            since = torch.where(fired, 0, since + 1)
        assert torch.equal(system.dead.batches_since_fired, since), test
        counters[test] = system.dead.batches_since_fired.clone()
    assert counters["nonzero"][0] == 0 and counters["sum_positive"][0] == 8  # fired every batch / dead since the first
    with pytest.raises(ValueError, match="--model.dead_activity_test must be nonzero or sum_positive"):
        LocalSAESystem(LanguageModel("random-tiny", seed=0), lambda d: TopKSAE(d, 64, 4), hook=HOOK,
                       dead_activity_test="any")


def test_e2e_loss_is_each_term_times_its_coefficient():
    """E2E's loss = kl_coef·KL + Σ_h c_h·MSE_h + local_mse_coef·MSE_local (+ AuxK): every test trained with kl_coef 1,
    so a dropped coefficient went unseen (audit M). The terms come back as ``extra``; the sum is checked naively."""
    from gsae.sae import TopKSAE
    from gsae.systems import E2ESAESystem

    torch.manual_seed(0)
    lm = LanguageModel("random-tiny", seed=0)
    hooks = ["blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]
    system = E2ESAESystem(lm, lambda d: TopKSAE(d, 64, 4, k_aux=0), hook=HOOK, kl_coef=0.3, downstream_hooks=hooks,
                          downstream_coefs=[2.0, 5.0], local_mse_coef=0.7)
    loss, out, acts, extra = system.objective(_batch(system), "val")
    assert all(float(extra[k]) > 0 for k in ("kl", "local_mse", *(f"ds_mse/{h}" for h in hooks)))
    naive = 0.3 * extra["kl"] + 2.0 * extra[f"ds_mse/{hooks[0]}"] + 5.0 * extra[f"ds_mse/{hooks[1]}"] + 0.7 * extra["local_mse"]
    torch.testing.assert_close(loss.detach(), naive, rtol=1e-6, atol=0)
    torch.testing.assert_close(extra["local_mse"], F.mse_loss(out.x_hat, acts.x), rtol=1e-6, atol=0)


def test_lr_factor_warms_up_linearly_then_follows_the_cosine_to_its_floor():
    """The schedule against its formula: (step + 1)/warm while warming, then floor + (1 − floor)·(1 + cos πt)/2 with t
    the fraction of the steps after the warm-up; constant stays 1 after the warm-up, and no length means constant."""
    from gsae.systems.base import lr_factor

    f = lr_factor(100, 10, "cosine", 0.1)
    assert [f(0), f(4), f(9)] == pytest.approx([0.1, 0.5, 1.0])
    assert [f(10), f(55), f(100), f(150)] == pytest.approx([1.0, 0.55, 0.1, 0.1])
    assert f(10 + 22.5) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    g = lr_factor(100, 0, "cosine", 0.0)
    assert [g(0), g(50), g(100)] == pytest.approx([1.0, 0.5, 0.0])
    c = lr_factor(100, 4, "constant", 0.1)
    assert [c(0), c(3), c(4), c(99)] == pytest.approx([0.25, 1.0, 1.0, 1.0])
    assert lr_factor(math.inf, 0, "cosine", 0.1)(10**6) == 1.0


def test_e2e_downstream_coef_is_split_evenly_over_the_hooks():
    from gsae.sae import TopKSAE
    from gsae.systems import E2ESAESystem

    torch.manual_seed(0)
    lm = LanguageModel("random-tiny", seed=0)
    hooks = ["blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]
    system = E2ESAESystem(lm, lambda d: TopKSAE(d, 64, 4, k_aux=0), hook=HOOK, downstream_hooks=hooks,
                          downstream_coef=3.0)
    assert system.downstream_coefs == [1.5, 1.5]
    loss, _, _, extra = system.objective(_batch(system), "val")
    naive = extra["kl"] + 1.5 * extra[f"ds_mse/{hooks[0]}"] + 1.5 * extra[f"ds_mse/{hooks[1]}"]
    torch.testing.assert_close(loss.detach(), naive, rtol=1e-6, atol=0)


def _e2e_reference_loss(system, tokens, kl_coef, downstream, local_coef):
    """The e2e loss rebuilt with TransformerLens hooks on full forwards: SAE(x) spliced in at the non-special
    positions (the BOS keep their clean activation), KL(P_clean ‖ P_sae) averaged over every position, the element
    MSE of each downstream hook against the clean run's, and the local element MSE over the SAE's rows."""
    from gsae.lm import BYTE_BOS

    model = system.lm.model
    keep = tokens != BYTE_BOS
    rows = {}

    def patch(act, hook):
        out = system.sae(act[keep].float())
        rows["x"], rows["x_hat"] = act[keep].float(), out.x_hat
        new = act.float().clone()
        new[keep] = out.x_hat
        return new

    def record(into):
        return lambda act, hook: into.__setitem__(hook.name, act)

    clean_cache, patched_cache = {}, {}
    with torch.no_grad():
        clean = model.run_with_hooks(tokens, fwd_hooks=[(h, record(clean_cache)) for h in downstream])
    logits = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, patch), *((h, record(patched_cache)) for h in downstream)])
    kl = F.kl_div(F.log_softmax(logits, -1).flatten(0, 1), F.log_softmax(clean, -1).flatten(0, 1), log_target=True,
                  reduction="batchmean")
    ds = sum(c * ((patched_cache[h] - clean_cache[h]) ** 2).mean() for h, c in downstream.items())
    return kl_coef * kl + ds + local_coef * ((rows["x_hat"] - rows["x"]) ** 2).mean()


@pytest.mark.parametrize(
    "terms",
    [
        dict(kl_coef=1.0),
        dict(kl_coef=0.0, downstream={"blocks.1.hook_resid_mid": 2.0, "blocks.1.hook_resid_post": 5.0}),
        dict(kl_coef=0.0, local_mse_coef=0.7),
        dict(kl_coef=0.3, downstream={"blocks.1.hook_resid_mid": 2.0, "blocks.1.hook_resid_post": 5.0}, local_mse_coef=0.7),
    ],
    ids=["kl", "downstream", "local", "all"],
)
def test_e2e_loss_and_sae_gradients_equal_a_transformer_lens_reference_per_term(terms):
    """Each term's value AND gradient into the SAE, against autograd through full TransformerLens forwards with a
    patch hook (BOS first and one mid-sequence BOS left clean): a ``.detach()`` on the KL's, a downstream hook's or
    the local term's input kept the loss's value and silently dropped that term from training (audit Y); a special
    position patched changes the value."""
    from gsae.sae import TopKSAE
    from gsae.systems import E2ESAESystem

    torch.manual_seed(0)
    downstream = terms.get("downstream", {})
    system = E2ESAESystem(LanguageModel("random-tiny", seed=0), lambda d: TopKSAE(d, 64, 4, k_aux=0), hook=HOOK,
                          kl_coef=terms["kl_coef"], downstream_hooks=list(downstream) or None,
                          downstream_coefs=list(downstream.values()) or None,
                          local_mse_coef=terms.get("local_mse_coef", 0.0))
    system.initialized.fill_(True)
    batch = _batch(system, seed=3)
    batch.tokens[1, 7] = batch.tokens[0, 0]  # a BOS mid-sequence too
    grads = []
    for make in (lambda: system.objective(batch, "val")[0],
                 lambda: _e2e_reference_loss(system, batch.tokens, terms["kl_coef"], downstream,
                                             terms.get("local_mse_coef", 0.0))):
        system.sae.zero_grad()
        loss = make()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in system.sae.named_parameters() if p.grad is not None}))
    (loss, got), (ref_loss, ref) = grads
    assert float(ref_loss) > 0 and ref["W_enc"].abs().sum() > 0 and ref["W_dec"].abs().sum() > 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-8)
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-7, msg=name)


def test_gsae_harvest_divides_the_summed_ce_gradient_by_the_configured_count_and_refuses_a_zero_count():
    """Outside a fit (no data module), ``grad_mean_tokens`` is what the first harvest divides the CE sum's ∇ₓL by
    and writes into the g-SAE (not the batch's own ``B·(T−1)`` = 60); ``grad_reduction: sum`` keeps the sum
    (normaliser 1). Reference: the sum-reduction harvest of the same tokens, divided by 500."""
    from gsae.sae import GradTopKSAE

    def harvest(**kw):
        torch.manual_seed(0)
        system = LocalSAESystem(LanguageModel("random-tiny", seed=0), lambda d: GradTopKSAE(d, 64, 4, beta=1e4),
                                hook=HOOK, **kw)
        acts = system.harvest(_batch(system).tokens)
        return float(system.sae.grad_normaliser), acts

    n_mean, mean = harvest(grad_mean_tokens=500)
    n_sum, total = harvest(grad_reduction="sum")
    assert (n_mean, n_sum) == (500.0, 1.0)
    assert total.grad.abs().max() > 0
    torch.testing.assert_close(mean.x, total.x)
    torch.testing.assert_close(mean.grad, total.grad / 500, rtol=1e-5, atol=1e-9)
    for bad in (dict(grad_mean_tokens=0), dict(grad_mean_tokens=60, grad_reduction="sum")):  # 0: a division by zero
        with pytest.raises(ValueError, match="--model.grad_mean_tokens must be > 0 and needs --model.grad_reduction mean"):
            LocalSAESystem(LanguageModel("random-tiny", seed=0), lambda d: GradTopKSAE(d, 64, 4, beta=1e4), hook=HOOK,
                           **bad)


@pytest.mark.parametrize("objective", ["topk", "e2e"])
def test_the_first_training_batch_not_a_validation_batch_initialises_b_dec_and_the_loss_scale(objective):
    """A validation batch (the sanity check runs before training) leaves the SAE's ``b_dec`` and the loss scale alone;
    the first training batch sets the scale to E‖x − x̄‖² of its rows (by hand) and moves ``b_dec`` off its init."""
    system = build_system(objective)
    batch = _batch(system)
    b_dec, scale = system.sae.b_dec.detach().clone(), float(system.act_scale)
    system.objective(batch, "val")
    assert not bool(system.initialized) and float(system.act_scale) == scale
    assert torch.equal(system.sae.b_dec.detach(), b_dec)
    _, _, acts, _ = system.objective(batch, "train")
    x = acts.x.double()
    assert bool(system.initialized) and acts.x.shape[0] == 4 * 15  # the BOS rows left out
    assert float(system.act_scale) == pytest.approx(float((x - x.mean(0)).pow(2).sum(-1).mean()), rel=1e-5)
    assert not torch.equal(system.sae.b_dec.detach(), b_dec)


def test_validation_batches_bypass_the_shuffle_buffer():
    """The shuffle buffer mixes training rows only: a validation batch is evaluated on its own rows (the LM's
    activations at its non-BOS positions, by hand) and leaves the buffer empty, so no held-out row is trained on."""
    system = build_system("topk", buffer_size=128)
    system.initialized.fill_(True)
    batch = _batch(system)
    _, _, acts, _ = system.objective(batch, "val")
    ref = system.lm.activations(batch.tokens, HOOK)[batch.tokens != batch.tokens[0, 0]]
    torch.testing.assert_close(acts.x, ref.float())
    assert system.buffer.fill == 0
    system.objective(batch, "train")
    assert system.buffer.fill > 0  # a training batch does go through it


def test_the_shuffle_buffer_mixes_with_the_runs_seed_and_each_rank_its_own_stream(monkeypatch):
    """``--model.seed`` seeds the shuffle buffer's mixing when a fit starts (``setup``): the same seed and rank mix the
    same training rows alike, another seed or another rank differently."""
    from gsae.data.batch import ActivationBatch

    def mixed(seed: int, rank: int = 0) -> torch.Tensor:
        monkeypatch.setattr(LocalSAESystem, "global_rank", property(lambda self: rank))
        system = build_system("topk", buffer_size=8, seed=seed)
        system.setup("fit")
        rows = torch.arange(12 * 3, dtype=torch.float32).reshape(12, 3)
        return system.buffer.mix(ActivationBatch(rows, None)).x

    base = mixed(7)
    assert torch.equal(base, mixed(7))
    assert not torch.equal(base, mixed(8))
    assert not torch.equal(base, mixed(7, rank=1))
    assert not torch.equal(mixed(0), base)


def test_validation_recon_loss_is_the_token_weighted_mean_over_its_batches_and_starts_afresh():
    """``val/recon_loss`` over batches that keep different numbers of rows (BOS planted mid-sequence) is
    ``Σ‖x − x̂‖² / (Σ N · scale)`` over all of them, by hand from the LM's activations, not a mean of the batches'
    means; the next validation sums its own batches only."""
    system = build_system("topk")
    system.initialized.fill_(True)
    system.act_scale.fill_(3.0)
    bos = system.lm.special_token_ids[0]
    a, b = _batch(system), _batch(system, seed=1)
    b.tokens[:, 3:9] = bos  # b keeps far fewer rows than a
    sse, rows = [], []
    with torch.no_grad():
        for batch in (a, b):
            x = system.lm.activations(batch.tokens, HOOK)[batch.tokens != bos].float()
            sse.append(float(((x - system.sae(x).x_hat) ** 2).sum()))
            rows.append(x.shape[0])
    assert rows[0] > rows[1] + 20
    system.on_validation_epoch_start()
    for batch in (a, b):
        system.validation_step(batch, 0)
    got = float(system.reduced_val_extras()["recon_loss"])
    assert got == pytest.approx(sum(sse) / sum(rows) / 3.0, rel=1e-5)
    system.on_validation_epoch_start()  # the next validation: b alone
    system.validation_step(b, 0)
    assert float(system.reduced_val_extras()["recon_loss"]) == pytest.approx(sse[1] / rows[1] / 3.0, rel=1e-5)


def test_the_decoder_gradient_is_made_tangent_to_its_unit_rows_after_backward():
    """With ``unit_norm_decoder`` (default), the system's backward hook removes each decoder row's gradient component
    along the row (Gao et al. App. A.4): ``g − (g·w) w`` by hand for unit rows, so the step moves along the sphere;
    ``unit_norm_decoder: false`` leaves the gradient as autograd gave it."""
    from gsae.sae import TopKSAE

    for unit in (True, False):
        torch.manual_seed(0)
        system = LocalSAESystem(LanguageModel("random-tiny", seed=0), lambda d, u=unit: TopKSAE(d, 64, 4, unit_norm_decoder=u),
                                hook=HOOK)
        system.initialized.fill_(True)
        system.objective(_batch(system), "train")[0].backward()
        w, raw = system.sae.W_dec.detach().clone(), system.sae.W_dec.grad.clone()
        assert raw.abs().max() > 0
        system.on_after_backward()
        want = raw - (raw * w).sum(-1, keepdim=True) * w if unit else raw
        torch.testing.assert_close(system.sae.W_dec.grad, want, atol=1e-7, rtol=1e-5)
        if unit:
            torch.testing.assert_close(w.norm(dim=1), torch.ones(64), atol=1e-5, rtol=0)
            assert (raw * w).sum(-1).abs().max() > 1e-3 * raw.abs().max()  # there was a parallel part to remove
