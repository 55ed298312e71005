"""A static, preallocated KV cache that grows in chunks.

Every buffer has a fixed address for the life of one capacity, so a decode step can be captured
once in a CUDA graph and replayed: tokens are written in place at index `t` (a device tensor),
and attention reads all `capacity` slots under a mask. When a sequence outgrows the capacity,
the cache is reallocated `chunk` slots larger and the old contents copied (graphs are recaptured).

    k[l], v[l]   [B, Hk, S, D]   keys (RoPE applied) and values of layer l
    valid        [B, S] bool     key slot holds a real token (False: left padding of the prompt)
    offset       [B] long        position id = slot index - offset (per row, from the prompt)
    cos, sin     {key: [S, R]}   RoPE tables for positions 0..S-1 per rope key (None for length-dependent RoPE)
"""

from __future__ import annotations

import torch

CHUNK = 256


def round_up(n: int, chunk: int = CHUNK) -> int:
    return max(chunk, -(-n // chunk) * chunk)


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (batch, n_kv_heads, capacity, head_dim)
        # Normal tensors even when allocated under torch.inference_mode(): a generate() in inference
        # mode and the next one outside it write the same buffers in place.
        with torch.inference_mode(False):
            self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
            self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
            self.valid = torch.ones(batch, capacity, dtype=torch.bool, device=device)
            self.offset = torch.zeros(batch, dtype=torch.long, device=device)
            self.arange = torch.arange(capacity, device=device)
        self.cos = self.sin = None
        self.batch, self.capacity, self.length = batch, capacity, 0

    def grown(self, capacity: int) -> "KVCache":
        """A copy with `capacity` slots holding this cache's contents (the old buffers can be freed)."""
        k0 = self.k[0]
        new = KVCache(len(self.k), self.batch, k0.shape[1], k0.shape[3], capacity, k0.dtype, k0.device)
        n = self.length
        for old, dst in zip(self.k + self.v, new.k + new.v):
            dst[:, :, :n].copy_(old[:, :, :n])
        new.valid[:, :n].copy_(self.valid[:, :n])
        new.offset.copy_(self.offset)
        new.length = n
        return new

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
