"""Many SAEs from one LM pass: a sweep of TopK SAEs and g-SAEs that read the same hook.

The g-SAE paper's Table 1 trains TopK and g-SAE at five k each on the same activations. Run separately, every
run repeats the same LM forward and, for g-SAEs, the same ``∇ₓL`` (the clean model's loss gradient does not
depend on the SAE). :class:`SweepSAESystem` harvests once per batch — the activations, and ``∇ₓL`` if any
member is a g-SAE — mixes them through one shuffle buffer, and trains every member on them:

- each member has its own SAE (class, ``d_sae``, ``k``, ``β``, init ``seed``), its own optimizer state (one
  torch optimizer with a parameter group per member: Adam's state is per parameter, so this is N separate Adams),
  learning rate, warm-up and schedule (``LambdaLR`` with one multiplier per group), gradient clipping (each
  member's gradient norm is clipped on its own, as a run of that SAE alone would), dead-latent counters,
  ``b_dec``/loss-scale initialisation, and validation sums;
- each member's loss is exactly the loss :class:`~gsae.systems.LocalSAESystem` gives that SAE; the step's loss
  is their sum, and the members' parameters are disjoint, so one backward gives every member the gradient of
  its own loss (DDP averages them exactly as for one SAE);
- TopK members ignore the gradient; g-SAE members share the one harvest (one forward + one backward to the hook),
  so a sweep with g-SAEs costs one g-SAE harvest, not one per g-SAE member;
- on a GPU, members of one shape at one hook (``d_sae``, ``relu_after_topk``; TopK and g-SAE, any ``k``, ``β``,
  ``k_aux``) are stepped as one stacked pass (:mod:`gsae.sae.stacked`; ``stack_members``): one batched encoder,
  a top-k per distinct ``k``, one decode and one backward for all of them, so the launches per step (a GPU's host
  cost) stop growing by ~40 per member; AuxK, the dead-latent counters and the decoder constraints stay per member.

Members may read different hooks (a member's ``hook``; the paper's §4.6 SAEs at layers 3, 5, 7 and 9 in one run):
the harvest is still one LM pass — a forward to the deepest hook and, with g-SAEs, one backward from the LM loss to
the shallowest g-SAE hook, whose ``torch.autograd.grad`` returns ``∇ₓL`` at every g-SAE hook (each the gradient a
run at that hook alone takes, :meth:`~gsae.lm.LanguageModel.activations_and_grads_at`). A harvested row holds the
token's activations at every hook side by side (and its gradients at the g-SAE hooks), so rows stay aligned through
the one shuffle buffer; each member reads its hook's columns, and is initialised, evaluated and exported at it.

So a member ends where that SAE trained alone (``LocalSAESystem``, the same options, ``seed`` and tokens) ends —
tested, after n steps, after a resume and under 2-rank DDP. Logs go to ``train/<member>/<metric>`` and
``val/<member>/<metric>``, which TensorBoard gets as ``train/<metric>`` in the member's own run (``version_N/<member>/``,
:class:`gsae.loggers.TensorBoardLogger`); every checkpoint holds all members (``gsae`` → ``members``) and gets one SAELens
export, evaluation JSON and latent dashboard per member (``<checkpoint>.<member>.saelens/``, …).

E2E members are not supported (a choice, by cost): each needs its own patched suffix forward and backward (the
SAE output feeds the rest of the model), so a sweep would share only the clean prefix and the clean-logits suffix —
at GPT-2 small's L7 about 40% of an e2e step (prefix + 1 of its 3 suffix passes) — while holding N patched graphs
through the unembedding at once; a local sweep shares ~all of the LM cost. Run E2E SAEs as separate runs.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from gsae.data.batch import ActivationBatch, TokenBatch
from gsae.data.harvest import loss_gradients_at
from gsae.lm import LanguageModel
from gsae.loggers import RESERVED_MEMBER_NAMES
from gsae.metrics import (
    DeadLatentTracker,
    ReconMetric,
    ReconSums,
    fire_counts,
    host_floats,
    l0_per_token,
    recon_metric_tensors,
    recon_sums,
    recon_sums_stacked,
)
from gsae.sae.base import SAEOutput, SparseAutoencoder, sse_loss
from gsae.sae.grad_topk import GradTopKSAE
from gsae.sae.stacked import StackPlan, normalize_decoders, remove_parallel_grads, stacked_forward, stacks
from gsae.systems.base import NonFiniteLossError, _adam, check_optimizer_groups, lr_factor
from gsae.systems.local import LocalSAESystem

#: Keys a member may set (besides ``name`` and ``sae``): its optimizer group and schedule, overriding the sweep's.
MEMBER_OPTIONS = ("lr", "optimizer", "lr_warmup_steps", "lr_schedule", "lr_min_ratio", "gradient_clip_val")
DEFAULT_HOOK = "blocks.7.hook_resid_post"
#: a sweep's step scalars for the progress bar and the run summary only: the members' mean nmse, L0 and dead fraction,
#: and the members' summed loss (each member's own are ``train/<member>/...``)
SWEEP_CONSOLE_ONLY = frozenset({"train/loss", "train/nmse", "train/l0", "train/dead_fraction"})
#: the validation metrics whose mean over members the console's val line and the summary show (console only too)
VAL_MEANS = ("nmse", "explained_variance", "l0")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$")


def _plain(obj: Any) -> Any:
    """``obj`` with jsonargparse ``Namespace``s turned into dicts (recursively); other values unchanged."""
    if hasattr(obj, "as_dict") and not isinstance(obj, dict):
        obj = obj.as_dict()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def build_member_sae(spec: Any, d_in: int, where: str) -> SparseAutoencoder:
    """An SAE from a member's ``sae``: a ``{class_path, init_args}`` mapping (short class names resolve in
    ``gsae.sae``) or a callable taking ``d_in`` (Python use)."""
    if callable(spec):
        return spec(d_in)
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"{where}.sae must be a mapping with class_path (and init_args), got {spec!r}")
    path = str(spec["class_path"])
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module or "gsae.sae"), name)
    except (ImportError, AttributeError):
        raise ValueError(f"{where}.sae.class_path: no SAE class {path!r} (e.g. gsae.sae.TopKSAE, gsae.sae.GradTopKSAE)") from None
    if not (isinstance(cls, type) and issubclass(cls, SparseAutoencoder)):
        raise ValueError(f"{where}.sae.class_path: {path!r} is not a gsae SparseAutoencoder")
    args = dict(spec.get("init_args") or {})
    args.pop("d_in", None)  # linked from the hook
    args = _typed_init_args(cls, args, f"{where}.sae.init_args")
    try:
        return cls(d_in, **args)
    except TypeError as e:
        raise ValueError(f"{where}.sae.init_args: {e}") from None
    except ValueError as e:  # the SAE's own check names a one-SAE run's option (--model.sae.k): the member's here
        text = str(e)
        if text.startswith("--model.sae."):
            raise ValueError(f"{where}.sae.init_args.{text.removeprefix('--model.sae.')}") from None
        raise


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _typed_init_args(cls: type, args: dict, where: str) -> dict:
    """``args`` checked and converted against ``cls``'s signature by jsonargparse, as LightningCLI checks a one-SAE
    run's ``--model.sae.init_args`` (``k: 8.5`` trained until the first top-k raised mid-run, ``seed: 1.5`` said
    nothing of where): a one-line error naming ``<where>.<key>``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, skip={"d_in"})
    try:
        parsed = parser.parse_object(args).as_dict()
    except Exception as e:  # noqa: BLE001 - jsonargparse's ArgumentError, or a TypeError of its own checks
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        key = re.match(r'Parser key "([\w.]+)":', lines[0]) if lines else None
        unknown = re.match(r"Option '([\w.]+)' is not accepted", lines[0]) if lines else None
        if unknown:
            raise ValueError(f"{where}.{unknown[1]}: not an option of {cls.__name__}") from None
        if key and len(lines) > 1:
            typed = re.match(r"Expected a <class '(\w+)'>\. Got value: (.*)", lines[1])
            said = (f"expected {_TYPE_WORDS.get(typed[1], typed[1])}, got {typed[2]}" if typed
                    else "; ".join(lines[1:3]))
            raise ValueError(f"{where}.{key[1]}: {said}") from None
        raise ValueError(f"{where}: {lines[0] if lines else e}") from None
    return {k: parsed[k] for k in args}


