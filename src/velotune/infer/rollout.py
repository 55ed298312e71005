"""`model.generate` on the decode engine while the model trains: what RL trainers sample with.

    enable_fast_generate(model)     # per instance: model.generate -> the decode engine, mode untouched
    disable_fast_generate(model)    # undo: the generate bound before, the engine's KV cache freed

`for_inference` puts a model in eval mode and binds the engine for inference. A trainer that
samples completions between optimizer steps -- TRL's GRPOTrainer calls `unwrapped_model.generate(
**inputs, generation_config=...)` under `torch.no_grad()` with the model in training mode -- needs
the engine without that switch. The engine reads the weights at every call (LoRA adapters updated
in place by the optimizer; PEFT adapter switches are re-read by `refresh_plans`), so nothing is
synchronised between steps. Its KV cache (batch x capacity slots per layer) and, on CUDA, its
captured decode graphs stay allocated between calls of the same shape; `disable_fast_generate`
frees them.

The engine takes a call when its result is stock generate's: a model on the fast decode path
(infer/spec.py), no dropout active (a module in training mode with p > 0: stock would drop
activations, the engine never does), and the arguments the engine's loop implements
(infer/generate.py: greedy and multinomial sampling with every logits processor, eos / stop
tokens, max_new_tokens; batched, left padded). Anything else goes to the generate bound before
(stock). A `cache_implementation` in the generation config is dropped for the engine's calls (the
engine has its own static cache; transformers would allocate one that nobody reads).
"""

from __future__ import annotations

import copy
import functools
import logging

import torch

log = logging.getLogger("velotune")
_STATE = "_velotune_fast_generate"


def dropout_active(model) -> bool:
    """Whether a forward of `model` now would drop activations (a module in training mode with p > 0)."""
    for m in model.modules():
        if not m.training:
            continue
        if isinstance(m, torch.nn.Dropout) and m.p > 0:
            return True
        p = getattr(m, "attention_dropout", None)
        if isinstance(p, float) and p > 0:
            return True
    return False


def _stale(spec, model) -> bool:
    """Whether modules the spec read were replaced since (PEFT's get_peft_model injects LoRA layers
    into a model whose generate was bound before): the decoder layers and lm_head are compared."""
    from velotune.infer.spec import causal_lm_of

    lm = causal_lm_of(model)
    if lm.lm_head is not spec.lm_head or len(lm.model.layers) != len(spec.layers):
        return True
    for layer, ls in zip(lm.model.layers, spec.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if getattr(attn, "o_proj", None) is not ls.o or getattr(mlp, "down_proj", None) is not ls.down:
            return True
        if getattr(attn, "q_proj", ls.q) is not ls.q or getattr(mlp, "up_proj", ls.up) is not ls.up:
            return True
    return False


def _engine(model, state):
    """The rollout engine of `model`, built at the first call and again when its modules were replaced."""
    engine = state["engine"]
    if engine is not None and _stale(engine.spec, model):
        engine.release()
        engine = state["engine"] = None
    if engine is None:
        from velotune.infer.engine import DecodeEngine
        from velotune.infer.spec import build_spec

        spec = build_spec(model)
        if spec is None:
            if not state.get("logged"):
                state["logged"] = True
                log.info("velotune: %s is not on the fast decode path; generate stays stock", type(model).__name__)
            return None
        engine = state["engine"] = DecodeEngine(spec)
    return engine


def _without_cache_implementation(kwargs: dict) -> dict:
    gc = kwargs.get("generation_config")
    if gc is not None and getattr(gc, "cache_implementation", None) is not None:
        gc = copy.copy(gc)
        gc.cache_implementation = None
        kwargs = {**kwargs, "generation_config": gc}
    if kwargs.get("cache_implementation") is not None:
        kwargs = {**kwargs, "cache_implementation": None}
    return kwargs


def _generate(model, *args, **kwargs):
    from velotune.infer.generate import engine_takes, fast_generate

    state = model.__dict__[_STATE]
    stock = state["stock"]
    engine = _engine(model, state)
    if engine is None or dropout_active(model) or not engine_takes(model, kwargs):
        return stock(*args, **kwargs)
    state["calls"] += 1
    return fast_generate(model, engine, stock, *args, **_without_cache_implementation(kwargs))


def enable_fast_generate(model) -> bool:
    """Bind `model.generate` (this instance) to the decode engine, whatever the model's mode; idempotent.
    Returns whether the model is on the fast decode path (the binding is made either way: calls the
    engine cannot take go to the generate bound before). The engine is built at the first call, and
    again when the model's projections were replaced since (LoRA injected by get_peft_model after the
    binding: PEFT's generate reaches this instance's generate, the engine reads the LoRA layers)."""
    from velotune.infer.spec import build_spec

    state = model.__dict__.get(_STATE)
    if state is None:
        state = {
            "saved": model.__dict__.get("generate"),
            "stock": model.__dict__.get("generate") or type(model).generate.__get__(model),
            "engine": None,
            "calls": 0,
        }
        bound = functools.partial(_generate, model)
        state["bound"] = bound
        model.__dict__[_STATE] = state
        model.generate = bound
    return build_spec(model) is not None


def disable_fast_generate(model) -> bool:
    """Undo `enable_fast_generate`: the generate bound before comes back (if nothing replaced ours since,
    e.g. `for_inference`, whose `for_training` restores ours), the engine's cache and graphs are freed."""
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return False
    if state["engine"] is not None:
        state["engine"].release()
    if model.__dict__.get("generate") is state["bound"]:
        if state["saved"] is not None:
            model.generate = state["saved"]
        else:
            del model.__dict__["generate"]
    return True


def fast_generate_calls(model) -> int:
    """How many generate calls went to the engine since `enable_fast_generate` (0 if not enabled)."""
    state = model.__dict__.get(_STATE)
    return 0 if state is None else state["calls"]
