"""Qwen3 (dense): Llama plus an RMSNorm over head_dim on every query and key head, after the
projection and before RoPE (q_norm / k_norm); head_dim is set in the config (128, not hidden / heads);
no q/k/v bias; optional sliding window on the upper layers (per config.layer_types)."""

from velotune.models.spec import FamilySpec, GGUFLayout

SPEC = FamilySpec(
    name="qwen3",
    classes="Qwen3",
    qk_norm="head",
    sliding_window="layer_types",
    gguf=GGUFLayout("QWEN3", features=("no_swa_warning",)),
)
