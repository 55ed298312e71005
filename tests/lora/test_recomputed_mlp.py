"""lora/recomputed_mlp.py: the LoRA MLP that saves only its input, against a torch checkpoint of
lora_mlp (the path it replaces under recompute="mlp") and float64."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from velotune.lora import Proj, lora_mlp
from velotune.lora import recomputed_mlp
from velotune.lora.recomputed_mlp import lora_mlp_recomputed


def _proj(n_in, n_out, r, *, lora=True, bias=False, dtype=torch.float32, s=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(n_in, n_out, bias=bias, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(n_out, n_in, generator=g) / n_in**0.5)
        if bias:
            base.bias.copy_(torch.randn(n_out, generator=g))
    base.requires_grad_(False)
    A = nn.Parameter((torch.randn(r, n_in, generator=g) / n_in**0.5).to(dtype)) if lora else None
    B = nn.Parameter((torch.randn(n_out, r, generator=g) / r**0.5).to(dtype)) if lora else None
    return Proj(base, base.bias, A, B, s)


def _mlp(kind, H=16, I=40, dtype=torch.float32):
    if kind == "fused":  # Phi-3: one [gate | up] projection
        gate_up = [_proj(H, 2 * I, 4, dtype=dtype, seed=1)]
    else:
        gate_up = [_proj(H, I, 4, dtype=dtype, seed=1), _proj(H, I, 2, lora=kind != "up_frozen", dtype=dtype, seed=2)]
    down = _proj(I, H, 3, lora=kind != "down_frozen", bias=kind == "bias", dtype=dtype, seed=3)
    return gate_up, down


def _rel(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def _leaves(gate_up, down):
    return [t for p in (*gate_up, down) for t in (p.A, p.B) if t is not None]


def _run(fn, X, gate_up, down, g):
    X = X.detach().requires_grad_(True)
    out = fn(X)
    grads = torch.autograd.grad(out, [X, *_leaves(gate_up, down)], g)
    return out.detach(), grads


KINDS = ["two", "fused", "up_frozen", "down_frozen", "bias"]


@pytest.mark.parametrize("kind", KINDS)
def test_one_block_is_bit_identical_to_checkpointed_lora_mlp(kind):
    gate_up, down = _mlp(kind)
    X, g = torch.randn(11, 16), torch.randn(11, 16)
    want = _run(lambda x: checkpoint(lora_mlp, x, gate_up, down, "silu", use_reentrant=False), X, gate_up, down, g)
    got = _run(lambda x: lora_mlp_recomputed(x, gate_up, down, "silu"), X, gate_up, down, g)
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1], want[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunks", [2, 3, 20])
def test_row_blocks_give_the_same_gradients(kind, chunks, monkeypatch):
    """chunks row blocks (11 rows: uneven blocks; 20 > rows: one row each), in the forward and again
    in the backward: no block has more rows than ceil(N / chunks); output and gradients equal to one
    block's within fp32 rounding and to float64."""
    gate_up, down = _mlp(kind)
    X, g = torch.randn(11, 16), torch.randn(11, 16)
    one = _run(lambda x: lora_mlp_recomputed(x, gate_up, down, "gelu_tanh"), X, gate_up, down, g)
    rows = []
    real_in = recomputed_mlp.mlp_in
    monkeypatch.setattr(recomputed_mlp, "mlp_in", lambda Xc, *a: rows.append(Xc.shape[0]) or real_in(Xc, *a))
    got = _run(lambda x: lora_mlp_recomputed(x, gate_up, down, "gelu_tanh", chunks=chunks), X, gate_up, down, g)
    step = -(-11 // chunks)
    half = len(rows) // 2  # the forward's blocks, then the backward's
    assert rows[:half] == rows[half:] and sum(rows[:half]) == 11 and max(rows) == step
    gate_up64, down64 = _mlp(kind, dtype=torch.float64)
    want64 = _run(lambda x: lora_mlp(x, gate_up64, down64, "gelu_tanh"), X.double(), gate_up64, down64, g.double())
    assert _rel(got[0], want64[0]) <= 1e-6 and _rel(got[0], want64[0]) <= 1.5 * _rel(one[0], want64[0]) + 1e-8
    for a, b, c in zip(got[1], one[1], want64[1]):  # norm-relative, as the parity tests measure
        assert _rel(a, c) <= 1e-5 and _rel(a, c) <= 1.5 * _rel(b, c) + 1e-8, (_rel(a, c), _rel(b, c))


def test_with_the_triton_kernels():
    """Interpreter: the fused GLU / rank-r kernels inside; one block equals checkpointed lora_mlp bit for
    bit, three blocks within fp32 rounding."""
    from velotune.kernels import force_triton

    gate_up, down = _mlp("two", H=16, I=48)
    X, g = torch.randn(20, 16), torch.randn(20, 16)
    with force_triton():
        want = _run(lambda x: checkpoint(lora_mlp, x, gate_up, down, "silu", use_reentrant=False), X, gate_up, down, g)
        one = _run(lambda x: lora_mlp_recomputed(x, gate_up, down, "silu"), X, gate_up, down, g)
        three = _run(lambda x: lora_mlp_recomputed(x, gate_up, down, "silu", chunks=3), X, gate_up, down, g)
    assert torch.equal(one[0], want[0]) and _rel(three[0], want[0]) <= 1e-6
    for a, b, c in zip(one[1], want[1], three[1]):
        assert torch.equal(a, b)
        assert _rel(c, b) <= 1e-5


def _copy(gate_up, down, base_dtype, adapter_dtype, device):
    """New Projs with the same values: base weights in base_dtype, adapters (new leaves) in adapter_dtype."""

    def one(p):
        base = nn.Linear(
            p.base.in_features, p.base.out_features, bias=p.bias is not None, dtype=base_dtype, device=device
        )
        with torch.no_grad():
            base.weight.copy_(p.base.weight)
            if p.bias is not None:
                base.bias.copy_(p.bias)
        base.requires_grad_(False)
        A, B = (
            (None, None)
            if p.A is None
            else (
                nn.Parameter(p.A.detach().to(device, adapter_dtype)),
                nn.Parameter(p.B.detach().to(device, adapter_dtype)),
            )
        )
        return Proj(base, base.bias, A, B, p.scaling)

    return [one(p) for p in gate_up], one(down)


def _bf16_case(device, N, H, I, chunks):
    """bf16 base weights with fp32 adapters (as PEFT keeps them): every gradient's error against
    float64 within 1.5x of the checkpointed lora_mlp's (the path recompute="mlp" used before)."""
    gate_up, down = _mlp("two", H=H, I=I)
    X, g = torch.randn(N, H, device=device), torch.randn(N, H, device=device)
    gu64, d64 = _copy(gate_up, down, torch.float64, torch.float64, device)
    gu16, d16 = _copy(gate_up, down, torch.bfloat16, torch.float32, device)
    Xb, gb = X.bfloat16(), g.bfloat16()
    ref = _run(lambda x: lora_mlp(x, gu64, d64, "silu"), Xb.double(), gu64, d64, gb.double())
    stock = _run(lambda x: checkpoint(lora_mlp, x, gu16, d16, "silu", use_reentrant=False), Xb, gu16, d16, gb)
    ours = _run(lambda x: lora_mlp_recomputed(x, gu16, d16, "silu", chunks=chunks), Xb, gu16, d16, gb)
    assert torch.equal(ours[0], stock[0]) if chunks == 1 else _rel(ours[0], ref[0]) <= 1.5 * _rel(stock[0], ref[0])
    for a, b, c in zip(ours[1], stock[1], ref[1]):
        assert _rel(a, c) <= 1.5 * _rel(b, c) + 1e-6, (_rel(a, c), _rel(b, c))


@pytest.mark.parametrize("chunks", [1, 4])
def test_bf16_row_blocks(chunks):
    _bf16_case("cpu", 64, 32, 96, chunks)


@pytest.mark.gpu
@pytest.mark.parametrize("chunks", [1, 4])
def test_gpu_row_blocks_bf16(chunks):
    """The same at an 8B-like MLP on the GPU (2048 tokens, H 4096, I 14336), Triton kernels inside."""
    _bf16_case("cuda", 2048, 4096, 14336, chunks)
