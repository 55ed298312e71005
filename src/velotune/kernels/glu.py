"""Gated linear units: SwiGLU and GeGLU (exact erf and tanh approximation), recomputing in backward.

    h = swiglu(gate, up)                       # silu(gate) * up
    h = geglu(gate, up, approximate="none")    # gelu(gate) * up   ("tanh": gelu_pytorch_tanh)
    h = glu_forward(gate, up, act)             # raw pair for fused MLP functions (no autograd)
    dgate, dup = glu_backward(dh, gate, up, act)   # OVERWRITES the gate / up buffers with the grads
    hA = glu_lora_project(gate, up, A, act)    # act(gate) * up @ A^T, h never made ([N, r])
    dA = glu_lora_a_grad(dhA, gate, up, act)   # dhA^T @ act(gate) * up, h never made (fp32 [r, I])
    dgate, dup = glu_backward(dh, gate, up, act, lora=(dhA, A))   # for dh + dhA @ A, not made either

gate, up, h: [..., I], same shape. act in {"silu", "gelu", "gelu_tanh"} (transformers' names
"swish", "gelu_pytorch_tanh" are accepted too). Semantics equal `ACT2FN[act](gate) * up`.
Backward recomputes act(gate) from the saved gate instead of storing it.

Derivations (a = act(g), h = a * u):  dup = dh * a,  dgate = dh * u * a'(g)
    silu:      a = g * s, s = sigmoid(g);          a' = s * (1 + g * (1 - s))
    gelu:      a = g * P, P = (1 + erf(g/sqrt2))/2; a' = P + g * exp(-g^2/2) / sqrt(2 pi)
    gelu_tanh: a = g * S, S = sigmoid(2y), y = sqrt(2/pi) * (g + 0.044715 g^3)
               (since (1 + tanh y)/2 = sigmoid(2y); no tanh needed, no cancellation)
               a' = S + g * 2 * S * (1 - S) * sqrt(2/pi) * (1 + 3 * 0.044715 g^2)
All math is fp32 and rounds once to the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from velotune.kernels import triton_enabled
from velotune.kernels.launch import launch_named

# The one activation table: accepted name (the kernels' own and transformers' ACT2FN names) -> the
# kernels' name. An activation not listed here is not one these kernels compute exactly.
ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_tanh": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}
_IDS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}  # kernels' name -> the Triton kernels' ACT constant
BLOCK = 1024


def canonical_activation(name) -> str | None:
    """The kernels' name for activation `name` (a transformers ACT2FN key or their own), or None."""
    return ACTIVATIONS.get(name) if isinstance(name, str) else None


def _act_id(act: str) -> int:
    if act not in ACTIVATIONS:
        raise ValueError(f"glu: unknown activation {act!r}; expected one of {sorted(ACTIVATIONS)}")
    return _IDS[ACTIVATIONS[act]]


# ----------------------------------------------------------------------------------------------------
# reference (plain PyTorch, what transformers' MLPs compute)
# ----------------------------------------------------------------------------------------------------
def act_reference(x: torch.Tensor, act: str) -> torch.Tensor:
    """ACT2FN[act](x): F.silu, exact F.gelu, or F.gelu(approximate='tanh')."""
    kind = ACTIVATIONS.get(act)
    if kind is None:
        _act_id(act)
    if kind == "silu":
        return F.silu(x)
    return F.gelu(x, approximate="tanh" if kind == "gelu_tanh" else "none")


