"""Fused LoRA: autograd functions with manual backward (fused.py) and projection reading (layers.py)."""

from velotune.lora.fused import LoRAProjections, lora_mlp, lora_projections
from velotune.lora.layers import Proj, is_fusable, resolve

__all__ = ["LoRAProjections", "Proj", "is_fusable", "lora_mlp", "lora_projections", "resolve"]
