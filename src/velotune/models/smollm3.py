"""SmolLM3: Llama layout with NoPE layers -- attention without rotary embedding on the layers where
`config.no_rope_layers[i]` is 0 (every 4th by default), read from the attention module's `use_rope`;
optional sliding windows per `config.layer_types` (masks built by transformers).
GGUF: llama.cpp's smollm3 graph, which hard-codes NoPE on every 4th layer and has no sliding window
(other configs are refused)."""

from velotune.models.spec import FamilySpec, GGUFLayout

SPEC = FamilySpec(
    name="smollm3",
    classes="SmolLM3",
    sliding_window="layer_types",
    rope_flag_attr="use_rope",
    gguf=GGUFLayout(
        "SMOLLM3", permute_qk=True, features=("vocab_size", "rope_dims", "no_swa_warning", "smollm3_layout")
    ),
)
