"""Phi-3 / 3.5: fused qkv_proj [q|k|v] and gate_up_proj [gate|up]; longrope scaling (stock rotary)."""

from velotune.models.spec import FamilySpec, GGUFLayout

SPEC = FamilySpec(
    name="phi3",
    model_types=("phi3",),
    causal_lm="Phi3ForCausalLM",
    body="Phi3Model",
    attention="Phi3Attention",
    mlp="Phi3MLP",
    norm="Phi3RMSNorm",
    qkv="fused",
    gate_up="fused",
    sliding_window="all",
    gguf=GGUFLayout("PHI3", features=("partial_rope_dims", "orig_ctx", "sliding_window_key", "longrope_factors")),
)
