"""recompute="mlp" (velotune.memory.saved_offload): the attention half's saved tensors go to host
memory, saved RMSNorm outputs are recomputed from their inputs, only the MLP is recomputed.
Same loss and gradients as plain checkpointing, bit for bit, on every family's fused path.

CPU: min_offload_bytes=0 so that the toy tensors take the offload path (a CPU "host" copy); the GPU
test runs the streams with the default threshold.
"""

from __future__ import annotations

import pytest
import torch

from mini import FAMILIES, fixed_batch, mini_model
from velotune import FastLanguageModel
from velotune.models import prepare_model
from velotune.memory.checkpointing import enable_offloaded_checkpointing


def _lora(family, checkpointing, device="cpu", dropout=0.0, **overrides):
    model = mini_model(family, **overrides).to(device)
    prepare_model(model, max_seq_length=64)
    model = FastLanguageModel.get_peft_model(
        model, r=8, lora_alpha=16, use_gradient_checkpointing=checkpointing, random_state=5, lora_dropout=dropout
    )
    with torch.no_grad():  # non-zero B: every adapter gets a gradient that depends on the activations
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def _loss_and_grads(model, batch):
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _assert_same(a, b):
    assert torch.equal(a[0], b[0]), (a[0], b[0])
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        assert torch.equal(a[1][name], b[1][name]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_recompute_mlp_is_bit_identical_to_plain_checkpointing(family):
    batch = fixed_batch()
    plain = _loss_and_grads(_lora(family, True), batch)
    model = _lora(family, False)
    stats = enable_offloaded_checkpointing(model, recompute="mlp", min_offload_bytes=0)
    got = _loss_and_grads(model, batch)
    _assert_same(got, plain)
    n_layers = model.config.num_hidden_layers
    if family == "gemma2":  # softcapped attention scores: those layers fall back to recompute="layer"
        assert stats.recomputed_norms == 0 and stats.packed == n_layers
        plain = _loss_and_grads(_lora(family, True, attn_logit_softcapping=None), batch)  # without: "mlp"
        model = _lora(family, False, attn_logit_softcapping=None)
        stats = enable_offloaded_checkpointing(model, recompute="mlp", min_offload_bytes=0)
        got = _loss_and_grads(model, batch)
        _assert_same(got, plain)
    # per layer at least: the input, q, k, v, the attention output, the residual after attention
    assert stats.packed >= 6 * n_layers and stats.bytes_offloaded > 0
    assert stats.unpacked >= stats.packed
    if family in ("olmo2", "olmo3"):  # no norm before attention or MLP: their inputs are the residual stream itself
        assert stats.recomputed_norms == 0
    else:
        assert stats.recomputed_norms >= 2 * n_layers  # the attention and the MLP inputs
    # and a second step on the same model (nothing stale from the first)
    _assert_same(_loss_and_grads(model, batch), plain)


def test_lora_dropout_masks_are_the_same_as_with_plain_checkpointing():
    """LoRA dropout sends the projections to the stock PEFT path; the MLP's checkpoint then saves
    and restores the RNG state, so its recompute draws the forward's masks again."""
    batch = fixed_batch()
    models = {mode: _lora("llama", mode == "plain", dropout=0.2) for mode in ("plain", "mlp", "none")}
    enable_offloaded_checkpointing(models["mlp"], recompute="mlp", min_offload_bytes=0)
    out = {}
    for mode, model in models.items():
        torch.manual_seed(11)
        out[mode] = _loss_and_grads(model, batch)
    _assert_same(out["mlp"], out["plain"])
    assert models["mlp"].velotune_offload_stats.packed > 0
    torch.manual_seed(12)  # other masks, another loss: they are not a no-op
    assert not torch.equal(_loss_and_grads(models["none"], batch)[0], out["none"][0])


def test_only_the_mlp_is_recomputed(monkeypatch):
    """The attention's projections run once per step (forward), the MLP's gate/up twice (forward +
    recompute): "layer" through a checkpoint around lora_mlp (whose recompute makes no h), "mlp"
    through lora/recomputed_mlp.py (which saves only the MLP's input and recomputes in its backward)."""
    from velotune.lora import fused, recomputed_mlp

    runs = {"mlp_in": 0, "proj": 0, "recomputed": 0}
    orig_in, orig_proj, orig_in_rows = fused._MLPIn.forward, fused.LoRAProjections.forward, recomputed_mlp.mlp_in
    h_unused = []

    def mlp_in(ctx, *a):
        runs["mlp_in"] += 1
        h_unused.append(a[4])
        return orig_in(ctx, *a)

    def proj(ctx, *a):
        runs["proj"] += 1
        return orig_proj(ctx, *a)

    def in_rows(*a):
        runs["recomputed"] += 1
        return orig_in_rows(*a)

    monkeypatch.setattr(fused._MLPIn, "forward", staticmethod(mlp_in))
    monkeypatch.setattr(fused.LoRAProjections, "forward", staticmethod(proj))
    monkeypatch.setattr(recomputed_mlp, "mlp_in", in_rows)
    n = 2
    expect = {
        "layer": {"mlp_in": 2 * n, "proj": 4 * n, "recomputed": 0},  # q/k/v and o per layer
        "mlp": {"mlp_in": 0, "proj": 2 * n, "recomputed": 2 * n},
    }
    for mode in ("layer", "mlp"):
        runs.update(mlp_in=0, proj=0, recomputed=0)
        h_unused.clear()
        model = _lora("llama", False)
        enable_offloaded_checkpointing(model, recompute=mode, min_offload_bytes=0)
        assert model.config.num_hidden_layers == n
        _loss_and_grads(model, fixed_batch())
        assert runs == expect[mode], mode
        # the checkpoint's recomputes (it drops their outputs) make no [N, I] hidden activation
        assert h_unused == ([False] * n + [True] * n if mode == "layer" else []), mode


def test_layer_inputs_and_attention_tensors_are_released_after_forward():
    """What was copied out is not also kept on the device until backward."""
    import gc
    import weakref

    batch = fixed_batch()
    model = _lora("llama", False)
    enable_offloaded_checkpointing(model, recompute="mlp", min_offload_bytes=0)
    refs = []
    for layer in model.base_model.model.model.layers:
        layer.register_forward_pre_hook(lambda m, args: refs.append(weakref.ref(args[0])))
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args: refs.append(weakref.ref(args[0])))
    loss = model(**batch).loss
    gc.collect()
    assert len(refs) == 2 * model.config.num_hidden_layers
    assert all(r() is None for r in refs)
    loss.backward()


