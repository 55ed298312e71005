"""Attention over a packed row of samples (padding-free batches, models/padding_free.py).

    o = varlen_attention(q, k, v, varlen, scaling=..., n_rep=..., softcap=None, window=None)

q [N, Hq, D], k/v [N, Hk, D] (the projections' own layout, no transpose), varlen: the samples'
boundaries -> o [N, Hq, D]. Each query token t of sample s attends to the tokens of s up to t, and
with a sliding window W only to the last W of them (transformers' mask: kv > q - W), with the
layer's scale and, for Gemma 2, its score softcap. Exactly what stock attention gives each row of
the padded batch.

Two implementations of the same function:
* `per_sample` (the reference, and the path on CPU, for softcapped scores, fp32, or where the
  flash kernel is missing): models/attend.attend on each sample's slice, causal (SDPA is_causal)
  or with the window's boolean mask, softcap by explicit math.
* `flash_varlen` (CUDA, 16-bit): torch.nn.attention.varlen.varlen_attn, one flash-attention launch
  for all samples (cu_seqlens), native GQA, window_size=(W - 1, 0). Used only where the installed
  torch's signature takes what the layer needs (`flash_capabilities`); otherwise per_sample.
bench/varlen_attention.py times both (and a block-diagonal-mask SDPA) and checks they agree.
"""

from __future__ import annotations

import functools
import inspect

import torch

from velotune.models.attend import attend


@functools.lru_cache(maxsize=1)
def flash_capabilities():
    """(varlen_attn, {parameter names}) of this torch, or (None, set()) where it has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _flash_ok(q, head_dim: int, scaling: float, softcap, window) -> bool:
    fn, params = flash_capabilities()
    if fn is None or not q.is_cuda or softcap is not None or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if head_dim % 8 or head_dim > 256:
        return False
    if window is not None and "window_size" not in params:
        return False
    if "scale" not in params and abs(scaling - head_dim**-0.5) > 1e-12:
        return False
    return "window_size" in params or "is_causal" in params


def _window_mask(n: int, window: int, device) -> torch.Tensor:
    """bool [n, n], True = attend: causal and kv > q - window (transformers' sliding_window_overlay)."""
    ones = torch.ones(n, n, dtype=torch.bool, device=device)
    return ones.tril(0) & ~ones.tril(-window)


def per_sample(q, k, v, varlen, *, scaling: float, n_rep: int, softcap=None, window=None):
    """The reference: each sample's slice through models/attend.attend (see the module docstring)."""
    outs = []
    for a, n in zip(varlen.starts, varlen.lengths):
        qs, ks, vs = (x[a : a + n].transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, H, n, D]
        mask = _window_mask(n, window, q.device) if window is not None and n > window else None
        outs.append(attend(qs, ks, vs, mask, scaling=scaling, n_rep=n_rep, softcap=softcap)[0].transpose(0, 1))
    return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0].contiguous()


def flash_varlen(q, k, v, varlen, *, scaling: float, n_rep: int, window=None):
    """torch's varlen flash attention over all samples at once (CUDA, 16-bit; see `_flash_ok`)."""
    fn, params = flash_capabilities()
    kw = {}
    if "window_size" in params:
        kw["window_size"] = (window - 1, 0) if window is not None else (-1, 0)
    else:
        kw["is_causal"] = True
    if "scale" in params:
        kw["scale"] = scaling
    if n_rep > 1:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:  # older signature: give every query head its K/V head (exact: a copy)
            n, h, d = k.shape
            k = k[:, :, None].expand(n, h, n_rep, d).reshape(n, h * n_rep, d)
            v = v[:, :, None].expand(n, h, n_rep, d).reshape(n, h * n_rep, d)
    return fn(q, k, v, varlen.cu, varlen.cu, varlen.max_len, varlen.max_len, **kw)


def varlen_attention(q, k, v, varlen, *, scaling: float, n_rep: int, softcap=None, window=None):
    """[N, Hq, D] attention of a packed row (see the module docstring): flash where it applies."""
    if window is not None and window >= varlen.max_len:
        window = None  # no sample is longer than the window: plain causal
    if _flash_ok(q, q.shape[-1], scaling, softcap, window):
        return flash_varlen(q, k, v, varlen, scaling=scaling, n_rep=n_rep, window=window)
    return per_sample(q, k, v, varlen, scaling=scaling, n_rep=n_rep, softcap=softcap, window=window)
