"""Llama 2/3.x: the reference layout every other family is described against."""

from velotune.models.spec import FamilySpec, GGUFLayout

SPEC = FamilySpec(
    name="llama",
    classes="Llama",
    gguf=GGUFLayout("LLAMA", permute_qk=True, features=("vocab_size", "rope_dims", "llama3_rope_freqs")),
)
