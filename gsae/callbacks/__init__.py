"""Thin Lightning callbacks."""

from gsae.callbacks.checkpoint import SAECheckpoint
from gsae.callbacks.evaluation import EvaluationCallback

__all__ = ["EvaluationCallback", "SAECheckpoint"]
