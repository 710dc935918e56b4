"""Step metrics (SPEC §4.2): hand-made curves with known steps, and the LASR draft code as a reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gsae.evals.step_metrics import ap_step, auc_step, ks_statistic, ms_step, nl_step, summarize

S = 101
N = torch.arange(S, dtype=torch.float64)
STEP = torch.where(N >= 40, 10.0, 0.0)  # jumps between n = 39 and 40
RAMP = N.clone()  # perfectly linear
PLATEAU_RISE = (N - 50).clamp_min(0)  # flat until 50, then rises
KINK = torch.where(N <= 30, N, N + 3 * (N - 30))  # slope 1, then slope 4 after n = 30
CURVES = torch.stack([STEP, RAMP, PLATEAU_RISE, KINK])


def draft_ratio_step(values: np.ndarray) -> int:
    """Transcription of the LASR draft ``max_space_ratio_step`` (np.trapz written out)."""
    aucs = []
    for i in range(1, len(values)):
        v = values[:i]
        auc = float(((v[1:] + v[:-1]) / 2).sum())
        if auc == 0:
            aucs.append(0)
            continue
        aucs.append((values[i - 1] * i) / 2 / auc)
    return int(np.argmax(aucs[5:]) + 5)


def draft_nl_step(values: np.ndarray, start_step: int = 1, end_step: int = 10, threshold: float = 10) -> int:
    """Transcription of the LASR draft ``NL_step``."""
    n = len(values)
    x1, y1 = start_step - 1, values[start_step - 1]
    x2, y2 = end_step - 1, values[end_step - 1]
    slope = (y2 - y1) / (x2 - x1)
    intercept = y1 - slope * x1
    for i in range(end_step, n):
        expected = slope * i + intercept
        with np.errstate(divide="ignore", invalid="ignore"):
            if abs(values[i] - expected) / expected * 100 > threshold:
                return i
    return n


def test_ms_step_of_hand_made_curves():
    assert ms_step(CURVES).tolist() == [39, 0, 50, 30]  # ties (the ramp) give the first step


def test_auc_step_of_hand_made_curves():
    # step: R(40) = (10·41/2) / 5 = 41, then falls; ramp: R(x) = (x+1)/x falls, so the first allowed x = 5;
    # plateau-rise: R(51) = (1·52/2) / 0.5 = 52 is the first nonzero ratio and the largest
    assert auc_step(CURVES[:3]).tolist() == [40, 5, 51]
    assert auc_step(CURVES[:3], "paper").tolist() == [40, 5, 51]


def test_nl_step_of_hand_made_curves():
    # draft: the line through f(0), f(9); step/plateau-rise have a zero line, so the first nonzero value counts;
    # kink: |34 − 31|/31 = 9.7% at 31, |38 − 32|/32 = 18.75% at 32; the ramp never deviates (→ S)
    assert nl_step(CURVES).tolist() == [40, S, 51, 32]
    # slope variant: the local slope f(i) − f(i−1) is 4 ≠ 1 at i = 31 already
    assert nl_step(CURVES, "slope").tolist() == [40, S, 51, 31]


def test_nl_step_ignores_a_negative_line_like_the_draft():
    falling = (10 - N).clamp_min(-5)
    assert nl_step(falling[None]).tolist() == [draft_nl_step(falling.numpy())]


def test_ap_step_first_crossing_or_never():
    assert ap_step(CURVES, 20.0).tolist() == [S, 21, 71, 21]  # the step never exceeds 20
    assert ap_step(STEP[None], 5.0).tolist() == [40]


def test_auc_and_nl_match_the_draft_code_on_random_curves():
    g = torch.Generator().manual_seed(0)
    curves = torch.cat([torch.rand(20, S, generator=g).cumsum(-1), CURVES.float()]).double()
    curves[:5] = torch.sigmoid((N - 30 - 40 * torch.rand(5, 1, generator=g, dtype=torch.float64)) / 3) * 20 + 0.01 * N
    for c, auc, nl in zip(curves, auc_step(curves), nl_step(curves)):
        assert int(auc) == draft_ratio_step(c.numpy())
        assert int(nl) == draft_nl_step(c.numpy())
        assert int(ms_step(c[None])) == int(torch.argmax(torch.diff(c)))


def test_ks_statistic():
    a = [1, 5, 7, 7, 30]
    assert ks_statistic(a, a) == 0.0
    assert ks_statistic([1, 2, 3], [10, 11]) == 1.0
    assert ks_statistic([], a) is None


def test_summarize_uses_population_std_and_counts_never():
    s = summarize([10, 20, 30, S], [10, 20, 30], never=S)
    assert s["mean"] == pytest.approx(20.0) and s["std"] == pytest.approx(np.std([10, 20, 30]))
    assert s["n_never"] == 1 and s["n"] == 4 and s["ks"] == pytest.approx(0.25)
    assert summarize([3, 4], [3, 4])["ks"] == 0.0


def test_bad_variants_and_short_curves_raise():
    with pytest.raises(ValueError, match="variant"):
        auc_step(CURVES, "nope")
    with pytest.raises(ValueError, match="variant"):
        nl_step(CURVES, "nope")
    with pytest.raises(ValueError, match="steps"):
        nl_step(CURVES[:, :8])


def test_nl_slope_variant_of_a_falling_curve_uses_the_size_of_the_slope():
    # slope −1 until n = 30, then −4: the local slope deviates from s₀ = −1 by 3 > 10%·|s₀| first at n = 31
    assert nl_step(-KINK[None], "slope").tolist() == [31]
    assert nl_step(-RAMP[None], "slope").tolist() == [S]  # a falling straight line never deviates


def test_plateau_auto_threshold_is_a_fraction_of_the_median_final_l2_and_never_is_none():
    from types import SimpleNamespace

    from gsae.evals.step_metrics import AP_AUTO_FRACTION, _plateau

    finals = [1.0, 2.0, 30.0]  # median 2, mean 11
    curves = torch.stack([torch.linspace(0, v, 11) for v in finals])  # (3, 11)
    flat = torch.zeros(2, 11)  # never crosses; 5 final values, so the median is one of them
    plat = {"model_generated": SimpleNamespace(l2=curves), "random": SimpleNamespace(l2=flat)}
    out = _plateau(plat, "auto")
    thr = AP_AUTO_FRACTION * float(np.median(finals + [0.0, 0.0]))  # the median over every base's final L2
    assert out["threshold"] == pytest.approx(thr)
    naive = [next((n for n in range(11) if float(c[n]) > thr), None) for c in curves]
    assert out["ap_steps"]["model_generated"] == naive
    assert out["ap_steps"]["random"] == [None, None]
    assert out["table"]["random"]["n_never"] == 2 and out["table"]["random"]["mean"] is None


def test_auc_draft_step_stops_one_short_of_the_last_step_like_the_draft():
    # zero until the last step: every draft ratio (x ≤ S−2) is 0, so the first allowed x; the paper's ends at S−1
    spike = torch.where(N == S - 1, 1.0, 0.0).double()
    assert auc_step(spike[None]).tolist() == [draft_ratio_step(spike.numpy())] == [5]
    assert auc_step(spike[None], "paper").tolist() == [S - 1]


def test_nl_slope_variant_checks_only_from_step_10_on():
    # the local slope f(9) − f(8) = 0.5 deviates from s₀ = 1, but steps before 10 never count; from 10 on it is 1
    bent = RAMP.clone()
    bent[8] = 8.5
    assert nl_step(bent[None], "slope").tolist() == [S]
