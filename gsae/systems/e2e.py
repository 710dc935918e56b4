"""End-to-end objective (Braun et al. 2024, arXiv 2405.12241; ``ApolloResearch/e2e_sae`` ``losses.py``; SPEC §2.2).

The SAE output is spliced into the model at the hook and the remaining layers run on it:

    loss = kl_coef · mean_tokens KL(P_clean ‖ P_sae)                       (e2e)
         + Σ_h c_h · mean_elements (a_h^sae − a_h^clean)²                   (+ds: downstream hooks, clean targets detached)
         + local_mse_coef · mean_elements (x̂ − x)²                          (optional local term)
         + the SAE's own sparsity (ReLU: λ·mean‖c‖₁/d_in) or AuxK (TopK) term

MSE terms are element means (F.mse_loss), as Apollo's code, so λ and the coefficients mean what
their configs mean. Batches are whole sequences; the model is frozen and only the SAE gets
gradients. Cost per batch: the prefix to the hook once, the suffix twice (clean, and patched with
one backward to the SAE); the KL takes the final hidden states and unembeds them in chunks of positions
(:func:`gsae.lm_chunked.kl_per_token`, equal to :func:`gsae.metrics.kl_div_per_token` of the logits).
With ``exclude_special_tokens`` the special-token positions keep their clean activation (unpatched, as
SAELens evaluates) and are left out of the SAE's own terms. The KL and the downstream MSE average every position, as
Apollo's do (an unpatched special position adds 0 to the KL), so ``train/kl`` is the evaluation's ``kl_sae``, which
drops special positions as SAELens does, times the share of non-special positions (~(T−1)/T with a BOS first).

Under DDP every rank holds ``B·T`` positions, so the KL and downstream means are the global batch's once DDP averages
the ranks' gradients. The SAE's rows are not equal in number when special tokens fall mid-sequence, so the row means
(ReLU's L1, the local MSE) are weighted by each rank's rows (:meth:`SAESystem.rank_share`), as the local objective's
reconstruction is: 2 ranks × B/2 train as 1 × B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gsae.data.batch import ActivationBatch, TokenBatch
from gsae.evals.common import needs_grad
from gsae.lm_chunked import kl_per_token
from gsae.sae.base import SAEOutput
from gsae.systems.base import SAESystem


def downstream_of(lm, sae_hook: str, hook: str) -> bool:
    """Whether the activation at ``hook`` (inside a block) changes when the SAE's output replaces ``sae_hook``'s: a
    residual-stream hook deeper than the SAE's (:meth:`gsae.lm.LanguageModel.hook_depth`: resid_pre of block L is
    2L, its attention output 2L+0.5, resid_mid 2L+1, MLP output 2L+1.5, resid_post 2L+2), or a hook inside block L
    that reads the stream at or after the SAE's point (attention and ``ln1`` read 2L, the MLP and ``ln2`` 2L+1). For
    an SAE inside a block (``attn.hook_z`` …), only hooks from that block's output on count (conservative)."""
    layer, depth = lm.hook_layer(hook), lm.hook_depth(hook)
    if layer is None:
        return False
    reads = depth if depth is not None else 2 * layer + (1 if (".mlp." in hook or ".ln2." in hook) else 0)
    sae_depth, sae_layer = lm.hook_depth(sae_hook), lm.hook_layer(sae_hook)
    if sae_depth is None and sae_layer is None:  # the embeddings: everything in the blocks reads them
        return True
    if sae_depth is None:
        return depth >= 2 * sae_layer + 2 if depth is not None else layer > sae_layer
    return depth > sae_depth if depth is not None else reads >= sae_depth


