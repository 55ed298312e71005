"""Frozen input embeddings kept in host memory (velotune.memory.embedding_offload)."""

from __future__ import annotations

import copy

import pytest
import torch

from mini import fixed_batch, mini_model
from velotune import FastLanguageModel
from velotune.models import prepare_model
from velotune.memory.embedding_offload import (
    _offloaded_forward,
    _report_device,
    _unreport_device,
    embeddings_offloaded,
    offload_input_embeddings,
    restore_input_embeddings,
)


def _lora(offload: bool, checkpointing="unsloth", **overrides):
    model = mini_model("llama", **overrides)
    prepare_model(model, max_seq_length=64)
    return FastLanguageModel.get_peft_model(
        model, r=8, lora_alpha=16, use_gradient_checkpointing=checkpointing, random_state=5, offload_embedding=offload
    )


def _loss_and_grads(model):
    loss = model(**fixed_batch()).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", ["unsloth", False])
def test_same_loss_and_grads_as_the_table_on_the_compute_device(checkpointing):
    ref_loss, ref_grads = _loss_and_grads(_lora(False, checkpointing))
    model = _lora(True, checkpointing)
    emb = model.get_input_embeddings()
    assert embeddings_offloaded(model) and emb.forward.__func__ is _offloaded_forward
    calls = []
    emb.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    loss, grads = _loss_and_grads(model)
    assert calls, "the offloaded lookup did not run"
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name


def test_restore_gives_the_stock_module_back():
    model = _lora(True)
    emb = model.get_input_embeddings()
    weight = emb.weight
    ids = fixed_batch()["input_ids"]
    offloaded = emb(ids)
    restore_input_embeddings(model)
    assert not embeddings_offloaded(model) and "forward" not in emb.__dict__ and emb.weight is weight
    assert torch.equal(emb(ids), offloaded)
    offload_input_embeddings(model)  # and again (idempotent re-offload)
    assert torch.equal(emb(ids), offloaded)


def test_model_device_names_the_compute_device_not_the_host_table():
    """transformers' `model.device` is the first parameter's device (the table): while offloaded, the
    instance answers the compute device instead, under the same class name; restoring undoes it."""
    from transformers import LlamaForCausalLM

    model = _lora(False)
    base = model.get_base_model()
    cls = type(base)
    _report_device(model, torch.device("cuda", 0))  # (a device object only: nothing is allocated)
    assert model.device == torch.device("cuda", 0) and base.device == torch.device("cuda", 0)
    assert isinstance(base, LlamaForCausalLM) and type(base).__name__ == cls.__name__ and type(base) is not cls
    assert type(base).__module__ == cls.__module__  # (transformers finds the modeling file by it)
    assert copy.deepcopy(model).device == torch.device("cuda", 0)  # TRL deep-copies models (reference models)
    assert next(base.parameters()).device.type == "cpu"
    _unreport_device(model)
    assert type(base) is cls and model.device.type == "cpu" and "_velotune_class" not in base.__dict__


def test_refused_for_tied_trainable_or_unusual_tables():
    tied = mini_model("llama", tie_word_embeddings=True)
    tied.requires_grad_(False)
    with pytest.raises(ValueError, match="tied to the output layer"):
        offload_input_embeddings(tied)
    assert "forward" not in tied.get_input_embeddings().__dict__  # nothing changed
    trainable = mini_model("llama")
    with pytest.raises(ValueError, match="trainable"):
        offload_input_embeddings(trainable)  # a stock model's table requires grad
    trainable.get_input_embeddings().weight.requires_grad_(False)
    trainable.get_input_embeddings().max_norm = 1.0
    with pytest.raises(ValueError, match="max_norm"):
        offload_input_embeddings(trainable)
    with pytest.raises(ValueError, match="trainable"):  # PEFT's modules_to_save copy trains it
        model = mini_model("llama")
        prepare_model(model, max_seq_length=64)
        FastLanguageModel.get_peft_model(model, r=8, modules_to_save=["embed_tokens"], offload_embedding=True)


