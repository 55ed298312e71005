"""Chat templates render each family's official format, end turns with the right stop token, and mark
exactly the assistant's reply (plus its stop token) as assistant tokens."""

from __future__ import annotations

import pytest
from jinja2.exceptions import TemplateError
from mini import mini_model, mini_tokenizer

from velotune.data.chat_templates import CHAT_TEMPLATES, get_chat_template
from velotune.errors import ConfigError

CONV = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]

# (bos, eos) of each family's own tokenizer, set on the mini tokenizer before applying the template
FAMILY_TOKENS = {
    "llama-3": ("<|begin_of_text|>", "<|end_of_text|>"),
    "llama-3.1": ("<|begin_of_text|>", "<|end_of_text|>"),
    "chatml": (None, "<|endoftext|>"),
    "qwen-2.5": (None, "<|endoftext|>"),
    "qwen-3": (None, "<|endoftext|>"),
    "mistral": ("<s>", "</s>"),
    "zephyr": ("<s>", "</s>"),
    "alpaca": ("<s>", "</s>"),
    "vicuna": ("<s>", "</s>"),
    "gemma": ("<bos>", "<eos>"),
    "phi-3": ("<s>", "<|endoftext|>"),
    "default": ("<s>", "</s>"),
    "granite": (None, "<|end_of_text|>"),
    "unsloth": ("<s>", "</s>"),
    "phi-4": (None, "<|endoftext|>"),
    "llama-2": ("<s>", "</s>"),
    "vicuna-old": ("<s>", "</s>"),
    "starling": ("<s>", "</s>"),
    "olmo-2": ("<|endoftext|>", "<|endoftext|>"),  # OLMo 2's bos and eos are the same token
    "mistral-v7-tekken": ("<s>", "</s>"),
}
STOP = {
    "llama-3": "<|eot_id|>",
    "llama-3.1": "<|eot_id|>",
    "chatml": "<|im_end|>",
    "qwen-2.5": "<|im_end|>",
    "qwen-3": "<|im_end|>",
    "mistral": "</s>",
    "zephyr": "</s>",
    "alpaca": "</s>",
    "vicuna": "</s>",
    "gemma": "<end_of_turn>",
    "phi-3": "<|end|>",
    "default": "</s>",
    "granite": "<|end_of_text|>",
    "unsloth": "</s>",
    "phi-4": "<|im_end|>",
    "llama-2": "</s>",
    "vicuna-old": "</s>",
    "starling": "<|end_of_turn|>",
    "olmo-2": "<|endoftext|>",
    "mistral-v7-tekken": "</s>",
}

_L3_TURNS = (
    "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
)
_CHATML_TURNS = (
    "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
)
_L31_SYSTEM = (
    "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
)

