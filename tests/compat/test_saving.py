"""Unsloth's own saving tests, as scripts: `tests/saving/test_unsloth_save.py` (merged_16bit and merged_4bit_forced of
a 4-bit model whose LoRA covers only the attention projections) and `tests/qlora/test_unsloth_qlora_train_and_merge.py`
(QLoRA training, a merge to 16 bit, the merged folder loaded back and asked the same prompt).

Their call sequences with `from unsloth` -> `from velotune`. Changed for CI: the mini Llama (intermediate size 128, a
multiple of bitsandbytes' 64-value CPU block) instead of the hub models, float32 on the CPU where they use
`dtype=None` / bfloat16, two training steps, greedy answers compared instead of sampled ones checked for a phrase,
and `tokenizer_config.json` + `tokenizer.json` as the tokenizer files (transformers 5 writes no
`special_tokens_map.json`); the QLoRA test's `log_level="info"` is left out (the Trainer would turn transformers'
global logging to INFO for every later test).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from datasets import Dataset

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER_FILES = ["tokenizer_config.json", "tokenizer.json"]


def weight_files(folder: str) -> list[str]:
    return [f for f in os.listdir(folder) if f.endswith((".bin", ".safetensors"))]


def test_unsloth_save_merged_16bit_and_4bit(mini_models, tmp_path):
    from velotune import FastLanguageModel, FastModel

    model, tokenizer = FastModel.from_pretrained(
        mini_models("llama", intermediate_size=128), max_seq_length=128, dtype=torch.float32, load_in_4bit=True
    )
    model = FastModel.get_peft_model(
        model,
        r=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        lora_alpha=16,
        use_gradient_checkpointing="unsloth",
    )
    sizes = {}
    for save_method in ("merged_16bit", "merged_4bit_forced"):
        save_path = os.path.join(tmp_path, f"unsloth_{save_method}", model.config._name_or_path.replace("/", "_"))
        model.save_pretrained_merged(save_path, tokenizer=tokenizer, save_method=save_method)

        assert os.path.isdir(save_path) and os.path.isfile(os.path.join(save_path, "config.json"))
        files = weight_files(save_path)
        assert files and all(f.endswith(".safetensors") for f in files)
        for name in TOKENIZER_FILES:
            assert os.path.isfile(os.path.join(save_path, name)), name
        with open(os.path.join(save_path, "config.json")) as f:
            config = json.load(f)
        assert ("quantization_config" in config) == (save_method == "merged_4bit_forced")
        sizes[save_method] = sum(os.path.getsize(os.path.join(save_path, f)) for f in files)

        loaded, loaded_tokenizer = FastLanguageModel.from_pretrained(
            save_path, max_seq_length=128, dtype=torch.float32, load_in_4bit=True
        )
        assert loaded.is_loaded_in_4bit and len(loaded_tokenizer) == len(tokenizer)
    assert sizes["merged_4bit_forced"] < sizes["merged_16bit"]


USER_MESSAGE = {"role": "user", "content": "What is the secret code?"}
ANSWER = "The secret code is fox."


def test_unsloth_qlora_train_and_merge(mini_models, tmp_path):
    from velotune import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=mini_models("llama", intermediate_size=128),
        max_seq_length=512,
        load_in_4bit=True,
        fast_inference=False,
        max_lora_rank=16,
        gpu_memory_utilization=0.5,
        dtype=torch.float32,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_alpha=16,
        use_gradient_checkpointing=False,
        random_state=42,
    )
    prompt = tokenizer.apply_chat_template([USER_MESSAGE], tokenize=False, add_generation_prompt=True)
    conversation = [USER_MESSAGE, {"role": "assistant", "content": ANSWER}]
    dataset = Dataset.from_dict({"messages": [conversation] * 8})

    from trl import SFTConfig, SFTTrainer

    training_args = SFTConfig(
        output_dir=str(tmp_path / "sft_test"),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to="none",
        num_train_epochs=1,
        logging_steps=1,
        seed=42,
        bf16=False,
        fp16=False,
        save_strategy="no",
        learning_rate=1e-2,  # (so that two steps change the answers' logits visibly)
    )
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=training_args)
    output = trainer.train()
    assert output.global_step == 2 and math.isfinite(output.training_loss)

    # Greedy answers of the trained QLoRA model, then of its 16-bit merge loaded back (not in 4 bit).
    FastLanguageModel.for_inference(model)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    trained = model.generate(**inputs, max_new_tokens=12, do_sample=False)

    merged_path = str(tmp_path / "unsloth_merged_16bit")
    model.save_pretrained_merged(merged_path, tokenizer, save_method="merged_16bit")
    merged_model, merged_tokenizer = FastLanguageModel.from_pretrained(
        merged_path, max_seq_length=512, load_in_4bit=False, fast_inference=False, dtype=torch.float32
    )
    FastLanguageModel.for_inference(merged_model)
    merged = merged_model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert torch.equal(merged, trained)
    assert merged_tokenizer.decode(merged[0]).startswith(prompt)

    # The merge is the trained model: W + s B A of the trained values. TRL keeps a 4-bit model's adapters in bf16
    # (and PEFT then runs them in bf16); in float32 the two agree to float32 rounding. Both differ from the base.
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    with torch.no_grad():
        want = model(**inputs).logits
        got = merged_model(**inputs).logits
        with model.disable_adapter():
            base = model(**inputs).logits
    scale = want.abs().max()
    assert ((got - want).abs().max() / scale).item() <= 1e-5
    assert ((base - want).abs().max() / scale).item() >= 1e-2
