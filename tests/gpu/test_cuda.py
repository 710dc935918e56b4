"""On a CUDA device: the paths a GPU run takes, which CI (no GPU) cannot run.

Run on a GPU machine with ``python -m pytest -q tests/gpu``; without CUDA they are skipped, and
``GSAE_TEST_DEVICE=cpu`` runs them on the CPU (a check of the tests themselves: every comparison is then
CPU against CPU). References are independent of the device under test: TransformerLens on the same device,
torch's unfused Adam, and the same training run on the CPU.

Cross-device equality is the weaker property "equal to float32 rounding": CUDA and CPU kernels sum in other
orders, so parameters after a few Adam steps agree to ``ATOL`` / ``RTOL``, not bit for bit (Adam divides by
``√v``, so it amplifies a rounding difference in a near-zero gradient). TF32 is off in these tests.
"""

from __future__ import annotations

import math
import os

import lightning.pytorch as pl
import pytest
import torch

from gsae.export import load_checkpoint
from gsae.lm import LanguageModel
from gsae.optim import Adam
from gsae.systems import SweepSAESystem
from tests.systems.helpers import HOOK, StopAt, build_data, build_system, build_trainer
from tests.systems.test_objectives import RecordDtypes
from tests.test_lm_fused import TOL, pair, reference_grad, rel_err, residual_hooks, some_tokens
from tests.test_optim import _params, _run

DEVICE = os.environ.get("GSAE_TEST_DEVICE", "cuda")
ACCELERATOR = "gpu" if DEVICE == "cuda" else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(),
    reason="needs a CUDA device (GSAE_TEST_DEVICE=cpu runs these tests on the CPU)",
)
#: parameters after a few steps, trained on the device vs on the CPU
ATOL, RTOL = 1e-4, 1e-3


@pytest.fixture(autouse=True)
def exact_float32():
    """No TF32 in float32 matmuls (Lightning and users may switch it on; the comparisons need float32)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _assert_close(a: torch.nn.Module, b: torch.nn.Module, what: str, atol: float = ATOL, rtol: float = RTOL) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        x, y = sa[k].cpu(), sb[k].cpu()
        assert x.dtype == y.dtype, (what, k, x.dtype, y.dtype)
        assert torch.allclose(x, y, atol=atol, rtol=rtol), f"{what}: {k} differs by {(x - y).abs().max():.2e}"


# ---------------------------------------------------------------------------------------------- the LM
@pytest.mark.parametrize("flags", [(False, False, False), (True, True, True)], ids=["raw", "processed"])
@pytest.mark.parametrize("name", ["random-small", "gsae-tiny"])
def test_fused_forward_on_the_device_matches_transformer_lens(name, flags):
    """Every residual hook, the logits and ∇ₓL of the fused path on the device = TransformerLens on the device
    (1e-5, as on the CPU), and = the CPU's results."""
    fused, ref = pair(name, flags)
    tokens = some_tokens(fused, b=3, t=24)
    hooks = residual_hooks(fused)
    on_cpu = {h: fused.activations(tokens, h) for h in hooks}
    fused.model.to(DEVICE)  # fused and ref share one HookedTransformer
    tokens = tokens.to(DEVICE)
    for hook in hooks:
        a = fused.activations(tokens, hook)
        assert a.device.type == DEVICE and a.dtype == torch.float32
        assert rel_err(a, ref.activations(tokens, hook)) <= TOL, hook
        assert rel_err(a.cpu(), on_cpu[hook]) <= TOL, (hook, "vs the CPU")
    assert rel_err(fused.logits(tokens), ref.logits(tokens)) <= TOL
    for hook in ("blocks.0.hook_resid_pre", f"blocks.{fused.n_layers - 1}.hook_resid_mid"):
        out = fused.activations_and_grads(tokens, hook)
        assert out.grads.device.type == DEVICE
        assert rel_err(out.grads, reference_grad(ref, tokens, hook)) <= TOL, hook


