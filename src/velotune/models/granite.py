"""Granite 3: Llama layout with four scalars. Three are applied by transformers' own code, which stays
stock: embeddings times `embedding_multiplier` (GraniteModel), each residual branch times
`residual_multiplier` (GraniteDecoderLayer), and `attention_multiplier` as the attention score scale
(GraniteAttention.scaling, which the fused attention reads). The fourth, logits divided by
`logits_scaling`, is folded into the fused cross-entropy as logit_scale = 1 / logits_scaling.
GGUF: llama.cpp's granite graph (the four scalars as metadata, Llama's q/k permutation)."""

from velotune.models.spec import FamilySpec, GGUFLayout

SPEC = FamilySpec(
    name="granite",
    classes="Granite",
    logits_divisor_attr="logits_scaling",
    gguf=GGUFLayout(
        "GRANITE", permute_qk=True, features=("vocab_size", "rope_dims", "no_swa_warning", "granite_scales")
    ),
)
