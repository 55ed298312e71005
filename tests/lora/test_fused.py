"""The fused LoRA functions against autograd on the plain formula, and against PEFT's own layers."""

import pytest
import torch
from torch import nn

import velotune.lora.fused as fused_mod
from velotune.lora import Proj, lora_mlp, lora_projections, resolve


def _proj(n_in, n_out, r, *, bias=False, lora=True, train_w=False, dtype=torch.float64, s=0.7):
    base = nn.Linear(n_in, n_out, bias=bias, dtype=dtype)
    base.weight.requires_grad_(train_w)
    if base.bias is not None:
        base.bias.requires_grad_(train_w)
    A = nn.Parameter(torch.randn(r, n_in, dtype=dtype) / n_in**0.5) if lora else None
    B = nn.Parameter(torch.randn(n_out, r, dtype=dtype) / r**0.5) if lora else None
    return Proj(base, base.bias, A, B, s)


def _reference(X, p):
    y = nn.functional.linear(X, p.base.weight, p.bias)
    if p.A is not None:
        y = y + (X @ p.A.t()) @ p.B.t() * p.scaling
    return y


def _leaves(projs):
    out = []
    for p in projs:
        out += [t for t in (p.base.weight, p.bias, p.A, p.B) if t is not None and t.requires_grad]
    return out


