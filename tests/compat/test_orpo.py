"""Unsloth's Llama 3 (8B) ORPO notebook (`Llama3_(8B)-ORPO`), as a script.

Its call sequence with `from unsloth` -> `from velotune`: 4-bit load, LoRA on the seven projections, rows with
instruction / input / accepted / rejected mapped (one row at a time) to ORPO's prompt / chosen / rejected with the
Alpaca prompt and `EOS_TOKEN`, `PatchDPOTrainer()`, `from trl import ORPOConfig, ORPOTrainer` (TRL 1.x keeps them in
`trl.experimental.orpo`), `ORPOTrainer(model=..., train_dataset=..., tokenizer=..., args=ORPOConfig(max_length=...,
max_prompt_length=..., max_completion_length=..., beta=0.1, optim="adamw_8bit", ...))`, training, `for_inference` +
`generate`, the LoRA save.
Changed for CI: the mini Llama instead of `unsloth/llama-3-8b-bnb-4bit`, four local rows instead of
dolphin-sft-v0.1-preference, two steps, float32 on the CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = {
    "instruction": ["Add the numbers.", "Give the opposite word.", "Say hello.", "Name the animal."],
    "input": ["6 and 7", "fast", "", "It is quick and brown."],
    "accepted": ["13", "slow", "Hello world!", "The fox."],
    "rejected": ["12", "fast", "Goodbye.", "The dog."],
}
ALPACA_PROMPT = """Below is an instruction that describes a task, paired with an input that provides further context. \
Write a response that appropriately completes the request.

### Instruction:
{}

### Input:
{}

### Response:
{}"""


def test_llama3_orpo_notebook(mini_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from velotune import FastLanguageModel

    max_seq_length = 512
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

    eos_token = tokenizer.eos_token

    def format_prompt(sample):  # one row at a time, as the notebook's dataset.map(format_prompt)
        sample["prompt"] = ALPACA_PROMPT.format(sample["instruction"], sample["input"], "")
        sample["chosen"] = sample["accepted"] + eos_token
        sample["rejected"] = sample["rejected"] + eos_token
        return sample

    dataset = Dataset.from_dict(ROWS).map(format_prompt)
    assert dataset[0]["chosen"] == "13" + eos_token and dataset[0]["prompt"].endswith("### Response:\n")

    from velotune import PatchDPOTrainer

    PatchDPOTrainer()

    from trl import ORPOConfig, ORPOTrainer

    orpo_trainer = ORPOTrainer(
        model=model,
        train_dataset=dataset,
        tokenizer=tokenizer,
        args=ORPOConfig(
            max_length=max_seq_length,
            max_prompt_length=max_seq_length // 2,
            max_completion_length=max_seq_length // 2,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=1,
            beta=0.1,
            logging_steps=1,
            optim="adamw_8bit",
            lr_scheduler_type="linear",
            max_steps=2,
            output_dir="outputs",
            report_to="none",
            bf16=False,  # CI: float32 on the CPU
        ),
    )
    from velotune.trl_compat import orpo_classes

    assert (ORPOConfig, ORPOTrainer) == orpo_classes()  # TRL's own classes
    orpo_trainer.train()
    logs = [h for h in orpo_trainer.state.log_history if "loss" in h]
    assert orpo_trainer.state.global_step == 2 and len(logs) == 2
    assert all(math.isfinite(h["loss"]) for h in logs)
    assert all(math.isfinite(h["log_odds_ratio"]) and math.isfinite(h["nll_loss"]) for h in logs)

    # --- inference, then the LoRA save
    FastLanguageModel.for_inference(model)
    inputs = tokenizer(
        [ALPACA_PROMPT.format("Continue the fibonnaci sequence.", "1, 1, 2, 3, 5, 8", "")], return_tensors="pt"
    )
    outputs = model.generate(**inputs, max_new_tokens=8, use_cache=True)
    assert outputs.shape[1] > inputs["input_ids"].shape[1]
    assert tokenizer.batch_decode(outputs)[0].startswith("Below is an instruction")

    model.save_pretrained("lora_model")
    tokenizer.save_pretrained("lora_model")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "lora_model" / "adapter_model.safetensors")
    assert len(saved) == 2 * 7 * 2 and any(bool(v.any()) for k, v in saved.items() if "lora_B" in k)