@pytest.mark.parametrize("lm_dtype", ["float32", "bfloat16"])
def test_bf16_forward_on_gpt2_shape_is_float32_within_bf16_rounding(lm_dtype):
    """random-gpt2 (GPT-2 small's shape) under bf16 autocast, the LM in float32 or bfloat16 (the GPU run's settings,
    flash/efficient attention kernels): activations and ∇ₓL at blocks.6 agree with float32 to bf16's ~3 digits
    through 6 blocks (rel. 3e-2 of the largest entry), are finite, and ∇ₓL is float32 (what the SAE is given)."""
    hook = "blocks.6.hook_resid_pre"
    ref = LanguageModel("random-gpt2", seed=0).to(DEVICE)
    lm = LanguageModel("random-gpt2", seed=0, dtype=lm_dtype).to(DEVICE)
    tokens = some_tokens(ref, b=4, t=128).to(DEVICE)
    want = ref.activations_and_grads(tokens, hook)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        got = lm.activations_and_grads(tokens, hook)
    for a, b, what in ((got.acts, want.acts, "acts"), (got.grads, want.grads, "grads")):
        assert torch.isfinite(a).all(), what
        assert rel_err(a.float(), b) <= 3e-2, (what, rel_err(a.float(), b))
    assert got.grads.dtype == torch.float32 or lm_dtype == "bfloat16"
    assert float(got.loss) == pytest.approx(float(want.loss), rel=1e-2)


# ---------------------------------------------------------------------------------------------- the optimizer
def test_adam_on_the_device_equals_torch_unfused_adam():
    """gsae.optim.Adam (torch's fused CUDA kernel on flat views of transposed parameters) = torch's per-tensor loop."""
    params = [p.to(DEVICE) for p in _params()]
    ours = _run(Adam, params)
    want = _run(torch.optim.Adam, params, fused=False, foreach=False)
    for p, a, b in zip(params, ours, want):
        assert a.device.type == DEVICE and a.stride() == p.stride()
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()


# ---------------------------------------------------------------------------------------------- training
class TrainedOn(pl.Callback):
    """The device types of the trainable parameters during training steps (Lightning moves the module back to the
    CPU when ``fit`` ends)."""

    def __init__(self) -> None:
        self.types: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.types |= {p.device.type for p in pl_module.parameters() if p.requires_grad}


def _fit(objective: str, root, accelerator: str, steps: int = 4, callbacks=(), ckpt_path=None, checkpoint_every=None,
         precision: str = "32-true"):
    torch.manual_seed(0)
    system = build_system(objective, buffer_size=128 if objective != "e2e" else 0)
    root.mkdir(parents=True, exist_ok=True)
    on = TrainedOn()
    trainer = build_trainer(root, steps, callbacks=[*callbacks, on], checkpoint_every=checkpoint_every,
                            accelerator=accelerator, devices=1, precision=precision)
    trainer.fit(system, datamodule=build_data(system), ckpt_path=ckpt_path)
    system.trained_on = on.types
    return system


@pytest.mark.parametrize("objective", ["topk", "gsae", "e2e"])
def test_training_on_the_device_equals_training_on_the_cpu(tmp_path, objective):
    """4 float32 steps (shuffle buffer, AuxK, dead-latent counters) on the device end where they end on the CPU."""
    cpu = _fit(objective, tmp_path / "cpu", "cpu")
    dev = _fit(objective, tmp_path / "dev", ACCELERATOR)
    assert dev.trained_on == {DEVICE}
    _assert_close(dev.sae, cpu.sae, f"{objective} on {DEVICE} vs cpu")
    assert torch.equal(dev.dead.batches_since_fired.cpu(), cpu.dead.batches_since_fired)