@pytest.mark.parametrize("train_w", [False, True])
def test_projections_match_autograd(train_w):
    projs = [
        _proj(12, 8, 3, bias=True, train_w=train_w),
        _proj(12, 4, 5, train_w=train_w),
        _proj(12, 4, 1, lora=False, train_w=train_w),
    ]
    X = torch.randn(10, 12, dtype=torch.float64, requires_grad=True)
    outs = lora_projections(X, projs)
    ref = [_reference(X, p) for p in projs]
    gs = [torch.randn_like(o) for o in outs]
    for o, r in zip(outs, ref):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)
    leaves = [X, *_leaves(projs)]
    got = torch.autograd.grad(outs, leaves, gs)
    want = torch.autograd.grad(ref, leaves, gs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    if train_w:
        assert len(leaves) == 1 + 4 + 3 + 1  # dW and db are really checked


@pytest.mark.parametrize("fused_gate_up,down_lora", [(False, True), (True, True), (False, False)])
def test_mlp_matches_autograd(fused_gate_up, down_lora):
    H, I = 12, 10
    if fused_gate_up:
        gate_up = [_proj(H, 2 * I, 4)]
    else:
        gate_up = [_proj(H, I, 4), _proj(H, I, 2, lora=False)]
    down = _proj(I, H, 3, train_w=True, lora=down_lora)
    X = torch.randn(7, H, dtype=torch.float64, requires_grad=True)
    out = lora_mlp(X, gate_up, down, "silu")
    gu = [_reference(X, p) for p in gate_up]
    gate, up = gu if len(gu) == 2 else gu[0].chunk(2, -1)
    ref = _reference(nn.functional.silu(gate) * up, down)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    leaves = [X, *_leaves(gate_up), *_leaves([down])]
    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # the GLU kernel's backward works in fp32


def test_resolve_reads_peft_layers_and_refuses_what_it_cannot_fuse():
    from peft import LoraConfig, get_peft_model

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(8, 8)
            self.k_proj = nn.Linear(8, 8)

    m = get_peft_model(Tiny(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_rslora=True))
    q = m.base_model.model.q_proj
    p = resolve(q)
    assert p.A is q.lora_A["default"].weight and p.scaling == pytest.approx(4 / 2**0.5)
    assert resolve(m.base_model.model.k_proj).A is None  # plain base layer
    with m.disable_adapter():
        assert resolve(q).A is None
    q.lora_dropout["default"] = nn.Dropout(0.1)
    assert resolve(q) is None  # dropout in training: stock path
    q.lora_dropout["default"].eval()
    assert resolve(q) is not None
    d = get_peft_model(Tiny(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    assert resolve(d.base_model.model.q_proj) is None  # DoRA: stock path


def test_projection_matches_peft_forward_and_grads():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(16, 24, bias=True))
    m = get_peft_model(lin, LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    layer = m.base_model.model[0]
    nn.init.normal_(layer.lora_B["default"].weight)
    X = torch.randn(5, 16, requires_grad=True)
    (y,) = lora_projections(X, [resolve(layer)])
    ref = layer(X)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    leaves = [X, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_checkpoint_recompute_skips_the_down_projection(monkeypatch):
    """With LoRA (frozen W), non-reentrant checkpointing stops recomputing before the down GEMM."""
    from torch.utils.checkpoint import checkpoint

    import velotune.lora.fused as fused

    calls = []
    original = fused._BaseDown.forward

    def counting(ctx, *args):
        calls.append(1)
        return original(ctx, *args)

    monkeypatch.setattr(fused._BaseDown, "forward", staticmethod(counting))
    H, I = 12, 10
    gate_up, down = [_proj(H, I, 4), _proj(H, I, 2)], _proj(I, H, 3)
    X = torch.randn(7, H, dtype=torch.float64, requires_grad=True)
    out = checkpoint(lambda x: lora_mlp(x, gate_up, down, "silu") * 2, X, use_reentrant=False)
    out.sum().backward()
    assert len(calls) == 1  # forward only; the recomputation never reached it
    ref = torch.autograd.grad(
        _reference(nn.functional.silu(_reference(X, gate_up[0])) * _reference(X, gate_up[1]), down).sum() * 2, down.A
    )[0]
    torch.testing.assert_close(down.A.grad, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("down_lora,train_w", [(True, False), (False, False), (True, True)])
def test_mlp_values_unused_skips_the_down_gemm_and_keeps_every_gradient(monkeypatch, down_lora, train_w):
    """lora_mlp(values_unused=True), the captured recompute's mode: the down weight is never read,
    the output is only shaped like the real one, and every gradient equals the normal forward's."""
    import velotune.lora.fused as fused

    H, I = 12, 10
    gate_up = [_proj(H, I, 4), _proj(H, I, 2)]
    down = _proj(I, H, 3, lora=down_lora, train_w=train_w, bias=True)
    X = torch.randn(7, H, dtype=torch.float64, requires_grad=True)
    leaves = [X, *_leaves(gate_up), *_leaves([down])]
    g = torch.randn(7, H, dtype=torch.float64)
    want = torch.autograd.grad(lora_mlp(X, gate_up, down, "silu"), leaves, g)
    read = []
    real_weight = fused.weight_in
    monkeypatch.setattr(fused, "weight_in", lambda p, dtype: read.append(p) or real_weight(p, dtype))
    out = lora_mlp(X, gate_up, down, "silu", values_unused=True)
    assert out.shape == (7, H) and not any(p is down for p in read)
    got = torch.autograd.grad(out, leaves, g)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_mlp_values_unused_makes_no_hidden_activation(monkeypatch):
    """With the Triton kernels (interpreter), lora_mlp(values_unused=True) never makes h = act(gate) *
    up: the down adapter's A gets it tile by tile (glu_lora_project), h's output is a stand-in that
    holds one element, and every gradient is the same bits as with h made."""
    from velotune.kernels import force_triton
    from velotune.kernels import glu as glu_mod

    H, I = 16, 48
    gate_up = [_proj(H, I, 4, dtype=torch.float32), _proj(H, I, 2, dtype=torch.float32)]
    down = _proj(I, H, 3, dtype=torch.float32)
    X = torch.randn(20, H, requires_grad=True)
    leaves = [X, *_leaves(gate_up), *_leaves([down])]
    g = torch.randn(20, H)
    made, hs = [], []
    real_glu, real_apply = glu_mod.glu_forward, fused_mod._MLPIn.apply
    monkeypatch.setattr(glu_mod, "glu_forward", lambda *a: made.append(1) or real_glu(*a))
    monkeypatch.setattr(fused_mod._MLPIn, "apply", lambda *a: (lambda out: hs.append(out[0]) or out)(real_apply(*a)))
    with force_triton():
        want = torch.autograd.grad(lora_mlp(X, gate_up, down, "silu"), leaves, g)
        assert len(made) == 1 and hs[-1].stride() == (I, 1)
        out = lora_mlp(X, gate_up, down, "silu", values_unused=True)
        assert len(made) == 1 and hs[-1].shape == (20, I) and hs[-1].stride() == (0, 0)
        got = torch.autograd.grad(out, leaves, g)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def _mixed(projs):
    """bf16 base layers with fp32 adapters: how PEFT keeps adapters on a bf16 model."""
    for p in projs:
        p.base.to(torch.bfloat16)
        for t in (p.A, p.B):
            if t is not None:
                t.data = t.data.float()
    return projs


def test_adapter_casts_in_one_buffer_equal_per_tensor_casts(monkeypatch):
    """The adapters of a group (and the MLP's A_down) are cast to bf16 into one flat buffer by one
    multi-tensor copy: the outputs and every gradient must be bit-identical to casting each adapter
    on its own (the stand-ins below: the code before the flat buffer)."""
    import velotune.lora.fused as fused

    torch.manual_seed(0)
    H, I = 16, 12
    qkv = _mixed([_proj(H, 8, 3, bias=True), _proj(H, 4, 5), _proj(H, 4, 1, lora=False), _proj(H, 6, 2)])
    gate_up = _mixed([_proj(H, I, 4), _proj(H, I, 2)])
    down = _mixed([_proj(I, H, 3)])[0]
    X0 = torch.randn(9, H).to(torch.bfloat16)

    def run():
        X = X0.clone().requires_grad_()
        outs = [*lora_projections(X, qkv), lora_mlp(X, gate_up, down, "silu")]
        leaves = [X, *_leaves(qkv), *_leaves(gate_up), *_leaves([down])]
        gs = [torch.full_like(o, 0.25) for o in outs]
        return outs, torch.autograd.grad(outs, leaves, gs)

    got = run()

    def _per_tensor(tensors, dtype):
        return [t.to(dtype) for t in tensors], None

    def _cat(projs, dtype, extra=()):
        As = [p.A.to(dtype) for p in projs if p.A is not None]
        return (
            torch.cat(As, 0) if As else None,
            [None if p.A is None else p.B.to(dtype) for p in projs],
            [t.to(dtype) for t in extra],
        )

    monkeypatch.setattr(fused, "_group_casts", _cat)
    monkeypatch.setattr(fused, "_cast_together", _per_tensor)
    want = run()
    for a, b in zip(got[0] + list(got[1]), want[0] + list(want[1])):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert got[1][1].dtype == torch.float32  # adapter gradients in the adapters' dtype


def test_joined_halves_are_their_buffer_and_others_are_concatenated():
    """Phi-3's fused gate_up: the GLU backward overwrote the two halves in place, so their [N, 2I]
    buffer already is cat(dgate, dup): no copy. Anything else is concatenated."""
    from velotune.lora.fused import joined

    buf = torch.randn(5, 8)
    a, b = buf.chunk(2, dim=-1)
    whole = joined(a, b)
    assert whole.data_ptr() == buf.data_ptr() and torch.equal(whole, buf)
    swapped = joined(b, a)  # halves the other way round: a real cat
    assert swapped.data_ptr() != buf.data_ptr() and torch.equal(swapped, torch.cat((b, a), -1))
    x, y = torch.randn(5, 4), torch.randn(5, 4)
    assert torch.equal(joined(x, y), torch.cat((x, y), -1))
    rows = torch.randn(6, 8)[1:]  # a buffer view with an offset
    c, d = rows.chunk(2, dim=-1)
    assert joined(c, d).data_ptr() == rows.data_ptr() and torch.equal(joined(c, d), rows)
