"""Rotary position embeddings: Q and K rotated in one launch; backward is the inverse rotation.

    q, k = apply_rope(q, k, cos, sin)            # q [B, Hq, T, D], k [B, Hk, T, D], autograd
    q, k = apply_rope_(q, k, cos, sin, head_dim) # token-major q [N, Hq*D], k [N, Hk*D], in place
    rope_forward_(q, k, cos, sin); rope_backward_(dq, dk, cos, sin)   # raw, in place, no autograd
    cos, sin = rope_cos_sin(config, position_ids, device)   # [B, T, R] fp32, R = rotary dims <= D

cos/sin follow transformers' convention: halves duplicated, `rotate_half` pairing of dim i with
i + R/2, attention scaling already folded in, one row per token (so packed sequences whose
position ids restart at 0 just work). When R < D (partial rotary, Phi-style) only the first R dims
rotate and the rest pass through untouched.

Derivation. Per token and head, with x1 = x[:R/2], x2 = x[R/2:R], c = cos, s = sin (split the same way):
    y1 = x1 * c1 - x2 * s1
    y2 = x2 * c2 + x1 * s2
  This is a linear map y = A x; its transpose gives the backward (for c1 = c2, s1 = s2 it is the
  rotation by -theta, i.e. the inverse rotation):
    dx1 = dy1 * c1 + dy2 * s2
    dx2 = dy2 * c2 - dy1 * s1
  Backward therefore needs nothing but cos/sin and rewrites dq/dk in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from velotune.kernels import triton_enabled
from velotune.kernels.launch import launch_named


# ----------------------------------------------------------------------------------------------------
# cos / sin caches
# ----------------------------------------------------------------------------------------------------
def _default_inv_freq(config, device):
    """Plain RoPE frequencies (transformers' `compute_default_rope_parameters`)."""
    params = config.rope_parameters
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    return inv_freq.to(device), 1.0


def rope_inv_freq(config, position_ids: torch.Tensor, device=None):
    """(inv_freq [R/2] fp32, attention_scaling) exactly as a freshly built transformers rotary embedding
    uses them for `position_ids`; frequencies come from transformers' own ROPE_INIT_FUNCTIONS.

    dynamic / longrope depend on the sequence length seen (max position id + 1). Both candidate
    frequency sets are computed and picked with `torch.where` on the device: no host sync.
    (transformers' module additionally caches the longest length seen so far; a fresh module
    behaves as here.)
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        return _default_inv_freq(config, device)
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_cos_sin: unsupported rope_type {rope_type!r}")
    init = ROPE_INIT_FUNCTIONS[rope_type]
    inv_freq, scaling = init(config, device)
    seq_len = position_ids.max() + 1
    if rope_type == "dynamic":
        grown, _ = init(config, device, seq_len=seq_len)
        inv_freq = torch.where(seq_len > config.max_position_embeddings, grown, inv_freq.to(device))
    elif rope_type == "longrope":
        original = params["original_max_position_embeddings"]
        long_inv, _ = init(config, device, seq_len=original + 1)
        inv_freq = torch.where(seq_len > original, long_inv.to(device), inv_freq.to(device))
    return inv_freq.to(device=device, dtype=torch.float32), scaling


def rope_cos_sin(config, position_ids: torch.Tensor, device=None, dtype=torch.float32):
    """position_ids [B, T] (or [T]) -> (cos, sin) each [B, T, R] (or [T, R]) in `dtype`,
    computed in fp32 like transformers' rotary embedding classes (attention scaling included)."""
    device = position_ids.device if device is None else device
    position_ids = position_ids.to(device)
    inv_freq, scaling = rope_inv_freq(config, position_ids, device)
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


# ----------------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------------
def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(q, k, cos, sin):
    """transformers' `apply_rotary_pos_emb` (unsqueeze_dim=1), plus Phi-style partial rotary."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    R = cos.shape[-1]

    def rot(x):
        if R == x.shape[-1]:
            return ((x * cos) + (_rotate_half(x) * sin)).to(x.dtype)
        xr, xp = x[..., :R], x[..., R:]
        return torch.cat((((xr * cos) + (_rotate_half(xr) * sin)).to(x.dtype), xp), dim=-1)

    return rot(q), rot(k)


def apply_rope(q, k, cos, sin):
    """Rotate q [B, Hq, T, D] and k [B, Hk, T, D] with cos/sin [B, T, R] or [T, R] (R <= D, even).

    On CUDA: one Triton launch rotates Q and K into new tensors of the same layout; backward (one
    launch) applies the inverse rotation, saving nothing but cos/sin. See _RoPE for why the autograd
    path is out of place (views + in place = CopySlices copies), and why backward must not
    rewrite its incoming gradients (autograd may hand one gradient tensor to several consumers,
    e.g. `q + k`). Fused code that owns its buffers calls rope_forward_ / rope_backward_, which
    rotate in place.
    """
    _check_rope(q, k, cos, sin)
    if not triton_enabled(q):
        return apply_rope_reference(q, k, cos, sin)
    return _apply_rope_triton(q, k, cos, sin)


def _check_rope(q, k, cos, sin):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rope: q and k must be [B, H, T, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    B, _, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"apply_rope: k {tuple(k.shape)} does not match q {tuple(q.shape)}")
    if cos.shape != sin.shape or cos.dim() not in (2, 3) or cos.shape[-2] != T:
        raise ValueError(f"apply_rope: cos/sin must be [B, T, R] or [T, R] with T={T}, got {tuple(cos.shape)}")
    if cos.dim() == 3 and cos.shape[0] not in (1, B):
        raise ValueError(f"apply_rope: cos batch {cos.shape[0]} does not match q batch {B}")
    R = cos.shape[-1]
    if R % 2 or R > D:
        raise ValueError(f"apply_rope: rotary dim {R} must be even and <= head_dim {D}")


# ----------------------------------------------------------------------------------------------------
# Triton kernel: one program per token (b, t) rotates all Hq + Hk heads of that token.
# Outputs share their input's strides (in place, or an `empty_like` of a dense input), so each tensor
# passes one stride triple; head counts and the half width are compile-time constants (few launch
# arguments: the launch cost matters at ~0.1 ms kernels).
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _rotate_heads(
    X,
    Y,
    sb,
    sh,
    st,
    b,
    t,
    c1,
    c2,
    s1,
    s2,
    N_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    base = b * sb + t * st
    for h0 in tl.static_range(0, N_HEADS, BLOCK_H):
        mask = (h0 + heads < N_HEADS) & (dims < HALF)
        off = base + (h0 + heads) * sh + dims
        x1 = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + off + HALF, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:  # transpose of the forward map (see module docstring)
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        tl.store(Y + off, y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(Y + off + HALF, y2.to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["T"])  # T changes every packed batch: one compiled kernel for all
def _rope_kernel(
    Q,
    QO,
    sqb,
    sqh,
    sqt,
    K,
    KO,
    skb,
    skh,
    skt,
    C,
    S,
    scb,
    sct,
    T,
    HQ: tl.constexpr,
    HK: tl.constexpr,
    HALF: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    d = tl.arange(0, BLOCK_D)[None, :]
    dmask = d < HALF
    cs = b * scb + t * sct
    c1 = tl.load(C + cs + d, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(C + cs + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(S + cs + d, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(S + cs + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    if HQ > 0:
        _rotate_heads(Q, QO, sqb, sqh, sqt, b, t, c1, c2, s1, s2, HQ, HALF, BLOCK_HQ, BLOCK_D, BACKWARD)
    if HK > 0:
        _rotate_heads(K, KO, skb, skh, skt, b, t, c1, c2, s1, s2, HK, HALF, BLOCK_HK, BLOCK_D, BACKWARD)


def _launch(q, k, cos, sin, backward, q_out=None, k_out=None):
    """Rotate q and/or k [B, H, T, D] views (either may be None; last dim unit-stride) into q_out /
    k_out (default: in place). An output must have its input's strides. cos/sin [B|1, T, R] or [T, R]."""
    q_out = q if q_out is None else q_out
    k_out = k if k_out is None else k_out
    x = q if q is not None else k
    B, _, T, _ = x.shape
    for a, o in ((q, q_out), (k, k_out)):
        if a is not None and o.stride() != a.stride():
            raise ValueError("rope: an output must have its input's strides")
    qq, qo = (q, q_out) if q is not None else (x, x)
    kk, ko = (k, k_out) if k is not None else (x, x)
    _launch_raw(
        qq,
        qo,
        qq.stride()[:3],
        q.shape[1] if q is not None else 0,
        kk,
        ko,
        kk.stride()[:3],
        k.shape[1] if k is not None else 0,
        cos,
        sin,
        B,
        T,
        backward,
    )


def _launch_raw(q, qo, q_strides, hq, k, ko, k_strides, hk, cos, sin, B, T, backward):
    """The launch itself: strides (batch, head, token) of q/qo and k/ko, hq / hk heads (0: skip)."""
    if B * T == 0:
        return
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    if cos.dim() == 2:
        scb, sct = 0, cos.stride(0)
    else:
        scb = 0 if cos.shape[0] == 1 else cos.stride(0)
        sct = cos.stride(1)
    half = cos.shape[-1] // 2
    block_d = triton.next_power_of_2(max(half, 1))
    # keep each head tile around 2K elements
    bhq = min(triton.next_power_of_2(max(hq, 1)), max(1, 2048 // block_d))
    bhk = min(triton.next_power_of_2(max(hk, 1)), max(1, 2048 // block_d))
    (sqb, sqh, sqt), (skb, skh, skt) = q_strides, k_strides
    launch_named(
        _PLANS,
        _rope_kernel,
        (B * T,),
        dict(
            Q=q,
            QO=qo,
            sqb=sqb,
            sqh=sqh,
            sqt=sqt,
            K=k,
            KO=ko,
            skb=skb,
            skh=skh,
            skt=skt,
            C=cos,
            S=sin,
            scb=scb,
            sct=sct,
            T=T,
            HQ=hq,
            HK=hk,
            HALF=half,
            BACKWARD=backward,
            BLOCK_HQ=bhq,
            BLOCK_HK=bhk,
            BLOCK_D=block_d,
        ),
        num_warps=4,
    )


_PLANS: dict = {}  # launch plans (kernels/launch.py)


def _like(x: torch.Tensor | None):
    """(input, output) with unit-stride last dims and equal strides (empty_like keeps the strides of
    a dense tensor; anything else is made contiguous first)."""
    if x is None:
        return None, None
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty_like(x)
    if out.stride() != x.stride():
        x = x.contiguous()
        out = torch.empty_like(x)
    return x, out


def _rotated(q, k, cos, sin, backward):
    """New tensors (same layouts as the inputs; either may be None) holding the (inverse) rotation."""
    q, qo = _like(q)
    k, ko = _like(k)
    R = cos.shape[-1]
    for x, o in ((q, qo), (k, ko)):
        if x is not None and R < x.shape[-1]:  # pass-through dims of partial rotary
            o[..., R:] = x[..., R:]
    if q is not None or k is not None:
        _launch(q, k, cos, sin, backward, q_out=qo, k_out=ko)
    return qo, ko


# ----------------------------------------------------------------------------------------------------
# raw in-place pair (no autograd), for fused attention functions that own their buffers
# ----------------------------------------------------------------------------------------------------
def rope_forward_(q, k, cos, sin):
    """Rotate q and k in place, one launch. Last dims must be unit-stride."""
    _check_rope(q, k, cos, sin)
    _launch(q, k, cos, sin, backward=False)
    return q, k


def rope_backward_(dq, dk, cos, sin):
    """Inverse rotation of dq and dk in place, one launch (the caller owns both buffers)."""
    _check_rope(dq, dk, cos, sin)
    _launch(dq, dk, cos, sin, backward=True)
    return dq, dk


# ----------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------
class _RoPE(torch.autograd.Function):
    """Q and K in one launch each way; saves only cos/sin.

    Out of place on purpose: q and k are normally views (the transposed projection output), and an
    in-place update of a view makes autograd wrap the backward in CopySlices, which copies the whole
    gradient three more times (slower than out of place: docs/perf-notes.md). The old q/k buffers die
    with the caller's references
    (linear layers do not save their outputs), so peak memory is unchanged. apply_rope_ rotates
    the projection outputs themselves (not views) in place; fused code that owns its buffers uses
    rope_forward_ / rope_backward_."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotated(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = _rotated(dq, dk, cos, sin, backward=True)
        return dq, dk, None, None


def _apply_rope_triton(q, k, cos, sin):
    return _RoPE.apply(q, k, cos, sin)


class _RoPEInPlace(torch.autograd.Function):
    """Token-major q [N, Hq*D] / k [N, Hk*D] (contiguous, not views) rotated IN PLACE, one launch;
    autograd is told (mark_dirty), and since the inputs are not views no CopySlices is involved.
    Backward writes the inverse rotation into fresh tensors: an incoming gradient may be shared with
    other consumers (see apply_rope), so it is never overwritten. Strides are computed from the
    token-major layout (batch T*H*D, head D, token H*D): no view objects on the hot path."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, B, T, D):
        _rows(q, q, k, k, cos, sin, B, T, D, backward=False)
        ctx.mark_dirty(q, k)
        ctx.save_for_backward(cos, sin)
        ctx.shape = (B, T, D)
        return q, k

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        B, T, D = ctx.shape
        dq, dk = dq.contiguous(), dk.contiguous()
        gq, gk = torch.empty_like(dq), torch.empty_like(dk)
        _rows(dq, gq, dk, gk, cos, sin, B, T, D, backward=True)
        return gq, gk, None, None, None, None, None


def _rows(q, qo, k, ko, cos, sin, B, T, D, backward):
    """Launch on contiguous token-major tensors (outputs contiguous too)."""
    nq, nk = q.shape[-1], k.shape[-1]
    _launch_raw(q, qo, (T * nq, D, nq), nq // D, k, ko, (T * nk, D, nk), nk // D, cos, sin, B, T, backward)


def _tokens(x, shape):
    """[B, H, T, D] -> token-major `shape` (a view when x is [B, T, H, D] underneath)."""
    return x.transpose(1, 2).reshape(shape)


def apply_rope_(q, k, cos, sin, head_dim: int, in_place: bool = True):
    """RoPE on token-major projection outputs, in place where that is safe; returns (q, k).

    q [N, Hq*D] or [B, T, Hq*D], k likewise with Hk heads (token n = b*T + t, T = cos.shape[-2]),
    cos/sin as for apply_rope, D = head_dim. On CUDA, a contiguous q and k that are not views (fresh
    projection outputs) are rotated in place in one launch, autograd-aware; anything else (views
    such as slices of a fused QKV output, leaves that require grad, CPU), or in_place=False (the
    caller does not own q and k), takes apply_rope's out-of-place path: new tensors, same shapes.
    """
    T, D = cos.shape[-2], head_dim
    nq, nk = q.shape[-1], k.shape[-1]
    if nq % D or nk % D or q.numel() % (T * nq) or k.numel() != q.numel() // nq * nk:
        raise ValueError(
            f"apply_rope_: q {tuple(q.shape)} / k {tuple(k.shape)} are not token-major "
            f"with T={T} tokens per row and head_dim {head_dim}"
        )
    B = q.numel() // (T * nq)
    R = cos.shape[-1]
    if (
        in_place
        and triton_enabled(q)
        and q._base is None
        and k._base is None
        and q.is_contiguous()
        and k.is_contiguous()
        and not ((q.is_leaf and q.requires_grad) or (k.is_leaf and k.requires_grad))
        and R % 2 == 0
        and R <= D
        and cos.shape == sin.shape
        and cos.dim() in (2, 3)
        and (cos.dim() == 2 or cos.shape[0] in (1, B))
    ):
        return _RoPEInPlace.apply(q, k, cos, sin, B, T, D)
    q4, k4 = q.reshape(B, T, -1, D).transpose(1, 2), k.reshape(B, T, -1, D).transpose(1, 2)
    qr, kr = apply_rope(q4, k4, cos, sin)  # validates shapes and raises the clear errors
    return _tokens(qr, q.shape), _tokens(kr, k.shape)
