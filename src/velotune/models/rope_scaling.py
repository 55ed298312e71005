"""Linear RoPE scaling, applied only when the user asks for it (`from_pretrained(rope_scaling=...)`).

A model's positions are never changed implicitly: the loader calls `scale_rope` only for an
explicit request. Default RoPE becomes linear scaling with the given factor; an existing linear
factor is multiplied. Other types (llama3, yarn, longrope, dynamic, one table per layer type) are
refused by `scaling_problem` before any weight is loaded. The rotary module is rebuilt from the
updated config with transformers' own class; `restore_context` (called by `unpatch`) puts the
original module and config back.
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


def scaling_problem(config) -> str | None:
    """Why linear scaling cannot be applied to a model with `config` (None: it can)."""
    if not getattr(config, "max_position_embeddings", None):
        return "its config has no max_position_embeddings"
    params = dict(getattr(config, "rope_parameters", None) or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        return "it has one RoPE table per layer type, which velotune does not rescale"
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear"):
        return f"it already uses {rope_type!r} RoPE scaling (velotune rescales only default or linear RoPE)"
    return None


def scale_rope(model: nn.Module, factor: float) -> str:
    """Stretch RoPE linearly by `factor` (> 1): positions up to factor x max_position_embeddings map
    into the trained range. Updates `config.rope_parameters` and `config.max_position_embeddings`
    and rebuilds the rotary module. Returns the notice (also logged at INFO). ValueError where
    `scaling_problem` names a reason or the model has no rotary module."""
    config = model.config
    problem = scaling_problem(config)
    if problem is None and _rotary_owner(model)[1] is None:
        problem = "no rotary embedding module was found"
    if problem is not None:
        raise ValueError(f"RoPE scaling cannot be applied: {problem}")
    native = config.max_position_embeddings
    params = dict(config.rope_parameters or {})
    params.pop("type", None)
    if params.get("rope_type", "default") == "default":
        params.update(rope_type="linear", factor=float(factor))
    else:
        params["factor"] = float(params.get("factor", 1.0)) * factor
    owner, rotary = _rotary_owner(model)
    model._velotune_stock_rotary = (owner, rotary, copy.deepcopy(config.rope_parameters), native)
    config.rope_parameters = params
    config.max_position_embeddings = int(round(native * factor))
    owner.rotary_emb = type(rotary)(config=config).to(rotary.inv_freq.device)
    note = (
        f"RoPE scaled linearly x{factor:.3g} as asked: {config.max_position_embeddings} positions "
        f"(the model was trained on {native})"
    )
    log.info("velotune: %s", note)
    return note


def restore_context(model: nn.Module) -> None:
    owner, rotary, rope_parameters, native = model.__dict__.pop("_velotune_stock_rotary")
    model.config.rope_parameters = rope_parameters
    model.config.max_position_embeddings = native
    owner.rotary_emb = rotary
