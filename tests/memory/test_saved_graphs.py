"""Graphs of recompute="mlp" layers (velotune.memory.saved_graphs): forward and MLP-only backward
replayed over two shared buffer sets of saved tensors.

On the CPU the captured closures run eagerly over the same buffers, so these tests check what the
graphs depend on: every tensor backward reads is refilled before a replay (adapters change between
steps, kwargs change between batches, the sets alternate between layers and come back from host
memory), and nothing of the capture-time values is read again. The GPU test checks real graphs.
"""

from __future__ import annotations

import weakref

import pytest
import torch

from mini import fixed_batch, mini_model
from test_layer_graphs import GRAPHED_LORA, _train, _two_batches
from velotune import FastLanguageModel
from velotune.models import prepare_model

N_LAYERS = 3  # layer 0's set is overwritten by layer 2's: backward must bring it back from host memory


def _lora(
    graphs: bool,
    family: str = "llama",
    device: str = "cpu",
    dtype=torch.float32,
    layers: int = N_LAYERS,
    row_blocks: int = 1,
):
    model = mini_model(family, num_hidden_layers=layers, dtype=dtype).to(device)
    prepare_model(model, max_seq_length=64)
    model = FastLanguageModel.get_peft_model(
        model, cuda_graphs=graphs, recompute="mlp", mlp_row_blocks=row_blocks, **GRAPHED_LORA
    )
    with torch.no_grad():  # non-zero B: every adapter gets a gradient that depends on the activations
        g = torch.Generator(device).manual_seed(3)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=g)
    return model


def _assert_same(got, ref, n_grads):
    for (loss_g, grads_g), (loss_r, grads_r) in zip(got, ref):
        assert torch.equal(loss_g, loss_r)
        assert grads_g.keys() == grads_r.keys() and len(grads_g) == n_grads
        for name in grads_r:
            assert torch.equal(grads_g[name], grads_r[name]), name


def test_mlp_graphs_with_row_blocks_train_bit_identically_to_eager(monkeypatch):
    """The MLP in row blocks, forward and backward (get_peft_model(mlp_row_blocks=3), lora/recomputed_mlp.py):
    graphed and eager recompute="mlp" agree bit for bit, and both stay within fp32 rounding of one block."""
    from velotune.lora import recomputed_mlp

    batches = _two_batches()
    one = _train(_lora(False), 3, batches)
    rows, real_in = [], recomputed_mlp.mlp_in
    monkeypatch.setattr(recomputed_mlp, "mlp_in", lambda X, *a: rows.append(X.shape[0]) or real_in(X, *a))
    ref = _train(_lora(False, row_blocks=3), 3, batches)
    n = batches[0]["input_ids"].numel()
    assert set(rows) == {n // 3} and len(rows) == 2 * 3 * 3 * N_LAYERS  # forward and backward, 3 blocks,
    _assert_same(_train(_lora(True, row_blocks=3), 3, batches), ref, 2 * 7 * N_LAYERS)  # 3 steps, the layers
    assert abs(ref[0][0] - one[0][0]) <= 1e-6 * abs(one[0][0])  # the first loss
    for name, g in one[0][1].items():
        assert ((ref[0][1][name] - g).norm() / g.norm()).item() <= 1e-5, name


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "phi3"])
def test_mlp_graphs_train_bit_identically_to_eager_recompute_mlp(family):
    batches = _two_batches()
    ref = _train(_lora(False, family), 4, batches)
    model = _lora(True, family)
    before = {n: p for n, p in model.named_parameters()}
    got = _train(model, 4, batches)
    assert all(p is before[n] for n, p in model.named_parameters())  # the build's fresh leaves are swapped out
    graphs = model.velotune_layer_graphs
    assert graphs.stats == {"captured": N_LAYERS, "replayed": 3 * N_LAYERS, "eager": N_LAYERS}
    from velotune.memory.saved_graphs import SavedEntry

    entries = list(graphs.entries.values())
    assert all(isinstance(e, SavedEntry) for e in entries) and [e.parity for e in entries] == [0, 1, 0]
    assert entries[0].P is entries[2].P and entries[0].P is not entries[1].P  # two sets, shared
    # per replayed layer one set to host memory; in backward the last two layers' sets are still in place
    offload = model.velotune_offload_stats
    assert offload.packed == 3 * N_LAYERS and offload.prefetched == 3  # layer 0's set, once per replayed step
    n_grads = 2 * (7 if family != "phi3" else 4) * N_LAYERS
    _assert_same(got, ref, n_grads)