def member_options(spec: dict, where: str) -> dict:
    """A member's :data:`MEMBER_OPTIONS`, checked as the sweep-level options are (one line naming
    ``--model.members[i].<option>``): ``lr`` a number > 0, ``lr_warmup_steps`` an integer >= 0, ``lr_min_ratio`` in
    [0, 1], ``gradient_clip_val`` >= 0, ``optimizer`` a mapping of the optimizer's group options (a YAML list such as
    ``betas: [0.9, 0.99]`` becomes the tuple torch keeps)."""
    options = {k: spec[k] for k in MEMBER_OPTIONS if k in spec}

    def number(key: str, kind: type = float) -> float:
        value = options[key]
        try:
            if isinstance(value, bool) or (kind is int and float(value) != int(value)):
                raise ValueError
            return kind(value)
        except (TypeError, ValueError):
            want = "an integer" if kind is int else "a number"
            raise ValueError(f"{where}.{key}: expected {want}, got {value!r}") from None

    if "lr" in options and not number("lr") > 0:
        raise ValueError(f"{where}.lr must be > 0 (got {options['lr']!r})")
    if "lr_warmup_steps" in options and number("lr_warmup_steps", int) < 0:
        raise ValueError(f"{where}.lr_warmup_steps must be >= 0 (got {options['lr_warmup_steps']!r})")
    if "lr_min_ratio" in options and not 0 <= number("lr_min_ratio") <= 1:
        raise ValueError(f"{where}.lr_min_ratio must be in [0, 1] (got {options['lr_min_ratio']!r})")
    if options.get("gradient_clip_val") is not None and number("gradient_clip_val") < 0:
        raise ValueError(f"{where}.gradient_clip_val must be >= 0 (got {options['gradient_clip_val']!r})")
    if options.get("lr_schedule", "cosine") not in ("cosine", "constant"):
        raise ValueError(f"{where}.lr_schedule must be cosine or constant (got {options['lr_schedule']!r})")
    opt = options.get("optimizer")
    if opt is not None:
        if not isinstance(opt, dict):
            raise ValueError(f"{where}.optimizer must be a mapping of optimizer options (e.g. {{betas: [0.9, 0.99]}}), "
                             f"got {opt!r}")
        if "params" in opt or "lr" in opt:
            raise ValueError(f"{where}.optimizer: give the member's learning rate as {where}.lr")
        options["optimizer"] = {k: tuple(v) if isinstance(v, list) else v for k, v in opt.items()}
    return options


