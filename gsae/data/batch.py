"""The contract between ``data/`` and ``systems/``: what a batch is."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class TokenBatch(NamedTuple):
    """A batch of fixed-length token contexts, as the data module yields it.

    Attributes:
        tokens: ``(B, T)`` token ids; each row is one packed context.
        index: the batch's position in this rank's stream (0, 1, 2, ...); the data module records the
            last consumed index so that a resumed run continues exactly after it.
    """

    tokens: Tensor
    index: int


class ActivationBatch(NamedTuple):
    """Activations harvested from the language model, flattened over (batch, position).

    Attributes:
        x: ``(N, d_in)`` activations at the hook.
        grad: ``(N, d_in)`` ``dL/dx`` at the hook (g-SAE), or ``None``.
    """

    x: Tensor
    grad: Tensor | None
