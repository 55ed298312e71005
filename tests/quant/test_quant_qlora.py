"""`load_in_4bit=True` end to end on a mini Llama: what is quantised and what is not, pre-quantised
checkpoints, get_base_weight's buffers, dequantise-for-merge, and QLoRA parity with stock
transformers + PEFT run on the same dequantised weights.
"""

from __future__ import annotations

import pytest
import torch

from mini import fixed_batch, save_mini_model

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbF  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from velotune import FastLanguageModel  # noqa: E402
from velotune.errors import ModelLoadError  # noqa: E402
from velotune.quant import (  # noqa: E402
    dequantize_model_weights,
    dequantize_weight,
    get_base_weight,
    is_4bit,
    quantization_config_for,
)
from velotune.quant.weights import BUFFER_SLOTS, WEIGHT_BUFFERS  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    # intermediate_size a multiple of the 64-element block: bitsandbytes 0.50's CPU dequantisation
    # kernel misreads the absmax of rows whose length is not (its own quantiser, its PyTorch backend
    # and velotune agree; see test_quant_nf4.py), and the stock side here runs on that kernel.
    return save_mini_model("llama", tmp_path_factory.mktemp("mini"), intermediate_size=128)


def _load4(path, dtype=torch.float32, **kw):
    return FastLanguageModel.from_pretrained(path, dtype=dtype, load_in_4bit=True, **kw)


def test_only_decoder_linears_are_quantised(llama_dir):
    model, _ = _load4(llama_dir, dtype=torch.bfloat16)
    linears = [(n, m) for n, m in model.named_modules() if n.endswith(tuple(TARGETS))]
    assert len(linears) == 2 * 7 and all(type(m).__name__ == "Linear4bit" for _, m in linears)
    assert all(m.weight.dtype == torch.uint8 and m.weight.quant_state.nested for _, m in linears)
    assert all(m.weight.quant_state.quant_type == "nf4" and m.compute_dtype == torch.bfloat16 for _, m in linears)
    # Every floating-point tensor the model holds is an embedding, a norm or lm_head, in 16-bit:
    # no hidden full-precision copy of a quantised weight.
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and "rotary_emb" not in name:
            assert any(k in name for k in ("embed_tokens", "norm", "lm_head")), name
            assert t.dtype == torch.bfloat16, name


def test_prequantised_checkpoint_loads(llama_dir, tmp_path):
    model, tok = _load4(llama_dir, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "mini-bnb-4bit")
    tok.save_pretrained(tmp_path / "mini-bnb-4bit")
    ids = fixed_batch()["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    for load_in_4bit in (True, False):  # the checkpoint's own quantization_config is honoured either way
        again, _ = FastLanguageModel.from_pretrained(
            tmp_path / "mini-bnb-4bit", dtype=torch.bfloat16, load_in_4bit=load_in_4bit
        )
        q0, q1 = model.model.layers[1].mlp.down_proj, again.model.layers[1].mlp.down_proj
        assert is_4bit(q1) and q1.compute_dtype == torch.bfloat16
        assert torch.equal(q0.weight.data, q1.weight.data)
        assert torch.equal(dequantize_weight(q0), dequantize_weight(q1))
        with torch.no_grad():
            assert torch.equal(again(input_ids=ids).logits, ref)


def test_quantization_config_errors():
    class Cfg:
        quantization_config = {"quant_method": "gptq", "bits": 4}

    with pytest.raises(ModelLoadError, match="already quantised"):
        quantization_config_for(torch.bfloat16, Cfg())
    Cfg.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}
    with pytest.raises(ModelLoadError, match="NF4"):
        quantization_config_for(torch.bfloat16, Cfg())


