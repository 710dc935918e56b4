"""The local (reconstruction) objective: trains TopK SAEs and g-SAEs on activations at one hook.

loss = ``Σ_t ‖x_t − x̂_t‖² / (N_global · E‖x − x̄‖²)`` + AuxK, i.e. the MSE normalised by the activation
variance of the first batch (a fixed constant, so this is plain MSE up to scale, as in Gao et al.'s
normalised MSE). ``N_global`` is the token count over all DDP ranks and each rank's loss is multiplied
by the world size, so the DDP-averaged gradient is exactly the gradient of the global-batch loss.

g-SAEs: ``∇ₓL`` is the gradient of the CE summed over one device's LM batch divided by a fixed count
(``grad_mean_tokens``, default the per-device ``B·(T−1)``): β means the same on 1 or 8 devices at the same
*per-device* batch. A run that divides a one-device batch between its devices (same global batch) sets
``grad_mean_tokens`` to the global count to keep it (the ``configs/gpt2`` set 8160); else a warning says so.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from torch import Tensor

from gsae.data.batch import ActivationBatch, TokenBatch
from gsae.data.buffer import ShuffleBuffer
from gsae.data.harvest import loss_gradients, predictions
from gsae.sae.base import SAEOutput, sse_loss
from gsae.sae.grad_topk import GradTopKSAE
from gsae.systems.base import SAESystem

log = logging.getLogger(__name__)


class LocalSAESystem(SAESystem):
    """Reconstruction training (MSE + AuxK) of a TopK SAE or a g-SAE.

    For a g-SAE the harvest also takes ``∇ₓL`` at the hook (one forward + one backward from the LM
    loss to the hook per batch, see ``LanguageModel.activations_and_grads``); activations and gradients
    then travel together through the shuffle buffer.
    """

    def __init__(
        self,
        *args,
        buffer_size: int = 0,
        grad_reduction: Literal["mean", "sum"] = "mean",
        grad_mean_tokens: int | None = None,
        **kwargs,
    ) -> None:
        """Reconstruction objective.

        Args:
            buffer_size: activation shuffle buffer capacity in tokens *per device* (0 disables); mixes tokens
                across contexts. Under DDP each rank mixes its own rows with its own generator (``seed + rank``).
            grad_reduction: g-SAE only: ``mean`` (default) divides the summed LM cross-entropy by
                ``grad_mean_tokens`` predictions, as TransformerLens' ``return_type="loss"`` does on one device's
                batch (the scale β=1e5 was set for); ``sum`` keeps the sum (gradients larger by that count);
                SPEC §1.2 [AMBIG].
            grad_mean_tokens: g-SAE with ``grad_reduction: mean``: the number of next-token predictions the CE
                mean is taken over, i.e. the per-*device* LM batch ``B·(T−1)``. Default: from the training
                configuration, ``data.batch_size × (data.context_size − 1)`` (without a data module: the first
                training batch). It never depends on the number of devices or on validation batches; set it
                to keep β's meaning when ``batch_size`` or ``context_size`` changes (``configs/gpt2``: 8160 = 32 × 255,
                smol-sae's 32 contexts of 256, which β = 1e5 was set for; SPEC §1.2).
        """
        super().__init__(*args, **kwargs)
        self.save_hyperparameters(ignore=["lm", "sae", "optimizer"])
        self.buffer = ShuffleBuffer(buffer_size, seed=self.seed)
        self.grad_reduction = grad_reduction
        if grad_mean_tokens is not None and (grad_mean_tokens <= 0 or grad_reduction != "mean"):
            raise ValueError(
                f"--model.grad_mean_tokens must be > 0 and needs --model.grad_reduction mean (got {grad_mean_tokens}, "
                f"{grad_reduction})"
            )
        self.grad_mean_tokens = grad_mean_tokens
        self._grad_n = 0.0  # host copy of the g-SAEs' grad_normaliser while training (0: read the buffer)

    def grad_saes(self) -> list[GradTopKSAE]:
        """The SAEs that select with ``∇ₓL`` (a sweep may have several; they share one harvest and one scale)."""
        return [self.sae] if isinstance(self.sae, GradTopKSAE) else []

    @property
    def needs_grad(self) -> bool:
        return bool(self.grad_saes())

    def configured_grad_normaliser(self) -> float | None:
        """The g-SAE gradient's CE normaliser from the configuration (``None``: not known before a training batch)."""
        if self.grad_reduction == "sum":
            return 1.0
        if self.grad_mean_tokens is not None:
            return float(self.grad_mean_tokens)
        dm = self._trainer.datamodule if self._trainer is not None else None
        if dm is not None and hasattr(dm, "batch_size") and hasattr(dm, "context_size"):
            return float(dm.batch_size * (dm.context_size - 1))  # per device: B·(T−1)
        return None

    def on_fit_start(self) -> None:
        # after a resumed checkpoint is restored (which brings its own normaliser) and before the sanity check
        super().on_fit_start()
        self.check_gradient_reaches_training_positions()
        self.say_if_the_buffer_fills_slowly()
        self._grad_n = 0.0  # read the (possibly restored) normaliser again at the first training harvest
        n = self.configured_grad_normaliser()
        self.say_if_beta_scales_with_the_devices(n)
        for sae in self.grad_saes():
            saved = float(sae.grad_normaliser)
            if saved == 0 and n is not None:
                sae.grad_normaliser.fill_(n)
            elif saved != 0 and self.grad_mean_tokens is not None and saved != self.grad_mean_tokens:
                raise ValueError(
                    f"--model.grad_mean_tokens ({self.grad_mean_tokens}) differs from the checkpoint's ({saved:g})"
                )
            elif saved != 0 and (self.grad_reduction == "sum") != (saved == 1.0):  # was kept without a word (audit F)
                was = "sum" if saved == 1.0 else f"mean, over {saved:g} predictions"
                raise ValueError(f"--model.grad_reduction {self.grad_reduction} differs from the checkpoint's ({was}); "
                                 "resume with the checkpoint's")
        scales = {float(sae.grad_normaliser) for sae in self.grad_saes()}
        if len(scales) > 1:
            raise ValueError(f"--ckpt_path: the g-SAEs were trained with different gradient scales {sorted(scales)}")

    def say_if_beta_scales_with_the_devices(self, n: float | None) -> None:
        """Warn (rank 0, a run's start) when a multi-device g-SAE run takes the default ``grad_mean_tokens``: the CE
        mean over each device's ``B·(T−1)`` predictions, so with a one-device config's batch divided between W devices
        every token's ∇ₓL is W times the one-device run's, and β acts as W·β (audit F: β·attr 0.40 on 1 rank, 1.1 on 2
        at the same global batch). The warning gives the value that keeps the global batch's mean."""
        world = self._world()
        if (world < 2 or not self.grad_saes() or self.grad_reduction != "mean" or self.grad_mean_tokens is not None
                or n is None or self.global_rank != 0 or self.trainer.ckpt_path):
            return
        log.warning("--model.grad_mean_tokens: g-SAE gradients are the CE mean over each device's batch (%d "
                    "predictions); on %d devices with a one-device run's batch divided between them, β then acts as %d "
                    "times β: set --model.grad_mean_tokens %d (the global batch's predictions) to keep its strength, "
                    "or set it to this value to silence this", int(n), world, world, int(n) * world)

    def say_if_the_buffer_fills_slowly(self) -> None:
        """Warn (rank 0) when ``--model.buffer_size``, which is per device, fills in more than 5% of a multi-device
        run: each rank fills its own buffer from its own share of the batch, training on half of it until full, so a
        one-GPU config's buffer on 8 devices trains ~15% of the steps at half batch (~7% fewer tokens). The warning
        names the per-device size that fills as fast as on one device."""
        dm = self._trainer.datamodule if self._trainer is not None else None
        world, cap = self._world(), self.buffer.capacity
        # a resume (the step counter is restored after on_fit_start, so global_step is still 0 here) comes with its
        # buffers filled: the warning is for a run's start
        if world < 2 or cap == 0 or self.global_rank != 0 or self.trainer.ckpt_path or self.buffer.fill or dm is None:
            return
        rows = getattr(dm, "batch_size", 0) * getattr(dm, "context_size", 0)  # per rank and batch (before specials)
        total = self.trainer.max_steps or 0
        if not rows or total <= 0:
            return
        # the buffer fills per batch; a step is accumulate_grad_batches of them
        fill = math.ceil(cap / (rows / 2) / max(int(self.trainer.accumulate_grad_batches or 1), 1))
        # only when dividing it by the devices (the README's rule for a one-device config) fixes it: a buffer already
        # divided fills in as many steps as the one-device run's, and in a short run any buffer takes a large share
        if fill > 0.05 * total and fill / world <= 0.05 * total:
            log.warning("--model.buffer_size %d is per device: each of the %d devices fills its own from %d tokens per "
                        "batch, so the first ~%d of %d steps train at half batch; if %d is a one-device run's buffer, "
                        "give --model.buffer_size %d (%d / %d): the devices then hold %d tokens in all and fill in ~%d "
                        "steps, as one device does", cap, world, rows, fill, total, cap, cap // world, cap, world, cap,
                        math.ceil(fill / world))

    def check_gradient_reaches_training_positions(self) -> None:
        """Refuse a g-SAE whose every training position has ``∇ₓL = 0``: ``--data.context_size 2`` with a BOS first
        trains on position 1 only, each context's last, which predicts no token (causal LM: nothing downstream), so β
        would weight nothing and the g-SAE would train as a plain TopK SAE, silently."""
        dm = self._trainer.datamodule if self._trainer is not None else None
        if not self.grad_saes() or dm is None or not getattr(dm, "prepend_bos", False):
            return
        if getattr(dm, "context_size", 3) <= 2:
            raise ValueError(
                f"--data.context_size {dm.context_size}: a g-SAE trains on the positions after the BOS, here only each "
                "context's last, whose loss gradient is 0 (it predicts no token), so β would change nothing; use "
                "--data.context_size 3 or more")

    def harvest(self, tokens: Tensor, keep: Tensor | None = None) -> ActivationBatch:
        """Activations (and ``∇ₓL`` if any SAE is a g-SAE) at the hook, special-token positions dropped, flattened
        (``keep``: the kept positions' flat indices from the host, :meth:`prepare_batch`; else the mask is computed here)."""
        lm = self.frozen_lm()
        mask = self.token_mask(tokens) if keep is None else None  # (B, T)
        n = self.harvest_grad_normaliser(tokens)
        if n is not None:
            acts, grads, _ = loss_gradients(lm, tokens, self.hook, n)
            return ActivationBatch(self.select_rows(acts, mask, keep).float(), self.select_rows(grads, mask, keep).float())
        return ActivationBatch(self.select_rows(lm.activations(tokens, self.hook), mask, keep).float(), None)

    def harvest_grad_normaliser(self, tokens: Tensor) -> float | None:
        """The CE normaliser of this harvest's ``∇ₓL`` (``None``: no g-SAE, no gradient); the first training batch
        fixes it in every g-SAE when the configuration does not."""
        grad_saes = self.grad_saes()
        if not grad_saes:
            return None
        # the normaliser is fixed once set: while training, its host copy (reset at every fit's start) spares a
        # wait for the GPU at every step
        training = self._trainer is not None and self.trainer.training
        n = (self._grad_n if training else 0.0) or float(grad_saes[0].grad_normaliser)
        if n == 0:  # no configured scale: this device's batch; only a training batch fixes it
            n = self.configured_grad_normaliser() or float(predictions(tokens))
            if self._trainer is None or training:  # never the sanity check / validation
                for sae in grad_saes:
                    sae.grad_normaliser.fill_(n)
        if training:
            self._grad_n = n
        return n

    def objective(self, batch: TokenBatch, stage: str) -> tuple[Tensor, SAEOutput, ActivationBatch, dict[str, Tensor]]:
        acts = self.harvest(batch.tokens, batch.keep)
        if stage == "train":
            acts = self.buffer.mix(acts)
            self.maybe_initialize(acts.x)
        n_global = self.all_reduce(torch.full((), float(acts.x.shape[0]), device=self.device))  # a fill, not a copy from the host
        dead = self.dead_mask(self.sae, self.dead, stage)
        norm = self.aux_norm(n_global)  # W / (N_global · E‖x − x̄‖²): the recon's normaliser and AuxK's
        out = self.sae(acts.x, grad=acts.grad, dead_mask=dead, aux_norm=norm)
        recon = sse_loss(out.x_hat, acts.x) * norm
        loss = self.sae_loss(recon, out, self.sae, self.rank_share(acts.x.shape[0], n_global))
        extra: dict[str, Tensor] = {}
        logged = stage != "train" or self.log_this_step()  # the extra scalars are read on these steps only
        if logged:
            extra["recon_loss"] = recon.detach()  # this rank's share × ranks: logged as the mean over ranks
        if self.needs_grad and acts.grad is not None and stage == "train" and logged:
            extra["beta_attribution_median"] = self.attribution_median(self.sae, acts.grad, out.top_idx)
        return loss, out, acts, extra
