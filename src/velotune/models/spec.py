"""`FamilySpec`: what one model family changes relative to Llama, as data.

The fused forwards in attention.py / mlp.py / norm.py / loss.py read these fields; the rest of the
family (decoder-layer wiring, embedding scale, mask construction) stays in transformers' own code,
which is why fields such as `sandwich_norms` or `sliding_window` are recorded here for the reader
and for `report()`, and checked against the config, rather than re-implemented.
"""
from __future__ import annotations

from dataclasses import dataclass

# transformers activation names -> the kernels' GLU activation names (exactly the same function).
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}


@dataclass(frozen=True)
class FamilySpec:
    name: str
    model_types: tuple[str, ...]          # config.model_type values this spec handles
    causal_lm: str                        # transformers class names bound to fused forwards
    attention: str
    mlp: str
    norm: str
    body: str = ""                        # the decoder stack (e.g. LlamaModel): padding-free batches
    norm_offset: float = 0.0              # RMSNorm multiplies by (offset + w): Gemma uses 1.0
    norm_eps_attr: str = "variance_epsilon"
    norm_weight_in_fp32: bool = False     # (w * n) in fp32, rounded once (OLMo 2), instead of w * n.to(dtype)
    qk_norm: str = "none"                 # "none" | "projection": q_norm / k_norm over the whole q / k projection
    activation_attr: str = "hidden_act"   # config attribute naming the MLP activation
    qkv: str = "separate"                 # "separate": q_proj/k_proj/v_proj; "fused": qkv_proj = [q|k|v]
    gate_up: str = "separate"             # "separate": gate_proj/up_proj; "fused": gate_up_proj = [gate|up]
    qkv_bias: bool = False                # informational: the bias is read from the layer itself
    attn_softcap_attr: str | None = None  # config attribute: scores -> t * tanh(scores / t)
    final_softcap_attr: str | None = None # config attribute: logits -> t * tanh(logits / t)
    logits_divisor_attr: str | None = None  # config attribute: logits -> logits / d (Granite's logits_scaling)
    sliding_window: str = "none"          # "none" | "all" | "alternate" | "layer_types" (masks built by transformers)
    rope_flag_attr: str | None = None     # attention-module attribute; falsy: a NoPE layer (SmolLM3's use_rope)
    embedding_scale: bool = False         # hidden *= sqrt(hidden_size) after the embedding (stock code)
    sandwich_norms: bool = False          # extra norms after attention and MLP (stock decoder layer)

    def role_of(self, class_name: str) -> str | None:
        """Which fused forward a module of this class name gets ("causal_lm", "attention", ...)."""
        for role in ("causal_lm", "body", "attention", "mlp", "norm"):
            if getattr(self, role) == class_name:
                return role
        return None

    def logits_multiplier(self, config) -> float | None:
        """The number the loss multiplies lm_head's output by (the fused CE's logit_scale), or None."""
        if self.logits_divisor_attr is None:
            return None
        return 1.0 / float(getattr(config, self.logits_divisor_attr))

    def activation(self, config) -> str | None:
        return ACTIVATIONS.get(getattr(config, self.activation_attr, None))

    def describe(self) -> str:
        diffs = [f"{k}={v}" for k, v in (
            ("norm_offset", self.norm_offset), ("norm_weight_in_fp32", self.norm_weight_in_fp32),
            ("qk_norm", self.qk_norm), ("qkv", self.qkv), ("gate_up", self.gate_up),
            ("qkv_bias", self.qkv_bias), ("attn_softcap", self.attn_softcap_attr),
            ("final_softcap", self.final_softcap_attr), ("logits_divisor", self.logits_divisor_attr),
            ("sliding_window", self.sliding_window), ("nope_layers_flag", self.rope_flag_attr),
            ("embedding_scale", self.embedding_scale), ("sandwich_norms", self.sandwich_norms))
            if v not in (0.0, "separate", False, None, "none")]
        return f"{self.name}: " + (", ".join(diffs) if diffs else "Llama layout")