def test_get_base_weight_buffers_and_dequantize_for_merge(llama_dir):
    model, _ = _load4(llama_dir, dtype=torch.bfloat16)
    q = model.model.layers[0].self_attn.q_proj
    expected = bnbF.dequantize_4bit(q.weight.data, q.weight.quant_state)
    others = [model.model.layers[i].self_attn.k_proj for i in (0, 1)]  # same shape as each other
    WEIGHT_BUFFERS.clear()
    first = get_base_weight(q)
    assert torch.equal(first, expected) and first.dtype == torch.bfloat16 and not first.requires_grad
    views = [get_base_weight(m) for m in others + [q]]
    ptrs = [first.data_ptr()] + [v.data_ptr() for v in views]
    assert len(set(ptrs[:BUFFER_SLOTS])) == BUFFER_SLOTS and ptrs[BUFFER_SLOTS] == ptrs[0]  # ring reuse
    assert torch.equal(views[-1], expected)
    assert WEIGHT_BUFFERS.nbytes() == BUFFER_SLOTS * expected.numel() * 2
    # A repeat call for the weight a slot still holds: that slot, no new dequantisation (a write
    # would bump the version), and it counts as the slot's use for the ring.
    version = views[-1]._version
    again = get_base_weight(q)
    assert again.data_ptr() == views[-1].data_ptr() and again._version == version and torch.equal(again, expected)
    k1 = get_base_weight(others[1])  # still in the other slot: a hit too
    assert k1.data_ptr() == views[1].data_ptr() and torch.equal(
        k1, bnbF.dequantize_4bit(others[1].weight.data, others[1].weight.quant_state)
    )
    before = k1._version
    with WEIGHT_BUFFERS.graph_local():  # e.g. a CUDA-graph capture: buffers of its own
        local = get_base_weight(q)
        assert local.data_ptr() not in ptrs and torch.equal(local, expected)
        assert get_base_weight(q).data_ptr() == local.data_ptr()  # reuse within it
        assert WEIGHT_BUFFERS.nbytes() == expected.numel() * 2  # only its own, so far
        WEIGHT_BUFFERS.drop_local()  # what nothing reads again leaves the graph's pool
        assert WEIGHT_BUFFERS.nbytes() == 0 and torch.equal(local, expected)  # a held view stays valid
        assert get_base_weight(q).data_ptr() != local.data_ptr()  # a miss: dequantised anew
    WEIGHT_BUFFERS.drop_local()  # outside graph_local: nothing happens
    # outside again: the persistent slots, and what they hold, untouched
    assert WEIGHT_BUFFERS.nbytes() == BUFFER_SLOTS * expected.numel() * 2
    back = get_base_weight(others[1])
    assert back.data_ptr() == views[1].data_ptr() and back._version == before
    # Plain autograd saving a buffer view, then the buffer being reused: an error, never silent.
    x = torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True)
    y = (x @ get_base_weight(q).t()).sum()
    for m in others:
        get_base_weight(m)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    # Plain layers: the weight itself; merge helpers: fresh fp32 copies, exact widening.
    lm = model.lm_head
    assert get_base_weight(lm) is lm.weight
    merged = dequantize_model_weights(model)
    assert len(merged) == 14 and merged["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    assert torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], expected.float())


def test_get_base_weight_follows_changes_to_the_weight(llama_dir):
    """The NF4 view cached on the weight (reused every call) must notice a new quant state or a new
    weight object and give the new values, never stale ones."""
    import copy

    model, _ = _load4(llama_dir, dtype=torch.bfloat16)
    q = model.model.layers[0].self_attn.q_proj
    first = get_base_weight(q).clone()
    assert torch.equal(get_base_weight(q), first)  # the cached view gives the same values
    qs = copy.copy(q.weight.quant_state)  # a new state: every absmax shifted
    qs.offset = q.weight.quant_state.offset + 0.25
    q.weight.quant_state = qs
    changed = get_base_weight(q)
    assert torch.equal(changed, bnbF.dequantize_4bit(q.weight.data, qs)) and not torch.equal(changed, first)
    other = model.model.layers[1].self_attn.q_proj  # a different weight object on this layer
    q.weight = other.weight
    assert torch.equal(get_base_weight(q), bnbF.dequantize_4bit(other.weight.data, other.weight.quant_state))


def _copy_lora(src, dst):
    with torch.no_grad():
        s = dict(src.named_parameters())
        for n, p in dst.named_parameters():
            if "lora_" in n:
                p.copy_(s[n])


# dequantisations per step of the 2-layer model (7 weights a layer): forward 7, recompute 6 ("layer")
# or 2 ("mlp": gate and up), backward 7 less gate and up, which the recompute left in the buffers
# (the order is down, [recompute], gate, up, o, q, k, v); the last layer's down projection is still in a
# buffer from forward when backward starts; the first layer's q/k/v need no dX (frozen embeddings).
DEQUANTS = {False: 2 * (7 + 7) - 1 - 3, "unsloth": 2 * (7 + 6 + 5) - 1 - 3, "mlp": 2 * (7 + 2 + 5) - 1 - 3}


@pytest.mark.parametrize("checkpointing", [False, "unsloth", "mlp"])
def test_qlora_matches_stock_peft_on_dequantised_weights(llama_dir, checkpointing, monkeypatch):
    """velotune QLoRA == transformers + PEFT on a float32 model holding the dequantised weights."""
    import velotune.quant.weights as weights

    model4, _ = _load4(llama_dir)
    mode = "unsloth" if checkpointing == "mlp" else checkpointing
    peft4 = FastLanguageModel.get_peft_model(
        model4,
        r=8,
        lora_alpha=16,
        target_modules=TARGETS,
        use_gradient_checkpointing=mode,
        random_state=0,
        recompute="mlp" if checkpointing == "mlp" else "layer",
    )
    dequants = []
    real = weights.dequantize_nf4
    monkeypatch.setattr(weights, "dequantize_nf4", lambda *a, **k: dequants.append(1) or real(*a, **k))
    with torch.no_grad():  # non-zero B: every adapter gets a gradient
        for n, p in peft4.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)

    stock = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    with torch.no_grad():  # bitsandbytes' own dequantisation, not ours
        for name, m in model4.named_modules():
            if is_4bit(m):
                w = bnbF.dequantize_4bit(m.weight.data, m.weight.quant_state)
                stock.get_submodule(name.replace(".base_layer", "")).weight.copy_(w)
    stock = get_peft_model(stock, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    _copy_lora(peft4, stock)

    batch = fixed_batch()
    losses, grads = [], []
    for m in (peft4, stock):
        m.train()
        WEIGHT_BUFFERS.clear()  # no reuse of what the other model dequantised
        loss = m(**batch).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert len(dequants) == DEQUANTS[checkpointing]
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) == 2 * 2 * 7
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
    for n, g in grads[1].items():
        assert grads[0][n].abs().sum() > 0, n
        torch.testing.assert_close(grads[0][n].float(), g.float(), rtol=1e-5, atol=1e-6, msg=n)
    if checkpointing == "unsloth":
        assert peft4.velotune_offload_stats.packed == 2 == peft4.velotune_offload_stats.unpacked


