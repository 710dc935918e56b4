"""``evaluate.py``: run benchmarks on trained SAEs and compare them side by side.

    python evaluate.py PATH [PATH ...] [--benchmarks loss_added,dead_latents,...] [--n-seqs N]
        [--context-size 128] [--batch-size 8] [--seed 0] [--device cpu] [--dataset synthetic|HF|files] [--text-column text]
        [--model NAME] [--options JSON] [--output FILE.json] [--logdir DIR]

PATH is a gsae ``.ckpt`` (a sweep's: every member, or ``CKPT:MEMBER`` for one); a run folder (every ``**/*.ckpt`` under it, ``.saelens`` exports skipped, and
``last*.ckpt`` skipped when another checkpoint there has the same global step); a SAELens-format folder
(``cfg.json`` + ``sae_weights.safetensors``); or ``sae_lens:RELEASE/SAE_ID`` (a pretrained SAELens SAE).
The LM comes from the checkpoint (``meta["lm"]``) or the SAELens metadata (``model_name`` +
``model_from_pretrained_kwargs``); ``--model`` overrides its name. SAEs on the same LM are evaluated on
the same held-out tokens: the first validation contexts of ``--dataset`` (default: the
dataset a checkpoint or gsae's SAELens export was trained on, else ``synthetic`` for ``random-*`` models, else OpenWebText).
Settings: gsae checkpoints that record the same evaluation settings (one run's: benchmarks, ``n_seqs``, options, seed,
:meth:`gsae.callbacks.EvaluationCallback.settings`) are evaluated with them, so their ``.eval.json`` comes out again;
the command line overrides them (``--options`` merged per benchmark). Other sources get the defaults below.
How many (:func:`gsae.evals.held_out_counts`, as the training callback): by default 64 per benchmark, except
``dead_latents``, which reads as many as the paper's window needs (g-SAE Table 1: 5 batches of 4096 tokens, special
tokens not counted; 162+ contexts of 128), so that its headline ``dead_fraction_batches`` is computed;
``--options '{"<benchmark>": {"n_seqs": N}}'`` sets one benchmark's count; ``--n-seqs N`` reads N, which every
benchmark uses (or its own ``n_seqs`` if smaller).

Prints one column per SAE (rows ``benchmark.metric``) and the held-out tokens behind them; ``--output`` writes
``{"settings": {...}, "results": {benchmark: {sae: result}}}`` (``settings``: the benchmarks, their options, seed, device, versions,
and per SAE its source, LM, hook, dataset, context size and the contexts each benchmark read) and, for benchmarks
that define ``artifacts``, ``<output stem>.<sae><suffix>`` files beside it; ``--logdir`` writes
TensorBoard scalars, figures and texts, one run per PATH (named by its path from the current folder). Every SAE on
the same LM gets the same tokens and the same seeded draws, so the columns are comparable. Bad input: one line on
stderr, exit 1.

``torchrun --nproc-per-node N evaluate.py …``: each checkpoint's evaluation split between the N processes (a GPU each,
``cuda:<LOCAL_RANK>``), as the training callback splits it (:func:`gsae.evals.run_split`); rank 0 prints and writes
what the command without torchrun would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from gsae.allocator import tune_malloc
from gsae.callbacks.evaluation import SETTINGS_KEY
from gsae.evals import (
    BENCHMARKS,
    DEFAULT_N_SEQS,
    N_SEQS_OPTION,
    OPT_IN,
    about_sae,
    artifacts,
    check_benchmarks,
    check_options,
    held_out_counts,
    json_text,
    run_benchmarks,
    run_options,
    scalars,
    settings_of,
    tagged_figures,
    tagged_scalars,
    tagged_texts,
    tokens_per_benchmark,
)
from gsae.evals.common import shared_harvests
from gsae.files import unwritable, write_text
from gsae.lm import LanguageModel
from gsae.saelens_adapter import PRETRAINED, is_saelens_folder, load_saelens_folder, load_saelens_pretrained
from gsae.startup import log_to_terminal, one_line_warnings

log = logging.getLogger(__name__)


class Source(NamedTuple):
    """One SAE to evaluate.

    Attributes:
        label: its name in the table, the JSON and TensorBoard.
        kind: ``ckpt``, ``saelens`` or ``pretrained``.
        path: file, folder or ``sae_lens:`` spec to load.
        group: the PATH argument it came from (one TensorBoard run per group, steps on the x axis).
        step: global step of a checkpoint (0 otherwise).
        dataset: the dataset a checkpoint was trained on, if recorded.
        batch_size: the training batch size (contexts per device) of a checkpoint, if recorded.
        member: the SAE's name inside a sweep checkpoint (``gsae.systems.SweepSAESystem``); None otherwise.
        hook: a sweep member's hook, as its checkpoint records it (the members of one checkpoint share the LM's
            passes at all their hooks); None otherwise.
        evaluation: the evaluation settings the training run used, as a checkpoint records them
            (:meth:`gsae.callbacks.EvaluationCallback.settings`); None if it records none.
        data: the data options of a checkpoint's run that decide its held-out contexts (:data:`TOKEN_OPTIONS`:
            ``text_unit``, ``text_column``, ``val_documents``, ...); None if it records none.
    """

    label: str
    kind: str
    path: str
    group: str
    step: int = 0
    dataset: str | None = None
    batch_size: int | None = None
    member: str | None = None
    hook: str | None = None
    evaluation: dict | None = None
    data: dict | None = None


#: the data options, besides the dataset, context size and BOS, that decide a run's held-out contexts: recorded by
#: checkpoints and gsae's SAELens exports, and applied when evaluating on the dataset the SAE was trained on
TOKEN_OPTIONS = ("dataset_config", "split", "val_split", "val_documents", "text_column", "text_unit", "separator",
                 "seed", "streaming")


def recorded_token_options(data: dict | None) -> dict:
    """The :data:`TOKEN_OPTIONS` a run's data description records (those it sets)."""
    return {k: data[k] for k in TOKEN_OPTIONS if isinstance(data, dict) and data.get(k) is not None}


