"""Unsloth's Qwen2.5 (7B) Alpaca notebook (`Qwen2.5_(7B)-Alpaca`), as a script, with its saving cells run.

Its call sequence with `from unsloth` -> `from velotune`: 4-bit load, LoRA on the seven projections, the Alpaca
prompt filled by a batched `formatting_prompts_func` that appends `EOS_TOKEN`, `SFTTrainer` with the older TRL
keywords (`tokenizer=`, `dataset_text_field=`, `max_seq_length=`, `packing=False`) and `optim="adamw_8bit"`,
training, `for_inference` + `generate` (plain and through a `TextStreamer`), `model.save_pretrained("lora_model")`,
then the cells the notebook leaves under `if False:` — `save_pretrained_merged(..., save_method="merged_16bit")`
and `push_to_hub_merged(..., token="")` (uploaded through the `api=` seam to a local stand-in of the hub).
Changed for CI: the mini Qwen2 instead of `unsloth/Qwen2.5-7B`, four local rows instead of yahma/alpaca-cleaned,
two steps, float32 on the CPU, no CUDA memory cells.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = {
    "instruction": ["Add the numbers.", "Give the opposite word.", "Continue the sequence.", "Say hello."],
    "input": ["2 and 2", "fast", "1, 2, 3", ""],
    "output": ["4", "slow", "4, 5, 6", "Hello world!"],
}

ALPACA_PROMPT = """Below is an instruction that describes a task, paired with an input that provides further context. \
Write a response that appropriately completes the request.

### Instruction:
{}

### Input:
{}

### Response:
{}"""


def test_qwen25_alpaca_notebook_and_its_saves(mini_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from velotune import FastLanguageModel

    max_seq_length = 512
    dtype = torch.float32
    load_in_4bit = True
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=mini_models("qwen2"), max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit
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

    eos_token = tokenizer.eos_token  # the notebook's EOS_TOKEN: without it generation never stops

    def formatting_prompts_func(examples):
        texts = [
            ALPACA_PROMPT.format(instruction, inp, output) + eos_token
            for instruction, inp, output in zip(examples["instruction"], examples["input"], examples["output"])
        ]
        return {"text": texts}

    dataset = Dataset.from_dict(ROWS).map(formatting_prompts_func, batched=True)
    assert dataset[0]["text"].endswith("### Response:\n4" + eos_token)

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
            weight_decay=0.01,
            lr_scheduler_type="linear",
            seed=3407,
            output_dir="outputs",
            report_to="none",
            bf16=False,  # CI: float32 on the CPU
        ),
    )
    # The EOS written by the formatting function is the last token of every row (learnt, so generation stops).
    assert all(row["input_ids"][-1] == tokenizer.eos_token_id for row in trainer.train_dataset)
    trainer_stats = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert trainer_stats.global_step == 2

    # --- inference, as the notebook's two cells
    FastLanguageModel.for_inference(model)
    inputs = tokenizer(
        [ALPACA_PROMPT.format("Continue the fibonnaci sequence.", "1, 1, 2, 3, 5, 8", "")], return_tensors="pt"
    )
    outputs = model.generate(**inputs, max_new_tokens=8, use_cache=True)
    assert outputs.shape[1] > inputs["input_ids"].shape[1]
    assert tokenizer.batch_decode(outputs)[0].startswith(
        ALPACA_PROMPT.format("Continue the fibonnaci sequence.", "1, 1, 2, 3, 5, 8", "")
    )

    from transformers import TextStreamer

    streamed = []

    class Collect(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            streamed.append(text)

    _ = model.generate(**inputs, streamer=Collect(tokenizer), max_new_tokens=8)
    assert "".join(streamed).startswith("Below is an instruction")

    # --- saving: LoRA adapters
    model.save_pretrained("lora_model")
    tokenizer.save_pretrained("lora_model")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "lora_model").iterdir()}

    # --- saving: merged to 16 bit (the model is float32 here, so it stays float32)
    model.save_pretrained_merged("model", tokenizer, save_method="merged_16bit")
    folder = tmp_path / "model"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))
    assert (folder / "tokenizer_config.json").is_file()
    assert_merged_weights(model, folder)

    # --- push_to_hub_merged, up to the network: the same folder goes to huggingface_hub's upload_folder
    from helpers import RecordingHfApi

    hub = RecordingHfApi(tmp_path / "hub")
    plan = model.push_to_hub_merged("hf/model", tokenizer, save_method="merged_16bit", token="", api=hub)
    assert [c for c, _ in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0][1]["repo_id"] == "hf/model" and hub.calls[0][1]["token"] is None  # "" = the saved login
    assert sorted(p.name for p in hub.uploads[0].iterdir()) == sorted(p.name for p in folder.iterdir())
    assert plan["repo_id"] == "hf/model" and plan["files"]


def assert_merged_weights(model, folder) -> None:
    """The merged checkpoint, read by stock transformers, holds dequantize(W) + scaling * B @ A for every LoRA layer
    (bitsandbytes' own dequantisation, float32 math) and the base weights elsewhere."""
    from bitsandbytes.functional import dequantize_4bit
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    merged = dict(stock.named_parameters())
    layers = [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(layers) == 2 * 7
    for name, m in layers:
        w = m.base_layer.weight
        base = dequantize_4bit(w.data, w.quant_state).float()
        a, b = m.lora_A["default"].weight.float(), m.lora_B["default"].weight.float()
        want = base + m.scaling["default"] * (b @ a)
        got = merged[name.removeprefix("base_model.model.") + ".weight"]
        assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-6, name
        assert b.abs().max() > 0  # trained: the merge is not the base weight