@pytest.mark.parametrize("objective", ["topk", "gsae", "e2e"])
def test_bf16_mixed_on_the_device_keeps_float32_sae_and_finite_losses(tmp_path, objective):
    """``--trainer.precision bf16-mixed`` on the device: SAE parameters and gradients stay float32, the SAE is handed
    float32 activations (and ∇ₓL), its encoder runs in bf16, losses are finite, and it lands near the float32 run."""
    rec = RecordDtypes()
    torch.manual_seed(0)
    system = build_system(objective, buffer_size=128 if objective != "e2e" else 0)
    rec.wrap(system.sae)
    build_trainer(tmp_path, 4, callbacks=[rec], accelerator=ACCELERATOR, devices=1,
                  precision="bf16-mixed").fit(system, datamodule=build_data(system))
    assert rec.params == {torch.float32} and rec.grads == {torch.float32}
    grad = torch.float32 if objective == "gsae" else None
    assert set(rec.out) == {(torch.float32, grad, torch.bfloat16, torch.float32)}, set(rec.out)
    assert len(rec.losses) == 4 and all(math.isfinite(v) for v in rec.losses), rec.losses
    full = _fit(objective, tmp_path / "fp32", ACCELERATOR)
    _assert_close(system.sae, full.sae, f"{objective} bf16-mixed vs float32", atol=5e-2, rtol=0)


def test_sweep_bf16_mixed_on_the_device(tmp_path):
    """A TopK + g-SAE sweep trains on the device under bf16-mixed: every member's parameters float32 and finite."""
    members = [
        {"name": "topk-k4", "sae": {"class_path": "gsae.sae.TopKSAE", "init_args": {"d_sae": 64, "k": 4}}},
        {"name": "gsae-k4", "sae": {"class_path": "gsae.sae.GradTopKSAE", "init_args": {"d_sae": 64, "k": 4, "beta": 1e4}}},
    ]
    sweep = SweepSAESystem(LanguageModel("random-tiny", seed=0), members, hook=HOOK, buffer_size=128,
                           optimizer=lambda p: Adam(p, lr=1e-2))
    on = TrainedOn()
    build_trainer(tmp_path, 3, callbacks=[on], accelerator=ACCELERATOR, devices=1, precision="bf16-mixed").fit(
        sweep, datamodule=build_data(sweep))
    assert on.types == {DEVICE}
    for name, member in sweep.members.items():
        for k, p in member.sae.state_dict().items():
            assert p.dtype == torch.float32 and torch.isfinite(p).all(), (name, k)
    assert int(sweep.tokens_seen) > 0


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_stacked_sweep_on_the_device_equals_members_stepped_one_by_one(tmp_path, precision):
    """The device's default steps members of one shape as one stack (gsae.sae.stacked: its CUDA paths are the torch
    sort, the one-pass constraints and, under bf16-mixed, the dense products): the same SAEs as the members stepped
    one by one on the device, to float rounding (bf16: a near-tie may select another latent, so a loose bound)."""
    from tests.systems.test_sweep import STACKING

    runs = {}
    for stack in (None, False):  # None: the device's default, stacked
        torch.manual_seed(0)
        sweep = SweepSAESystem(LanguageModel("random-tiny", seed=0), STACKING, hook=HOOK, buffer_size=128,
                               optimizer=lambda p: Adam(p, lr=1e-2), dead_tokens=200, stack_members=stack)
        build_trainer(tmp_path / str(stack), 6, accelerator=ACCELERATOR, devices=1, precision=precision,
                      gradient_clip_val=0.5).fit(sweep, datamodule=build_data(sweep))
        runs[stack] = sweep
    from gsae.sae.stacked import StackPlan

    assert any(isinstance(u, StackPlan) for u in runs[None].member_stacks(0)) == (DEVICE == "cuda")
    tol = dict(atol=1e-4, rtol=0) if precision == "32-true" else dict(atol=5e-2, rtol=0)
    for name, m in runs[None].members.items():
        for k, p in m.sae.state_dict().items():
            q = runs[False].members[name].sae.state_dict()[k]
            assert p.dtype == torch.float32 and torch.isfinite(p).all(), (name, k)
            torch.testing.assert_close(p, q, **tol, msg=f"{name}.{k}")


