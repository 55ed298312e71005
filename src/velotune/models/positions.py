"""Default position ids held in host memory, so that transformers' check for packed sequences does
not stop the host at the start of every training forward.

A forward without position_ids and without a padding mask gets transformers' default ids, 0..T-1.
transformers then looks for packed sequences in them (masking_utils.find_packed_sequence_indices
reads `(...).all()` back to the host). With the ids on the GPU that read waits until everything
queued before it has run -- the whole previous step -- and the GPU then idles while the host queues
the new step's first kernels (`bench/host_overhead.py --dump` shows the gap). Given the same ids as a host tensor,
the check runs on the host and finds the same thing (one sequence per row, no packed mask).

Where they go next: the rotary embedding module gets them on the device (a forward pre-hook on that
instance, which swaps in a cached device copy), and the decoder layers pass them on unused (velotune's
attention reads the rotary tables; transformers' SDPA and eager attention take no position ids).
Only with those two attention implementations, and only where the model has a `rotary_emb` module.
"""

from __future__ import annotations

import torch
from torch import nn

_ATTN = ("sdpa", "eager")


def host_positions(body: nn.Module, like: torch.Tensor, position_ids, attention_mask):
    """position_ids to pass to the decoder stack `body` (e.g. LlamaModel) for input `like` [B, T, ...]:
    the given ones, or, where transformers would make 0..T-1 itself, the same ids as a cached host
    tensor [1, T] (see the module docstring)."""
    rotary = body.__dict__.get("_modules", {}).get("rotary_emb")
    if (
        position_ids is not None
        or attention_mask is not None
        or rotary is None
        or getattr(body.config, "_attn_implementation", None) not in _ATTN
    ):
        return position_ids
    cache = rotary.__dict__.get("_velotune_positions")
    if cache is None:
        cache = rotary.__dict__["_velotune_positions"] = {}
        rotary.__dict__["_velotune_positions_hook"] = rotary.register_forward_pre_hook(_to_device, with_kwargs=True)
    t = like.shape[1]
    if t not in cache:
        cache[t] = (torch.arange(t).unsqueeze(0), {})
    return cache[t][0]


def _to_device(module: nn.Module, args, kwargs):
    """Forward pre-hook of the rotary module: host ids from host_positions -> their device copy."""
    pos = args[1] if len(args) > 1 else kwargs.get("position_ids")
    x = args[0] if args else kwargs.get("x")
    hit = module.__dict__["_velotune_positions"].get(pos.shape[-1]) if isinstance(pos, torch.Tensor) else None
    if hit is None or hit[0] is not pos or not isinstance(x, torch.Tensor):
        return None
    on_device = hit[1].get(x.device)
    if on_device is None:
        on_device = hit[1][x.device] = torch.arange(pos.shape[-1], device=x.device).unsqueeze(0)
    if len(args) > 1:
        return (args[0], on_device, *args[2:]), kwargs
    return args, {**kwargs, "position_ids": on_device}


def release(model: nn.Module) -> None:
    """Remove the pre-hooks and caches host_positions added (unpatch)."""
    for module in model.modules():
        hook = module.__dict__.pop("_velotune_positions_hook", None)
        if hook is not None:
            hook.remove()
        module.__dict__.pop("_velotune_positions", None)
