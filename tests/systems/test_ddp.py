"""DDP equivalence: 2 CPU ranks (gloo) × batch B/2 end where 1 rank × batch B ends, on the same tokens."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from gsae.data.batch import TokenBatch
from gsae.lm import LanguageModel
from gsae.systems import E2ESAESystem, LocalSAESystem
from tests.systems.helpers import (
    HOOK,
    RecordMetrics,
    RecordTokens,
    assert_same_metrics,
    build_data,
    build_system,
    build_trainer,
)

STEPS = 6


def _train(tmp_path, objective: str, devices: int, batch_size: int | None = None, steps: int = STEPS, system_kw=None, **kw):
    torch.manual_seed(0)
    system = build_system(objective, **(system_kw or {}))
    data = build_data(system, batch_size=batch_size or 4 // devices, val_batch_size=kw.pop("val_batch_size", None))
    folder = tmp_path / f"d{devices}"
    folder.mkdir()
    kw.update(dict(devices=devices, strategy="ddp_fork") if devices > 1 else dict(devices=1))
    trainer = build_trainer(folder, steps, callbacks=[RecordTokens(folder), *kw.pop("callbacks", [])], **kw)
    trainer.fit(system, datamodule=data)
    return system, folder


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["topk", "gsae", "e2e"])
def test_ddp_two_ranks_equal_single_process(tmp_path, objective):
    # the g-SAE gradient is a CE mean over a fixed count (per device by default: 1 × B and 2 × B/2 differ there),
    # so both runs are given the same count explicitly
    kw = dict(system_kw={"grad_mean_tokens": 4 * 15}) if objective == "gsae" else {}
    # every step logged, validation twice: the logged values are the global batch's, as one process logs them
    kw.update(log_every_n_steps=1, limit_val_batches=1.0, val_check_interval=3)
    single, f1 = _train(tmp_path, objective, 1, callbacks=[RecordMetrics(tmp_path / "d1")], **kw)
    ddp, f2 = _train(tmp_path, objective, 2, callbacks=[RecordMetrics(tmp_path / "d2")], **kw)

    # data: ranks disjoint, and together exactly the single-process tokens of every step
    r0, r1, one = torch.load(f2 / "rank0.pt"), torch.load(f2 / "rank1.pt"), torch.load(f1 / "rank0.pt")
    rows = lambda t: {tuple(r.tolist()) for r in t}  # noqa: E731
    assert not rows(r0) & rows(r1)
    assert rows(r0) | rows(r1) == rows(one)
    assert r0.shape[0] == r1.shape[0] == one.shape[0] // 2

    # parameters after training: rank 0's weights come back to the main process
    for name, p in single.sae.state_dict().items():
        q = ddp.sae.state_dict()[name]
        assert torch.allclose(p, q, atol=2e-5, rtol=1e-4), f"{objective}: {name} differs by {(p - q).abs().max():.2e}"
    # dead-latent counters are global: identical to the single-process ones
    assert torch.equal(single.dead.batches_since_fired, ddp.dead.batches_since_fired)
    assert torch.equal(single.dead.tokens_since_fired, ddp.dead.tokens_since_fired)
    assert int(single.tokens_seen) == int(ddp.tokens_seen)
    # what was logged: the loss and its parts (each rank holds its share × ranks: they were rank 0's, halved), the
    # reconstruction metrics, dead fractions, validation; e2e's KL is the mean of the ranks' means, as the gradient's
    one, two = torch.load(f1 / "metrics.pt"), torch.load(f2 / "metrics.pt")
    tags = set().union(*one.values())
    assert {"train/loss", "train/nmse", "val/nmse"} <= tags and len(one) == STEPS + 2, (sorted(tags), list(one))
    assert {"topk": "train/recon_loss", "gsae": "train/beta_attribution_median", "e2e": "train/kl"}[objective] in tags
    # beta_attribution_median too: each rank's rows (all of them here: fewer than 256 / 2) gathered, one median
    assert assert_same_metrics(one, two, rtol=1e-4, skip=("tokens_per_s",)) > 8 * (STEPS + 2)


class RecordGradScale(pl.Callback):
    """The g-SAE gradient normaliser when the first training batch starts (after the sanity validation)."""

    def __init__(self, folder) -> None:
        self.folder = folder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0 and trainer.global_rank == 0:
            (self.folder / "scale.txt").write_text(str(float(pl_module.sae.grad_normaliser)))


@pytest.mark.slow
def test_gsae_gradient_scale_is_per_device_not_world_size_nor_validation(tmp_path):
    """1 and 2 ranks at the same per-device batch (4 contexts of 16 tokens) use the same CE mean, B·(T−1) = 60,
    and the sanity validation (3-context batches) runs before training without setting it."""
    val = dict(val_batch_size=3, limit_val_batches=1, num_sanity_val_steps=1)
    for devices in (1, 2):
        folder = tmp_path / f"scale{devices}"
        folder.mkdir()
        system, _ = _train(tmp_path, "gsae", devices, batch_size=4, steps=1, callbacks=[RecordGradScale(folder)], **val)
        assert float((folder / "scale.txt").read_text()) == 4 * 15, f"{devices} ranks"
        assert float(system.sae.grad_normaliser) == 4 * 15, f"{devices} ranks"


@pytest.mark.slow
def test_ddp_batch_size_is_per_device_and_the_dead_window_counts_global_steps(tmp_path):
    """``data.batch_size`` contexts go to *each* rank; a dead-latent "batch" is one optimizer step's global batch:
    a latent that never fires is ``STEPS`` batches and every rank's (non-special) tokens of those steps old."""
    system = build_system("topk")
    with torch.no_grad():
        system.sae.b_enc[7] = -1e9  # latent 7 can never be among the top k
    data = build_data(system, batch_size=2)
    trainer = build_trainer(tmp_path, STEPS, callbacks=[RecordTokens(tmp_path)], devices=2, strategy="ddp_fork")
    trainer.fit(system, datamodule=data)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0.shape == r1.shape == (STEPS * 2, 16)  # per device: batch_size contexts per step
    special = torch.tensor(system.lm.special_token_ids)
    global_tokens = int((~torch.isin(torch.cat([r0, r1]), special)).sum())
    assert int(system.tokens_seen) == global_tokens
    assert int(system.dead.batches_since_fired[7]) == STEPS
    assert int(system.dead.tokens_since_fired[7]) == global_tokens
    assert bool(system.dead.dead_by_batches()[7])  # STEPS >= dead_batches (5)
    assert int(system.dead.batches_since_fired.min()) == 0  # the live latents fired in the last global batch