# ---------------------------------------------------------------------------------------------- evaluation
#: the headline numbers of the default benchmarks compared across devices (the selections are discrete: a near-tie
#: between latents may fall the other way on another device, so counts get an absolute tolerance)
EVAL_SCALARS = {
    "loss_added": ("L_added", "kl_sae", "explained_variance", "nmse"),
    "sensitive_directions": ("kl_mean_over_lengths_isotropic", "kl_mean_over_lengths_cov_random_mixture",
                             "kl_mean_over_lengths_sae_error"),
    "decoder_geometry": ("nn_cos_median",),
}


@pytest.mark.parametrize("objective", ["topk", "gsae"])
def test_evaluation_on_the_device_equals_the_cpu(objective):
    """The checkpoint evaluation (every default benchmark, the configs' kinds of budgets) on the device: the same
    numbers as on the CPU to float32 rounding, and every benchmark runs (none recorded as failed)."""
    from types import SimpleNamespace

    from gsae.callbacks import EvaluationCallback
    from gsae.evals import failure
    from tests.systems.test_ddp_evaluation import OPTIONS

    torch.manual_seed(0)
    system = build_system(objective)
    if objective == "gsae":
        system.sae.grad_normaliser.fill_(60.0)  # as training sets it: ∇ₓL at a fixed scale on both devices
    results = {}
    for device in ("cpu", DEVICE):
        system.to(device)
        cb = EvaluationCallback(options=OPTIONS, log_figures=False)
        trainer = SimpleNamespace(is_global_zero=True, global_step=1, datamodule=build_data(system), loggers=[])
        results[device] = cb.evaluate(trainer, system)[""]
        assert not [b for b, r in results[device].items() if failure(r)], results[device]
    cpu, dev = results["cpu"], results[DEVICE]
    assert list(dev) == list(cpu)
    for bench, keys in EVAL_SCALARS.items():
        for key in keys:
            assert dev[bench][key] == pytest.approx(cpu[bench][key], rel=1e-3, abs=1e-6), (bench, key)
    assert dev["dead_latents"]["dead_fraction_batches"] == pytest.approx(cpu["dead_latents"]["dead_fraction_batches"],
                                                                         abs=0.05)
    assert abs(dev["latents"]["n_alive"] - cpu["latents"]["n_alive"]) <= 2


# ---------------------------------------------------------------------------------------------- checkpoints
def test_resume_on_the_device_equals_uninterrupted_and_checkpoints_load_anywhere(tmp_path):
    """g-SAE with a shuffle buffer: stopped at step 4 on the device and resumed there = 8 uninterrupted steps on the
    device; a checkpoint written on the CPU resumes on the device (buffer rows and gradients, its generator, the
    dead-latent counters, Adam's moments all restored across devices) and ends near the CPU's uninterrupted run;
    the device's checkpoint loads on the CPU without Lightning."""
    full = _fit("gsae", tmp_path / "full", ACCELERATOR, steps=8)
    assert full.trained_on == {DEVICE}
    _fit("gsae", tmp_path / "part", ACCELERATOR, steps=8, callbacks=[StopAt(4)], checkpoint_every=4)
    ckpt = tmp_path / "part" / "ckpts" / "last.ckpt"
    resumed = _fit("gsae", tmp_path / "part", ACCELERATOR, steps=8, ckpt_path=str(ckpt), checkpoint_every=4)
    _assert_close(resumed.sae, full.sae, "resumed on the device", atol=1e-5, rtol=1e-5)
    assert torch.equal(resumed.dead.tokens_since_fired.cpu(), full.dead.tokens_since_fired.cpu())

    sae, meta = load_checkpoint(tmp_path / "part" / "ckpts" / "last.ckpt", map_location="cpu")
    assert next(sae.parameters()).device.type == "cpu"
    _assert_close(sae, resumed.sae, "device checkpoint loaded on the CPU", atol=0, rtol=0)

    cpu_full = _fit("gsae", tmp_path / "cpu_full", "cpu", steps=8)
    _fit("gsae", tmp_path / "cpu_part", "cpu", steps=8, callbacks=[StopAt(4)], checkpoint_every=4)
    moved = _fit("gsae", tmp_path / "cpu_part", ACCELERATOR, steps=8,
                 ckpt_path=str(tmp_path / "cpu_part" / "ckpts" / "last.ckpt"))
    assert moved.trained_on == {DEVICE}
    _assert_close(moved.sae, cpu_full.sae, "CPU checkpoint resumed on the device")
    assert torch.equal(moved.dead.tokens_since_fired.cpu(), cpu_full.dead.tokens_since_fired)


