"""Where does a perturbation curve blow up? Step metrics of Giglemiani et al. 2024 (§4.1, §4.4, App. B; SPEC §4.2).

A curve ``f`` holds one value per perturbation step ``n = 0..S−1`` (``S = 101`` in the paper): the L2
distance at the final residual, or the next-token KL, between the run at step ``n`` and the run at step 0.
Every function takes a batch of curves ``(M, S)`` and returns ``(M,)`` long steps.

=========  ==================================================================================================
``ms``     max slope: ``argmax_n f(n+1) − f(n)`` (draft code ``torch.argmax(torch.diff(values))``), in ``[0, S−2]``
``auc``    max of ``R(x) = triangle(x) / trapz(f[0..x])`` over ``x ≥ 5``. ``draft`` (default, LASR
           ``max_space_ratio_step``): ``triangle = f(x)·(x+1)/2``, ``x ≤ S−2``, ``R = 0`` where the area is 0;
           ``paper`` (App. B.1): the triangle (0,0), (x,0), (x,f(x)), ``f(x)·x/2``, ``x ≤ S−1``
``nl``     non-linearity. ``draft`` (default, SPEC §4.2, ``NL_step(1, 10, 10)``): first ``i ≥ 10`` with
           ``|f(i) − lin(i)| / lin(i) > 10%``, ``lin`` the line through ``f(0)`` and ``f(9)``; ``S`` if none.
           ``slope`` (the paper's wording, "the slope deviates from linearity by more than 10% of the initial
           slope" — [AMBIG], SPEC §8.4): first ``i ≥ 10`` with ``|(f(i) − f(i−1)) − s₀| > 10%·|s₀|``,
           ``s₀ = (f(9) − f(0))/9``; ``S`` if none
``ap``     activation plateau (§4.4): first ``n`` with ``f(n) > threshold`` (paper: 20); ``S`` if none
=========  ==================================================================================================

The draft divides by ``lin(i)`` as written: where the line is 0 the deviation is ``inf`` (any change
counts) or ``nan`` (none does), and where it is negative no deviation counts. Summaries: mean and
population std (``np.std``, as the draft's ``calculate_metrics``) and the two-sample Kolmogorov–Smirnov
statistic against the reference distribution (``scipy.stats.ks_2samp``, equal to SPEC's ``kstest(a, b)``).
The plateaus benchmark's tables (:func:`report`, :func:`format_table`) and CDF figures (:func:`figures`) live
here too: they are these distributions, laid out as the paper's Tables 1, A.1, B.1, B.2, C.1 and Figs. 2, 3.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from scipy import stats
from torch import Tensor

#: The draft code skips the first 5 ratios of the AUC metric ("wonky stuff at the start").
AUC_SKIP = 5
#: NL: the line goes through ``f(0)`` and ``f(NL_LINE_END)``; deviations are checked from ``NL_LINE_END + 1`` on.
NL_LINE_END = 9


def first_true(mask: Tensor) -> Tensor:
    """``(M,)`` index of the first True of each row of ``mask (M, S)``; ``S`` where a row has none."""
    S = mask.shape[-1]
    idx = torch.arange(S, device=mask.device).expand_as(mask)
    return torch.where(mask, idx, S).min(-1).values


def ms_step(curves: Tensor) -> Tensor:
    """Max-slope step ``argmax_n f(n+1) − f(n)`` of ``curves (M, S)`` (the first one on ties)."""
    return torch.diff(curves, dim=-1).argmax(-1)


def auc_step(curves: Tensor, variant: Literal["draft", "paper"] = "draft") -> Tensor:
    """AUC step of ``curves (M, S)``: the ``x ≥ 5`` maximising triangle area / area under the curve (module table)."""
    f = curves.double()
    S = f.shape[-1]
    if S <= AUC_SKIP + 1:
        raise ValueError(f"auc_step: curves need more than {AUC_SKIP + 1} steps (got {S})")
    area = torch.cat([f.new_zeros(f.shape[0], 1), ((f[:, 1:] + f[:, :-1]) / 2).cumsum(-1)], -1)  # trapz f[0..x]
    x = torch.arange(S, dtype=f.dtype, device=f.device)
    if variant == "draft":
        tri, last = f * (x + 1) / 2, S - 1  # draft: values[i-1]·i/2 for i = 1..S-1, i.e. x = i-1 <= S-2
    elif variant == "paper":
        tri, last = f * x / 2, S
    else:
        raise ValueError(f"auc_step: variant must be draft or paper (got {variant!r})")
    ratio = torch.where(area == 0, torch.zeros_like(f), tri / area)
    return ratio[:, AUC_SKIP:last].argmax(-1) + AUC_SKIP


def nl_step(curves: Tensor, variant: Literal["draft", "slope"] = "draft", threshold: float = 0.10) -> Tensor:
    """Non-linearity step of ``curves (M, S)`` (module table); ``S`` where the curve never deviates."""
    f = curves.double()
    S = f.shape[-1]
    if S <= NL_LINE_END + 1:
        raise ValueError(f"nl_step: curves need more than {NL_LINE_END + 1} steps (got {S})")
    slope = (f[:, NL_LINE_END] - f[:, 0]) / NL_LINE_END  # (M,)
    i = torch.arange(S, dtype=f.dtype, device=f.device)
    if variant == "draft":
        lin = f[:, :1] + slope[:, None] * i
        deviates = (f - lin).abs() / lin > threshold  # nan (0/0) and negative lines never count, as in the draft
    elif variant == "slope":
        local = torch.cat([f.new_zeros(f.shape[0], 1), torch.diff(f, dim=-1)], -1)  # f(i) − f(i−1)
        deviates = (local - slope[:, None]).abs() > threshold * slope.abs()[:, None]
    else:
        raise ValueError(f"nl_step: variant must be draft or slope (got {variant!r})")
    deviates[:, : NL_LINE_END + 1] = False
    return first_true(deviates)


def ap_step(curves: Tensor, threshold: float) -> Tensor:
    """Activation-plateau step: first ``n`` with ``f(n) > threshold``; ``S`` where the curve never crosses."""
    return first_true(curves > threshold)


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sample Kolmogorov–Smirnov statistic ``sup_x |F_a(x) − F_b(x)|`` (``None`` if a sample is empty)."""
    if len(a) == 0 or len(b) == 0:
        return None
    return float(stats.ks_2samp(np.asarray(a, dtype=float), np.asarray(b, dtype=float)).statistic)


