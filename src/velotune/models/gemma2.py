"""Gemma 2: (1 + w) RMSNorm computed in fp32, sandwich norms, GeGLU-tanh, attention-score and
final-logit softcapping, sliding window on alternate layers, embeddings scaled by sqrt(hidden)."""

from velotune.models.spec import FamilySpec, GGUFLayout

# What every Gemma generation shares (Gemma 3 text reads it too): (1 + w) norms with `eps`, the
# activation under config.hidden_activation, sqrt(hidden)-scaled embeddings, sandwich norms,
# local/global layers from config.layer_types and the final-logit softcap's config attribute.
GEMMA_LAYOUT = dict(
    norm_offset=1.0,
    norm_eps_attr="eps",
    activation_attr="hidden_activation",
    final_softcap_attr="final_logit_softcapping",
    sliding_window="layer_types",
    embedding_scale=True,
    sandwich_norms=True,
)

SPEC = FamilySpec(
    name="gemma2",
    classes="Gemma2",
    attn_softcap_attr="attn_logit_softcapping",
    **GEMMA_LAYOUT,
    gguf=GGUFLayout("GEMMA2", features=("gemma2_layout", "softcaps", "sliding_window_key", "tied_output")),
)
