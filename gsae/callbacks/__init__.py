"""Thin Lightning callbacks."""

from gsae.callbacks.checkpoint import SAECheckpoint

__all__ = ["SAECheckpoint"]