# Written from each family's published format (model cards / tokenizer_config chat templates / FastChat).
REFERENCE = {
    "llama-3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>" + _L3_TURNS,
    "llama-3.1": "<|begin_of_text|>" + _L31_SYSTEM + "You are helpful.<|eot_id|>" + _L3_TURNS,
    "chatml": "<|im_start|>system\nYou are helpful.<|im_end|>\n" + _CHATML_TURNS,
    "qwen-2.5": "<|im_start|>system\nYou are helpful.<|im_end|>\n" + _CHATML_TURNS,
    # Qwen3: the last assistant turn (after the last user message) opens with its (here empty) think block
    "qwen-3": "<|im_start|>system\nYou are helpful.<|im_end|>\n"
    + _CHATML_TURNS.replace("assistant\n4", "assistant\n<think>\n\n</think>\n\n4"),
    "mistral": "<s>[INST] You are helpful.\n\nHi! [/INST]Hello.</s>[INST] What is 2+2? [/INST]4</s>",
    "zephyr": (
        "<|system|>\nYou are helpful.</s>\n<|user|>\nHi!</s>\n<|assistant|>\nHello.</s>\n"
        "<|user|>\nWhat is 2+2?</s>\n<|assistant|>\n4</s>\n"
    ),
    "alpaca": (
        "<s>You are helpful.\n\n### Instruction:\nHi!\n\n### Response:\nHello.</s>\n\n"
        "### Instruction:\nWhat is 2+2?\n\n### Response:\n4</s>\n\n"
    ),
    "vicuna": "<s>You are helpful. USER: Hi! ASSISTANT: Hello.</s>USER: What is 2+2? ASSISTANT: 4</s>",
    "gemma": (
        "<bos><start_of_turn>user\nYou are helpful.\n\nHi!<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n"
    ),
    "phi-3": (
        "<|system|>\nYou are helpful.<|end|>\n<|user|>\nHi!<|end|>\n<|assistant|>\nHello.<|end|>\n"
        "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n4<|end|>\n"
    ),
    "default": (
        "<s>You are helpful.\n>>> User: Hi!\n>>> Assistant: Hello.</s>\n>>> User: What is 2+2?\n>>> Assistant: 4</s>\n"
    ),
    "granite": (
        "<|start_of_role|>system<|end_of_role|>You are helpful.<|end_of_text|>\n"
        "<|start_of_role|>user<|end_of_role|>Hi!<|end_of_text|>\n"
        "<|start_of_role|>assistant<|end_of_role|>Hello.<|end_of_text|>\n"
        "<|start_of_role|>user<|end_of_role|>What is 2+2?<|end_of_text|>\n"
        "<|start_of_role|>assistant<|end_of_role|>4<|end_of_text|>\n"
    ),
    "unsloth": (
        "<s>You are helpful.\n>>> User: Hi!\n>>> Assistant: Hello.</s>\n>>> User: What is 2+2?\n>>> Assistant: 4</s>\n"
    ),
    "phi-4": (
        "<|im_start|>system<|im_sep|>You are helpful.<|im_end|><|im_start|>user<|im_sep|>Hi!<|im_end|>"
        "<|im_start|>assistant<|im_sep|>Hello.<|im_end|><|im_start|>user<|im_sep|>What is 2+2?<|im_end|>"
        "<|im_start|>assistant<|im_sep|>4<|im_end|>"
    ),
    "llama-2": (
        "<s>[INST] <<SYS>>\nYou are helpful.\n<</SYS>>\n\nHi! [/INST] Hello. </s><s>[INST] What is 2+2? [/INST] 4 </s>"
    ),
    "vicuna-old": (
        "<s>You are helpful.\n### Human: Hi!\n### Assistant: Hello.</s>\n"
        "### Human: What is 2+2?\n### Assistant: 4</s>\n"
    ),
    "starling": (
        "<s>GPT4 Correct System: You are helpful.<|end_of_turn|>GPT4 Correct User: Hi!<|end_of_turn|>"
        "GPT4 Correct Assistant: Hello.<|end_of_turn|>GPT4 Correct User: What is 2+2?<|end_of_turn|>"
        "GPT4 Correct Assistant: 4<|end_of_turn|>"
    ),
    # OLMo 2 Instruct: '\n' after an assistant's eos only when another turn follows
    "olmo-2": (
        "<|endoftext|><|system|>\nYou are helpful.\n<|user|>\nHi!\n<|assistant|>\nHello.<|endoftext|>\n"
        "<|user|>\nWhat is 2+2?\n<|assistant|>\n4<|endoftext|>"
    ),
    "mistral-v7-tekken": (
        "<s>[SYSTEM_PROMPT]You are helpful.[/SYSTEM_PROMPT][INST]Hi![/INST]Hello.</s>[INST]What is 2+2?[/INST]4</s>"
    ),
}

