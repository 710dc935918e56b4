"""The stream: what a batch is and where it comes from."""

from gsae.data.batch import ActivationBatch, StreamState, TokenBatch
from gsae.data.datamodule import TokenDataModule
from gsae.data.tokens import DataSourceError

__all__ = ["ActivationBatch", "DataSourceError", "StreamState", "TokenBatch", "TokenDataModule"]
