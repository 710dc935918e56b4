"""ReLU + L1 SAE as Braun et al. (2024) train it end to end (``ApolloResearch/e2e_sae`` ``models/sparsifiers.py``, SPEC §2.1).

``c = ReLU(x W_enc + b_enc)`` (no ``b_dec`` subtracted before the encoder), ``D = W_dec`` with every row
normalised *in the forward* (their ``dict_elements``), ``x̂ = c D + b_dec``. The sparsity term is
``λ · mean_tokens ‖c‖₁ / d_in`` (their φ = λ / dim(a)). Initialisation as their code (the paper's App. D
says Kaiming — SPEC §8.2 [AMBIG], we follow the code): an orthogonal decoder and ``nn.Linear``'s default
(untied) encoder ``W_enc, b_enc ~ U(±1/√d_in)``; ``tied_init`` instead starts from ``W_enc = W_decᵀ``,
``b_enc = 0``. ``b_dec`` is set by the system's ``b_dec_init`` (``zeros`` keeps 0; Apollo's ``nn.Linear``
starts it at ``U(±1/√d_sae)``, under 0.005 for 46080 latents).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsae.sae.base import SAEOutput, SparseAutoencoder


class ReLUSAE(SparseAutoencoder):
    """Dense ReLU SAE with an L1 penalty and a decoder normalised in the forward pass."""

    unit_norm_decoder = False  # the forward normalises; the training system must not renormalise the parameter
    subtracts_b_dec = False  # c = ReLU(x W_enc + b_enc)

    def __init__(
        self, d_in: int, d_sae: int = 46080, l1_coef: float = 3.0, tied_init: bool = False, seed: int = 0
    ) -> None:
        """Build a ReLU SAE.

        Args:
            d_in: activation width at the hook (linked from the language model; not set in configs).
            d_sae: number of latents (Braun et al.: 60 × 768 = 46080).
            l1_coef: λ of the sparsity term ``λ · mean ‖c‖₁ / d_in`` (Braun et al. Table 1, layer 6 e2e: 3.0).
            tied_init: start the encoder as the decoder transpose with ``b_enc = 0``; default False: Apollo's
                code, an untied ``nn.Linear``-initialised encoder (``W_enc, b_enc ~ U(±1/√d_in)``).
            seed: seed of the initialisation.
        """
        super().__init__(d_in, d_sae, seed=seed)
        if l1_coef < 0:
            raise ValueError(f"--model.sae.l1_coef must be >= 0 (got {l1_coef})")
        self.l1_coef = l1_coef
        self.tied_init = tied_init
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        w = torch.empty(d_in, d_sae)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=gen)))
            nn.init.orthogonal_(w)
        with torch.no_grad():
            self.W_dec.copy_(w.T)
            if tied_init:
                self.W_enc.copy_(w)
            else:  # nn.Linear(d_in, d_sae)'s default: kaiming_uniform(a=√5) = U(±1/√fan_in), bias the same
                bound = d_in**-0.5
                self.W_enc.copy_((torch.rand(d_in, d_sae, generator=gen) * 2 - 1) * bound)
                self.b_enc.copy_((torch.rand(d_sae, generator=gen) * 2 - 1) * bound)

    @property
    def architecture(self) -> str:
        return "relu"

    def config(self) -> dict:
        return dict(d_in=self.d_in, d_sae=self.d_sae, l1_coef=self.l1_coef, tied_init=self.tied_init, seed=self.seed)

    def decoder_weight(self) -> Tensor:
        """Row-normalised decoder ``(d_sae, d_in)``: the dictionary the forward uses."""
        return self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def decode(self, latents: Tensor) -> Tensor:
        return latents @ self.decoder_weight() + self.b_dec

    @property
    def has_sparsity_loss(self) -> bool:
        return self.l1_coef > 0

    @property
    def uses_dead_mask(self) -> bool:
        return False

    def forward(
        self, x: Tensor, grad: Tensor | None = None, dead_mask: Tensor | None = None, aux_norm: Tensor | float | None = None
    ) -> SAEOutput:
        """``(N, d_in) -> SAEOutput`` with dense latents (also as ``pre_acts``: see :class:`SAEOutput`) and the L1
        sparsity loss (``grad``/``dead_mask`` unused)."""
        c = F.relu(torch.addmm(self.b_enc, x.to(self.W_enc.dtype), self.W_enc))  # (N, d_sae)
        x_hat = self.decode(c)
        sparsity = self.l1_coef * c.sum(-1).mean() / self.d_in  # ‖c‖₁ = Σc for c ≥ 0 (and the same gradient)
        return SAEOutput(x_hat, None, None, c, c.detach(), x_hat.new_zeros(()), sparsity)