def test_gsae_gradient_scale_without_a_data_module_is_fixed_by_the_first_training_batch(tmp_path):
    """Plain dataloaders (no configuration to read B and T from): the sanity validation (3-context batches) uses
    its own count without keeping it; the first training batch (4 contexts) fixes B·(T−1) = 60."""
    system = build_system("gsae")
    data = build_data(system, batch_size=4, val_batch_size=3)
    scale = tmp_path / "scale.txt"
    record = RecordGradScale(tmp_path)
    trainer = build_trainer(tmp_path, 2, callbacks=[record], limit_val_batches=1, num_sanity_val_steps=1)
    trainer.fit(system, train_dataloaders=data.train_dataloader(), val_dataloaders=data.val_dataloader())
    assert float(scale.read_text()) == 0, "the sanity validation set the gradient scale"
    assert float(system.sae.grad_normaliser) == 4 * 15


def test_a_buffer_sized_for_one_device_is_named_when_several_fill_it_slowly(monkeypatch, caplog):
    """``--model.buffer_size`` is per device: a one-GPU config's 131072 on 8 devices fills from 2 x 256 tokens per rank
    and step, so ~1/7 of the gpt2 configs' 3456 steps train at half batch. The run says so once, naming the size that
    fills as fast as on one device; it says nothing for that size, for one device, or for a buffer that fills in 5%."""
    from types import SimpleNamespace

    system = build_system("topk")

    def said(world: int, capacity: int, batch: int = 2, context: int = 256, steps: int = 3456, accumulate: int = 1,
             ckpt_path: str | None = None) -> str:
        caplog.clear()
        system.buffer.capacity = capacity
        monkeypatch.setattr(type(system), "_world", lambda self: world)
        system._trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=batch, context_size=context),
                                          max_steps=steps, global_step=0, global_rank=0,
                                          accumulate_grad_batches=accumulate, ckpt_path=ckpt_path)
        with caplog.at_level("WARNING"):
            system.say_if_the_buffer_fills_slowly()
        return caplog.text

    try:
        text = said(8, 131072)
        assert "--model.buffer_size 131072 is per device" in text and "first ~512 of 3456 steps" in text
        assert "give --model.buffer_size 16384 (131072 / 8): the devices then hold 131072 tokens in all and fill in " \
            "~64 steps, as one device does" in text
        assert said(8, 16384) == ""  # 64 steps: as on one device
        assert said(1, 131072, batch=16) == ""  # one device: its buffer is the run's
        assert said(2, 4096, batch=16, context=64, steps=200) == ""  # 8 of 200 steps: 4%
        assert "first ~128 of 1000 steps" in said(8, 131072, steps=1000, accumulate=4)  # 512 batches: 4 to a step
        assert said(8, 131072, accumulate=4) == ""  # 128 of 3456 steps: 3.7%
        # the README's division already made (2 devices, 65536 each for one device's 131072): it fills in the one-device
        # run's 64 steps, which a short run takes a large share of whatever the size; dividing again would not help
        assert said(2, 65536, batch=8, steps=6) == ""
        # a resume (global_step still 0 in on_fit_start: Lightning restores it later) brings its buffers back: silent
        assert said(8, 131072, ckpt_path="last.ckpt") == ""
    finally:
        system._trainer = None


