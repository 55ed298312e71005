"""Ministral (MinistralForCausalLM, model_type ministral, e.g. Ministral-8B-Instruct-2410): Mistral with
head_dim set in the config and the sliding window on the layers config.layer_types marks
"sliding_attention" (interleaved with full-attention layers). Mistral-Small 3 / Mistral3's text model
is model_type "mistral" (models/mistral.py). llama.cpp converts Ministral to its llama graph, which
has no sliding window (the exporter warns)."""

from velotune.models.spec import FamilySpec, GGUFLayout

SPEC = FamilySpec(
    name="ministral",
    classes="Ministral",
    sliding_window="layer_types",
    gguf=GGUFLayout("LLAMA", permute_qk=True, features=("vocab_size", "rope_dims", "no_swa_warning")),
)
