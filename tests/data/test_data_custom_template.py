"""apply_chat_template (Unsloth's {SYSTEM}/{INPUT}/{OUTPUT} example templates): the rendered texts, the
generation prompt, the stop token, the assistant mask that response-only training reads, the Ollama
Modelfile derived from it, and clear errors for templates it cannot read."""

from __future__ import annotations

import pytest
from datasets import Dataset
from jinja2.exceptions import TemplateError
from mini import mini_tokenizer

from velotune.data.custom_template import DEFAULT_SYSTEM, apply_chat_template, custom_chat_template
from velotune.errors import ConfigError, DataError

SHAREGPT = [
    {"from": "system", "value": "Be brief."},
    {"from": "human", "value": "Hi!"},
    {"from": "gpt", "value": "Hello."},
    {"from": "human", "value": "2+2?"},
    {"from": "gpt", "value": "4"},
]
CONV = [
    {"role": {"human": "user", "gpt": "assistant"}.get(m["from"], m["from"]), "content": m["value"]} for m in SHAREGPT
]

LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def llama3_tokenizer():
    """The mini tokenizer with Llama 3's markers as special tokens (as Llama 3's own tokenizer has them)."""
    from tokenizers import AddedToken

    tok = mini_tokenizer()
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_TOKENS], special_tokens=True)
    tok.bos_token = "<|begin_of_text|>"
    return tok


def h(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def test_unsloth_default_template_two_examples():
    assert DEFAULT_SYSTEM == (  # Unsloth's default system message
        "Below are some instructions that describe some tasks. Write responses that appropriately complete each "
        "request."
    )
    """The default (Llama 3 with {SYSTEM}, two turns): <|eot_id|>, a special token after {OUTPUT}, is the stop."""
    tok = llama3_tokenizer()
    ds = apply_chat_template(Dataset.from_dict({"conversations": [SHAREGPT, SHAREGPT[1:3]]}), tokenizer=tok)
    assert ds[0]["text"] == (
        "<|begin_of_text|>" + h("system") + "Be brief.<|eot_id|>" + h("user") + "Hi!<|eot_id|>"
        + h("assistant") + "Hello.<|eot_id|>" + h("user") + "2+2?<|eot_id|>" + h("assistant") + "4<|eot_id|>"
    )  # fmt: skip
    default = DEFAULT_SYSTEM
    assert ds[1]["text"] == (
        "<|begin_of_text|>" + h("system") + default + "<|eot_id|>" + h("user") + "Hi!<|eot_id|>"
        + h("assistant") + "Hello.<|eot_id|>"
    )  # fmt: skip
    prompt = tok.apply_chat_template(CONV[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("Hi!<|eot_id|>" + h("assistant"))
    out = tok.apply_chat_template(CONV, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(marked) == "Hello.<|eot_id|>4<|eot_id|>"


def test_single_example_alpaca_ollama_notebook():
    """Unsloth's Ollama notebook template: one example, fixed text head, no stop in the example (eos added)."""
    tok = mini_tokenizer()
    template = (
        "Below are some instructions that describe some tasks. Write responses that appropriately complete each "
        "request.\n\n### Instruction:\n{INPUT}\n\n### Response:\n{OUTPUT}"
    )
    text = apply_chat_template(Dataset.from_dict({"conversations": [SHAREGPT[1:]]}), tok, template)[0]["text"]
    head = template.split("### Instruction")[0]
    assert (
        text
        == head + "### Instruction:\nHi!\n\n### Response:\nHello.</s>### Instruction:\n2+2?\n\n### Response:\n4</s>"
    )
    assert tok.apply_chat_template(CONV[1:2], tokenize=False, add_generation_prompt=True) == (
        head + "### Instruction:\nHi!\n\n### Response:\n"
    )
    with pytest.raises(TemplateError, match="no {SYSTEM} slot"):  # a system message has nowhere to go
        tok.apply_chat_template(CONV, tokenize=False)


def test_single_example_with_system_slot_and_response_only_parts():
    from velotune.data.masking import derive_parts
    from velotune.export.modelfile import derive_chat_format

    tok = mini_tokenizer()
    tok.chat_template = custom_chat_template(
        tok, "{SYSTEM}\nUSER: {INPUT}\nASSISTANT: {OUTPUT}\n", default_system_message="You are kind."
    )
    assert tok.apply_chat_template(CONV, tokenize=False) == (
        "Be brief.\nUSER: Hi!\nASSISTANT: Hello.</s>\nUSER: 2+2?\nASSISTANT: 4</s>\n"
    )
    assert tok.apply_chat_template(CONV[1:2], tokenize=False, add_generation_prompt=True) == (
        "You are kind.\nUSER: Hi!\nASSISTANT: "
    )
    parts = derive_parts(tok)  # velotune's train_on_responses_only reads the template's turns
    assert tok.decode(list(parts.response)).strip() == "ASSISTANT:" and parts.stop == tok.eos_token_id
    fmt = derive_chat_format(tok)  # and the Ollama Modelfile can be derived from it
    assert fmt.prefix["user"] == "USER: " and fmt.prefix["assistant"] == "ASSISTANT: "


def test_extra_eos_tokens_and_bad_templates():
    tok = llama3_tokenizer()
    tok.chat_template = custom_chat_template(tok, "Q: {INPUT}\nA: {OUTPUT}<|eot_id|>\n", extra_eos_tokens="<|eot_id|>")
    assert tok.apply_chat_template(CONV[1:3], tokenize=False) == "Q: Hi!\nA: Hello.<|eot_id|>\n"
    with pytest.raises(ConfigError, match="not single tokens"):
        custom_chat_template(tok, "Q: {INPUT}\nA: {OUTPUT}", extra_eos_tokens=["<|nope|>"])
    with pytest.raises(ConfigError, match="once each .* or twice each"):
        custom_chat_template(tok, "{INPUT}{OUTPUT}" * 3)
    with pytest.raises(ConfigError, match="does not repeat the first one exactly"):
        custom_chat_template(tok, "Q: {INPUT} A: {OUTPUT}\nQuestion: {INPUT} Answer: {OUTPUT}")
    with pytest.raises(ConfigError, match="one {SYSTEM} slot, before the first {INPUT}"):
        custom_chat_template(tok, "Q: {INPUT} A: {OUTPUT} {SYSTEM}")
    with pytest.raises(DataError, match="no messages / conversations / conversation column"):
        apply_chat_template(Dataset.from_dict({"text": ["x"]}), tokenizer=tok)


def test_public_names():
    import velotune
    from velotune.data.formats import standardize_data_formats

    assert velotune.apply_chat_template is apply_chat_template
    assert velotune.standardize_data_formats is standardize_data_formats
