"""A chat template written as an example conversation with {SYSTEM} / {INPUT} / {OUTPUT} slots (Unsloth's
`apply_chat_template`), turned into a velotune Jinja template and applied to a data set.

    dataset = apply_chat_template(dataset, tokenizer=tokenizer, chat_template=\"\"\"{SYSTEM}
    USER: {INPUT}
    ASSISTANT: {OUTPUT}\"\"\")            # -> dataset["text"], tokenizer.chat_template set

The example holds one turn pair, or two identical ones (then the repeated text is the turn, exactly):

    [head] user-prefix {INPUT} [user-suffix] assistant-prefix {OUTPUT} [stop] [after]   (x1 or x2)

- head: everything before the first turn. With a {SYSTEM} slot it is the system block (rendered with
  the conversation's system message, else `default_system_message`, else left out); without one it is
  fixed text, written before every conversation. Its leading BOS text becomes `bos_token`; a tokenizer
  that puts BOS in front of every text gets `bos_token` first either way.
- The user turn is user-prefix + message + the whitespace (and a stop token) that follows {INPUT}; the
  assistant turn is the rest, whose prefix is also the generation prompt.
- stop: the tokenizer's eos token, one of `extra_eos_tokens` or another special token of the tokenizer
  right after {OUTPUT}; when the example has none, eos is written there, so generation stops after the
  reply.
- One pair: the head ends after {SYSTEM} and the stop or whitespace that follows it; without {SYSTEM},
  the user prefix is the line holding {INPUT} (with the line before, when {INPUT} opens its line).

The reply and its stop token are wrapped in `{% generation %}` (velotune.data.masking reads them), and
messages may use role/content or ShareGPT from/value keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from velotune.data.chat_templates import jinja_str, template_prelude
from velotune.errors import ConfigError, DataError

DEFAULT_TEMPLATE = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{INPUT}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{OUTPUT}<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{INPUT}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{OUTPUT}<|eot_id|>"
)
DEFAULT_SYSTEM = (
    "Below are some instructions that describe some tasks. Write responses that appropriately complete each request."
)


@dataclass(frozen=True)
class TemplateParts:
    """The pieces of an example template (module docstring). `system_prefix`/`system_suffix` surround the
    {SYSTEM} slot (None: no slot; `head` is then fixed text)."""

    bos: bool  # starts with bos_token
    head: str
    system_prefix: str | None
    system_suffix: str | None
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    stop: str
    after: str


def parse_template(template: str, *, eos_tokens: list[str], bos_token: str | None, always_bos: bool) -> TemplateParts:
    """Split an example template into its parts (module docstring); ConfigError when it cannot be read."""
    n_in, n_out, n_sys = template.count("{INPUT}"), template.count("{OUTPUT}"), template.count("{SYSTEM}")
    if n_in != n_out or n_in not in (1, 2):
        raise ConfigError(
            f"chat_template must hold {{INPUT}} and {{OUTPUT}} once each (one example turn) or twice each (two "
            f"identical turns); it has {n_in} {{INPUT}} and {n_out} {{OUTPUT}}"
        )
    if n_sys > 1 or (n_sys and template.index("{SYSTEM}") > template.index("{INPUT}")):
        raise ConfigError("chat_template may hold one {SYSTEM} slot, before the first {INPUT}")
    if n_in == 2:
        head, turn = _repeated_turn(template)
    else:
        head, turn = _single_turn(template, eos_tokens)
    bos = always_bos
    if bos_token and head.startswith(bos_token):
        head, bos = head[len(bos_token) :], True
    user_prefix, rest = turn.split("{INPUT}")
    m = re.match(r"\s*(?:" + "|".join(re.escape(e) for e in eos_tokens) + r")?", rest) if eos_tokens else None
    user_suffix = m.group(0) if m else re.match(r"\s*", rest).group(0)
    assistant_prefix, after = rest[len(user_suffix) :].split("{OUTPUT}")
    stop = next((e for e in eos_tokens if after.startswith(e)), None)
    if stop is None:
        if not eos_tokens:
            raise ConfigError("the tokenizer has no eos_token: pass extra_eos_tokens= to say what ends a reply")
        stop = eos_tokens[0]
    else:
        after = after[len(stop) :]
    if "{SYSTEM}" in head:
        system_prefix, system_suffix = head.split("{SYSTEM}")
        head = ""
    else:
        system_prefix = system_suffix = None
    return TemplateParts(
        bos, head, system_prefix, system_suffix, user_prefix, user_suffix, assistant_prefix, stop, after
    )


def _repeated_turn(template: str) -> tuple[str, str]:
    """(head, turn) of `head + turn + turn`, the turn holding one {INPUT} and one {OUTPUT}."""
    for size in range(len(template) // 2, 0, -1):
        turn = template[-size:]
        if template[-2 * size : -size] == turn and turn.count("{INPUT}") == 1 and turn.count("{OUTPUT}") == 1:
            if turn.index("{INPUT}") < turn.index("{OUTPUT}"):
                return template[: -2 * size], turn
    raise ConfigError(
        "chat_template holds two {INPUT}/{OUTPUT} pairs, but the second turn does not repeat the first one "
        "exactly: write the same turn text twice (an optional {SYSTEM} block before the first)"
    )


def _single_turn(template: str, eos_tokens: list[str]) -> tuple[str, str]:
    """(head, turn) of a template with one turn pair (the head/turn boundary rule of the module docstring)."""
    at_input = template.index("{INPUT}")
    if "{SYSTEM}" in template:
        end = template.index("{SYSTEM}") + len("{SYSTEM}")
        closing = template[template.index("{OUTPUT}") + len("{OUTPUT}") :].strip()  # what closes a turn
        for e in [*eos_tokens, *([closing] if closing else [])]:  # ... closes the system block too
            if template.startswith(e, end):
                end += len(e)
                break
        end += len(re.match(r"\s*", template[end:at_input]).group(0))
        return template[:end], template[end:]
    line_start = template.rfind("\n", 0, at_input) + 1
    if not template[line_start:at_input].strip():  # {INPUT} opens its line: the line before is its header
        before = template[:line_start].rstrip("\n")
        line_start = before.rfind("\n") + 1 if before.strip() else 0
    return template[:line_start], template[line_start:]


def custom_chat_template(
    tokenizer,
    chat_template: str = DEFAULT_TEMPLATE,
    default_system_message: str | None = DEFAULT_SYSTEM,
    extra_eos_tokens=None,
) -> str:
    """The Jinja chat template (velotune's prelude + body) for an example template (module docstring)."""
    extra = [extra_eos_tokens] if isinstance(extra_eos_tokens, str) else list(extra_eos_tokens or [])
    vocab = tokenizer.get_vocab()
    missing = [t for t in extra if not isinstance(t, str) or t not in vocab]
    if missing:
        raise ConfigError(f"extra_eos_tokens {missing} are not single tokens of this tokenizer")
    eos_tokens = list(dict.fromkeys(([tokenizer.eos_token] if tokenizer.eos_token else []) + extra))
    # a special token right after {OUTPUT} (e.g. Llama 3's <|eot_id|>) is the template's own stop token
    after = chat_template[chat_template.find("{OUTPUT}") + len("{OUTPUT}") :]
    special = sorted((str(t) for t in tokenizer.added_tokens_decoder.values() if t.special), key=len, reverse=True)
    own = next((t for t in special if t and after.startswith(t)), None)
    if own is not None and own not in eos_tokens:
        eos_tokens.append(own)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    always_bos = bos_id is not None and tokenizer("A")["input_ids"][:1] == [bos_id]
    p = parse_template(chat_template, eos_tokens=eos_tokens, bos_token=tokenizer.bos_token, always_bos=always_bos)
    q = jinja_str
    body = "{%- if bos_token -%}{{- bos_token -}}{%- endif -%}\n" if p.bos else ""
    if p.system_prefix is not None:
        body += (
            "{%- if system_message is not none -%}"
            f"{{{{- {q(p.system_prefix)} + system_message + {q(p.system_suffix)} -}}}}"
            "{%- endif -%}\n"
        )
        default = default_system_message
    else:
        body += (
            "{%- if system_message is not none -%}{{- raise_exception('this chat template has no {SYSTEM} slot "
            "for the system message') -}}{%- endif -%}\n"
        )
        if p.head:
            body += f"{{{{- {q(p.head)} -}}}}\n"
        default = None
    body += (
        "{%- for message in loop_messages -%}\n"
        "{%- if message['role'] == 'assistant' -%}\n"
        f"{{{{- {q(p.assistant_prefix)} -}}}}\n"
        f"{{%- generation -%}}{{{{- message['content'] + {q(p.stop)} -}}}}{{%- endgeneration -%}}\n"
        + (f"{{{{- {q(p.after)} -}}}}\n" if p.after else "")
        + "{%- elif message['role'] == 'user' -%}\n"
        f"{{{{- {q(p.user_prefix)} + message['content'] + {q(p.user_suffix)} -}}}}\n"
        "{%- else -%}\n"
        "{{- raise_exception('this chat template has user and assistant turns after one leading system "
        "message') -}}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        f"{{%- if add_generation_prompt -%}}{{{{- {q(p.assistant_prefix)} -}}}}{{%- endif -%}}\n"
    )
    return template_prelude(None, default) + body


def apply_chat_template(
    dataset,
    tokenizer=None,
    chat_template: str = DEFAULT_TEMPLATE,
    default_system_message: str | None = DEFAULT_SYSTEM,
    extra_eos_tokens=None,
):
    """Set `tokenizer.chat_template` from an example template (module docstring) and return `dataset` with a
    "text" column: each row's conversation (its "conversations", "messages" or "conversation" column;
    role/content or from/value messages) rendered with that template. The tokenizer is changed in place."""
    from velotune.data.formats import CONVERSATION_COLUMNS, normalize_messages

    if tokenizer is None:
        raise ConfigError("apply_chat_template needs tokenizer=")
    names = dataset.column_names or list(next(iter(dataset)).keys())
    column = next((c for c in CONVERSATION_COLUMNS if c in names), None)
    if column is None:
        raise DataError(f"apply_chat_template: no {' / '.join(CONVERSATION_COLUMNS)} column; columns: {names}")
    tokenizer.chat_template = custom_chat_template(tokenizer, chat_template, default_system_message, extra_eos_tokens)
    tokenizer.velotune_chat_template = None

    def render(batch):
        return {"text": [tokenizer.apply_chat_template(normalize_messages(c), tokenize=False) for c in batch[column]]}

    return dataset.map(render, batched=True)
