"""Thin Lightning callbacks."""

from gsae.callbacks.checkpoint import SAECheckpoint
from gsae.callbacks.evaluation import EvaluationCallback
from gsae.callbacks.progress import StepProgressBar
from gsae.callbacks.summary import RunSummary

__all__ = ["EvaluationCallback", "RunSummary", "SAECheckpoint", "StepProgressBar"]