class ArgumentError(ValueError):
    """A command-line error (reported as one line, exit code 1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would exit with code 2 and a usage block
        raise ArgumentError(message)


def build_parser() -> argparse.ArgumentParser:
    intro, _, rest = __doc__.partition("\n\n")
    p = _Parser(
        prog="evaluate.py", description=intro, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # --out / --bench would silently mean --output / --benchmarks, and break on a new option
    )
    p.add_argument(
        "paths", nargs="+", metavar="PATH", help="checkpoint, run folder, SAELens folder or sae_lens:RELEASE/SAE_ID"
    )
    p.add_argument(
        "--benchmarks", default=None, help=f"comma-separated, from {', '.join(BENCHMARKS)} (default: the run's, else all available)"
    )
    p.add_argument(
        "--n-seqs",
        type=int,
        default=None,
        help=f"held-out contexts to read, every benchmark's (or its --options n_seqs if smaller); default: the run's, "
        f"else each "
        f"benchmark its own n_seqs, else {DEFAULT_N_SEQS}, and dead_latents as many as its window of 5 x 4096 "
        "tokens needs",
    )
    p.add_argument(
        "--context-size",
        type=int,
        default=None,
        help="tokens per context (default: the SAE's, else 128, capped at n_ctx)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="sequences per forward pass (default: a checkpoint's training batch size, else 8); memory only: a g-SAE's "
        "gradient is scaled by the CE-mean token count it was trained with (grad_mean_tokens), not by this batch",
    )
    p.add_argument("--seed", type=int, default=None, help="seed of the benchmarks' samples (default: the run's, else 0)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--dataset",
        default=None,
        help="'synthetic', a HF dataset or local files (default: the training dataset of a checkpoint or of gsae's "
        "SAELens export, else synthetic for "
        "random-* models, else Skylion007/openwebtext)",
    )
    p.add_argument(
        "--text-column",
        default=None,
        help="the column of --dataset's text (default: the run's, else 'text'; a pretokenized 'input_ids' column is "
        "used as it is)",
    )
    p.add_argument("--model", default=None, help="override the language model name")
    p.add_argument(
        "--options", default=None, help='per-benchmark options as JSON, e.g. \'{"steering": {"n_latents": 64}}\''
    )
    p.add_argument("--output", default=None, help='write {"settings": ..., "results": {benchmark: {sae: result}}} JSON here')
    p.add_argument(
        "--logdir",
        default=None,
        help="write TensorBoard scalars and figures here (one run per PATH, named by its path from the current folder; "
        "a run folder's checkpoints are its steps)",
    )
    return p


# ---------------------------------------------------------------------- finding SAEs
def resolve(paths: list[str]) -> list[Source]:
    """Expand every PATH into the SAEs it names (see the module docstring)."""
    sources: list[Source] = []
    for arg in paths:
        if arg.startswith(PRETRAINED):
            sources.append(Source(arg, "pretrained", arg, arg))
            continue
        p, member = Path(arg), None
        if not p.exists() and ":" in arg and Path(arg.rpartition(":")[0]).is_file():  # CKPT:MEMBER, one sweep member
            p, member = Path(arg.rpartition(":")[0]), arg.rpartition(":")[2]
        if not p.exists():
            raise ArgumentError(f"PATH {arg!r}: no such file or directory")
        if member is not None:
            info = _ckpt_info(p)
            if not info[3] or member not in info[3]:
                what = f"its members are {', '.join(info[3])}" if info[3] else "it is not a sweep's (no members)"
                raise ArgumentError(f"PATH {arg!r}: no member {member!r} in {p}; {what}")
            sources += [s for s in _ckpt_sources(str(p), p, str(p), info) if s.member == member]
            continue
        if p.is_dir() and (p / "cfg.json").is_file() and not is_saelens_folder(p):
            raise ArgumentError(f"PATH {arg!r}: a SAELens folder (cfg.json) without sae_weights.safetensors")
        if is_saelens_folder(p):
            sources.append(Source(arg, "saelens", arg, arg, evaluation=_export_evaluation(p)))
        elif p.is_file():
            sources += _ckpt_sources(arg, p, arg, _ckpt_info(p))
        else:
            found = _run_folder(p)
            if not found:
                raise ArgumentError(f"PATH {arg!r}: no .ckpt files and no SAELens cfg.json in this folder")
            for c, info in found:
                sources += _ckpt_sources(str(Path(arg) / c.relative_to(p)), c, arg, info)
    return sources


def _export_evaluation(folder: Path) -> dict | None:
    """The run's evaluation settings a gsae SAELens export records (``metadata.gsae.evaluation``), so it is evaluated
    as its checkpoint is; None for other SAELens folders (and unreadable ones: :func:`_check_readable` names them)."""
    try:
        found = ((json.loads((folder / "cfg.json").read_text()).get("metadata") or {}).get("gsae") or {}).get("evaluation")
    except (ValueError, OSError, AttributeError):
        return None
    return found if isinstance(found, dict) else None


def _check_readable(arg: str, path: Path) -> None:
    """A checkpoint or SAELens folder named as a PATH that does not read (a copy cut short, a file of another kind)
    stops the call before any evaluation: the PATHs before it were evaluated in full, then all was lost."""
    from safetensors import SafetensorError, safe_open

    from gsae.export import load_members

    try:
        if path.is_dir():  # a SAELens folder: the config and the weights' header
            try:
                json.loads((path / "cfg.json").read_text())
            except ValueError as e:
                raise ArgumentError(f"PATH {arg!r}: cfg.json does not read as JSON ({e})") from None
            with safe_open(str(path / "sae_weights.safetensors"), "pt") as f:
                f.keys()
        else:
            load_members(path, mmap=True)
    except SafetensorError as e:
        raise ArgumentError(f"PATH {arg!r}: sae_weights.safetensors does not read ({e})") from None
    except ArgumentError:
        raise
    except (ValueError, OSError, RuntimeError) as e:
        text = str(e).strip()
        raise ArgumentError(f"PATH {arg!r}: {text.splitlines()[0] if text else type(e).__name__}") from None


def _ckpt_sources(label: str, path: Path, group: str, info: tuple) -> list[Source]:
    """One source for a one-SAE checkpoint; one per member (``<label>:<member>``, its own TensorBoard run) for a
    sweep. ``info`` is the checkpoint's :func:`_ckpt_info` (read once per file)."""
    step, dataset, batch_size, members, evaluation, data = info
    if not members:
        return [Source(label, "ckpt", str(path), group, step, dataset, batch_size, evaluation=evaluation, data=data)]
    return [Source(f"{label}:{m}", "ckpt", str(path), f"{group}:{m}", step, dataset, batch_size, m, hook, evaluation,
                   data) for m, hook in members.items()]


