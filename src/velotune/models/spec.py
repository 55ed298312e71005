"""`FamilySpec`: what one model family changes relative to Llama, as data, read by every subsystem.

One home per fact: a family's file (models/<family>.py) holds one `FamilySpec`, registered by one line
in models/families.py. Training (the fused forwards in attention.py / mlp.py / norm.py / loss.py),
inference (infer/spec.py reads the decode facts) and GGUF export (export/gguf_arch.py reads `gguf`)
all look the family up there; none keeps a table of its own.

Fields, by reader:
  patching (patch.py)   causal_lm, attention, mlp, norm: transformers class names whose INSTANCES get
                        velotune's fused forwards (per instance, revertible); body: the decoder stack
                        that runs padded batches padding-free (models/padding_free.py). Each one not
                        given is <classes> + ForCausalLM / Model / Attention / MLP / RMSNorm (classes:
                        transformers' prefix, e.g. "Qwen2"). model_types defaults to (name,).
  norms                 norm_offset: RMSNorm scales by (norm_offset + w) -- 0 Llama, 1 Gemma;
                        norm_eps_attr: the norm module's attribute holding eps;
                        norm_weight_in_fp32: (w * n) in fp32, rounded once (OLMo 2), instead of
                        w * n.to(dtype).
  MLP                   activation_attr: config attribute naming the activation (mapped through the GLU
                        kernel's one table, kernels/glu.ACTIVATIONS; an unknown name -> stock MLP);
                        gate_up: "separate" (gate_proj, up_proj) | "fused" (gate_up_proj = [gate|up]).
  attention             qkv: "separate" (q_proj, k_proj, v_proj) | "fused" (qkv_proj = [q|k|v]);
                        qk_norm: "none" | "head" (attention modules own q_norm/k_norm RMSNorms over
                        head_dim, applied per head to q and k after the projection, before RoPE:
                        Qwen3, Gemma 3) | "projection" (q_norm/k_norm over the whole q / k
                        projection, all heads at once, before RoPE: OLMo 2);
                        attn_softcap_attr / final_softcap_attr: config attributes t of t*tanh(x/t)
                        on attention scores / final logits (None or a None value: no softcap);
                        rope_flag_attr: attention-module attribute; falsy on a NoPE layer (no RoPE:
                        SmolLM3's use_rope).
                        q_temperature: keys (beta, period) of config.rope_parameters for Llama 4-style
                        attention temperature: after RoPE, q *= 1 + beta * log(1 + floor(pos / period))
                        per token position (Ministral 3); None: no temperature.
  logits                logits_divisor_attr: config attribute d of logits / d (Granite's
                        logits_scaling), folded into the fused cross-entropy's logit scale.
  masks & layers        sliding_window: which layers attend within config.sliding_window --
                        "none", "all" (every layer), "layer_types" (layers whose
                        config.layer_types[i] == "sliding_attention"). Training uses transformers' own
                        masks; the decode path (infer/) builds its masks from this.
                        rope_by_layer_type: the model's rotary module takes a layer type and returns
                        that type's cos/sin (Gemma 3: local and global RoPE bases); layer i uses
                        config.layer_types[i]'s table (training gets them from transformers' own loop).
                        embedding_scale, sandwich_norms: done by the stock embedding / decoder layer
                        code; recorded so the decode path and mlp.py know them.
  export                gguf: a `GGUFLayout` (llama.cpp architecture and per-feature metadata) or None
                        when llama.cpp has no architecture for the family (GGUF export then refuses).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from velotune.kernels.glu import canonical_activation

SLIDING = ("none", "all", "layer_types")
QK_NORMS = ("none", "head", "projection")
# role -> the suffix of its transformers class name after the family's prefix (FamilySpec.classes)
CLASS_SUFFIXES = {
    "causal_lm": "ForCausalLM",
    "body": "Model",
    "attention": "Attention",
    "mlp": "MLP",
    "norm": "RMSNorm",
}

# The fields FamilySpec.describe() shows, in its order, when they differ from the Llama layout.
_DESCRIBED = (
    "norm_offset norm_weight_in_fp32 qk_norm qkv gate_up qkv_bias attn_softcap_attr final_softcap_attr "
    "logits_divisor_attr sliding_window rope_by_layer_type rope_flag_attr q_temperature embedding_scale "
    "sandwich_norms"
).split()


@dataclass(frozen=True)
class GGUFLayout:
    """How llama.cpp stores a family (mirrors convert_hf_to_gguf.py's model class for it).

    arch: the gguf.MODEL_ARCH member name (e.g. "LLAMA", "QWEN2"); tensor names follow the gguf
    package's HF -> GGUF table for it. permute_qk: q/k rows go from HF's rotate-half pairs to
    llama.cpp's interleaved pairs (its "normal" RoPE). Norm weights are written as offset + w for
    Gemma-style norms (FamilySpec.norm_offset). features: names of the metadata/tensor writers in
    export/gguf_arch.py's FEATURES table this architecture needs (e.g. "softcaps", "tied_output").
    """

    arch: str
    permute_qk: bool = False
    features: tuple[str, ...] = ()


@dataclass(frozen=True)
class FamilySpec:
    name: str
    classes: str = ""  # transformers' class-name prefix: <classes>ForCausalLM, Model, Attention, MLP, RMSNorm
    model_types: tuple[str, ...] = ()  # config.model_type values this spec handles; () -> (name,)
    causal_lm: str = ""  # transformers class names bound to fused forwards ("" -> from `classes`)
    attention: str = ""
    mlp: str = ""
    norm: str = ""
    body: str = ""  # the decoder stack (e.g. LlamaModel): padding-free batches
    norm_offset: float = 0.0  # RMSNorm multiplies by (offset + w): Gemma uses 1.0
    norm_eps_attr: str = "variance_epsilon"
    norm_weight_in_fp32: bool = False  # (w * n) in fp32, rounded once (OLMo 2), instead of w * n.to(dtype)
    activation_attr: str = "hidden_act"  # config attribute naming the MLP activation
    qkv: str = "separate"  # "separate": q_proj/k_proj/v_proj; "fused": qkv_proj = [q|k|v]
    gate_up: str = "separate"  # "separate": gate_proj/up_proj; "fused": gate_up_proj = [gate|up]
    qkv_bias: bool = False  # informational: the bias is read from the layer itself
    qk_norm: str = "none"  # "none" | "head" | "projection": q_norm/k_norm before RoPE
    attn_softcap_attr: str | None = None  # config attribute: scores -> t * tanh(scores / t)
    final_softcap_attr: str | None = None  # config attribute: logits -> t * tanh(logits / t)
    logits_divisor_attr: str | None = None  # config attribute: logits -> logits / d (Granite's logits_scaling)
    sliding_window: str = "none"  # "none" | "all" | "layer_types" (see the module docstring)
    rope_by_layer_type: bool = False  # rotary_emb(x, positions, layer_type): one table per layer type
    rope_flag_attr: str | None = None  # attention-module attribute; falsy: a NoPE layer (SmolLM3's use_rope)
    q_temperature: tuple[str, str] | None = None  # rope_parameters keys (beta, period); see query_temperature
    embedding_scale: bool = False  # hidden *= sqrt(hidden_size) after the embedding (stock code)
    sandwich_norms: bool = False  # extra norms after attention and MLP (stock decoder layer)
    gguf: GGUFLayout | None = None  # llama.cpp layout; None: no GGUF export

    def __post_init__(self):
        if self.sliding_window not in SLIDING:
            raise ValueError(f"FamilySpec {self.name}: sliding_window={self.sliding_window!r}, expected {SLIDING}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"FamilySpec {self.name}: qk_norm={self.qk_norm!r}, expected {QK_NORMS}")
        if not self.model_types:
            object.__setattr__(self, "model_types", (self.name,))
        for role, suffix in CLASS_SUFFIXES.items():
            if self.classes and not getattr(self, role):  # no prefix: names as given ("": no such module)
                object.__setattr__(self, role, self.classes + suffix)

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

    def temperature_of(self, config) -> tuple[float, int] | None:
        """(beta, period) of the family's query temperature read from config.rope_parameters, or None.
        Missing keys: None as well (stock's forward cannot run such a config either)."""
        if self.q_temperature is None:
            return None
        params = getattr(config, "rope_parameters", None) or {}
        beta, period = (params.get(key) for key in self.q_temperature)
        return None if beta is None or period is None else (beta, period)

    def activation(self, config) -> str | None:
        """The GLU kernels' name of the config's activation, or None (not one they implement)."""
        return canonical_activation(getattr(config, self.activation_attr, None))

    def window_of(self, config, layer: int) -> int | None:
        """The sliding window of decoder layer `layer` (None: full attention)."""
        window = getattr(config, "sliding_window", None)
        if self.sliding_window == "none" or window is None:
            return None
        if self.sliding_window == "all":
            return window
        types = getattr(config, "layer_types", None)
        return window if types is not None and types[layer] == "sliding_attention" else None

    def describe(self) -> str:
        """`<name>: label=value, ...` for the fields in _DESCRIBED that differ from the Llama layout, labelled
        by their names less `_attr` (rope_flag_attr: nope_layers_flag; q_temperature: its beta key)."""
        values = {field: getattr(self, field) for field in _DESCRIBED}
        values["q_temperature"] = self.q_temperature and self.q_temperature[0]
        labels = {"rope_flag_attr": "nope_layers_flag"}
        diffs = [
            f"{labels.get(field, field.removesuffix('_attr'))}={v}"
            for field, v in values.items()
            if v not in (0.0, "separate", False, None, "none")
        ]
        return f"{self.name}: " + (", ".join(diffs) if diffs else "Llama layout")


def query_temperature(position_ids: torch.Tensor, beta: float, period: int) -> torch.Tensor:
    """Llama 4-style attention temperature (FamilySpec.q_temperature): int positions [B, T] -> float32
    [B, T] = 1 + beta * log(1 + floor(pos / period)), the operations transformers' Ministral 3 attention
    uses (get_llama_4_attn_scale), in its order, so the multiplier is bit-identical; exactly 1 below
    `period`. Callers cast it to q's dtype and multiply q (after RoPE) by it, as stock does."""
    return 1 + beta * torch.log(1 + torch.floor(position_ids / period))
