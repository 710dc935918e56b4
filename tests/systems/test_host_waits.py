"""What a training step asks the device for: the kept positions come from the host (``TokenBatch.keep``), logged
metrics reach the host in one copy, AuxK's dead count comes from the previous step. Each must give exactly what the
device-side computation gives; ``tests/gpu/test_cuda.py`` counts the waits on a GPU."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from gsae.data.batch import TokenBatch
from gsae.lm import LanguageModel
from gsae.metrics import DeadLatentTracker, host_floats
from gsae.sae import TopKSAE
from gsae.systems import LocalSAESystem, SweepSAESystem
from gsae.systems.base import SAESystem
from tests.systems.helpers import HOOK, build_data, build_system, build_trainer


def _tokens_with_specials(system, b: int = 3, t: int = 16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    specials = list(system.lm.special_token_ids)
    ordinary = torch.tensor([i for i in range(system.lm.d_vocab) if i not in specials])
    tokens = ordinary[torch.randint(0, len(ordinary), (b, t), generator=gen)]
    tokens[:, 0] = system.lm.bos_token_id
    tokens[0, 5] = specials[-1]  # mid-sequence, as packed documents put EOS/BOS between them
    tokens[1, 9] = system.lm.bos_token_id
    tokens[2, 15] = specials[0]
    return tokens


@pytest.mark.parametrize("objective", ["topk", "gsae"])
@pytest.mark.parametrize("exclude", [True, False])
def test_harvest_with_host_kept_positions_equals_the_device_mask(objective, exclude):
    system = build_system(objective, exclude_special_tokens=exclude)
    tokens = _tokens_with_specials(system)
    batch = system.prepare_batch(TokenBatch(tokens, 0))
    mask = system.token_mask(tokens)
    assert torch.equal(batch.keep, mask.reshape(-1).nonzero().squeeze(-1))
    assert batch.keep.numel() == (tokens.numel() - 6 if exclude else tokens.numel())
    ref, got = system.harvest(tokens), system.harvest(tokens, batch.keep)
    assert torch.equal(ref.x, got.x) and ref.x.shape[0] == batch.keep.numel()
    if objective == "gsae":
        assert torch.equal(ref.grad, got.grad)
    # prepare_batch leaves prepared batches and other objects alone
    assert system.prepare_batch(batch) is batch
    assert system.prepare_batch({"tokens": tokens}) == {"tokens": tokens}


class _Spy(pl.Callback):
    def __init__(self) -> None:
        self.keeps: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.keeps.append(batch.keep is not None)


@pytest.mark.parametrize("objective", ["topk", "gsae", "e2e"])
def test_training_batches_reach_the_step_with_their_kept_positions(tmp_path, monkeypatch, objective):
    """Through gsae's data module and through a plain DataLoader (no data module: the module's own hook), every
    training batch arrives with ``keep``, and no step falls back to a boolean mask on the device."""
    fallbacks = []
    inner = SAESystem.select_rows

    def select_rows(x, mask, keep):
        if keep is None:
            fallbacks.append(1)
        return inner(x, mask, keep)

    monkeypatch.setattr(SAESystem, "select_rows", staticmethod(select_rows))
    system = build_system(objective)
    spy = _Spy()
    build_trainer(tmp_path / "dm", 3, callbacks=[spy]).fit(system, datamodule=build_data(system))
    plain = [TokenBatch(_tokens_with_specials(system, 4), i) for i in range(3)]
    system2 = build_system(objective)
    build_trainer(tmp_path / "plain", 3, callbacks=[spy]).fit(system2, DataLoader(plain, batch_size=None))
    assert spy.keeps == [True] * 6 and not fallbacks


def test_host_floats_is_float_of_each_in_one_copy():
    t = torch.tensor([1.5, -2.25, 3.0e-8], dtype=torch.float32)
    values = {"a": t[0], "b": 7, "c": t[1] * 2, "d": torch.tensor(3, dtype=torch.long), "e": t[2],
              "f": torch.tensor(2**40 + 1, dtype=torch.long), "g": torch.tensor(0.1, dtype=torch.float64),
              "h": torch.tensor(1 / 3, dtype=torch.bfloat16)}  # exact at any magnitude, whatever the dtype mix
    got = host_floats(values)
    assert list(got) == list(values)
    assert got == {k: float(v) for k, v in values.items()}
    assert host_floats({}) == {} and host_floats({"x": 1.0}) == {"x": 1.0}


def test_auxk_mask_carries_the_dead_count():
    tracker = DeadLatentTracker(10, n_batches=2, n_tokens=100)
    assert tracker.auxk_mask().count_true() == 0
    fired = torch.zeros(10, dtype=torch.bool)
    fired[[1, 4]] = True
    for step in range(4):
        tracker.update(fired if step % 2 == 0 else torch.zeros(10, dtype=torch.bool), 40)
        mask = tracker.auxk_mask()
        assert torch.equal(mask, tracker.dead_by_tokens())
        assert mask.count_true() == int(tracker.dead_by_tokens().sum()) == tracker.n_dead_by_tokens()
    assert tracker.auxk_mask().count_true() == 8  # 160 tokens without firing; latents 1 and 4 fired 40 tokens ago
    tracker.tokens_since_fired.zero_()  # changed outside update: counted again
    assert tracker.auxk_mask().count_true() == 0


@pytest.mark.parametrize("k_aux", [0, 8])
def test_the_dead_mask_is_built_only_for_an_sae_with_auxk(k_aux):
    """An SAE without AuxK (the GPT-2 configs' ``k_aux: 0``) gets no dead mask, and its tracker sends no dead count to
    the host (on a GPU: three kernels and an event a step); with AuxK, the mask with its count, in training steps with
    a dead latent only (without one AuxK's loss is 0 and no mask is built)."""
    lm = LanguageModel("random-tiny", seed=0)
    system = LocalSAESystem(lm, lambda d: TopKSAE(d, 64, 4, k_aux=k_aux), hook=HOOK, dead_tokens=100)
    assert system.sae.uses_dead_mask == system.dead.send_dead_count == (k_aux > 0)
    assert system.dead_mask(system.sae, system.dead, "train") is None  # nothing dead yet
    fired = torch.ones(64, dtype=torch.bool)
    fired[[3, 7, 9]] = False
    system.dead.update(fired, 150)  # latents 3, 7 and 9 dead by tokens
    assert system.dead_mask(system.sae, system.dead, "val") is None
    mask = system.dead_mask(system.sae, system.dead, "train")
    if k_aux:
        assert torch.equal(mask, system.dead.dead_by_tokens()) and mask.count_true() == 3
        x = torch.randn(20, system.sae.d_in)  # AuxK's loss with the mask handed over = with a plain mask, counted there
        handed = system.sae.auxk_loss(x, x * 0.5, x @ system.sae.W_enc, mask, 0.1)
        plain = system.sae.auxk_loss(x, x * 0.5, x @ system.sae.W_enc, system.dead.dead_by_tokens(), 0.1)
        assert handed > 0 and torch.allclose(handed, plain)
    else:
        assert mask is None
    members = [{"name": f"a{k}", "sae": {"class_path": "TopKSAE", "init_args": {"d_sae": 32, "k": 2, "k_aux": k}}} for k in (0, 4)]
    sweep = SweepSAESystem(lm, members, hook=HOOK, dead_tokens=100)
    for m in sweep.members.values():
        m.dead.update(fired[:32], 150)
    assert [m.dead.send_dead_count for m in sweep.members.values()] == [False, True]
    assert [sweep.dead_mask(m.sae, m.dead, "train") is None for m in sweep.members.values()] == [True, False]


def test_a_tracker_copies_and_pickles():
    import copy
    import pickle

    tracker = DeadLatentTracker(10, n_batches=2, n_tokens=30)
    tracker.update(torch.zeros(10, dtype=torch.bool), 40)
    for twin in (copy.deepcopy(tracker), pickle.loads(pickle.dumps(tracker))):
        assert torch.equal(twin.tokens_since_fired, tracker.tokens_since_fired) and twin.auxk_mask().count_true() == 10


def test_e2e_splice_with_kept_positions_equals_the_masked_one():
    """The e2e patch: ``x`` with the kept positions replaced by the SAE output, by ``index_copy`` from the host's indices
    and by the mask; equal values and equal gradients to the SAE output."""
    system = build_system("e2e")
    tokens = _tokens_with_specials(system)
    keep = system.prepare_batch(TokenBatch(tokens, 0)).keep
    mask = system.token_mask(tokens)
    x = torch.randn(*tokens.shape, 16)
    outs, grads = [], []
    for by_keep in (False, True):
        x_hat = torch.randn(keep.numel(), 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = system.splice(x, None if by_keep else mask, x_hat, keep if by_keep else None)
        (out * torch.arange(out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append(x_hat.grad)
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])
    assert torch.equal(outs[1][~mask], x[~mask])  # special positions keep the LM's activations


def test_auxk_runs_in_training_once_latents_are_dead(tmp_path):
    """Through a real fit: no dead mask while nothing is dead, then AuxK gets the dead latents (their count taken on the
    host) and a positive loss, in a run alone and in a sweep member."""
    lm = LanguageModel("random-tiny", seed=0)
    single = LocalSAESystem(lm, lambda d: TopKSAE(d, 256, 2, k_aux=8), hook=HOOK, dead_tokens=100, buffer_size=64)
    members = [{"name": "a", "sae": {"class_path": "TopKSAE", "init_args": {"d_sae": 256, "k": 2, "k_aux": 8}}}]
    sweep = SweepSAESystem(lm, members, hook=HOOK, dead_tokens=100, buffer_size=64)
    for system, sae in ((single, single.sae), (sweep, sweep.members["a"].sae)):
        seen: list[tuple[int, float]] = []
        auxk = sae.auxk_loss

        def record(x, x_hat, pre, dead_mask, aux_norm=None, zero=None, auxk=auxk, seen=seen):
            loss = auxk(x, x_hat, pre, dead_mask, aux_norm, zero)
            seen.append((0 if dead_mask is None else dead_mask.count_true(), float(loss)))
            return loss

        sae.auxk_loss = record
        build_trainer(tmp_path / type(system).__name__, 5).fit(system, datamodule=build_data(system, batch_size=4))
        assert seen[0] == (0, 0.0)  # a fresh SAE: nothing dead, no mask, no AuxK loss
        assert all(n > 0 and loss > 0 for n, loss in seen[-2:]), seen  # > 100 tokens in: unfired latents are dead
