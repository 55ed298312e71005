"""Fused self-attention forward (bound per instance onto the family's attention module).

    x [B, T, H] --LoRA-QKV--> q [B, Hq, T, D], k, v [B, Hk, T, D] (--q/k norms-->) --RoPE-->
      (q * temperature(position) -->) attention --LoRA-O--> [B, T, H]

The mask is the one transformers' own model forward built for this layer (padding, sliding window,
packed sequences as a block-diagonal causal mask), so masking semantics are exactly stock:
  None           -> causal; SDPA with is_causal (flash / cuDNN) and enable_gqa (no K/V repeat)
  bool [B,1,T,S] -> True = attend (SDPA masks); float -> additive (eager masks, e.g. Gemma 2)
Gemma 2's score softcap t*tanh(s/t) is not offered by the SDPA backends, so it runs the explicit
math path (the same operations as transformers' eager attention).
A padding-free batch (one packed row [1, N] of samples, models/padding_free.py) comes with the
keyword VARLEN_KW instead of a mask: attention stays inside each sample (models/varlen_attention.py).
Falls back to the stock forward for anything this path does not cover: a KV cache (generation),
output_attentions, attention dropout in training, or a non-SDPA/eager attention implementation.
"""

from __future__ import annotations

from velotune.lora import lora_projections, resolve
from velotune.models.attend import attend
from velotune.models.padding_free import VARLEN_KW
from velotune.models.spec import query_temperature
from velotune.models.varlen_attention import varlen_attention

_OWN_IMPLEMENTATIONS = ("sdpa", "eager", None)


def _project(X, modules):
    """Run a list of projection modules on X [N, in]: fusable ones in one LoRA function, others stock.

    Returns (outputs, owned): owned[i] is True when output i came from the fused function, so no
    one else (a forward hook, say) holds it and it may be overwritten in place."""
    projs = [resolve(m) for m in modules]
    fused_idx = [i for i, p in enumerate(projs) if p is not None]
    outs = [None] * len(modules)
    if fused_idx:
        for i, y in zip(fused_idx, lora_projections(X, [projs[i] for i in fused_idx])):
            outs[i] = y
    for i, p in enumerate(projs):
        if p is None:
            outs[i] = modules[i](X)
    return outs, [p is not None for p in projs]


def _head_norms(self, spec, q, k, D: int):
    """q_norm / k_norm (Qwen3, Gemma 3): RMSNorm over head_dim of every head, before RoPE.

    q [N, Hq * D], k [N, Hk * D] (row-major heads, views allowed) -> fresh [N, Hq * D], [N, Hk * D].
    Computed from the norm modules' weight and eps with the family's offset, as the stock modules do
    (the modules themselves are not called: their fused forward would record its output for the
    saved-tensor offload, and RoPE then rotates that output in place)."""
    from velotune.kernels.rmsnorm import rms_norm

    out = []
    for x, norm in ((q, self.q_norm), (k, self.k_norm)):
        y = rms_norm(x.reshape(-1, D), norm.weight, getattr(norm, spec.norm_eps_attr), offset=spec.norm_offset)
        out.append(y.view(x.shape[0], -1))
    return out


def sliding_window(attn) -> int | None:
    """The sliding window stock's mask gives this attention module: its own `sliding_window` where
    the family sets one per layer (Qwen2, Gemma 2: None on full-attention layers), else the config's
    (Mistral, Phi-3: every layer), else None."""
    if "sliding_window" in attn.__dict__:
        return attn.__dict__["sliding_window"]
    if attn._velotune_spec.sliding_window == "none":
        return None
    return getattr(attn.config, "sliding_window", None)


def attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    """Replacement for `<Family>Attention.forward`; returns (output [B, T, H], None) like stock."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    impl = getattr(self.config, "_attn_implementation", None)
    varlen = kwargs.pop(VARLEN_KW, None)
    spec = self._velotune_spec
    temperature = spec.temperature_of(self.config) if spec.q_temperature else None
    if (
        cache is not None
        or kwargs.get("output_attentions")
        or impl not in _OWN_IMPLEMENTATIONS
        or (self.training and self.attention_dropout > 0)
        or position_embeddings is None
        or (spec.q_temperature and (temperature is None or kwargs.get("position_ids") is None))
    ):
        if varlen is not None:
            raise RuntimeError(
                f"velotune: a padding-free batch reached {type(self).__name__}, which cannot run "
                "velotune's attention for this call; pass padding_free=False"
            )
        return self._velotune_stock_forward(
            hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask, **kwargs
        )
    from velotune.kernels.rope import apply_rope_

    B, T, H = hidden_states.shape
    D = self.head_dim
    X = hidden_states.reshape(B * T, H)
    if spec.qkv == "fused":
        (qkv,), _ = _project(X, [self.qkv_proj])
        nq, nk = self.config.num_attention_heads * D, self.config.num_key_value_heads * D
        q, k, v = qkv[:, :nq], qkv[:, nq : nq + nk], qkv[:, nq + nk :]  # views: rotated out of place
        owned = False
    else:
        (q, k, v), (own_q, own_k, _) = _project(X, [self.q_proj, self.k_proj, self.v_proj])
        owned = own_q and own_k
    if spec.qk_norm == "head":  # Qwen3, Gemma 3: RMSNorm over head_dim of every head, before RoPE
        q, k = _head_norms(self, spec, q, k, D)
        owned = True  # the norms' fresh outputs
    elif spec.qk_norm == "projection":  # OLMo 2: RMSNorm over all heads of q and of k, before RoPE
        q, k = self.q_norm(q), self.k_norm(k)
        owned = False  # norm outputs: memory/saved_offload may recompute them from their inputs; not in place
    cos, sin = position_embeddings
    # In place only on our own fresh outputs: a stock module's output may be held elsewhere (by a
    # forward hook, say), and must not change under it.
    if spec.rope_flag_attr is None or getattr(self, spec.rope_flag_attr):  # else a NoPE layer (SmolLM3)
        q, k = apply_rope_(q, k, cos, sin, D, in_place=owned)
    if temperature is not None:  # Ministral 3: q *= 1 + beta * log(1 + floor(pos / period)), in q's dtype
        scale = query_temperature(kwargs["position_ids"].to(q.device), *temperature).to(q.dtype)
        q = (q.view(B, T, -1) * scale.expand(B, T)[..., None]).view(B * T, -1)
    softcap = getattr(self.config, spec.attn_softcap_attr) if spec.attn_softcap_attr else None
    if varlen is not None:  # a packed row of samples [1, N] (models/padding_free.py)
        o = varlen_attention(
            q.view(B * T, -1, D),
            k.view(B * T, -1, D),
            v.view(B * T, -1, D),
            varlen,
            scaling=self.scaling,
            n_rep=self.num_key_value_groups,
            softcap=softcap,
            window=sliding_window(self),
        )
        (out,), _ = _project(o.reshape(B * T, -1), [self.o_proj])
        return out.view(B, T, -1), None
    q = q.view(B, T, -1, D).transpose(1, 2)
    k = k.view(B, T, -1, D).transpose(1, 2)
    v = v.view(B, T, -1, D).transpose(1, 2)
    o = attend(q, k, v, attention_mask, scaling=self.scaling, n_rep=self.num_key_value_groups, softcap=softcap)
    o = o.transpose(1, 2).reshape(B * T, -1)
    (out,), _ = _project(o, [self.o_proj])
    return out.view(B, T, -1), None