class E2ESAESystem(SAESystem):
    """End-to-end SAE training (e2e, or e2e+ds with downstream hooks) for TopK or ReLU+L1 SAEs."""

    def __init__(
        self,
        *args,
        kl_coef: float = 1.0,
        downstream_hooks: list[str] | None = None,
        downstream_coef: float = 0.0,
        downstream_coefs: list[float] | None = None,
        local_mse_coef: float = 0.0,
        **kwargs,
    ) -> None:
        """End-to-end objective.

        Args:
            kl_coef: coefficient of the KL term (Apollo: 1.0 for e2e, 0.5 for e2e+ds).
            downstream_hooks: later hooks whose activations (patched vs clean) enter the loss (e2e+ds),
                e.g. ``[blocks.7.hook_resid_pre, ..., blocks.11.hook_resid_pre]``.
            downstream_coef: total downstream coefficient β, split evenly over the hooks (Apollo layer 6: 2.5).
            downstream_coefs: per-hook coefficients instead of the even split (same length as ``downstream_hooks``).
            local_mse_coef: coefficient of a local reconstruction term ``mean (x̂ − x)²`` (0 = pure e2e).
        """
        super().__init__(*args, **kwargs)
        self.save_hyperparameters(ignore=["lm", "sae", "optimizer"])
        hooks = list(downstream_hooks or [])
        if len(set(hooks)) != len(hooks):
            raise ValueError(f"--model.downstream_hooks names a hook twice: {hooks}")
        for h in hooks:
            self.lm.validate_hook(h, option="--model.downstream_hooks")
            if self.lm.hook_layer(h) is None:
                raise ValueError(f"--model.downstream_hooks: {h!r} is not inside a block (blocks.L.…): the patched "
                                 "run records the blocks' hooks, not the embeddings' or the final LayerNorm's")
            if not downstream_of(self.lm, self.hook, h):
                later = [f"blocks.{L}.hook_resid_post" for L in range(self.lm.n_layers)
                         if downstream_of(self.lm, self.hook, f"blocks.{L}.hook_resid_post")]
                hint = f"a later hook, e.g. {later[0]}" if later else "none is later in this model: leave it empty"
                raise ValueError(f"--model.downstream_hooks: {h!r} is not after --model.hook {self.hook!r} (the SAE's "
                                 f"output changes only later activations: {hint})")
        if downstream_coefs is not None and len(downstream_coefs) != len(hooks):
            raise ValueError(
                f"--model.downstream_coefs has {len(downstream_coefs)} entries for {len(hooks)} --model.downstream_hooks"
            )
        if kl_coef < 0 or downstream_coef < 0 or local_mse_coef < 0 or any(c < 0 for c in downstream_coefs or []):
            raise ValueError(
                "--model.kl_coef, --model.downstream_coef(s) and --model.local_mse_coef must be >= 0 (a negative "
                "term is maximised)"
            )
        if downstream_coef and not hooks:
            raise ValueError("--model.downstream_coef is set but --model.downstream_hooks is empty: name the hooks")
        if downstream_coef and downstream_coefs is not None:
            raise ValueError("--model.downstream_coef and --model.downstream_coefs both set: give one of them")
        self.kl_coef = kl_coef
        self.downstream_hooks = hooks
        self.downstream_coefs = (
            list(downstream_coefs) if downstream_coefs is not None else [downstream_coef / max(len(hooks), 1)] * len(hooks)
        )
        self.local_mse_coef = local_mse_coef
        if not (kl_coef or any(self.downstream_coefs) or local_mse_coef):
            raise ValueError(
                "--model.kl_coef, --model.downstream_coef(s) and --model.local_mse_coef are all 0: nothing to train on"
            )
        if needs_grad(self.sae):  # its selection would be plain TopK here, and ∇ₓL-weighted in evaluation
            raise ValueError(
                f"--model.sae: E2ESAESystem trains TopK or ReLU SAEs; a {type(self.sae).__name__} selects latents by the "
                "loss gradient, which the e2e objective does not harvest (use gsae.sae.TopKSAE, or LocalSAESystem)"
            )

    def splice(self, x: Tensor, mask: Tensor | None, x_hat: Tensor, keep: Tensor | None = None) -> Tensor:
        """``x (B, T, D)`` with the masked positions replaced by ``x_hat (N_mask, D)`` (differentiable in ``x_hat``);
        with the host's ``keep`` (the mask's flat indices, :meth:`prepare_batch`) by ``index_copy``, no mask needed."""
        if keep is not None:
            flat = x.reshape(-1, x.shape[-1]).to(x_hat.dtype)
            return flat.index_copy(0, keep.to(x.device, non_blocking=True), x_hat).view(*x.shape[:-1], x_hat.shape[-1])
        full = torch.zeros_like(x, dtype=x_hat.dtype)
        full = full.masked_scatter(mask[..., None], x_hat)
        return torch.where(mask[..., None], full, x.to(x_hat.dtype))

    def objective(self, batch: TokenBatch, stage: str) -> tuple[Tensor, SAEOutput, ActivationBatch, dict[str, Tensor]]:
        tokens = batch.tokens
        lm = self.frozen_lm()
        mask = self.token_mask(tokens) if batch.keep is None else None  # with keep: no device mask (a copy of the ids)
        with torch.no_grad():
            x = lm.activations(tokens, self.hook)  # (B, T, D): the prefix runs once
            clean = lm.hidden_from_hook(x, self.hook, tokens=tokens, cache_hooks=self.downstream_hooks)
        x_in = self.select_rows(x, mask, batch.keep).float()
        if stage == "train":
            self.maybe_initialize(x_in)
        dead = self.dead_mask(self.sae, self.dead, stage)
        n_global = self.all_reduce(torch.full((), float(x_in.shape[0]), device=self.device))  # a fill, not a copy from the host
        share = self.rank_share(x_in.shape[0], n_global)  # the row means' (L1, local MSE) DDP weight: ranks differ in rows
        out = self.sae(x_in, dead_mask=dead, aux_norm=self.aux_norm(n_global))
        patched = lm.hidden_from_hook(self.splice(x, mask, out.x_hat, batch.keep).to(x.dtype), self.hook, tokens=tokens, cache_hooks=self.downstream_hooks)
        # KL over the vocabulary in chunks of positions from the final hidden states: no full (B, T, d_vocab) logits
        W_U, b_U, d_vocab = lm.unembedding()
        kl = kl_per_token(clean.hidden, patched.hidden, W_U, b_U, d_vocab=d_vocab, compile=lm.compile).mean()
        loss = self.sae_loss(self.kl_coef * kl, out, self.sae, share)  # + the SAE's own terms (ReLU's L1, AuxK)
        extra: dict[str, Tensor] = {"kl": kl.detach()}
        if self.sae.has_sparsity_loss:  # this rank's share × ranks: logged as the mean over ranks, the global mean
            extra["sparsity_loss"] = (out.sparsity_loss * share).detach()
        for h, c in zip(self.downstream_hooks, self.downstream_coefs):
            mse = F.mse_loss(patched.cache[h].float(), clean.cache[h].float())
            loss = loss + c * mse
            extra[f"ds_mse/{h}"] = mse.detach()
        if self.local_mse_coef:
            local = F.mse_loss(out.x_hat, x_in) * share
            loss = loss + self.local_mse_coef * local
            extra["local_mse"] = local.detach()
        return loss, out, ActivationBatch(x_in, None), extra