def glu_reference(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    return act_reference(gate, act) * up


def _glu_backward_torch(dh, gate, up, act):
    """The hand-derived backward in fp32 torch ops (the CPU path of glu_backward)."""
    g, u, d = gate.float(), up.float(), dh.float()
    kind = ACTIVATIONS[act]
    if kind == "silu":
        s = torch.sigmoid(g)
        a, da = g * s, s * (1 + g * (1 - s))
    elif kind == "gelu":
        p = 0.5 * (1 + torch.erf(g * (1 / math.sqrt(2))))
        a, da = g * p, p + g * torch.exp(-0.5 * g * g) * (1 / math.sqrt(2 * math.pi))
    else:
        k = math.sqrt(2 / math.pi)
        s = torch.sigmoid(2 * k * (g + 0.044715 * g * g * g))
        a = g * s
        da = s + g * 2 * s * (1 - s) * k * (1 + 3 * 0.044715 * g * g)
    return d * u * da, d * a


# ----------------------------------------------------------------------------------------------------
# Triton kernels (elementwise over the flattened, contiguous tensors)
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    """(act(g), act'(g)) in fp32."""
    if ACT == 0:
        s = tl.sigmoid(g)
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    elif ACT == 1:
        p = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        a = g * p
        da = p + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
    else:
        k = 0.7978845608028654  # sqrt(2/pi)
        s = tl.sigmoid(2.0 * k * (g + 0.044715 * g * g * g))
        a = g * s
        da = s + g * 2.0 * s * (1.0 - s) * k * (1.0 + 3.0 * 0.044715 * g * g)
    return a, da


@triton.jit  # n = N * I: a multiple of 16 for every I in use, so its specialisation never changes
def _glu_fwd_kernel(G, U, Hout, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(g, ACT)
    tl.store(Hout + offs, (a * u).to(Hout.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(DH, G, U, DG, DU, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    # DG / DU may alias G / U: every element is read before it is written, by the same program.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT)
    tl.store(DG + offs, (dh * u * da).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dh * a).to(DU.dtype.element_ty), mask=mask)


def _check(gate, up):
    if gate.shape != up.shape:
        raise ValueError(f"glu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")


def _fwd_triton(gate, up, act, out=None):
    g, u = gate.contiguous(), up.contiguous()
    dtype = torch.promote_types(g.dtype, u.dtype)
    # in place over gate or up (out): every element is read before it is written, by the same program
    usable = out is not None and out.is_contiguous() and out.dtype == dtype and out.shape == g.shape
    h = out if usable else torch.empty_like(g, dtype=dtype)
    n = g.numel()
    if n:
        launch_named(
            _PLANS,
            _glu_fwd_kernel,
            (triton.cdiv(n, BLOCK),),
            dict(G=g, U=u, Hout=h, n=n, ACT=_act_id(act), BLOCK=BLOCK),
            num_warps=4,
        )
    return h


def _bwd_triton(dh, gate, up, act, dgate, dup):
    n = gate.numel()
    if n:
        dh = dh.contiguous()
        launch_named(
            _PLANS,
            _glu_bwd_kernel,
            (triton.cdiv(n, BLOCK),),
            dict(DH=dh, G=gate, U=up, DG=dgate, DU=dup, n=n, ACT=_act_id(act), BLOCK=BLOCK),
            num_warps=4,
        )
    return dgate, dup


@triton.jit
def _gate_up_tile(G, U, rows, cols, s_g, s_u, m, ACT: tl.constexpr):
    """The [rows, cols] tiles of G and U in fp32 (0 outside mask m): (act(g), act'(g), u)."""
    g = tl.load(G + rows[:, None] * s_g + cols[None, :], mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * s_u + cols[None, :], mask=m, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT)
    return a, da, u


@triton.jit
def _dot(x, y, IEEE: tl.constexpr):
    """x @ y accumulated in fp32; IEEE: full fp32 products (no TF32), for fp32 inputs."""
    if IEEE:
        return tl.dot(x, y, input_precision="ieee")
    else:
        return tl.dot(x, y)


# The token count N (and the row chunk derived from it) changes every step when batches are packed
# (padding-free): not specialised on, so one compiled kernel serves every length (no compile mid-run).
@triton.jit(do_not_specialize=["N", "CHUNK"])
def _glu_lora_a_grad_kernel(
    DHA,
    G,
    U,
    OUT,
    N,
    I,
    R,
    CHUNK,
    s_dha,
    s_g,
    s_u,
    ACT: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # OUT[s, R, I] (fp32) = DHA[rows_s, R]^T @ h[rows_s], h = act(G) * U rounded to G's dtype as
    # glu_forward rounds it, for the s-th CHUNK of the N rows (a multiple of BLOCK_N): the rows of h
    # are made block by block and never stored. Program (column block, s) walks its chunk (fp32
    # accumulation, fixed order); the caller sums the chunks in a fixed order: deterministic.
    # Splitting N gives I / BLOCK_I * chunks programs (I / BLOCK_I alone is 224 at 8B: under two
    # waves of a 132-SM GPU, each program walking all 4096 rows).
    cols = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    s = tl.program_id(1)
    rr = tl.arange(0, BLOCK_R)
    cmask, rmask_r = cols < I, rr < R
    acc = tl.zeros((BLOCK_R, BLOCK_I), dtype=tl.float32)
    for n0 in range(s * CHUNK, tl.minimum(s * CHUNK + CHUNK, N), BLOCK_N):
        rows = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        m = (rows < N)[:, None] & cmask[None, :]
        a, _, u = _gate_up_tile(G, U, rows, cols, s_g, s_u, m, ACT)
        h = (a * u).to(DHA.dtype.element_ty)
        d = tl.load(DHA + rows[:, None] * s_dha + rr[None, :], mask=(rows < N)[:, None] & rmask_r[None, :], other=0.0)
        acc += _dot(tl.trans(d), h, IEEE)
    tl.store(OUT + (s * R + rr[:, None]) * I + cols[None, :], acc, mask=rmask_r[:, None] & cmask[None, :])


@triton.jit(do_not_specialize=["N"])
def _glu_bwd_lora_kernel(
    DH,
    DHA,
    A,
    G,
    U,
    DG,
    DU,
    N,
    I,
    R,
    s_dh,
    s_dha,
    s_a,
    s_g,
    s_u,
    ACT: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # _glu_bwd_kernel for dh + DHA @ A (the down adapter's rank-r term, [N, r] @ [r, I]), added in
    # fp32 per tile instead of first making that [N, I] sum. DG / DU may alias G / U (same strides):
    # every element is read before it is written, by the same program.
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    rr = tl.arange(0, BLOCK_R)
    rm, cm, km = rows < N, cols < I, rr < R
    m = rm[:, None] & cm[None, :]
    d = tl.load(DHA + rows[:, None] * s_dha + rr[None, :], mask=rm[:, None] & km[None, :], other=0.0)
    a_t = tl.load(A + rr[:, None] * s_a + cols[None, :], mask=km[:, None] & cm[None, :], other=0.0)
    dh = _dot(d, a_t, IEEE)
    dh += tl.load(DH + rows[:, None] * s_dh + cols[None, :], mask=m, other=0.0).to(tl.float32)
    a, da, u = _gate_up_tile(G, U, rows, cols, s_g, s_u, m, ACT)
    tl.store(DG + rows[:, None] * s_g + cols[None, :], (dh * u * da).to(DG.dtype.element_ty), mask=m)
    tl.store(DU + rows[:, None] * s_u + cols[None, :], (dh * a).to(DU.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["N"])
def _glu_lora_project_kernel(
    G,
    U,
    A,
    OUT,
    N,
    I,
    R,
    CHUNK,
    s_g,
    s_u,
    s_a,
    ACT: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # OUT[s, N, R] (fp32) = h[:, cols_s] @ A[:, cols_s]^T for the s-th CHUNK of the I columns (a
    # multiple of BLOCK_I), h = act(G) * U rounded to G's dtype as glu_forward rounds it. Program
    # (row block, s) walks its chunk making h a [BLOCK_N, BLOCK_I] tile at a time in registers (never
    # stored), accumulating in fp32 in a fixed order; the caller sums the chunks (fixed order too:
    # deterministic) and rounds once. Splitting I gives N / BLOCK_N * chunks programs, enough to
    # keep every SM streaming gate and up (N / BLOCK_N alone is 128 at 4096 tokens).
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    s = tl.program_id(1)
    rr = tl.arange(0, BLOCK_R)
    rm, km = rows < N, rr < R
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for i0 in range(s * CHUNK, tl.minimum(s * CHUNK + CHUNK, I), BLOCK_I):
        cols = i0 + tl.arange(0, BLOCK_I)
        cm = cols < I
        m = rm[:, None] & cm[None, :]
        a, _, u = _gate_up_tile(G, U, rows, cols, s_g, s_u, m, ACT)
        h = (a * u).to(A.dtype.element_ty)
        a_t = tl.load(A + rr[None, :] * s_a + cols[:, None], mask=cm[:, None] & km[None, :], other=0.0)  # A^T tile
        acc += _dot(h, a_t, IEEE)
    tl.store(OUT + (s * N + rows[:, None]) * R + rr[None, :], acc, mask=rm[:, None] & km[None, :])


# Tiles and warps of the three rank-r kernels above (lora/fused.py's MLP): the fastest of
# bench/glu_tune.py's sweep at the 8B shape (N 4096, I 14336, r 16, bf16; docs/perf-notes.md).
LORA_PROJECT_BLOCK_N, LORA_PROJECT_BLOCK_I = 128, 64  # glu_lora_project: rows per program, columns per step
LORA_PROJECT_SPLIT = 8  # and at most this many programs per row block, each over its chunk of the columns
LORA_PROJECT_WARPS = 8

LORA_A_BLOCK_I = 64  # glu_lora_a_grad: columns per program
LORA_A_BLOCK_N = 64  # rows per step
LORA_A_SPLIT = 8  # and at most this many programs per column block, each over its chunk of the rows
LORA_A_WARPS = 8
LORA_BLOCK_N, LORA_BLOCK_I = 32, 128  # glu_backward(lora=...): one [rows, columns] tile per program
LORA_BWD_WARPS = 8


_PLANS: dict = {}  # launch plans (kernels/launch.py), forward and backward


def _rank_r_fused(r: int, *ts: torch.Tensor) -> bool:
    """The fused rank-r kernels apply: Triton, [rows, columns] tensors whose rows may be strided
    but whose columns are contiguous, one dtype, r <= 128 (the rank is padded to BLOCK_R)."""
    return (
        triton_enabled(ts[0])
        and r <= 128
        and len({t.dtype for t in ts}) == 1
        and all(t.dim() == 2 and t.stride(1) == 1 for t in ts)
    )


def _chunks(n: int, most: int, block: int) -> tuple[int, int]:
    """(how many chunks, chunk length): n split into at most `most` chunks, each a multiple of
    `block` long (the last may be shorter), one program per chunk summed by the caller."""
    split = max(1, min(most, triton.cdiv(n, block)))
    chunk = triton.cdiv(triton.cdiv(n, split), block) * block
    return triton.cdiv(n, chunk), chunk


def _rank_r_args(
    gate: torch.Tensor, up: torch.Tensor, act: str, r: int, block_n: int, block_i: int, **operands: torch.Tensor
) -> dict:
    """The arguments of a rank-r kernel: gate / up [N, I] and its other `operands` (parameter name ->
    tensor, e.g. DHA=dhA), each with its row stride (s_g, s_u, s_<name in lower case>), the sizes,
    and the constexprs: the activation, IEEE fp32 dots for fp32 inputs, the tiles (BLOCK_N rows,
    BLOCK_I columns) and the rank padded to a power of two, at least 16 (tl.dot's minimum)."""
    N, I = gate.shape
    strides = {f"s_{name.lower()}": t.stride(0) for name, t in operands.items()}
    return dict(
        operands,
        **strides,
        G=gate,
        U=up,
        N=N,
        I=I,
        R=r,
        s_g=gate.stride(0),
        s_u=up.stride(0),
        ACT=_act_id(act),
        IEEE=gate.dtype == torch.float32,
        BLOCK_N=block_n,
        BLOCK_I=block_i,
        BLOCK_R=max(16, triton.next_power_of_2(r)),
    )


def _split_sum(kernel, named: dict, over: str, most: int, shape: tuple, warps: int):
    """fp32 `shape`: `kernel` with the arguments `named` (`_rank_r_args`; CHUNK and OUT added here)
    over a (blocks, chunks) grid: its reduction dimension `over` ("N", the rows, walked BLOCK_N at a
    time, or "I", the columns, BLOCK_I at a time) split into at most `most` chunks (`_chunks`), one
    program per tile of the other dimension and chunk, each writing its chunk's partial sum to
    OUT[chunk]; the partials are summed in a fixed order (deterministic). Zeros when there is
    nothing to sum or no output."""
    other = "I" if over == "N" else "N"
    n, block = named[over], named[f"BLOCK_{over}"]
    blocks = triton.cdiv(named[other], named[f"BLOCK_{other}"])
    device = named["G"].device
    if not (n and blocks and all(shape)):
        return torch.zeros(shape, dtype=torch.float32, device=device)
    split, chunk = _chunks(n, most, block)
    parts = torch.empty((split, *shape), dtype=torch.float32, device=device)
    launch_named(_PLANS, kernel, (blocks, split), dict(named, OUT=parts, CHUNK=chunk), num_warps=warps)
    return parts[0] if split == 1 else parts.sum(0)


def glu_lora_a_grad(dhA: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """dhA^T @ h for h = act(gate) * up (in h's dtype, as glu_forward gives it), without making h.

    dhA [N, r], gate / up [N, I] (rows may be strided, e.g. halves of Phi-3's [gate | up]) ->
    [r, I] in float32. The gradient of the down projection's LoRA A (hA = h @ A^T) in the fused
    MLP's backward: there h would be a fourth [N, I] tensor alive beside gate, up and dh, the step's
    memory peak; here the columns of h are made in registers, a block of rows at a time, and
    accumulated in fp32 (one rounding, at the caller's cast). CPU: h is made, and the GEMM rounds to
    dhA's dtype first (the reference path)."""
    _check(gate, up)
    N, I = gate.shape
    r = dhA.shape[1]
    if not _rank_r_fused(r, dhA, gate, up):
        return (dhA.t() @ glu_forward(gate, up, act)).float()
    named = _rank_r_args(gate, up, act, r, LORA_A_BLOCK_N, LORA_A_BLOCK_I, DHA=dhA)
    return _split_sum(_glu_lora_a_grad_kernel, named, "N", LORA_A_SPLIT, (r, I), LORA_A_WARPS)


def glu_lora_project(
    gate: torch.Tensor, up: torch.Tensor, A: torch.Tensor, act: str, h: torch.Tensor | None = None
) -> torch.Tensor:
    """h @ A^T for h = act(gate) * up (in h's dtype, as glu_forward gives it), without making h.

    gate / up [N, I] (rows may be strided, as glu_lora_a_grad), A [r, I] in their dtype -> [N, r] in
    that dtype. The down projection's LoRA A applied to the MLP's hidden activation: in a recompute
    (where nothing reads h itself, lora/fused.py) h would be one more [N, I] tensor beside gate, up,
    dh and the dequantised weights, the MLP backward's memory peak (112 MiB at 8B, 2 x 2048). GPU:
    fp32 accumulation over I, one rounding. CPU (the reference path): h (made, or the `h` given)
    @ A^T."""
    _check(gate, up)
    N, I = gate.shape
    r = A.shape[0]
    if not (A.shape[1] == I and _rank_r_fused(r, gate, up, A)):
        return (glu_forward(gate, up, act) if h is None else h) @ A.t()
    named = _rank_r_args(gate, up, act, r, LORA_PROJECT_BLOCK_N, LORA_PROJECT_BLOCK_I, A=A)
    hA = _split_sum(_glu_lora_project_kernel, named, "I", LORA_PROJECT_SPLIT, (N, r), LORA_PROJECT_WARPS)
    return hA.to(gate.dtype)


# ----------------------------------------------------------------------------------------------------
# raw pair (for fused MLP functions that own their buffers)
# ----------------------------------------------------------------------------------------------------
def glu_forward(gate: torch.Tensor, up: torch.Tensor, act: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """h = act(gate) * up, no autograd. [..., I] x2 -> [..., I]. out (e.g. gate itself, when nothing
    reads gate afterwards): h is written there when it is contiguous and of h's dtype and shape, else
    into a new tensor; use the returned tensor either way."""
    _check(gate, up)
    _act_id(act)
    if triton_enabled(gate):
        return _fwd_triton(gate, up, act, out)
    h = glu_reference(gate, up, act)
    return out.copy_(h) if out is not None and out.dtype == h.dtype and out.shape == h.shape else h


def glu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: str, lora=None):
    """(dgate, dup) for h = act(gate) * up; the results are written INTO gate and up when they are
    contiguous (the caller gives up those buffers), else into new tensors.

    lora=(dhA [N, r], A [r, I]): the incoming gradient is dh + dhA @ A (h also fed the down
    projection's LoRA A). On the GPU ([N, I] inputs) that term is added per tile in fp32 and
    dgate / dup are written into gate / up even when their rows are strided: no [N, I] sum is made
    (one fewer such tensor at the MLP backward's memory peak). CPU: `torch.addmm` first, as before."""
    _check(gate, up)
    _act_id(act)
    if lora is not None:
        dhA, A = lora
        if dh.shape == gate.shape and _rank_r_fused(dhA.shape[1], dh, gate, up, dhA, A):
            N, I = gate.shape
            if gate.numel():
                # DG / DU: the grads written over gate / up, with their row strides (s_g / s_u)
                named = _rank_r_args(gate, up, act, dhA.shape[1], LORA_BLOCK_N, LORA_BLOCK_I, DH=dh, DHA=dhA, A=A)
                launch_named(
                    _PLANS,
                    _glu_bwd_lora_kernel,
                    (triton.cdiv(N, LORA_BLOCK_N), triton.cdiv(I, LORA_BLOCK_I)),
                    dict(named, DG=gate, DU=up),
                    num_warps=LORA_BWD_WARPS,
                )
            return gate, up
        dh = torch.addmm(dh, dhA, A)
    if triton_enabled(gate):
        dg = gate if gate.is_contiguous() else torch.empty_like(gate, memory_format=torch.contiguous_format)
        du = up if up.is_contiguous() else torch.empty_like(up, memory_format=torch.contiguous_format)
        return _bwd_triton(dh, gate.contiguous(), up.contiguous(), act, dg, du)
    dg, du = _glu_backward_torch(dh, gate, up, act)
    return gate.copy_(dg), up.copy_(du)


# ----------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------
class _GLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, act):
        g, u = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(g, u)
        ctx.act = act
        return _fwd_triton(g, u, act)

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        # gate/up may still be referenced by the caller (or by a retained graph): fresh outputs here;
        # fused MLP functions that own the buffers call glu_backward to reuse them instead.
        dg, du = torch.empty_like(g), torch.empty_like(u)
        _bwd_triton(dh, g, u, ctx.act, dg, du)
        return dg, du, None


def glu(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up with autograd. gate, up [..., I] -> [..., I]."""
    _check(gate, up)
    _act_id(act)
    if not triton_enabled(gate):
        return glu_reference(gate, up, act)
    return _GLU.apply(gate, up, act)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up. [..., I] x2 -> [..., I]."""
    return glu(gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """gelu(gate) * up, exact erf (approximate="none") or tanh approximation ("tanh")."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"geglu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return glu(gate, up, "gelu" if approximate == "none" else "gelu_tanh")
