"""What the decode path needs to know about a model, read once from the transformers modules.

A `DecoderSpec` is data: the modules holding the weights (projections may be nn.Linear, bitsandbytes
4-bit or PEFT LoRA layers), the norm style, sliding windows, softcaps and head shapes. The family
facts (norm offset, activation, per-layer sliding windows, softcap attributes) come from the family
registry (velotune.models.families, one FamilySpec per family); which projections and norms a layer
has is read from the modules themselves (q/k/v or fused qkv, gate/up or fused gate_up, sandwich norms,
no norm before attention (OLMo 2)), and so are the scalars stock's own modules apply (Granite's
embedding_multiplier on the decoder stack and residual_multiplier on each layer).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

DYNAMIC_ROPE = ("dynamic", "longrope")  # cos/sin depend on the current length: no precomputed table


@dataclass
class Norm:
    weight: torch.Tensor
    eps: float
    offset: bool  # Gemma style (1 + w)
    fp32_weight: bool = False  # OLMo 2 style: (w * x) in fp32, rounded once


@dataclass
class LayerSpec:
    input_norm: Norm | None  # None: OLMo 2 (no norm before attention)
    post_attn_norm: Norm  # after attention's output (norm_after_attn) or before the MLP
    q: object = None
    k: object = None
    v: object = None
    qkv: object = None  # fused (Phi-3): rows [q | k | v]
    o: object = None
    gate: object = None
    up: object = None
    gate_up: object = None  # fused (Phi-3): rows [gate | up]
    down: object = None
    act: object = None
    q_norm: Norm | None = None  # RMSNorm on q and k before RoPE, as FamilySpec.qk_norm says:
    k_norm: Norm | None = None  # per head over head_dim (Qwen3, Gemma 3) or over the whole projection (OLMo 2)
    qk_norm: str = "none"  # "none" | "head" | "projection" (the family's FamilySpec.qk_norm)
    pre_ffn_norm: Norm | None = None  # Gemma 2 sandwich norms
    post_ffn_norm: Norm | None = None
    norm_after_attn: bool = False  # post_attn_norm applies to attention's output (Gemma 2/3, OLMo 2)
    sliding_window: int | None = None
    rope_key: str | None = None  # which RoPE table: None (the model's one) or a layer type (Gemma 3)
    rope: bool = True  # False: a NoPE layer (SmolLM3)
    plans: dict = field(default_factory=dict)  # projection name -> ops.lora_plan result


@dataclass
class DecoderSpec:
    family: str
    embed: torch.nn.Module
    layers: list
    final_norm: Norm
    lm_head: torch.nn.Module
    rotary: torch.nn.Module
    rope_type: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scaling: float
    attn_softcap: float | None
    final_softcap: float | None
    device: torch.device
    dtype: torch.dtype  # activations and KV cache (a module in another dtype: ops._base casts around it)
    vocab_size: int
    act_name: str | None  # for the fused GLU kernel (None: use the module's activation)
    embed_multiplier: float | None = None  # Granite: embeddings * m
    residual_multiplier: float | None = None  # Granite: h + branch * m
    logits_divisor: float | None = None  # Granite: logits / d
    q_temperature: tuple[float, int] | None = None  # Ministral 3: (beta, period), models/spec.query_temperature


def causal_lm_of(model):
    """The transformers *ForCausalLM inside a PeftModel (or the model itself)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _norm(module, family) -> Norm:
    """A norm module read with its family's rules: eps attribute, the (1 + w) offset, fp32 weight product."""
    return Norm(
        module.weight,
        float(getattr(module, family.norm_eps_attr)),
        offset=family.norm_offset != 0,
        fp32_weight=family.norm_weight_in_fp32,
    )


