"""OLMo 3 (Olmo3ForCausalLM): OLMo 2's layout -- post-norms after attention and MLP (run by the stock
decoder layer), q_norm / k_norm over the whole q / k projection before RoPE, RMSNorm rounding
(w * n) once from fp32 -- plus sliding-window and full-attention layers per config.layer_types (window
config.sliding_window) and one RoPE table per layer type (config.rope_parameters["sliding_attention"] /
["full_attention"]; the rotary module takes the layer type). GGUF: llama.cpp runs OLMo 3 as its olmo2
architecture with the per-layer sliding-window pattern, one RoPE base and unscaled sliding layers."""

from velotune.models.spec import FamilySpec, GGUFLayout

SPEC = FamilySpec(
    name="olmo3",
    classes="Olmo3",
    norm_weight_in_fp32=True,
    qk_norm="projection",
    sliding_window="layer_types",
    rope_by_layer_type=True,
    sandwich_norms=True,
    gguf=GGUFLayout("OLMO2", features=("sliding_window_pattern", "olmo3_rope")),
)
