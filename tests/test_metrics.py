"""Metrics against their formulas; sums that add up; KL convention; dead-latent counters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gsae.metrics import (
    DeadLatentTracker,
    ReconSums,
    fired_mask,
    kl_div_per_token,
    recon_metrics,
    recon_sums,
    recon_sums_stacked,
)


def _data(n: int = 300, d: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * 2 + 3  # nonzero mean: centered != uncentered
    x_hat = x + 0.5 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    l0 = torch.randint(0, 10, (n,), generator=gen)
    return x, x_hat, l0


def test_recon_metrics_match_direct_formulas() -> None:
    x, x_hat, l0 = _data()
    m = recon_metrics(recon_sums(x, x_hat, l0))
    err = (x - x_hat).pow(2).sum(-1)  # (N,)
    assert m["mse"] == pytest.approx(float(err.mean()), rel=1e-9)
    assert m["nmse"] == pytest.approx(float((err / x.pow(2).sum(-1)).mean()), rel=1e-9)
    centered = (x - x.mean(0)).pow(2).sum()
    assert m["explained_variance"] == pytest.approx(float(1 - err.sum() / centered), rel=1e-9)
    assert m["fvu_uncentered"] == pytest.approx(float(err.sum() / x.pow(2).sum()), rel=1e-9)
    assert m["l0"] == pytest.approx(float(l0.double().mean()), rel=1e-12)
    assert m["cossim"] == pytest.approx(float(F.cosine_similarity(x, x_hat, dim=-1).mean()), rel=1e-9)
    assert m["l2_ratio"] == pytest.approx(float((x_hat.norm(dim=-1) / x.norm(dim=-1)).mean()), rel=1e-9)
    # with a nonzero mean the centered variance is much smaller, so EV is well below 1 - fvu_uncentered
    assert m["explained_variance"] < 1 - m["fvu_uncentered"] - 0.01


def test_perfect_and_zero_reconstruction() -> None:
    x, _, l0 = _data()
    perfect = recon_metrics(recon_sums(x, x.clone(), l0))
    assert perfect["mse"] == 0 and perfect["nmse"] == 0 and perfect["explained_variance"] == 1
    assert perfect["cossim"] == pytest.approx(1.0) and perfect["l2_ratio"] == pytest.approx(1.0)
    # predicting the mean explains no variance
    mean = recon_metrics(recon_sums(x, x.mean(0).expand_as(x), l0))
    assert mean["explained_variance"] == pytest.approx(0.0, abs=1e-9)


def test_recon_sums_add_up_over_halves() -> None:
    x, x_hat, l0 = _data(n=301)
    whole = recon_metrics(recon_sums(x, x_hat, l0))
    a = recon_sums(x[:120], x_hat[:120], l0[:120])
    b = recon_sums(x[120:], x_hat[120:], l0[120:])
    halves = recon_metrics(a + b)
    assert halves.keys() == whole.keys()
    for key in whole:
        assert halves[key] == pytest.approx(whole[key], rel=1e-10, abs=1e-12), key
    # the flat vector round-trips (it is what DDP all-reduces)
    back = ReconSums.unflat(a.flat())
    for field, value in zip(ReconSums._fields, back):
        torch.testing.assert_close(value, getattr(a, field), msg=field)


def test_recon_sums_accept_float32_and_count_tokens() -> None:
    x, x_hat, l0 = _data()
    s = recon_sums(x.float(), x_hat.float(), l0)
    assert s.sse.dtype == torch.float64 and float(s.n) == 300
    assert recon_metrics(s)["mse"] == pytest.approx(recon_metrics(recon_sums(x, x_hat, l0))["mse"], rel=1e-5)


def test_kl_div_per_token_matches_torch_convention() -> None:
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(3, 7, 50, generator=gen) * 3
    new = clean + torch.randn(3, 7, 50, generator=gen)
    kl = kl_div_per_token(clean, new)
    ref = F.kl_div(F.log_softmax(new, -1), F.log_softmax(clean, -1), log_target=True, reduction="none").sum(-1)
    assert kl.shape == (3, 7)
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-6)
    assert (kl > 0).all()
    # KL(clean || new), not KL(new || clean): the two differ for these logits
    assert not torch.allclose(kl, kl_div_per_token(new, clean), rtol=1e-3)
    torch.testing.assert_close(kl_div_per_token(clean, clean), torch.zeros(3, 7), atol=1e-6, rtol=0)
    # invariant to a constant shift of the logits (softmax)
    torch.testing.assert_close(kl_div_per_token(clean, clean + 5.0), torch.zeros(3, 7), atol=1e-5, rtol=0)


def test_dead_latent_tracker_batches_definition() -> None:
    tracker = DeadLatentTracker(d_sae=4, n_batches=5, n_tokens=10**9)
    fired = torch.tensor([False, True, True, True])
    for step in range(1, 8):
        tracker.update(fired, n_tokens=10)
        assert bool(tracker.dead_by_batches()[0]) == (step >= 5), step
        assert not tracker.dead_by_batches()[1:].any()
    # firing resets the counter: alive again, and dead only after another 5 silent batches
    tracker.update(torch.tensor([True, True, True, True]), n_tokens=10)
    assert not tracker.dead_by_batches().any()
    for _ in range(4):
        tracker.update(fired, n_tokens=10)
    assert not tracker.dead_by_batches()[0]
    tracker.update(fired, n_tokens=10)
    assert tracker.dead_by_batches()[0]


def test_dead_latent_tracker_tokens_definition() -> None:
    tracker = DeadLatentTracker(d_sae=3, n_batches=10**6, n_tokens=100)
    fired = torch.tensor([False, True, False])
    tracker.update(fired, n_tokens=30)
    tracker.update(fired, n_tokens=30)
    tracker.update(fired, n_tokens=30)
    assert not tracker.dead_by_tokens().any()  # 90 tokens < 100
    tracker.update(torch.tensor([False, True, True]), n_tokens=30)
    assert tracker.dead_by_tokens().tolist() == [True, False, False]  # 120 >= 100; latent 2 just fired
    tracker.update(torch.tensor([True, True, False]), n_tokens=100)
    assert tracker.dead_by_tokens().tolist() == [False, False, True]
    assert tracker.tokens_since_fired.tolist() == [0, 0, 100]


def test_dead_latent_tracker_state_and_validation() -> None:
    tracker = DeadLatentTracker(d_sae=3, n_batches=2, n_tokens=5)
    tracker.update(torch.tensor([False, True, False]), n_tokens=3)
    state = tracker.state_dict()
    assert set(state) == {"batches_since_fired", "tokens_since_fired"}
    other = DeadLatentTracker(d_sae=3, n_batches=2, n_tokens=5)
    other.load_state_dict(state)
    torch.testing.assert_close(other.tokens_since_fired, tracker.tokens_since_fired)
    with pytest.raises(ValueError, match="--model.dead_batches"):
        DeadLatentTracker(3, n_batches=0)
    with pytest.raises(ValueError, match="--model.dead_tokens"):
        DeadLatentTracker(3, n_tokens=0)


def test_updating_many_trackers_at_once_equals_updating_each() -> None:
    """A sweep's ``update_many`` (``_foreach`` over the members' counters, idle masks as 0/1) = each tracker's
    ``update``, over steps with new batches and micro-batches, trackers of different widths."""
    gen = torch.Generator().manual_seed(0)
    widths = (5, 8, 3)
    many = [DeadLatentTracker(d, n_batches=3, n_tokens=40) for d in widths]
    each = [DeadLatentTracker(d, n_batches=3, n_tokens=40) for d in widths]
    for step in range(12):
        fired = [torch.rand(d, generator=gen) < 0.3 for d in widths]
        n, new_batch = 7 + step, step % 3 != 2
        idle = torch.cat(fired).logical_not().long()  # as the sweep makes them: views of one vector
        DeadLatentTracker.update_many(many, list(idle.split(widths)), n, new_batch)
        for t, f in zip(each, fired):
            t.update(f, n, new_batch)
        for a, b in zip(many, each):
            assert torch.equal(a.batches_since_fired, b.batches_since_fired)
            assert torch.equal(a.tokens_since_fired, b.tokens_since_fired)
    assert any(t.dead_by_batches().any() for t in many) and any(t.dead_by_tokens().any() for t in many)


def test_stacked_recon_sums_equal_each_reconstructions_own() -> None:
    """A stacked sweep's logging step: row ``i`` of ``recon_sums_stacked`` = ``recon_sums(x, x_hat[i], l0[i]).flat()``
    (a zero row of ``x`` and a zero reconstruction included: the clamps)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 6, generator=gen) * 3
    x[4] = 0
    x_hat = x + 0.3 * torch.randn(3, 30, 6, generator=gen)
    x_hat[1, 7] = 0
    l0 = torch.randint(0, 9, (3, 30), generator=gen)
    got = recon_sums_stacked(x, x_hat, l0)
    assert got.dtype == torch.float64 and got.shape == (3, 7 + 6)
    for i in range(3):
        torch.testing.assert_close(got[i], recon_sums(x, x_hat[i], l0[i]).flat(), rtol=1e-12, atol=1e-12)


