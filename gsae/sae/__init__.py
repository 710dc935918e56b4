"""SAE models: plain ``nn.Module``s (no Lightning import)."""

from gsae.sae.base import SAEOutput, SparseAutoencoder
from gsae.sae.grad_topk import GradTopKSAE
from gsae.sae.relu import ReLUSAE
from gsae.sae.topk import TopKSAE

__all__ = ["GradTopKSAE", "ReLUSAE", "SAEOutput", "SparseAutoencoder", "TopKSAE"]
