"""Llama 2/3.x: the reference layout every other family is described against."""
from velotune.models.spec import FamilySpec

SPEC = FamilySpec(name="llama", model_types=("llama",), causal_lm="LlamaForCausalLM", body="LlamaModel",
                  attention="LlamaAttention", mlp="LlamaMLP", norm="LlamaRMSNorm")