def summarize(steps: Sequence[int], reference: Sequence[int], never: int | None = None) -> dict:
    """Mean, population std and KS against ``reference`` of a step distribution.

    With ``never`` (the value meaning "no step", e.g. ``S`` for AP), the mean and std are over the other
    values and ``n_never`` counts them; the KS statistic uses every value (``never`` sorts after all steps).
    """
    vals = np.asarray(steps, dtype=float)
    hit = vals[vals != never] if never is not None else vals
    out = {
        "mean": float(hit.mean()) if hit.size else None,
        "std": float(hit.std()) if hit.size else None,
        "ks": ks_statistic(vals, reference),
        "n": int(vals.size),
    }
    if never is not None:
        out["n_never"] = int(vals.size - hit.size)
    return out


# ---------------------------------------------------------------------------------------------------- tables
#: Table name -> (metric, curve) of Table 1 / A.1 (``ms``), B.1 (``auc``), B.2 (``nl``) and C.1 (``kl_ms``).
TABLES = {"ms": ("ms", "l2"), "auc": ("auc", "l2"), "nl": ("nl", "l2"), "kl_ms": ("ms", "kl")}
SCHEDULE_ABBR = {"absolute": "abs", "relative": "rel"}
#: ``ap_threshold="auto"``: this fraction of the median final L2 of the plateau curves.
AP_AUTO_FRACTION = 0.25