def _run_folder(folder: Path) -> list[tuple[Path, tuple]]:
    """``(checkpoint, its _ckpt_info)`` under ``folder``, in step order; ``last*.ckpt`` dropped when it repeats a
    step checkpoint, and those a resume from an earlier step set aside (``*.superseded-after-step<S>``: another
    continuation of the run, not its history)."""
    found = sorted((c for c in folder.rglob("*.ckpt") if c.exists()
                    and not any(".superseded-after-step" in part for part in c.relative_to(folder).parts)),
                   key=lambda c: c.name.startswith("last"), reverse=True)
    ckpts = sorted({c.resolve(): c for c in found}.values())  # last.ckpt linked to a step checkpoint: by its name
    infos = {c: _ckpt_info(c) for c in ckpts}
    named = {info[0] for c, info in infos.items() if not c.name.startswith("last")}
    keep = [c for c in ckpts if not (c.name.startswith("last") and infos[c][0] in named)]
    return [(c, infos[c]) for c in sorted(keep, key=lambda c: (infos[c][0], c.name))]


def _ckpt_info(path: Path) -> tuple[int, str | None, int | None, dict[str, str | None] | None, dict | None, dict]:
    """``(global_step, training dataset, training batch size, {sweep member: its hook} or None, the run's evaluation
    settings or None, its recorded data options)`` of a checkpoint (``(0, None, None, None, None, {})`` if unreadable:
    loading reports it). The data options come from the run's data description (``gsae`` section) and, for
    checkpoints written before it held them all, from the data module's saved stream options."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        data = ckpt.get("TokenDataModule") or {}
        members = (ckpt.get("gsae") or {}).get("members")
        hooks = members and {m: meta.get("hook") if isinstance(meta, dict) else None for m, meta in members.items()}
        evaluation = ckpt.get(SETTINGS_KEY)
        gsae = ckpt.get("gsae") or {}
        described = gsae.get("data") or next((m.get("data") for m in (members or {}).values()
                                              if isinstance(m, dict) and m.get("data")), None) or {}
        options = {**(data.get("position_options") or {}), "text_unit": data.get("text_unit"), **described}
        return (int(ckpt.get("global_step", 0)), data.get("dataset"), data.get("batch_size"), hooks,
                evaluation if isinstance(evaluation, dict) else None, recorded_token_options(options))
    except Exception:  # noqa: BLE001
        return 0, None, None, None, None, {}


def load(src: Source, device: str, model: str | None):
    """``(sae, meta)`` of a source; ``meta`` has ``hook``, ``lm`` (LanguageModel kwargs) and maybe ``context_size``."""
    if src.kind == "pretrained":
        return load_saelens_pretrained(src.path, device, model)
    if src.kind == "saelens":
        sae, meta = load_saelens_folder(src.path, device, model)
        if str(meta.get("sae_class") or "").endswith("GradTopKSAE"):
            log.warning("%s is a g-SAE's SAELens export: SAELens has no gradient-weighted selection, so it encodes as "
                        "the plain TopK SAE of its weights (β = 0); evaluate its .ckpt for the g-SAE itself", src.label)
        return sae, meta
    from gsae.export import load_checkpoint

    try:
        sae, meta = load_checkpoint(src.path, member=src.member, mmap=True)  # its own weights only, of a sweep too
    except ValueError as e:
        raise ArgumentError(f"PATH {src.label!r}: {e}") from None
    lm = dict(meta["lm"], **({"name": model} if model else {}))
    data = meta.get("data") or {}
    return sae.to(device), {
        **meta,
        "lm": lm,
        "context_size": data.get("context_size"),
        "prepend_bos": data.get("prepend_bos", True) is not False,
    }


# ---------------------------------------------------------------------- tokens
def held_out_tokens(
    lm: LanguageModel, dataset: str, context_size: int, n_seqs: int, prepend_bos: bool = True,
    text_column: str = "text", **options,
) -> torch.Tensor:
    """``(n, T)``: ``n_seqs`` validation contexts of ``dataset``, spread over its held-out set as training's evaluation
    takes them (``TokenDataModule.evaluation_contexts``), BOS first unless the SAE was trained without
    (``prepend_bos``: SAELens metadata, e.g. False for OpenAI v5); ``options``: the run's other
    :data:`TOKEN_OPTIONS` (``text_unit``, ``val_documents``, ...)."""
    from gsae.data import TokenDataModule

    if context_size > lm.n_ctx:
        raise ArgumentError(f"--context-size ({context_size}) exceeds the model's n_ctx ({lm.n_ctx}) for {lm.name!r}")
    try:
        dm = TokenDataModule(lm=lm, dataset=dataset, context_size=context_size, prepend_bos=prepend_bos,
                             text_column=text_column, **options)
        dm.validate()
        ctx = dm.evaluation_contexts(n_seqs)
    except ValueError as e:
        text = str(e)
        for ours, theirs in (("--data.dataset", "--dataset"), ("--data.context_size", "--context-size"),
                             ("--data.text_column", "--text-column")):
            text = text.replace(ours, theirs)
        raise ArgumentError(text) from None
    if not ctx:
        raise ArgumentError(f"--dataset {dataset!r}: no validation contexts")
    return torch.tensor(ctx, dtype=torch.long)


# ---------------------------------------------------------------------- output
def table(results: dict[str, dict[str, dict]], labels: list[str]) -> str:
    """Rows ``benchmark.metric``, one column per SAE; the numbers a benchmark lists as its ``SETTINGS`` (token counts,
    window sizes, how many latents it drew) after the metrics, under a line saying so, not among them."""
    rows, setting_rows = [], []
    for bench, per_sae in results.items():
        names = list(dict.fromkeys(k for r in per_sae.values() for k in scalars(r)))
        settings = settings_of(bench)
        for k in names:
            row = (f"{bench}.{k}", [scalars(per_sae[lb]).get(k) if lb in per_sae else None for lb in labels])
            (setting_rows if k in settings else rows).append(row)
    width = max([len(r[0]) for r in rows + setting_rows] + [6])
    cols = [max(12, len(lb)) for lb in labels]
    lines = [" ".join([" " * width, *(lb.rjust(c) for lb, c in zip(labels, cols))])]
    for name, vals in rows + ([("settings and counts:", None)] if setting_rows else []) + setting_rows:
        if vals is None:
            lines.append(name)
            continue
        cells = ["" if v is None else f"{v:.6g}" for v in vals]
        lines.append(" ".join([name.ljust(width), *(s.rjust(c) for s, c in zip(cells, cols))]))
    return "\n".join(lines)


def tokens_line(saes: dict[str, dict], short: dict[str, str]) -> str:
    """Under the table: the held-out tokens behind its numbers, e.g. ``tokens: synthetic, contexts of 128
    (dead_latents 165, loss_added 64)``; one line per distinct set, naming its SAEs when they differ."""
    sets: dict[str, list[str]] = {}
    defaults = _token_defaults()
    for lb, s in saes.items():
        counts = ", ".join(f"{b} {n}" for b, n in s["contexts"].items())
        bos = "" if s["prepend_bos"] else ", no BOS"
        data = "".join(f", {k} {v}" for k, v in (s.get("data_options") or {}).items() if v != defaults.get(k))
        sets.setdefault(f"{s['dataset']}{data}, contexts of {s['context_size']}{bos} ({counts})", []).append(
            short.get(lb, lb))
    if len(sets) == 1:
        return f"tokens: {next(iter(sets))}"
    return "\n".join(f"tokens of {', '.join(who)}: {what}" for what, who in sets.items())


def _token_defaults() -> dict:
    """``TokenDataModule``'s defaults of the :data:`TOKEN_OPTIONS` (the tokens line names the others)."""
    import inspect

    from gsae.data import TokenDataModule

    params = inspect.signature(TokenDataModule.__init__).parameters
    return {k: params[k].default for k in TOKEN_OPTIONS if k in params}