def test_fired_mask() -> None:
    top_idx = torch.tensor([[0, 2], [2, 5]])
    top_acts = torch.tensor([[1.0, 0.0], [-0.5, 0.0]])  # a kept zero (ReLU'd) does not count as firing
    assert fired_mask(top_idx, top_acts, None, 6).tolist() == [True, False, True, False, False, False]
    latents = torch.tensor([[0.0, 0.1, 0.0], [0.0, 0.0, -2.0]])
    assert fired_mask(None, None, latents, 3).tolist() == [False, True, True]


# ---------------------------------------------------------------------- torchmetrics accumulators
def test_recon_metric_accumulates_batches_like_one_big_batch():
    from gsae.metrics import ReconMetric

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 6, generator=g) + 2 for n in (5, 9, 3)]
    xh = [x + 0.3 * torch.randn(x.shape, generator=g) for x in xs]
    l0 = [torch.randint(0, 5, (x.shape[0],), generator=g) for x in xs]
    m = ReconMetric(6)
    for a, b, c in zip(xs, xh, l0):
        m.update(a, b, c)
    want = recon_metrics(recon_sums(torch.cat(xs), torch.cat(xh), torch.cat(l0)))
    got = m.compute()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-12), k


def test_recon_and_fire_count_metrics_sum_over_ranks():
    """Two simulated ranks through torchmetrics' own sync (a gather function returning both ranks' states)."""
    from gsae.metrics import FireCountMetric, ReconMetric

    g = torch.Generator().manual_seed(1)
    x = [torch.randn(7, 4, generator=g) for _ in range(2)]
    xh = [v + 0.1 * torch.randn(v.shape, generator=g) for v in x]
    idx = [torch.randint(0, 10, (7, 3), generator=g) for _ in range(2)]
    acts = [torch.rand(7, 3, generator=g) for _ in range(2)]
    ranks = [(ReconMetric(4), FireCountMetric(10)) for _ in range(2)]
    for r, (rm, fc) in enumerate(ranks):
        rm.update(x[r], xh[r], (acts[r] != 0).sum(-1))
        fc.update(idx[r], acts[r], None)
    other = {id(m): o for (a, b), (c, d) in [(ranks[0], ranks[1])] for m, o in ((a, c), (b, d))}

    def gather_fn(m):
        states = {name: getattr(other[id(m)], name) for name in m._defaults}
        return lambda t, group=None: [t, next(v for k, v in states.items() if getattr(m, k) is t)]

    rm, fc = ranks[0]
    for m in (rm, fc):
        m.sync(dist_sync_fn=gather_fn(m), distributed_available=lambda: True)
    want = recon_metrics(recon_sums(torch.cat(x), torch.cat(xh), torch.cat([(a != 0).sum(-1) for a in acts])))
    got = recon_metrics(rm.sums())
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-12), k
    counts, n = fc.counts, fc.n_tokens
    assert int(n) == 14
    assert torch.equal(counts, torch.bincount(torch.cat(idx).reshape(-1), minlength=10))