class SweepMember(nn.Module):
    """One SAE of a sweep and everything a run of it alone would keep: hook, counters, init flags, options."""

    def __init__(
        self, name: str, sae: SparseAutoencoder, dead_batches: int, dead_tokens: int, options: dict, hook: str
    ) -> None:
        super().__init__()
        self.name = name
        self.hook = hook
        self.sae = sae
        self.dead = DeadLatentTracker(sae.d_sae, dead_batches, dead_tokens, sae.uses_dead_mask)
        self.val_recon = ReconMetric(sae.d_in)
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("act_scale", torch.tensor(1.0))
        self.options = options
        self.init_from: tuple[str, str] | None = None  # (source, option) of a warm start (gsae.warm_start)

    @property
    def needs_grad(self) -> bool:
        return isinstance(self.sae, GradTopKSAE)


class SweepSAESystem(LocalSAESystem):
    """Trains several TopK SAEs and g-SAEs on one hook from one harvest per batch (see the module docstring)."""

    builds_own_saes = True

    def __init__(
        self,
        lm: LanguageModel,
        members: list[dict[str, Any]],
        hook: str | None = None,
        optimizer: OptimizerCallable = _adam,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        lr_warmup_steps: int = 0,
        lr_min_ratio: float = 0.1,
        b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median",
        exclude_special_tokens: bool = True,
        dead_batches: int = 5,
        dead_tokens: int = 10_000_000,
        dead_activity_test: Literal["nonzero", "sum_positive"] = "nonzero",
        seed: int = 0,
        buffer_size: int = 0,
        grad_reduction: Literal["mean", "sum"] = "mean",
        grad_mean_tokens: int | None = None,
        stack_members: bool | None = None,
    ) -> None:
        """A sweep: the members, and the options every member shares unless it sets its own.

        Args:
            lm: the frozen language model.
            members: one mapping per SAE: ``name`` (letters, digits, ``_``, ``-``; unique; default ``m<i>``),
                ``sae`` (``{class_path, init_args}`` as for ``LocalSAESystem``'s ``sae``; the init ``seed`` is an
                SAE option), and optionally ``hook`` (default: ``hook``), ``init_from`` (start from another SAE's
                weights: ``LocalSAESystem``'s ``init_from``), ``lr``, ``optimizer`` (other per-group
                options, e.g. ``betas``), ``lr_warmup_steps``, ``lr_schedule``, ``lr_min_ratio`` and
                ``gradient_clip_val`` (default ``--trainer.gradient_clip_val``, applied to this member's gradient
                norm alone). Members on several hooks share one LM pass (one forward to the deepest hook and, with
                g-SAEs, one backward to the shallowest g-SAE hook); the hooks must then be on the residual stream.
            hook: the hook of every member that does not name its own (default ``blocks.7.hook_resid_post``).
            optimizer, lr_schedule, lr_warmup_steps, lr_min_ratio, b_dec_init, exclude_special_tokens,
                dead_batches, dead_tokens, dead_activity_test, seed, buffer_size, grad_reduction, grad_mean_tokens: as for
                :class:`~gsae.systems.LocalSAESystem`, shared by every member (the LR options are the defaults a
                member may override; ``optimizer`` is one optimizer with a parameter group per member; ``seed``
                seeds the one shuffle buffer, each SAE's init has its own ``seed``); ``buffer_size`` is in
                tokens per device and holds the shared activations (and gradients) once, not once per member.
            stack_members: step the members that share a hook, ``d_in``, ``d_sae``, ``relu_after_topk``,
                ``unit_norm_decoder`` and dtype
                (TopK and g-SAE alike, any ``k``, ``β``, ``k_aux``, seed, lr) as one batched pass
                (:mod:`gsae.sae.stacked`: a few kernels for all of them instead of ~40 per member; the same
                results up to float rounding); ``false`` steps each member on its own. Default (``null``): on a
                GPU, where a member's step is host-bound (launches), and off on the CPU, where it is FLOP-bound and
                the stack's working set (every member's ``(B, d_sae)`` pre-activations at once, 1 GiB for Table 1
                at 2048 rows) made a GPT-2-shape sweep step 28% slower (``benchmarks/README.md``).
        """
        members = _plain(members)  # jsonargparse hands nested class_path mappings over as Namespaces
        if not isinstance(members, (list, tuple)) or not members:
            raise ValueError("--model.members must be a non-empty list of {name, sae, ...} mappings")
        for i, spec in enumerate(members):
            if not isinstance(spec, dict):
                raise ValueError(f"--model.members[{i}] must be a mapping with name and sae, got {spec!r}")
        if hook is None:  # the run's hook (checkpoints record it): the default, unless every member names its own
            named = [m.get("hook") for m in members]
            hook = str(named[0]) if all(named) else DEFAULT_HOOK
        super().__init__(
            lm, None, hook=hook, optimizer=optimizer, lr_schedule=lr_schedule, lr_warmup_steps=lr_warmup_steps,
            lr_min_ratio=lr_min_ratio, b_dec_init=b_dec_init, exclude_special_tokens=exclude_special_tokens,
            dead_batches=dead_batches, dead_tokens=dead_tokens, dead_activity_test=dead_activity_test, seed=seed,
            buffer_size=buffer_size,
            grad_reduction=grad_reduction, grad_mean_tokens=grad_mean_tokens,
        )
        self.save_hyperparameters(ignore=["lm", "optimizer"])
        if any(callable(m.get("sae")) for m in members):
            self.hparams.pop("members", None)  # Python factories do not pickle; the 'gsae' section describes members
        built: dict[str, SweepMember] = {}
        for i, spec in enumerate(members):
            where = f"--model.members[{i}]"
            name = str(spec.get("name", f"m{i}"))
            if not _NAME.match(name):
                raise ValueError(f"{where}.name {name!r}: use letters, digits, '_' and '-' only")
            if name in RESERVED_MEMBER_NAMES:
                raise ValueError(f"{where}.name {name!r}: the run's own TensorBoard tags use it (eval/{name}/…); "
                                 "choose another")
            if name in built:
                raise ValueError(f"{where}.name {name!r} is used twice")
            unknown = set(spec) - {"name", "sae", "hook", "init_from", *MEMBER_OPTIONS}
            if unknown:
                raise ValueError(f"{where}: unknown keys {sorted(unknown)}; a member has name, sae, hook, init_from, "
                                 f"{', '.join(MEMBER_OPTIONS)}")
            if "sae" not in spec:
                raise ValueError(f"{where}.sae is required")
            options = member_options(spec, where)
            hook = lm.validate_hook(str(spec.get("hook", self.hook)), option=f"{where}.hook")
            sae = build_member_sae(spec["sae"], lm.d_in(hook), where)
            built[name] = SweepMember(name, sae, self.hparams.dead_batches, self.hparams.dead_tokens, options, hook)
            if spec.get("init_from"):
                built[name].init_from = (str(spec["init_from"]), f"{where}.init_from")
        self._check_member_optimizer_keys([m.options.get("optimizer") or {} for m in built.values()])
        self.members = nn.ModuleDict(built)
        #: the hooks the members read (first-use order), and those some g-SAE reads (its ∇ₓL is harvested there)
        self.hooks = list(dict.fromkeys(m.hook for m in built.values()))
        self.grad_hooks = [h for h in self.hooks if any(m.needs_grad and m.hook == h for m in built.values())]
        if len(self.hooks) == 1:  # the one-hook harvest (LocalSAESystem's) reads self.hook: the members' own, not the
            self.hook = self.hooks[0]  # run's default (members all on another hook trained on --model.hook's rows)
        if len(self.hooks) > 1:
            off = [f"{m.name}: {m.hook}" for m in built.values() if lm.hook_depth(m.hook) is None]
            if off:
                raise ValueError(
                    "--model.members: members on several hooks share one LM pass, so every hook must be on the residual "
                    f"stream (blocks.L.hook_resid_pre/mid/post, hook_attn_out, hook_mlp_out); got {', '.join(off)}"
                )
        self._widths = [lm.d_in(h) for h in self.hooks]
        self.stack_members = stack_members
        self._stacks: list[StackPlan | SweepMember] | None = None  # member_stacks(), decided at the first step
        self._stack_names: list[list[str]] = []
        self._grad_widths = [lm.d_in(h) for h in self.grad_hooks]

    def _check_member_optimizer_keys(self, options: list[dict]) -> None:
        """A member's ``optimizer`` keys must be group options of the run's optimizer (``--model.optimizer``): torch
        keeps any key in a parameter group without a word, so ``betaz`` or ``weight_decy`` trained a plain Adam."""
        if not any(options):
            return
        probe = self.optimizer_factory([nn.Parameter(torch.zeros(1))])
        known = set(probe.defaults)
        for i, opts in enumerate(options):
            for key in opts:
                if key not in known:
                    raise ValueError(
                        f"--model.members[{i}].optimizer.{key}: not a group option of {type(probe).__name__} (--model."
                        f"optimizer; a member's optimizer sets its group's {', '.join(sorted(known - {'lr'}))})")

    # ------------------------------------------------------------------ what this module trains
    def saes(self) -> dict[str, tuple[SparseAutoencoder, dict]]:
        return {name: (m.sae, self.describe_member(name)) for name, m in self.members.items()}

    def grad_saes(self) -> list[GradTopKSAE]:
        return [m.sae for m in self.members.values() if m.needs_grad]

    def warm_sources(self) -> list[tuple[SparseAutoencoder, str, str, str]]:
        return [(m.sae, m.init_from[0], m.hook, m.init_from[1]) for m in self.members.values() if m.init_from]

    # ------------------------------------------------------------------ the step
    def harvest(self, tokens: Tensor, keep: Tensor | None = None) -> ActivationBatch:
        """As :meth:`LocalSAESystem.harvest`, at every member's hook from one LM pass (one forward, and one backward
        if a g-SAE reads any of them): ``x`` holds the hooks' activations side by side (:attr:`hooks` order),
        ``grad`` the gradient hooks' (:attr:`grad_hooks`), so the rows travel through the shuffle buffer together."""
        if len(self.hooks) == 1:
            return super().harvest(tokens, keep)
        lm = self.frozen_lm()
        mask = self.token_mask(tokens) if keep is None else None
        n = self.harvest_grad_normaliser(tokens)
        if n is not None:
            acts, grads = loss_gradients_at(lm, tokens, self.hooks, self.grad_hooks, n)
            g = self.select_rows(torch.cat([grads[h] for h in self.grad_hooks], -1), mask, keep).float()
        else:
            acts, g = lm.activations_at(tokens, self.hooks), None
        return ActivationBatch(self.select_rows(torch.cat([acts[h] for h in self.hooks], -1), mask, keep).float(), g)

    def split_hooks(self, acts: ActivationBatch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``({hook: x}, {gradient hook: ∇ₓL})``: a harvest's columns per hook (contiguous, one copy per hook and
        step, none for a one-hook sweep)."""
        xs = {h: t.contiguous() for h, t in zip(self.hooks, acts.x.split(self._widths, dim=1))}
        gs = {}
        if acts.grad is not None:
            gs = {h: t.contiguous() for h, t in zip(self.grad_hooks, acts.grad.split(self._grad_widths, dim=1))}
        return xs, gs

    @torch.no_grad()
    def _initialize_members(self, xs: dict[str, Tensor]) -> None:
        if self._initialized_seen:
            return
        todo = [m for m in self.members.values() if not bool(m.initialized)]
        if not todo:
            self._initialized_seen = True  # host copy: reading the members' buffers waits for the GPU
            return
        for hook in self.hooks:  # b_dec and the loss scale from the global first batch at the member's own hook
            at = [m for m in todo if m.hook == hook]
            if not at:
                continue
            rows, scale = self.first_batch_statistics(xs[hook])
            for m in at:
                if not self.warm_started(m.sae):  # a warm start keeps its source's b_dec
                    m.sae.init_b_dec(rows, self.b_dec_init)
                m.act_scale.fill_(scale)
                m.initialized.fill_(True)

    def member_stacks(self, rows: int) -> list[StackPlan | SweepMember]:
        """The members as this step runs them: :class:`~gsae.sae.stacked.StackPlan`\\ s of the members that share a
        hook and a :func:`~gsae.sae.stacked.stack_key` (two or more; ``stack_members``), and the other members alone.
        Decided once, from the configured rows per step (else the first step's ``rows``), so every DDP rank groups
        alike (their packed all-reduce is laid out by it)."""
        if self._stacks is None:
            names = list(self.members)
            if self.stack_members or (self.stack_members is None and self.device.type == "cuda"):
                saes = [m.sae for m in self.members.values()]
                dm = self._trainer.datamodule if self._trainer is not None else None
                planned = rows  # the shuffle buffer hands on as many rows as it takes in
                if dm is not None and hasattr(dm, "batch_size") and hasattr(dm, "context_size"):
                    planned = int(dm.batch_size * dm.context_size)
                by_hook: dict[str, list[int]] = {}
                for i, m in enumerate(self.members.values()):
                    by_hook.setdefault(m.hook, []).append(i)
                groups = []
                for at in by_hook.values():
                    groups += [[at[j] for j in g] for g in stacks([saes[i] for i in at], planned)]
            else:
                groups = [[i] for i in range(len(names))]
            groups.sort(key=min)  # in the members' order of first appearance (each stack is ordered by k)
            self._stacks = [
                StackPlan([self.members[names[i]].sae for i in g]) if len(g) > 1 else self.members[names[g[0]]]
                for g in groups
            ]
            self._stack_names = [[names[i] for i in g] for g in groups]
        return self._stacks

    def shared_step(self, batch: TokenBatch, stage: str) -> Tensor:
        acts = self.harvest(batch.tokens, batch.keep)
        train = stage == "train"
        if train:
            acts = self.buffer.mix(acts)
        xs, gs = self.split_hooks(acts)
        if train:
            self._initialize_members(xs)
        world = self._world()
        log = train and self.log_this_step()
        n_global = self.all_reduce(torch.full((), float(acts.x.shape[0]), device=self.device))  # a fill, not a copy from the host
        logs: dict[str, dict[str, Tensor]] = {}
        packed: list[Tensor] = []
        at: dict[str, int] = {}  # member → offset of its fired mask in the packed vector (after the token count)
        grad_terms: list[Tensor] = []  # the step's loss is their sum
        member_loss: dict[str, Tensor] = {}  # detached, for the finiteness check and the logs
        per_token = world / n_global.clamp_min(1)
        # LocalSAESystem's normaliser (aux_norm) of every member, for recon and AuxK: one division, not one per member
        norms = dict(zip(self.members, per_token / torch.stack([m.act_scale for m in self.members.values()])))
        offset = 1

        sums: dict[str, list[Tensor]] = {}  # logging steps: each member's metric sums, packed in the members' order

        def member_metrics(name: str, m: SweepMember, out: SAEOutput, x: Tensor, grad: Tensor | None, loss, recon,
                           row: Tensor | None = None):
            """The member's extra scalars and sums on a logging step (packed after every fired mask; ``row``: its
            :class:`ReconSums` already computed with its stack's), or its validation sums."""
            if not train:
                m.val_recon.update(x, out.x_hat, l0_per_token(out.top_acts, out.latents))
                return
            if log:  # metrics only on logging steps (see log_this_step); the scalars averaged over ranks
                extra = {"loss": loss, "recon_loss": recon}  # (unpack_scalars)
                if m.sae.uses_dead_mask:  # AuxK (k_aux 0, as every Table 1 member: always 0, not logged)
                    extra["aux_loss"] = out.aux_loss.detach()
                if grad is not None:
                    extra["beta_attribution_median"] = self.attribution_median(m.sae, grad, out.top_idx)
                logs[name] = extra
                if row is None:
                    row = recon_sums(x, out.x_hat, l0_per_token(out.top_acts, out.latents)).flat()
                sums[name] = [row, *self.pack_scalars(extra)]

        for unit, names in zip(self.member_stacks(acts.x.shape[0]), self._stack_names):
            ms = [self.members[n] for n in names]
            x = xs[ms[0].hook]
            grad = gs.get(ms[0].hook) if any(m.needs_grad for m in ms) else None
            if isinstance(unit, StackPlan):  # the members in one batched pass (gsae.sae.stacked)
                x_hat, pre = stacked_forward(unit, x, grad)
                dtype = torch.promote_types(x_hat.dtype, x.dtype)  # as sse_loss
                sse = F.mse_loss(x_hat.to(dtype), x.to(dtype).expand_as(x_hat), reduction="none").sum((1, 2))
                recon = sse * torch.stack([norms[n] for n in names])
                grad_terms.append(recon.sum())
                if train:  # every member's fire counts in one pass over the stacked latents
                    with torch.no_grad():
                        packed.append(fire_counts(unit.gidx, unit.acts, None, unit.n * unit.d_sae, torch.float64,
                                              self.dead_activity_test))
                recon_d = recon.detach()
                rows = None  # a logging step: every member's ReconSums in one pass (metrics.recon_sums_stacked)
                if log:
                    with torch.no_grad():
                        rows = recon_sums_stacked(x, x_hat.detach(), unit.l0_per_token(x.shape[0]))
                zero = x_hat.new_zeros(())  # AuxK's loss when it has none, and the sparsity loss (TopK: none)
                for i, (name, m) in enumerate(zip(names, ms)):
                    at[name] = offset + i * unit.d_sae
                    top_acts, top_idx = unit.top[i]
                    dead = self.dead_mask(m.sae, m.dead, stage)
                    aux = m.sae.auxk_loss(x, x_hat[i], pre[i], dead, norms[name], zero=zero)
                    loss = recon_d[i]
                    if m.sae.uses_dead_mask and dead is not None:
                        grad_terms.append(aux)
                        loss = loss + aux.detach()
                    member_loss[name] = loss
                    out = SAEOutput(x_hat[i], top_acts, top_idx, None, pre[i], aux, zero)
                    with torch.no_grad():
                        member_metrics(name, m, out, x, grad if m.needs_grad else None, loss, recon_d[i],
                                       None if rows is None else rows[i])
                if train:
                    offset += unit.n * unit.d_sae
                unit.top, unit.gidx, unit.acts = [], None, None
                del x_hat, pre
                continue
            (name,), m = names, unit
            dead = self.dead_mask(m.sae, m.dead, stage)
            out = m.sae(x, grad=grad, dead_mask=dead, aux_norm=norms[name])
            recon = sse_loss(out.x_hat, x) * norms[name]
            loss = self.sae_loss(recon, out, m.sae, self.rank_share(x.shape[0], n_global))
            grad_terms.append(loss)
            member_loss[name] = loss.detach()
            with torch.no_grad():
                if train:
                    packed.append(fire_counts(out.top_idx, out.top_acts, out.latents, m.sae.d_sae, torch.float64,
                                              self.dead_activity_test))
                    at[name] = offset
                    offset += m.sae.d_sae
                member_metrics(name, m, out, x, grad, loss.detach(), recon.detach())
            del out
        for name in self.members:  # logging steps: each member's sums and scalars, after every fired mask
            packed += sums.get(name, [])
        total = grad_terms[0] if len(grad_terms) == 1 else torch.stack(grad_terms).sum()
        if not train:
            return total
        # every member's loss checked at once, before the backward: one wait for the device, not one per member
        stacked = torch.stack([member_loss[n] for n in self.members])
        finite = torch.isfinite(stacked)
        if not bool(finite.all()):
            name, loss = next((n, v) for n, v, ok in zip(self.members, stacked.tolist(), finite.tolist()) if not ok)
            raise NonFiniteLossError(
                f"non-finite training loss of member {name} ({float(loss)}) at step {self.global_step}; "
                f"stopping ({self.after_nonfinite('a lower lr for that member')})"
            )
        # one all-reduce for the token count, every member's fired mask and (logging steps) metric sums
        count = torch.full((1,), float(acts.x.shape[0]), dtype=torch.float64, device=acts.x.device)
        flat = self.all_reduce(torch.cat([count, *packed]))
        # on one process the host knows the count (no wait for the GPU); over ranks, the reduced one
        n_tokens = acts.x.shape[0] if world == 1 else int(flat[0])
        metrics: dict[str, Tensor | float] = {}
        new_batch = self.starts_optimizer_step()
        idle = flat.le(0).long()  # every member's not-fired mask at once (the metric sums after them are not read)
        DeadLatentTracker.update_many(
            [m.dead for m in self.members.values()],
            [idle[at[name] : at[name] + m.sae.d_sae] for name, m in self.members.items()], n_tokens, new_batch,
        )
        if log:
            for name, m in self.members.items():  # the sums after the fired masks, in the members' order (as packed)
                width = len(ReconSums._fields) - 1 + m.sae.d_in
                sums = ReconSums.unflat(flat[offset : offset + width])
                offset += width
                for k, v in recon_metric_tensors(sums).items():
                    metrics[f"train/{name}/{k}"] = v
                scalars = self.unpack_scalars(logs[name], flat[offset : offset + len(logs[name])])
                offset += len(logs[name])
                for k, v in scalars.items():
                    metrics[f"train/{name}/{k}"] = v
                metrics[f"train/{name}/dead_fraction"] = m.dead.dead_by_batches().float().mean()
                metrics[f"train/{name}/dead_fraction_tokens"] = m.dead.dead_by_tokens().float().mean()
        self.tokens_seen += n_tokens
        if log:
            metrics["train/loss"] = sum(metrics[f"train/{name}/loss"] for name in self.members)  # the members' sum
            self._log_sweep(host_floats(metrics))  # one copy to the host for every member's metrics
        return total

    def session_hparams(self) -> dict[str, dict[str, Any]]:
        """The base's row per member, with the options the member sets (schedule, warm-up, clipping)."""
        rows = super().session_hparams()
        for name, m in self.members.items():
            rows[name].update({k: v for k, v in m.options.items() if k not in ("lr", "optimizer")})
        return rows

    def _log_sweep(self, metrics: dict[str, float]) -> None:
        names = list(self.members)
        mean = lambda key: sum(metrics[f"train/{n}/{key}"] for n in names) / len(names)  # noqa: E731
        for key in ("nmse", "l0", "dead_fraction"):  # the progress bar's headline: the mean over members
            metrics[f"train/{key}"] = mean(key)
        metrics.update(self.progress_metrics())
        if self._trainer is not None and self.trainer.optimizers:
            for n, group in zip(names, self.trainer.optimizers[0].param_groups):
                metrics[f"lr/{n}"] = group["lr"]
        # the means (and train/loss, the members' sum) are the console's and the summary's, not TensorBoard curves:
        # beside single SAEs' train/l0 or train/loss they would read as one SAE's (an L0 of 12 no member has)
        self.log_step_metrics(metrics, console_only=SWEEP_CONSOLE_ONLY)

    def objective(self, batch: TokenBatch, stage: str):  # pragma: no cover - shared_step does the work
        raise NotImplementedError("SweepSAESystem computes every member's loss in shared_step")

    def on_validation_epoch_start(self) -> None:
        for m in self.members.values():
            m.val_recon.reset()

    def on_validation_epoch_end(self) -> None:
        per_member: dict[str, list[float]] = {}
        metrics: dict[str, float] = {}
        for name, m in self.members.items():
            if m.val_recon.update_count == 0:
                continue
            for k, v in host_floats(m.val_recon.compute()).items():  # reduced over ranks by torchmetrics
                metrics[f"val/{name}/{k}"] = v
                per_member.setdefault(k, []).append(v)
        # the console's validation line and the run summary's val row: the mean over members, as train/<metric>
        # (not sent to the loggers: see SWEEP_CONSOLE_ONLY)
        means = {f"val/{k}": sum(per_member[k]) / len(per_member[k]) for k in VAL_MEANS if per_member.get(k)}
        self.log_validation_metrics({**metrics, **means}, console_only=means)

    # ------------------------------------------------------------------ decoder constraints, per member or per stack
    def _decoder_units(self) -> list[StackPlan | SparseAutoencoder]:
        """The SAEs with unit-norm decoders, a stack as one (its constraints in one pass, :mod:`gsae.sae.stacked`)."""
        if self._stacks is None:  # no step yet: each member alone
            return [m.sae for m in self.members.values() if m.sae.unit_norm_decoder]
        units = [u if isinstance(u, StackPlan) else u.sae for u in self._stacks]
        return [u for u in units if (u.saes[0] if isinstance(u, StackPlan) else u).unit_norm_decoder]

    def on_after_backward(self) -> None:
        for unit in self._decoder_units():
            if isinstance(unit, StackPlan):
                remove_parallel_grads(unit)
            else:
                unit.remove_parallel_grad()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        pl.LightningModule.optimizer_step(self, *args, **kwargs)  # renormalise inside the step, as SAESystem does
        for unit in self._decoder_units():
            if isinstance(unit, StackPlan):
                normalize_decoders(unit)
            else:
                unit.normalize_decoder()
        self.mark_step_end()

    # ------------------------------------------------------------------ optimizer: a parameter group per member
    def configure_optimizers(self):
        groups = []
        for m in self.members.values():
            group: dict[str, Any] = {"params": list(m.sae.parameters())}
            group.update(m.options.get("optimizer") or {})
            if "lr" in m.options:
                group["lr"] = float(m.options["lr"])
            groups.append(group)
        opt = self.optimizer_factory(groups)
        check_optimizer_groups(opt, [f"--model.members[{i}]" if m.options.keys() & {"lr", "optimizer"} else "--model.optimizer"
                                     for i, m in enumerate(self.members.values())])
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        for i, m in enumerate(self.members.values()):
            own = "lr_warmup_steps" in m.options
            self.say_if_warmup_outlasts(total, int(m.options.get("lr_warmup_steps", self.lr_warmup_steps)),
                                        f"--model.members[{i}].lr_warmup_steps" if own else "--model.lr_warmup_steps")
        factors = [
            lr_factor(
                total,
                int(m.options.get("lr_warmup_steps", self.lr_warmup_steps)),
                m.options.get("lr_schedule", self.lr_schedule),
                float(m.options.get("lr_min_ratio", self.lr_min_ratio)),
            )
            for m in self.members.values()
        ]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factors)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip each member's gradient on its own (a run of that SAE alone clips its own norm)."""
        for m, group in zip(self.members.values(), optimizer.param_groups):
            clip = m.options.get("gradient_clip_val", gradient_clip_val)
            if not clip:
                continue
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(group["params"], float(clip))
            else:
                torch.nn.utils.clip_grad_norm_(group["params"], float(clip))

    # ------------------------------------------------------------------ checkpoints
    def describe_member(self, name: str) -> dict:
        """A member's description, shaped like a one-SAE checkpoint's (exports and evaluation read it as such)."""
        m = self.members[name]
        return {**self.describe_sae(m.sae, "LocalSAESystem"), "hook": m.hook, "member": name}

    def describe(self) -> dict:
        return {
            **self.describe_run(),
            "objective": type(self).__name__,
            "members": {name: self.describe_member(name) for name in self.members},
        }

    def check_resumable(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("gsae")
        if meta is None or "members" not in meta:
            if meta is not None and meta.get("objective"):
                raise ValueError(f"--ckpt_path: a one-SAE checkpoint (trained by {meta['objective']}) does not resume "
                                 "a sweep; resume it with the config it was trained with")
            raise ValueError("--ckpt_path: not a gsae sweep checkpoint (no 'gsae' → 'members' section)")
        self.check_saved_objective(meta.get("objective"))
        self.check_saved_lm(meta.get("lm"))  # first: another LM changes d_in, and would be reported as another SAE
        saved = meta["members"]
        if list(saved) != list(self.members):
            raise ValueError(
                f"--ckpt_path: the checkpoint's members {list(saved)} differ from --model.members {list(self.members)}"
            )
        for name, m in self.members.items():
            hook = saved[name].get("hook", meta["hook"])
            if hook != m.hook:
                raise ValueError(f"--ckpt_path: member {name} was trained at hook {hook!r}, --model.members sets {m.hook!r}")
            self.check_saved_sae(saved[name]["sae_config"], m.sae, f"member {name}", saved[name].get("sae_class"))
