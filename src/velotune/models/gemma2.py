"""Gemma 2: (1 + w) RMSNorm computed in fp32, sandwich norms, GeGLU-tanh, attention-score and
final-logit softcapping, sliding window on alternate layers, embeddings scaled by sqrt(hidden)."""

from velotune.models.spec import FamilySpec, GGUFLayout

SPEC = FamilySpec(
    name="gemma2",
    model_types=("gemma2",),
    causal_lm="Gemma2ForCausalLM",
    body="Gemma2Model",
    attention="Gemma2Attention",
    mlp="Gemma2MLP",
    norm="Gemma2RMSNorm",
    norm_offset=1.0,
    norm_eps_attr="eps",
    activation_attr="hidden_activation",
    attn_softcap_attr="attn_logit_softcapping",
    final_softcap_attr="final_logit_softcapping",
    sliding_window="layer_types",
    embedding_scale=True,
    sandwich_norms=True,
    gguf=GGUFLayout("GEMMA2", features=("gemma2_layout", "softcaps", "sliding_window_key", "tied_output")),
)
