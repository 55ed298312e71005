"""Chat templates as data: one Jinja file per format, one table row per name.

    tokenizer = get_chat_template(tokenizer, "llama-3.1")                  # role/content messages
    tokenizer = get_chat_template(tokenizer, "chatml",
                                  mapping={"role": "from", "content": "value", "user": "human", "assistant": "gpt"})

Every template wraps the assistant's content *and its stop token* in `{% generation %}` markers, so
`tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly the tokens the
model must learn to produce (velotune.data.prepare and velotune.data.masking rely on that).

The final template is `header + _prelude.jinja + <format>.jinja`: the header holds the mapping
(which keys hold role and content, which role names mean user/assistant/system) and the default system
message as Jinja `set` statements; the prelude normalises messages to canonical roles and splits off a
leading system message. So a mapping never edits template text.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from velotune.errors import ConfigError

log = logging.getLogger("velotune")


@dataclass(frozen=True)
class ChatTemplate:
    """One chat format.

    file: template body in data/templates/. stop: the token that ends an assistant turn (None: the
    tokenizer's own eos_token, which the template writes as `eos_token`). special_tokens: strings the
    format needs as single special tokens (added to the tokenizer when missing). default_system: the
    system message used when a conversation has none (None: no system block).
    """

    file: str
    stop: str | None = None
    special_tokens: tuple[str, ...] = ()
    default_system: str | None = None


_LLAMA3 = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_CHATML = ("<|im_start|>", "<|im_end|>")

CHAT_TEMPLATES: dict[str, ChatTemplate] = {
    "llama-3": ChatTemplate("llama-3.jinja", stop="<|eot_id|>", special_tokens=_LLAMA3),
    "llama-3.1": ChatTemplate("llama-3.1.jinja", stop="<|eot_id|>", special_tokens=_LLAMA3),
    "chatml": ChatTemplate("chatml.jinja", stop="<|im_end|>", special_tokens=_CHATML),
    "qwen-2.5": ChatTemplate(
        "chatml.jinja",
        stop="<|im_end|>",
        special_tokens=_CHATML,
        default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    ),
    "qwen-3": ChatTemplate("qwen-3.jinja", stop="<|im_end|>", special_tokens=_CHATML + ("<think>", "</think>")),
    "mistral": ChatTemplate("mistral.jinja"),
    "zephyr": ChatTemplate("zephyr.jinja"),
    "alpaca": ChatTemplate(
        "alpaca.jinja",
        default_system=(
            "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        ),
    ),
    "vicuna": ChatTemplate(
        "vicuna.jinja",
        default_system=(
            "A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions."
        ),
    ),
    "gemma": ChatTemplate("gemma.jinja", stop="<end_of_turn>", special_tokens=("<start_of_turn>", "<end_of_turn>")),
    "phi-3": ChatTemplate(
        "phi-3.jinja", stop="<|end|>", special_tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
    ),
    "granite": ChatTemplate(
        "granite.jinja",
        stop="<|end_of_text|>",
        special_tokens=("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>"),
    ),
    "default": ChatTemplate("default.jinja"),
    "unsloth": ChatTemplate("default.jinja", default_system="You are a helpful assistant to the user"),
    "phi-4": ChatTemplate(
        "phi-4.jinja", stop="<|im_end|>", special_tokens=("<|im_start|>", "<|im_sep|>", "<|im_end|>")
    ),
    "llama-2": ChatTemplate("llama-2.jinja"),
    "vicuna-old": ChatTemplate(
        "vicuna-old.jinja",
        default_system=(
            "A chat between a curious human and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the human's questions."
        ),
    ),
    "starling": ChatTemplate("starling.jinja", stop="<|end_of_turn|>", special_tokens=("<|end_of_turn|>",)),
    "olmo-2": ChatTemplate("olmo-2.jinja"),  # role tags written as text (as Tulu 3 trains them); stop: eos
    "mistral-v7-tekken": ChatTemplate(
        "mistral-v7-tekken.jinja", special_tokens=("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")
    ),
}

ALIASES = {
    "llama3": "llama-3",
    "llama-3.0": "llama-3",
    "llama3.1": "llama-3.1",
    "llama-31": "llama-3.1",
    "llama-3.2": "llama-3.1",
    "llama3.2": "llama-3.1",
    "llama-3.3": "llama-3.1",
    "llama-32": "llama-3.1",
    "llama-33": "llama-3.1",
    "llama": "llama-2",
    "llama2": "llama-2",
    "qwen2.5": "qwen-2.5",
    "qwen-2": "qwen-2.5",
    "qwen2": "qwen-2.5",
    "qwen25": "qwen-2.5",
    "qwen-25": "qwen-2.5",
    "qwen3": "qwen-3",
    "qwen3-instruct": "chatml",  # Qwen3 2507 instruct: ChatML without the empty think block
    "qwen-3-instruct": "chatml",
    "gemma2": "gemma",
    "gemma-2": "gemma",
    "gemma3": "gemma",
    "gemma-3": "gemma",
    "gemma3n": "gemma",
    "gemma-3n": "gemma",
    "phi3": "phi-3",
    "phi-3.5": "phi-3",
    "phi35": "phi-3",
    "phi-35": "phi-3",
    "phi4": "phi-4",
    "vicuna old": "vicuna-old",
    "starling-lm": "starling",
    "openchat": "starling",
    "plain": "default",
    "mistral-instruct": "mistral",
    "granite-3": "granite",
    "granite3": "granite",
    "granite-3.1": "granite",
    "granite-3.2": "granite",
    "granite-3.3": "granite",
    "smollm3": "chatml",
    "smollm-3": "chatml",
    "olmo2": "olmo-2",
    "olmo-2-instruct": "olmo-2",
    "tulu": "olmo-2",  # Tulu 3 (Llama 3.1 based): the same turns; this template writes the bos token first
    "tulu-3": "olmo-2",
    "tulu3": "olmo-2",
    "ministral3": "mistral-v7-tekken",
    "ministral-3": "mistral-v7-tekken",
    "mistral-small-3": "mistral-v7-tekken",
    "mistral-small3": "mistral-v7-tekken",
    "mistral-small-3.1": "mistral-v7-tekken",
    "mistral-small3.1": "mistral-v7-tekken",
    "mistral-small-31": "mistral-v7-tekken",
    "mistral-small-3.2": "mistral-v7-tekken",
    "mistral-small3.2": "mistral-v7-tekken",
    "mistral-small-32": "mistral-v7-tekken",
}

# mapping keys understood by get_chat_template: which message keys hold role/content, and the data's
# names for the canonical roles.
_MAPPING_KEYS = ("role", "content", "user", "assistant", "system")


def resolve_name(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    key = ALIASES.get(key, key)
    if key not in CHAT_TEMPLATES:
        raise ConfigError(
            f"unknown chat_template {name!r}; choose from {sorted(CHAT_TEMPLATES)} "
            f"(aliases: {sorted(ALIASES)}) or pass a Jinja template string"
        )
    return key


@lru_cache(maxsize=None)
def _read(file: str) -> str:
    return resources.files("velotune.data").joinpath("templates", file).read_text(encoding="utf-8")


def jinja_str(value) -> str:
    """A Python str/None as a Jinja literal (Jinja reads string escapes like Python's)."""
    return "none" if value is None else json.dumps(value)


def render_template_source(name: str, mapping: dict | None = None, system_message: str | None = None) -> str:
    """The full Jinja source for table entry `name` with `mapping` and the default system message."""
    spec = CHAT_TEMPLATES[resolve_name(name)]
    default_system = system_message if system_message is not None else spec.default_system
    return template_prelude(mapping, default_system) + _read(spec.file)


def template_prelude(mapping: dict | None = None, default_system: str | None = None) -> str:
    """The Jinja that opens every velotune template: the mapping header and the shared prelude, which leave
    `loop_messages` (canonical {'role', 'content'} messages without a leading system one) and `system_message`
    (that message, else `default_system`, else none) for the format's body."""
    mapping = dict(mapping or {})
    unknown = set(mapping) - set(_MAPPING_KEYS)
    if unknown:
        raise ConfigError(
            f"mapping keys {sorted(unknown)} not understood; use {list(_MAPPING_KEYS)} "
            "(e.g. {'role': 'from', 'content': 'value', 'user': 'human', 'assistant': 'gpt'})"
        )
    role_names = {r: r for r in ("user", "assistant", "system")}
    for canonical in ("user", "assistant", "system"):
        if canonical in mapping:
            role_names[mapping[canonical]] = canonical
    names = "{" + ", ".join(f"{jinja_str(k)}: {jinja_str(v)}" for k, v in role_names.items()) + "}"
    header = (
        f"{{%- set role_key = {jinja_str(mapping.get('role', 'role'))} -%}}\n"
        f"{{%- set content_key = {jinja_str(mapping.get('content', 'content'))} -%}}\n"
        f"{{%- set role_names = {names} -%}}\n"
        f"{{%- set default_system = {jinja_str(default_system)} -%}}\n"
    )
    return header + _read("_prelude.jinja")


def get_chat_template(
    tokenizer,
    chat_template: str = "chatml",
    mapping: dict | None = None,
    map_eos_token: bool = True,
    system_message: str | None = None,
    *,
    model=None,
):
    """Set `tokenizer.chat_template` to a known format (or a Jinja string) and make generation stop right.

    - Without `model=` (how Unsloth code calls it) no token is ever added, so the tokenizer never
      outgrows the model's embeddings: a stop token the vocabulary lacks takes the place of the eos
      token (same id; `tokenizer.eos_token` becomes the stop token, as Unsloth does), and the format's
      other markers the vocabulary lacks (e.g. <|im_start|>) are written as plain text (several ordinary
      tokens). With `map_eos_token=False` a missing stop token is written as plain text too (a warning
      says generation will not stop at it).
    - With `model=`: the special tokens the format needs (e.g. <|eot_id|>) are added to the tokenizer when
      missing and the model's embeddings grow with them (`model.resize_token_embeddings(len(tokenizer))`;
      quantized tables that cannot grow: ConfigError, nothing changed); the stop token is also added to
      `model.generation_config.eos_token_id`. `tokenizer.velotune_added_tokens` lists what was added.
    - `map_eos_token=True`: `tokenizer.eos_token` becomes the format's stop token, so generation and
      EOS-appending code stop where the assistant turn ends. A pad token equal to the stop token is
      replaced by another token of the vocabulary (a collator that masks pad ids would otherwise hide the
      stop token from the loss); only with `model=` may a pad token be added for that.
    - `mapping`: keys/roles used by the data, e.g. ShareGPT {"role": "from", "content": "value",
      "user": "human", "assistant": "gpt"}; canonical role/content messages keep working too.
    - `system_message`: the default system message when a conversation has none.
    Returns the same tokenizer object, modified.
    """
    stop_for_custom = None
    if isinstance(chat_template, (tuple, list)) and len(chat_template) == 2:  # Unsloth's (jinja, stop token)
        chat_template, stop_for_custom = chat_template
    if not isinstance(chat_template, str):
        raise ConfigError(
            f"chat_template must be a name, a Jinja string or (Jinja string, stop token), got "
            f"{type(chat_template).__name__}"
        )
    if "{%" in chat_template or "{{" in chat_template:  # a user-written Jinja template
        if mapping or system_message is not None:
            raise ConfigError(
                "mapping/system_message only apply to velotune's named templates; "
                "write them into your own Jinja template instead"
            )
        return _set_custom(tokenizer, chat_template, stop_for_custom, map_eos_token, model)
    name = resolve_name(chat_template)
    spec = CHAT_TEMPLATES[name]
    stop = spec.stop or tokenizer.eos_token
    if stop is None:
        raise ConfigError(
            f"template {name!r} ends turns with the tokenizer's eos_token, but this tokenizer has none; "
            "set tokenizer.eos_token first"
        )
    source = render_template_source(name, mapping, system_message)  # validates mapping before any change
    needed = template_tokens(name)
    old_eos = tokenizer.eos_token
    if model is not None:  # refuse before the tokenizer changes when the embeddings would have to grow but can't
        _check_can_grow(model, len(tokenizer) + len(_missing(tokenizer, needed)), name)
        added = _add_missing_special_tokens(tokenizer, needed)
    else:
        added = []
        if _use_existing_tokens(tokenizer, name, spec.stop, map_eos_token, _missing(tokenizer, needed)):
            old_eos = None  # renamed: no longer in the vocabulary
    tokenizer.chat_template = source
    tokenizer.velotune_chat_template = name
    if map_eos_token and spec.stop and tokenizer.eos_token != spec.stop:
        log.info("chat template %s: eos_token %r -> %r (the end of an assistant turn)", name, old_eos, spec.stop)
        tokenizer.eos_token = spec.stop
    if tokenizer.pad_token is None or tokenizer.pad_token == stop:
        _pick_pad_token(tokenizer, stop, old_eos, may_add=model is not None)
    tokenizer.velotune_added_tokens = added
    if model is not None:
        _update_model(model, tokenizer, stop, added)
    return tokenizer


def _use_existing_tokens(tokenizer, what: str, stop: str | None, map_eos_token: bool, missing: list[str]) -> bool:
    """No model to grow: add no token (get_chat_template's docstring). Returns True when the eos token was
    renamed to `stop` (same id)."""
    renamed = False
    if stop is not None and stop in missing:
        eos = tokenizer.eos_token
        if map_eos_token and eos is not None and rename_token(tokenizer, eos, stop):
            renamed = True
            log.info(
                "chat template %s: %r is not in the vocabulary: it takes the place of eos %r (id %d), so the "
                "embeddings keep their size (pass model= to add it as a new token instead)",
                what,
                stop,
                eos,
                tokenizer.convert_tokens_to_ids(stop),
            )
        else:
            log.warning(
                "chat template %s: the stop token %r is not in the vocabulary and is written as plain text, so "
                "generation will not stop at it; use map_eos_token=True (it then takes eos's place) or pass "
                "model= (it is added as a token and the embeddings grow)",
                what,
                stop,
            )
    text = [t for t in missing if not (renamed and t == stop)]
    if text:
        log.info(
            "chat template %s: %s not in the vocabulary, written as plain text (pass model= to add them as "
            "tokens; the embeddings then grow)",
            what,
            ", ".join(text),
        )
    return renamed


def rename_token(tokenizer, old: str, new: str) -> bool:
    """Give the vocabulary entry `old` (an added/special token) the text `new`, keeping its id.

    Changes the fast tokenizer's backend (its added tokens, model vocabulary, post-processor and padding)
    and every special-token attribute that named `old`. `new` must not be in the vocabulary. Returns False,
    changing nothing, when the tokenizer has no fast backend or `old` is not an added token.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str") or new in tokenizer.get_vocab():
        return False
    from tokenizers import Tokenizer

    data = json.loads(backend.to_str())
    entries = [t for t in data.get("added_tokens", []) if t.get("content") == old]
    if not entries:
        return False
    for t in entries:
        t["content"] = new
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and old in vocab:
        vocab[new] = vocab.pop(old)
    elif isinstance(vocab, list):  # Unigram: [piece, score] pairs
        for pair in vocab:
            if pair and pair[0] == old:
                pair[0] = new
    if data.get("post_processor"):
        data["post_processor"] = _renamed(data["post_processor"], old, new)
    if isinstance(data.get("padding"), dict) and data["padding"].get("pad_token") == old:
        data["padding"]["pad_token"] = new
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(data))
    for attr in getattr(tokenizer, "SPECIAL_TOKENS_ATTRIBUTES", ()):
        if str(getattr(tokenizer, attr, None)) == old:
            setattr(tokenizer, attr, new)
    return True


def _renamed(node, old: str, new: str):
    """`node` (parsed JSON) with every string and dict key equal to `old` replaced by `new`."""
    if isinstance(node, dict):
        return {(new if k == old else k): _renamed(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_renamed(v, old, new) for v in node]
    return new if node == old else node


def template_tokens(chat_template: str) -> tuple[str, ...]:
    """The special tokens the named template writes as single tokens (its stop token included)."""
    spec = CHAT_TEMPLATES[resolve_name(chat_template)]
    return tuple(dict.fromkeys(spec.special_tokens + ((spec.stop,) if spec.stop else ())))


def _missing(tokenizer, tokens) -> list[str]:
    vocab = tokenizer.get_vocab()
    return [t for t in dict.fromkeys(tokens) if t not in vocab]


def _embedding_rows(model) -> int:
    emb = model.get_input_embeddings()
    return getattr(emb, "num_embeddings", None) or emb.weight.shape[0]  # (a packed 4-bit weight has another shape)


def _check_can_grow(model, rows_needed: int, what: str) -> None:
    """ConfigError when the model's embeddings must grow to `rows_needed` rows but cannot (quantized tables)."""
    if rows_needed <= _embedding_rows(model):
        return
    tables = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    frozen = [
        type(m).__name__ for m in tables if hasattr(m.weight, "quant_state") or not (m.weight.is_floating_point())
    ]
    if frozen:
        raise ConfigError(
            f"chat template {what}: the tokenizer needs {rows_needed} embedding rows but the model has "
            f"{_embedding_rows(model)} and its {'/'.join(frozen)} table is quantized, so it cannot grow; "
            "load the model unquantized for this template, or pick a template whose tokens the "
            "tokenizer already has (or the model's own chat template: leave data.chat_template unset)"
        )


def ensure_template_tokens(tokenizer, model, chat_template: str | None = None) -> list[str]:
    """Make `model` able to embed every token `tokenizer` yields with `chat_template`; returns the tokens added.

    chat_template: a velotune template name: its special tokens (e.g. chatml's <|im_start|>, <|im_end|>) are
    added to the tokenizer when missing. None: the tokenizer as it is. Then, when the tokenizer holds more
    tokens than the input embedding has rows, the embeddings (and an untied LM head) grow to len(tokenizer)
    (`model.resize_token_embeddings`, as get_chat_template(model=...) does): without that, the new ids
    index past the table ("index out of range in self"). The new rows are initialised by transformers from
    the old rows' mean and covariance; they train only when the embeddings are trainable.
    Raises ConfigError, with tokenizer and model unchanged, when the tables cannot grow (quantized).
    The chat template itself is not set here: get_chat_template does that.
    """
    needed = template_tokens(chat_template) if chat_template else ()
    missing = _missing(tokenizer, needed)
    _check_can_grow(model, len(tokenizer) + len(missing), chat_template or "of the tokenizer")
    added = _add_missing_special_tokens(tokenizer, missing)
    _grow_embeddings(model, tokenizer, added)
    return added


def _set_custom(tokenizer, template: str, stop: str | None, map_eos_token: bool, model):
    old_eos = tokenizer.eos_token
    added = []
    if model is not None and stop:
        _check_can_grow(model, len(tokenizer) + len(_missing(tokenizer, [stop])), "(custom)")
        added = _add_missing_special_tokens(tokenizer, [stop])
    elif stop and _use_existing_tokens(tokenizer, "(custom)", stop, map_eos_token, _missing(tokenizer, [stop])):
        old_eos = None  # renamed: no longer in the vocabulary
    tokenizer.chat_template = template
    tokenizer.velotune_chat_template = None
    tokenizer.velotune_added_tokens = added
    if stop and map_eos_token and tokenizer.eos_token != stop:
        tokenizer.eos_token = stop
    stop = stop or tokenizer.eos_token
    if stop and (tokenizer.pad_token is None or tokenizer.pad_token == stop):
        _pick_pad_token(tokenizer, stop, old_eos, may_add=model is not None)
    if model is not None and stop:
        _update_model(model, tokenizer, stop, added)
    return tokenizer


def _add_missing_special_tokens(tokenizer, tokens) -> list[str]:
    from tokenizers import AddedToken

    missing = _missing(tokenizer, tokens)
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    return missing


def _pick_pad_token(tokenizer, stop: str, old_eos: str | None, *, may_add: bool = True) -> None:
    """A pad token distinct from the stop token (reusing one the vocabulary has where possible; a new one
    only when `may_add`, i.e. the caller grows the embeddings)."""
    vocab = tokenizer.get_vocab()
    for candidate in ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>", "<|endoftext|>", tokenizer.unk_token):
        if candidate and candidate in vocab and candidate != stop:
            tokenizer.pad_token = candidate
            return
    if old_eos and old_eos != stop and old_eos in vocab:
        tokenizer.pad_token = old_eos
    elif may_add:
        _add_missing_special_tokens(tokenizer, ["<|velotune_pad|>"])
        tokenizer.pad_token = "<|velotune_pad|>"
    else:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = stop
        log.warning(
            "chat template: the pad token is the stop token %r (the vocabulary has no other pad token and no "
            "model= was given to add one): a collator that masks pad ids also masks the stop token",
            stop,
        )


def _grow_embeddings(model, tokenizer, added: list[str]) -> None:
    """Resize the model's embeddings to len(tokenizer) rows when they have fewer (never shrink)."""
    if _embedding_rows(model) < len(tokenizer):
        _check_can_grow(model, len(tokenizer), "of the tokenizer")
        from velotune.memory.embedding_offload import (
            embeddings_offloaded,
            offload_input_embeddings,
            restore_input_embeddings,
        )

        offloaded = embeddings_offloaded(model)  # resize on the compute device, then back to the host
        if offloaded:
            restore_input_embeddings(model)
        model.resize_token_embeddings(len(tokenizer))
        if offloaded:
            offload_input_embeddings(model)
        log.info("resized the model's embeddings to %d rows for %s", len(tokenizer), added)


def _update_model(model, tokenizer, stop: str, added: list[str]) -> None:
    _grow_embeddings(model, tokenizer, added)
    stop_id = tokenizer.convert_tokens_to_ids(stop)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        ids = gen.eos_token_id
        ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
        if stop_id not in ids:
            gen.eos_token_id = [stop_id, *ids]
        if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
            gen.pad_token_id = tokenizer.pad_token_id
