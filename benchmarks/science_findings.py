"""The science findings of ``tests/science`` on gsae-tiny and on a random-weight control, side by side.

Computes, with exactly the tests' sizes and options (``tests/science/helpers.py``), for each model:

(a) Lee & Heimersheim: KL(cov-random / real mixture) ÷ KL(isotropic) at lengths 5%…100% of the median norm;
(b) Gurnee: KL(SAE substitution) ÷ KL(ε-isotropic) for a TopK SAE trained here (LocalSAESystem + Trainer);
(c) Giglemiani et al.: MS step toward model-generated vs random targets (L2 headline and KL variant);
(d) Olmo et al. Table 1: dead-latent fraction of a g-SAE vs a TopK SAE (same k, tokens, seeds);
(d') the gradient control: dead fraction of that g-SAE vs the same g-SAE fed shuffled gradients;
(e) Olmo et al. §4.2: steering, on-target added probability of g-SAE vs TopK latents at the paper's α
    (ratio of the means over latents and positions, ratio of the per-latent medians, and the paired
    per-position Wilcoxon p-value the test uses);

and prints one table (finding, paper, values per model, holds? per model) plus the per-length table of (a)
and the steering curves of (e).
``holds`` = the tests' criterion: one-sided test p < 0.01 and the effect-size floor. ``--seeds 0 1 2`` repeats
everything with other SAE-training seeds and evaluation texts (seed s: training seed s, corpus seed 4242 + s)
and adds a robustness table; ``--findings e`` measures only some findings (their SAEs only). 2 CPU cores,
1 thread: 6.5 min (random-small) to 14 min (gsae-tiny) per seed on a heavily shared machine; (e)'s g-SAE
training and steering are the bulk (``--findings e``: 1–2 min (random-small) to 2–5 min (gsae-tiny) per seed).

    python benchmarks/science_findings.py                                  # gsae-tiny and random-small, seed 0
    python benchmarks/science_findings.py --seeds 0 1 2 --json science.json
    python benchmarks/science_findings.py --findings e --seeds 0 1 2       # the steering finding only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for tests.science

from tests.science import helpers as h  # noqa: E402

FINDINGS = ("a", "b", "c", "d", "d2", "e")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--models", nargs="+", default=["gsae-tiny", "random-small"], help="models (first = the trained one)"
    )
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="SAE-training seeds; eval corpus seed = 4242 + seed"
    )
    p.add_argument(
        "--findings", nargs="+", choices=FINDINGS, default=list(FINDINGS), help="findings to measure (d2 = (d'))"
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", default=None, help="write every measurement here")
    return p.parse_args(argv)


def measure(name: str, seed: int, findings=FINDINGS) -> dict:
    """The measurements ``findings`` on model ``name`` with training seed ``seed`` and eval corpus seed ``4242 + seed``."""
    t0 = time.perf_counter()
    lm = h.load_lm(name)
    ev = h.EVAL_SEED + seed
    tokens = h.eval_tokens(lm, h.N_GROUPS * h.SEQS_PER_GROUP, seed=ev)
    out = {"model": name, "seed": seed, "eval_seed": ev}
    if "a" in findings:
        out["a"] = h.measure_mixture_vs_isotropic(lm, tokens)
    if "b" in findings:
        sae, _, t_sub = h.train_sae(lm, "topk", **{**h.SUBSTITUTION_SAE}, seed=seed)
        out["b"] = {**h.measure_substitution(lm, sae, tokens), "train_seconds": t_sub}
    if "c" in findings:
        out["c"] = h.measure_plateaus(lm, h.eval_tokens(lm, h.PLATEAU_CONTEXTS, seed=ev))
    if "d" in findings or "d2" in findings:
        saes, train_dead, t_dead = {}, {}, {}
        for kind in ("topk", "gsae"):
            saes[kind], system, t_dead[kind] = h.train_sae(lm, kind, **h.DEAD_SAE, seed=seed)
            train_dead[kind] = float(system.dead.dead_by_batches().float().mean())
        out["d"] = {
            **h.measure_dead_latents(lm, saes["topk"], saes["gsae"], tokens, train_dead),
            "train_seconds": t_dead,
        }
    if "d2" in findings:
        shuffled, _, t_shuf = h.train_sae(lm, "gsae_shuffled", **h.DEAD_SAE, seed=seed)
        out["d2"] = {**h.measure_gradient_control(lm, saes["gsae"], shuffled, tokens), "train_seconds": t_shuf}
    if "e" in findings:
        steer, t_steer = {}, {}
        for kind in ("topk", "gsae"):
            steer[kind], _, t_steer[kind] = h.train_sae(lm, kind, **h.STEER_SAE, seed=seed)
        out["e"] = {**h.measure_steering(lm, steer["topk"], steer["gsae"], tokens), "train_seconds": t_steer}
    out["seconds"] = time.perf_counter() - t0
    return out


def _yn(b: bool) -> str:
    return "yes" if b else "NO"


def cells(m: dict) -> dict[str, tuple[str, str]]:
    """``finding -> (value text, holds text)`` of one model's measurements."""
    out = {}
    makers = {"a": _cells_a, "b": _cells_b, "c": _cells_c, "d": _cells_d, "d2": _cells_d2, "e": _cells_e}
    for key, make in makers.items():
        if key in m:
            out.update(make(m[key]))
    return out


