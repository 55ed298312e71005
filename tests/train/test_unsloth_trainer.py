"""UnslothTrainer / UnslothTrainingArguments: Unsloth's continued-pretraining call runs as written (older TRL
keywords included, without velotune.trl_compat installed), and `embedding_learning_rate` is the learning
rate the embedding tables actually move with."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from velotune import trl_compat

TOY = Path(__file__).resolve().parents[2] / "examples" / "data"
pytestmark = pytest.mark.usefixtures("one_thread")

LR, EMB_LR = 5e-3, 5e-4


@pytest.fixture(autouse=True)
def _no_layer():
    """UnslothTrainer takes the older names itself: run without the global layer."""
    trl_compat.uninstall()
    yield


def corpus(rows: int = 4) -> Dataset:
    import json

    lines = (TOY / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:rows]
    return Dataset.from_list([json.loads(line) for line in lines])


def cpt_model(path):
    """Unsloth's CPT notebook model: LoRA plus embed_tokens / lm_head trained in full (modules_to_save)."""
    from velotune import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(str(path), max_seq_length=128, dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(
        model,
        r=4,
        lora_alpha=8,
        modules_to_save=["embed_tokens", "lm_head"],
        use_gradient_checkpointing=False,
        random_state=0,
    )
    with torch.no_grad():  # non-zero B: the LoRA factors move on the first step
        for i, (n, p) in enumerate(model.named_parameters()):
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(i))
    return model, tok


def test_unsloth_cpt_call_and_embedding_learning_rate(mini_llama, tmp_path):
    from trl import SFTTrainer

    from velotune import UnslothTrainer, UnslothTrainingArguments

    model, tok = cpt_model(mini_llama)
    args = UnslothTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=1,
        warmup_ratio=0.0,  # an older name: mapped by the class itself
        learning_rate=LR,
        embedding_learning_rate=EMB_LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
    )
    trainer = UnslothTrainer(
        model=model,
        tokenizer=tok,
        train_dataset=corpus(),
        dataset_text_field="text",
        max_seq_length=64,
        dataset_num_proc=1,
        args=args,
    )
    assert isinstance(trainer, SFTTrainer) and isinstance(trainer.args, UnslothTrainingArguments)
    assert trainer.args.embedding_learning_rate == EMB_LR and trainer.args.max_length == 64
    assert trainer.args.dataset_text_field == "text" and trainer.processing_class is tok

    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    embedding = {n for n in named if ".modules_to_save." in n}
    assert len(embedding) == 2  # embed_tokens and lm_head copies
    before = {n: p.detach().clone() for n, p in named.items()}
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])

    # The optimizer: every embedding tensor in a group at EMB_LR, every other one at LR.
    lr_of = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert {n for n, p in named.items() if lr_of[id(p)] == EMB_LR} == embedding
    assert all(lr_of[id(p)] == LR for n, p in named.items() if n not in embedding)

    # AdamW's first step moves each element by lr * g / (|g| + eps): at most lr, and ~lr where the gradient
    # is far above eps. So the largest move of each group tells its learning rate.
    def largest_move(names):
        return max((named[n].detach() - before[n]).abs().max().item() for n in names)

    emb_move, other_move = largest_move(embedding), largest_move(set(named) - embedding)
    assert EMB_LR * 0.99 <= emb_move <= EMB_LR * 1.001
    assert LR * 0.99 <= other_move <= LR * 1.001


def test_unsloth_training_arguments_take_older_names_and_check_the_rate():
    from velotune import UnslothTrainingArguments
    from velotune.errors import ConfigError

    cpu = dict(output_dir="o", use_cpu=True, bf16=False, report_to="none")
    args = UnslothTrainingArguments(warmup_ratio=0.1, max_seq_length=77, embedding_learning_rate=1e-5, **cpu)
    assert args.warmup_steps == 0.1 and args.get_warmup_steps(50) == 5 and args.max_length == 77
    assert UnslothTrainingArguments(**cpu).embedding_learning_rate is None
    with pytest.raises(ConfigError, match="embedding_learning_rate must be a number"):
        UnslothTrainingArguments(embedding_learning_rate="fast", **cpu)


def test_embedding_learning_rate_without_trainable_embeddings_is_an_error(mini_llama, tmp_path):
    from velotune import FastLanguageModel, UnslothTrainer, UnslothTrainingArguments
    from velotune.errors import ConfigError

    model, tok = FastLanguageModel.from_pretrained(str(mini_llama), max_seq_length=128, dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    trainer = UnslothTrainer(
        model=model,
        tokenizer=tok,
        train_dataset=corpus(2),
        args=UnslothTrainingArguments(
            output_dir=str(tmp_path),
            max_steps=1,
            embedding_learning_rate=1e-5,
            use_cpu=True,
            bf16=False,
            report_to="none",
            dataset_text_field="text",
            max_length=64,
        ),
    )
    with pytest.raises(ConfigError, match="no embedding parameter is trainable"):
        trainer.create_optimizer()
