"""Qwen2 / Qwen2.5: Llama plus a bias on q, k and v (optional sliding window on upper layers)."""

from velotune.models.spec import FamilySpec, GGUFLayout

SPEC = FamilySpec(
    name="qwen2",
    model_types=("qwen2",),
    causal_lm="Qwen2ForCausalLM",
    body="Qwen2Model",
    attention="Qwen2Attention",
    mlp="Qwen2MLP",
    norm="Qwen2RMSNorm",
    qkv_bias=True,
    sliding_window="layer_types",
    gguf=GGUFLayout("QWEN2"),
)
