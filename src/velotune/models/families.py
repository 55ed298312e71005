"""The family registry: config.model_type -> FamilySpec, read by training, inference and export.

Adding a family: write models/<family>.py with its `SPEC` (see spec.py for every field) and add it
to REGISTERED below. Nothing else keeps a list of families.
"""

from __future__ import annotations

from velotune.models import gemma2, gemma3, granite, llama, ministral, ministral3, mistral
from velotune.models import olmo2, olmo3, phi3, qwen2, qwen3, smollm3
from velotune.models.spec import FamilySpec

REGISTERED = (llama, mistral, qwen2, phi3, gemma2, qwen3, gemma3, ministral, granite, smollm3, olmo2, ministral3, olmo3)

SPECS: tuple[FamilySpec, ...] = tuple(m.SPEC for m in REGISTERED)
BY_MODEL_TYPE = {t: s for s in SPECS for t in s.model_types}
assert len(BY_MODEL_TYPE) == sum(len(s.model_types) for s in SPECS), "a model_type claimed by two families"


def spec_for(config) -> FamilySpec | None:
    """The family of a transformers config (by model_type), or None: not on velotune's fast path."""
    return BY_MODEL_TYPE.get(getattr(config, "model_type", None))


def names() -> tuple[str, ...]:
    return tuple(s.name for s in SPECS)