def test_nf4_view_is_cached_per_weight_and_follows_its_storage(llama_dir):
    from velotune.quant import nf4_weight

    model, _ = _load4(llama_dir, dtype=torch.bfloat16)
    q = model.model.layers[0].self_attn.q_proj
    first = nf4_weight(q)
    assert nf4_weight(q) is first  # no re-wrapping per training-step read
    before = get_base_weight(q).clone()
    # New packed data (as after moving the weight): the cache notices and the values follow it.
    flipped = (q.weight.data ^ 0x11).clone()
    q.weight.data = flipped
    again = nf4_weight(q)
    assert again is not first and again.packed.data_ptr() == flipped.data_ptr()
    assert not torch.equal(get_base_weight(q), before)
    assert torch.equal(get_base_weight(q), bnbF.dequantize_4bit(q.weight.data, q.weight.quant_state))


def test_first_forward_in_inference_mode_then_training(llama_dir):
    """A QLoRA model's first forward under torch.inference_mode() (e.g. a generation before training)
    must leave nothing behind that training cannot use: the weight buffers and the cached NF4 views
    are made as normal tensors. The model then trains exactly as one whose first forward was a
    training step."""
    batch = fixed_batch()
    results = []
    for first_in_inference_mode in (True, False):
        model4, _ = _load4(llama_dir)
        peft4 = FastLanguageModel.get_peft_model(
            model4, r=8, lora_alpha=16, target_modules=TARGETS, use_gradient_checkpointing=False, random_state=0
        )
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for n, p in peft4.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
        peft4.train()  # dropout 0; bitsandbytes' CPU eval path would repack the NF4 weights in place
        WEIGHT_BUFFERS.clear()  # the slots are made by the first forward of this model
        if first_in_inference_mode:
            with torch.inference_mode():
                inference_logits = peft4(input_ids=batch["input_ids"]).logits
            assert WEIGHT_BUFFERS.nbytes() > 0
        loss = peft4(**batch).loss
        loss.backward()
        with torch.inference_mode():  # and back again after training
            after = peft4(input_ids=batch["input_ids"]).logits
        with torch.no_grad():
            plain = peft4(input_ids=batch["input_ids"]).logits
        grads = {n: p.grad for n, p in peft4.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
        assert torch.equal(after, plain)
        if first_in_inference_mode:
            assert torch.equal(inference_logits, plain)
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and set(grads_a) == set(grads_b) and len(grads_a) == 2 * 2 * 7
    for n, g in grads_b.items():
        assert g.abs().sum() > 0 and torch.equal(grads_a[n], g), n
