"""The decode engine: prefill a prompt into a static KV cache, then one token per step.

    engine = DecodeEngine(spec)
    engine.reserve(batch, max_length)              # preallocate (rounded up to a 256-slot chunk)
    logits = engine.prefill(input_ids, mask, pos)  # [B, V] for the last prompt token
    logits = engine.decode(next_tokens)            # [B, V], one step

On CUDA the decode step (every layer, the cache writes, the final norm and lm_head) is captured
once per (batch, capacity) in a CUDA graph and replayed: a step is then one launch from Python
instead of hundreds, which is what bounds stock generation at batch 1. On CPU it runs eagerly.

The layer arithmetic mirrors transformers' modules operation for operation (see ops.py).
"""

from __future__ import annotations

import logging

import torch

from velotune.infer import ops
from velotune.infer.cache import CHUNK, KVCache, round_up
from velotune.infer.spec import DYNAMIC_ROPE, DecoderSpec
from velotune.kernels.glu import glu_forward
from velotune.kernels.rmsnorm import rms_norm as fused_rms_norm
from velotune.kernels.rmsnorm import rms_norm_reference
from velotune.kernels.rope import apply_rope_reference, rope_forward_
from velotune.models.spec import query_temperature

log = logging.getLogger("velotune")


def _adapter_key(plan):
    """Identity of a projection's adapters: which tensors and which scalings."""
    return None if plan[1] is None else tuple((id(a), id(b), float(sc)) for a, b, sc in plan[1])


