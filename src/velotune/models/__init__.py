"""Model families and the fast decoder path.

`prepare_model` is called by `FastLanguageModel.from_pretrained`; `prepare_peft_model` by
`get_peft_model`. Both patch module instances only (see patch.py); `unpatch(model)` reverts.
"""

from __future__ import annotations

import logging

from velotune.models.binding import is_patched
from velotune.models.families import SPECS, spec_for
from velotune.models.generic import generic_plan, prepare_generic, prepare_generic_peft
from velotune.models.patch import patch, unpatch
from velotune.models.report import report
from velotune.models.spec import FamilySpec

log = logging.getLogger("velotune")

__all__ = ["FamilySpec", "SPECS", "prepare_model", "prepare_peft_model", "report", "spec_for", "unpatch"]


def prepare_model(model, *, max_seq_length: int | None = None, full_finetuning: bool = False) -> bool:
    """Bind velotune's fused forwards onto a freshly loaded transformers model (per instance).

    Returns True when a fast path is active: the family's, or for a decoder-only model without a
    family file the generic one (models/generic.py: each piece probed against stock, a one-line log
    says which are fast). False otherwise (stock path, with a one-line warning naming it).
    full_finetuning needs nothing special here: the fused functions produce dW whenever a base
    weight requires grad. `max_seq_length`, when given, is recorded as `model.max_seq_length`; the
    model's positions are never changed here (RoPE scaling is the loader's, on request only:
    models/rope_scaling.py).
    """
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    spec = spec_for(model.config)
    if spec is None:
        return prepare_generic(model)
    patch(model, spec)
    return True


def prepare_peft_model(peft_model) -> bool:
    """Make sure the PeftModel's base runs fused. LoRA layers need no binding: the fused attention
    and MLP forwards read PEFT's layers on every call (so adapter switching/disabling just works)."""
    base = peft_model.get_base_model()
    if getattr(base, "velotune_fast", True) is False:
        return False
    if generic_plan(base) is not None:
        return prepare_generic_peft(peft_model)
    if any(is_patched(m) for m in base.modules()):
        return True
    spec = spec_for(base.config)
    if spec is None:
        return False
    patch(base, spec)
    return True