def test_a_multi_device_gsae_on_the_default_gradient_count_is_told_what_keeps_beta(monkeypatch, caplog):
    """By default ∇ₓL is the CE mean over each device's B·(T−1): a one-device config's batch divided between W
    devices makes every token's gradient W times larger, so β acts as W·β (audit F: β·attr 0.40 on 1 rank, 1.1 on 2).
    Rank 0 says which grad_mean_tokens keeps it; not with one device, a count given, or on a resume."""
    from types import SimpleNamespace

    system = build_system("gsae")
    said = lambda: [r.getMessage() for r in caplog.records if "grad_mean_tokens" in r.getMessage()]  # noqa: E731
    for world, rank, count, ckpt, expected in ((2, 0, None, None, 1), (1, 0, None, None, 0), (2, 1, None, None, 0),
                                               (2, 0, 60, None, 0), (2, 0, None, "last.ckpt", 0)):
        caplog.clear()
        monkeypatch.setattr(system, "_world", lambda w=world: w)
        monkeypatch.setattr(system, "grad_mean_tokens", count)
        system._trainer = SimpleNamespace(global_rank=rank, ckpt_path=ckpt)
        with caplog.at_level("WARNING", logger="gsae.systems.local"):
            system.say_if_beta_scales_with_the_devices(30.0)
        assert len(said()) == expected, (world, rank, count, ckpt, said())
        if expected:
            assert "β then acts as 2 times β: set --model.grad_mean_tokens 60" in said()[0], said()
    system._trainer = None


class PlantedBatches(pl.LightningDataModule):
    """Fixed contexts with special tokens planted mid-sequence, so that ranks keep different numbers of SAE rows: step
    ``s`` is rows ``4s..4s+3`` (one process) or, under 2 ranks, rows ``4s+r`` and ``4s+r+2`` on rank ``r``."""

    def __init__(self, tokens: torch.Tensor, val_tokens: torch.Tensor | None = None) -> None:
        super().__init__()
        self.tokens, self.val_tokens = tokens, val_tokens

    def _loader(self, tokens: torch.Tensor):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        steps = tokens.view(-1, 4, tokens.shape[-1])
        batches = [TokenBatch(step[rank::world].clone(), i, None) for i, step in enumerate(steps)]
        return torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)

    def train_dataloader(self):
        return self._loader(self.tokens)

    def val_dataloader(self):
        return self._loader(self.val_tokens) if self.val_tokens is not None else []