def test_six_layers_bring_back_every_set_but_the_last_two():
    """Six layers over two sets: in backward, layers 3..0 come back from host memory, each while the
    layer after it replays; a padded second batch (mask kwargs) in between."""
    batches = _two_batches()
    ref = _train(_lora(False, layers=6), 4, batches)
    model = _lora(True, layers=6)
    got = _train(model, 4, batches)
    assert model.velotune_layer_graphs.stats["captured"] == 6
    assert model.velotune_offload_stats.prefetched == 3 * 4  # 4 loads per replayed step
    _assert_same(got, ref, 2 * 7 * 6)


def test_a_set_not_brought_back_changes_the_result(monkeypatch):
    """The control for the test above: if backward read a set still holding another layer's tensors
    (layer 2's, in layer 0's backward), the gradients would differ."""
    from velotune.memory import saved_graphs

    batches = _two_batches()
    ref = _train(_lora(True), 4, batches)

    def skip_copy(self, rec):
        rec.entry.P.holds = weakref.ref(rec)

    monkeypatch.setattr(saved_graphs.SavedGraphRuns, "load", skip_copy)
    got = _train(_lora(True), 4, batches)
    assert torch.equal(got[0][0], ref[0][0])  # eager steps are unaffected
    assert not all(torch.equal(got[2][1][n], ref[2][1][n]) for n in ref[2][1])


@pytest.mark.parametrize("recompute", ["mlp", "layer", "mlp-2-blocks"])
def test_qlora_graphs_train_bit_identically_and_reuse_dequantisations(tmp_path, monkeypatch, recompute):
    """4-bit base weights: the graphs dequantise into the shared buffers, and within one graph the
    backward reuses the gate and up weights its MLP recompute just dequantised (`graph_local`), while
    nothing outside a graph trusts what a replay left in the buffers. With the MLP backward in row
    blocks the blocks after the first reuse them too."""
    import velotune.quant.weights as weights
    from mini import save_mini_model

    blocks = 2 if recompute == "mlp-2-blocks" else 1
    recompute = recompute.removesuffix("-2-blocks")

    dequants = []
    real = weights.dequantize_nf4
    monkeypatch.setattr(weights, "dequantize_nf4", lambda *a, **k: dequants.append(1) or real(*a, **k))
    path = save_mini_model("llama", tmp_path, num_hidden_layers=N_LAYERS, intermediate_size=128)
    runs = []
    for graphs in (False, True):
        model, _ = FastLanguageModel.from_pretrained(path, dtype=torch.float32, load_in_4bit=True)
        model = FastLanguageModel.get_peft_model(
            model, cuda_graphs=graphs, recompute=recompute, mlp_row_blocks=blocks, **GRAPHED_LORA
        )
        model.train()  # from_pretrained hands out eval mode: no checkpointing
        with torch.no_grad():
            g = torch.Generator().manual_seed(3)
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1, generator=g)
        runs.append(_train(model, 3, _two_batches()))
        if graphs:
            assert model.velotune_layer_graphs.stats["captured"] == N_LAYERS
            dequants.clear()
            _train(model, 1, _two_batches())  # one replayed step
            # the graphs dequantise into their own (pool) buffers: the persistent ones were let go
            assert weights.WEIGHT_BUFFERS.nbytes() == 0
            # per layer, "mlp": forward 7; backward down, the MLP recompute's gate and up (reused by
            # their backward), o, q, k, v -- dX for the first layer too (its graph takes x's gradient).
            # "layer": forward 7; backward's recompute 6 (no down), then 7: its down overwrites the
            # recomputed gate before gate's backward asks (the recompute runs before the backward here)
            assert len(dequants) == N_LAYERS * (14 if recompute == "mlp" else 20)
    _assert_same(runs[1], runs[0], 2 * 7 * N_LAYERS)


def test_gemma2_softcapped_layers_use_whole_layer_graphs():
    """Gemma 2's softcapped attention falls back to recompute="layer", and so to layer graphs."""
    from velotune.memory.saved_graphs import SavedEntry

    batches = _two_batches()
    ref = _train(_lora(False, "gemma2"), 3, batches)
    model = _lora(True, "gemma2")
    got = _train(model, 3, batches)
    entries = list(model.velotune_layer_graphs.entries.values())
    assert len(entries) == N_LAYERS and not any(isinstance(e, SavedEntry) for e in entries)
    _assert_same(got, ref, 2 * 7 * N_LAYERS)