def _cells_a(a: dict) -> dict:
    out = {}
    for mix in h.MIXTURES:
        rs = [t["geo_mean_ratio"] for t in a["tests"][mix]]
        ps = [t["p"] for t in a["tests"][mix]]
        ok = all(p < h.ALPHA and r >= h.FLOOR_MIXTURE_RATIO for r, p in zip(rs, ps))
        out[f"(a) KL {mix} / KL isotropic"] = (f"{min(rs):.2f}–{max(rs):.2f}× (max p {max(ps):.1g})", _yn(ok))
    return out


def _cells_b(b: dict) -> dict:
    out = {}
    t = b["test"]
    out["(b) KL SAE(x) / KL ε-isotropic"] = (
        f"{t['geo_mean_ratio']:.2f}× [{t['min_ratio']:.2f}, {t['max_ratio']:.2f}] (p {t['p']:.1g})",
        _yn(b["holds"]),
    )
    for k in ("eps_cov_mixture", "eps_real_mixture"):
        out[f"(b') KL SAE(x) / KL {k} (reported)"] = (f"{b['ratios'][k]:.2f}×", "—")
    return out


def _cells_c(c: dict) -> dict:
    out = {}
    for tab, label in (
        ("ms", "(c) L2 MS step MG vs random (headline)"),
        ("kl_ms", "(c) KL MS step MG vs random (App. C.1)"),
    ):
        x = c[tab]
        out[label] = (f"{x['model_generated']:.1f} vs {x['random']:.1f} (p {x['p']:.1g})", _yn(x["holds"]))
    return out


def _cells_d(d: dict) -> dict:
    out = {}
    f = d["dead_fraction"]
    out["(d) dead fraction g-SAE vs TopK"] = (
        f"{f['gsae']:.3f} vs {f['topk']:.3f} (ratio {d['ratio']:.2f}, p {d['p']:.1g})",
        _yn(d["holds"]),
    )
    return out


def _cells_d2(d2: dict) -> dict:
    out = {}
    f = d2["dead_fraction"]
    out["(d') dead fraction g-SAE true ∇ vs shuffled ∇ (control)"] = (
        f"{f['true']:.3f} vs {f['shuffled']:.3f} (ratio {d2['ratio']:.2f}, p {d2['p']:.1g})",
        _yn(d2["holds"]),
    )
    return out


def _cells_e(e: dict) -> dict:
    out = {}
    out["(e) steering on-target Δp g-SAE vs TopK at α = 0.4‖x‖"] = (
        f"{e['on_target']['gsae']:.4f} vs {e['on_target']['topk']:.4f} (ratio {e['ratio']:.2f}, median ratio "
        f"{e['median_ratio']:.2f}; g-SAE higher at {e['positions_gsae_greater']}/{e['n_positions']} positions, "
        f"p {e['p']:.1g})",
        _yn(e["holds"]),
    )
    out["(e') steering off-target added Δp g-SAE vs TopK (reported)"] = (
        f"{e['off_target_added']['gsae']:.4f} vs {e['off_target_added']['topk']:.4f}",
        "—",
    )
    return out