def test_validation_metrics_equal_a_direct_computation(tmp_path):
    """``val/*`` from the torchmetrics accumulator equal recon_metrics over every validation token."""
    import lightning.pytorch as pl

    from gsae.metrics import l0_per_token
    from tests.systems.helpers import build_data, build_system

    system = build_system("topk")
    dm = build_data(system)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         default_root_dir=str(tmp_path), limit_val_batches=2)
    system.initialized.fill_(True)
    (logged,) = trainer.validate(system, datamodule=dm, verbose=False)
    xs, xh, l0 = [], [], []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            acts = system.harvest(batch.tokens)
            out = system.sae(acts.x, grad=acts.grad)
            xs.append(acts.x), xh.append(out.x_hat), l0.append(l0_per_token(out.top_acts, out.latents))
            if len(xs) == 2:
                break
    want = recon_metrics(recon_sums(torch.cat(xs), torch.cat(xh), torch.cat(l0)))
    for k in ("mse", "nmse", "explained_variance", "l0"):
        assert logged[f"val/{k}"] == pytest.approx(want[k], rel=1e-5), k


def test_recon_sums_leave_inputs_alone_and_handle_zero_reconstructions() -> None:
    x, x_hat, l0 = _data()
    before = x_hat.clone()
    recon_sums(x, x_hat, l0)  # float64 inputs: no copy is made by .double(), so nothing may be written in place
    assert torch.equal(x_hat, before)
    zero = recon_metrics(recon_sums(x, torch.zeros_like(x), l0))
    assert zero["cossim"] == 0 and zero["l2_ratio"] == 0 and zero["fvu_uncentered"] == pytest.approx(1.0)


