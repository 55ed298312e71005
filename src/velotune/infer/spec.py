"""What the decode path needs to know about a model, read once from the transformers modules.

A `DecoderSpec` is data: the modules holding the weights (projections may be nn.Linear, bitsandbytes
4-bit or PEFT LoRA layers), the norm style, sliding windows, softcaps and head shapes. Families
differ only in these fields:

| family  | qkv      | mlp          | norm          | extras                                          |
|---------|----------|--------------|---------------|-------------------------------------------------|
| llama   | q, k, v  | gate, up     | w * x         | llama3 RoPE scaling                             |
| mistral | q, k, v  | gate, up     | w * x         | sliding window (every layer)                    |
| qwen2   | q, k, v  | gate, up     | w * x         | q/k/v biases, sliding window per `layer_types`  |
| phi3    | qkv      | gate_up      | w * x         | partial rotary                                  |
| gemma2  | q, k, v  | gate, up     | x * (1 + w)   | sandwich norms, softcaps, alternate sliding     |
| granite | q, k, v  | gate, up     | w * x         | embedding/residual multipliers, logits / scaling |
| smollm3 | q, k, v  | gate, up     | w * x         | NoPE layers (no rotary where use_rope is 0)      |
| olmo2   | q, k, v  | gate, up     | (w * x) fp32  | no pre-norms, post-norms, q/k norm (projection)  |
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

SUPPORTED = ("llama", "mistral", "qwen2", "phi3", "gemma2", "granite", "smollm3", "olmo2")
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
    post_attn_norm: Norm     # after attention's output (norm_after_attn) or before the MLP
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
    pre_ffn_norm: Norm | None = None  # Gemma 2 sandwich norms
    post_ffn_norm: Norm | None = None
    norm_after_attn: bool = False     # post_attn_norm applies to attention's output (Gemma 2, OLMo 2)
    q_norm: Norm | None = None        # OLMo 2: RMSNorm over the whole q / k projection
    k_norm: Norm | None = None
    sliding_window: int | None = None
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
    dtype: torch.dtype
    vocab_size: int
    act_name: str | None  # for the fused GLU kernel (None: use the module's activation)
    embed_multiplier: float | None = None     # Granite: embeddings * m
    residual_multiplier: float | None = None  # Granite: h + branch * m
    logits_divisor: float | None = None       # Granite: logits / d


def causal_lm_of(model):
    """The transformers *ForCausalLM inside a PeftModel (or the model itself)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _norm(module) -> Norm:
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = module.eps
    name = type(module).__name__
    return Norm(module.weight, float(eps), offset="Gemma" in name, fp32_weight=name == "Olmo2RMSNorm")


def _sliding_window(config, attn, index: int) -> int | None:
    if hasattr(attn, "sliding_window"):  # Gemma 2, Qwen 2: set per layer by the module itself
        return attn.sliding_window
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and config.model_type != "mistral":
        return config.sliding_window if layer_types[index] == "sliding_attention" else None
    return getattr(config, "sliding_window", None)


def build_spec(model) -> DecoderSpec | None:
    """Read the decode spec from `model` (PeftModel or *ForCausalLM); None if unsupported."""
    from velotune.infer.ops import lora_plan

    lm = causal_lm_of(model)
    config = lm.config
    if config.model_type not in SUPPORTED or not hasattr(lm, "model"):
        return None
    devices = {p.device for p in lm.parameters()}
    if len(devices) != 1:
        return None  # sharded over devices (device_map): leave to stock generate
    body = lm.model
    layers = []
    for i, layer in enumerate(body.layers):
        attn, mlp = layer.self_attn, layer.mlp
        pre = getattr(layer, "input_layernorm", None)
        spec = LayerSpec(input_norm=None if pre is None else _norm(pre),
                         post_attn_norm=_norm(layer.post_attention_layernorm),
                         o=attn.o_proj, down=mlp.down_proj,
                         act=getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn"),
                         sliding_window=_sliding_window(config, attn, i), rope=bool(getattr(attn, "use_rope", True)))
        if hasattr(attn, "qkv_proj"):
            spec.qkv = attn.qkv_proj
        else:
            spec.q, spec.k, spec.v = attn.q_proj, attn.k_proj, attn.v_proj
        if hasattr(mlp, "gate_up_proj"):
            spec.gate_up = mlp.gate_up_proj
        else:
            spec.gate, spec.up = mlp.gate_proj, mlp.up_proj
        if hasattr(layer, "pre_feedforward_layernorm"):
            spec.pre_ffn_norm = _norm(layer.pre_feedforward_layernorm)
        if hasattr(layer, "post_feedforward_layernorm"):
            spec.post_ffn_norm = _norm(layer.post_feedforward_layernorm)
            spec.norm_after_attn = True
        if config.model_type == "olmo2":
            spec.q_norm, spec.k_norm = _norm(attn.q_norm), _norm(attn.k_norm)
        for name in ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down"):
            if getattr(spec, name) is not None:
                spec.plans[name] = lora_plan(getattr(spec, name))
        layers.append(spec)
    attn0 = body.layers[0].self_attn
    head_dim = attn0.head_dim
    rope_params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = "default"
    if isinstance(rope_params, dict):
        rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
    dtype = body.embed_tokens.weight.dtype
    return DecoderSpec(
        family=config.model_type, embed=body.embed_tokens, layers=layers, final_norm=_norm(body.norm),
        lm_head=lm.lm_head, rotary=body.rotary_emb, rope_type=rope_type,
        n_heads=config.num_attention_heads, n_kv_heads=config.num_key_value_heads, head_dim=head_dim,
        scaling=float(attn0.scaling), attn_softcap=getattr(config, "attn_logit_softcapping", None),
        final_softcap=getattr(config, "final_logit_softcapping", None), device=next(iter(devices)),
        dtype=dtype, vocab_size=config.vocab_size, act_name=_act_name(config),
        embed_multiplier=getattr(body, "embedding_multiplier", None),
        residual_multiplier=getattr(body.layers[0], "residual_multiplier", None),
        logits_divisor=getattr(config, "logits_scaling", None) if config.model_type == "granite" else None)


def _act_name(config) -> str | None:
    from velotune.kernels.glu import ACTS

    name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    return name if name in ACTS else None
