"""The token ids that end an assistant turn: pass them to `generate(eos_token_id=...)`.

out = model.generate(**inputs, eos_token_id=stop_token_ids(tokenizer, model))
"""

from __future__ import annotations

# End-of-turn tokens of common chat templates (Llama 3, ChatML, Gemma, Phi-3, Mistral).
TURN_END_TOKENS = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "</s>", "<|endoftext|>")


def stop_token_ids(tokenizer, model) -> list[int]:
    """eos ids of the generation config and tokenizer, plus the chat template's end-of-turn token."""
    ids: list[int] = []
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    for token in TURN_END_TOKENS:
        if token in vocab:
            ids.append(vocab[token])
    # The token the template writes right after an assistant message (its end of turn).
    try:
        marker = "velotune-marker"
        turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
        text = tokenizer.apply_chat_template(turns, tokenize=False)
        after = text[text.index(marker) + len(marker) :]
        first = tokenizer(after, add_special_tokens=False)["input_ids"][:1]
        if first and first[0] in tokenizer.all_special_ids + [vocab.get(t) for t in tokenizer.get_added_vocab()]:
            ids.append(first[0])
    except Exception:  # a template that needs other roles: the fixed list above still applies
        pass
    return sorted(set(i for i in ids if i is not None))
