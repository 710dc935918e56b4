"""Rendering of :mod:`gsae.evals.latents` results: one self-contained HTML page and per-latent markdown.

The page has inline CSS and inline SVG only (no script, no font or CDN link), so it opens from disk with no
network. Token backgrounds are shaded by the latent's activation relative to its maximum (in the interval
examples too, so their shading compares with the top contexts'); the activating token of each context is outlined
and starts in the same column in all of a latent's contexts;
every token the latent fires on carries its activation as a small number (and all tokens as a hover title).
"""

from __future__ import annotations

import html

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:0 0 6px}
.meta{color:#555;margin:0 0 16px}
table{border-collapse:collapse;font-size:13px}
td,th{padding:2px 8px;text-align:left}th{border-bottom:1px solid #ccc}
.index td:nth-child(n+2){font-variant-numeric:tabular-nums}
.latent{background:#fff;border:1px solid #ddd;border-radius:6px;padding:14px 16px;margin:14px 0;
 box-shadow:0 1px 3px rgba(0,0,0,.08)}
.stats{color:#444;font-size:13px;margin-bottom:8px}
.row{display:flex;gap:28px;flex-wrap:wrap;align-items:flex-start;margin-bottom:8px}
.logits td{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
.logits .v{color:#666;text-align:right}
.pos th{color:#1a7f37}.neg th{color:#b42318}
.ctxs{display:grid;grid-template-columns:max-content max-content 1fr;overflow-x:auto}
.ctxs>div:not(.ctx){grid-column:1/-1}
.ctx{display:contents}
.ctx>span{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;line-height:2.1;white-space:nowrap;
 border-bottom:1px solid #f0f0f0}
.ctx .a{min-width:56px;color:#666;text-align:right;padding-right:10px}
.ctx .l{text-align:right}
.tok{white-space:pre;border-radius:2px;padding:1px 0}
.tok sub{font-size:9px;color:#7a3b00;margin-left:1px}
.tok.mark{outline:2px solid #c2410c;font-weight:600}
.sp{color:#999}
.ivs{margin-top:12px}
.ivh{font-size:13px;color:#333;margin:8px 0 0;padding:2px 6px;background:#f4f4f4;border-left:3px solid #ea7a2c}
.none{font-size:12.5px;color:#777;padding:2px 0}
svg text{font-family:system-ui,sans-serif;font-size:10px;fill:#444}
"""


def _esc(s: str) -> str:
    return html.escape(s, quote=True)


def _visible(tok: str) -> str:
    """Make whitespace-only and control characters visible: newlines as ``↵``, tabs as ``⇥``."""
    return tok.replace("\r", "").replace("\n", "↵").replace("\t", "⇥")


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def histogram_svg(edges: list[float], counts: list[int], width: int = 300, height: int = 130) -> str:
    """An inline SVG bar chart with labelled axes (x: activation, y: tokens)."""
    ml, mr, mt, mb = 38, 18, 8, 30
    w, h = width - ml - mr, height - mt - mb
    top = max(max(counts), 1)
    lo, hi = edges[0], edges[-1]
    span = hi - lo or 1.0
    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="activation histogram">']
    for c, a, b in zip(counts, edges[:-1], edges[1:]):
        if c:
            x0, x1 = ml + (a - lo) / span * w, ml + (b - lo) / span * w
            bh = c / top * h
            parts.append(f'<rect x="{x0:.1f}" y="{mt + h - bh:.1f}" width="{max(x1 - x0 - 0.5, 0.5):.1f}" '
                         f'height="{bh:.1f}" fill="#ea7a2c"/>')
    parts.append(f'<line x1="{ml}" y1="{mt + h}" x2="{ml + w}" y2="{mt + h}" stroke="#888"/>')
    parts.append(f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{mt + h}" stroke="#888"/>')
    for v in (lo, (lo + hi) / 2, hi):
        x = ml + (v - lo) / span * w
        parts.append(f'<line x1="{x:.1f}" y1="{mt + h}" x2="{x:.1f}" y2="{mt + h + 3}" stroke="#888"/>')
        parts.append(f'<text x="{x:.1f}" y="{mt + h + 13}" text-anchor="middle">{_fmt(v)}</text>')
    parts.append(f'<text x="{ml - 4}" y="{mt + 8}" text-anchor="end">{top}</text>')
    parts.append(f'<text x="{ml - 4}" y="{mt + h}" text-anchor="end">0</text>')
    parts.append(f'<text x="{ml + w / 2:.1f}" y="{height - 3}" text-anchor="middle">activation</text>')
    parts.append(f'<text x="10" y="{mt + h / 2:.1f}" text-anchor="middle" '
                 f'transform="rotate(-90 10 {mt + h / 2:.1f})">tokens</text>')
    parts.append("</svg>")
    return "".join(parts)


def _context_html(ctx: dict, max_act: float) -> str:
    spans = []
    for k, (tok, a) in enumerate(zip(ctx["tokens"], ctx["acts"])):
        alpha = min(abs(a) / max_act, 1.0) * 0.85 if max_act > 0 else 0.0
        cls = "tok mark" if k == ctx["marked"] else "tok"
        style = f' style="background:rgba(234,122,44,{alpha:.2f})"' if a else ""
        text = _visible(tok)
        body = _esc(text) if text.strip() else f'<span class="sp">{_esc(text.replace(" ", "·")) or "∅"}</span>'
        sub = f"<sub>{_fmt(a)}</sub>" if a else ""
        spans.append(f'<span class="{cls}"{style} title="activation {a:.4g}">{body}{sub}</span>')
    m = ctx["marked"]
    # three grid cells (activation, the context before, the activating token and after) in the latent's one
    # ``.ctxs`` grid, whose columns fit the widest row: every activating token starts in the same column
    return (f'<div class="ctx"><span class="a">{_fmt(ctx["acts"][m])}</span><span class="l">{"".join(spans[:m])}</span>'
            f'<span class="r">{"".join(spans[m:])}</span></div>')


def _interval_head(k: int, n: int, group: dict) -> str:
    top = group.get("n_top", 0)
    return (f"{k + 1}/{n} · activations {_fmt(group['lo'])}–{_fmt(group['hi'])} · "
            f"{group['n_tokens']:,} token{'s' if group['n_tokens'] != 1 else ''}"
            + (f", {top:,} of them among the top above" if top else ""))


def _all_top(entry: dict, result: dict) -> str:
    """The line shown instead of the intervals when every token the latent fired on is a top context ("" when
    intervals are off or it never fired)."""
    if entry.get("intervals") or not result["setup"].get("n_intervals") or not entry["n_fires"]:
        return ""
    return f"random examples across its activations: none, all its {entry['n_fires']:,} tokens are among the top above"


def _intervals_html(entry: dict, result: dict) -> str:
    """Each activation interval's random examples under a header, highest interval first."""
    groups = entry.get("intervals") or []
    if not groups:
        none = _all_top(entry, result)
        return f'<div class="none">{_esc(none)}</div>' if none else ""
    parts = ['<div class="ivs"><b>random examples across its activations</b> (intervals holding equal numbers of '
             "its tokens, highest first; top tokens excluded)</div>"]
    for k, g in enumerate(groups):
        parts.append(f'<div class="ivh">Interval {_interval_head(k, len(groups), g)}</div>')
        empty = "no tokens in this interval" if not g["n_tokens"] else "all its tokens are among the top ones above"
        parts.append("".join(_context_html(c, entry["max_act"]) for c in g["contexts"])
                     or f'<div class="none">{empty}</div>')
    return "".join(parts)


def _logits_html(entry: dict) -> str:
    if entry["promoted"] is None:
        return '<div class="logits"><i>no logit lens (the hook is not on the residual stream)</i></div>'
    tables = []
    for key, cls, title in (("promoted", "pos", "promotes"), ("suppressed", "neg", "suppresses")):
        rows = "".join(f"<tr><td>{_esc(repr(s))}</td><td class=v>{v:+.3f}</td></tr>" for s, v in entry[key])
        tables.append(f'<table class="{cls}"><tr><th colspan=2>{title} (W_dec·W_U)</th></tr>{rows}</table>')
    return f'<div class="logits row">{"".join(tables)}</div>'


def _stats(entry: dict, result: dict) -> str:
    s = (f"density {entry['density']:.3%} ({entry['n_fires']} of {result['n_tokens']} tokens) · "
         f"max activation {_fmt(entry['max_act'])} · mean {_fmt(entry['mean_act'])}")
    if entry["mean_beta_attribution"] is not None:
        s += f" · mean β·|W_dec∇ₓL| {_fmt(entry['mean_beta_attribution'])}"
    return s


def render_html(result: dict, about: str = "") -> str:
    """The whole dashboard page; ``about``: which SAE it is of (the title and the line under the heading)."""
    setup = result["setup"]
    kind = "g-SAE" if setup["gsae"] else "SAE"
    index_rows = []
    cards = []
    for e in result["latents"]:
        lid = e["latent"]
        top = ", ".join(_esc(repr(s)) for s, _ in (e["promoted"] or [])[:4])
        attr = "" if e["mean_beta_attribution"] is None else f"<td>{_fmt(e['mean_beta_attribution'])}</td>"
        index_rows.append(f'<tr><td><a href="#latent-{lid}">{lid}</a></td><td>{e["density"]:.3%}</td>'
                          f'<td>{_fmt(e["max_act"])}</td>{attr}<td>{top}</td></tr>')
        contexts = "".join(_context_html(c, e["max_act"]) for c in e["contexts"]) or "<div><i>never fires here</i></div>"
        cards.append(
            f'<section class="latent" id="latent-{lid}"><h2>Latent {lid}</h2>'
            f'<div class="stats">{_stats(e, result)}</div>'
            f'<div class="row"><div>{histogram_svg(e["hist"]["edges"], e["hist"]["counts"])}</div>'
            f"{_logits_html(e)}</div>"
            f"<div><b>top {len(e['contexts'])} activating tokens</b> (outlined; numbers: activation)</div>"
            f'<div class="ctxs">{contexts}{_intervals_html(e, result)}</div></section>'
        )
    attr_head = "<th>mean β·|W_dec∇ₓL|</th>" if setup["gsae"] else ""
    head = (f"<tr><th>latent</th><th>density</th><th>max act</th>{attr_head}<th>promotes</th></tr>")
    meta = (f"{kind} at <code>{_esc(setup['hook'])}</code> · {result['n_alive']} of {setup['d_sae']} latents alive "
            f"on {result['n_tokens']} held-out tokens · {result['n_latents']} latents shown (seed {setup['seed']})")
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Latents · {_esc(about or setup['hook'])}</title><style>{CSS}</style></head><body>"
        f'<h1>Latent dashboard</h1>{f"<p class=meta><b>{_esc(about)}</b></p>" if about else ""}<p class="meta">{meta}</p>'
        f'<table class="index">{head}{"".join(index_rows)}</table>{"".join(cards)}</body></html>\n'
    )


# TensorBoard renders text with Python-Markdown (then sanitises the HTML): backslash escapes work only for its
# escapable characters; ``<``, ``>``, ``&`` and ``|`` (table cells) become entities
_MD_SPECIAL = str.maketrans({**{c: "\\" + c for c in "\\`*_{}[]()#+-.!"},
                             "<": "&lt;", ">": "&gt;", "&": "&amp;", "|": "&#124;"})


def _md(tok: str, bold: bool = False) -> str:
    """A token as markdown text; ``bold`` keeps its leading space outside ``**`` (else it would not render bold). A
    whitespace-only token shows its spaces as ``·`` (the HTML dashboard's way): HTML collapses them (to nothing
    between two others' spaces), so a run of space tokens vanished from TensorBoard's cards."""
    text = _visible(tok).translate(_MD_SPECIAL)
    if text and not text.strip():
        text = text.replace(" ", "·")
    if not bold:
        return text
    core = text.lstrip(" ")
    return text[: len(text) - len(core)] + (f"**{core}**" if core else "**·**")


def render_markdown(entry: dict, result: dict) -> str:
    """One latent for TensorBoard's text dashboard: stats, logit lens, a table of its top contexts and one line per
    activation interval with its examples (a shorter window: the activating token, 4 before and 1 after)."""
    lines = [f"### latent {entry['latent']}", "", _stats(entry, result), ""]
    if entry["promoted"] is not None:
        for key, title in (("promoted", "promotes"), ("suppressed", "suppresses")):
            # quoted, as in the HTML: Markdown drops a token's leading space (' from' showed as 'from')
            lines.append(f"**{title}:** " + ", ".join(f"{_md(repr(s))} ({v:+.2f})" for s, v in entry[key]))
            lines.append("")
    lines += ["| activation | context (activating token in **bold**) |", "|---:|:---|"]
    for c in entry["contexts"]:
        toks = [_md(t, bold=k == c["marked"]) for k, t in enumerate(c["tokens"])]
        lines.append(f"| {_fmt(c['acts'][c['marked']])} | {''.join(toks)} |")
    groups = entry.get("intervals") or []
    none = _all_top(entry, result)
    if groups:
        lines += ["", "**random examples by activation interval** (highest first):", ""]
    elif none:
        lines += ["", none]
    for k, g in enumerate(groups):
        shown = []
        for c in g["contexts"]:
            m = c["marked"]
            toks = [_md(t, bold=n == m) for n, t in enumerate(c["tokens"]) if m - 4 <= n <= m + 1]
            shown.append(f"…{''.join(toks)}… ({_fmt(c['acts'][m])})")
        lines.append(f"- **{_interval_head(k, len(groups), g)}:** " + (" · ".join(shown) or "no other tokens"))
    return "\n".join(lines)
