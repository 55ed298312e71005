"""offload_every=k (memory/sparse_offload.py): only every k-th layer input goes to host memory, the
layers between are recomputed from it in backward; losses and every gradient are the same bits (fp32)
as offloading every input, dropout included; "auto" picks k from a host budget."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from mini import fixed_batch, mini_model, save_mini_model
from velotune.memory.checkpointing import enable_offloaded_checkpointing
from velotune.memory.sparse_offload import choose_offload_every

pytestmark = pytest.mark.usefixtures("one_thread")
N_LAYERS = 5


def _peft(dropout=0.0):
    model = mini_model("llama", num_hidden_layers=N_LAYERS)
    peft = get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
    )
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    peft.train()
    return peft


def _step(model, batch, forwards=1):
    torch.manual_seed(123)
    loss = sum(model(**batch).loss for _ in range(forwards))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _same(a, b):
    assert torch.equal(a[0], b[0])
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("every", [2, 3, N_LAYERS])
def test_same_bits_as_offloading_every_input(every, dropout):
    batch = fixed_batch()
    ref_model = _peft(dropout)
    enable_offloaded_checkpointing(ref_model)
    ref = _step(ref_model, batch)
    model = _peft(dropout)
    stats = enable_offloaded_checkpointing(model, offload_every=every)
    got = _step(model, batch)
    _same(got, ref)
    kept = math.ceil(N_LAYERS / every)
    assert stats.packed == kept and stats.unpacked == kept and stats.offload_every == every
    assert stats.recomputed_layers == N_LAYERS - kept
    per_layer = batch["input_ids"].numel() * 64 * 4
    assert stats.bytes_offloaded == kept * per_layer and stats.host_needed == kept * per_layer
    _same(_step(model, batch), ref)  # a second step: nothing stale


def test_two_forwards_before_one_backward():
    batch = fixed_batch()
    ref_model = _peft(0.1)
    enable_offloaded_checkpointing(ref_model)
    model = _peft(0.1)
    stats = enable_offloaded_checkpointing(model, offload_every=2)
    _same(_step(model, batch, forwards=2), _step(ref_model, batch, forwards=2))
    assert stats.packed == 2 * 3 and stats.recomputed_layers == 2 * 2


def test_auto_picks_k_from_the_host_budget():
    batch = fixed_batch()
    per_layer = batch["input_ids"].numel() * 64 * 4
    ref_model = _peft()
    enable_offloaded_checkpointing(ref_model)
    ref = _step(ref_model, batch)
    for budget, k in ((N_LAYERS * per_layer, 1), (2 * per_layer + 1, 3), (per_layer // 2, N_LAYERS)):
        model = _peft()
        stats = enable_offloaded_checkpointing(model, offload_every="auto", host_budget=budget)
        _same(_step(model, batch), ref)
        assert stats.offload_every == k and stats.host_budget == budget
        assert stats.packed == math.ceil(N_LAYERS / k)
    model = _peft()
    stats = enable_offloaded_checkpointing(model, offload_every="auto")  # the host's own memory
    _same(_step(model, batch), ref)
    assert stats.offload_every == 1 and stats.host_budget > 0


def test_choose_offload_every_and_bad_arguments():
    assert choose_offload_every(80, 10, 800) == 1
    assert choose_offload_every(80, 10, 799) == 2
    assert choose_offload_every(80, 10, 400) == 2 and choose_offload_every(80, 10, 399) == 3
    assert choose_offload_every(80, 10, 9) == 80
    for bad in (0, -1, 1.5, True, "all"):
        with pytest.raises(ValueError, match="offload_every"):
            enable_offloaded_checkpointing(_peft(), offload_every=bad)
    with pytest.raises(ValueError, match="recompute='layer'"):
        enable_offloaded_checkpointing(_peft(), offload_every=2, recompute="mlp")


def test_velotune_model_same_bits(tmp_path):
    """Through FastLanguageModel (velotune's fused layers), QLoRA-free fp32."""
    from velotune import FastLanguageModel

    path = save_mini_model("llama", tmp_path, num_hidden_layers=N_LAYERS)
    batch = fixed_batch()
    out = {}
    for every in (1, 2):
        model, _ = FastLanguageModel.from_pretrained(path, dtype=torch.float32)
        model = FastLanguageModel.get_peft_model(
            model, r=4, lora_alpha=8, use_gradient_checkpointing="unsloth", recompute="layer", offload_every=every
        )
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        model.train()
        out[every] = _step(model, batch)
        assert model.velotune_offload_stats.packed == math.ceil(N_LAYERS / every)
    _same(out[2], out[1])
    with pytest.raises(ValueError, match="offload_every"):
        FastLanguageModel.get_peft_model(
            FastLanguageModel.from_pretrained(path, dtype=torch.float32)[0],
            use_gradient_checkpointing=True,
            offload_every=2,
        )


@pytest.mark.gpu
def test_same_bits_on_gpu():
    """Real pinned copies and side streams: offload_every=2 and 3 against every input offloaded (eager
    attention, fp32: deterministic kernels), the anchors prefetched one ahead."""
    batch = {k: v.cuda() for k, v in fixed_batch(seq=64, pad_last=0).items()}
    out = {}
    for every in (1, 2, 3):
        model = mini_model("llama", num_hidden_layers=N_LAYERS, attn_implementation="eager").cuda()
        model = get_peft_model(
            model,
            LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
        )
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        model.train()
        stats = enable_offloaded_checkpointing(model, offload_every=every)
        out[every] = _step(model, batch)
        kept = math.ceil(N_LAYERS / every)
        assert stats.packed == kept and stats.unpacked == kept and stats.prefetched >= kept - 1
    _same(out[2], out[1])
    _same(out[3], out[1])
