"""LightningModules, one per training objective."""

from gsae.systems.base import NonFiniteLossError, SAESystem
from gsae.systems.e2e import E2ESAESystem
from gsae.systems.local import LocalSAESystem
from gsae.systems.sweep import SweepSAESystem

__all__ = ["E2ESAESystem", "LocalSAESystem", "NonFiniteLossError", "SAESystem", "SweepSAESystem"]
