"""PEFT's `modules_to_save` copies (e.g. `embed_tokens` / `lm_head` trained in full) that keep the model's dtype at
their boundary, whatever dtype their own weight ends up in.

TRL casts every trainable parameter of a 4-bit model to bf16 when it builds a trainer (its QLoRA recipe), the full
copies of `embed_tokens` / `lm_head` included. Without autocast (a float32 model, e.g. on the CPU) the copy then
meets the model's float32 activations: `nn.Linear` refuses the mix ("expected m1 and m2 to have the same dtype"), and
an embedding copy would hand bf16 hidden states to a float32 decoder.

`keep_io_dtype(peft_model)` binds on each such copy (per instance; `del copy.forward` restores the class's) a
forward that computes in the copy's weight dtype and returns the dtype of the model around it:

    Linear     x [..., in] (any float dtype) -> F.linear(x.to(w.dtype), w, b).to(x.dtype)   (x's dtype when equal)
    Embedding  ids [...] -> the table's rows, cast to the dtype the table had when bound    (no cast when equal)

While the weight keeps its dtype (no TRL cast, or a bf16 model) both are the stock forward, bit for bit. The copies
stay plain `nn.Linear` / `nn.Embedding` without hooks, so velotune's fused LM-head loss still reads them (it promotes
mixed dtypes itself).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

IO_DTYPE = "_velotune_io_dtype"


def _linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if x.dtype == w.dtype or not x.is_floating_point():
        return F.linear(x, w, self.bias)
    return F.linear(x.to(w.dtype), w, self.bias).to(x.dtype)


def _embedding_forward(self, ids: torch.Tensor) -> torch.Tensor:
    out = type(self).forward(self, ids)
    io = self.__dict__[IO_DTYPE]
    return out if out.dtype == io else out.to(io)


def keep_io_dtype(peft_model) -> int:
    """Bind the dtype-keeping forward (module docstring) on every Linear / Embedding copy in PEFT's
    `modules_to_save` wrappers of `peft_model`; returns how many copies were bound (0 without any)."""
    bound = 0
    for module in peft_model.modules():
        copies = getattr(module, "modules_to_save", None)
        if not isinstance(copies, nn.ModuleDict) or not hasattr(module, "original_module"):
            continue
        for copy in copies.values():
            if type(copy) is nn.Linear:
                copy.forward = types.MethodType(_linear_forward, copy)
            elif type(copy) is nn.Embedding:
                copy.__dict__[IO_DTYPE] = copy.weight.dtype
                copy.forward = types.MethodType(_embedding_forward, copy)
            else:
                continue
            bound += 1
    return bound