def short_labels(labels: list[str]) -> dict[str, str]:
    """Labels with their common leading folder removed (for the table and TensorBoard run names)."""
    paths = [lb for lb in labels if not lb.startswith(PRETRAINED)]
    if not paths:
        return {lb: lb for lb in labels}
    common = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    return {lb: lb if lb.startswith(PRETRAINED) else os.path.relpath(os.path.abspath(lb), common) for lb in labels}


def tensorboard_runs(groups: list[str]) -> dict[str, str]:
    """Each PATH's TensorBoard run under ``--logdir``: its path relative to the current directory (absolute when
    outside it), ``sae_lens:`` names as given. It does not depend on the other PATHs of the call, as the table's
    :func:`short_labels` do: a run named relative to their common folder made a lone ``last.ckpt`` the run
    ``last.ckpt``, so another call's ``last.ckpt`` of another SAE drew on the same curve, and one SAE evaluated alone
    and beside another got two runs."""
    def name(group: str) -> str:
        if group.startswith(PRETRAINED):
            return group
        absolute = os.path.abspath(group)
        relative = os.path.relpath(absolute)
        return absolute if relative == ".." or relative.startswith(".." + os.sep) else relative
    return {g: name(g) for g in groups}


class TensorBoardOut:
    """``--logdir``: each SAE's scalars ``eval/<benchmark>/<metric>``, figures and texts in its TensorBoard run.

    One ``SummaryWriter`` per run for the whole call, so a run's steps lie in one event file in the order written.
    (A writer per checkpoint made files named ``…<second>.<host>.<pid>.<n>`` with ``n`` counting writers in the
    process: two made in one second across a digit, ``…9`` and ``…10``, sort in the wrong order, and TensorBoard reads
    a run's files in name order, so the steps came back as [10, 5].) What earlier evaluations wrote in the run's
    older files at the steps written now, for the benchmarks run now, is dropped when the writers close — also after
    an error or Ctrl+C, and only for the steps written, so an interrupted call loses no earlier value — so evaluating
    again replaces a point rather than adding a second; the other benchmarks' values stay. Each older file is read
    once per call (it used to be re-read for every checkpoint)."""

    def __init__(self, logdir: str | None, benchmarks: list[str]):
        self.logdir = Path(logdir or ".")  # None: nothing is written (no --logdir)
        self.prefix = tuple(f"eval/{b}/" for b in benchmarks)
        self.writers: dict[str, object] = {}
        self.older: dict[str, list[Path]] = {}
        self.steps: dict[str, set[int]] = {}

    def write(self, run: str, step: int, results: dict[str, dict]) -> None:
        """One SAE's ``results`` (``{benchmark: result}``) at ``step`` of the TensorBoard run ``run``."""
        from torch.utils.tensorboard import SummaryWriter

        from gsae.loggers import event_files

        if run not in self.writers:
            folder = self.logdir / _safe(run)
            self.older[run] = event_files(folder) if folder.is_dir() else []
            self.writers[run], self.steps[run] = SummaryWriter(str(folder)), set()
        w = self.writers[run]
        for tag, v in tagged_scalars(results).items():
            w.add_scalar(tag, v, step)
        for tag, fig in tagged_figures(results).items():
            w.add_figure(tag, fig, step, close=False)
        for tag, text in tagged_texts(results).items():
            w.add_text(tag, text, step)
        w.flush()
        self.steps[run].add(step)

    def close(self) -> None:
        from gsae.loggers import drop_events

        for run, w in self.writers.items():
            w.close()
            drop_events(self.older[run], at=self.steps[run], prefix=self.prefix)
        self.writers.clear()

    def __enter__(self) -> TensorBoardOut:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _safe(name: str) -> str:
    return re.sub(r"[^\w.=-]+", "_", name).strip("_") or "sae"