def curve_steps(curve: Tensor, metric: str, nl_variant: str = "draft", auc_variant: str = "draft") -> Tensor:
    """``(M,)`` steps of ``metric`` (``ms``, ``auc`` or ``nl``) of ``curve (M, S)``."""
    if metric == "ms":
        return ms_step(curve)
    if metric == "auc":
        return auc_step(curve, auc_variant)
    return nl_step(curve, nl_variant)


def report(meta: dict, sens: dict, plat: dict, ap_threshold: float | str, nl_variant: str, auc_variant: str) -> dict:
    """The result dict of :func:`gsae.evals.plateaus.run` from its curves.

    ``sens[schedule][type]`` and ``plat[base]`` have ``.l2`` and ``.kl`` ``(M, S)`` curves. Tables: one row per
    type, columns ``{abs,rel}_{mean,std,ks}`` (KS against ``model_generated``, the first type).
    """
    steps: dict = {name: {} for name in TABLES}
    for name, (metric, which) in TABLES.items():
        for sch, by_type in sens.items():
            steps[name][sch] = {
                t: curve_steps(getattr(c, which), metric, nl_variant, auc_variant).tolist() for t, c in by_type.items()
            }
    tables = {name: {} for name in TABLES}
    for name in TABLES:
        for sch, by_type in steps[name].items():
            ref = by_type["model_generated"]
            for t, vals in by_type.items():
                row = tables[name].setdefault(t, {})
                for stat, v in summarize(vals, ref).items():
                    if stat != "n":
                        row[f"{SCHEDULE_ABBR[sch]}_{stat}"] = v
    out = {
        **meta,
        "schedules": list(sens),
        "target_types": list(next(iter(sens.values()), {})),
        "tables": tables,
        "steps": steps,
        "mean_curves": {
            sch: {t: {"l2": c.l2.mean(0).tolist(), "kl": c.kl.mean(0).tolist()} for t, c in by_type.items()}
            for sch, by_type in sens.items()
        },
    }
    if plat:
        out["plateau"] = _plateau(plat, ap_threshold)
    out.update(_scalars(out))
    return out


def _plateau(plat: dict, ap_threshold: float | str) -> dict:
    """AP steps per base type (``None`` where a curve never crosses the threshold) and their table."""
    S = next(iter(plat.values())).l2.shape[-1]
    if ap_threshold == "auto":
        thr = AP_AUTO_FRACTION * float(torch.cat([c.l2[:, -1] for c in plat.values()]).median())
    else:
        thr = float(ap_threshold)
    ap = {b: ap_step(c.l2, thr).tolist() for b, c in plat.items()}
    ref = ap["model_generated"]
    return {
        "threshold": thr,
        "ap_steps": {b: [None if v == S else v for v in vals] for b, vals in ap.items()},
        "table": {b: summarize(vals, ref, never=S) for b, vals in ap.items()},
        "mean_curves": {b: c.l2.mean(0).tolist() for b, c in plat.items()},
    }


def _scalars(result: dict) -> dict[str, float]:
    """Top-level numbers for TensorBoard: MS mean / KS per type and schedule, AP mean / KS per base."""
    out = {}
    for t, row in result["tables"]["ms"].items():
        for k, v in row.items():
            if v is not None and k.split("_")[1] in ("mean", "ks"):
                out[f"ms_{k}_{t}"] = v
    for b, row in result.get("plateau", {}).get("table", {}).items():
        for k in ("mean", "ks"):
            if row[k] is not None:
                out[f"ap_{k}_{b}"] = row[k]
    out["target_cos_estimated"] = result["target_cos"]["estimated"]
    out["curves_per_second"] = result["timings"]["curves_per_second"]
    return out


