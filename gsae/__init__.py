"""gsae: train and evaluate TopK, end-to-end and gradient (g-)SAEs on GPT-2 activations with Lightning."""

__version__ = "0.1.0"
