"""Unsloth's Llama 3.2 (1B and 3B) conversational notebook (`Llama3.2_(1B_and_3B)-Conversational`), as a script.

Its call sequence with `from unsloth` -> `from velotune` (and `unsloth.chat_templates` -> `velotune.chat_templates`):
4-bit load, LoRA on the seven projections with `use_gradient_checkpointing="unsloth"`, `get_chat_template(tokenizer,
"llama-3.1")` without `model=`, ShareGPT rows through `standardize_sharegpt`, a batched `formatting_prompts_func`,
`SFTTrainer` with the older TRL keywords (`tokenizer=`, `dataset_text_field=`, `max_seq_length=`, `packing=`) and
`DataCollatorForSeq2Seq`, `train_on_responses_only` with Llama 3's header strings, the notebook's masking check,
training, `for_inference` + `generate` on a chat prompt, and the LoRA save that the notebook reloads.
Changed for CI: the mini Llama instead of `unsloth/Llama-3.2-3B-Instruct`, four local conversations instead of
FineTome-100k, two steps, float32 on the CPU (the notebook's `dtype=None` picks bf16/fp16 on a GPU), no CUDA
memory cells.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

pytestmark = pytest.mark.usefixtures("one_thread")

SHAREGPT_ROWS = [
    [
        {"from": "system", "value": "You answer briefly."},
        {"from": "human", "value": "What is 2+2?"},
        {"from": "gpt", "value": "It is 4."},
    ],
    [{"from": "human", "value": "Hello world!"}, {"from": "gpt", "value": "Hello! How are you today?"}],
    [
        {"from": "human", "value": "Name a fast animal."},
        {"from": "gpt", "value": "The fox."},
        {"from": "human", "value": "And a lazy one?"},
        {"from": "gpt", "value": "The dog."},
    ],
    [{"from": "human", "value": "What is two plus two?"}, {"from": "gpt", "value": "Four."}],
]


def test_llama32_conversational_notebook(mini_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the notebook writes "outputs" and "llama_lora" into the working folder

    from velotune import FastLanguageModel

    max_seq_length = 1024
    dtype = torch.float32
    load_in_4bit = True

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=mini_models("llama"),
        max_seq_length=max_seq_length,
        dtype=dtype,
        load_in_4bit=load_in_4bit,
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
    vocab = model.get_input_embeddings().weight.shape[0]

    # --- data prep
    from velotune.chat_templates import get_chat_template

    tokenizer = get_chat_template(tokenizer, chat_template="llama-3.1")

    def formatting_prompts_func(examples):
        convos = examples["conversations"]
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=False) for c in convos]
        return {"text": texts}

    dataset = Dataset.from_dict({"conversations": SHAREGPT_ROWS})

    from velotune.chat_templates import standardize_sharegpt

    dataset = standardize_sharegpt(dataset)
    dataset = dataset.map(formatting_prompts_func, batched=True)
    assert dataset[2]["conversations"][1] == {"role": "assistant", "content": "The fox."}
    assert "<|start_header_id|>assistant<|end_header_id|>\n\nThe fox.<|eot_id|>" in dataset[2]["text"]
    assert len(tokenizer) <= vocab  # no token was added without model=: the embeddings still cover every id

    # --- train
    from transformers import DataCollatorForSeq2Seq
    from trl import SFTConfig, SFTTrainer

    trainer = SFTTrainer(
        model=model,
        tokenizer=tokenizer,
        train_dataset=dataset,
        dataset_text_field="text",
        max_seq_length=max_seq_length,
        data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer),
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
            bf16=False,  # CI: float32 on the CPU (TRL turns bf16 on by default)
        ),
    )

    from velotune.chat_templates import train_on_responses_only

    trainer = train_on_responses_only(
        trainer,
        instruction_part="<|start_header_id|>user<|end_header_id|>\n\n",
        response_part="<|start_header_id|>assistant<|end_header_id|>\n\n",
    )

    # The notebook's check: decode the labels with -100 shown as spaces; only the replies are left.
    space = tokenizer(" ", add_special_tokens=False).input_ids[0]
    row = trainer.train_dataset[2]
    assert tokenizer.decode(row["input_ids"]).startswith(tokenizer.bos_token + "<|start_header_id|>system")
    kept = tokenizer.decode([space if x == -100 else x for x in row["labels"]])
    assert kept.split() == ["The", "fox.<|eot_id|>", "The", "dog.<|eot_id|>"], kept

    trainer_stats = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), trainer.state.log_history
    assert trainer_stats.global_step == 2 and math.isfinite(trainer_stats.training_loss)

    # --- inference
    tokenizer = get_chat_template(tokenizer, chat_template="llama-3.1")
    FastLanguageModel.for_inference(model)
    messages = [{"role": "user", "content": "Continue the fibonacci sequence: 1, 1, 2, 3, 5, 8,"}]
    inputs = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_tensors="pt")
    outputs = model.generate(input_ids=inputs, max_new_tokens=8, use_cache=True, temperature=1.5, min_p=0.1)
    prompt_ids = inputs["input_ids"]  # (transformers 5 returns an encoding here, 4 returned the ids)
    assert outputs.shape[0] == 1 and prompt_ids.shape[1] < outputs.shape[1] <= prompt_ids.shape[1] + 8
    assert tokenizer.batch_decode(outputs)[0].startswith(tokenizer.decode(prompt_ids[0]))

    # --- save the LoRA adapters, then load them back as the notebook does
    model.save_pretrained("llama_lora")
    tokenizer.save_pretrained("llama_lora")
    assert (tmp_path / "llama_lora" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "llama_lora" / "adapter_config.json").is_file()

    loaded, loaded_tok = FastLanguageModel.from_pretrained(
        model_name="llama_lora", max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit
    )
    FastLanguageModel.for_inference(loaded)
    assert loaded_tok.chat_template == tokenizer.chat_template
    # The adapters come back as trained: TRL casts a 4-bit model's adapters to bf16 (QLoRA), PEFT loads them
    # back in the model's float32; the values are the same.
    trained = {n: p for n, p in model.named_parameters() if "lora_" in n}
    back = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert trained.keys() == back.keys() and len(trained) == 2 * 7 * 2
    assert all(torch.equal(trained[n].float(), back[n].float()) for n in trained)
    assert any(bool(p.any()) for n, p in back.items() if "lora_B" in n)  # trained: B is no longer zero
    # Same logits: the trained model's bf16 adapters (TRL's cast) upcast as PEFT loaded them, the same float32 path.
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    ids = torch.tensor([trainer.train_dataset[0]["input_ids"]])
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
