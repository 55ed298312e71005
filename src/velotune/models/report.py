"""`report(model)`: a short human-readable summary of what runs fused right now.

For a family model: how many modules of each role run velotune's forwards (models/patch.py), how many
LoRA layers take the fused path and which stay on stock PEFT, and whether the loss can skip the full
logits. For a model on the generic path: its one line per piece (models/generic.py).
"""

from __future__ import annotations

import collections

from torch import nn

from velotune.lora.layers import is_lora_layer, resolve
from velotune.models.binding import is_patched, role_of
from velotune.models.generic import generic_plan, report_lines
from velotune.models.loss import resolve_lm_head
from velotune.models.patch import FUSED_FORWARDS


def _lora_status(model: nn.Module) -> tuple[int, list[str]]:
    fused, stock = 0, []
    for name, module in model.named_modules():
        if is_lora_layer(module):
            if resolve(module) is None:
                stock.append(name)
            else:
                fused += 1
    return fused, stock


def report(model: nn.Module) -> str:
    """A short human-readable summary of what runs fused."""
    if generic_plan(model) is not None:
        return "\n".join(report_lines(model))
    counts: dict[str, int] = collections.Counter()
    spec = None
    for module in model.modules():
        if is_patched(module):
            counts[role_of(module)] += 1
            spec = module._velotune_spec
    if not counts:
        return f"velotune: {type(model).__name__} runs entirely on the stock transformers path"
    lines = [f"velotune fused path ({spec.describe()})"]
    for role in FUSED_FORWARDS:
        if counts.get(role):
            lines.append(f"  {role:<9} {counts[role]:>4} module(s) fused")
    fused, stock = _lora_status(model)
    if fused or stock:
        lines.append(
            f"  lora      {fused:>4} layer(s) fused, {len(stock)} on the stock PEFT path"
            + (f" (e.g. {stock[0]}: dropout in training, DoRA or several adapters)" if stock else "")
        )
    for module in model.modules():
        if role_of(module) == "causal_lm" and resolve_lm_head(module.get_output_embeddings()) is None:
            lines.append("  lm_head   not a plain Linear: loss computed from full logits (stock)")
    return "\n".join(lines)
