"""Gemma 3 text (Gemma3ForCausalLM, model_type gemma3_text): Gemma 2's (1 + w) fp32 RMSNorms, sandwich
norms, GeGLU-tanh and sqrt(hidden)-scaled embeddings, plus q_norm / k_norm per head before RoPE
(Gemma-style norms too), local sliding-window and global layers per config.layer_types (5 : 1) with
two RoPE tables (local: rope_local_base_freq / rope_parameters["sliding_attention"]; global: its own
base and scaling), attention scale query_pre_attn_scalar ** -0.5 (read from the module). The
attention-score softcap is gone (stock attention ignores the config value); the final-logit softcap
stays available."""

from velotune.models.gemma2 import GEMMA_LAYOUT
from velotune.models.spec import FamilySpec, GGUFLayout

SPEC = FamilySpec(
    name="gemma3_text",
    classes="Gemma3",
    body="Gemma3TextModel",
    qk_norm="head",
    rope_by_layer_type=True,
    **GEMMA_LAYOUT,
    gguf=GGUFLayout("GEMMA3", features=("gemma3_layout", "sliding_window_key", "tied_output")),
)