# ---------------------------------------------------------------------------------------------- waits for the device
class SyncWarnings(pl.Callback):
    """Records the synchronising CUDA calls (``torch.cuda.set_sync_debug_mode("warn")``) of training steps
    ``first .. last - 1``, with where in Python each came from."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.found: list[str] = []
        self._catch = None

    def _stop(self) -> None:
        if self._catch is not None:
            torch.cuda.set_sync_debug_mode(0)
            self.found += [f"{w.filename}:{w.lineno}: {str(w.message)[:60]}" for w in self._log]
            self._catch.__exit__(None, None, None)
            self._catch = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import warnings

        if batch_idx == self.first:
            self._catch = warnings.catch_warnings(record=True)
            self._log = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        elif batch_idx == self.last:
            self._stop()

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop()


@pytest.mark.skipif(DEVICE != "cuda", reason="counts CUDA synchronisations")
@pytest.mark.parametrize("objective", ["topk", "gsae", "sweep"])
def test_a_steady_state_step_waits_for_the_device_once(tmp_path, objective):
    """Steps that do not log (2, 3, 4 of 6, ``log_every_n_steps`` 50) wait for the GPU once: the finiteness check of
    the loss before the backward. The kept positions come from the host, AuxK's dead count (latents die after 200
    tokens here, so AuxK runs) from the previous step, and the batch is pinned."""
    torch.manual_seed(0)
    if objective == "sweep":
        members = [
            {"name": "topk", "sae": {"class_path": "gsae.sae.TopKSAE", "init_args": {"d_sae": 64, "k": 4, "k_aux": 8}}},
            {"name": "gsae", "sae": {"class_path": "gsae.sae.GradTopKSAE",
                                     "init_args": {"d_sae": 64, "k": 4, "beta": 1e4, "k_aux": 8}}},
        ]
        system = SweepSAESystem(LanguageModel("random-tiny", seed=0), members, hook=HOOK, buffer_size=128,
                                optimizer=lambda p: Adam(p, lr=1e-2), dead_tokens=200)
    else:
        system = build_system(objective, buffer_size=128)
    spy = SyncWarnings(2, 5)
    build_trainer(tmp_path, 6, callbacks=[spy], accelerator="gpu", devices=1, precision="bf16-mixed",
                  log_every_n_steps=50).fit(system, datamodule=build_data(system))
    assert len(spy.found) <= 3, "\n".join(spy.found)


@pytest.mark.skipif(DEVICE != "cuda", reason="the count's copy to the host is the GPU path")
def test_the_dead_count_sent_to_the_host_is_the_count():
    from gsae.metrics import DeadLatentTracker

    tracker = DeadLatentTracker(100, n_batches=2, n_tokens=50).to(DEVICE)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        tracker.update((torch.rand(100, generator=gen) < 0.3).to(DEVICE), 20)
        mask = tracker.auxk_mask()
        assert tracker._pending is not None and mask.count_true() == int(tracker.dead_by_tokens().sum())
    other = DeadLatentTracker(100, n_batches=2, n_tokens=50).to(DEVICE)
    other.update(torch.ones(100, dtype=torch.bool, device=DEVICE), 20)
    assert other.auxk_mask().count_true() == 0
    other.load_state_dict(tracker.state_dict())  # restored counters: counted again, not the stale copy
    assert other.auxk_mask().count_true() == int(tracker.dead_by_tokens().sum()) > 0
    import copy

    twin = copy.deepcopy(tracker)  # (the CUDA event is not copied: the copy counts on its first read)
    assert twin._pending is None and twin.auxk_mask().count_true() == tracker.auxk_mask().count_true()


@pytest.mark.skipif(DEVICE != "cuda", reason="the dense products are the CUDA autocast path")
@pytest.mark.parametrize("k_aux", [0, 64])
def test_dense_gradients_under_autocast_equal_the_sparse_ones_to_bf16(monkeypatch, k_aux):
    """GPT-2-like shape, bf16 autocast: ``∂W_enc``, ``∂W_dec`` and the rest from the dense tensor-core products equal
    the sparse ``embedding_bag`` ones within bf16 rounding (2% of each gradient's largest entry)."""
    import gsae.sae.base as sae_base
    from gsae.sae import TopKSAE

    x = torch.randn(2048, 256, device=DEVICE)
    dead = torch.zeros(4096, dtype=torch.bool, device=DEVICE)
    dead[::7] = True
    grads = {}
    for dense in (False, True):
        monkeypatch.setattr(sae_base, "DENSE_GRADS_UNDER_AUTOCAST", dense)
        torch.manual_seed(0)
        sae = TopKSAE(256, 4096, 32, k_aux=k_aux).to(DEVICE)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = sae(x, dead_mask=dead if k_aux else None, aux_norm=1e-3)
            loss = (out.x_hat.float() - x).pow(2).sum() / x.shape[0] + out.aux_loss
        loss.backward()
        grads[dense] = {n: p.grad.float().clone() for n, p in sae.named_parameters()}
    for n, g in grads[False].items():
        assert g.abs().max() > 0, n
        err = (grads[True][n] - g).abs().max() / g.abs().max()
        assert err < 2e-2, (n, float(err))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("d", "k"), [(12288, 32), (12288, 3), (12288, 64), (3000, 7), (768, 200)])
