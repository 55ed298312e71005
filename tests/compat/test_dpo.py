"""Unsloth's Zephyr (7B) DPO notebook (`Zephyr_(7B)-DPO`), as a script.

Its call sequence with `from unsloth` -> `from velotune`: `PatchDPOTrainer()` first, a 4-bit load, UltraFeedback-style
rows (chosen / rejected conversations) turned into prompt / chosen / rejected text with the tokenizer's own chat
template as the Alignment Handbook's "dpo" task does (empty system turn, the assistant prefix stripped from the
replies), LoRA r=64 on the seven projections, `PatchDPOTrainer()` again, then
`DPOTrainer(model, ref_model=None, args=DPOConfig(warmup_ratio=0.1, num_train_epochs=..., optim="adamw_8bit", ...),
beta=0.1, train_dataset=..., tokenizer=..., max_length=1024, max_prompt_length=512)` — the older keywords on the
trainer — and training.
Changed for CI: the mini Llama (its chat template is Zephyr-like: <|system|>, <|user|>, <|assistant|>) instead of
`unsloth/zephyr-sft-bnb-4bit`, four local rows instead of 0.5% of ultrafeedback_binarized, one epoch of two steps,
float32 on the CPU.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from datasets import Dataset

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [
    ("What is 6 plus 7?", "6 plus 7 is 13.", "6 plus 7 is 12."),
    ("What is the opposite of fast?", "The opposite of fast is slow.", "I do not know."),
    ("Say hello.", "Hello world!", "Goodbye."),
    ("Name a lazy animal.", "The lazy dog.", "The quick fox."),
]


def ultrafeedback_rows() -> Dataset:
    rows = [
        {
            "prompt": q,
            "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": good}],
            "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": bad}],
            "score_chosen": 9.0,
            "score_rejected": 2.0,
        }
        for q, good, bad in PAIRS
    ]
    return Dataset.from_list(rows)


def to_dpo_text(example, tokenizer, assistant_prefix="<|assistant|>"):
    """The Alignment Handbook's "dpo" formatting, in short: the prompt is an empty system turn plus the user turn with
    the generation prompt; chosen / rejected are the assistant turns without their prefix."""
    user = next(m for m in example["chosen"] if m["role"] == "user")
    prompt = [{"role": "system", "content": ""}, user]
    strip = re.compile("^" + re.escape(assistant_prefix))
    return {
        "text_prompt": tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
        "text_chosen": strip.sub("", tokenizer.apply_chat_template(example["chosen"][1:], tokenize=False)),
        "text_rejected": strip.sub("", tokenizer.apply_chat_template(example["rejected"][1:], tokenize=False)),
    }


def test_zephyr_dpo_notebook(mini_models, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    from velotune import PatchDPOTrainer

    PatchDPOTrainer()

    from velotune import FastLanguageModel

    max_seq_length = 1024
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=mini_models("llama"), max_seq_length=max_seq_length, dtype=torch.float32, load_in_4bit=True
    )

    raw = ultrafeedback_rows()
    columns = list(raw.features)
    raw = raw.map(to_dpo_text, fn_kwargs={"tokenizer": tokenizer}, remove_columns=columns)
    train = raw.rename_columns({"text_prompt": "prompt", "text_chosen": "chosen", "text_rejected": "rejected"})
    assert train[0] == {
        "prompt": "<|system|><|end|><|user|>What is 6 plus 7?<|end|><|assistant|>",
        "chosen": "6 plus 7 is 13.<|end|>",
        "rejected": "6 plus 7 is 12.<|end|>",
    }

    model = FastLanguageModel.get_peft_model(
        model,
        r=64,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_alpha=64,
        lora_dropout=0,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=3407,
        use_rslora=False,
        loftq_config=None,
    )
    PatchDPOTrainer()

    from trl import DPOConfig, DPOTrainer

    dpo_trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=DPOConfig(
            per_device_train_batch_size=2,
            gradient_accumulation_steps=1,
            warmup_ratio=0.1,
            num_train_epochs=1,
            learning_rate=5e-6,
            logging_steps=1,
            optim="adamw_8bit",
            weight_decay=0.0,
            lr_scheduler_type="linear",
            seed=42,
            output_dir="outputs",
            report_to="none",
            bf16=False,  # CI: float32 on the CPU
        ),
        beta=0.1,
        train_dataset=train,
        tokenizer=tokenizer,
        max_length=1024,
        max_prompt_length=512,
    )
    assert dpo_trainer.args.beta == 0.1 and dpo_trainer.args.max_length == 1024
    # warmup_ratio 0.1 of the 2 steps: ceil(0.2) = 1 warmup step, as transformers 4 counted it
    assert dpo_trainer.args.get_warmup_steps(2) == 1
    # TRL 1.x truncates prompt and completion together: the dropped prompt limit is named in a warning
    assert any("max_prompt_length=512" in r.getMessage() for r in caplog.records)

    dpo_trainer.train()
    logs = [h for h in dpo_trainer.state.log_history if "loss" in h]
    assert dpo_trainer.state.global_step == 2 and len(logs) == 2
    assert all(math.isfinite(h["loss"]) for h in logs)
    # Step 1 runs before any update: the policy is the reference (the adapters' B is zero), so the loss is log 2.
    assert abs(logs[0]["loss"] - math.log(2)) <= 1e-4
    assert all(k in logs[0] for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"))
