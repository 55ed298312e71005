"""OLMo 2: no norm before attention or MLP; RMSNorms after them instead (post_attention_layernorm,
post_feedforward_layernorm, run by the stock decoder layer); q_norm / k_norm over the whole q / k
projection (all heads at once) before RoPE; RMSNorm multiplies the weight into the fp32 row and rounds
once ((w * n).to(dtype)). GGUF: llama.cpp's olmo2 graph (q/k norms and post-norms are tensors only)."""

from velotune.models.spec import FamilySpec, GGUFLayout

SPEC = FamilySpec(
    name="olmo2",
    classes="Olmo2",
    norm_weight_in_fp32=True,
    qk_norm="projection",
    sandwich_norms=True,
    gguf=GGUFLayout("OLMO2"),
)
