"""Llama 2/3.x: the reference layout every other family is described against."""

from velotune.models.spec import FamilySpec, GGUFLayout

SPEC = FamilySpec(
    name="llama",
    model_types=("llama",),
    causal_lm="LlamaForCausalLM",
    body="LlamaModel",
    attention="LlamaAttention",
    mlp="LlamaMLP",
    norm="LlamaRMSNorm",
    gguf=GGUFLayout("LLAMA", permute_qk=True, features=("vocab_size", "rope_dims", "llama3_rope_freqs")),
)
