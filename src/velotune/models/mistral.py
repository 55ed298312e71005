"""Mistral: Llama plus a sliding attention window on every layer (when config.sliding_window is set)."""

from velotune.models.spec import FamilySpec, GGUFLayout

SPEC = FamilySpec(
    name="mistral",
    classes="Mistral",
    sliding_window="all",
    gguf=GGUFLayout("LLAMA", permute_qk=True, features=("vocab_size", "rope_dims", "no_swa_warning")),
)
