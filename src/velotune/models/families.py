"""The table of supported families: config.model_type -> FamilySpec."""
from __future__ import annotations

from velotune.models import gemma2, granite, llama, mistral, olmo2, phi3, qwen2, smollm3
from velotune.models.spec import FamilySpec

SPECS: tuple[FamilySpec, ...] = (llama.SPEC, mistral.SPEC, qwen2.SPEC, phi3.SPEC, gemma2.SPEC, granite.SPEC,
                                 smollm3.SPEC, olmo2.SPEC)
BY_MODEL_TYPE = {t: s for s in SPECS for t in s.model_types}


def spec_for(config) -> FamilySpec | None:
    return BY_MODEL_TYPE.get(getattr(config, "model_type", None))