def _fit_planted(root, tokens: torch.Tensor, devices: int, objective: str, val_tokens: torch.Tensor | None = None):
    """A ReLU SAE (L1) under ``objective`` on :class:`PlantedBatches`, plain SGD: Adam's first steps are sign-like
    and would hide how a gradient weighs the rows."""
    from gsae.sae import ReLUSAE

    root.mkdir()
    lm = LanguageModel("random-tiny", seed=0)
    sgd = lambda p: torch.optim.SGD(p, lr=0.5)  # noqa: E731
    sae = lambda d: ReLUSAE(d, 64, l1_coef=3.0, seed=0)  # noqa: E731
    common = dict(hook=HOOK, optimizer=sgd, lr_schedule="constant", b_dec_init="zeros", dead_tokens=200)
    if objective == "e2e":
        system = E2ESAESystem(lm, sae, kl_coef=1.0, local_mse_coef=4.0, **common)
    elif objective == "sweep":  # a ReLU member beside a TopK one
        from gsae.systems import SweepSAESystem

        members = [{"name": "relu", "sae": {"class_path": "gsae.sae.ReLUSAE", "init_args": {"d_sae": 64, "l1_coef": 3.0}}},
                   {"name": "topk", "sae": {"class_path": "gsae.sae.TopKSAE", "init_args": {"d_sae": 64, "k": 4}}}]
        system = SweepSAESystem(lm, members, **common)
    else:
        system = LocalSAESystem(lm, sae, **common)
    kw = dict(devices=devices, strategy="ddp_fork", use_distributed_sampler=False) if devices > 1 else dict(devices=1)
    if val_tokens is not None:  # a validation after the last step, and what rank 0 logged
        kw.update(limit_val_batches=None, num_sanity_val_steps=0, callbacks=[RecordMetrics(root)])
    build_trainer(root, STEPS, **kw).fit(system, datamodule=PlantedBatches(tokens, val_tokens))
    return system


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["e2e", "local", "sweep"])
def test_row_means_weigh_each_ranks_rows_when_special_tokens_fall_mid_sequence(tmp_path, objective):
    # ReLU's L1 and e2e's local MSE are means over the SAE's rows; with BOS planted mid-sequence (special tokens are
    # left out of the SAE's rows) rank 0 and rank 1 keep different numbers of them, so a per-rank mean, which DDP
    # averages, is not the global batch's mean
    # The same holds for what is logged: the training step's sparsity terms and the validation's extras (recon_loss,
    # e2e's kl, sparsity_loss, local_mse), a mean over batches of unequal row counts, are 1 process's values on 2 ranks
    lm = LanguageModel("random-tiny", seed=0)
    gen = torch.Generator().manual_seed(1)  # a seed whose ranks differ at every step
    tokens = torch.randint(0, 200, ((STEPS + 2) * 4, 16), generator=gen)
    bos = lm.special_token_ids[0]
    tokens[:, 0] = bos
    tokens[torch.rand(tokens.shape, generator=gen) < 0.2] = bos
    kept = (tokens != bos).sum(-1).view(STEPS + 2, 2, 2)  # (step, row pair, rank): rank r holds rows 4s+r, 4s+r+2
    assert (kept[:, :, 0].sum(-1) != kept[:, :, 1].sum(-1)).all(), "the ranks should keep different row counts"
    assert kept[STEPS].sum() != kept[STEPS + 1].sum(), "the validation batches should differ in rows"
    tokens, val = tokens[: STEPS * 4], tokens[STEPS * 4 :]

    single = _fit_planted(tmp_path / "d1", tokens, 1, objective, val)
    ddp = _fit_planted(tmp_path / "d2", tokens, 2, objective, val)
    pairs = [(single.sae, ddp.sae)] if objective != "sweep" else [(single.members[n].sae, ddp.members[n].sae) for n in single.members]
    for one, two in pairs:
        for name, p in one.state_dict().items():
            q = two.state_dict()[name]
            assert torch.allclose(p, q, atol=1e-6, rtol=1e-5), f"{objective}: {name} differs by {(p - q).abs().max():.2e}"
    one, two = (torch.load(tmp_path / d / "metrics.pt") for d in ("d1", "d2"))
    vals = {k for (stage, _), m in one.items() if stage == "val" for k in m}
    assert {"val/recon_loss"} <= vals if objective == "local" else True
    assert {"val/kl", "val/sparsity_loss", "val/local_mse"} <= vals if objective == "e2e" else True
    assert assert_same_metrics(one, two, rtol=1e-5, skip=("tokens_per_s",)) > 10
