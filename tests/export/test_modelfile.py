"""The Modelfile's Go template renders conversations exactly as the HF chat template does."""

from __future__ import annotations

import pytest
from mini import CHAT_TEMPLATE, mini_tokenizer

from velotune.export import gotemplate
from velotune.export.modelfile import derive_chat_format, modelfile_text, parse_modelfile

TEMPLATES = {
    "mini": CHAT_TEMPLATE,
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}"
        "{% set role = 'model' %}"
        "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
        "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{'<start_of_turn>model\n'}}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
        "message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + "
        "eos_token }}{% endif %}{% endfor %}"
    ),
    # OLMo 2 / Tulu 3 turns: '\n' after an assistant's eos only when another turn follows
    "olmo2": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
        "{{ '<|assistant|>\n' + message['content'] + eos_token }}{% if not loop.last %}{{ '\n' }}{% endif %}"
        "{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}
CONVERSATIONS = [
    [{"role": "user", "content": "Hello {{ .Content }} world"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?\nThink."},
    ],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ],
]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_go_template_renders_like_hf(name):
    tok = mini_tokenizer()
    tok.chat_template = TEMPLATES[name]
    mf = parse_modelfile(modelfile_text(tok, "model.Q8_0.gguf"))
    assert mf["from"] == "./model.Q8_0.gguf"
    assert mf["template"] is not None
    has_system = "system" in derive_chat_format(tok).prefix
    assert has_system == (name not in ("gemma", "mistral"))  # these templates drop or reject system turns
    checked = 0
    for conv in CONVERSATIONS:
        if conv[0]["role"] == "system" and not has_system:
            continue
        expected = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert gotemplate.render(mf["template"], conv) == expected
        checked += 1
    assert checked >= 2
    assert tok.eos_token in mf["stop"]


def test_stop_strings_come_from_the_template():
    tok = mini_tokenizer()
    tok.chat_template = TEMPLATES["chatml"]
    mf = parse_modelfile(modelfile_text(tok, "m.gguf"))
    assert mf["stop"] == ["<|im_end|>", "<|im_start|>user", "</s>"]


def test_unrepresentable_template_gets_no_template_line(caplog):
    tok = mini_tokenizer()  # turn numbers in the text: not a per-role concatenation
    tok.chat_template = "{% for m in messages %}#{{ loop.index }} {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    text = modelfile_text(tok, "m.gguf")
    assert "TEMPLATE" not in text and 'PARAMETER stop "</s>"' in text
    assert "without TEMPLATE" in caplog.text


def test_renderer_rejects_what_it_does_not_know():
    with pytest.raises(ValueError):
        gotemplate.render("{{ range .Messages }}{{ .Role }}{{ end }}", [])
    with pytest.raises(ValueError):
        gotemplate.render("{{- range .Messages }}{{ end }}", [])