def test_the_layer_is_found_behind_either_transformers_callable():
    """transformers 5.2x passes partial(forward, layer, **kw); earlier versions (the GPU machine's
    5.17) partial(layer.__call__, **kw). Both must reach recompute="mlp" (else "layer" runs)."""
    import functools

    from velotune.memory.checkpointing import _suits_mlp_recompute
    from velotune.memory.host_copies import layer_of

    model = _lora("llama", False)
    layer = model.base_model.model.model.layers[0]
    new = functools.partial(type(layer).forward, layer, attention_mask=None)
    old = functools.partial(super(type(layer), layer).__call__, attention_mask=None)
    assert layer_of(new) is layer and layer_of(old) is layer and _suits_mlp_recompute(new) and _suits_mlp_recompute(old)
    assert layer_of(functools.partial(print)) is None and not _suits_mlp_recompute(lambda x: x)


def test_refusals():
    model = _lora("llama", False)
    with pytest.raises(ValueError, match="recompute="):
        enable_offloaded_checkpointing(model, recompute="attention")
    base = mini_model("llama")
    prepare_model(base, max_seq_length=64)
    with pytest.raises(ValueError, match="needs use_gradient_checkpointing"):
        FastLanguageModel.get_peft_model(base, r=4, use_gradient_checkpointing=True, recompute="mlp")
    # row blocks: checked before anything is wrapped (the model is left as it was)
    for blocks, recompute, match in [(2, "layer", "needs recompute='mlp'"), (0, "mlp", ">= 1"), (1.5, "mlp", ">= 1")]:
        with pytest.raises(ValueError, match=f"mlp_row_blocks={blocks!r}.*{match}"):
            FastLanguageModel.get_peft_model(
                base, r=4, use_gradient_checkpointing="unsloth", recompute=recompute, mlp_row_blocks=blocks
            )
    assert not any("lora_" in n for n, _ in base.named_parameters())


@pytest.mark.gpu
def test_recompute_mlp_streams_on_gpu():
    """Real pinned copies on side streams with prefetching: bit-identical to plain checkpointing
    (math SDPA backend and fp32: deterministic kernels)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch = {k: v.cuda() for k, v in fixed_batch(seq=64, pad_last=0).items()}
    with sdpa_kernel(SDPBackend.MATH):
        plain = _loss_and_grads(_lora("llama", True, "cuda"), batch)
        model = _lora("llama", False, "cuda")
        stats = enable_offloaded_checkpointing(model, recompute="mlp", min_offload_bytes=0)
        got = _loss_and_grads(model, batch)
    _assert_same(got, plain)
    n = model.config.num_hidden_layers
    assert stats.recomputed_norms >= 2 * n and stats.packed >= 6 * n  # the "mlp" path really ran
    assert stats.prefetched > 0
    # pinned buffers come back to the pool when backward is done with them, and the next step
    # reuses them instead of pinning more
    pool = model.base_model.model.model.layers[0]._gradient_checkpointing_func.args[0].pool
    high = pool.high_water
    assert pool.in_use == 0 and pool.pooled == high > 0
    with sdpa_kernel(SDPBackend.MATH):
        _assert_same(_loss_and_grads(model, batch), plain)
    assert pool.high_water == high and pool.in_use == 0