# [user "Hi!"] with add_generation_prompt=True: what the model sees before it answers (default system messages too)
PROMPT = {
    "llama-3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama-3.1": (
        "<|begin_of_text|>" + _L31_SYSTEM + "<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "chatml": "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "qwen-2.5": (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    ),
    "qwen-3": "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "mistral": "<s>[INST] Hi! [/INST]",
    "zephyr": "<|user|>\nHi!</s>\n<|assistant|>\n",
    "alpaca": (
        "<s>Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nHi!\n\n### Response:\n"
    ),
    "vicuna": (
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: Hi! ASSISTANT:"
    ),
    "gemma": "<bos><start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\n",
    "phi-3": "<|user|>\nHi!<|end|>\n<|assistant|>\n",
    "default": "<s>>>> User: Hi!\n>>> Assistant: ",
    # Granite 3.1+ fill in a dated default system message (strftime_now); velotune's template writes none
    "granite": "<|start_of_role|>user<|end_of_role|>Hi!<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>",
    "unsloth": "<s>You are a helpful assistant to the user\n>>> User: Hi!\n>>> Assistant: ",
    "phi-4": "<|im_start|>user<|im_sep|>Hi!<|im_end|><|im_start|>assistant<|im_sep|>",
    "llama-2": "<s>[INST] Hi! [/INST]",
    "vicuna-old": (
        "<s>A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the human's questions.\n### Human: Hi!\n### Assistant:"
    ),
    "starling": "<s>GPT4 Correct User: Hi!<|end_of_turn|>GPT4 Correct Assistant:",
    "olmo-2": "<|endoftext|><|user|>\nHi!\n<|assistant|>\n",
    # Mistral Small 3.x / Ministral 3 fill in a dated default system message; velotune's template writes none
    "mistral-v7-tekken": "<s>[INST]Hi![/INST]",
}


def family_tokenizer(name: str, **kwargs):
    """The mini tokenizer dressed with the family's bos/eos, then given the template."""
    tok = mini_tokenizer()
    bos, eos = FAMILY_TOKENS[name]
    tok.add_special_tokens({"bos_token": bos or "<s>", "eos_token": eos})
    if bos is None:
        tok.bos_token = None
    return get_chat_template(tok, name, **kwargs)


def test_table_covers_the_issue():
    assert set(REFERENCE) == set(CHAT_TEMPLATES)


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_renders_the_reference_string(name):
    tok = family_tokenizer(name)
    assert tok.apply_chat_template(CONV, tokenize=False) == REFERENCE[name]
    assert tok.apply_chat_template(CONV[1:2], tokenize=False, add_generation_prompt=True) == PROMPT[name]


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_stop_token_and_assistant_tokens(name):
    tok = family_tokenizer(name)
    stop = STOP[name]
    assert tok.eos_token == stop
    stop_id = tok.convert_tokens_to_ids(stop)
    assert tok.pad_token != stop and tok.pad_token_id != stop_id
    out = tok.apply_chat_template(CONV, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert ids.count(stop_id) >= 2
    # each assistant turn ends with the stop token as a single special token, and only replies are marked
    assistant = [t for t, m in zip(ids, mask) if m]
    think = "<think>\n\n</think>\n\n" if name == "qwen-3" else ""  # Qwen3's last reply opens with its think block
    assert tok.decode(assistant).replace(" ", "") == f"Hello.{stop}{think}4{stop}"
    ends = [i for i in range(len(ids)) if mask[i] and (i + 1 == len(ids) or not mask[i + 1])]
    assert [ids[i] for i in ends] == [stop_id, stop_id]


def test_mapping_sharegpt_keys_and_roles():
    sharegpt = [
        {"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
        for m in CONV
    ]
    tok = family_tokenizer("llama-3", mapping={"role": "from", "content": "value", "user": "human", "assistant": "gpt"})
    assert tok.apply_chat_template(sharegpt, tokenize=False) == REFERENCE["llama-3"]
    assert tok.apply_chat_template(CONV, tokenize=False) == REFERENCE["llama-3"]  # canonical messages still work
    with pytest.raises(ConfigError, match="mapping keys"):
        get_chat_template(mini_tokenizer(), "chatml", mapping={"speaker": "from"})


def test_unknown_role_and_name_are_clear_errors():
    tok = family_tokenizer("chatml")
    with pytest.raises(TemplateError, match="unknown role robot"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)
    with pytest.raises(ConfigError, match="unknown chat_template 'llama-9'"):
        get_chat_template(mini_tokenizer(), "llama-9")


def test_aliases_system_message_and_custom_jinja():
    tok = family_tokenizer("qwen-2.5", system_message="Be terse.")
    assert tok.apply_chat_template(CONV[1:2], tokenize=False).startswith("<|im_start|>system\nBe terse.<|im_end|>")
    tok = get_chat_template(mini_tokenizer(), "llama3")
    assert tok.velotune_chat_template == "llama-3"
    tok = get_chat_template(mini_tokenizer(), "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert tok.apply_chat_template(CONV[1:3], tokenize=False) == "Hi!Hello."
    tok = get_chat_template(
        mini_tokenizer(), ("{% for m in messages %}{{ m['content'] }}<|stop|>{% endfor %}", "<|stop|>")
    )  # Unsloth's (template, stop token) form: without model= the stop token takes eos's id
    assert tok.eos_token == "<|stop|>" and tok.eos_token_id == 2 and tok.velotune_added_tokens == []
    model = mini_model("llama")
    tok = get_chat_template(
        mini_tokenizer(), ("{% for m in messages %}{{ m['content'] }}<|stop|>{% endfor %}", "<|stop|>"), model=model
    )  # with model= it is a new token and the embeddings grow
    assert tok.velotune_added_tokens == ["<|stop|>"] and tok.eos_token_id == len(tok) - 1
    assert model.get_input_embeddings().weight.shape[0] == len(tok)


def test_missing_tokens_grow_the_model_and_generation_stops():
    model = mini_model("llama")
    tok = mini_tokenizer()
    n = len(tok)
    get_chat_template(tok, "llama-3.1", model=model)
    assert tok.velotune_added_tokens == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert len(tok) == n + 3
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert model.get_output_embeddings().weight.shape[0] >= len(tok)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert eot in model.generation_config.eos_token_id and tok.eos_token_id == eot
    ids = tok.apply_chat_template(CONV, tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape[-1] >= len(tok)  # new ids embed without an index error
    # a tokenizer that already has the tokens adds nothing
    assert get_chat_template(tok, "llama-3").velotune_added_tokens == []


def test_map_eos_token_false_keeps_eos():
    tok = mini_tokenizer()
    get_chat_template(tok, "chatml", map_eos_token=False)
    assert tok.eos_token == "</s>"


def test_template_survives_save_and_load(tmp_path):
    from transformers import AutoTokenizer

    tok = family_tokenizer(
        "llama-3.1", mapping={"role": "from", "content": "value", "user": "human", "assistant": "gpt"}
    )
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.apply_chat_template(CONV, tokenize=False) == REFERENCE["llama-3.1"]
    assert again.eos_token == "<|eot_id|>" and again.pad_token == tok.pad_token


def test_qwen3_think_blocks():
    """Qwen3's own rendering: reasoning kept on the reply after the last user message, dropped from
    earlier replies; enable_thinking=False ends the prompt in an empty think block; the think block is
    part of what the model learns to produce (inside the assistant mask). With model= the think markers are
    single tokens."""
    tok = family_tokenizer("qwen-3", model=mini_model("llama"))
    conv = [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "<think>\ngreet back\n</think>\n\nHello."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
    ]
    text = tok.apply_chat_template(conv, tokenize=False)
    assert text == (
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\nadd\n</think>\n\n4<|im_end|>\n"
    )
    out = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = tok.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    assert marked.replace(" ", "") == "Hello.<|im_end|><think>\nadd\n</think>\n\n4<|im_end|>"
    for t in ("<think>", "</think>"):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    prompt = tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True).endswith("assistant\n")


def _reply_labels(tok, conv):
    """(labels from the template's assistant mask, labels found by velotune.data.masking from token ids) and
    the text the model is trained on, for one conversation."""
    from velotune.data.masking import derive_parts, response_labels

    out = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = out["input_ids"]
    exact = [t if m else -100 for t, m in zip(ids, out["assistant_masks"])]
    found = response_labels(ids, parts=derive_parts(tok))
    return exact, found, tok.decode([t for t in found if t != -100])


def test_olmo2_turns_as_olmo2_writes_them():
    """OLMo 2 Instruct's own template (Tulu 3's turns after bos): '\\n' follows an assistant's eos only when
    another turn comes, the generation prompt follows the last message (a system one too), a later system
    message is written in place. The role tags are text: nothing is added, even with
    model=. Response-only labels cover exactly each reply and its eos."""
    tok = family_tokenizer("olmo-2", model=mini_model("llama"))
    assert tok.velotune_added_tokens == [] and tok.eos_token == "<|endoftext|>"
    assert tok.apply_chat_template(CONV[1:4], tokenize=False, add_generation_prompt=True) == (
        "<|endoftext|><|user|>\nHi!\n<|assistant|>\nHello.<|endoftext|>\n<|user|>\nWhat is 2+2?\n<|assistant|>\n"
    )
    later_system = [CONV[1], CONV[2], {"role": "system", "content": "Be brief."}, CONV[3], CONV[4]]
    assert tok.apply_chat_template(later_system, tokenize=False) == (
        "<|endoftext|><|user|>\nHi!\n<|assistant|>\nHello.<|endoftext|>\n<|system|>\nBe brief.\n"
        "<|user|>\nWhat is 2+2?\n<|assistant|>\n4<|endoftext|>"
    )
    assert tok.apply_chat_template(CONV[:1], tokenize=False, add_generation_prompt=True) == (
        "<|endoftext|><|system|>\nYou are helpful.\n<|assistant|>\n"
    )
    for conv in (CONV, later_system):
        exact, found, text = _reply_labels(tok, conv)
        assert found == exact
        assert text.replace(" ", "") == "Hello.<|endoftext|>4<|endoftext|>"
    for alias in ("olmo2", "OLMo-2", "tulu", "tulu-3"):
        assert get_chat_template(mini_tokenizer(), alias).velotune_chat_template == "olmo-2"


def test_mistral_v7_tekken_control_tokens_and_system_turns():
    """Mistral v7 tekken (Mistral-Small 3.x, Ministral 3): [INST], [/INST], [SYSTEM_PROMPT], [/SYSTEM_PROMPT]
    are single tokens (control tokens of the Tekken vocabulary; added here with model=), written without
    spaces; no system block without a system message; a later system message is written in place; the reply
    follows [/INST] directly (no generation prompt). Response-only labels cover exactly each reply and </s>."""
    tok = family_tokenizer("mistral-v7-tekken", model=mini_model("llama"))
    controls = ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    assert tok.velotune_added_tokens == controls
    for t in controls:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    later_system = [CONV[1], CONV[2], {"role": "system", "content": "Be brief."}, CONV[3], CONV[4]]
    assert tok.apply_chat_template(later_system, tokenize=False) == (
        "<s>[INST]Hi![/INST]Hello.</s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]What is 2+2?[/INST]4</s>"
    )
    prompt = "<s>[SYSTEM_PROMPT]You are helpful.[/SYSTEM_PROMPT][INST]Hi![/INST]"
    assert tok.apply_chat_template(CONV[:2], tokenize=False, add_generation_prompt=True) == prompt
    assert tok.apply_chat_template(CONV[:2], tokenize=False) == prompt
    for conv in (CONV, later_system):
        exact, found, text = _reply_labels(tok, conv)
        assert found == exact
        assert text.replace(" ", "") == "Hello.</s>4</s>"
    for alias in ("ministral3", "Ministral-3", "mistral-small-3", "mistral_small_3.1", "mistral-small-32"):
        assert get_chat_template(mini_tokenizer(), alias).velotune_chat_template == "mistral-v7-tekken"


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_modelfile_renders_like_the_template(name):
    """The Ollama Modelfile derived from each named template renders prompts exactly as the template does."""
    from velotune.export import gotemplate
    from velotune.export.modelfile import derive_chat_format, modelfile_text, parse_modelfile

    tok = family_tokenizer(name)
    mf = parse_modelfile(modelfile_text(tok, "model.gguf"))
    assert mf["template"] is not None
    assert STOP[name] in mf["stop"]
    has_system = "system" in derive_chat_format(tok).prefix
    if name in ("olmo-2", "mistral-v7-tekken"):
        assert has_system
    convs = [CONV[1:2], CONV[1:4]] + ([CONV[:4], CONV[:2]] if has_system else [])
    for conv in convs:
        assert gotemplate.render(mf["template"], conv) == tok.apply_chat_template(
            conv, tokenize=False, add_generation_prompt=True
        ), conv


def _quantize_input_embeddings(model):
    """Swap in a real bitsandbytes 4-bit embedding table (same rows), as a quantized model would hold."""
    import torch

    bnb = pytest.importorskip("bitsandbytes")  # (the minimum-versions CI job installs no bitsandbytes)

    e = model.get_input_embeddings()
    q = bnb.nn.Embedding4bit(e.num_embeddings, e.embedding_dim, dtype=torch.float32)
    q.load_state_dict(e.state_dict())
    model.set_input_embeddings(q.to("cpu"))


def test_ensure_template_tokens_adds_chatml_and_grows_the_embeddings():
    import torch

    from velotune.data.chat_templates import ensure_template_tokens

    tok, model = mini_tokenizer(), mini_model("llama")
    rows = model.get_input_embeddings().weight.shape[0]
    assert "<|im_start|>" not in tok.get_vocab()
    assert ensure_template_tokens(tok, model, "chatml") == ["<|im_start|>", "<|im_end|>"]
    assert model.get_input_embeddings().weight.shape[0] == len(tok) > rows
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    get_chat_template(tok, "chatml", model=model)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert int(ids["input_ids"].max()) >= rows  # the new ids are used, and the forward takes them
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()
    assert ensure_template_tokens(tok, model, "chatml") == []  # a second call changes nothing
    assert ensure_template_tokens(tok, model) == []


def test_a_tokenizer_larger_than_the_embeddings_grows_them():
    from velotune.data.chat_templates import ensure_template_tokens

    tok, model = mini_tokenizer(), mini_model("llama")
    tok.add_tokens(["<extra_a>", "<extra_b>"], special_tokens=True)  # e.g. a tokenizer saved by another run
    ensure_template_tokens(tok, model)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)


def test_quantized_embeddings_that_must_grow_are_a_clear_error():
    from velotune.data.chat_templates import ensure_template_tokens

    tok, model = mini_tokenizer(), mini_model("llama")
    _quantize_input_embeddings(model)
    n = len(tok)
    with pytest.raises(
        ConfigError,
        match=r"chat template chatml: .* Embedding4bit table is quantized, so it "
        r"cannot grow; load the model unquantized",
    ) as e:
        ensure_template_tokens(tok, model, "chatml")
    assert "\n" not in str(e.value)
    assert len(tok) == n and "<|im_start|>" not in tok.get_vocab()  # nothing changed
    with pytest.raises(ConfigError, match="cannot grow"):
        get_chat_template(tok, "chatml", model=model)
    assert len(tok) == n
    # a template whose tokens are all there needs no growth, quantized or not
    assert ensure_template_tokens(tok, model, "default") == []


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_without_model_no_token_is_added(name):
    """Unsloth's call (no model=): the tokenizer keeps its size whatever the template needs; a stop token
    the vocabulary lacks takes eos's id."""
    tok = mini_tokenizer()
    n, eos_id = len(tok), tok.eos_token_id
    vocab = set(tok.get_vocab())
    get_chat_template(tok, name)
    assert len(tok) == n and tok.velotune_added_tokens == []
    ids = tok.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]
    assert max(ids) < n
    # the format's own stop token, or (formats that end turns with eos) the tokenizer's unchanged eos
    assert tok.eos_token == (STOP[name] if CHAT_TEMPLATES[name].stop else "</s>")
    if STOP[name] not in vocab:
        assert tok.eos_token_id == eos_id  # renamed in place: same row of the embeddings


def test_without_model_a_training_step_runs(tmp_path):
    """get_chat_template(tokenizer, "chatml") on a vocabulary without <|im_start|> / <|im_end|>, then TRL's
    SFTTrainer on a velotune model: no id falls past the embeddings (this was an IndexError)."""
    import math

    import torch
    from datasets import Dataset
    from mini import save_mini_model
    from trl import SFTConfig, SFTTrainer

    from velotune import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(
        str(save_mini_model("llama", tmp_path)), max_seq_length=128, dtype=torch.float32
    )
    rows = model.get_input_embeddings().weight.shape[0]
    assert len(tok) == rows  # a full vocabulary: any added token would index past the table
    tok = get_chat_template(tok, "chatml")
    assert len(tok) == rows and tok.eos_token == "<|im_end|>" and tok.eos_token_id < rows
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    texts = [tok.apply_chat_template(c, tokenize=False) for c in (CONV, CONV[1:3], CONV[3:])]
    assert all("<|im_start|>assistant\n" in t for t in texts)
    trainer = SFTTrainer(
        model=model,
        processing_class=tok,
        train_dataset=Dataset.from_dict({"text": texts}),
        args=SFTConfig(
            output_dir=str(tmp_path / "out"),
            dataset_text_field="text",
            max_length=128,
            per_device_train_batch_size=3,
            max_steps=1,
            logging_steps=1,
            use_cpu=True,
            bf16=False,
            report_to="none",
            save_strategy="no",
        ),
    )
    assert max(max(r["input_ids"]) for r in trainer.train_dataset) < rows
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])
