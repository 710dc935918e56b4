"""LightningModules, one per training objective."""

from gsae.systems.base import NonFiniteLossError, SAESystem
from gsae.systems.local import LocalSAESystem

__all__ = ["LocalSAESystem", "NonFiniteLossError", "SAESystem"]
