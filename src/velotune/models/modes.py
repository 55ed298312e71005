"""What the memory engine asks of one decoder layer's patched modules while it runs that layer.

    modes = layer_modes(layer)                  # one LayerModes per decoder layer, shared by its
    with modes.set(checkpointed_mlp=True):      # patched MLP and norms (read as `_velotune_modes`)
        layer(...)

Fields (all off by default, and outside any `set` block):
* checkpointed_mlp: the MLP saves only its input and its backward recomputes it (models/mlp.py;
  recompute="mlp", memory/saved_offload.py).
* mlp_values_unused: the layer runs only so that gradients can be taken through it (a recompute):
  a fused MLP whose output meets nothing but the residual add skips its frozen down GEMM and returns
  uninitialised values (`lora_mlp(values_unused=True)`); gradients are unchanged.
* norm_outputs: a dict; every fused RMSNorm records `table[output storage address] = (module, input,
  output)`, holding both tensors so that no other tensor takes the address while the table lives
  (memory/saved_offload.py: a saved norm output is recomputed from its input, not copied).
The state lives on the layer's modules, never in a module global: two layers, or two models, never
see each other's modes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from torch import nn

from velotune.models.binding import is_patched


@dataclass
class LayerModes:
    checkpointed_mlp: bool = False
    mlp_values_unused: bool = False
    norm_outputs: dict | None = None

    @contextlib.contextmanager
    def set(self, **values):
        """The given fields set for the duration of the block, the previous values again after it."""
        unknown = [name for name in values if name not in self.__dataclass_fields__]
        if unknown:
            raise ValueError(f"LayerModes: unknown modes {unknown}; expected {sorted(self.__dataclass_fields__)}")
        prev = {name: getattr(self, name) for name in values}
        for name, value in values.items():
            setattr(self, name, value)
        try:
            yield self
        finally:
            for name, value in prev.items():
                setattr(self, name, value)


OFF = LayerModes()  # what a patched module outside any memory-engine layer reads (never set)


def modes_of(module: nn.Module) -> LayerModes:
    """The modes a patched module runs under (OFF unless a layer's LayerModes was given to it)."""
    return module.__dict__.get("_velotune_modes", OFF)


def layer_modes(layer: nn.Module) -> LayerModes:
    """The LayerModes of `layer`, made on first use and handed to every patched module inside it
    (models/patch.py's patch and unpatch drop them, so a re-patched layer gets them afresh)."""
    modes = layer.__dict__.get("_velotune_modes")
    if modes is None:
        modes = LayerModes()
        for m in layer.modules():
            if is_patched(m) or m is layer:
                m.__dict__["_velotune_modes"] = modes
    return modes
