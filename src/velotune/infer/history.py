"""What `velotune chat` sends to the model: one line of user input, and the history that fits the context.

    text, problem = read_user_line(sys.stdin)         # problem: a line to show when the bytes are not UTF-8
    enc, dropped, budget = fit_history(tok, system, history, limit=256, max_new_tokens=128)

The model sees at most `limit` positions (its max_position_embeddings, or --max-seq-length when lower):
prompt + reply must fit, or the reply degenerates past the positions the model was trained on.
"""

from __future__ import annotations


class MessageTooLong(Exception):
    """The newest user message alone (with the system prompt) leaves no room for a reply."""

    def __init__(self, tokens: int, limit: int):
        super().__init__(f"{tokens} tokens, the model takes {limit}")
        self.tokens, self.limit = tokens, limit


def read_user_line(stream) -> tuple[str | None, str | None]:
    """(text, problem) for one line of `stream`: text None at end of input; problem a one-line notice when the
    line is not UTF-8 (text is then "" and nothing may be sent). Reads bytes when the stream has a buffer."""
    raw = stream.buffer.readline() if hasattr(stream, "buffer") else stream.readline()
    if not raw:
        return None, None
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        text.encode("utf-8")  # a str may hold lone surrogates (a terminal decoding with surrogateescape)
        return text, None
    except UnicodeError as e:
        data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogateescape")
        start = e.start if isinstance(raw, bytes) else len(raw[: e.start].encode("utf-8", "surrogateescape"))
        return "", (
            f"(that line is not UTF-8 text: byte 0x{data[start]:02x} at column {start + 1}; "
            "nothing was sent, type it again)"
        )


def context_limit(model, max_seq_length: int | None) -> int:
    """Positions the model can attend over: min(max_position_embeddings, max_seq_length), whichever is known."""
    config = getattr(model, "config", None)
    limits = [n for n in (getattr(config, "max_position_embeddings", None), max_seq_length) if n]
    return min(limits) if limits else 2**31


def fit_history(tokenizer, system: str | None, history: list[dict], *, limit: int, max_new_tokens: int):
    """Drop the oldest exchanges of `history` (in place; the system prompt stays) until the prompt leaves room.

    Room: min(max_new_tokens, limit // 2) tokens for the reply. The newest user message is never dropped.
    Returns (the encoded prompt: input_ids [1, T] and attention_mask, exchanges dropped, reply budget =
    min(max_new_tokens, limit - T)). Raises MessageTooLong when even the newest message alone leaves no room.
    """
    reserve = max(1, min(max_new_tokens, limit // 2))
    dropped = 0
    while True:
        messages = ([{"role": "system", "content": system}] if system else []) + history
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        n = enc["input_ids"].shape[1]
        if n + reserve <= limit or len(history) <= 1:
            break
        k = 1  # the oldest user message and every reply up to the next user message
        while k < len(history) and history[k]["role"] != "user":
            k += 1
        if k >= len(history):
            break
        del history[:k]
        dropped += 1
    if n >= limit:
        raise MessageTooLong(n, limit)
    return enc, dropped, min(max_new_tokens, limit - n)
