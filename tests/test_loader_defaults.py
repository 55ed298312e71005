"""get_peft_model's defaults are the fastest exact settings: offloaded checkpointing with
recompute="mlp", padding-free batches, embeddings offloaded where that is safe (never on the CPU or
for tied tables), and a trainer asking for transformers' checkpointing keeps velotune's."""

from __future__ import annotations

import functools

import pytest
import torch
from mini import save_mini_model

from velotune import FastLanguageModel
from velotune.memory.checkpointing import _offloaded_checkpoint


def _layers(model):
    return model.get_base_model().model.layers


def test_defaults_are_offloaded_checkpointing_with_mlp_recompute_and_padding_free(tmp_path):
    model, _ = FastLanguageModel.from_pretrained(save_mini_model("llama", tmp_path), dtype=torch.float32)
    peft = FastLanguageModel.get_peft_model(model, r=4)
    fn = _layers(peft)[0]._gradient_checkpointing_func
    assert isinstance(fn, functools.partial) and fn.func is _offloaded_checkpoint
    assert fn.keywords["saved"] is not None  # recompute="mlp": a SavedOffloader
    assert peft.get_base_model().model._velotune_padding_free is True
    assert peft.get_input_embeddings().weight.device.type == "cpu"  # on the CPU: nothing offloaded
    assert "_velotune_embedding_device" not in peft.get_input_embeddings().__dict__


def test_recompute_default_follows_the_checkpointing_mode(tmp_path):
    path = save_mini_model("llama", tmp_path)
    model, _ = FastLanguageModel.from_pretrained(path, dtype=torch.float32)
    peft = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=True)  # no error: "layer"
    assert _layers(peft)[0].gradient_checkpointing
    model, _ = FastLanguageModel.from_pretrained(path, dtype=torch.float32)
    with pytest.raises(ValueError, match="offload_embedding"):
        FastLanguageModel.get_peft_model(model, r=4, offload_embedding="sometimes")


def test_trainer_checkpointing_request_keeps_offloaded_checkpointing(tmp_path):
    """TRL's SFTConfig defaults to gradient_checkpointing=True: the trainer's enable call must not put
    transformers' checkpointing in place of velotune's, and training still runs through it."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tok = FastLanguageModel.from_pretrained(save_mini_model("llama", tmp_path), dtype=torch.float32)
    peft = FastLanguageModel.get_peft_model(model, r=4, recompute="layer")
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
    )
    assert args.gradient_checkpointing
    trainer = SFTTrainer(
        model=peft,
        args=args,
        processing_class=tok,
        train_dataset=Dataset.from_dict({"text": ["hello world fox", "the quick brown dog jumps"]}),
    )
    trainer.train()
    fn = _layers(peft)[0]._gradient_checkpointing_func
    assert isinstance(fn, functools.partial) and fn.func is _offloaded_checkpoint
    assert peft.velotune_offload_stats.packed > 0