class DecodeEngine:
    def __init__(self, spec: DecoderSpec, *, cuda_graphs: bool = True, fused: bool | None = None):
        self.spec = spec
        # fused: velotune's Triton kernels for RMSNorm, RoPE (q and k in one launch, in place) and the
        # gated activation. Default on CUDA; on CPU the torch ops mirror transformers exactly.
        self.fused = spec.device.type == "cuda" if fused is None else fused
        self.cache: KVCache | None = None
        self.static_rope = spec.rope_type not in DYNAMIC_ROPE
        self.cuda_graphs = cuda_graphs and spec.device.type == "cuda" and self.static_rope
        self._graphs: dict = {}  # (batch, capacity) -> (graph, ids buffer, t buffer, logits buffer)
        self._pool = None
        self.graph_failures = 0
        self.chunk = CHUNK  # slots added per growth
        self.reserve_ahead = 2048  # generate() preallocates up to this many new tokens; beyond, grow in chunks
        self.growths = 0

    def refresh_plans(self) -> None:
        """Re-read how each projection applies its adapters (PEFT's disable_adapter(), set_adapter() or a
        changed scaling take effect at the next generate); captured graphs are dropped if it changed."""
        changed = False
        for layer in self.spec.layers:
            for name in layer.plans:
                plan = ops.lora_plan(getattr(layer, name))
                old = layer.plans[name]
                if plan[0] != old[0] or _adapter_key(plan) != _adapter_key(old):
                    layer.plans[name] = plan
                    changed = True
        if changed:
            self._graphs.clear()
            self._pool = None

    # ------------------------------------------------------------------ cache management
    def reserve(self, batch: int, length: int) -> None:
        """Make sure a cache for `batch` rows and at least `length` slots exists (reused when it fits)."""
        c = self.cache
        if c is not None and c.batch == batch and c.capacity >= length:
            c.length = 0
            return
        self.release()
        s = self.spec
        self.cache = KVCache(
            len(s.layers), batch, s.n_kv_heads, s.head_dim, round_up(length, self.chunk), s.dtype, s.device
        )
        self._fill_rope_table(self.cache)

    def release(self) -> None:
        """Free the cache and every captured graph."""
        self.cache = None
        self._graphs.clear()
        self._pool = None

    def _grow(self) -> None:
        old = self.cache
        self._graphs.clear()
        self._pool = None
        self.cache = old.grown(old.capacity + self.chunk)
        self.growths += 1
        self._fill_rope_table(self.cache)

    def _fill_rope_table(self, cache: KVCache) -> None:
        if not self.static_rope:
            return
        # The model's own rotary module at positions 0..S-1: identical values to its per-step call.
        with torch.no_grad(), torch.inference_mode(False):  # normal tensors, as the cache's (cache.py)
            dummy = torch.empty(1, dtype=self.spec.dtype, device=self.spec.device)
            cache.cos, cache.sin = {}, {}
            for key in self._rope_keys():
                cos, sin = self._rotary(dummy, cache.arange.unsqueeze(0), key)
                cache.cos[key], cache.sin[key] = cos[0], sin[0]

    def _rope_keys(self):
        return {layer.rope_key for layer in self.spec.layers}

    def _rotary(self, x, positions, key):
        """The model's rotary module: one table, or (Gemma 3) the table of layer type `key`."""
        return self.spec.rotary(x, positions) if key is None else self.spec.rotary(x, positions, key)

    def _rope(self, h: torch.Tensor, positions: torch.Tensor) -> dict:
        """positions [B, T] -> {rope key: (cos, sin) [B, T, R]} (key None: the model's only table)."""
        c = self.cache
        if self.static_rope:
            return {key: (c.cos[key][positions], c.sin[key][positions]) for key in c.cos}
        return {key: self._rotary(h, positions, key) for key in self._rope_keys()}

    def _temperature(self, positions: torch.Tensor) -> torch.Tensor | None:
        """positions [B, T] -> the query multiplier [B, 1, T, 1] (float32), or None (FamilySpec.q_temperature)."""
        if self.spec.q_temperature is None:
            return None
        return query_temperature(positions, *self.spec.q_temperature)[:, None, :, None]

    # ------------------------------------------------------------------ the model
    def _norm(self, x, n):
        if self.fused:
            return fused_rms_norm(x, n.weight, n.eps, offset=1.0 if n.offset else 0.0, weight_in_fp32=n.fp32_weight)
        return rms_norm_reference(x, n.weight, n.eps, offset=1.0 if n.offset else 0.0, weight_in_fp32=n.fp32_weight)

    def _rotate(self, q, k, cos, sin):
        if self.fused:
            return rope_forward_(q, k, cos, sin)  # in place, one launch for q and k
        return apply_rope_reference(q, k, cos, sin)

    def _glu(self, layer, gate, up):
        if self.fused and self.spec.act_name is not None:
            return glu_forward(gate, up, self.spec.act_name)
        return layer.act(gate) * up

    def _proj(self, layer, name, x):
        return ops.linear(getattr(layer, name), x, layer.plans[name])

    def _layer(self, i: int, layer, h, ropes, allowed, write, temperature=None):
        """One decoder layer. h [B, T, H]; `write(cache_tensor, new)` stores K or V for these tokens;
        temperature: None or the query multiplier of these positions (`_temperature`)."""
        s, c = self.spec, self.cache
        cos, sin = ropes[layer.rope_key]
        B, T, _ = h.shape
        x = h if layer.input_norm is None else self._norm(h, layer.input_norm)
        if layer.qkv is not None:
            qkv = self._proj(layer, "qkv", x)
            nq, nk = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
            q, k, v = qkv[..., :nq], qkv[..., nq : nq + nk], qkv[..., nq + nk :]
        else:
            q, k, v = self._proj(layer, "q", x), self._proj(layer, "k", x), self._proj(layer, "v", x)
        if layer.qk_norm == "projection":  # OLMo 2: over the whole projection, before RoPE
            q, k = self._norm(q, layer.q_norm), self._norm(k, layer.k_norm)
        q = q.view(B, T, s.n_heads, s.head_dim)
        k = k.view(B, T, s.n_kv_heads, s.head_dim)
        if layer.qk_norm == "head":  # Qwen3, Gemma 3: per head, before RoPE
            q, k = self._norm(q, layer.q_norm), self._norm(k, layer.k_norm)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, T, s.n_kv_heads, s.head_dim).transpose(1, 2)
        if layer.rope:
            q, k = self._rotate(q, k, cos, sin)
        if temperature is not None:
            q = q * temperature.to(q.dtype)
        keys, values = write(c.k[i], k), write(c.v[i], v)
        mask = allowed[layer.sliding_window]
        if T > 1 and s.attn_softcap is None:
            a = ops.sdpa_attention(q, keys, values, mask, s.scaling)
        else:
            a = ops.attention(q, keys, values, mask, s.scaling, s.attn_softcap)
        a = self._proj(layer, "o", a)
        if layer.norm_after_attn:  # Gemma 2 sandwich; OLMo 2 post-norms (no norm before the MLP)
            h = h + self._norm(a, layer.post_attn_norm)
            x = h if layer.pre_ffn_norm is None else self._norm(h, layer.pre_ffn_norm)
        else:
            h = h + (a if s.residual_multiplier is None else a * s.residual_multiplier)
            x = self._norm(h, layer.post_attn_norm)
        if layer.gate_up is not None:
            gate, up = self._proj(layer, "gate_up", x).chunk(2, dim=-1)
        else:
            gate, up = self._proj(layer, "gate", x), self._proj(layer, "up", x)
        m = self._proj(layer, "down", self._glu(layer, gate, up))
        if layer.post_ffn_norm is not None:
            m = self._norm(m, layer.post_ffn_norm)
        return h + (m if s.residual_multiplier is None else m * s.residual_multiplier)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.spec.embed(ids).to(self.spec.dtype)  # a trainable copy in another dtype: cast once, here
        return h if self.spec.embed_multiplier is None else h * self.spec.embed_multiplier

    def _head(self, h_last: torch.Tensor) -> torch.Tensor:
        """h_last [B, H] -> logits [B, V]."""
        s = self.spec
        logits = ops.linear(s.lm_head, self._norm(h_last, s.final_norm))
        if s.final_softcap is not None:
            logits = torch.tanh(logits / s.final_softcap) * s.final_softcap
        if s.logits_divisor is not None:
            logits = logits / s.logits_divisor
        return logits

    def _windows(self):
        return {layer.sliding_window for layer in self.spec.layers}

    # ------------------------------------------------------------------ prefill
    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] (left padded) -> logits [B, V] of the last position; fills slots 0..T-1."""
        c = self.cache
        B, T = input_ids.shape
        if c is None or c.batch != B or c.capacity < T + 1:
            self.reserve(B, T + 1)
            c = self.cache
        c.length = 0
        dev = self.spec.device
        input_ids = input_ids.to(dev)
        if attention_mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=dev)
        else:
            mask = attention_mask.to(dev).bool()
        if position_ids is None:
            position_ids = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)
        position_ids = position_ids.to(dev).long()
        c.valid.fill_(True)
        c.valid[:, :T].copy_(mask)
        c.offset.copy_((T - 1) - position_ids[:, -1])  # decode: position = slot - offset
        idx = c.arange[:T]
        causal = idx.view(1, T, 1) >= idx.view(1, 1, T)  # [1, Tq, Tk]
        diag = torch.eye(T, dtype=torch.bool, device=dev).unsqueeze(0)
        allowed = {}
        for w in self._windows():
            a = causal & mask.unsqueeze(1)
            if w is not None:
                a = a & (idx.view(1, 1, T) > idx.view(1, T, 1) - w)
            allowed[w] = a | diag  # a padding query sees itself: no NaN rows (its output is never used)

        def write(buf, new):
            buf[:, :, :T].copy_(new)
            return buf[:, :, :T]

        h = self._embed(input_ids)
        ropes, temperature = self._rope(h, position_ids), self._temperature(position_ids)
        for i, layer in enumerate(self.spec.layers):
            h = self._layer(i, layer, h, ropes, allowed, write, temperature)
        c.length = T
        return self._head(h[:, -1])

    # ------------------------------------------------------------------ decode
    def _step(self, ids: torch.Tensor, t: torch.Tensor, used: int | None = None) -> torch.Tensor:
        """ids [B, 1], t [1] long (the slot to write) -> logits [B, V]. No host sync: graph-capturable.

        The graph reads all S slots under the mask (fixed shapes); eager steps pass `used` = t + 1
        and read only the filled slots.
        """
        c = self.cache
        S = used or c.capacity
        arange, valid = c.arange[:S], c.valid[:, :S]
        positions = (t - c.offset).unsqueeze(1)  # [B, 1]
        seen = valid & (arange <= t)  # [B, S]
        allowed = {}
        for w in self._windows():
            a = seen if w is None else seen & (arange > t - w)
            allowed[w] = a.unsqueeze(1)  # [B, 1, S]

        def write(buf, new):
            buf.index_copy_(2, t, new)
            return buf[:, :, :S]

        h = self._embed(ids)
        ropes, temperature = self._rope(h, positions), self._temperature(positions)
        for i, layer in enumerate(self.spec.layers):
            h = self._layer(i, layer, h, ropes, allowed, write, temperature)
        return self._head(h[:, -1])

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] -> logits [B, V] after appending them at slot `length`."""
        if self.cache.length >= self.cache.capacity:
            self._grow()
        c = self.cache
        t = c.length
        ids = tokens.to(self.spec.device).view(c.batch, 1)
        out = None
        if self.cuda_graphs:
            out = self._replay(ids, t)
        if out is None:
            out = self._step(ids, torch.tensor([t], device=self.spec.device), used=t + 1)
        c.length = t + 1
        return out

    def _replay(self, ids: torch.Tensor, t: int):
        c = self.cache
        key = (c.batch, c.capacity)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(ids, t)
            if entry is None:
                return None
            self._graphs[key] = entry
        graph, ids_buf, t_buf, out_buf = entry
        ids_buf.copy_(ids)
        t_buf.fill_(t)
        graph.replay()
        return out_buf.clone()

    def _capture(self, ids: torch.Tensor, t: int):
        ids_buf = ids.clone()
        t_buf = torch.full((1,), t, dtype=torch.long, device=ids.device)
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up (writes this step's K/V: the replay rewrites the same values)
                    self._step(ids_buf, t_buf)
            torch.cuda.current_stream().wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out_buf = self._step(ids_buf, t_buf)
        except Exception as e:  # an op that cannot be captured: stay correct
            self.graph_failures += 1
            torch.cuda.synchronize()
            if self.fused:  # try again with plain torch ops
                log.warning(
                    "velotune: CUDA graph capture failed with fused kernels (%s: %s); retrying unfused",
                    type(e).__name__,
                    e,
                )
                self.fused = False
                return self._capture(ids, t)
            self.cuda_graphs = False
            log.warning("velotune: CUDA graph capture failed (%s: %s); decoding eagerly", type(e).__name__, e)
            return None
        return graph, ids_buf, t_buf, out_buf
