"""Decode-sized building blocks: RMSNorm, RoPE, projections (+ unmerged LoRA, 4-bit) and GQA attention.

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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: bool,
             fp32_weight: bool = False) -> torch.Tensor:
    """x [..., H] -> [..., H]. offset=False: LlamaRMSNorm; offset=True: Gemma2RMSNorm (scale 1 + w);
    fp32_weight: Olmo2RMSNorm ((w * x) in fp32, then cast)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:  # Gemma 2: (x * (1 + w)) in fp32, then cast
        return (xf * (1.0 + weight.float())).type_as(x)
    if fp32_weight:
        return (weight * xf).type_as(x)
    return weight * xf.to(x.dtype)  # Llama: cast, then scale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [B, Hq, T, D], k [B, Hk, T, D], cos/sin [B, T, R] (R <= D: partial rotary passes D-R dims through)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot = cos.shape[-1]
    if rot == q.shape[-1]:
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    q_rot, q_pass = q[..., :rot], q[..., rot:]
    k_rot, k_pass = k[..., :rot], k[..., rot:]
    return (torch.cat([q_rot * cos + rotate_half(q_rot) * sin, q_pass], dim=-1),
            torch.cat([k_rot * cos + rotate_half(k_rot) * sin, k_pass], dim=-1))


# ---------------------------------------------------------------------------------------------
# Projections
# ---------------------------------------------------------------------------------------------

def _is_4bit(module) -> bool:
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None


def _base(module, x: torch.Tensor) -> torch.Tensor:
    """A base layer: plain nn.Linear and bitsandbytes 4-bit read directly; anything else via its forward."""
    if type(module) is torch.nn.Linear:
        return F.linear(x, module.weight, module.bias)
    if _is_4bit(module):
        return _nf4_linear(module, x)
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
    """How to apply `module`: ("plain", None) or ("lora", [(A, B, scaling), ...]) or ("module", None).

    LoRA adapters stay unmerged: y = base(x) + B(A(x)) * scaling for each active adapter.
    Anything PEFT does beyond vanilla LoRA (DoRA and other variants, merged weights, disabled
    adapters) is left to the module's own forward.
    """
    if not hasattr(module, "lora_A"):
        return ("plain", None)
    if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return ("base", None)
    adapters = []
    for name in module.active_adapters:
        if name not in module.lora_A.keys():
            continue
        if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False):
            return ("module", None)
        if not isinstance(module.lora_A[name], torch.nn.Linear) or module.lora_A[name].bias is not None:
            return ("module", None)
        if module.lora_B[name].bias is not None:
            return ("module", None)
        adapters.append((module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name]))
    return ("lora", adapters)


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
    if _is_4bit(module.base_layer):  # PEFT's bnb.Linear4bit order: cast the branch, then add
        for a, b, scaling in adapters:
            result = result + (F.linear(F.linear(x.to(a.dtype), a), b) * scaling).to(out_dtype)
        return result
    for a, b, scaling in adapters:  # PEFT's lora.Linear order: add (type promotion), cast at the end
        result = result + F.linear(F.linear(x.to(a.dtype), a), b) * scaling
    return result.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scaling: float,
              softcap: float | None) -> torch.Tensor:
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
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1), scale=scaling,
                                         enable_gqa=k.shape[1] != Hq)
    return out.transpose(1, 2).reshape(B, T, Hq * D)
