"""Phi-3 / 3.5: fused qkv_proj [q|k|v] and gate_up_proj [gate|up]; longrope scaling (stock rotary)."""

from velotune.models.spec import FamilySpec, GGUFLayout

SPEC = FamilySpec(
    name="phi3",
    classes="Phi3",
    qkv="fused",
    gate_up="fused",
    sliding_window="all",
    gguf=GGUFLayout("PHI3", features=("partial_rope_dims", "orig_ctx", "sliding_window_key", "longrope_factors")),
)