def test_chat_template_growing_the_vocabulary_keeps_the_table_on_the_host():
    from mini import mini_tokenizer
    from velotune.data.chat_templates import get_chat_template

    model = mini_model("llama")
    model.requires_grad_(False)
    offload_input_embeddings(model)
    tok = mini_tokenizer()
    get_chat_template(tok, "llama-3.1", model=model)  # adds 3 tokens: the embeddings are resized
    emb = model.get_input_embeddings()
    assert emb.weight.shape[0] >= len(tok) and embeddings_offloaded(model)
    assert emb.forward.__func__ is _offloaded_forward
    ids = torch.tensor([[len(tok) - 1, 5, 7]])  # a new token's id embeds
    assert model(input_ids=ids).logits.shape[-1] >= len(tok)


def _cuda_lora(offload: bool):
    model = mini_model("llama").cuda()
    prepare_model(model, max_seq_length=64)
    return FastLanguageModel.get_peft_model(
        model, r=8, lora_alpha=16, use_gradient_checkpointing="unsloth", random_state=5, offload_embedding=offload
    )


@pytest.mark.gpu
def test_gpu_reads_the_rows_from_the_pinned_table():
    """Ids on the GPU: the kernel gathers from the pinned host table (no host buffer, no sync), the
    rows bit for bit; a LoRA step gives the same loss and grads as the table on the GPU."""
    ref = _cuda_lora(False)
    table = ref.get_input_embeddings().weight.detach().clone()
    batch = {k: v.cuda() for k, v in fixed_batch().items()}
    ref_loss = ref(**batch).loss
    ref_loss.backward()
    model = _cuda_lora(True)
    emb = model.get_input_embeddings()
    assert emb.weight.device.type == "cpu" and emb.weight.is_pinned()
    assert model.device.type == "cuda"  # the compute device, as with the table on the GPU
    ids = torch.randint(0, table.shape[0], (2, 64), device="cuda")
    out = emb(ids)
    assert out.is_cuda and torch.equal(out, table[ids]) and "_velotune_rows" not in emb.__dict__
    loss = model(**batch).loss
    loss.backward()
    assert torch.equal(loss, ref_loss)
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, ref_grads[n]), n


@pytest.mark.gpu
def test_gpu_host_gather_reuses_one_pinned_buffer(monkeypatch):
    """Ids on the host (the host path): the rows go through the module's own pinned buffer; a second
    lookup (other ids) reuses it only after the first copy finished; both are the table's rows."""
    model = mini_model("llama").cuda()
    model.requires_grad_(False)
    table = model.get_input_embeddings().weight.detach().clone()
    emb = offload_input_embeddings(model)
    ids1 = torch.randint(0, table.shape[0], (2, 64))
    ids2 = torch.randint(0, table.shape[0], (2, 64))
    out1 = emb(ids1)
    buf = emb._velotune_rows[0]
    out2 = emb(ids2)
    torch.cuda.synchronize()
    assert emb._velotune_rows[0].data_ptr() == buf.data_ptr() and buf.is_pinned()
    assert torch.equal(out1, table[ids1.cuda()]) and torch.equal(out2, table[ids2.cuda()])


def test_a_deep_copied_model_trains_on_its_own_parameters():
    """`copy.deepcopy` of a velotune LoRA model (offloaded checkpointing: its host-buffer pool is not
    copyable, so a copy gets its own): the copy's step gives the same loss and fills the copy's
    gradients only."""
    model = _lora(False)
    twin = copy.deepcopy(model)
    loss, grads = _loss_and_grads(twin)
    assert all(p.grad is None for p in model.parameters())
    ref_loss, ref_grads = _loss_and_grads(model)
    assert torch.equal(loss, ref_loss) and grads.keys() == ref_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name