def test_gradient_accumulation_and_a_second_shape():
    batches = _two_batches()
    results = []
    for graphs in (False, True):
        model = _lora(graphs)
        _train(model, 2, batches)  # warm-up + capture
        for b in batches + [fixed_batch(seq=20)]:  # micro-batches, one .grad; a new shape
            model(**b).loss.backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert all(torch.equal(results[1][n], results[0][n]) for n in results[0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_graphs_on_gpu_are_bit_identical(dtype):
    """Real CUDA graphs with the side-stream copies of the two sets: losses and every LoRA gradient
    over 4 AdamW steps equal eager recompute="mlp" (SDPA's math backend: deterministic)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batches = [{k: v.cuda() for k, v in b.items()} for b in _two_batches()]
    runs = []
    for graphs in (False, True):
        model = _lora(graphs, device="cuda", dtype=dtype)
        with sdpa_kernel(SDPBackend.MATH):
            runs.append(_train(model, 4, batches))
        if graphs:
            assert model.velotune_layer_graphs.stats["captured"] == N_LAYERS
            assert model.velotune_offload_stats.prefetched > 0
    _assert_same(runs[1], runs[0], 2 * 7 * N_LAYERS)


def test_a_forward_that_saves_differently_fails_the_capture_and_trains_on_eagerly(monkeypatch):
    """The forward graph copies by the build's plan; a forward that saves other tensors (here: one
    pack call fewer) must not be replayed: the capture fails, with a warning, and the layers run
    eagerly with the same results."""
    from velotune.memory import saved_graphs

    real = saved_graphs.SavedEntry._build

    def build_then_extra_call(self):
        real(self)
        self.plan.calls.append((False, []))

    monkeypatch.setattr(saved_graphs.SavedEntry, "_build", build_then_extra_call)
    batches = _two_batches()
    model = _lora(True)
    with pytest.warns(UserWarning, match="capture of a decoder layer failed.*fewer tensors"):
        got = _train(model, 3, batches)
    assert model.velotune_layer_graphs.disabled and model.velotune_layer_graphs.stats["captured"] == 0
    _assert_same(got, _train(_lora(False), 3, batches), 2 * 7 * N_LAYERS)


@pytest.mark.parametrize("recompute", ["mlp", "layer"])
def test_host_copies_are_released_by_backward_and_a_second_backward_is_refused(recompute):
    """A caller that keeps the step's loss (and so its graph) alive must not keep the step's host
    copies: they go back when backward is done, as autograd's own saved tensors do."""
    model = _lora(True)
    if recompute == "layer":
        from velotune.memory.checkpointing import enable_offloaded_checkpointing

        enable_offloaded_checkpointing(model, cuda_graphs=True)
    batch = fixed_batch()
    # the decoder's output, not the loss: the fused lm_head loss itself refuses a second backward
    decoder = model.get_base_model().model
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    for _ in range(2):  # its own kwargs: warm-up + capture
        decoder(**inputs).last_hidden_state.sum().backward()
    loss = decoder(**inputs).last_hidden_state.sum()
    ctxs = []
    node = loss.grad_fn
    seen = set()
    stack = [node]
    while stack:  # the graphed layers' autograd nodes
        n = stack.pop()
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        if "Graphed" in type(n).__name__:
            ctxs.append(n)
        stack.extend(f for f, _ in n.next_functions)
    assert len(ctxs) == N_LAYERS
    field = "rec" if recompute == "mlp" else "saved"
    assert all(getattr(c, field) is not None for c in ctxs)
    loss.backward(retain_graph=True)
    assert all(getattr(c, field) is None for c in ctxs)  # released, though `loss` lives on
    with pytest.raises(RuntimeError, match="differentiated a second time"):
        loss.backward()


def test_an_eager_layer_between_graphed_ones():
    """A layer that cannot be graphed (LoRA dropout in its q projection) runs eager recompute="mlp"
    between graphed neighbours: the sets still alternate by layer index, and everything equals the
    all-eager run (the same dropout masks: the RNG is drawn in the same order)."""
    batches = _two_batches()
    runs = []
    for graphs in (False, True):
        model = _lora(graphs, layers=4)
        model.base_model.model.model.layers[1].self_attn.q_proj.lora_dropout["default"] = torch.nn.Dropout(0.2)
        torch.manual_seed(21)
        runs.append(_train(model, 4, batches))
        if graphs:
            stats = model.velotune_layer_graphs.stats
            assert stats["captured"] == 3 and stats["eager"] == 4 + 3  # layer 1 always eager
            parities = sorted(e.parity for e in model.velotune_layer_graphs.entries.values())
            assert parities == [0, 0, 1]  # layers 0, 2 and 3
    _assert_same(runs[1], runs[0], 2 * 7 * 4)


@pytest.mark.parametrize("recompute", ["mlp", "layer"])
def test_a_replayed_layer_hands_its_gradients_over_in_one_copy(recompute):
    """A replayed layer's LoRA gradients become p.grad as views of one copy of the static gradient
    buffer (autograd keeps them: no copy per parameter), a separate copy per layer."""
    model = mini_model("llama", num_hidden_layers=2).to("cpu")
    prepare_model(model, max_seq_length=64)
    model = FastLanguageModel.get_peft_model(
        model,
        r=8,
        lora_alpha=16,
        use_gradient_checkpointing="unsloth",
        random_state=5,
        cuda_graphs=True,
        recompute=recompute,
    )
    batch = fixed_batch(seed=1)
    storages = []
    for _ in range(3):  # the first step runs eagerly, the second captures, the third replays
        model(**batch).loss.backward()
        per_layer = {}
        for n, p in model.named_parameters():
            if p.requires_grad:
                layer = int(n.split(".layers.")[1].split(".")[0])
                per_layer.setdefault(layer, set()).add(p.grad.untyped_storage().data_ptr())
        storages.append(per_layer)
        model.zero_grad(set_to_none=True)
    assert model.velotune_layer_graphs.stats["replayed"] == 2 * 2
    assert all(len(ptrs) > 1 for ptrs in storages[0].values())  # eager: a tensor per gradient
    last = storages[-1]
    assert all(len(ptrs) == 1 for ptrs in last.values()), last
    assert len({next(iter(ptrs)) for ptrs in last.values()}) == 2


def test_graphed_layers_pass_hidden_states_and_gradients_through_two_buffers():
    """Consecutive graphed layers are chained: each returns an alias of the buffer the next one reads
    (no copy in, no clone out), in forward and in backward, and layers alternate between the two."""
    model = _lora(True, layers=4)
    batches = _two_batches()
    _train(model, 2, batches)  # warm-up, capture
    graphs = model.velotune_layer_graphs
    (statics,) = graphs.statics.values()
    z = [b.data_ptr() for b in statics.z]
    outs, grads = [], []
    layers = model.get_base_model().model.layers

    def seen(module, args, y):
        outs.append(y.data_ptr())
        y.register_hook(lambda g: grads.append(g.data_ptr()))  # dy of this layer: the next one's dx

    hooks = [layer.register_forward_hook(seen) for layer in layers]
    try:
        model(**batches[0]).loss.backward()
    finally:
        for h in hooks:
            h.remove()
    assert outs == [z[0], z[1], z[0], z[1]]  # layer i writes y to z[i % 2]
    assert grads[1:] == [z[0], z[1], z[0]]  # and reads dy there: dx of layers 3, 2, 1
    assert grads[0] not in z  # the final norm's dx: copied in


def test_hidden_states_a_caller_keeps_are_not_overwritten(monkeypatch):
    """output_hidden_states keeps every layer's output, i.e. aliases of the two buffers that later
    layers overwrite: each gets its own copy first, so the graphed hidden states equal eager ones.
    The control: without that copy they would not."""
    from velotune.memory.graph_entry import Statics as _Statics

    batches = _two_batches()

    def hidden(graphs):
        model = _lora(graphs, layers=4)
        _train(model, 2, batches)
        out = model(**batches[0], output_hidden_states=True)
        out.loss.backward()
        return [h.detach().clone() for h in out.hidden_states], out.loss.detach()

    (ref, loss_ref), (got, loss_got) = hidden(False), hidden(True)
    assert len(got) == 5 and torch.equal(loss_got, loss_ref)
    assert all(torch.equal(g, r) for g, r in zip(got, ref))
    monkeypatch.setattr(_Statics, "before_write", lambda self, i: None)
    bad, _ = hidden(True)
    assert not all(torch.equal(g, r) for g, r in zip(bad, ref))


def test_two_forwards_then_one_backward(monkeypatch):
    """Two forwards (e.g. chosen and rejected batches) before one backward: the first forward's last
    hidden state, saved by the final norm, lives in a buffer the second forward overwrites; it gets
    its own copy first, so the gradients equal eager ones. The control: without that copy they differ."""
    from velotune.memory.graph_entry import Statics as _Statics

    batches = _two_batches()

    def run(graphs):
        model = _lora(graphs, layers=4)
        for _ in range(3):  # eager, capture, replay
            (model(**batches[0]).loss + model(**batches[1]).loss).backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            model.zero_grad(set_to_none=True)
        return grads

    ref, got = run(False), run(True)
    assert all(torch.equal(got[n], ref[n]) for n in ref)
    monkeypatch.setattr(_Statics, "before_write", lambda self, i: None)
    bad = run(True)
    assert not all(torch.equal(bad[n], ref[n]) for n in ref)