def test_topk_indices_on_the_device_equal_torch_topk(d, k, dtype):
    """The two-level selection on the device (the SAE's bf16 scores under autocast too): ties, ±inf, NaN."""
    from tests.sae.test_topk import check_topk_indices

    check_topk_indices(d, k, DEVICE, dtype)


@pytest.mark.parametrize("stacked", [False, True])
def test_a_g_sae_under_float16_autocast_selects_as_float64_with_a_small_gradient(stacked):
    """``--trainer.precision 16-mixed`` (GPUs without bf16): |W_dec g| of a CE gradient meaned over many tokens is a
    float16 subnormal or 0 in the device's half matmul; the gradient rows rescaled by powers of two keep the
    selection (``gsae.sae.grad_topk.half_safe_grad``), alone and stacked."""
    from gsae.sae import GradTopKSAE
    from gsae.sae.stacked import StackPlan, stacked_forward

    torch.manual_seed(0)
    x, g = torch.randn(512, 64), torch.randn(512, 64) * 1e-8
    sae = GradTopKSAE(64, 1024, k=16, beta=1.0, k_aux=0)
    sae.b_enc.data.normal_(0, 0.1)
    a64 = (g.double() @ sae.W_dec.detach().double().T).abs()
    sae.beta = float(1 / a64.median())
    z64 = (x.double() - sae.b_dec.detach().double()) @ sae.W_enc.detach().double() + sae.b_enc.detach().double()
    ref = (z64 * (1 + sae.beta * a64)).topk(16, dim=-1).indices
    sae = sae.to(DEVICE)
    with torch.no_grad(), torch.autocast(torch.device(DEVICE).type, dtype=torch.float16):
        if stacked:
            plan = StackPlan([sae, GradTopKSAE(64, 1024, k=16, beta=sae.beta, k_aux=0, seed=1).to(DEVICE)])
            stacked_forward(plan, x.to(DEVICE), g.to(DEVICE))
            idx = plan.top[0][1]
        else:
            idx = sae(x.to(DEVICE), grad=g.to(DEVICE)).top_idx
    agree = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(idx.cpu(), ref)) / ref.numel()
    assert agree > 0.98, f"float16 on {DEVICE}: {agree:.1%} of float64's latents"
