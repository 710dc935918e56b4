"""The TensorBoard logger of ``train.py``: TensorBoard opens on the SAE's curves, not on Lightning's bookkeeping.

Lightning's ``TensorBoardLogger`` adds two scalars that mean nothing for an SAE run and, sorting first,
are the first cards TensorBoard shows: ``epoch`` (the token stream is endless, so it stays 0) and
``hp_metric`` (a ``-1`` placeholder written with the hyperparameters). :class:`TensorBoardLogger` drops
both; the hyperparameters are still written (HPARAMS tab). The CLI uses it for every run, including configs
that name Lightning's class (:func:`curves_first`).

It also writes a call's scalars as one event (one ``Summary`` holding every value) where Lightning's writes one per
scalar through ``SummaryWriter.add_scalar``: TensorBoard reads the same tags, steps and values, and a 10-member sweep's
~140 scalars per logging step take 0.5 ms instead of 8 (``benchmarks/logging_cost.py``).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger as _LightningTensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from typing_extensions import override

#: Scalars Lightning adds on its own that an SAE run does not log.
DROPPED = frozenset({"epoch", "hp_metric"})


class TensorBoardLogger(_LightningTensorBoardLogger):
    """Lightning's ``TensorBoardLogger`` without the ``epoch`` and ``hp_metric`` scalars."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("default_hp_metric", False)
        super().__init__(*args, **kwargs)

    @override
    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Numbers and one-element tensors as one event of ``float32`` ``simple_value``s (what ``add_scalar`` writes);
        anything else (a dict for ``add_scalars``, a value to reject) through Lightning's ``log_metrics``."""
        kept = {k: v for k, v in metrics.items() if k not in DROPPED}
        writer = self.experiment
        if not isinstance(writer, SummaryWriter):  # another writer class (tensorboardX): one add_scalar each
            super().log_metrics(kept, step)
            return
        numbers: dict[str, float] = {}
        other: dict[str, Any] = {}
        for k, v in kept.items():
            if isinstance(v, Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, (int, float)):
                numbers[f"{self._prefix}{self.LOGGER_JOIN_CHAR}{k}" if self._prefix else k] = float(v)
            else:
                other[k] = v
        if numbers:
            summary = Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in numbers.items()])
            writer._get_file_writer().add_summary(summary, step)
        if other:
            super().log_metrics(other, step)


def curves_first(loggers: list) -> None:
    """Make every plain Lightning ``TensorBoardLogger`` in ``loggers`` a :class:`TensorBoardLogger` (same state,
    one overridden method), so the shipped configs that name Lightning's class get it too."""
    for lg in loggers:
        if type(lg) is _LightningTensorBoardLogger:
            lg.__class__ = TensorBoardLogger
            lg._default_hp_metric = False
