"""The stream: what a batch is and where it comes from."""

from gsae.data.batch import ActivationBatch, TokenBatch
from gsae.data.datamodule import TokenDataModule
from gsae.data.tokens import DataSourceError

__all__ = ["ActivationBatch", "DataSourceError", "TokenBatch", "TokenDataModule"]