def test_fire_counts_match_bincount_of_nonzero_entries() -> None:
    from gsae.metrics import fire_counts

    gen = torch.Generator().manual_seed(0)
    top_idx = torch.randint(0, 30, (200, 5), generator=gen)
    top_acts = torch.randn(200, 5, generator=gen).relu()  # about half are kept zeros
    want = torch.bincount(top_idx[top_acts != 0], minlength=30)
    got = fire_counts(top_idx, top_acts, None, 30)
    assert got.dtype == torch.long and torch.equal(got, want)
    as_float = fire_counts(top_idx, top_acts, None, 30, torch.float64)  # what a training step packs for its all-reduce
    assert as_float.dtype == torch.float64 and torch.equal(as_float, want.double())
    dense = torch.zeros(200, 30).scatter_(-1, top_idx, top_acts)  # duplicates within a row collapse here
    assert torch.equal(fire_counts(None, None, dense, 30) > 0, fired_mask(top_idx, top_acts, None, 30))


def test_the_reconstruction_metrics_of_no_token_are_zero_not_nan():
    from gsae.metrics import ReconMetric

    assert ReconMetric(4).compute()["l0"] == 0.0


def test_kl_div_per_token_of_bfloat16_logits_is_computed_in_float32() -> None:
    """bfloat16 logits (a ``bf16-mixed`` run) are upcast before the softmax: the KL equals a float64 computation on the
    same bfloat16 values, to float32 rounding (a bfloat16 softmax would be off by percents: 3 significant digits)."""
    gen = torch.Generator().manual_seed(0)
    clean = (torch.randn(4, 9, 300, generator=gen) * 3).bfloat16()
    new = (clean.float() + 0.3 * torch.randn(4, 9, 300, generator=gen)).bfloat16()
    kl = kl_div_per_token(clean, new)
    lp_c, lp_n = F.log_softmax(clean.double(), -1), F.log_softmax(new.double(), -1)
    ref = (lp_c.exp() * (lp_c - lp_n)).sum(-1)
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl.double(), ref, rtol=1e-4, atol=1e-6)


def test_fire_counts_sum_positive_are_the_summed_activations() -> None:
    """``test="sum_positive"`` (smol-sae's ``x_hid.sum(0) > 0``): each latent's activations summed over the rows, negative
    kept values included, sparse and dense forms alike, against a loop over the entries."""
    from gsae.metrics import fire_counts

    gen = torch.Generator().manual_seed(0)
    top_idx = torch.randint(0, 12, (50, 4), generator=gen)
    top_acts = torch.randn(50, 4, generator=gen, dtype=torch.float64)  # TopK without ReLU: about half negative
    want = torch.zeros(12, dtype=torch.float64)
    dense = torch.zeros(50, 12, dtype=torch.float64)
    for r in range(50):
        for j in range(4):
            want[top_idx[r, j]] += top_acts[r, j]
            dense[r, top_idx[r, j]] += top_acts[r, j]
    assert (want < 0).any() and (want > 0).any()
    sparse = fire_counts(top_idx, top_acts, None, 12, torch.float64, test="sum_positive")
    torch.testing.assert_close(sparse, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fire_counts(None, None, dense, 12, torch.float64, test="sum_positive"), want,
                               rtol=1e-12, atol=1e-12)


def test_cossim_of_tiny_rows_is_f_cosine_similarity() -> None:
    """The cosine clamps each norm at 1e-8 (``F.cosine_similarity``'s definition), not their product: rows of norm
    ~1e-5 still have their true cosine."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 6, generator=gen, dtype=torch.float64) * 1e-5
    x_hat = x + 0.3e-5 * torch.randn(20, 6, generator=gen, dtype=torch.float64)
    m = recon_metrics(recon_sums(x, x_hat, torch.zeros(20)))
    assert m["cossim"] == pytest.approx(float(F.cosine_similarity(x, x_hat, dim=-1).mean()), rel=1e-9)
    assert m["cossim"] > 0.5


def test_l0_per_token_counts_negative_kept_values() -> None:
    """``l0`` counts nonzero latents (SAELens ``!= 0``): a TopK SAE without ReLU keeps negative values, which count."""
    from gsae.metrics import l0_per_token

    top_acts = torch.tensor([[1.0, -2.0, 0.0], [-0.5, -0.1, 3.0]])
    assert l0_per_token(top_acts, None).tolist() == [2, 3]
    latents = torch.tensor([[0.0, -1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    assert l0_per_token(None, latents).tolist() == [2, 0]
