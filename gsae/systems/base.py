"""Shared machinery of every training objective: the frozen LM, the SAE, optimizer and schedule,
decoder constraints, dead-latent counters, DDP-exact reductions, checkpoints that describe themselves."""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Collection
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from gsae import __version__
from gsae.data.batch import ActivationBatch, TokenBatch
from gsae.lm import LanguageModel
from gsae.metrics import (
    DeadLatentTracker,
    ReconMetric,
    ReconSums,
    fire_counts,
    host_floats,
    l0_per_token,
    recon_metric_tensors,
    recon_sums,
)
from gsae.optim import Adam
from gsae.sae.base import SAEOutput, SparseAutoencoder

log = logging.getLogger(__name__)
# validation metrics are torchmetrics states reduced over ranks in compute(); Lightning cannot tell and asks for
# sync_dist=True once per logged name (a sweep logs dozens), which would only average identical values again
warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")
# SAESystem.on_before_batch_transfer serves runs without gsae's data module, which calls prepare_batch in its own hook
warnings.filterwarnings("ignore", message=r".*overridden `on_before_batch_transfer` in both.*")

SAEFactory = Callable[[int], SparseAutoencoder]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stops and the last good checkpoint is kept."""


def _adam(params):
    # fused: one kernel for all parameters (CPU and CUDA); ~2.5x faster than the default loop on CPU, same
    # updates to ~1e-8 (benchmarks/README.md); gsae.optim.Adam: without torch's copy of the transposed W_enc's grad
    return Adam(params, lr=1e-4, fused=True)


#: optimizer group options a resume takes from the configuration when it differs from the checkpoint's (the others,
#: e.g. ``amsgrad``, shape the optimizer's state: the checkpoint's stay); ``lr``: its own rule
RESUMABLE_GROUP_OPTIONS = ("betas", "eps", "weight_decay")


def check_optimizer_groups(opt: torch.optim.Optimizer, options: list[str]) -> None:
    """One-line errors for group options torch's optimizers take unchecked (torch checks only the defaults it is
    built with, and accepts ``lr 0``, which trains nothing): ``lr`` > 0, ``betas`` in [0, 1), ``eps`` and
    ``weight_decay`` >= 0. ``options[i]`` names where group ``i``'s options come from (``--model.optimizer``,
    ``--model.members[2]``)."""
    for group, option in zip(opt.param_groups, options):
        lr, betas = group.get("lr"), group.get("betas")
        if isinstance(lr, (int, float)) and not lr > 0:
            raise ValueError(f"{option}.lr must be > 0 (got {lr}): the SAE would not train")
        if betas is not None and not (len(betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"{option}.betas must be two numbers in [0, 1) (got {list(betas)})")
        for key in ("eps", "weight_decay"):
            value = group.get(key)
            if isinstance(value, (int, float)) and value < 0:
                raise ValueError(f"{option}.{key} must be >= 0 (got {value})")


def lr_factor(
    total: float, warm: int, schedule: str, floor: float
) -> Callable[[int], float]:
    """The LR multiplier of step ``step``: linear warm-up over ``warm`` steps, then cosine from 1 to ``floor`` over
    the remaining ``total − warm`` steps (or constant). An unknown length (``total`` infinite) means constant."""
    if math.isinf(total):
        log.warning("--trainer.max_steps is not set: the cosine schedule needs a length; using a constant LR")
        total, schedule = 1, "constant"
    total = max(int(total), 1)

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if schedule == "constant":
            return 1.0
        t = min(max(step - warm, 0) / max(total - warm, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


def sae_class_path(sae: SparseAutoencoder) -> str:
    """``module.Class`` of an SAE: what a checkpoint records (``sae_class``) and a resume compares."""
    return f"{type(sae).__module__}.{type(sae).__qualname__}"


class SAESystem(pl.LightningModule):
    """Base LightningModule: subclasses implement :meth:`objective` (the loss of one batch)."""

    #: whether the subclass builds its SAEs itself (a sweep's members) instead of taking ``sae``
    builds_own_saes = False

    def __init__(
        self,
        lm: LanguageModel,
        sae: SAEFactory | None,
        hook: str = "blocks.7.hook_resid_post",
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
        init_from: str | None = None,
    ) -> None:
        """Shared options of every objective.

        Args:
            lm: the frozen language model (never saved in checkpoints).
            sae: the SAE class and its options; ``d_in`` is filled in from the hook.
            hook: TransformerLens hook the SAE reads (and, for e2e, writes), e.g. ``blocks.7.hook_resid_post``.
            optimizer: optimizer class and options (default Adam, lr 1e-4, betas (0.9, 0.999), fused; SPEC §1.3).
            lr_schedule: ``cosine`` decays from the peak to ``lr_min_ratio × peak`` over the run; ``constant`` keeps the peak.
            lr_warmup_steps: linear warm-up steps from 0 to the peak learning rate.
            lr_min_ratio: final learning rate as a fraction of the peak (cosine; 0.1 gives 1e-4 -> 1e-5, as smol-sae).
            b_dec_init: set ``b_dec`` from the first global batch: its geometric median (default, Gao et al.'s;
                robust to GPT-2's huge-norm outliers), its mean, or zeros (smol-sae's, so the g-SAE paper's
                configs' and Braun et al.'s).
            exclude_special_tokens: drop activations at special-token positions (BOS/EOS) from the
                local objective (GPT-2's BOS position has outlier norms; SAELens masks them in evals).
            dead_batches: a latent is dead if it did not fire in this many consecutive batches (SPEC §1.5; paper: 5).
                A batch is one optimizer step's *global* batch (firing on any rank counts), so the window is
                ``dead_batches × batch_size × context_size × devices × num_nodes`` tokens (before special tokens
                are dropped): at a fixed per-device ``batch_size`` more devices widen it; keep the global batch
                fixed (divide ``batch_size`` by the device count) to keep the paper's window. Under
                ``accumulate_grad_batches`` N, a step's N micro-batches are one batch of the window.
            dead_tokens: a latent is dead if it did not fire in this many tokens (Gao et al.: 10M); AuxK uses this one.
            dead_activity_test: what "fired in a batch" means for both counters: ``nonzero`` (default, SPEC §1.5: a
                nonzero activation on some token of the global batch) or ``sum_positive`` (smol-sae's
                ``x_hid.sum(0) > 0``: the activations summed over the global batch are positive; without ReLU after
                TopK a latent whose kept values are negative then counts as not fired). The ``dead_latents`` benchmark's
                ``activity_test`` is the same choice.
            seed: seed of the shuffle buffer and other training randomness.
            init_from: start the SAE from another SAE's weights instead of its random init (fine-tuning: a local
                TopK SAE trained on end to end, a TopK SAE turned into a g-SAE): a gsae checkpoint (a sweep's member
                as ``CKPT:MEMBER``), a SAELens folder (``standard`` or ``topk``; gsae's ``*.saelens`` exports) or
                ``sae_lens:RELEASE/SAE_ID``, with this SAE's ``d_in`` and ``d_sae`` (:mod:`gsae.warm_start`: what
                is taken and converted). The optimizer, schedule and counters start fresh and ``b_dec_init`` is
                skipped. Read when a run starts, not when it resumes (the checkpoint holds the weights since).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["lm", "sae", "optimizer"])
        self.lm = lm
        self.hook = lm.validate_hook(hook)
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule
        if lr_warmup_steps < 0:
            raise ValueError(f"--model.lr_warmup_steps must be >= 0 (got {lr_warmup_steps})")
        if not 0 <= lr_min_ratio <= 1:
            raise ValueError(f"--model.lr_min_ratio must be in [0, 1] (got {lr_min_ratio})")
        self.lr_warmup_steps = lr_warmup_steps
        self.lr_min_ratio = lr_min_ratio
        self.b_dec_init = b_dec_init
        self.exclude_special_tokens = exclude_special_tokens
        if dead_activity_test not in ("nonzero", "sum_positive"):
            raise ValueError(f"--model.dead_activity_test must be nonzero or sum_positive (got {dead_activity_test!r})")
        self.dead_activity_test = dead_activity_test
        self.seed = seed
        self.init_from = None if init_from in (None, "") else str(init_from)
        self._warm_checked = False  # warm_start() ran (or a resume made it moot)
        self._warm_saes: list[SparseAutoencoder] = []  # those holding an init_from's weights: no b_dec_init
        if sae is None and not self.builds_own_saes:
            raise ValueError(f"--model.sae is required for {type(self).__name__} (e.g. --model.sae gsae.sae.TopKSAE "
                             "--model.sae.d_sae 1024 --model.sae.k 16); gsae.systems.SweepSAESystem takes --model.members")
        if sae is not None:  # a subclass training several SAEs (gsae.systems.SweepSAESystem) builds its own
            self.sae = sae(lm.d_in(self.hook))
            self.dead = DeadLatentTracker(self.sae.d_sae, dead_batches, dead_tokens, self.sae.uses_dead_mask)
            self.val_recon = ReconMetric(self.sae.d_in)  # validation sums over batches and ranks (not checkpointed)
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("act_scale", torch.tensor(1.0))  # E‖x − x̄‖² of the first batch: loss normaliser
        self.register_buffer("tokens_seen", torch.tensor(0, dtype=torch.long))
        self._t_last: float | None = None
        self._t_step_end: float | None = None  # when the latest optimizer step ended
        self._validated = False  # a validation ran since the latest training batch
        self._val_sums: dict[str, tuple] = {}  # validation extras: name -> (token-weighted sum, tokens) on this rank
        self._first_step = 0  # global step of this fit's first training step (set in on_train_start)
        self._initialized_seen = False  # host copy of `initialized` once True (reading the buffer waits for the GPU)
        self._tokens_last = 0
        self._mid_step = False  # the last training batch left its optimizer step to later micro-batches

    # ------------------------------------------------------------------ the frozen LM lives outside the module tree
    def __setattr__(self, name: str, value: Any) -> None:
        if name == "lm":  # keep the LM out of state_dict / DDP / .to(): it is not ours to save or train
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def frozen_lm(self) -> LanguageModel:
        """The LM, moved to this module's device on first use."""
        return self.lm.to(self.device)

    # ------------------------------------------------------------------ DDP helpers
    def _world(self) -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def all_reduce(self, t: Tensor, op=None) -> Tensor:
        """Sum (or ``op``) over ranks; identity in a single process."""
        if self._world() > 1:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    def all_gather_rows(self, x: Tensor) -> Tensor:
        """Concatenate ``(n_r, d)`` tensors of every rank (ranks may have different ``n_r``)."""
        world = self._world()
        if world == 1:
            return x
        n = torch.tensor([x.shape[0]], device=x.device)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n)
        m = int(max(s.item() for s in sizes))
        pad = torch.zeros(m, *x.shape[1:], dtype=x.dtype, device=x.device)
        pad[: x.shape[0]] = x
        out = [torch.zeros_like(pad) for _ in range(world)]
        dist.all_gather(out, pad)
        return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])

    def gather_to_zero(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (picklable, tensors on the CPU), in rank order, on global rank 0; ``None`` elsewhere.

        One rank at a time, so rank 0's device never holds more than one other rank's object in transit (NCCL
        object collectives stage the pickled bytes on the GPU; a GPT-2 g-SAE buffer is ~0.8 GB per rank)."""
        world = self._world()
        if world == 1:
            return [obj]
        rank = dist.get_rank()
        out = [obj] if rank == 0 else None
        for src in range(1, world):
            if rank == src:
                dist.send_object_list([obj], dst=0)
            elif rank == 0:
                box = [None]
                dist.recv_object_list(box, src=src)
                out.append(box[0])
        return out

    # ------------------------------------------------------------------ harvesting
    def token_mask(self, tokens: Tensor) -> Tensor:
        """Bool ``(B, T)``: positions whose activations train the SAE (special tokens excluded if set)."""
        if not self.exclude_special_tokens:
            return torch.ones_like(tokens, dtype=torch.bool)
        special = torch.tensor(self.lm.special_token_ids, device=tokens.device)
        return ~torch.isin(tokens, special)

    def prepare_batch(self, batch: Any) -> Any:
        """A :class:`TokenBatch` still on the host, with ``keep`` (the flat indices of :meth:`token_mask`) set: the
        harvest then selects those rows with ``index_select`` instead of a boolean mask, whose row count a GPU must
        report to the host first (a wait for every queued kernel, at every step). Pinned when training on a GPU, as
        the data loader pins the tokens, so that the copy does not wait either. Other batches pass unchanged."""
        if not isinstance(batch, TokenBatch) or batch.keep is not None or batch.tokens.device.type != "cpu":
            return batch
        keep = self.token_mask(batch.tokens).reshape(-1).nonzero().squeeze(-1)
        if self.device.type == "cuda":
            keep = keep.pin_memory()
        return batch._replace(keep=keep)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning calls this when no data module overrides the hook; gsae's data module calls prepare_batch itself
        return self.prepare_batch(batch)

    @staticmethod
    def select_rows(x: Tensor, mask: Tensor | None, keep: Tensor | None) -> Tensor:
        """The rows of ``x (B, T, ...)`` at the kept positions, flattened to ``(n, ...)``: ``x[mask]``, or, with the
        host's ``keep`` indices, the same rows by ``index_select`` (no wait for the device)."""
        if keep is None:
            return x[mask]
        return x.reshape(-1, *x.shape[2:]).index_select(0, keep.to(x.device, non_blocking=True))

    @torch.no_grad()
    def maybe_initialize(self, x: Tensor) -> None:
        """On the first batch: ``b_dec`` and the loss scale from the *global* batch (identical on every rank)."""
        if self._initialized_seen:
            return
        if bool(self.initialized):
            self._initialized_seen = True
            return
        xs, scale = self.first_batch_statistics(x)
        if not self.warm_started(self.sae):  # a warm start keeps its source's b_dec
            self.sae.init_b_dec(xs, self.b_dec_init)
        self.act_scale.fill_(scale)
        self.initialized.fill_(True)

    def first_batch_statistics(self, x: Tensor) -> tuple[Tensor, float]:
        """``(global batch, E‖x − x̄‖²)``: the rows of every rank and the loss scale they set."""
        xs = self.all_gather_rows(x.float())
        return xs, float((xs - xs.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-8))

    def aux_norm(self, n_global: Tensor) -> Tensor:
        """Loss normaliser ``W / N_global / E‖x − x̄‖²`` (the recon's and AuxK's): a constant per step, so DDP-averaged
        gradients are exact. A sweep computes ``W / N_global`` once and divides by each member's scale: the same ops."""
        return self._world() / n_global.clamp_min(1) / self.act_scale

    def rank_share(self, n_rows: int, n_global: Tensor) -> Tensor | float:
        """``n_rows · W / N_global``: a mean over this rank's ``n_rows`` rows times this is the rank's share of the
        global batch's mean, × W, so the gradient DDP averages is the global batch's (as :meth:`aux_norm` makes the
        recon's). Ranks hold different row counts when special tokens are left out; 1 in a single process."""
        world = self._world()
        return 1.0 if world == 1 else n_rows * world / n_global.clamp_min(1)

    @staticmethod
    def sae_loss(recon: Tensor, out: SAEOutput, sae: SparseAutoencoder, share: Tensor | float = 1.0) -> Tensor:
        """``recon`` plus the SAE's own terms: AuxK's loss if it has AuxK, its sparsity penalty if it has one (ReLU:
        L1, a mean over the rank's rows, times ``share``, :meth:`rank_share`). A TopK SAE without AuxK (``k_aux`` 0)
        adds nothing: its terms are always 0, so no add is launched."""
        loss = recon
        if sae.uses_dead_mask:
            loss = loss + out.aux_loss
        if sae.has_sparsity_loss:
            loss = loss + (out.sparsity_loss if isinstance(share, float) and share == 1.0 else out.sparsity_loss * share)
        return loss

    def dead_mask(self, sae: SparseAutoencoder, tracker: DeadLatentTracker, stage: str) -> Tensor | None:
        """AuxK's dead latents for a training step of an SAE that reads them (:attr:`SparseAutoencoder.uses_dead_mask`)
        when some latent is dead, else ``None`` (AuxK's loss is then 0 either way; the count is on the host already,
        :meth:`DeadLatentTracker.n_dead_by_tokens`, so no mask is built for the many steps without a dead latent)."""
        if stage != "train" or not sae.uses_dead_mask:
            return None
        n_dead = tracker.n_dead_by_tokens()
        return tracker.auxk_mask(n_dead) if n_dead else None

    # ------------------------------------------------------------------ the step
    def after_nonfinite(self, lower: str) -> str:
        """What to do after a non-finite loss: resume from the last checkpoint with ``lower`` (a lower learning rate),
        or, before the first checkpoint (none to resume), start again with it."""
        cb = self._trainer.checkpoint_callback if self._trainer is not None else None
        saved = bool(getattr(cb, "last_model_path", "") or getattr(cb, "best_k_models", None)) or bool(
            self._trainer is not None and self.trainer.ckpt_path)
        if self._trainer is not None and self.trainer.ckpt_path and self.trainer.global_step == self._first_step:
            # at a resume's first step the checkpoint itself is the likelier cause (a copy with flipped bytes loads:
            # torch checks no checksum), not the learning rate
            return (f"at the first step after resuming from {self.trainer.ckpt_path}: that checkpoint may be damaged; "
                    f"resume from an earlier one (--ckpt_path <step checkpoint>), or with {lower}")
        if saved:
            return f"last good checkpoint kept: resume from it with {lower}, --ckpt_path last"
        return f"no checkpoint written yet: start again with {lower}"

    def objective(self, batch: TokenBatch, stage: str) -> tuple[Tensor, SAEOutput, ActivationBatch, dict[str, Tensor]]:
        """Loss of one batch; returns ``(loss, sae_output, activations, extra scalars to log)``."""
        raise NotImplementedError

    def shared_step(self, batch: TokenBatch, stage: str) -> Tensor:
        loss, out, acts, extra = self.objective(batch, stage)
        if stage == "train" and not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite training loss ({float(loss.detach())}) at step {self.global_step}; stopping "
                f"({self.after_nonfinite('a lower --model.optimizer.lr')})"
            )
        with torch.no_grad():
            if stage != "train":  # per-rank sums, reduced over ranks once per epoch (torchmetrics, in compute)
                l0 = l0_per_token(out.top_acts, out.latents)
                self.val_recon.update(acts.x, out.x_hat, l0)
                if extra:  # token-weighted sums, reduced over ranks at the epoch's end. Each value is this rank's of a
                    # mean over ranks (step_scalars), so it weighs by the batch's global rows / W, not its own rows:
                    # ranks keep different numbers when special tokens fall mid-sequence
                    world = self._world()
                    weight = (self.all_reduce(torch.full((), float(l0.shape[0]), dtype=torch.float64, device=l0.device))
                              / world) if world > 1 else float(l0.shape[0])
                    for name, v in extra.items():
                        total, count = self._val_sums.get(name, (0.0, 0))
                        self._val_sums[name] = (total + v.detach().double() * weight, count + weight)
                return loss
            log = self.log_this_step()
            fired = fire_counts(out.top_idx, out.top_acts, out.latents, self.sae.d_sae, torch.float64,
                                self.dead_activity_test)
            # training: one packed all-reduce for the fire counts, the token count and (on logging steps) the metric
            # sums (the dead-latent counters need the global mask every step; torchmetrics would sync each state
            # separately: see gsae.metrics)
            scalars: dict[str, Tensor] = {}
            if log:  # recon_sums' first field is the token count
                counted = recon_sums(acts.x, out.x_hat, l0_per_token(out.top_acts, out.latents)).flat()
                scalars = self.step_scalars(loss, out, extra)
            else:
                counted = torch.full((1,), float(acts.x.shape[0]), dtype=torch.float64, device=fired.device)
            packed = self.all_reduce(torch.cat([fired, counted, *self.pack_scalars(scalars)]))
            fired_g = packed[: self.sae.d_sae] > 0
        # the token count: on one process the host knows it (no wait for the GPU); over ranks, the reduced count
        n_tokens = acts.x.shape[0] if self._world() == 1 else int(packed[self.sae.d_sae])
        self.dead.update(fired_g, n_tokens, self.starts_optimizer_step())
        self.tokens_seen += n_tokens
        if log:
            n = len(scalars)
            reduced = self.unpack_scalars(scalars, packed[packed.shape[0] - n :])
            self._log_train(ReconSums.unflat(packed[self.sae.d_sae : packed.shape[0] - n]), reduced)
        return loss

    def step_scalars(self, loss: Tensor, out: SAEOutput, extra: dict[str, Tensor]) -> dict[str, Tensor]:
        """A logging step's scalars that are this rank's values of a mean over ranks: the loss, AuxK's loss (an SAE
        with a dead-latent loss) and the objective's ``extra`` scalars."""
        aux = {"aux_loss": out.aux_loss.detach()} if self.sae.uses_dead_mask else {}
        return {"loss": loss.detach(), **aux, **extra}

    @staticmethod
    def pack_scalars(scalars: dict[str, Tensor]) -> list[Tensor]:
        """``scalars`` as one float64 vector for the step's packed all-reduce (``[]`` for none)."""
        return [torch.stack([v.detach().reshape(()).to(torch.float64) for v in scalars.values()])] if scalars else []

    def unpack_scalars(self, scalars: dict[str, Tensor], summed: Tensor) -> dict[str, Tensor]:
        """The reduced :meth:`pack_scalars` vector back as ``{name: mean over ranks}``.

        Each rank's loss is its share of the global objective times the number of ranks (the reconstruction is
        normalised by the *global* token count, and DDP averages the gradients), so the global loss, which a single
        process training on the global batch logs, is the mean over ranks, not rank 0's value: the logged ``train/loss``
        and ``train/recon_loss`` are then the same on 1 rank and on W (the e2e KL: the mean of the ranks' means, as
        the gradient averages them; ``beta_attribution_median`` is the same on every rank, :meth:`attribution_median`)."""
        return dict(zip(scalars, summed / self._world()))

    def attribution_median(self, sae, grad: Tensor, idx: Tensor, rows: int = 256) -> Tensor:
        """Median of ``β·|W_dec g|`` over the selected latents ``idx`` of ``rows`` tokens of the global batch (each
        rank's first ``rows / W``, gathered from every rank): the logged check that β weights the selection
        (``train/beta_attribution_median``), the median one process takes over as many tokens, the same on every
        rank (it was a mean of the ranks' medians)."""
        world = self._world()
        n = max(rows // world, 1)
        values = sae.attribution_at(grad[:n], idx[:n]).reshape(-1, 1)
        if world > 1:  # a logging step, on every rank alike: two small collectives
            values = self.all_gather_rows(values)
        return values.median()

    def log_this_step(self) -> bool:
        """Whether this training step's metrics are computed and logged: every ``--trainer.log_every_n_steps``
        steps (the steps Lightning sends to the logger) and a fit's first and last step (for the progress line and the
        run summary, which read ``trainer.callback_metrics``). Other steps skip the metric passes and, on a GPU, the
        host-device waits their ``float()`` conversions cost (the progress bar keeps the last logged values). The
        answer depends only on the loop's counters, so every DDP rank agrees (the packed all-reduce's size depends on
        it); a stop requested mid-run (``should_stop``, possibly set on one rank) does not enter it."""
        if self._trainer is None:
            return True
        t = self.trainer
        every = max(int(t.log_every_n_steps or 1), 1)
        step = t.fit_loop.epoch_loop._batches_that_stepped + 1  # as Lightning's logger connector counts
        last = t.max_steps is not None and t.max_steps > 0 and t.global_step + 1 >= t.max_steps
        first = t.global_step == self._first_step  # the progress bar's first line
        return step % every == 0 or last or first

    def starts_optimizer_step(self) -> bool:
        """Whether this training batch is the first of its optimizer step: False for the later micro-batches under
        ``--trainer.accumulate_grad_batches`` (the dead-latent batch window counts optimizer steps, as documented for
        ``dead_batches``). Call once per training batch."""
        if self._trainer is None:
            return True
        starts = not self._mid_step
        # more micro-batches of this step to come (Lightning's own test; its logger connector uses it too)
        self._mid_step = self.trainer.fit_loop._should_accumulate()
        return starts

    def on_fit_start(self) -> None:
        """Tell the TensorBoard logger a sweep's member names (each a TensorBoard run of its own, so a chart per metric
        holds every member's curve) and each SAE's row of its HPARAMS tab (:meth:`session_hparams`)."""
        from gsae.loggers import TensorBoardLogger

        super().on_fit_start()
        for lg in self.loggers:
            if isinstance(lg, TensorBoardLogger):
                lg.members = tuple(name for name in self.saes() if name)  # a one-SAE run's is "": none
                lg.member_hparams = self.session_hparams()

    def session_hparams(self) -> dict[str, dict[str, Any]]:
        """Each SAE's settings for TensorBoard's HPARAMS tab, ``{member: settings}`` (``""`` for a one-SAE run): the
        objective, the SAE's class and constructor arguments (``k``, ``d_sae``, ``beta``, ``k_aux``, ``seed`` …), hook,
        LM, learning rate (its optimizer group's) and the run's plain options (``buffer_size``, ``lr_schedule`` …; one
        named as an SAE setting prefixed ``run_``: ``run_seed``, the shuffle buffer's, beside the SAE's init ``seed``)."""
        groups = self.trainer.optimizers[0].param_groups if self._trainer is not None and self.trainer.optimizers else []
        run = {k: v for k, v in self.hparams.items()
               if not k.startswith("_") and (v is None or isinstance(v, (bool, int, float, str)))}
        saes = self.saes()
        out = {}
        for i, (name, (sae, meta)) in enumerate(saes.items()):
            group = groups[i] if len(groups) == len(saes) else groups[0] if groups else {}
            lr = group.get("initial_lr", group.get("lr"))
            own = {**({"member": name} if name else {}), "objective": meta["objective"], "sae": type(sae).__name__,
                   **sae.config(), "hook": meta["hook"], "lm": meta["lm"]["name"],
                   **({"lr": float(lr)} if lr is not None else {})}
            if "k" in own and "beta" not in own:  # TopK is the g-SAE at β = 0: one beta column for both
                own["beta"] = 0.0
            # the run's options; one named as an SAE's (the run's data seed beside the SAE's init seed) as run_<name>
            out[name] = {**own, **{(f"run_{k}" if k in own else k): v for k, v in run.items()}}
        return out

    def on_train_start(self) -> None:
        # after a checkpoint is restored: read the `initialized` buffers again on the first step
        self._first_step = self.trainer.global_step
        self._initialized_seen = False
        self._mid_step = False  # checkpoints are written between optimizer steps
        if self.trainer.ckpt_path is not None:
            self.apply_configured_learning_rates()

    def apply_configured_learning_rates(self) -> None:
        """A resume takes the checkpoint's optimizer state, and Lightning restores its param groups' learning rates
        with it, so a learning rate configured for the resume (lower, after a divergence) was ignored. Here the
        configured peak learning rate of each SAE (a sweep's members by name) replaces the checkpoint's, from the
        resumed step on, on the configured schedule; Adam's moments are kept. One line on rank 0 names each change.
        Every rank applies it (each holds its optimizer)."""
        if not self.trainer.optimizers:
            return
        opt = self.trainer.optimizers[0]
        configured = self.configure_optimizers()["optimizer"].param_groups  # a fresh copy: no state until a step
        names = list(self.saes())
        changed = []
        for i, (now, group) in enumerate(zip(configured, opt.param_groups)):
            self._apply_group_options(now, group, names[i] if len(names) > 1 else None)
            want, kept = now.get("initial_lr", now["lr"]), group.get("initial_lr", group["lr"])
            if math.isclose(want, kept, rel_tol=1e-6):
                continue
            group["initial_lr"] = want
            changed.append(i)
            if self.trainer.is_global_zero:
                which = f"member {names[i]}'s lr" if len(names) > 1 else "--model.optimizer lr"
                log.warning("--ckpt_path: %s %g replaces the checkpoint's %g from step %d on (Adam's moments are kept)",
                            which, want, kept, self.trainer.global_step)
        if not changed:
            return
        for config in self.trainer.lr_scheduler_configs:  # the schedule's next value, from the new peaks
            sched = config.scheduler
            sched.base_lrs = [g["initial_lr"] for g in opt.param_groups]
            for i in changed:  # (the others keep the restored value, as Lightning leaves them)
                opt.param_groups[i]["lr"] = sched.base_lrs[i] * sched.lr_lambdas[i](sched.last_epoch)
            sched._last_lr = [g["lr"] for g in opt.param_groups]

    def _apply_group_options(self, configured: dict, group: dict, member: str | None) -> None:
        """The rest of a resume's configured optimizer options, as :meth:`apply_configured_learning_rates` for
        ``lr``: Lightning restores every group option from the checkpoint, so changed ``betas`` or ``weight_decay``
        (a sweep member's ``optimizer``, or ``--model.optimizer``'s) were dropped without a word. Adam's
        hyperparameters (:data:`RESUMABLE_GROUP_OPTIONS`) take the configured value, said in one line; any other
        changed option (``amsgrad``, ``fused``, which the restored state was built for) keeps the checkpoint's, said too."""
        where = f"member {member}'s optimizer" if member else "--model.optimizer"
        for key, want in configured.items():
            if key in ("params", "lr", "initial_lr") or key not in group or group[key] == want:
                continue
            kept = group[key]
            if key in RESUMABLE_GROUP_OPTIONS:
                group[key] = want
                said = f"{key} {want} replaces the checkpoint's {kept} from step {self.trainer.global_step} on"
            else:
                said = f"{key} {want} is not applied on resume: the checkpoint's {kept} stays (its optimizer state was built for it)"
            if self.trainer.is_global_zero:
                log.warning("--ckpt_path: %s %s", where, said)

    def training_step(self, batch: TokenBatch, batch_idx: int) -> Tensor:
        return self.shared_step(batch, "train")

    def validation_step(self, batch: TokenBatch, batch_idx: int) -> None:
        self.shared_step(batch, "val")

    def on_validation_epoch_start(self) -> None:
        self.val_recon.reset()
        self._val_sums = {}

    def on_validation_epoch_end(self) -> None:
        if self.val_recon.update_count == 0:
            return
        metrics = {f"val/{name}": v for name, v in self.val_recon.compute().items()}  # reduced over ranks (torchmetrics)
        metrics.update({f"val/{name}": v for name, v in self.reduced_val_extras().items()})
        self.log_validation_metrics(metrics)

    def reduced_val_extras(self) -> dict[str, Tensor]:
        """The objective's validation extras (``recon_loss``, e2e's ``kl``, …): means over every rank's validation
        batches weighted by their global rows (one all-reduce here, one per batch for the rows; the same on 1 rank and
        on W)."""
        names = sorted(self._val_sums)
        if not names:
            return {}
        packed = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=self.device)
                              for n in names for x in self._val_sums[n]])
        packed = self.all_reduce(packed).view(len(names), 2)
        return {n: packed[i, 0] / packed[i, 1].clamp_min(1) for i, n in enumerate(names)}

    def log_validation_metrics(self, metrics: dict[str, Tensor | float], console_only: Collection[str] = ()) -> None:
        """A validation's metrics (already reduced over ranks) into ``trainer.callback_metrics`` (the console's val line,
        the run summary) and, on rank 0, every logger at the *optimizer step just done* (``global_step``), where the
        training metrics of that step and the checkpoint's evaluation are plotted too (Lightning's own ``log`` would put
        them one step earlier). Not during the sanity check. ``console_only``: keys not sent to the loggers. Each also
        goes through ``self.log`` (into ``callback_metrics``); outside ``fit`` (``trainer.validate``) Lightning logs
        them itself, and returns them, as its API does."""
        if self._trainer is None:
            return
        t = self.trainer
        floats = host_floats(dict(metrics))
        fitting = t.state.fn == "fit"
        for k, v in floats.items():  # in fit, the loggers get them below, at global_step
            self.log(k, v, logger=not fitting and k not in console_only, rank_zero_only=True)
        logged = {k: v for k, v in floats.items() if k not in console_only}
        if not fitting or t.sanity_checking or not t.is_global_zero or not logged:
            return
        self._to_loggers(logged, t.global_step)

    def _to_loggers(self, metrics: dict[str, float], step: int) -> None:
        """Write ``metrics`` to every logger at ``step`` and flush them (rank 0 calls this)."""
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics=metrics, step=step)
            logger.save()

    def _log_train(self, sums: ReconSums, scalars: dict[str, Tensor]) -> None:
        """Log a training step: the reconstruction metrics from the ranks' summed ``sums``, and ``scalars`` (the loss,
        AuxK's, the objective's extras) already averaged over ranks (:meth:`unpack_scalars`)."""
        metrics: dict[str, Tensor | float] = {f"train/{k}": v for k, v in recon_metric_tensors(sums).items()}
        metrics.update({f"train/{k}": v for k, v in scalars.items()})
        metrics["train/dead_fraction"] = self.dead.dead_by_batches().float().mean()
        metrics["train/dead_fraction_tokens"] = self.dead.dead_by_tokens().float().mean()
        metrics = host_floats(metrics)  # one copy to the host for all of them
        metrics.update(self.progress_metrics())
        if self._trainer is not None and self.trainer.optimizers:
            metrics["lr"] = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.log_step_metrics(metrics)

    def log_step_metrics(self, metrics: dict[str, float], console_only: Collection[str] = ()) -> None:
        """Deliver a training step's scalars where ``self.log_dict(metrics, on_step=True, on_epoch=False,
        rank_zero_only=True)`` would: ``trainer.callback_metrics`` on every rank (the progress line, the run summary,
        checkpoint monitors) and, on the steps Lightning's logger connector sends (every ``log_every_n_steps``, a stop),
        every logger at Lightning's step with its ``epoch``, then ``logger.save()`` — the same tags, steps and values
        (``tests/systems/test_logging_steps.py`` compares the two). Without ``LightningModule.log``: its per-key
        bookkeeping costs ~0.25 ms of Python per key per call (2 CPU cores), and on a GPU one host-to-device copy per
        key and one ``.item()`` back; a 10-member sweep logs ~140 keys, 35 ms per logging step
        (``benchmarks/logging_cost.py``). ``console_only``: keys for the progress bar and the run summary alone, not
        sent to the loggers (a sweep's means over its members would plot beside real SAEs' curves of the same name)."""
        if self._trainer is None:
            return
        t = self.trainer
        values = {k: torch.tensor(float(v)) for k, v in metrics.items()}
        t.callback_metrics.update(values)
        if console_only:
            metrics = {k: v for k, v in metrics.items() if k not in console_only}
            values = {k: v for k, v in values.items() if k not in console_only}
        if not t.loggers or (t.fit_loop._should_accumulate() and self.automatic_optimization):
            return
        if not (t._logger_connector.should_update_logs or t.fast_dev_run):
            return
        t.logged_metrics.update(values)
        if not t.is_global_zero:
            return
        scalars = {**metrics, "epoch": t.current_epoch}  # Lightning adds the epoch (gsae's TensorBoard drops it)
        # at the optimizer step this batch ends (global_step once it is done): as the console, the checkpoints, the
        # validation and the evaluation count; Lightning's own log_dict would plot it one step earlier
        self._to_loggers(scalars, t.fit_loop.epoch_loop._batches_that_stepped + 1)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """``train/tokens_per_s`` counts training only: the time after the previous step's optimizer step is left out
        when that step checkpointed (and evaluated: minutes at GPT-2 scale) or validated, as the progress bar does; it
        read a third of the rate at the point after each checkpoint."""
        trainer = self._trainer
        saved = trainer is not None and getattr(trainer.checkpoint_callback, "_last_global_step_saved", None) == \
            trainer.global_step
        if self._t_last is not None and self._t_step_end is not None and (saved or self._validated):
            self._t_last += time.perf_counter() - self._t_step_end
        self._validated = False

    def on_validation_start(self) -> None:
        self._validated = True

    def mark_step_end(self) -> None:
        """Called at the end of each optimizer step (:meth:`on_train_batch_start`)."""
        self._t_step_end = time.perf_counter()

    def progress_metrics(self) -> dict[str, float]:
        """``train/tokens_seen`` and ``train/tokens_per_s`` since the previous call (training time only:
        :meth:`on_train_batch_start`)."""
        metrics = {"train/tokens_seen": float(self.tokens_seen)}
        now, seen = time.perf_counter(), int(self.tokens_seen)
        if self._t_last is not None and now > self._t_last:
            metrics["train/tokens_per_s"] = (seen - self._tokens_last) / (now - self._t_last)
        self._t_last, self._tokens_last = now, seen
        return metrics

    # ------------------------------------------------------------------ decoder constraints
    def on_after_backward(self) -> None:
        if self.sae.unit_norm_decoder:
            self.sae.remove_parallel_grad()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # renormalise inside the step, before any callback (e.g. checkpointing) sees the parameters
        super().optimizer_step(*args, **kwargs)
        if self.sae.unit_norm_decoder:
            self.sae.normalize_decoder()
        self.mark_step_end()

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        opt = self.optimizer_factory(self.sae.parameters())
        check_optimizer_groups(opt, ["--model.optimizer"])
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        self.say_if_warmup_outlasts(total, self.lr_warmup_steps, "--model.lr_warmup_steps")
        factor = lr_factor(total, self.lr_warmup_steps, self.lr_schedule, self.lr_min_ratio)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def say_if_warmup_outlasts(self, total: float, warm: int, option: str) -> None:
        """Warn (once per option, rank 0) when the warm-up outlasts the run: the learning rate never reaches the
        configured peak (``--model.lr_warmup_steps 1000`` in a 200-step run trains at a fifth of it at most)."""
        said = self.__dict__.setdefault("_warmup_said", set())
        if self._trainer is None or self.global_rank != 0 or option in said or math.isinf(total) or warm <= total:
            return
        said.add(option)
        log.warning("%s %d > the run's %d steps: the learning rate never reaches its peak (at most %.2g of it)",
                    option, warm, int(total), int(total) / warm)

    # ------------------------------------------------------------------ the SAEs this module trains
    def saes(self) -> dict[str, tuple[SparseAutoencoder, dict]]:
        """``{member name: (sae, its describe())}``: one SAE named ``""`` here; a sweep has one entry per member.

        Checkpoint exports, evaluation and the run summary iterate over this, so a sweep's members each get
        their own SAELens export, evaluation JSON and TensorBoard namespace."""
        return {"": (self.sae, self.describe())}

    # ------------------------------------------------------------------ checkpoints describe themselves
    def describe(self) -> dict:
        """What a checkpoint needs to rebuild the SAE without Lightning (used by ``evaluate.py`` and exports)."""
        return self.describe_sae(self.sae, type(self).__name__)

    def describe_sae(self, sae: SparseAutoencoder, objective: str) -> dict:
        """The description of one SAE this module trains (a sweep has one per member)."""
        return {
            "sae_class": sae_class_path(sae),
            "sae_config": sae.config(),
            "architecture": sae.architecture,
            **self.describe_run(),
            "objective": objective,
        }

    def describe_run(self) -> dict:
        """What every SAE of this run shares: hook, LM, versions, tokens trained, data."""
        return {
            "hook": self.hook,
            "lm": self.lm.describe(),
            "gsae_version": __version__,
            "torch_version": str(torch.__version__),
            "tokens_seen": int(self.tokens_seen),
            "data": self._data_description(),
            # what a resume under another one is told (not a bit-exact continuation); None outside a Trainer
            "precision": str(self.trainer.precision) if self._trainer is not None else None,
        }

    def _data_description(self) -> dict | None:
        dm = self._trainer.datamodule if self._trainer is not None else None
        if dm is None or not hasattr(dm, "context_size"):
            return None
        # with what decides the held-out contexts, so evaluate.py reads the run's (its checkpoints and exports)
        return {k: getattr(dm, k, None) for k in ("dataset", "dataset_config", "split", "context_size", "batch_size",
                                                  "prepend_bos", "val_split", "val_documents", "text_column",
                                                  "text_unit", "separator", "seed", "streaming")}

    def warm_sources(self) -> list[tuple[SparseAutoencoder, str, str, str]]:
        """``(sae, init_from, hook, option)`` for each SAE that starts from another's weights (a sweep: per member)."""
        return [(self.sae, self.init_from, self.hook, "--model.init_from")] if self.init_from else []

    def warm_started(self, sae: SparseAutoencoder) -> bool:
        """Whether ``sae`` holds its ``init_from`` weights (:meth:`warm_start`): its first batch keeps its ``b_dec``."""
        return any(s is sae for s in self._warm_saes)

    def warm_start(self, resuming: bool, say: bool = True) -> None:
        """Load ``init_from`` into its SAE(s), once (:mod:`gsae.warm_start`; one-line errors name the option).
        ``train.py`` calls it before training, where a bad source stops the run before anything is written; otherwise
        :meth:`setup` does. A resumed run skips it (the checkpoint's weights replace the SAE's; the source need not
        exist any more), saying so if ``init_from`` is set. ``say``: this process prints (rank 0)."""
        if self._warm_checked:
            return
        self._warm_checked = True
        sources = self.warm_sources()
        if resuming:
            if sources and say:
                log.info("%s: not read: resuming, the checkpoint holds the SAE's weights since",
                         ", ".join(option for *_, option in sources))
            return
        from gsae.warm_start import warm_start

        for sae, spec, hook, option in sources:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                said = warm_start(sae, spec, hook, option)
            self._warm_saes.append(sae)
            if say:
                for w in caught:
                    log.warning("%s", w.message)
                log.info("%s", said)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":  # Python use (train.py has done it): a resume's restore then replaces the weights
            self.warm_start(resuming=False, say=self.global_rank == 0)
        buffer = getattr(self, "buffer", None)
        if buffer is not None and buffer.fill == 0:  # a fresh buffer: each rank mixes with its own generator
            buffer.reseed(self.seed + self.global_rank)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # runs on every rank (only rank 0 writes the file): each rank's shuffle buffer goes into it
        checkpoint["gsae"] = self.describe()
        buffer = getattr(self, "buffer", None)
        if buffer is not None:
            ranks = self.gather_to_zero(buffer.state_dict())
            checkpoint["gsae_buffer"] = {"world_size": self._world(), "ranks": ranks}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_resumable(checkpoint)
        self.restore_run(checkpoint)

    def check_resumable(self, checkpoint: dict[str, Any]) -> None:
        """A one-line error if ``checkpoint`` cannot resume this configuration: not a gsae checkpoint, a sweep's, one
        trained with another objective (an e2e SAE's resumed by a local config: its weights would load, silently
        trained on with another loss), another SAE (class or settings), LM or hook. Reads only the checkpoint's
        ``gsae`` section; ``train.py`` runs it before training starts (a refused resume writes nothing into the run
        folder), and :meth:`on_load_checkpoint` again."""
        meta = checkpoint.get("gsae")
        if meta is None:
            raise ValueError("--ckpt_path: not a gsae checkpoint (no 'gsae' section)")
        if "members" in meta:
            raise ValueError(
                f"--ckpt_path: a sweep checkpoint (members {', '.join(meta['members'])}) does not resume a one-SAE run; "
                "resume it with the sweep's config (gsae.systems.SweepSAESystem)"
            )
        self.check_saved_objective(meta.get("objective"))
        self.check_saved_lm(meta.get("lm"))  # first: another LM changes d_in, and would be reported as another SAE
        self.check_saved_sae(meta["sae_config"], self.sae, "checkpoint SAE", meta.get("sae_class"))
        if meta["hook"] != self.hook:
            raise ValueError(f"--ckpt_path: checkpoint hook {meta['hook']!r} differs from --model.hook {self.hook!r}")

    def check_saved_objective(self, saved: str | None) -> None:
        """A one-line error if the checkpoint was trained by another system (``LocalSAESystem``, ``E2ESAESystem``,
        ``SweepSAESystem``; older checkpoints that do not say are taken as matching)."""
        ours = type(self).__name__
        if saved and saved != ours:
            raise ValueError(
                f"--ckpt_path: the checkpoint was trained by {saved}, this config's --model is {ours}: resume it with "
                "the config it was trained with (its run folder's config.yaml)"
            )

    @staticmethod
    def check_saved_sae(saved: dict, sae: SparseAutoencoder, what: str, saved_class: str | None = None) -> None:
        """A one-line error if the checkpoint's SAE (class, when recorded, and config) differs from the configured
        ``sae``."""
        ours = sae_class_path(sae)
        if saved_class is not None and saved_class != ours:
            raise ValueError(f"--ckpt_path: {what} is a {saved_class}, the configured one a {ours}")
        config = sae.config()
        if saved != config:
            diff = {k: (saved.get(k), config.get(k)) for k in {**saved, **config} if saved.get(k) != config.get(k)}
            raise ValueError(f"--ckpt_path: {what} differs from the configured one (checkpoint, config): {diff}")

    def restore_run(self, checkpoint: dict[str, Any]) -> None:
        """Give this rank its own shuffle buffer back (after :meth:`check_resumable`), and say (rank 0) when the run
        resumes under another ``--trainer.precision`` or LM dtype than it trained with: it goes on, but not as the
        bit-exact continuation a resume otherwise is."""
        meta = checkpoint.get("gsae") or {}
        saved_lm = meta.get("lm") or {}
        now = {"--trainer.precision": str(self.trainer.precision) if self._trainer is not None else None,
               "--model.lm.dtype": self.lm.describe().get("dtype")}
        was = {"--trainer.precision": meta.get("precision"), "--model.lm.dtype": saved_lm.get("dtype")}
        changed = [f"{k} {now[k]} (the checkpoint's: {was[k]})" for k in now if None not in (now[k], was[k]) and now[k] != was[k]]
        if changed and self.global_rank == 0:
            log.warning("--ckpt_path: resumed under %s: the run goes on, but not as the bit-exact continuation of "
                        "the checkpoint's run that a resume under its settings is", " and ".join(changed))
        buffer = getattr(self, "buffer", None)
        if buffer is not None and "gsae_buffer" in checkpoint:
            saved = checkpoint["gsae_buffer"]
            own = self._own_buffer_state(saved)
            if own is not None:
                buffer.load_state_dict(own)
            if buffer.fill > buffer.capacity and self.global_rank == 0:  # fewer ranks, or a smaller buffer_size
                log.warning("resumed shuffle buffer holds %d rows, --model.buffer_size %d: the surplus waits in host "
                            "memory and is trained on first, in batches up to twice the usual size (ShuffleBuffer.mix)",
                            buffer.fill, buffer.capacity)
            data = checkpoint.get("TokenDataModule")
            saved_world = saved.get("world_size", 1)
            if isinstance(data, dict) and "consumed_contexts" not in data and saved_world != self._world():
                # written before the data module counted global contexts: they were batches × the saving world
                data["consumed_contexts"] = int(data["consumed_batches"]) * int(data["batch_size"]) * saved_world

    def check_saved_lm(self, saved: dict | None) -> None:
        """A one-line error if the checkpoint was trained on another language model: another name, another
        ``center_writing_weights`` (it changes the residual stream; random presets ignore it) or ``fold_value_biases``
        (``hook_v``/``hook_z``), or another weight seed
        of a random preset. The dtype, ``fold_ln``, ``center_unembed``, ``fused`` and ``compile`` may change (the
        activations do not)."""
        if not saved:
            return
        ours = self.lm.describe()
        random = str(ours["name"]).startswith("random-")  # built in-process: the seed matters, the weight processing not
        keys = ["name", *(["seed"] if random else ["center_writing_weights", "fold_value_biases"])]
        saved = {"fold_value_biases": True, **saved}  # checkpoints from before the option: TransformerLens' default
        diff = {k: (saved.get(k), ours[k]) for k in keys if k in saved and saved[k] != ours[k]}
        if diff:
            raise ValueError(
                f"--ckpt_path: the checkpoint was trained on another LM (checkpoint, --model.lm): {diff}; resume with "
                "the checkpoint's model options"
            )

    def _own_buffer_state(self, saved: dict) -> dict | None:
        """This rank's shuffle-buffer state from a checkpoint holding every rank's (older files: rank 0's only).

        A run resumed on another number of ranks (``--trainer.devices × --trainer.num_nodes``, e.g. fewer GPUs after a
        preemption): the saved ranks' rows, in rank order, are dealt out, rank ``r`` of ``W`` taking rows
        ``r, r + W, …`` (none lost, none twice), with a generator seeded from the run's seed, the rank and both
        numbers of ranks. On fewer ranks a share exceeds ``--model.buffer_size``: the surplus stays on the host and
        drains in the next steps (:meth:`gsae.data.buffer.ShuffleBuffer.mix`); on more ranks each buffer refills, as a
        fresh one does."""
        ranks = saved["ranks"] if "ranks" in saved else [saved]
        world, rank = self._world(), self.global_rank
        if len(ranks) == world or all(r["x"] is None for r in ranks):
            return ranks[rank] if rank < len(ranks) else None  # empty buffers: a new rank keeps its fresh one
        held = [r for r in ranks if r["x"] is not None]
        if len({r["grad"] is None for r in held}) > 1:
            raise ValueError("--ckpt_path: the checkpoint's shuffle buffers hold gradients on some ranks only")
        xs, gs, offset = [], [], 0
        for r in held:  # rows offset.. of the pool: this rank's are those ≡ rank (mod world), no pooled copy
            first = (rank - offset) % world
            xs.append(r["x"][first::world])
            gs.append(None if r["grad"] is None else r["grad"][first::world])
            offset += r["x"].shape[0]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + len(ranks) * 1009 + world * 101 + rank)
        if rank == 0:
            log.info("resuming %d ranks' shuffle buffers (%d rows) on %d rank%s: about %d rows each",
                     len(ranks), offset, world, "" if world == 1 else "s", -(-offset // world))
        return {"x": torch.cat(xs), "grad": None if gs[0] is None else torch.cat(gs), "gen": gen.get_state(),
                "capacity": ranks[0].get("capacity")}
