"""Qwen2 / Qwen2.5: Llama plus a bias on q, k and v (optional sliding window on upper layers)."""

from velotune.models.spec import FamilySpec, GGUFLayout

SPEC = FamilySpec(name="qwen2", classes="Qwen2", qkv_bias=True, sliding_window="layer_types", gguf=GGUFLayout("QWEN2"))
