"""The attention op of velotune's attention paths, on heads already projected and rotated.

    o = attend(q, k, v, mask, scaling=..., n_rep=..., softcap=None)

q [B, Hq, T, D], k/v [B, Hk, S, D] (Hq = Hk * n_rep), mask None | bool [B, 1, T, S] (True = attend) |
additive float -> o [B, Hq, T, D] in q's dtype. Read by the padded path (models/attention.py) and by the
per-sample reference of packed rows (models/varlen_attention.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hk, S, D] -> [B, Hk * n_rep, S, D] (each K/V head serves n_rep query heads)."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def attend(q, k, v, mask, *, scaling: float, n_rep: int, softcap: float | None = None):
    """q [B, Hq, T, D], k/v [B, Hk, S, D], mask None | bool | additive float -> [B, Hq, T, D]."""
    if softcap is None:
        if mask is None:
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=q.shape[2] > 1, scale=scaling, enable_gqa=n_rep > 1
            )
        # Masked SDPA: the CUDA mem-efficient backend lacks GQA, so K/V are repeated (as stock does).
        return F.scaled_dot_product_attention(
            q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask, scale=scaling
        )
    # Softcapped scores: explicit math (matches transformers' eager Gemma 2 attention op for op).
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        t, s = q.shape[2], k.shape[2]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)
