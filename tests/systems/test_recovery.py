"""Planted ground truth: a TopK SAE trained through the real LightningModule recovers the dictionary
that generated its data.

Data: ``x = Σ_i s_i f_i`` with 96 random unit features ``f_i`` in ``d = 64`` (over-complete, so not an
orthogonal basis), each active with probability 3/96 and magnitude in [0.5, 1.5]. Only ``harvest`` is
replaced; selection, AuxK, the dead-latent counters, ``b_dec`` initialisation, the loss, the optimizer
and schedule, and the decoder constraints are the production code paths, driven by a ``lightning.Trainer``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor

from gsae.data import ActivationBatch, TokenDataModule
from gsae.optim import Adam
from gsae.sae import TopKSAE
from gsae.systems import LocalSAESystem

HOOK = "blocks.1.hook_resid_pre"
N_FEATURES, D, TOKENS_PER_STEP, STEPS = 96, 64, 512, 200


def _features() -> Tensor:
    # not seed 0: the SAE initialises its decoder from seed 0, whose first rows would *be* these features
    f = torch.randn(N_FEATURES, D, generator=torch.Generator().manual_seed(12345))
    return f / f.norm(dim=1, keepdim=True)


class PlantedSystem(LocalSAESystem):
    """LocalSAESystem whose activations come from the planted dictionary instead of the LM."""

    features = _features()

    def harvest(self, tokens: Tensor, keep: Tensor | None = None) -> ActivationBatch:
        gen = torch.Generator().manual_seed(10_000 + self.global_step)  # deterministic per step
        active = torch.rand(TOKENS_PER_STEP, N_FEATURES, generator=gen) < 3 / N_FEATURES
        s = active * (0.5 + torch.rand(TOKENS_PER_STEP, N_FEATURES, generator=gen))  # (N, n_features)
        return ActivationBatch((s @ self.features).to(self.device), None)  # (N, D)


def _max_cos(features: Tensor, w_dec: Tensor) -> Tensor:
    """For each true feature, the best cosine with any decoder row."""
    w = w_dec / w_dec.norm(dim=1, keepdim=True)
    return (features @ w.T).max(dim=1).values  # (n_features,)


@pytest.mark.slow
def test_topk_sae_recovers_planted_features(tiny_lm) -> None:
    assert tiny_lm.d_in(HOOK) == D
    system = PlantedSystem(
        lm=tiny_lm,
        sae=lambda d_in: TopKSAE(d_in, d_sae=128, k=4),
        hook=HOOK,
        optimizer=lambda params: Adam(params, lr=1e-2),  # the default optimizer, fused
        dead_tokens=20 * TOKENS_PER_STEP,
    )
    before = _max_cos(PlantedSystem.features, system.sae.W_dec.detach())
    data = TokenDataModule(lm=tiny_lm, dataset="synthetic", context_size=4, batch_size=1)  # tokens are ignored
    trainer = pl.Trainer(max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, accelerator="cpu", devices=1)
    trainer.fit(system, datamodule=data)

    assert trainer.global_step == STEPS and int(system.tokens_seen) == STEPS * TOKENS_PER_STEP
    after = _max_cos(PlantedSystem.features, system.sae.W_dec.detach())
    assert before.mean() < 0.5  # random decoder rows do not match the features by chance
    assert after.mean() >= 0.9, f"mean max cos {after.mean():.3f}"
    assert (after > 0.8).float().mean() >= 0.9  # nearly every feature has its own latent
    # the decoder constraint held through training
    torch.testing.assert_close(system.sae.W_dec.norm(dim=1), torch.ones(128), atol=1e-5, rtol=0)
