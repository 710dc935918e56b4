"""Benchmarks: pure functions that measure an SAE (no Lightning import), one file per benchmark.

:data:`BENCHMARKS` maps a benchmark name to its module, imported on first access; every module has
``run(sae, lm, hook, tokens, *, seed=0, **options) -> dict`` and ``figures(result) -> dict[str, Figure]``
(see :mod:`gsae.evals.common`). The callback (:class:`gsae.callbacks.EvaluationCallback`) and
``evaluate.py`` both run benchmarks through :func:`run_benchmark`.

Optional module functions:

- ``applicable(sae, lm, hook) -> str | None``: a reason the benchmark does not apply (e.g. steering at a
  ``hook_z`` SAE, whose logit lens means nothing); :func:`run_benchmarks` then records ``{"skipped": reason}``.
- ``artifacts(result, about) -> dict[str, str]``: files to write, filename suffix (``".latents.html"``) -> content;
  the callback writes ``<checkpoint><suffix>`` beside each checkpoint, ``evaluate.py`` ``<output stem>.<sae><suffix>``;
  ``about`` is one line saying which SAE the file is of (:func:`about_sae`), for a file read on its own.
- ``texts(result) -> dict[str, str]``: TensorBoard text tag -> markdown (``SummaryWriter.add_text``).
- ``run_many(saes, lm, hook, tokens, *, seed=0, **options) -> {name: result}``: ``run`` for several SAEs at
  once, sharing SAE-independent passes (:func:`run_benchmarks_many` uses it for a sweep's members).
- ``parts(options) -> list[dict]`` and ``merge(results) -> dict``: option overrides that cut one run into independent
  runs, and the join of their results into the one run's (the evaluation callback runs a costly benchmark's parts
  on several ranks under DDP: :func:`evaluation_tasks`).
"""

from __future__ import annotations

import collections.abc
import contextlib
import importlib
import inspect
import json
import math
import re
import time
import types
import typing
from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import Any, NamedTuple

import torch
from torch import Tensor

_MODULES = {
    "loss_added": "gsae.evals.loss_added",
    "dead_latents": "gsae.evals.dead_latents",
    "steering": "gsae.evals.steering",
    "sensitive_directions": "gsae.evals.sensitive_directions",
    "decoder_geometry": "gsae.evals.decoder_geometry",
    "plateaus": "gsae.evals.plateaus",
    "latents": "gsae.evals.latents",
}
#: Registered but only run when named (costly: ``plateaus`` is ~1 min on the tiny model, far more on GPT-2 on CPU).
OPT_IN = frozenset({"plateaus"})


class _LazyModules(Mapping):
    """``name -> module``, importing each module on first access; a registered module that does not exist
    (yet) raises a one-line ``ValueError`` when it is used, not when the registry is imported."""

    def __init__(self, paths: dict[str, str]) -> None:
        self._paths = paths

    def __getitem__(self, name: str) -> ModuleType:
        if name not in self._paths:
            raise KeyError(name)
        try:
            return importlib.import_module(self._paths[name])
        except ModuleNotFoundError as e:
            if e.name != self._paths[name]:
                raise
            raise ValueError(f"benchmark {name!r} is not available (module {self._paths[name]} is missing)") from None

    def __contains__(self, name: object) -> bool:
        return name in self._paths

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


BENCHMARKS: Mapping[str, ModuleType] = _LazyModules(_MODULES)