PAPER = {
    "(a) KL cov_random_mixture / KL isotropic": "> 1 (figures; GPT-2 L6, lengths 1–91)",
    "(a) KL real_mixture / KL isotropic": "> 1, ≈ cov-random mixture",
    "(b) KL SAE(x) / KL ε-isotropic": "2.2–4.5× (Gurnee, GPT-2 resid)",
    "(b') KL SAE(x) / KL eps_cov_mixture (reported)": "not pathological at L6 (figures)",
    "(b') KL SAE(x) / KL eps_real_mixture (reported)": "not pathological at L6 (figures)",
    "(c) L2 MS step MG vs random (headline)": "41.1 vs 52.5 (Table 1)",
    "(c) KL MS step MG vs random (App. C.1)": "45.5 vs 58.5 (Table C.1)",
    "(d) dead fraction g-SAE vs TopK": "k=5: 0.88 vs 0.92; k=32: 0.34 vs 0.43",
    "(d') dead fraction g-SAE true ∇ vs shuffled ∇ (control)": "— (not in the paper)",
    "(e) steering on-target Δp g-SAE vs TopK at α = 0.4‖x‖": "> 5× on average (α = 50, Fig. 5)",
    "(e') steering off-target added Δp g-SAE vs TopK (reported)": "g-SAE lower (Fig. 5 bottom)",
}


def table(rows: list[dict]) -> str:
    """Markdown table: finding, paper value, then value and holds? per model (seed-0 runs)."""
    names = [r["model"] for r in rows]
    per = [cells(r) for r in rows]
    head = "| finding | paper | " + " | ".join(f"{n} | holds ({n})" for n in names) + " |"
    sep = "|" + "---|" * (2 + 2 * len(names))
    lines = [head, sep]
    for key in per[0]:
        vals = " | ".join(f"{p[key][0]} | {p[key][1]}" for p in per)
        lines.append(f"| {key} | {PAPER.get(key, '')} | {vals} |")
    return "\n".join(lines)


def length_table(rows: list[dict]) -> str:
    """(a) per length: mean KL per type and the geometric-mean ratios, per model."""
    lines = []
    for r in rows:
        a = r["a"]
        lines.append(
            f"\n{r['model']} (median ‖x‖ at {a['hook']} = {a['median_norm']:.2f}, {a['n_tokens']} tokens, "
            f"{a['n_groups']} groups)\n"
        )
        lines.append("| L / ‖x‖ | L | KL isotropic | KL cov mixture | KL real mixture | cov/iso (p) | real/iso (p) |")
        lines.append("|---|---|---|---|---|---|---|")
        for i, (fr, L) in enumerate(zip(a["length_fractions"], a["lengths"])):
            kl = {k: a["mean_kl"][k][i] for k in a["mean_kl"]}
            tc, tr = a["tests"]["cov_random_mixture"][i], a["tests"]["real_mixture"][i]
            lines.append(
                f"| {fr:.2f} | {L:.2f} | {kl['isotropic']:.4f} | {kl['cov_random_mixture']:.4f} | "
                f"{kl['real_mixture']:.4f} | {tc['geo_mean_ratio']:.2f} ({tc['p']:.1g}) | {tr['geo_mean_ratio']:.2f} ({tr['p']:.1g}) |"
            )
    return "\n".join(lines)


def steering_table(rows: list[dict]) -> str:
    """(e) per α: mean on-target Δp of TopK and g-SAE latents and their ratio, per model."""
    lines = []
    for r in rows:
        e = r["e"]
        lines.append(
            f"\n{r['model']} (median ‖x‖ {e['median_norm']:.2f}; {e['n_latents']['gsae']} / {e['n_latents']['topk']} "
            f"latents g-SAE / TopK; β {e['beta']:g}, median β|W_dec g| of the selected latents "
            f"{e['median_attribution']:.2f}; {e['n_positions']} positions, g-SAE higher at "
            f"{e['positions_gsae_greater']}; per-latent medians {e['median_on_target']['gsae']:.4f} / "
            f"{e['median_on_target']['topk']:.4f}, latent Mann-Whitney p {e['latent_mwu_p']:.2g} (reported))\n"
        )
        lines.append("| α / ‖x‖ | α | on-target TopK | on-target g-SAE | g-SAE / TopK |")
        lines.append("|---|---|---|---|---|")
        c = e["on_target_curve"]
        for i, (fr, a) in enumerate(zip(e["alpha_fractions"], e["alphas"])):
            if fr == 0:
                continue
            lines.append(f"| {fr:.1f} | {a:.2f} | {c['topk'][i]:.4f} | {c['gsae'][i]:.4f} | {e['curve_ratio'][i - 1]:.2f} |")
    return "\n".join(lines)


def _amin(a: dict) -> dict:
    return {mix: min(t["geo_mean_ratio"] for t in a["tests"][mix]) for mix in h.MIXTURES}


