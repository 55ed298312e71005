"""Ministral 3 text (Ministral3ForCausalLM, model_type ministral3, the language model of the
Ministral-3 / Mistral-3 2512 checkpoints): Mistral with head_dim set in the config, YaRN RoPE (the
cos/sin come from transformers' own rotary module, so any rope type is exact), and Llama 4-style
attention temperature: after RoPE each query is multiplied by 1 + beta * log(1 + floor(pos / period))
with beta = rope_parameters["llama_4_scaling_beta"] and period its original_max_position_embeddings
(exactly 1 below the original context). The sliding window, when config.sliding_window is set, is on
every layer. llama.cpp's mistral3 graph has the temperature (period = the YaRN original context) and
no sliding window (the exporter warns)."""

from velotune.models.spec import FamilySpec, GGUFLayout

SPEC = FamilySpec(
    name="ministral3",
    classes="Ministral3",
    sliding_window="all",
    q_temperature=("llama_4_scaling_beta", "original_max_position_embeddings"),
    gguf=GGUFLayout(
        "MISTRAL3", permute_qk=True, features=("vocab_size", "rope_dims", "no_swa_warning", "ministral3_temperature")
    ),
)
