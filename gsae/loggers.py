"""The TensorBoard logger of ``train.py``: TensorBoard opens on the SAE's curves, not on Lightning's bookkeeping.

Lightning's ``TensorBoardLogger`` adds two scalars that mean nothing for an SAE run and, sorting first,
are the first cards TensorBoard shows: ``epoch`` (the token stream is endless, so it stays 0) and
``hp_metric`` (a ``-1`` placeholder written with the hyperparameters). :class:`TensorBoardLogger` drops
both; the hyperparameters are still written (HPARAMS tab). The CLI uses it for every run, including configs
that name Lightning's class (:func:`curves_first`).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger as _LightningTensorBoardLogger
from typing_extensions import override

#: Scalars Lightning adds on its own that an SAE run does not log.
DROPPED = frozenset({"epoch", "hp_metric"})


class TensorBoardLogger(_LightningTensorBoardLogger):
    """Lightning's ``TensorBoardLogger`` without the ``epoch`` and ``hp_metric`` scalars."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("default_hp_metric", False)
        super().__init__(*args, **kwargs)

    @override
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k not in DROPPED}, step)


def curves_first(loggers: list) -> None:
    """Make every plain Lightning ``TensorBoardLogger`` in ``loggers`` a :class:`TensorBoardLogger` (same state,
    one overridden method), so the shipped configs that name Lightning's class get it too."""
    for lg in loggers:
        if type(lg) is _LightningTensorBoardLogger:
            lg.__class__ = TensorBoardLogger
            lg._default_hp_metric = False
