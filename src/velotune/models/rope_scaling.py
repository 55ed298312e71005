"""Automatic RoPE scaling when max_seq_length exceeds the model's native context.

Default RoPE becomes linear scaling with factor max_seq_length / native; an existing linear factor is
multiplied. Types that already encode long context (llama3, longrope, yarn, dynamic) are kept and a
warning says so. The rotary module is rebuilt from the updated config with transformers' own class;
`restore_context` (called by `unpatch`) puts the original module and config back.
"""

from __future__ import annotations

import copy
import logging

from torch import nn

log = logging.getLogger("velotune")


def _rotary_owner(model: nn.Module):
    for module in model.modules():
        rot = module.__dict__.get("_modules", {}).get("rotary_emb")
        if rot is not None:
            return module, rot
    return None, None


def extend_context(model: nn.Module, max_seq_length: int) -> str | None:
    """Scale RoPE so positions up to max_seq_length stay in the trained range. Returns a note or None."""
    config = model.config
    native = getattr(config, "max_position_embeddings", None)
    if not native or not max_seq_length or max_seq_length <= native:
        return None
    params = dict(getattr(config, "rope_parameters", None) or {})
    if params and all(isinstance(v, dict) for v in params.values()):  # one table per layer type (Gemma 3)
        log.warning(
            "velotune: max_seq_length %d exceeds max_position_embeddings %d; the model has one RoPE "
            "table per layer type, which velotune does not rescale (kept as configured)",
            max_seq_length,
            native,
        )
        return None
    rope_type = params.get("rope_type", "default")
    factor = max_seq_length / native
    if rope_type == "default":
        params.update(rope_type="linear", factor=factor)
    elif rope_type == "linear":
        params["factor"] = float(params.get("factor", 1.0)) * factor
    else:
        log.warning(
            "velotune: max_seq_length %d exceeds max_position_embeddings %d; keeping the model's own %r RoPE scaling",
            max_seq_length,
            native,
            rope_type,
        )
        return None
    owner, rotary = _rotary_owner(model)
    if rotary is None:
        log.warning("velotune: no rotary embedding module found; RoPE scaling not applied")
        return None
    model._velotune_stock_rotary = (owner, rotary, copy.deepcopy(config.rope_parameters), native)
    config.rope_parameters = params
    config.max_position_embeddings = max_seq_length
    device = rotary.inv_freq.device
    owner.rotary_emb = type(rotary)(config=config).to(device)
    note = f"RoPE: linear scaling x{params['factor']:.3g} for max_seq_length {max_seq_length} (native {native})"
    log.info("velotune: %s", note)
    return note


def restore_context(model: nn.Module) -> None:
    owner, rotary, rope_parameters, native = model.__dict__.pop("_velotune_stock_rotary")
    model.config.rope_parameters = rope_parameters
    model.config.max_position_embeddings = native
    owner.rotary_emb = rotary
