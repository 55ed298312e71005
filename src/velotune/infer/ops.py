"""Decode-sized building blocks: projections (+ unmerged LoRA, 4-bit) and GQA attention. RMSNorm and
RoPE are the kernels' references (kernels/rmsnorm.py, kernels/rope.py).

Each function reproduces the stock transformers / PEFT arithmetic in the same order (so float32
results agree with the stock model to rounding), but reads the weights directly instead of going
through the modules' forwards: the decode path works whether or not a module's forward has been
patched for training.

Shapes: B batch, T new tokens, S cache length, H hidden, Hq / Hk query / key-value heads,
G = Hq // Hk query heads per key-value head, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from velotune.lora.layers import is_lora_layer, read_lora
from velotune.quant import is_4bit


# ---------------------------------------------------------------------------------------------
# Projections
# ---------------------------------------------------------------------------------------------


def _base(module, x: torch.Tensor) -> torch.Tensor:
    """A base layer: plain nn.Linear and bitsandbytes 4-bit read directly; anything else via its forward.

    A layer whose weight is in another floating dtype than x (a trainable copy cast to bf16 by TRL,
    e.g. `modules_to_save=["lm_head"]` on a float32 4-bit model) gets x cast to its weight's dtype,
    and its output cast back to x's dtype: the decode path's activations keep one dtype.
    """
    if type(module) is torch.nn.Linear:
        w = module.weight
        if w.dtype == x.dtype:
            return F.linear(x, w, module.bias)
        return F.linear(x.to(w.dtype), w, module.bias).to(x.dtype)
    if is_4bit(module):
        return _nf4_linear(module, x)
    w = getattr(module, "weight", None)  # PEFT's ModulesToSaveWrapper: the active copy's weight
    if isinstance(w, torch.Tensor) and w.is_floating_point() and w.dtype != x.dtype:
        return module(x.to(w.dtype)).to(x.dtype)
    return module(x)


def _nf4_linear(module, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes Linear4bit's arithmetic (4-bit GEMV at one token, GEMM otherwise), called directly.

    Linear4bit.forward would also, on CPUs with AVX512-BF16 and in eval mode, repack the weight in
    place into a CPU-only layout; the decode path never changes the model's weights.
    """
    import bitsandbytes as bnb

    weight = module.weight
    compute = getattr(module, "compute_dtype", None) or x.dtype
    bias = None if module.bias is None else module.bias.to(compute)
    return bnb.matmul_4bit(x.to(compute), weight, bias=bias, quant_state=weight.quant_state).to(x.dtype)


def lora_plan(module):
    """How to apply `module`: ("plain", None), ("base", None), ("module", None) or ("lora", [(A, B,
    scaling), ...]): lora/layers.read_lora's reading of a PEFT LoRA layer (decoding runs in eval
    mode: dropout is the identity), "plain" for any other module.

    LoRA adapters stay unmerged: y = base(x) + B(A(x)) * scaling for each active adapter.
    Anything PEFT does beyond vanilla LoRA is left to the module's own forward ("module").
    """
    if not is_lora_layer(module):
        return ("plain", None)
    kind, adapters = read_lora(module)
    if kind != "lora":
        return (kind, None)
    return ("lora", [(a.A.weight, a.B.weight, a.scaling) for a in adapters])


def linear(module, x: torch.Tensor, plan=None) -> torch.Tensor:
    """x [..., in] -> [..., out] through `module` (nn.Linear, bnb Linear4bit or a PEFT LoRA layer)."""
    kind, adapters = plan if plan is not None else lora_plan(module)
    if kind == "plain":
        return _base(module, x)
    if kind == "base":
        return _base(module.base_layer, x)
    if kind == "module":
        return module(x)
    result = _base(module.base_layer, x)
    out_dtype = result.dtype
    if is_4bit(module.base_layer):  # PEFT's bnb.Linear4bit order: cast the branch, then add
        for a, b, scaling in adapters:
            result = result + (F.linear(F.linear(x.to(a.dtype), a), b) * scaling).to(out_dtype)
        return result
    for a, b, scaling in adapters:  # PEFT's lora.Linear order: add (type promotion), cast at the end
        result = result + F.linear(F.linear(x.to(a.dtype), a), b) * scaling
    return result.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scaling: float, softcap: float | None
) -> torch.Tensor:
    """Grouped-query attention without repeating K/V.

    q [B, Hq, T, D]; k, v [B, Hk, S, D]; allowed [B, T, S] bool -> out [B, T, Hq * D].
    The G query heads that share a key-value head are folded into the row dimension, so one
    batched matmul per product reads every K/V element once:
        scores[b, h, g*T + t, s] = q[b, h*G + g, t] . k[b, h, s] * scaling
    Softcap (Gemma 2): scores -> c * tanh(scores / c). Softmax in fp32, as in transformers.
    """
    B, Hq, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    G = Hq // Hk
    qg = q.reshape(B, Hk, G * T, D)
    scores = torch.matmul(qg, k.transpose(2, 3)) * scaling  # [B, Hk, G*T, S]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    mask = allowed.unsqueeze(1).unsqueeze(2).expand(B, 1, G, T, S).reshape(B, 1, G * T, S)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v)  # [B, Hk, G*T, D]
    return out.reshape(B, Hq, T, D).transpose(1, 2).reshape(B, T, Hq * D)


def sdpa_attention(q, k, v, allowed, scaling: float) -> torch.Tensor:
    """Prefill without softcap: PyTorch SDPA with `enable_gqa` (no repeated K/V). Same shapes as `attention`."""
    B, Hq, T, D = q.shape
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed.unsqueeze(1), scale=scaling, enable_gqa=k.shape[1] != Hq
    )
    return out.transpose(1, 2).reshape(B, T, Hq * D)