def check_benchmarks(names: list[str], option: str = "--benchmarks") -> list[str]:
    """Return ``names`` if all are known, else raise a one-line error naming ``option``."""
    unknown = [n for n in names if n not in BENCHMARKS]
    if not names:
        raise ValueError(f"{option}: no benchmark given; choose from {', '.join(BENCHMARKS)}")
    if unknown:
        raise ValueError(f"{option}: unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    return names


#: Option the callback and ``evaluate.py`` read themselves from a benchmark's options: its number of held-out contexts.
N_SEQS_OPTION = "n_seqs"

#: Held-out contexts of a benchmark given no count (:func:`held_out_counts`), but ``dead_latents``: its window.
DEFAULT_N_SEQS = 64
#: ``dead_latents``' window is read with this margin over its tokens ÷ (T − 1): room for special tokens mid-context.
WINDOW_MARGIN = 1.25


def held_out_counts(
    names: list[str], n_seqs: int | None, options: Mapping[str, Mapping[str, Any]] | None, context_size: int
) -> tuple[int, dict[str, int | None]]:
    """``(contexts to read, {benchmark: its count})`` of held-out contexts of ``context_size`` tokens.

    ``n_seqs`` given: the contexts read; every benchmark reads them all, or its own ``options[name]["n_seqs"]`` if
    that is smaller. ``n_seqs`` None (the default): every benchmark reads its own ``n_seqs``, else
    :data:`DEFAULT_N_SEQS`, but ``dead_latents`` without one gets ``None``: as many as its "batches" definition needs
    (the g-SAE paper's 5 batches of 4096 tokens, special tokens not counted; :func:`tokens_per_benchmark` finds how
    many), so its headline ``dead_fraction_batches`` is computed at any context size; the contexts read are then the
    most any benchmark uses."""
    counts: dict[str, int | None] = {}
    read = []
    for name in names:
        o = (options or {}).get(name, {})
        own = o.get(N_SEQS_OPTION)
        if n_seqs is not None:
            counts[name] = min(int(own), n_seqs) if own is not None else n_seqs
            read.append(n_seqs)
        elif own is not None or name != "dead_latents":
            counts[name] = int(own) if own is not None else DEFAULT_N_SEQS
            read.append(counts[name])
        else:
            counts[name] = None
            need = o.get("dead_batches", 5) * o.get("batch_tokens", 4096)
            read.append(math.ceil(need / max(context_size - 1, 1) * WINDOW_MARGIN))
    return max(read, default=n_seqs or DEFAULT_N_SEQS), counts


def run_options(names: list[str], options: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """``{benchmark: its options}`` for ``run``: ``options`` without the held-out counts (``n_seqs``, read by
    :func:`held_out_counts`, not by the benchmark)."""
    return {n: {k: v for k, v in (options or {}).get(n, {}).items() if k != N_SEQS_OPTION} for n in names}


def tokens_per_benchmark(counts: Mapping[str, int | None], tokens: Tensor, lm, options=None) -> dict[str, Tensor]:
    """``{benchmark: its first contexts of tokens}`` for :func:`held_out_counts`' ``counts`` (``None``:
    ``dead_latents``' window, :func:`gsae.evals.dead_latents.contexts_for_window` with its ``options``)."""
    from gsae.evals.dead_latents import contexts_for_window

    out = {}
    for name, n in counts.items():
        if n is None:
            keys = ("dead_batches", "batch_tokens", "exclude_special_tokens")
            window = {k: v for k, v in (options or {}).get(name, {}).items() if k in keys}
            n = contexts_for_window(lm, tokens, **window)
        out[name] = tokens[:n]
    return out


#: options every benchmark's ``run`` takes that are not the user's to set per benchmark
_NOT_OPTIONS = {"seed"}


def check_options(options: Mapping[str, Any] | None, where: str, extra: Mapping[str, type] | None = None) -> None:
    """Raise a one-line ``ValueError`` naming ``where`` (e.g. ``--options``) if ``options`` (``{benchmark: {option:
    value}}``) names an option a benchmark's ``run`` does not take, or gives one a value of the wrong type (checked
    against ``run``'s annotations: ``int``, ``float``, ``bool``, ``str``, ``Literal``, ``X | None``, lists and
    tuples of those). ``extra``: options the caller reads itself (e.g. the callback's ``n_seqs: int``), allowed for
    every benchmark; an ``n_seqs`` must be > 0; and values outside a benchmark's ``OPTION_BOUNDS`` (``{option:
    bound}``, see :func:`_breaks`). Before any work: a typo in an option name was silently dropped, and a bad value
    failed at the first checkpoint of a run, or ran and gave NaN or the wrong latents."""
    for name, opts in (options or {}).items():
        if name not in BENCHMARKS:
            raise ValueError(f"{where}: {name!r} is not a benchmark; choose from {', '.join(BENCHMARKS)}")
        if not isinstance(opts, Mapping):
            raise ValueError(f"{where}.{name}: expected a mapping of options, got {opts!r}")
        run = BENCHMARKS[name].run
        params = {k: p for k, p in inspect.signature(run).parameters.items() if p.kind is p.KEYWORD_ONLY}
        hints = typing.get_type_hints(run)
        allowed = {k: hints.get(k, Any) for k in params if k not in _NOT_OPTIONS} | dict(extra or {})
        for key, value in opts.items():
            if key not in allowed:
                raise ValueError(f"{where}.{name}: unknown option {key!r}; {name} takes {', '.join(sorted(allowed))}")
            if not _fits(value, allowed[key]):
                raise ValueError(f"{where}.{name}.{key}: expected {_type_name(allowed[key])}, got {value!r}")
            if key == N_SEQS_OPTION and value <= 0:
                raise ValueError(f"{where}.{name}.{key} must be > 0 (got {value})")
            bounds = getattr(BENCHMARKS[name], "OPTION_BOUNDS", {}).get(key, ())
            for bound in (bounds,) if isinstance(bounds, str) else bounds:
                if _breaks(value, bound):
                    raise ValueError(f"{where}.{name}.{key} must {_bound_text(bound)} (got {value!r})")


_BOUND = re.compile(r"^(each )?(>=|<=|>|<) (-?[\d.e+-]+)$|^(non-empty)$|^in ([(\[])(-?[\d.e+-]+), (-?[\d.e+-]+)([)\]])$")


def _breaks(value: Any, bound: str) -> bool:
    """Whether ``value`` breaks a benchmark's ``OPTION_BOUNDS`` entry: ``"> 0"``, ``">= 0"``, ``"< 0"``, ``"<= 1"``,
    ``"in (0, 0.5]"``, ``"non-empty"`` (a list), ``"each >= 0"`` (every item of a list). ``None`` and strings (an
    ``"auto"`` choice) are not numbers to bound, and pass."""
    m = _BOUND.match(bound)
    if m is None:
        raise ValueError(f"OPTION_BOUNDS: cannot read {bound!r}")
    if m.group(4):
        return isinstance(value, (list, tuple)) and len(value) == 0
    if m.group(1):
        return isinstance(value, (list, tuple)) and any(_breaks(v, bound[len("each "):]) for v in value)
    if value is None or isinstance(value, (str, list, tuple)) or isinstance(value, bool):
        return False
    if m.group(2):
        limit = float(m.group(3))
        return not {">": value > limit, ">=": value >= limit, "<": value < limit, "<=": value <= limit}[m.group(2)]
    lo, hi = float(m.group(6)), float(m.group(7))
    above = value > lo if m.group(5) == "(" else value >= lo
    below = value < hi if m.group(8) == ")" else value <= hi
    return not (above and below)


def _bound_text(bound: str) -> str:
    return f"have every value {bound[len('each '):]}" if bound.startswith("each ") else f"be {bound}"


def _fits(value: Any, tp: Any) -> bool:
    """Whether ``value`` (from JSON or YAML) is an instance of the annotation ``tp`` (see :func:`check_options`)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if tp is type(None) or tp is None:
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        item = args[0] if args else Any
        return all(_fits(v, item) for v in value)
    return True  # an annotation this checker does not know: left to the benchmark


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _call(fn, *args, seed: int, options: dict):
    """``fn(*args, seed=seed, **options)``, passing only the options ``fn`` accepts."""
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        options = {k: v for k, v in options.items() if k in params}
    return fn(*args, seed=seed, **options)


def _skip_reason(name: str, sae, lm, hook: str) -> str | None:
    check = getattr(BENCHMARKS[name], "applicable", None)
    return check(sae, lm, hook) if check is not None else None


def run_benchmark(name: str, sae, lm, hook: str, tokens: Tensor, *, seed: int = 0, **options) -> dict:
    """Run benchmark ``name``, passing it only the ``options`` its ``run`` accepts (shared options such as
    ``batch_size`` can be given to every benchmark); ``{"skipped": reason}`` when its ``applicable`` says no."""
    reason = _skip_reason(name, sae, lm, hook)
    if reason:
        return {"skipped": reason}
    return _call(BENCHMARKS[name].run, sae, lm, hook, tokens, seed=seed, options=options)


#: checks called between the benchmarks (and members) of an evaluation, which stop it by raising (:func:`stop_check`)
_STOP_CHECKS: list[collections.abc.Callable[[], None]] = []


@contextlib.contextmanager
def stop_check(check: collections.abc.Callable[[], None]) -> Iterator[None]:
    """Within the block, ``check()`` runs before each benchmark (and each SAE's run of it) of :func:`run_benchmarks_many`
    and may raise to stop the evaluation there: the training callback stops at a SIGTERM (a preempted job has seconds,
    an evaluation minutes) instead of finishing the evaluation first."""
    _STOP_CHECKS.append(check)
    try:
        yield
    finally:
        _STOP_CHECKS.remove(check)


def _check_stop() -> None:
    for check in list(_STOP_CHECKS):
        check()


def run_benchmarks(
    names: list[str],
    sae,
    lm,
    hook: str,
    tokens: Tensor,
    *,
    seed: int = 0,
    options: dict[str, dict] | None = None,
    **shared,
) -> dict[str, dict]:
    """``{name: result}`` for several benchmarks, with the SAE in eval mode and no autograd graph.

    ``shared`` options (e.g. ``batch_size``) go to every benchmark that accepts them; ``options[name]``
    to benchmark ``name`` only. The SAE's training mode is restored afterwards. Runs outside
    ``inference_mode`` (Lightning may call from validation): g-SAE encoding and ``decoder_geometry``
    need ``∇ₓL``, which ``LanguageModel.activations_and_grads`` takes under its own ``enable_grad``.
    The benchmarks share the LM passes of identical token batches (:func:`gsae.evals.common.shared_harvests`).
    """
    return run_benchmarks_many(names, {"": sae}, lm, hook, tokens, seed=seed, options=options, **shared)[""]


def run_benchmarks_many(
    names: list[str],
    saes: Mapping[str, object],
    lm,
    hook: str,
    tokens: Tensor | Mapping[str, Tensor],
    *,
    seed: int = 0,
    options: dict[str, dict] | None = None,
    seconds: dict[str, float] | None = None,
    on_error: str = "raise",
    **shared,
) -> dict[str, dict[str, dict]]:
    """``{sae name: {benchmark: result}}`` for several SAEs at one hook (a sweep's members), each result equal to
    :func:`run_benchmarks` of that SAE alone, with the SAE-independent LM work done once: the activations (and
    ``∇ₓL``) of each token batch are shared by every benchmark and SAE (:func:`gsae.evals.common.shared_harvests`),
    and a benchmark module's optional ``run_many(saes, lm, hook, tokens, *, seed, **options) -> {name: result}``
    (``loss_added``: one clean and one zero-ablated pass per batch; ``sensitive_directions``: the length sweep of the
    directions drawn from the activations alone once) replaces its per-SAE ``run``.

    ``tokens``: one ``(n_seq, T)`` set for every benchmark, or ``{benchmark: tokens}``. ``seconds``, if given,
    receives ``{"<sae name>/<benchmark>": wall seconds}`` (``"<benchmark>"`` for the name ``""``; a ``run_many``'s
    time split evenly between its SAEs). ``on_error="record"``: a benchmark that raises gets ``{"failed": "<Error>:
    <message>"}`` for the SAEs it ran on and the others still run (the training callback: one failing benchmark
    neither stops training nor loses the others); ``"raise"`` (default) lets it propagate. Training modes are
    restored afterwards.
    """
    from gsae.evals.common import shared_harvests

    results: dict[str, dict[str, dict]] = {m: {} for m in saes}
    modes = {m: sae.training for m, sae in saes.items()}
    for sae in saes.values():
        sae.eval()

    def record(member: str, name: str, t: float) -> None:
        if seconds is not None:
            seconds[f"{member}/{name}" if member else name] = t

    try:
        with torch.inference_mode(False), torch.no_grad(), shared_harvests():
            for name in names:
                _check_stop()
                tok = (tokens[name] if isinstance(tokens, Mapping) else tokens).clone()  # not an inference tensor
                opts = {**shared, **(options or {}).get(name, {})}
                many = getattr(BENCHMARKS[name], "run_many", None)
                if many is not None and len(saes) > 1:
                    reasons = {m: _skip_reason(name, sae, lm, hook) for m, sae in saes.items()}
                    run_on = {m: sae for m, sae in saes.items() if not reasons[m]}
                    t0 = time.perf_counter()
                    try:
                        res = _call(many, run_on, lm, hook, tok, seed=seed, options=opts) if run_on else {}
                    except Exception as e:  # noqa: BLE001 - recorded, see on_error
                        if on_error == "raise":
                            raise
                        res = {m: _failure(e) for m in run_on}
                    dt = (time.perf_counter() - t0) / max(len(run_on), 1)
                    for m in saes:
                        results[m][name] = res[m] if m in run_on else {"skipped": reasons[m]}
                        record(m, name, dt if m in run_on else 0.0)
                    continue
                for m, sae in saes.items():
                    _check_stop()
                    t0 = time.perf_counter()
                    try:
                        results[m][name] = run_benchmark(name, sae, lm, hook, tok, seed=seed, **opts)
                    except Exception as e:  # noqa: BLE001 - recorded, see on_error
                        if on_error == "raise":
                            raise
                        results[m][name] = _failure(e)
                    record(m, name, time.perf_counter() - t0)
    finally:
        for m, sae in saes.items():
            sae.train(modes[m])
    return results


def run_benchmarks_at(
    names: list[str],
    saes: Mapping[str, tuple[object, str]],
    lm,
    tokens: Tensor | Mapping[str, Tensor],
    **kwargs,
) -> dict[str, dict[str, dict]]:
    """:func:`run_benchmarks_many` for SAEs at their own hooks (``{name: (sae, hook)}``: a sweep over layers),
    ``{name: {benchmark: result}}`` in the order of ``saes``. The SAEs on one hook share its passes as in
    :func:`run_benchmarks_many`, and the hooks share the LM: each batch's activations (and ``∇ₓL``) at every hook come
    from one pass (:meth:`gsae.evals.common.SharedHarvests.plan`), not one pass per hook. ``kwargs``: those of
    :func:`run_benchmarks_many`."""
    from gsae.evals.common import shared_harvests

    by_hook: dict[str, dict[str, object]] = {}
    for name, (sae, hook) in saes.items():
        by_hook.setdefault(hook, {})[name] = sae
    results: dict[str, dict[str, dict]] = {}
    with shared_harvests() as cache:
        cache.plan(lm, list(by_hook))
        for hook, group in by_hook.items():
            results.update(run_benchmarks_many(names, group, lm, hook, tokens, **kwargs))
    return {name: results[name] for name in saes}


#: a benchmark's relative cost for one SAE, before a run has timed its own: seconds of one evaluation with
#: configs/gpt2/gsae.yaml's budgets on 2 CPU cores (``benchmarks/eval_speed.py``); only their ratios matter
BENCHMARK_COST = {"loss_added": 45.0, "dead_latents": 35.0, "steering": 18.0, "sensitive_directions": 66.0,
                  "decoder_geometry": 11.0, "latents": 7.0, "plateaus": 120.0}


class Task(NamedTuple):
    """A unit of an evaluation split between ranks: ``benchmark`` for ``members``, whole (``part`` None) or the
    ``part``-th of its ``parts`` (a benchmark's ``parts(options)``: runs whose results its ``merge`` joins)."""

    benchmark: str
    members: tuple[str, ...]
    part: int | None = None
    parts: int = 1

    @property
    def suffix(self) -> str:
        """What a part's results and seconds carry after the benchmark's name: ``#part`` (``""`` for a whole)."""
        return "" if self.part is None else f"#{self.part}"

    @property
    def key(self) -> str:
        """The name of its results and seconds: ``benchmark``, or ``benchmark#part``."""
        return self.benchmark + self.suffix


def evaluation_tasks(
    names: list[str], members: list[str], world: int, options: Mapping[str, Mapping] | None = None,
    seconds: Mapping[str, float] | None = None,
) -> list[Task]:
    """The evaluation's units of work for ``world`` ranks, covering every benchmark of every member once, in
    ``names`` × ``members`` order. A benchmark runs for one member per task, except one with a ``run_many`` (its
    SAE-independent passes shared by the members of a task), whose members are cut into chunks of ``⌈members /
    world⌉``: as few chunks as still give every rank work. A task costlier than a rank's share of the whole
    (:func:`task_cost`; ``seconds`` of the previous evaluation) is cut into its benchmark's ``parts(options)``, if it
    has any (``sensitive_directions``: the activation-drawn directions, and the SAE's own with the substitution)."""
    tasks: list[Task] = []
    for name in names:
        size = 1
        if getattr(BENCHMARKS[name], "run_many", None) is not None:
            size = -(-len(members) // max(world, 1))
        tasks += [Task(name, tuple(members[i : i + size])) for i in range(0, len(members), size)]
    if world < 2:
        return tasks
    costs = [task_cost(t, seconds or {}) for t in tasks]
    share = sum(costs) / world
    out: list[Task] = []
    for task, cost in zip(tasks, costs):
        split = getattr(BENCHMARKS[task.benchmark], "parts", None)
        n = len(split((options or {}).get(task.benchmark, {}))) if split is not None else 0
        if n > 1 and cost > share:
            out += [task._replace(part=i, parts=n) for i in range(n)]
        else:
            out.append(task)
    return out


def task_cost(task: Task, seconds: Mapping[str, float]) -> float:
    """A task's expected seconds: what it took for its members last time (``seconds`` as :func:`run_benchmarks_many`
    records them, a part's under ``<member>/<benchmark>#<part>``), else its share of what the whole benchmark took,
    else :data:`BENCHMARK_COST` per member."""
    keys = [f"{m}/{task.benchmark}" if m else task.benchmark for m in task.members]

    def measured(suffix: str) -> float | None:
        return sum(float(seconds[k + suffix]) for k in keys) if all(k + suffix in seconds for k in keys) else None

    if task.part is not None:
        own = measured(task.suffix)
        if own is not None:
            return own
    first = task._replace(part=0).suffix
    whole = measured("")
    if whole is None and all(k + first in seconds for k in keys):  # measured in parts last time
        whole = sum(float(v) for k in keys for key, v in seconds.items() if key.startswith(k + "#"))
    if whole is None:
        whole = BENCHMARK_COST.get(task.benchmark, 30.0) * len(task.members)
    return whole / task.parts if task.part is not None else whole


def split_tasks(costs: list[float], world: int) -> list[list[int]]:
    """Task indices per rank, by longest processing time first: each task, costliest first (ties: first listed), goes
    to the rank with the least work so far (ties: the lowest rank). Deterministic, so every rank computes the same
    split; the busiest rank gets at most 4/3 of the best possible split's work (Graham 1969). Each rank's indices
    ascending (the order the tasks were listed in)."""
    loads = [0.0] * world
    share: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        loads[r] += costs[i]
        share[r].append(i)
    return [sorted(s) for s in share]


def run_tasks(
    tasks: list[Task], saes: Mapping[str, tuple[object, str]], lm, tokens, *, options: Mapping | None = None,
    seconds: dict[str, float] | None = None, **kwargs
) -> dict[str, dict[str, dict]]:
    """``{member: {task key: result}}`` of ``tasks`` (:func:`evaluation_tasks`), each result what
    :func:`run_benchmarks_at` gives (a part's with its ``parts`` options); one harvest cache for them all
    (:func:`gsae.evals.common.shared_harvests`). ``seconds`` receives each task's under its key (``…#<part>``).
    ``kwargs``: those of :func:`run_benchmarks_many`. :func:`merge_parts` joins the parts."""
    from gsae.evals.common import shared_harvests

    out: dict[str, dict[str, dict]] = {}
    with shared_harvests():
        for task in tasks:
            opts = {k: dict(v) for k, v in (options or {}).items()}
            if task.part is not None:
                opts[task.benchmark] = {**opts.get(task.benchmark, {}),
                                        **BENCHMARKS[task.benchmark].parts(opts.get(task.benchmark, {}))[task.part]}
            secs: dict[str, float] = {}
            res = run_benchmarks_at([task.benchmark], {m: saes[m] for m in task.members}, lm, tokens, options=opts,
                                    seconds=secs, **kwargs)
            if seconds is not None:
                seconds.update({k + task.suffix: v for k, v in secs.items()})
            for m, r in res.items():
                out.setdefault(m, {})[task.key] = r[task.benchmark]
    return out


def run_split(
    names: list[str], saes: Mapping[str, tuple[object, str]], lm, tokens, *, world: int, rank: int,
    seconds_before: Mapping[str, float] | None = None, **kwargs
) -> tuple[dict[str, dict[str, dict]], dict[str, float], list[Task]]:
    """One evaluation split between the ``world`` ranks of the default process group, this process ``rank``: the
    tasks (:func:`evaluation_tasks`) cut by their cost (:func:`split_tasks`, ``seconds_before`` of the previous
    evaluation), this rank's run (:func:`run_tasks`), every rank's results gathered and the parts merged. Returns
    ``({name: {benchmark: result}}`` in the order of ``saes`` and ``names`` (on every rank), every task's seconds,
    this rank's tasks``)``. A rank whose share raises (``on_error="raise"``) makes every rank raise, none waits for
    it. ``kwargs``: those of :func:`run_tasks`. The training callback and ``evaluate.py`` under torchrun."""
    import traceback

    seconds_before = seconds_before or {}
    tasks = evaluation_tasks(names, list(saes), world, kwargs.get("options"), seconds_before)
    mine_tasks = [tasks[i] for i in split_tasks([task_cost(t, seconds_before) for t in tasks], world)[rank]]
    seconds: dict[str, float] = {}
    mine, error, trace = {}, None, None
    try:
        mine = run_tasks(mine_tasks, saes, lm, tokens, seconds=seconds, **kwargs)
    except Exception as e:  # noqa: BLE001 - every rank raises below, none waits forever
        error, trace = e, traceback.format_exc()  # here: after the except block it is "NoneType: None"
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, (mine, seconds, trace))
    if error is not None:
        raise error
    failed = next(((r, tb) for r, (_, _, tb) in enumerate(gathered) if tb), None)
    if failed is not None:  # its error's line first (a one-line report shows it), then its traceback
        raise RuntimeError(f"the evaluation failed on rank {failed[0]}: {failed[1].strip().splitlines()[-1]}\n"
                           f"{failed[1]}")
    merged: dict[str, dict[str, dict]] = {}
    all_seconds: dict[str, float] = {}
    for results, secs, _ in gathered:
        for member, res in results.items():
            merged.setdefault(member, {}).update(res)
        all_seconds.update(secs)
    split = {t.benchmark: t for t in tasks if t.part is not None}
    for res in merged.values():  # a benchmark run in parts (maybe on several ranks): one result
        for name, t in split.items():
            keys = [t._replace(part=i).key for i in range(t.parts)]
            if keys[0] in res:
                res[name] = merge_parts(name, [res.pop(k) for k in keys])
    everything = {m: {b: merged[m][b] for b in names if b in merged.get(m, {})} for m in saes}
    return everything, all_seconds, mine_tasks


def merge_parts(name: str, parts: list[dict]) -> dict:
    """One benchmark's result from its parts' (in order): the first failure if one failed, else its ``merge``."""
    failed = next((r for r in parts if failure(r)), None)
    return failed if failed is not None else BENCHMARKS[name].merge(parts)


def _failure(e: BaseException) -> dict:
    """``{"failed": "<Error>: <first line>"}``; on a GPU the failed benchmark's cached blocks go back first (an OOM)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"failed": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"}


def benchmark_figures(name: str, result: dict) -> dict:
    """``figures(result)`` of benchmark ``name`` (``{}`` if it draws none)."""
    fn = getattr(BENCHMARKS[name], "figures", None)
    return fn(result) if fn is not None and not is_skipped(result) else {}


def failure(result: dict) -> str | None:
    """The error of a result recorded as ``{"failed": "<Error>: <message>"}`` (:func:`run_benchmarks_many`'s
    ``on_error="record"``: the benchmark raised), else ``None``."""
    failed = result.get("failed") if isinstance(result, dict) else None
    return failed if isinstance(failed, str) else None


def is_skipped(result: dict) -> bool:
    """Whether a result is ``{"skipped": reason}`` (the benchmark did not apply) or ``{"failed": error}`` (it raised,
    :func:`failure`), not a benchmark's own field."""
    return isinstance(result.get("skipped"), str) or failure(result) is not None


def benchmark_artifacts(name: str, result: dict, about: str = "") -> dict[str, str]:
    """``artifacts(result, about)`` of benchmark ``name``: filename suffix -> file content (``{}`` if none)."""
    fn = getattr(BENCHMARKS[name], "artifacts", None)
    return fn(result, about) if fn is not None and not is_skipped(result) else {}


def benchmark_texts(name: str, result: dict) -> dict[str, str]:
    """``texts(result)`` of benchmark ``name``: TensorBoard text tag -> markdown (``{}`` if none)."""
    fn = getattr(BENCHMARKS[name], "texts", None)
    return fn(result) if fn is not None and not is_skipped(result) else {}


def tagged_texts(results: dict[str, dict], prefix: str = "eval") -> dict[str, str]:
    """``{"<prefix>/<benchmark>/<tag>": markdown}`` of ``{benchmark: result}``."""
    return {f"{prefix}/{b}/{k}": t for b, r in results.items() for k, t in benchmark_texts(b, r).items()}


def about_sae(sae, *parts: str) -> str:
    """One line naming an SAE for files read on their own: ``parts`` (where it came from: checkpoint, member,
    step, LM), then its class and shape (``GradTopKSAE · d_sae 1024 · k 8 · β 1e+04``)."""
    config = sae.config() if hasattr(sae, "config") else {}
    shape = [type(sae).__name__ if not hasattr(sae, "sl") else getattr(sae, "architecture", "SAELens SAE"),
             f"d_sae {getattr(sae, 'd_sae', '?')}"]
    shape += [f"k {config['k']}"] if "k" in config else []
    shape += [f"β {config['beta']:.3g}"] if "beta" in config else []
    return " · ".join([*(p for p in parts if p), *shape])


def artifacts(results: dict[str, dict], about: str = "") -> dict[str, str]:
    """``{suffix: content}`` of every benchmark of ``{benchmark: result}`` (a suffix used twice is an error);
    ``about``: which SAE they are of (:func:`about_sae`)."""
    out: dict[str, str] = {}
    for b, r in results.items():
        for suffix, content in benchmark_artifacts(b, r, about).items():
            if suffix in out:
                raise ValueError(f"benchmark {b!r}: artifact suffix {suffix!r} is already written by another benchmark")
            out[suffix] = content
    return out


def json_text(obj: Any) -> str:
    """``obj`` as strict JSON text (indent 1): a non-finite float (a metric undefined on the evaluation set) is written
    ``null``; Python's ``json`` would write ``NaN``, which jq and JavaScript's ``JSON.parse`` reject."""
    def finite(o: Any) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, Mapping):
            return {k: finite(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [finite(v) for v in o]
        return o

    return json.dumps(finite(obj), indent=1, allow_nan=False)


def scalars(result: dict) -> dict[str, float]:
    """The top-level numbers of a result (curves, histograms and lists are left out)."""
    return {k: float(v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def settings_of(benchmark: str) -> set[str]:
    """The result numbers ``benchmark`` lists as its ``SETTINGS``: what it was run with (token counts, window sizes,
    how many latents it drew) and counts on its own contexts, not its findings."""
    return set(getattr(BENCHMARKS[benchmark], "SETTINGS", ())) if benchmark in BENCHMARKS else set()


def tagged_scalars(results: dict[str, dict], prefix: str = "eval") -> dict[str, float]:
    """``{"<prefix>/<benchmark>/<metric>": value}`` of ``{benchmark: result}`` (the TensorBoard tags), without the
    numbers a benchmark lists as its ``SETTINGS`` (token counts, window sizes, how many latents it drew: the same at
    every checkpoint, they were flat cards ahead of the curves; they stay in the JSON and ``evaluate.py``'s table)."""
    out = {}
    for b, r in results.items():
        settings = settings_of(b)
        out.update({f"{prefix}/{b}/{k}": v for k, v in scalars(r).items() if k not in settings})
    return out


def tagged_figures(results: dict[str, dict], prefix: str = "eval") -> dict:
    """``{"<prefix>/<benchmark>/<figure>": Figure}`` of ``{benchmark: result}``."""
    return {f"{prefix}/{b}/{k}": fig for b, r in results.items() for k, fig in benchmark_figures(b, r).items()}


__all__ = [
    "BENCHMARKS",
    "settings_of",
    "BENCHMARK_COST",
    "DEFAULT_N_SEQS",
    "N_SEQS_OPTION",
    "OPT_IN",
    "Task",
    "artifacts",
    "benchmark_artifacts",
    "benchmark_figures",
    "benchmark_texts",
    "check_benchmarks",
    "evaluation_tasks",
    "failure",
    "merge_parts",
    "held_out_counts",
    "is_skipped",
    "run_benchmark",
    "run_benchmarks",
    "run_benchmarks_at",
    "run_benchmarks_many",
    "run_options",
    "run_split",
    "run_tasks",
    "scalars",
    "split_tasks",
    "tagged_figures",
    "tagged_scalars",
    "tagged_texts",
    "task_cost",
    "tokens_per_benchmark",
]
