"""Unsloth's Mistral v0.3 (7B) continued-pretraining notebook (`Mistral_v0.3_(7B)-CPT`), as a script.

Its call sequence with `from unsloth` -> `from velotune`: 4-bit load, LoRA with `embed_tokens` and `lm_head` in
`target_modules` (trained in full, as Unsloth does) and `use_rslora=True`; Wikipedia-style articles formatted with
`EOS_TOKEN` and pretrained on through `UnslothTrainer` + `UnslothTrainingArguments(embedding_learning_rate=...)`
(older keywords `tokenizer=`, `dataset_text_field=`, `max_seq_length=`, `dataset_num_proc=`); then the instruction
stage on ShareGPT-style Alpaca rows with a second `UnslothTrainer`; `for_inference` + `generate`; the LoRA save and
the merged 16-bit save (its `if False:` cell), whose embeddings are the trained ones.
Changed for CI: the mini Mistral instead of `unsloth/mistral-7b-v0.3`, English rows instead of Korean Wikipedia and
alpaca-gpt4-korean, two steps per stage, `dataset_num_proc=2`, float32 on the CPU, no CUDA memory cells.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

pytestmark = pytest.mark.usefixtures("one_thread")

ARTICLES = {
    "title": ["Velo", "The market", "The bridge", "Boats"],
    "text": [
        "The river town of Velo sits where two rivers meet.",
        "In Velo the market opens at dawn and the baker sells warm rolls.",
        "The old bridge has seven stone arches.",
        "Boats carry grain down the wide river and wood down the narrow one.",
    ],
}
ALPACA_CONVERSATIONS = [
    [{"from": "human", "value": "Name a river town."}, {"from": "gpt", "value": "Velo."}],
    [{"from": "human", "value": "When does the market open?"}, {"from": "gpt", "value": "At dawn."}],
    [{"from": "human", "value": "How many arches has the bridge?"}, {"from": "gpt", "value": "Seven."}],
    [{"from": "human", "value": "What do boats carry?"}, {"from": "gpt", "value": "Grain and wood."}],
]
WIKIPEDIA_PROMPT = """Wikipedia Article
### Title: {}

### Article:
{}"""
ALPACA_PROMPT = """Below is an instruction that describes a task. \
Write a response that appropriately completes the request.

### Instruction:
{}

### Response:
{}"""
LR, EMBEDDING_LR = 5e-5, 1e-5


def unsloth_args(**kw):
    from velotune import UnslothTrainingArguments

    return UnslothTrainingArguments(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=2,
        warmup_steps=1,
        learning_rate=LR,
        embedding_learning_rate=EMBEDDING_LR,
        logging_steps=1,
        optim="adamw_8bit",
        lr_scheduler_type="linear",
        seed=3407,
        output_dir="outputs",
        report_to="none",
        bf16=False,  # CI: float32 on the CPU
        **kw,
    )


def test_mistral_cpt_notebook(mini_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from velotune import FastLanguageModel

    max_seq_length = 256
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=mini_models("mistral"), max_seq_length=max_seq_length, dtype=torch.float32, load_in_4bit=True
    )
    base_embed = model.get_input_embeddings().weight.detach().clone()
    model = FastLanguageModel.get_peft_model(
        model,
        r=128,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "embed_tokens",
            "lm_head",
        ],
        lora_alpha=32,
        lora_dropout=0,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=3407,
        use_rslora=True,
        loftq_config=None,
    )
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    full = {n for n in trainable if ".modules_to_save." in n}
    assert {n.split(".modules_to_save.")[0].rsplit(".", 1)[-1] for n in full} == {"embed_tokens", "lm_head"}
    assert not any("lora_" in n and ("embed_tokens" in n or "lm_head" in n) for n in trainable)
    before = {n: trainable[n].detach().clone() for n in full}

    # --- continued pretraining
    eos_token = tokenizer.eos_token

    def formatting_prompts_func(examples):
        return {
            "text": [WIKIPEDIA_PROMPT.format(t, x) + eos_token for t, x in zip(examples["title"], examples["text"])]
        }

    dataset = Dataset.from_dict(ARTICLES).map(formatting_prompts_func, batched=True)

    from velotune import UnslothTrainer

    trainer = UnslothTrainer(
        model=model,
        tokenizer=tokenizer,
        train_dataset=dataset,
        dataset_text_field="text",
        max_seq_length=max_seq_length,
        dataset_num_proc=2,
        args=unsloth_args(weight_decay=0.01),
    )
    trainer.train()
    assert_trained(trainer, trainable, full)
    # The embedding copies moved (TRL keeps a 4-bit model's trainable copies in bf16: compared in that dtype).
    assert all(not torch.equal(trainable[n], before[n].to(trainable[n].dtype)) for n in full)

    # --- instruction finetuning on the pretrained model
    def format_conversations(examples):
        return {
            "text": [ALPACA_PROMPT.format(c[0]["value"], c[1]["value"]) + eos_token for c in examples["conversations"]]
        }

    alpaca_dataset = Dataset.from_dict({"conversations": ALPACA_CONVERSATIONS}).map(format_conversations, batched=True)
    trainer = UnslothTrainer(
        model=model,
        tokenizer=tokenizer,
        train_dataset=alpaca_dataset,
        dataset_text_field="text",
        max_seq_length=max_seq_length,
        dataset_num_proc=2,
        args=unsloth_args(weight_decay=0.0),
    )
    trainer.train()
    assert_trained(trainer, trainable, full)

    # --- inference
    FastLanguageModel.for_inference(model)
    inputs = tokenizer([ALPACA_PROMPT.format("Describe the town of Velo.", "")], return_tensors="pt")
    outputs = model.generate(**inputs, max_new_tokens=8, use_cache=True)
    assert outputs.shape[1] > inputs["input_ids"].shape[1]

    # --- saving: adapters (with the full embedding copies), then merged
    model.save_pretrained("lora_model")
    tokenizer.save_pretrained("lora_model")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "lora_model" / "adapter_model.safetensors")
    assert any("embed_tokens" in k for k in saved) and any("lm_head" in k for k in saved)

    model.save_pretrained_merged("model", tokenizer, save_method="merged_16bit")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    embed = next(p for n, p in trainable.items() if "embed_tokens.modules_to_save" in n)
    head = next(p for n, p in trainable.items() if "lm_head.modules_to_save" in n)
    assert torch.equal(merged.get_input_embeddings().weight, embed.float())
    assert torch.equal(merged.get_output_embeddings().weight, head.float())
    assert not torch.equal(merged.get_input_embeddings().weight, base_embed)


def assert_trained(trainer, trainable, full) -> None:
    """Two logged, finite losses; the embedding copies in optimizer groups at embedding_learning_rate, the rest at
    learning_rate (the schedule's starting rates)."""
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), trainer.state.log_history
    lr_of = {id(p): g["initial_lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert {n for n, p in trainable.items() if lr_of[id(p)] == EMBEDDING_LR} == full
    assert all(lr_of[id(p)] == LR for n, p in trainable.items() if n not in full)
