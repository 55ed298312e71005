"""RoPE Triton kernel (interpreter) vs the torch reference and a float64 reference."""

import pytest
import torch
import transformers as tf

from kernel_checks import assert_close, leaf
from velotune.kernels import force_triton
from velotune.kernels.rope import apply_rope, apply_rope_reference, rope_cos_sin


def _cos_sin(head_dim, positions, rotary=None):
    cfg = tf.LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=64,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": (rotary or head_dim) / head_dim,
        },
    )
    if rotary:  # Phi-style partial rotary: only the default init reads partial_rotary_factor here
        cfg = tf.Phi3Config(
            hidden_size=4 * head_dim,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            partial_rotary_factor=rotary / head_dim,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": rotary / head_dim},
        )
    return rope_cos_sin(cfg, positions, "cpu")


def _projections(B, T, H, D):
    """[B, H, T, D] views of a [B, T, H*D] projection output, the layout attention uses."""
    return torch.randn(B, T, H * D)


def _rotate(fn, qp, kp, cos, sin, dq, dk, dtype, shape):
    B, T, Hq, Hk, D = shape
    qp, kp = leaf(qp, dtype), leaf(kp, dtype)
    q = qp.clone().view(B, T, Hq, D).transpose(1, 2)  # non-leaf, non-contiguous
    k = kp.clone().view(B, T, Hk, D).transpose(1, 2)
    q_ptr = q.data_ptr()
    qr, kr = fn(q, k, cos.to(dtype), sin.to(dtype))
    gq, gk = torch.autograd.grad([qr, kr], [qp, kp], [dq.to(dtype), dk.to(dtype)])
    return (qr, kr, gq, gk), qr.data_ptr() == q_ptr


@pytest.mark.parametrize(
    "D,B,T,Hq,Hk,rotary,cos2d",
    [
        (64, 1, 3, 4, 2, None, False),  # batch 1, GQA
        (96, 2, 3, 3, 1, None, False),  # head_dim 96 (half = 48, not a power of two)
        (128, 1, 2, 2, 2, None, True),  # cos/sin [T, D]
        (256, 1, 2, 2, 1, None, False),  # Gemma head_dim
        (32, 2, 4, 2, 1, 16, False),  # partial rotary (Phi-style)
    ],
)
def test_rope_kernel(D, B, T, Hq, Hk, rotary, cos2d):
    # packed sequences: positions restart inside a row
    pos = torch.tensor([[0, 1, 0, 1][:T], [2, 0, 1, 2][:T]][:B])
    cos, sin = _cos_sin(D, pos[0] if cos2d else pos, rotary)
    qp, kp = _projections(B, T, Hq, D), _projections(B, T, Hk, D)
    dq, dk = torch.randn(B, Hq, T, D), torch.randn(B, Hk, T, D)
    shape = (B, T, Hq, Hk, D)
    with force_triton():
        got, in_place = _rotate(apply_rope, qp, kp, cos, sin, dq, dk, torch.float32, shape)
    assert not in_place, "autograd path must not rotate a view in place (CopySlices)"
    ref, _ = _rotate(apply_rope_reference, qp, kp, cos, sin, dq, dk, torch.float32, shape)
    ref64, _ = _rotate(apply_rope_reference, qp, kp, cos, sin, dq, dk, torch.float64, shape)
    for name, a, r, r64 in zip(("q", "k", "dq", "dk"), got, ref, ref64):
        assert_close(a, r, what=f"{name} vs torch")
        assert_close(a, r64.float(), what=f"{name} vs float64")


def test_rope_backward_shared_gradient():
    """The same gradient tensor reaching dq and dk (e.g. from q + k) is not rotated twice."""
    cos, sin = _cos_sin(16, torch.arange(3)[None])
    q0, k0 = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
    results = []
    for fn in (apply_rope, apply_rope_reference):
        q, k = leaf(q0), leaf(k0)
        with force_triton():
            qr, kr = fn(q.clone(), k.clone(), cos, sin)
            (qr + kr).pow(2).sum().backward()
        results.append((q.grad, k.grad))
    for a, r in zip(*results):
        assert_close(a, r)


def test_rope_rejects_bad_shapes():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="rotary dim"):
        apply_rope(q, q.clone(), torch.randn(3, 10), torch.randn(3, 10))
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rope(q, q.clone(), torch.randn(4, 8), torch.randn(4, 8))


