"""Offloaded gradient checkpointing gives the same loss and gradients as plain checkpointing and as
no checkpointing; the offload path really runs (counters), and it can be switched off again.

CPU: the same code runs with a CPU copy as the "host" target. The GPU test exercises the streams.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from mini import fixed_batch, mini_model
from velotune.memory.checkpointing import disable_offloaded_checkpointing, enable_offloaded_checkpointing

N_LAYERS = 3


def _peft(device="cpu", dropout=0.0, **model_kw):
    model = mini_model("llama", num_hidden_layers=N_LAYERS, **model_kw).to(device)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]
    )
    peft = get_peft_model(model, config)
    with torch.no_grad():  # non-zero B so every adapter gets gradients
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    peft.train()
    return peft


def _step(model, mode, batch):
    if mode == "plain":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif mode == "offload":
        enable_offloaded_checkpointing(model)
    torch.manual_seed(123)  # dropout masks
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_offload_equals_plain_and_no_checkpointing(dropout):
    batch = fixed_batch()
    results = {}
    for mode in ("none", "plain", "offload"):
        model = _peft(dropout=dropout)
        results[mode] = _step(model, mode, batch)
        if mode == "offload":
            stats = model.velotune_offload_stats
            assert stats.packed == N_LAYERS and stats.unpacked == N_LAYERS
            assert stats.bytes_offloaded == N_LAYERS * batch["input_ids"].numel() * 64 * 4
    loss_o, g_o = results["offload"]
    loss_p, g_p = results["plain"]
    loss_n, g_n = results["none"]
    assert len(g_o) == 2 * 4 * N_LAYERS
    assert torch.equal(loss_o, loss_p) and all(torch.equal(g_o[k], g_p[k]) for k in g_p)  # bit-identical
    torch.testing.assert_close(loss_o, loss_n, rtol=1e-6, atol=0)
    for k in g_n:
        torch.testing.assert_close(g_o[k], g_n[k], rtol=1e-5, atol=1e-7)


def test_disable_and_repeated_steps():
    batch = fixed_batch()
    model = _peft()
    stats = enable_offloaded_checkpointing(model)
    loss1, g1 = _step(model, "offload-already", batch)
    loss2, g2 = _step(model, "offload-already", batch)  # a second step reuses nothing stale
    assert torch.equal(loss1, loss2) and all(torch.equal(g1[k], g2[k]) for k in g1)
    assert stats.packed == 2 * N_LAYERS
    with torch.no_grad():  # no graph, nothing saved
        model(**batch)
    assert stats.packed == 2 * N_LAYERS
    disable_offloaded_checkpointing(model)
    loss3, _ = _step(model, "none", batch)
    assert stats.packed == 2 * N_LAYERS and torch.equal(loss3, loss1)
    assert not hasattr(model, "velotune_offload_stats")
    with pytest.raises(ValueError, match="no transformers decoder layers"):
        enable_offloaded_checkpointing(torch.nn.Linear(2, 2))


def test_offload_in_host_chunks_is_exact(monkeypatch):
    """Host copies split into many chunks (as for a long context) come back bit-identical."""
    import velotune.memory.host_copies as host_copies

    batch = fixed_batch()
    ref = _step(_peft(), "plain", batch)
    monkeypatch.setattr(host_copies, "HOST_CHUNK_BYTES", 1000)  # not a multiple of the row size either
    model = _peft()
    loss, grads = _step(model, "offload", batch)
    assert model.velotune_offload_stats.unpacked == N_LAYERS
    assert torch.equal(loss, ref[0]) and all(torch.equal(grads[k], ref[1][k]) for k in ref[1])
    assert host_copies._chunks(torch.arange(600.0)) == [(0, 250), (250, 500), (500, 600)]  # 1000 B / 4 B


def test_offloaded_layer_inputs_are_released_after_forward():
    """The point of offloading: once a layer's input is copied out, nothing keeps the original
    alive until backward (a pack hook closing over it once did, for every layer: the GPU held all
    of them while the host held copies)."""
    import gc
    import weakref

    batch = fixed_batch()
    model = _peft()
    enable_offloaded_checkpointing(model)
    inputs = []
    hooks = [
        layer.register_forward_pre_hook(lambda m, args: inputs.append(weakref.ref(args[0])))
        for layer in model.base_model.model.model.layers
    ]
    loss = model(**batch).loss
    for h in hooks:
        h.remove()
    gc.collect()
    assert len(inputs) == N_LAYERS and model.velotune_offload_stats.packed == N_LAYERS
    assert [r() is None for r in inputs] == [True] * N_LAYERS
    loss.backward()  # and backward still finds every input (restored from the host copies)
    assert model.velotune_offload_stats.unpacked == N_LAYERS


@pytest.mark.gpu
def test_offload_streams_on_gpu():
    """Real pinned-memory copies on side streams, prefetching one layer ahead: bit-identical to plain
    checkpointing (eager attention, fp32: deterministic kernels)."""
    batch = {k: v.cuda() for k, v in fixed_batch(seq=64, pad_last=0).items()}
    out = {}
    for mode in ("plain", "offload"):
        model = _peft("cuda", attn_implementation="eager")
        out[mode] = _step(model, mode, batch)
        if mode == "offload":
            s = model.velotune_offload_stats
            assert s.packed == N_LAYERS and s.unpacked == N_LAYERS and s.prefetched == N_LAYERS - 1
    assert torch.equal(out["offload"][0], out["plain"][0])
    assert all(torch.equal(out["offload"][1][k], out["plain"][1][k]) for k in out["plain"][1])


def test_host_pool_reuses_buffers_and_refuses_clearly_when_the_host_is_full():
    """HostPool with CPU stand-ins for pinning (the real one pins, CUDA only): reuse by size class,
    bookkeeping, and a clear MemoryError (naming recompute='layer') instead of an OOM kill."""
    from velotune.memory.host_copies import HostPool

    made = []

    def alloc(n, dtype):
        made.append(n)
        return torch.empty(n, dtype=dtype)

    pool = HostPool(alloc=alloc, available=lambda: 64 * 2**30)
    a = pool.get(1000, torch.bfloat16, None)  # rounded up to one MiB
    assert a.numel() == 1000 and made == [2**19] and pool.in_use == 2**20
    pool.put([a], None)
    b = pool.get(5000, torch.bfloat16, None)  # same size class: the same buffer again
    assert made == [2**19] and b.data_ptr() == a.data_ptr() and pool.high_water == 2**20
    small = HostPool(alloc=alloc, available=lambda: 3 * 2**30)
    with pytest.raises(MemoryError, match="recompute='layer'"):
        small.get(2**30 // 2 + 1, torch.bfloat16, None)  # 1 GiB + 2 GiB headroom > 3 GiB
    assert small.in_use == 0

    def failing(n, dtype):
        raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(MemoryError, match="pinning failed"):
        HostPool(alloc=failing, available=lambda: None).get(10, torch.float32, None)