def format_table(result: dict) -> str:
    """The result's tables as text: MS (Table 1 / A.1), AUC (B.1), NL (B.2), KL MS (C.1) and AP steps."""
    titles = {
        "ms": "Max slope (MS) step, L2",
        "auc": "AUC step, L2",
        "nl": "Non-linear (NL) step, L2",
        "kl_ms": "MS step, KL",
    }
    scheds = [SCHEDULE_ABBR[s] for s in result["schedules"]]
    width = max(len(t) for t in [*result["target_types"], "activation type"]) + 2
    cols = [f"{s}_{k}" for s in scheds for k in ("mean", "std", "ks")]

    def fmt(v) -> str:
        return f"{v:>8.2f}" if v is not None else f"{'-':>8}"

    lines = [
        f"plateaus: {result['hook']} position {result['position']}, {result['n_perturbations']} perturbations per type, "
        f"step size {result['step_size']:.4g}, target cos {result['target_cos']['used']:.3f} "
        f"(estimated {result['target_cos']['estimated']:.3f})"
    ]
    for name, title in titles.items():
        lines += ["", title, f"{'activation type':<{width}}" + "".join(f"{c:>9}" for c in cols)]
        for t, row in result["tables"][name].items():
            lines.append(f"{t:<{width}}" + "".join(" " + fmt(row[c]) for c in cols))
    if "plateau" in result:
        p = result["plateau"]
        lines += ["", f"Activation plateau (AP) step, L2 > {p['threshold']:.4g} ({result['plateau_schedule']} steps)"]
        lines.append(f"{'base type':<{width}}{'mean':>9}{'std':>9}{'ks':>9}{'never':>9}")
        for b, row in p["table"].items():
            lines.append(
                f"{b:<{width}}" + "".join(" " + fmt(row[c]) for c in ("mean", "std", "ks")) + f"{row['n_never']:>9}"
            )
    tm = result["timings"]
    lines += ["", f"{tm['n_curves']} curves in {tm['seconds_total']:.1f} s ({tm['curves_per_second']:.1f} curves/s)"]
    return "\n".join(lines)


def figures(result: dict) -> dict:
    """CDFs of the MS steps per target type (one figure per schedule; paper Fig. 2, A.1), of the AP steps per
    base type (Fig. 3), and the mean L2 curve per target type (the dashed lines of Fig. 1)."""
    from matplotlib.figure import Figure

    def cdf(ax, vals: list, label: str) -> None:
        v = sorted(x for x in vals if x is not None)
        if v:  # curves that never cross stay out, so a CDF may end below 1
            ax.step(v, [(i + 1) / len(vals) for i in range(len(v))], where="post", label=label)

    figs = {}
    for sch, by_type in result["steps"]["ms"].items():
        fig = Figure(figsize=(5.5, 3.8))
        ax = fig.add_subplot()
        for t, vals in by_type.items():
            cdf(ax, vals, t)
        ax.set(
            xlabel=f"MS step ({sch} step size)",
            ylabel="cumulative fraction",
            xlim=(0, result["n_steps"]),
            title=result["hook"],
        )
        ax.legend(fontsize=6)
        fig.tight_layout()
        figs[f"ms_cdf_{sch}"] = fig
        fig = Figure(figsize=(5.5, 3.8))
        ax = fig.add_subplot()
        for t, c in result["mean_curves"][sch].items():
            ax.plot(range(len(c["l2"])), c["l2"], label=t)
        ax.set(xlabel=f"step ({sch})", ylabel="mean L2 at final residual", title=result["hook"])
        ax.legend(fontsize=6)
        fig.tight_layout()
        figs[f"mean_l2_{sch}"] = fig
    if "plateau" in result:
        p = result["plateau"]
        fig = Figure(figsize=(5.5, 3.8))
        ax = fig.add_subplot()
        for b, vals in p["ap_steps"].items():
            cdf(ax, vals, b)
        ax.set(
            xlabel=f"AP step (L2 > {p['threshold']:.3g})",
            ylabel="cumulative fraction",
            xlim=(0, result["n_steps"]),
            title="perturbing towards random activations",
        )
        ax.legend(fontsize=6)
        fig.tight_layout()
        figs["ap_cdf"] = fig
    return figs