#: robustness table columns: (finding key, header, cell text of that finding's measurement).
ROBUST_COLUMNS = (
    (
        "a",
        "(a) min ratio cov / real (holds)",
        lambda a: f"{_amin(a)['cov_random_mixture']:.2f} / {_amin(a)['real_mixture']:.2f} ({_yn(a['holds'])})",
    ),
    ("b", "(b) ratio (holds)", lambda b: f"{b['test']['geo_mean_ratio']:.2f} ({_yn(b['holds'])})"),
    (
        "c",
        "(c) KL MS MG vs rand (holds)",
        lambda c: f"{c['kl_ms']['model_generated']:.1f} vs {c['kl_ms']['random']:.1f} ({_yn(c['kl_ms']['holds'])})",
    ),
    (
        "c",
        "(c) L2 MS MG vs rand (holds)",
        lambda c: f"{c['ms']['model_generated']:.1f} vs {c['ms']['random']:.1f} ({_yn(c['ms']['holds'])})",
    ),
    (
        "d",
        "(d) dead g-SAE vs TopK (holds)",
        lambda d: f"{d['dead_fraction']['gsae']:.3f} vs {d['dead_fraction']['topk']:.3f} ({_yn(d['holds'])})",
    ),
    (
        "d2",
        "(d') dead true vs shuffled ∇ (holds)",
        lambda d2: f"{d2['dead_fraction']['true']:.3f} vs {d2['dead_fraction']['shuffled']:.3f} ({_yn(d2['holds'])})",
    ),
    (
        "e",
        "(e) steering ratio / median ratio, positions g-SAE > TopK, Wilcoxon p (holds)",
        lambda e: (
            f"{e['ratio']:.2f} / {e['median_ratio']:.2f}, {e['positions_gsae_greater']}/{e['n_positions']}, "
            f"{e['p']:.1g} ({_yn(e['holds'])})"
        ),
    ),
)


def robustness(results: list[dict]) -> str:
    """Per model and seed: the main statistic of each measured finding and whether the test's criterion holds."""
    cols = [c for c in ROBUST_COLUMNS if all(c[0] in m for m in results)]
    lines = [
        "| model | seed | " + " | ".join(c[1] for c in cols) + " | s |",
        "|" + "---|" * (3 + len(cols)),
    ]
    for m in results:
        lines.append(
            f"| {m['model']} | {m['seed']} | " + " | ".join(c[2](m[c[0]]) for c in cols) + f" | {m['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for seed in args.seeds:
        for name in args.models:
            m = measure(name, seed, args.findings)
            results.append(m)
            print(f"measured {name} seed {seed} in {m['seconds']:.0f} s", flush=True)
    first = [r for r in results if r["seed"] == args.seeds[0]]
    print(
        f"\nhook {h.HOOK}; eval text gsae-corpus seed {h.EVAL_SEED + args.seeds[0]}; "
        f"SAE training seed {args.seeds[0]}; holds = one-sided p < {h.ALPHA} and the effect-size floor\n"
    )
    print(table(first))
    if "a" in args.findings:
        print("\n(a) per length" + length_table(first))
    if "e" in args.findings:
        print(
            f"\n(e) steering: mean on-target Δp over the latents and the {h.STEER_OPTIONS['n_positions']} positions, "
            "per α" + steering_table(first)
        )
    if "b" in args.findings:
        b = {r["model"]: r["b"] for r in first}
        print(
            "\n(b) SAE: "
            + "; ".join(
                f"{n}: FVU {x['fvu']:.3f}, mean ε {x['epsilon_mean']:.2f} (median ‖x‖ {x['median_norm']:.2f}), "
                f"train {x['train_seconds']:.1f} s"
                for n, x in b.items()
            )
        )
    if "d" in first[0]:
        d = {r["model"]: r["d"] for r in first}
        print(
            "(d) SAEs: "
            + "; ".join(
                f"{n}: d_sae {x['d_sae']}, k {x['k']}, never fired g-SAE/TopK {x['never_fired']['gsae']}/"
                f"{x['never_fired']['topk']}, training-time dead g-SAE/TopK "
                f"{x['train_dead_fraction']['gsae']:.3f}/{x['train_dead_fraction']['topk']:.3f}, "
                f"{x['n_tokens']} eval tokens in batches of {x['batch_tokens']}"
                for n, x in d.items()
            )
        )
    if len(args.seeds) > 1:
        print("\nrobustness over seeds\n")
        print(robustness(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
