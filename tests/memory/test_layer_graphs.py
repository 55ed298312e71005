"""Decoder layers replayed as (CUDA) graphs: velotune.memory.layer_graphs.

On the CPU the captured closures run eagerly through the same static buffers, so these tests check
the plumbing (static inputs and outputs shared by layers, rotary/mask kwargs, the offload of the
layer input, LoRA gradients handed to autograd, re-capture and fall-backs) for exactness against
offloaded checkpointing without graphs. The GPU test (tests/kernels/test_gpu.py) checks real graphs.
"""

from __future__ import annotations

import pytest
import torch

from mini import fixed_batch, mini_model
from velotune import FastLanguageModel
from velotune.models import prepare_model

N_LAYERS = 2
# get_peft_model settings of every graphed-vs-eager pair here and in test_saved_graphs.py (fixed shapes)
GRAPHED_LORA = dict(r=8, lora_alpha=16, use_gradient_checkpointing="unsloth", random_state=5, padding_free=False)


def _lora(cuda_graphs: bool, dropout: float = 0.0, family: str = "llama"):
    model = mini_model(family, num_hidden_layers=N_LAYERS)
    prepare_model(model, max_seq_length=64)
    model = FastLanguageModel.get_peft_model(
        model, lora_dropout=dropout, cuda_graphs=cuda_graphs, recompute="layer", **GRAPHED_LORA
    )
    with torch.no_grad():  # non-zero B: every adapter gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def _train(model, steps: int, batches):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = []
    for i in range(steps):
        loss = model(**batches[i % len(batches)]).loss
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        opt.step()  # adapters change in place: the graphs must read the new values
        opt.zero_grad(set_to_none=True)
    return out


def _two_batches():
    """Same shapes, different kwarg values: other padding (the 4D mask) and shifted positions (the
    rotary tables), so the graphs' static kwargs must be refilled between steps."""
    first, second = fixed_batch(seed=1), fixed_batch(seed=2, pad_last=5)
    for b, shift in ((first, 0), (second, 3)):
        b["position_ids"] = torch.arange(b["input_ids"].shape[1]).expand_as(b["input_ids"]) + shift
    return [first, second]


# gemma2: sandwich norms, full recompute; qwen3: q/k head norms
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "qwen3", "gemma3_text"])
def test_graphed_layers_train_bit_identically(family):
    batches = _two_batches()
    ref = _train(_lora(False, family=family), 4, batches)
    model = _lora(True, family=family)
    before = {n: p for n, p in model.named_parameters()}
    got = _train(model, 4, batches)
    # the fresh leaves used inside the graphs are swapped out again: the modules hold the real parameters
    assert all(p is before[n] for n, p in model.named_parameters())
    stats = model.velotune_layer_graphs.stats
    assert stats["captured"] == N_LAYERS  # step 2 captures, steps 3-4 replay
    assert stats["replayed"] == 3 * N_LAYERS and stats["eager"] == N_LAYERS
    offload = model.velotune_offload_stats
    assert offload.packed == 4 * N_LAYERS and offload.unpacked == 4 * N_LAYERS  # the input still goes to host
    for (loss_g, grads_g), (loss_r, grads_r) in zip(got, ref):
        assert torch.equal(loss_g, loss_r)
        assert grads_g.keys() == grads_r.keys() and len(grads_g) == 2 * 7 * N_LAYERS
        for name in grads_r:
            assert torch.equal(grads_g[name], grads_r[name]), name


def test_gradient_accumulation_adds_into_existing_grads():
    batches = _two_batches()
    results = []
    for graphs in (False, True):
        model = _lora(graphs)
        _train(model, 2, batches)  # warm-up + capture
        for b in batches:  # two micro-batches, one .grad
            model(**b).loss.backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert all(torch.equal(results[1][n], results[0][n]) for n in results[0])


def test_second_shape_recaptures_and_other_states_fall_back():
    model = _lora(True)
    ref = _lora(False)
    batch = fixed_batch()
    _train(model, 2, [batch])
    _train(ref, 2, [batch])
    graphs = model.velotune_layer_graphs
    assert graphs.stats["captured"] == N_LAYERS
    longer = fixed_batch(seq=20)  # a second shape: its own warm-up and capture
    for _ in range(3):
        a, b = model(**longer).loss, ref(**longer).loss
        assert torch.equal(a, b)
        a.backward(), b.backward()
    assert graphs.stats["captured"] == 2 * N_LAYERS
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, dict(ref.named_parameters())[name].grad), name
    eager = graphs.stats["eager"]
    with model.disable_adapter(), ref.disable_adapter():  # another PEFT state: over MAX_SIGNATURES
        loss, want = model(**batch).loss, ref(**batch).loss  # per layer, so it runs eagerly
    assert torch.equal(loss, want) and graphs.stats["eager"] == eager + N_LAYERS
    assert graphs.stats["captured"] == 2 * N_LAYERS


def test_not_graphed_with_dropout_and_refused_without_offload():
    model = _lora(True, dropout=0.1)
    _train(model, 3, [fixed_batch()])
    assert model.velotune_layer_graphs.stats["captured"] == 0
    m = mini_model("llama", num_hidden_layers=1)
    with pytest.raises(ValueError, match="cuda_graphs=True needs use_gradient_checkpointing='unsloth'"):
        FastLanguageModel.get_peft_model(m, r=4, use_gradient_checkpointing=True, cuda_graphs=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_on_gpu_are_bit_identical(dtype):
    """Real CUDA graphs (capture on step 2, replay after), the Triton kernels: losses and every LoRA
    gradient over 4 AdamW steps equal offloaded checkpointing without graphs. SDPA's math backend:
    the fused backends' backward may accumulate with atomics (not bit-reproducible run to run)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batches = [{k: v.cuda() for k, v in b.items()} for b in _two_batches()]
    runs = []
    for graphs in (False, True):
        model = mini_model("llama", num_hidden_layers=N_LAYERS, dtype=dtype).cuda()
        prepare_model(model, max_seq_length=64)
        model = FastLanguageModel.get_peft_model(model, cuda_graphs=graphs, recompute="layer", **GRAPHED_LORA)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1, generator=torch.Generator("cuda").manual_seed(len(n)))
        with sdpa_kernel(SDPBackend.MATH):
            runs.append(_train(model, 4, batches))
        if graphs:
            assert model.velotune_layer_graphs.stats["captured"] == N_LAYERS
    for (loss_g, grads_g), (loss_r, grads_r) in zip(runs[1], runs[0]):
        assert torch.equal(loss_g, loss_r)
        for name in grads_r:
            assert torch.equal(grads_g[name], grads_r[name]), name


def test_a_failed_capture_warns_and_trains_on_eagerly(monkeypatch):
    from velotune.memory import layer_graphs

    def broken(self, pool, side=None):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(layer_graphs.Entry, "capture", broken)
    batches = _two_batches()
    model = _lora(True)
    with pytest.warns(UserWarning, match="capture of a decoder layer failed"):
        got = _train(model, 3, batches)
    ref = _train(_lora(False), 3, batches)
    assert model.velotune_layer_graphs.disabled and model.velotune_layer_graphs.stats["captured"] == 0
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, ref))