def build_spec(model) -> DecoderSpec | None:
    """Read the decode spec from `model` (PeftModel or *ForCausalLM); None if unsupported."""
    from velotune.infer.ops import lora_plan
    from velotune.models.families import spec_for

    lm = causal_lm_of(model)
    config = lm.config
    family = spec_for(config)
    if family is None or not hasattr(lm, "model") or getattr(config, "use_bidirectional_attention", False):
        return None
    devices = {p.device for p in lm.parameters()}
    if len(devices) != 1:
        return None  # sharded over devices (device_map): leave to stock generate
    body = lm.model
    if family.rope_by_layer_type and "layer_type" not in inspect.signature(body.rotary_emb.forward).parameters:
        return None  # a transformers release whose rotary module has no per-layer-type tables
    if family.q_temperature is not None and family.temperature_of(config) is None:
        return None  # a config without its temperature parameters: stock generate (which says why)
    layers = []
    for i, layer in enumerate(body.layers):
        attn, mlp = layer.self_attn, layer.mlp
        pre = getattr(layer, "input_layernorm", None)
        spec = LayerSpec(
            input_norm=None if pre is None else _norm(pre, family),
            post_attn_norm=_norm(layer.post_attention_layernorm, family),
            o=attn.o_proj,
            down=mlp.down_proj,
            act=getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn"),
            norm_after_attn=family.sandwich_norms,
            sliding_window=family.window_of(config, i),
            rope_key=config.layer_types[i] if family.rope_by_layer_type else None,
            rope=family.rope_flag_attr is None or bool(getattr(attn, family.rope_flag_attr)),
        )
        if hasattr(attn, "qkv_proj"):
            spec.qkv = attn.qkv_proj
        else:
            spec.q, spec.k, spec.v = attn.q_proj, attn.k_proj, attn.v_proj
        if hasattr(mlp, "gate_up_proj"):
            spec.gate_up = mlp.gate_up_proj
        else:
            spec.gate, spec.up = mlp.gate_proj, mlp.up_proj
        if family.qk_norm != "none":
            spec.q_norm, spec.k_norm = _norm(attn.q_norm, family), _norm(attn.k_norm, family)
            spec.qk_norm = family.qk_norm
        if hasattr(layer, "pre_feedforward_layernorm"):
            spec.pre_ffn_norm = _norm(layer.pre_feedforward_layernorm, family)
        if hasattr(layer, "post_feedforward_layernorm"):
            spec.post_ffn_norm = _norm(layer.post_feedforward_layernorm, family)
        for name in ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down"):
            if getattr(spec, name) is not None:
                spec.plans[name] = lora_plan(getattr(spec, name))
        layers.append(spec)
    attn0 = body.layers[0].self_attn
    head_dim = attn0.head_dim
    rope_type = _rope_type(config)
    # the activations' and the KV cache's dtype: the frozen embedding's (PEFT's ModulesToSaveWrapper
    # reports its trainable copy's weight, which TRL may have cast to bf16)
    dtype = getattr(body.embed_tokens, "original_module", body.embed_tokens).weight.dtype
    return DecoderSpec(
        family=family.name,
        embed=body.embed_tokens,
        layers=layers,
        final_norm=_norm(body.norm, family),
        lm_head=lm.lm_head,
        rotary=body.rotary_emb,
        rope_type=rope_type,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        scaling=float(attn0.scaling),
        attn_softcap=_config_value(config, family.attn_softcap_attr),
        final_softcap=_config_value(config, family.final_softcap_attr),
        device=next(iter(devices)),
        dtype=dtype,
        vocab_size=config.vocab_size,
        act_name=family.activation(config),
        embed_multiplier=getattr(body, "embedding_multiplier", None),
        residual_multiplier=getattr(body.layers[0], "residual_multiplier", None),
        logits_divisor=_config_value(config, family.logits_divisor_attr),
        q_temperature=family.temperature_of(config),
    )


def _rope_type(config) -> str:
    """The RoPE type; with one table per layer type (Gemma 3) a length-dependent one if any is."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        return "default"
    tables = list(params.values()) if params and all(isinstance(v, dict) for v in params.values()) else [params]
    types = [t.get("rope_type", t.get("type", "default")) for t in tables]
    return next((t for t in types if t in DYNAMIC_ROPE), types[0])


def _config_value(config, attr: str | None):
    return getattr(config, attr, None) if attr else None