def test_rope_raw_in_place_pair():
    """rope_forward_ / rope_backward_ rotate caller-owned buffers in place; backward inverts forward."""
    from velotune.kernels.rope import rope_backward_, rope_forward_

    cos, sin = _cos_sin(16, torch.tensor([[3, 0, 1]]))
    q0, k0 = torch.randn(1, 2, 3, 16), torch.randn(1, 1, 3, 16)
    q, k = q0.clone(), k0.clone()
    with force_triton():
        qr, kr = rope_forward_(q, k, cos, sin)
        assert qr.data_ptr() == q.data_ptr() and kr.data_ptr() == k.data_ptr()
        for a, r in zip((q, k), apply_rope_reference(q0, k0, cos, sin)):
            assert_close(a, r)
        rope_backward_(q, k, cos, sin)  # a rotation's transpose is its inverse
    assert_close(q, q0)
    assert_close(k, k0)


@pytest.mark.parametrize("B,T,Hq,Hk,D,flat", [(2, 3, 4, 2, 64, True), (1, 4, 2, 1, 32, False)])
def test_rope_in_place_token_major(B, T, Hq, Hk, D, flat):
    """apply_rope_ rotates fresh projection outputs in place (autograd-aware) and equals stock."""
    from velotune.kernels.rope import apply_rope_

    pos = torch.tensor([[0, 1, 0, 1][:T], [2, 0, 1, 2][:T]][:B])
    cos, sin = _cos_sin(D, pos)
    shape_q = (B * T, Hq * D) if flat else (B, T, Hq * D)
    shape_k = (B * T, Hk * D) if flat else (B, T, Hk * D)
    qp, kp = torch.randn(shape_q), torch.randn(shape_k)
    dq, dk = torch.randn(shape_q), torch.randn(shape_k)

    def run(fn, dtype):
        a, b = leaf(qp, dtype), leaf(kp, dtype)
        q, k = a * 1, b * 1  # non-leaf, not views: what a projection returns
        ptr = q.data_ptr()
        qr, kr = fn(q, k, cos.to(dtype), sin.to(dtype))
        ga, gb = torch.autograd.grad([qr, kr], [a, b], [dq.to(dtype), dk.to(dtype)])
        return (qr, kr, ga, gb), qr.data_ptr() == ptr

    def stock(q, k, c, s):
        q4, k4 = (x.reshape(B, T, -1, D).transpose(1, 2) for x in (q, k))
        qr, kr = apply_rope_reference(q4, k4, c, s)
        return qr.transpose(1, 2).reshape(q.shape), kr.transpose(1, 2).reshape(k.shape)

    with force_triton():
        got, in_place = run(lambda q, k, c, s: apply_rope_(q, k, c, s, D), torch.float32)
    assert in_place, "fresh, contiguous projection outputs are rotated in place"
    ref, _ = run(stock, torch.float32)
    ref64, _ = run(stock, torch.float64)
    for name, a, r, r64 in zip(("q", "k", "dq", "dk"), got, ref, ref64):
        assert a.shape == r.shape
        assert_close(a, r, what=f"{name} vs torch")
        assert_close(a, r64.float(), what=f"{name} vs float64")


def test_rope_in_place_falls_back_for_views_and_leaves():
    """Slices of a fused QKV output (views) and leaves get new tensors; the input is untouched."""
    from velotune.kernels.rope import apply_rope_

    B, T, H, D = 1, 3, 2, 16
    cos, sin = _cos_sin(D, torch.arange(T)[None])
    qkv = torch.randn(B * T, 3 * H * D)
    q, k = qkv[:, : H * D], qkv[:, H * D : 2 * H * D]
    before = qkv.clone()
    with force_triton():
        qr, kr = apply_rope_(q, k, cos, sin, D)
        leaf_q = leaf(q)
        qr2, _ = apply_rope_(leaf_q, k.clone(), cos, sin, D)
    assert torch.equal(qkv, before) and qr.data_ptr() != q.data_ptr()
    assert qr2.data_ptr() != leaf_q.data_ptr()
    ref_q, ref_k = apply_rope_reference(
        q.reshape(B, T, H, D).transpose(1, 2), k.reshape(B, T, H, D).transpose(1, 2), cos, sin
    )
    assert_close(qr, ref_q.transpose(1, 2).reshape(B * T, H * D))
    assert_close(kr, ref_k.transpose(1, 2).reshape(B * T, H * D))
    with pytest.raises(ValueError, match="token-major"):
        apply_rope_(torch.randn(5, H * D), torch.randn(5, H * D), cos, sin, D)