def write_artifacts(output: str, results: dict[str, dict[str, dict]], short: dict[str, str],
                    abouts: dict[str, str] | None = None) -> list[Path]:
    """Files of benchmarks that define ``artifacts``, next to ``--output``: ``<output stem>.<sae><suffix>``
    (``abouts``: each SAE's line naming it, :func:`gsae.evals.about_sae`; default its label)."""
    out, written = Path(output), []
    labels = list(dict.fromkeys(lb for per in results.values() for lb in per))
    for lb in labels:
        per_sae = {b: per[lb] for b, per in results.items() if lb in per}
        for suffix, content in artifacts(per_sae, (abouts or {}).get(lb, lb)).items():
            path = out.with_name(f"{out.stem}.{_safe(short.get(lb, lb))}{suffix}")
            write_text(path, content)
            written.append(path)
    return written


# ---------------------------------------------------------------------- main
def _device(name: str | None) -> str:
    """``--device`` checked before any work (default: cuda if available, else cpu). Under torchrun, ``cuda`` (or
    the default) is each process's own GPU, ``cuda:<LOCAL_RANK>``."""
    local = os.environ.get("LOCAL_RANK") if _ranks()[1] > 1 else None
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message lists its 20 device types, most of which no machine here has
        raise ArgumentError(f"--device {name!r}: not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError(f"--device {name!r}: this machine has no CUDA GPU (use --device cpu)")
    if device.type == "cuda" and device.index is None and local is not None:
        return f"cuda:{local}"
    return name


def _ranks() -> tuple[int, int]:
    """``(rank, world size)`` of the process group :func:`main` sets up under torchrun; ``(0, 1)`` otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _agree(error: BaseException | None) -> None:
    """Under torchrun: raise on every rank if any rank's ``error`` (loading an SAE, its LM or the held-out tokens)
    is set, so none waits for it at the next gather; the rank's own error where it has one."""
    rank, world = _ranks()
    if world == 1:
        if error is not None:
            raise error
        return
    messages: list[str | None] = [None] * world
    torch.distributed.all_gather_object(messages, None if error is None else str(error).strip().splitlines()[0])
    if error is not None:
        raise error
    failed = next(((r, m) for r, m in enumerate(messages) if m is not None), None)
    if failed is not None:
        raise RuntimeError(f"rank {failed[0]} failed: {failed[1]}")


@contextlib.contextmanager
def _together() -> Iterator[None]:
    """Run the block on every rank and :func:`_agree` on its outcome: a load error (``ValueError``, ``OSError``,
    ``RuntimeError``, as :func:`main` reports them) raised on every rank, so none waits for the failed one."""
    error = None
    try:
        yield
    except (ValueError, OSError, RuntimeError) as e:
        error = e
    _agree(error)


def _check_outputs(args: argparse.Namespace) -> None:
    """``--output`` and ``--logdir`` checked before any work (the JSON used to fail after the whole evaluation)."""
    if args.output:
        out = Path(args.output)
        if out.is_dir():
            raise ArgumentError(f"--output {args.output!r} is a folder; give a file, e.g. {out / 'eval.json'}")
        why = unwritable(out.parent)
        if why is not None:
            raise ArgumentError(f"--output {args.output!r}: {why}")
    why = unwritable(args.logdir) if args.logdir else None  # also a --logdir that is a file
    if why is not None:
        raise ArgumentError(f"--logdir {args.logdir!r}: {why}")


class Evaluation(NamedTuple):
    """What :func:`evaluate` found.

    Attributes:
        results: ``{benchmark: {sae label: result}}``.
        saes: ``{sae label: what it was evaluated on}`` (:func:`_setup`: its line naming it, source, LM, hook,
            dataset, context size, held-out contexts per benchmark, batch size), for ``--output``'s ``settings``.
        settings: the settings shared by every SAE (benchmarks, their options, seed, ``--n-seqs``, device, versions).
    """

    results: dict[str, dict[str, dict]]
    saes: dict[str, dict]
    settings: dict


def evaluate(args: argparse.Namespace) -> Evaluation:
    """The results of every benchmark on every SAE the arguments name, and what each was evaluated on."""
    saes: dict[str, dict] = {}
    for flag in ("n_seqs", "batch_size", "context_size"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise ArgumentError(f"--{flag.replace('_', '-')} must be > 0 (got {getattr(args, flag)})")
    device = _device(args.device)
    _check_outputs(args)
    sources = resolve(args.paths)
    named = args.benchmarks is not None
    args = with_run_settings(args, sources)
    names = _benchmarks(args.benchmarks)
    given = _options(args.options, names)
    if not named and not args.output and not args.logdir:
        names = _shown(names, keep=set(given))
    options = _merged_options(args.run_options, given, names)
    benchmark_options = run_options(names, options)  # the n_seqs of --options are held-out counts (held_out_counts)
    for path, src in {s.path: s for s in sources if s.kind != "pretrained"}.items():  # each file once, before any work
        _check_readable(src.label.rsplit(":", 1)[0] if src.member else src.label, Path(path))
    results: dict[str, dict[str, dict]] = {n: {} for n in names}
    runs = tensorboard_runs(list(dict.fromkeys(s.group for s in sources)))
    settings = _settings(args, names, options, device)
    if _ranks()[1] > 1:
        results = _evaluate_split(args, sources, names, options, benchmark_options, runs, device, saes)
        return Evaluation(results, saes, settings)
    cache: dict = {}
    _load_saelens_first(sources, args, device, cache, names, options)
    # a (run, step) named twice (the same folder given twice): TensorBoard gets the last, as a later call replaces it
    last = {(runs[s.group], s.step): s for s in sources}
    # SAEs on the same LM and tokens (a sweep's members) share the LM passes
    with shared_harvests() as harvests, TensorBoardOut(args.logdir, names) as tb:
        for src in sources:
            sae, meta, lm, hook, toks, counts = _load_with_lm(src, args, device, cache, names, options)
            # a sweep over layers: its members' hooks from one pass (a hook this LM lacks fails at its own member)
            names_here = set(lm.hook_names())
            harvests.plan(lm, [s.hook for s in sources if s.path == src.path and s.hook in names_here])
            per_benchmark = tokens_per_benchmark(counts, toks, lm, options)
            saes[src.label] = _setup(sae, src, meta, lm, hook, args, per_benchmark)
            log.info("evaluating %s (%s, %s)", src.label, lm.name, hook)
            res = run_benchmarks(
                names,
                sae,
                lm,
                hook,
                per_benchmark,
                seed=args.seed,
                options=benchmark_options,
                batch_size=_batch_size(args, src, meta),
            )
            for n in names:
                results[n][src.label] = res[n]
            if args.logdir and last[runs[src.group], src.step] is src:
                tb.write(runs[src.group], src.step, res)
    return Evaluation(results, saes, settings)


def _setup(sae, src: Source, meta: dict, lm: LanguageModel, hook: str, args: argparse.Namespace,
           per_benchmark: dict[str, torch.Tensor]) -> dict:
    """What a source's SAE was evaluated on, as plain JSON values: ``about`` (the line naming it in its files,
    :func:`gsae.evals.about_sae`), where it came from, the LM and hook, the held-out tokens (dataset, context size,
    BOS, and the contexts each benchmark read: benchmarks read different numbers, e.g. ``dead_latents`` its window
    of 5 x 4096 tokens), and the batch size."""
    dataset = _dataset(args, src, meta, lm)[0]
    data = _token_options(args, src, meta, dataset)
    return {
        "about": about_sae(sae, src.label, f"step {src.step}" if src.kind == "ckpt" else "", lm.name, hook),
        "source": {"kind": src.kind, "path": src.path, **({"member": src.member} if src.member else {}),
                   **({"step": src.step} if src.kind == "ckpt" else {})},
        "sae": {"class": type(sae).__name__, "d_in": sae.d_in, "d_sae": sae.d_sae},
        "lm": lm.name,
        # how it was loaded: a gsae run's folding and centring, SAELens' none; they change the activations
        "lm_options": {k: v for k, v in lm.describe().items() if k != "name"},
        "hook": hook,
        "dataset": dataset,
        **({"data_options": data} if data else {}),
        "context_size": _context_size(args, meta, lm),
        "prepend_bos": meta.get("prepend_bos", True) is not False,
        "contexts": {b: int(t.shape[0]) for b, t in per_benchmark.items()},
        "batch_size": _batch_size(args, src, meta),
    }


def _settings(args: argparse.Namespace, names: list[str], options: dict, device: str) -> dict:
    """The settings every SAE of one command shares, as plain JSON values (``--output``'s ``settings``): with each
    SAE's :func:`_setup`, what the numbers depend on."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str | None:  # transformer_lens has no __version__
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    return json.loads(json.dumps({
        "benchmarks": names,
        "options": {n: options.get(n, {}) for n in names},
        "seed": args.seed,
        "n_seqs": args.n_seqs,
        "text_column": args.text_column,
        "device": device,
        "versions": {p: installed(p) for p in ("gsae", "torch", "transformer_lens", "sae_lens")},
    }, default=str))


def _load_saelens_first(sources: list[Source], args: argparse.Namespace, device: str, cache: dict, names,
                        options) -> None:
    """Load the SAELens SAEs and read their held-out tokens into ``cache`` before any evaluation: their LM and default
    dataset are the likeliest to fail (e.g. OpenWebText offline), and a failure then comes before the other PATHs'
    evaluations, not after minutes of them with nothing written. Each is loaded once (its warnings said once) and
    kept for its evaluation (:func:`_load_with_lm`)."""
    for src in sources:
        if src.kind != "ckpt":
            cache["loaded", src.label] = load(src, device, args.model)
            _lm_and_tokens(src, cache["loaded", src.label][1], args, device, cache, names, options)


def _evaluate_split(args, sources: list[Source], names: list[str], options: dict, benchmark_options: dict,
                    runs: dict[str, str], device: str, saes_setup: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """:func:`evaluate` under torchrun: each checkpoint's (or SAELens SAE's) evaluation split between the ranks as
    the training callback splits it (:func:`gsae.evals.run_split`: its benchmarks, and a sweep's members, by their
    expected cost; the same held-out tokens and seeds on every rank, so the results are a one-process run's). Every
    rank loads the SAEs (a sweep checkpoint's members together: they share the LM's passes); rank 0 writes
    TensorBoard and, after :func:`evaluate`, the table and the files. From the second checkpoint on, the split uses
    what each (benchmark, member) took at the one before (the training callback's balance), not default costs."""
    from gsae.evals import run_split

    rank, world = _ranks()
    groups: dict[str, list[Source]] = {}
    for src in sources:  # a checkpoint's members together
        groups.setdefault(src.path, []).append(src)
    results: dict[str, dict[str, dict]] = {n: {} for n in names}
    cache: dict = {}
    with _together():  # as one process does, and every rank stopped with the one that fails
        _load_saelens_first(sources, args, device, cache, names, options)
    last = {(runs[s.group], s.step): s for s in sources}
    seconds: dict[str, float] = {}  # the previous checkpoint's, keyed by member name ("" for a one-SAE checkpoint)
    with TensorBoardOut(args.logdir if rank == 0 else None, names) as tb:
        for members in groups.values():
            saes, key, loaded = {}, {}, []
            with _together():
                for src in members:
                    # by member name, so the next checkpoint's split finds these timings (the label, if one repeats)
                    key[src.label] = (src.member or "") if (src.member or "") not in saes else src.label
                    loaded.append(_load_with_lm(src, args, device, cache, names, options))
                    saes[key[src.label]] = (loaded[-1][0], loaded[-1][3])
            _, meta, lm, hook, toks, counts = loaded[0]  # a checkpoint's members share the LM and the tokens
            per_benchmark = tokens_per_benchmark(counts, toks, lm, options)
            for src, (sae, its_meta, _, its_hook, _, _) in zip(members, loaded):
                saes_setup[src.label] = _setup(sae, src, its_meta, lm, its_hook, args, per_benchmark)
            log.info("evaluating %s (%s, %s) on %d ranks", members[0].path, lm.name, hook, world)
            batch_size = _batch_size(args, members[0], meta)
            everything, seconds, _ = run_split(
                names, saes, lm, per_benchmark, world=world, rank=rank,
                seconds_before=seconds, seed=args.seed, options=benchmark_options, batch_size=batch_size)
            for src in members:
                res = everything[key[src.label]]
                for n in names:
                    results[n][src.label] = res[n]
                if args.logdir and rank == 0 and last[runs[src.group], src.step] is src:
                    tb.write(runs[src.group], src.step, res)
    return results


def _load_with_lm(src: Source, args: argparse.Namespace, device: str, cache: dict, names, options):
    """``(sae, meta, lm, hook, tokens, {benchmark: count})`` of a source (:func:`load`, :func:`_lm_and_tokens`), the
    SAE's width checked against its hook's (e.g. ``--model`` naming a wider or narrower model than it was trained
    on)."""
    loaded = cache.pop(("loaded", src.label), None)  # evaluate()'s early read of a SAELens SAE's tokens
    sae, meta = loaded if loaded is not None else load(src, device, args.model)
    bad = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if not torch.isfinite(getattr(sae, n)).all()]
    if bad:  # its benchmarks ran, giving nulls and an L0 of k: as if they had measured something
        raise ArgumentError(f"PATH {src.label!r}: the SAE's {', '.join(bad)} hold NaN or inf values")
    lm, hook, toks, counts = _lm_and_tokens(src, meta, args, device, cache, names, options)
    if sae.d_in != lm.d_in(hook):
        raise ArgumentError(f"PATH {src.label!r}: the SAE reads {sae.d_in}-wide activations, {lm.name}'s {hook} "
                            f"is {lm.d_in(hook)} wide")
    return sae, meta, lm, hook, toks, counts


def _batch_size(args: argparse.Namespace, src: Source, meta: dict) -> int:
    """Sequences per forward pass: ``--batch-size``, else the run's evaluation setting, else the checkpoint's training
    batch size, else 8."""
    return args.batch_size or args.run_batch_size or src.batch_size or meta.get("batch_size") or 8


def _lm_and_tokens(src: Source, meta: dict, args: argparse.Namespace, device: str, cache: dict, names, options):
    """``(lm, hook, tokens, {benchmark: count})`` of a source (:func:`gsae.evals.held_out_counts`); LMs and token
    sets are shared through ``cache`` (same LM options, dataset, context size and BOS choice -> the same tokens)."""
    key = json.dumps(meta["lm"], sort_keys=True)
    if key not in cache:
        cache[key] = LanguageModel(**meta["lm"]).to(device)
    lm = cache[key]
    hook = lm.validate_hook(meta["hook"], option=f"PATH {src.label!r}: hook")
    dataset, default = _dataset(args, src, meta, lm)
    ctx = _context_size(args, meta, lm)
    bos = meta.get("prepend_bos", True) is not False
    data = _token_options(args, src, meta, dataset)
    n_read, counts = held_out_counts(names, args.n_seqs, options, ctx)
    tkey = (key, dataset, ctx, bos, json.dumps(data, sort_keys=True, default=str))
    if tkey not in cache:
        try:
            tokens = held_out_tokens(lm, dataset, ctx, n_read, bos, **data)
        except ArgumentError as e:
            if dataset != default or args.dataset:
                raise
            named = meta.get("dataset_path")  # SAELens' own record: often a pre-tokenized copy under another name
            hint = f" (its cfg.json names dataset_path {named!r})" if named else ""
            raise ArgumentError(f"{str(e).removeprefix('--dataset: ')}; {default} is evaluate.py's default for PATH "
                                f"{src.label!r}, which records no gsae training dataset: pass --dataset{hint}") from None
        cache[tkey] = tokens.to(device)
    return lm, hook, cache[tkey], counts


def _token_options(args: argparse.Namespace, src: Source, meta: dict, dataset: str) -> dict:
    """The data options of a source's held-out contexts: the run's recorded :data:`TOKEN_OPTIONS` when it is
    evaluated on the dataset it was trained on (a run on paragraphs of a .txt file, or its JSONL's ``content``
    column, is evaluated on those, as training's evaluation was), ``--text-column`` over them."""
    recorded = src.data if src.data is not None else recorded_token_options(meta.get("data_options"))
    trained_on = src.dataset or meta.get("dataset")
    out = dict(recorded) if trained_on is not None and dataset == trained_on else {}
    if args.text_column:
        out["text_column"] = args.text_column
    return out


def _dataset(args: argparse.Namespace, src: Source, meta: dict, lm: LanguageModel) -> tuple[str, str]:
    """``(dataset, evaluate.py's default)`` of a source: ``--dataset``, else the one it was trained on, else the
    default (``synthetic`` for ``random-*`` models, else OpenWebText)."""
    default = "synthetic" if lm.name.startswith("random-") else "Skylion007/openwebtext"
    return args.dataset or src.dataset or meta.get("dataset") or default, default


def _context_size(args: argparse.Namespace, meta: dict, lm: LanguageModel) -> int:
    """Tokens per held-out context: ``--context-size``, else the SAE's (128 if it records none), capped at n_ctx."""
    return args.context_size or min(meta.get("context_size") or 128, lm.n_ctx)


def with_run_settings(args: argparse.Namespace, sources: list[Source]) -> argparse.Namespace:
    """``args`` completed with the evaluation settings the training run used (``--benchmarks``, ``--n-seqs``,
    ``--seed``, the options and batch size), where every source is a gsae checkpoint recording the same ones (the
    checkpoints of a run): evaluating them again then gives the run's ``.eval.json``. What the command line sets
    wins; ``--options`` is merged into the run's options per benchmark. Other sources (SAELens, runs evaluated
    differently, or with the evaluation off) get evaluate.py's defaults, one set for all so the columns compare."""
    recorded = [s.evaluation for s in sources]
    run = recorded[0] if recorded and all(r is not None and r == recorded[0] for r in recorded) else {}
    out = argparse.Namespace(**vars(args))
    given = [k for k in ("benchmarks", "n_seqs", "seed") if getattr(args, k) is not None]
    if run:
        if "benchmarks" not in given:
            out.benchmarks = ",".join(run.get("benchmarks") or []) or None
        if "n_seqs" not in given:
            out.n_seqs = run.get("n_seqs")
        if "seed" not in given:
            out.seed = run.get("seed", 0)
        log.info("evaluating with the run's evaluation settings (its checkpoints and SAELens exports record them)%s",
                 f"; {', '.join('--' + k.replace('_', '-') for k in given)} from the command line" if given else "")
    out.seed = 0 if out.seed is None else out.seed
    out.run_options = run.get("options") or {}
    out.run_batch_size = run.get("batch_size")
    return out


def _merged_options(run: dict[str, dict], given: dict[str, dict], names: list[str]) -> dict[str, dict]:
    """The run's options of the benchmarks run, each updated by the command line's (``--options``)."""
    out = {b: dict(o) for b, o in run.items() if b in names}
    for b, o in given.items():
        out[b] = {**out.get(b, {}), **o}
    return out


def _benchmarks(text: str | None) -> list[str]:
    """The benchmarks to run, imported now so that a missing one fails before any work; by default every
    registered benchmark whose module exists."""
    if text is None:
        names = []
        for n in BENCHMARKS:
            if n in OPT_IN:
                continue
            try:
                BENCHMARKS[n]  # noqa: B018
                names.append(n)
            except ValueError as e:
                log.warning("skipping %s", e)
        return names
    names = check_benchmarks([b.strip() for b in text.split(",") if b.strip()])
    for n in names:
        BENCHMARKS[n]  # noqa: B018
    return names


def _shown(names: list[str], keep: set[str]) -> list[str]:
    """``names`` without the benchmarks whose results are files (``latents``' dashboards), when evaluate.py has
    nowhere to put them (no ``--output``, no ``--logdir``) and neither ``--benchmarks`` nor ``--options`` (``keep``)
    named them: the table would show only their settings."""
    files = [n for n in names if n not in keep and getattr(BENCHMARKS[n], "artifacts", None) is not None]
    if files:
        log.info("not running %s: %s files (give --output or --logdir to have them, or name it in --benchmarks)",
                 ", ".join(files), "its results are" if len(files) == 1 else "their results are")
    return [n for n in names if n not in files]


def _options(text: str | None, names: list[str]) -> dict[str, dict]:
    if not text:
        return {}
    try:
        opts = json.loads(text)
    except json.JSONDecodeError as e:
        raise ArgumentError(f"--options: not valid JSON ({e})") from None
    if not isinstance(opts, dict) or not all(isinstance(v, dict) for v in opts.values()):
        raise ArgumentError('--options: expected {"benchmark": {"option": value}}')
    unknown = set(opts) - set(names)
    if unknown:
        raise ArgumentError(f"--options: {sorted(unknown)} are not among --benchmarks {names}")
    try:
        check_options(opts, "--options", extra={N_SEQS_OPTION: int})
    except ValueError as e:
        raise ArgumentError(str(e)) from None
    return opts


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``evaluate.py``: returns the process exit code."""
    log_to_terminal()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    one_line_warnings()
    tune_malloc()  # see gsae.allocator (GSAE_MALLOC_TUNING=0: off)
    args = None
    rank = _process_group()
    if rank > 0:  # rank 0 reports, also the errors of the others (see _agree, gsae.evals.run_split)
        logging.getLogger().setLevel(logging.WARNING)
    try:
        args = build_parser().parse_intermixed_args(argv)  # PATHs after options too
        found = evaluate(args)
        if rank == 0:
            report(found, args)
    except (ValueError, OSError, RuntimeError) as e:
        if os.environ.get("GSAE_DEBUG"):
            raise
        msg = str(e).strip()
        msg = msg.splitlines()[0] if msg else type(e).__name__
        # the LM's loader names train.py's option; here the name is --model's, or the checkpoint's
        which = "--model" if args is not None and args.model else "the SAE's language model"
        if rank == 0:  # under torchrun every rank stops; rank 0 names the failed rank and its error
            print(f"error: {msg.replace('--model.lm.name:', which + ':')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # as train.py: one line; files already written are whole (gsae.files)
        if rank == 0:
            print("stopped (Ctrl+C)", file=sys.stderr)
        return 130
    finally:
        if _ranks()[1] > 1:
            torch.distributed.destroy_process_group()
    return 0


def _process_group() -> int:
    """Under torchrun (``WORLD_SIZE`` > 1): join the ranks' process group and return this rank. gloo, on GPUs too:
    only results (Python objects) travel between the ranks."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank()


def report(found: Evaluation, args: argparse.Namespace) -> None:
    """Print the results table (and benchmarks' own tables) and the tokens each SAE was evaluated on; write
    ``--output`` (``{"settings": ..., "results": {benchmark: {sae: result}}}``) and its artifacts."""
    results = found.results
    labels = list(dict.fromkeys(lb for per in results.values() for lb in per))
    short = short_labels(labels)
    print(
        table({b: {short[lb]: r for lb, r in per.items()} for b, per in results.items()}, [short[lb] for lb in labels])
    )
    print(tokens_line(found.saes, short))
    for bench, per in results.items():  # an empty column says why (it was blank, the reason only in --output)
        for lb, r in per.items():
            why = r.get("skipped") if isinstance(r, dict) else None
            if isinstance(why, str):
                print(f"{bench} skipped for {short[lb]}: {why.removeprefix(bench + ': ')}")
    for bench, per in results.items():  # benchmarks with a table layout of their own (plateaus: the paper's Table 1)
        fmt = getattr(BENCHMARKS[bench], "format_table", None)
        for lb, r in per.items() if fmt else ():
            print(f"\n{bench} — {short[lb]}\n{fmt(r)}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        settings = {**found.settings, "saes": found.saes}
        write_text(args.output, json_text({"settings": settings, "results": results}))
        log.info("wrote %s", args.output)
        abouts = {lb: setup["about"] for lb, setup in found.saes.items()}
        for path in write_artifacts(args.output, results, short, abouts):
            log.info("wrote %s", path)
