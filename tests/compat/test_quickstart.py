"""Unsloth's README quick start, as a script, and the public names Unsloth's notebooks and tests import.

The quick start with `from unsloth` -> `from velotune`: a JSON-lines data set loaded with `load_dataset("json", ...)`
(LAION's unified_chip2 rows: one "text" column of `<human>: ... <bot>: ...`), `FastModel.from_pretrained(...,
load_in_4bit=True, load_in_8bit=False, full_finetuning=False)`, `FastModel.get_peft_model(..., max_seq_length=...)`,
`SFTTrainer(tokenizer=..., args=SFTConfig(max_seq_length=..., optim="adamw_8bit", ...))`, `trainer.train()`.
Changed for CI: the mini Llama instead of the hub model, four local rows instead of the download, two steps,
float32 on the CPU.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

CHIP2_ROWS = [
    "<human>: What is 2+2?\n<bot>: 2+2 is 4.",
    "<human>: Name a fast animal.\n<bot>: The quick brown fox.",
    "<human>: Say hello.\n<bot>: Hello world! How are you today?",
    "<human>: What is the opposite of lazy?\n<bot>: Busy.",
]


def test_readme_quick_start(mini_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data_file = tmp_path / "unified_chip2.jsonl"
    data_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in CHIP2_ROWS))

    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    from velotune import FastLanguageModel, FastModel  # noqa: F401  (the README imports both)

    max_seq_length = 256
    dataset = load_dataset("json", data_files={"train": str(data_file)}, split="train")

    model, tokenizer = FastModel.from_pretrained(
        model_name=mini_models("llama"),
        max_seq_length=max_seq_length,
        load_in_4bit=True,
        load_in_8bit=False,
        full_finetuning=False,
        dtype=torch.float32,  # CI: float32 on the CPU (the README leaves the dtype to the GPU)
    )
    model = FastModel.get_peft_model(
        model,
        r=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_alpha=16,
        lora_dropout=0,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=3407,
        max_seq_length=max_seq_length,
        use_rslora=False,
        loftq_config=None,
    )
    trainer = SFTTrainer(
        model=model,
        train_dataset=dataset,
        tokenizer=tokenizer,
        args=SFTConfig(
            max_seq_length=max_seq_length,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=1,
            warmup_steps=1,
            max_steps=2,
            logging_steps=1,
            output_dir="outputs",
            optim="adamw_8bit",
            seed=3407,
            report_to="none",
            bf16=False,
        ),
    )
    assert trainer.args.max_length == max_seq_length
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_public_names_unsloth_code_imports(mini_models):
    import velotune
    from velotune import (  # noqa: F401  (the top-level names of Unsloth's notebooks and tests)
        FastLanguageModel,
        FastModel,
        FastVisionModel,
        PatchDPOTrainer,
        UnslothTrainer,
        UnslothTrainingArguments,
        apply_chat_template,
        get_chat_template,
        is_bfloat16_supported,
        standardize_data_formats,
        standardize_sharegpt,
        to_sharegpt,
        train_on_responses_only,
    )
    from velotune import chat_templates

    # `from unsloth.chat_templates import ...` becomes `from velotune.chat_templates import ...`: the same functions
    for name in chat_templates.__all__:
        assert getattr(chat_templates, name) is getattr(velotune, name), name
    assert {"get_chat_template", "standardize_sharegpt", "train_on_responses_only"} <= set(chat_templates.__all__)
    assert isinstance(is_bfloat16_supported(), bool)

    for loader in (FastLanguageModel, FastModel, FastVisionModel):
        for method in ("from_pretrained", "get_peft_model", "for_inference", "for_training"):
            assert callable(getattr(loader, method)), (loader.__name__, method)

    model, _ = FastModel.from_pretrained(mini_models("llama"), max_seq_length=64, dtype=torch.float32)
    model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    for method in ("save_pretrained_merged", "push_to_hub_merged", "save_pretrained_gguf", "push_to_hub_gguf"):
        assert callable(getattr(model, method)), method
