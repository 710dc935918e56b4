"""The local (reconstruction) objective: trains TopK SAEs and g-SAEs on activations at one hook.

loss = ``Σ_t ‖x_t − x̂_t‖² / (N_global · E‖x − x̄‖²)`` + AuxK, i.e. the MSE normalised by the activation
variance of the first batch (a fixed constant, so this is plain MSE up to scale, as in Gao et al.'s
normalised MSE). ``N_global`` is the token count over all DDP ranks and each rank's loss is multiplied
by the world size, so the DDP-averaged gradient is exactly the gradient of the global-batch loss.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from gsae.data.batch import ActivationBatch, TokenBatch
from gsae.data.buffer import ShuffleBuffer
from gsae.data.harvest import loss_gradients, predictions
from gsae.sae.base import SAEOutput
from gsae.sae.grad_topk import GradTopKSAE
from gsae.systems.base import SAESystem


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
        **kwargs,
    ) -> None:
        """Reconstruction objective.

        Args:
            buffer_size: activation shuffle buffer capacity in tokens (0 disables); mixes tokens across contexts.
            grad_reduction: g-SAE only: reduce the LM cross-entropy by ``mean`` over the predictions of the
                global LM batch (default, as TransformerLens' ``return_type="loss"`` on one device; the scale
                β=1e5 was set for) or ``sum`` (gradients larger by the number of predictions); SPEC §1.2 [AMBIG].
        """
        super().__init__(*args, **kwargs)
        self.save_hyperparameters(ignore=["lm", "sae", "optimizer"])
        self.buffer = ShuffleBuffer(buffer_size, seed=self.seed)
        self.grad_reduction = grad_reduction

    @property
    def needs_grad(self) -> bool:
        return isinstance(self.sae, GradTopKSAE)

    def harvest(self, tokens: Tensor) -> ActivationBatch:
        """Activations (and ``∇ₓL`` for g-SAEs) at the hook, special-token positions dropped, flattened."""
        lm = self.frozen_lm()
        mask = self.token_mask(tokens)  # (B, T)
        if self.needs_grad:
            if float(self.sae.grad_normaliser) == 0:
                # mean over the *global* LM batch (all ranks have equal batches), so that the gradient's
                # scale, and hence β's meaning, does not depend on how the batch is split over devices
                n = predictions(tokens) * self._world() if self.grad_reduction == "mean" else 1
                self.sae.grad_normaliser.fill_(float(n))
            acts, grads, _ = loss_gradients(lm, tokens, self.hook, float(self.sae.grad_normaliser))
            return ActivationBatch(acts[mask].float(), grads[mask].float())
        return ActivationBatch(lm.activations(tokens, self.hook)[mask].float(), None)

    def objective(self, batch: TokenBatch, stage: str) -> tuple[Tensor, SAEOutput, ActivationBatch, dict[str, Tensor]]:
        acts = self.harvest(batch.tokens)
        if stage == "train":
            acts = self.buffer.mix(acts)
            self.maybe_initialize(acts.x)
        n_global = self.all_reduce(torch.tensor(float(acts.x.shape[0]), device=self.device))
        dead = self.dead.dead_by_tokens() if stage == "train" else None
        out = self.sae(acts.x, grad=acts.grad, dead_mask=dead, aux_norm=self.aux_norm(n_global))
        sse = (acts.x - out.x_hat).pow(2).sum()
        recon = sse / (n_global.clamp_min(1) * self.act_scale) * self._world()
        loss = recon + out.aux_loss
        extra: dict[str, Tensor] = {"recon_loss": recon.detach() / self._world()}
        if self.needs_grad and acts.grad is not None and stage == "train":
            m = min(256, acts.grad.shape[0])  # a subsample: the (N, d_sae) product is not free
            attr = self.sae.attribution(acts.grad[:m]).gather(-1, out.top_idx[:m])
            extra["beta_attribution_median"] = attr.median()
        return loss, out, acts, extra
