"""`model.generate` on the decode engine, through transformers' own `generate`.

transformers' `GenerationMixin.generate` does all the argument handling (generation config,
max_length / max_new_tokens, eos and pad tokens, logits processors for temperature / top-k /
top-p / repetition penalty, stopping criteria, stop strings) and then calls a *decoding method*.
It accepts a callable as that method (`custom_generate=`), so velotune hands it `decode_loop`,
which is stock `_sample` with the model forward replaced by the engine's prefill and decode steps.

Modes the loop does not implement (beam search, assisted decoding, returning scores, attentions
or hidden states, a cache passed in by the caller, `inputs_embeds`) go to stock generate untouched.
"""

from __future__ import annotations

import functools

import torch

# generate() arguments that the fast loop leaves to stock transformers.
_STOCK_ONLY = (
    "assistant_model",
    "custom_generate",
    "prefix_allowed_tokens_fn",
    "negative_prompt_ids",
    "inputs_embeds",
    "past_key_values",
    "cache",
    "synced_gpus",
    "prompt_lookup_num_tokens",
    "assistant_early_exit",
    "penalty_alpha",
    "dola_layers",
    "prefill_chunk_size",
    "output_attentions",
    "output_hidden_states",
    "output_scores",
    "output_logits",
    "return_dict_in_generate",
)


def _needs_stock(model, kwargs: dict) -> bool:
    for key in _STOCK_ONLY:
        if kwargs.get(key) not in (None, False):
            return True
    gc = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    num_beams = kwargs.get("num_beams", getattr(gc, "num_beams", 1))
    if num_beams is not None and num_beams > 1:
        return True
    if getattr(gc, "return_dict_in_generate", False) and "return_dict_in_generate" not in kwargs:
        return True
    return False


def engine_takes(model, kwargs: dict) -> bool:
    """Whether `fast_generate` hands a call with these generate() keyword arguments to the engine's loop."""
    return not _needs_stock(model, kwargs)


def unpack_encoding(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A tokenizer's output (BatchEncoding or dict with "input_ids") given as the prompt (positionally, or as
    `input_ids=` / `inputs=`) is replaced, in the same place, by its "input_ids" tensor, and its "attention_mask"
    is passed as `attention_mask=` unless one is given.

    transformers 5's `tokenizer.apply_chat_template(..., return_tensors="pt")` returns such an encoding where
    transformers 4 returned the ids tensor; scripts written for 4 (Unsloth's notebooks) pass it straight to
    `generate`. Anything else is returned unchanged."""
    from collections.abc import Mapping

    def is_encoding(x) -> bool:
        return isinstance(x, Mapping) and "input_ids" in x

    if args and is_encoding(args[0]):
        encoding, args = args[0], (args[0]["input_ids"], *args[1:])
    elif key := next((k for k in ("input_ids", "inputs") if is_encoding(kwargs.get(k))), None):
        encoding = kwargs[key]
        kwargs = {**kwargs, key: encoding["input_ids"]}
    else:
        return args, kwargs
    if encoding.get("attention_mask") is not None and kwargs.get("attention_mask") is None:
        kwargs = {**kwargs, "attention_mask": encoding["attention_mask"]}
    return args, kwargs


def fast_generate(model, engine, stock_generate, *args, **kwargs):
    """The per-instance `generate`: the engine's loop where it applies, stock generate otherwise. The prompt
    may also be a tokenizer's encoding (`unpack_encoding`)."""
    args, kwargs = unpack_encoding(args, kwargs)
    if engine is None or _needs_stock(model, kwargs):
        return stock_generate(*args, **kwargs)
    # transformers passes a callable decoding method only the arguments it names beyond `_sample`'s,
    # so the streamer travels bound to the loop.
    streamer = kwargs.pop("streamer", None)
    loop = functools.partial(decode_loop, engine=engine, velotune_streamer=streamer)
    return stock_generate(*args, custom_generate=loop, **kwargs)


def decode_loop(
    model,
    input_ids,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus=False,
    streamer=None,
    *,
    engine,
    velotune_streamer=None,
    **model_kwargs,
):
    """transformers' `_sample` (greedy or multinomial) with the engine in place of the forward.

    input_ids [B, T] left padded; model_kwargs carries attention_mask [B, T] (None when all ones)
    and position_ids [B, T]. Returns [B, T + new] with finished rows padded by pad_token_id.
    """
    streamer = streamer if streamer is not None else velotune_streamer
    if streamer is not None:
        streamer.put(input_ids.cpu())
    pad_token_id = generation_config._pad_token_tensor
    has_eos_stopping_criteria = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    do_sample = generation_config.do_sample
    B, T = input_ids.shape
    unfinished = torch.ones(B, dtype=torch.long, device=input_ids.device)
    if pad_token_id is not None:
        pad_token_id = pad_token_id.to(input_ids.device)

    engine.refresh_plans()
    max_length = generation_config.max_length or (T + 1)
    engine.reserve(B, min(max_length, T + 1 + engine.reserve_ahead))  # grows in chunks beyond
    logits = engine.prefill(input_ids, model_kwargs.get("attention_mask"), model_kwargs.get("position_ids"))
    while True:
        next_token_logits = logits.to(copy=True, dtype=torch.float32, device=input_ids.device)
        next_token_scores = logits_processor(input_ids, next_token_logits)
        if do_sample:
            probs = torch.softmax(next_token_scores, dim=-1)
            next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(next_token_scores, dim=-1)
        if has_eos_stopping_criteria:
            next_tokens = next_tokens * unfinished + pad_token_id * (1 - unfinished)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        unfinished = unfinished & ~stopping_criteria(input_ids, next_token_scores)
        if unfinished.max() == 0:
            break
        logits = engine.decode(next_tokens)
    if streamer is not None:
        streamer.end()
    return input_ids
