"""Unsloth's Llama 3 (8B) Ollama notebook (`Llama3_(8B)-Ollama`), as a script, up to `ollama create`.

Its call sequence with `from unsloth` -> `from velotune`: 4-bit load, LoRA on the seven projections, Alpaca columns
merged by `to_sharegpt(merged_prompt=..., output_column_name="output", conversation_extension=3)`,
`standardize_sharegpt`, `apply_chat_template(dataset, tokenizer=..., chat_template=<{INPUT}/{OUTPUT} example>)`,
`SFTTrainer` with the older TRL keywords, training, `for_inference` + `generate` on a one-turn and a multi-turn chat,
`model.save_pretrained_gguf("model", tokenizer)` (q8_0, the default), `print(tokenizer._ollama_modelfile)` and the
Modelfile that `ollama create unsloth_model -f ./model/Modelfile` reads; then `push_to_hub_gguf(..., token="")`
through the `api=` seam to a local stand-in of the hub.
Checked beyond the notebook: llama.cpp (llama-cpp-python) reads the GGUF back, tokenizes a chat prompt as the
tokenizer does and gives the trained model's logits within q8_0's error.
Changed for CI: the mini Llama instead of `unsloth/llama-3-8b-bnb-4bit`, four local rows instead of
vicgalle/alpaca-gpt4, two steps, float32 on the CPU, no Ollama server.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from datasets import Dataset

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = {
    "instruction": ["Add the numbers.", "Give the opposite word.", "Continue the sequence.", "Say hello."],
    "input": ["2 and 2", "fast", "1, 2, 3", ""],
    "output": ["4", "slow", "4, 5, 6", "Hello world!"],
}
CHAT_TEMPLATE = """Below are some instructions that describe some tasks. \
Write responses that appropriately complete each request.

### Instruction:
{INPUT}

### Response:
{OUTPUT}"""


def test_llama3_ollama_notebook(mini_models, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    from velotune import FastLanguageModel

    max_seq_length = 1024
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=mini_models("llama"), max_seq_length=max_seq_length, dtype=torch.float32, load_in_4bit=True
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_alpha=16,
        lora_dropout=0,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=3407,
        use_rslora=False,
        loftq_config=None,
    )

    # --- data: columns merged into one prompt, extended to 3-turn conversations, rendered with the example template
    dataset = Dataset.from_dict(ROWS)
    from velotune import to_sharegpt

    dataset = to_sharegpt(
        dataset,
        merged_prompt="{instruction}[[\nYour input is:\n{input}]]",
        output_column_name="output",
        conversation_extension=3,
    )
    from velotune import standardize_sharegpt

    dataset = standardize_sharegpt(dataset)
    assert [len(c) for c in dataset["conversations"]] == [6] * 4
    assert dataset[3]["conversations"][0] == {"role": "user", "content": "Say hello."}  # empty input: [[...]] dropped

    from velotune import apply_chat_template

    dataset = apply_chat_template(dataset, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    assert dataset[0]["text"].count("### Instruction:\n") == 3
    assert "### Instruction:\nAdd the numbers.\nYour input is:\n2 and 2\n\n### Response:\n4" in dataset[0]["text"]

    from trl import SFTConfig, SFTTrainer

    trainer = SFTTrainer(
        model=model,
        tokenizer=tokenizer,
        train_dataset=dataset,
        dataset_text_field="text",
        max_seq_length=max_seq_length,
        packing=False,
        args=SFTConfig(
            per_device_train_batch_size=2,
            gradient_accumulation_steps=1,
            warmup_steps=1,
            max_steps=2,
            learning_rate=2e-4,
            logging_steps=1,
            optim="adamw_8bit",
            weight_decay=0.001,
            lr_scheduler_type="linear",
            seed=3407,
            output_dir="outputs",
            report_to="none",
            bf16=False,  # CI: float32 on the CPU
        ),
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)

    # --- chat with the trained model, one turn and several
    FastLanguageModel.for_inference(model)
    messages = [{"role": "user", "content": "Continue the fibonacci sequence! Your input is 1, 1, 2, 3, 5, 8,"}]
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    from transformers import TextStreamer

    text_streamer = TextStreamer(tokenizer, skip_prompt=True)
    out = model.generate(input_ids, streamer=text_streamer, max_new_tokens=8, pad_token_id=tokenizer.eos_token_id)
    assert out.shape[1] > input_ids["input_ids"].shape[1]  # (an encoding in transformers 5, the ids in 4)
    messages = [
        {"role": "user", "content": "Continue the fibonacci sequence! Your input is 1, 1, 2, 3, 5, 8"},
        {"role": "assistant", "content": "The fibonacci sequence continues as 13, 21, 34, 55 and 89."},
        {"role": "user", "content": "What is France's tallest tower called?"},
    ]
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    out = model.generate(input_ids, streamer=text_streamer, max_new_tokens=8, pad_token_id=tokenizer.eos_token_id)
    assert out.shape[1] > input_ids["input_ids"].shape[1]  # (an encoding in transformers 5, the ids in 4)

    model.save_pretrained("lora_model")
    tokenizer.save_pretrained("lora_model")

    # --- GGUF (q8_0, the default) and the Modelfile Ollama reads
    model.save_pretrained_gguf("model", tokenizer)
    gguf = tmp_path / "model" / "model.Q8_0.gguf"
    assert gguf.is_file() and gguf.read_bytes()[:4] == b"GGUF"
    capsys.readouterr()
    print(tokenizer._ollama_modelfile)
    printed = capsys.readouterr().out
    modelfile = (tmp_path / "model" / "Modelfile").read_text()
    assert printed == modelfile + "\n"
    from velotune.export.modelfile import parse_modelfile

    parsed = parse_modelfile(modelfile)
    assert parsed["from"] == "./model.Q8_0.gguf"
    assert "### Instruction:\n{{ .Content }}" in parsed["template"] and "### Response:\n" in parsed["template"]
    assert tokenizer.eos_token in parsed["stop"]

    # --- llama.cpp reads it back: the same tokens for a chat prompt, the trained model's logits (q8_0 error)
    from velotune.export.llama_cpp_io import open_gguf

    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    llm = open_gguf(gguf, n_ctx=512, logits_all=True)
    try:
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9

    # --- push_to_hub_gguf, up to the network: the same files go to huggingface_hub's upload_folder
    from helpers import RecordingHfApi

    hub = RecordingHfApi(tmp_path / "hub")
    model.push_to_hub_gguf("hf/model", tokenizer, token="", api=hub)
    assert [c for c, _ in hub.calls] == ["create_repo", "upload_folder"]
    assert sorted(p.name for p in hub.uploads[0].iterdir()) == ["Modelfile", "model.Q8_0.gguf"]
    assert (hub.uploads[0] / "model.Q8_0.gguf").read_bytes() == gguf.read_bytes()
