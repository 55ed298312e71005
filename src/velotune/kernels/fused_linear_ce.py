"""Fused lm_head + cross-entropy: the loss from hidden states without ever materialising [N, V].

    loss = fused_linear_cross_entropy(hidden, weight, labels, bias=None, softcap=None,
                                      logit_scale=None, ignore_index=-100, reduction="mean",
                                      num_items_in_batch=None, memory_budget_bytes=256 * 2**20)

hidden [N, H], weight [V, H] (lm_head layout), bias [V] or None, labels [N] ALREADY shifted.
Same loss as `cross_entropy(hidden @ weight.T + bias, labels, ...)` (see cross_entropy.py for the
softcap / scale / reduction semantics).

Algorithm: the rows are processed in chunks of C rows, C = memory_budget_bytes // (V * itemsize)
(deterministic: the budget is an argument, never read from free memory). For each chunk, in forward:
    logits_c = hidden_c @ weight.T (+ bias)        [C, V] in the compute dtype, fp32 accumulation (cuBLAS)
    loss_c, lse_c = CE forward kernel on logits_c  (fp32 math)
    logits_c <- coef * dloss/dlogits_c              (CE backward kernel, IN PLACE over logits_c)
    d_hidden_c = logits_c @ weight                  [C, H]
    dW += logits_c.T @ hidden_c                     fp32 accumulator, only if weight.requires_grad;
                                                    16-bit weights on the GPU: halves_accumulator.py
                                                    (cuBLAS, fp32; dW is cast in place at the end)
    db += logits_c.sum(0)                           fp32, only if bias.requires_grad
With both d_hidden and an in-place dW accumulator on the GPU, the dW GEMM runs on a side stream
concurrently with the d_hidden GEMM (both only read logits_c and hidden_c; the next chunk waits for
both), so the accumulator traffic and the tail of the other GEMM's waves may overlap.
coef = 1 / denominator (#non-ignored rows, num_items_in_batch or 1), a device tensor: no host sync.
Backward only multiplies the stored gradients by grad_output. So one [C, V] buffer is ever alive,
and the three matmuls of stock lm_head training happen exactly once each.

Ignored rows: their loss and gradient rows are exact zeros, so they add nothing to d_hidden/dW, and
they can be dropped before the matmuls (each chunk gathers its kept rows; dX rows are scattered into
zeros). That needs the kept-row count on the host. `kept_rows` takes the indices from the caller:
the training forward (models/loss.py) makes them with `KeptRows`, which launches the count's
device->host copy before the decoder layers run, so reading it at the loss never stalls the GPU.
`drop_ignored=True` finds them here, with one sync; by default every row goes through the matmuls.
"""

from __future__ import annotations

import torch

from velotune.kernels import halves_accumulator, triton_enabled
from velotune.kernels.cross_entropy import (
    ce_backward_rows,
    ce_forward_rows,
    cross_entropy_reference,
    loss_denominator,
    transform_logits_reference,
)

# At most 256 MiB of logits per chunk (1046 rows at a 128256 vocab). With a trainable bf16 lm_head
# the fp32 dW accumulator (4 bytes per element, 1.96 GiB at Llama-3's shape) plus this chunk and dX
# stay under 10% of what stock lm_head + cross-entropy allocates (23.5 GiB at 16K tokens; measured
# figures in BENCHMARKS.md).
DEFAULT_BUDGET = 256 * 2**20


def fused_linear_cross_entropy_reference(
    hidden, weight, labels, *, bias=None, memory_budget_bytes=DEFAULT_BUDGET, **ce_options
):
    """Stock path: full logits [N, V] from F.linear, then cross_entropy_reference(logits, labels,
    **ce_options) (ignore_index, softcap, logit_scale, reduction, num_items_in_batch).
    memory_budget_bytes is accepted so that both functions take the same arguments; unused here."""
    return cross_entropy_reference(torch.nn.functional.linear(hidden, weight, bias), labels, **ce_options)


def check_head_args(fn, hidden, weight, bias, per_row, memory_budget_bytes):
    """ValueError, prefixed with the caller's name `fn`, unless hidden is [N, H], weight [V, H], bias [V]
    or None, the per-row tensor (name, tensor) [N] and the chunk budget positive (the fused lm_head heads)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{fn}: need hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    name, rows = per_row
    if rows.shape != hidden.shape[:1]:
        raise ValueError(f"{fn}: {name} {tuple(rows.shape)} != [N={hidden.shape[0]}]")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"{fn}: bias {tuple(bias.shape)} != [V={weight.shape[0]}]")
    if memory_budget_bytes <= 0:
        raise ValueError(f"{fn}: memory_budget_bytes must be positive")


def fused_linear_cross_entropy(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    softcap=None,
    logit_scale=None,
    ignore_index=-100,
    reduction="mean",
    num_items_in_batch=None,
    memory_budget_bytes=DEFAULT_BUDGET,
    drop_ignored=False,
    kept_rows=None,
):
    """Scalar fp32 loss; grads for hidden, and for weight / bias only when they require grad.

    Ignored rows can be dropped before the matmuls (they add nothing to the loss or the gradients):
    kept_rows: int64 [n] indices of the rows to keep, ascending (`KeptRows` makes them without
    waiting on the GPU: the training forward starts the count's copy to the host before the decoder
    layers run); or drop_ignored=True: computed here, at the price of ONE device->host sync per call
    (the row count). Default: every row goes through the matmuls, sync-free.
    """
    check_head_args("fused_linear_cross_entropy", hidden, weight, bias, ("labels", labels), memory_budget_bytes)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"fused_linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if kept_rows is not None and (kept_rows.dim() != 1 or kept_rows.numel() > hidden.shape[0]):
        raise ValueError(
            f"fused_linear_cross_entropy: kept_rows must be [n <= N={hidden.shape[0]}] indices, "
            f"got {tuple(kept_rows.shape)}"
        )
    rows = kept_rows if kept_rows is not None else bool(drop_ignored)
    return _FusedLinearCE.apply(
        hidden,
        weight,
        labels,
        bias,
        softcap,
        logit_scale,
        ignore_index,
        reduction,
        num_items_in_batch,
        int(memory_budget_bytes),
        rows,
    )


class KeptRows:
    """The rows of `labels` [N] that are not ignore_index, found without a blocking device->host sync.

        kept = KeptRows(labels)          # early (e.g. before the decoder layers run): launches the work
        ...                              # the GPU gets there long before the host needs the count
        loss = fused_linear_cross_entropy(..., kept_rows=kept.rows())

    On the device: a stable argsort puts the kept rows first, in order, and their count is copied to
    pinned host memory behind an event. `rows()` waits on that event, which by then has completed, so
    the host never stalls the GPU queue. Returns None when no row is ignored (nothing to drop).
    """

    def __init__(self, labels: torch.Tensor, ignore_index: int = -100):
        keep = labels.reshape(-1) != ignore_index
        self.n_rows = keep.numel()
        self.order = torch.argsort((~keep).to(torch.int8), stable=True)  # kept rows first, in order
        count = keep.sum()
        self.event = None
        if count.is_cuda:
            self.count = torch.empty((), dtype=count.dtype, pin_memory=True)
            self.count.copy_(count, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(count.device))
        else:
            self.count = count

    def rows(self) -> torch.Tensor | None:
        if self.event is not None:
            self.event.synchronize()
        n = int(self.count)
        return None if n == self.n_rows else self.order[:n]


def chunk_rows(n_rows: int, vocab: int, itemsize: int, budget: int) -> int:
    """Rows per chunk: as few chunks as one [C, V] logits chunk within the byte budget allows, then
    the rows spread evenly over them (at least 1), so the budget is an upper bound and the last
    chunk is not a sliver (e.g. 14746 rows at a 1046-row budget: 15 chunks of 984, not 14 x 1046 + 102)."""
    cap = max(1, min(n_rows, budget // max(1, vocab * itemsize)))
    n_chunks = -(-n_rows // cap) if n_rows else 1
    return max(1, -(-n_rows // n_chunks))


# ----------------------------------------------------------------------------------------------------
# the per-chunk loss/gradient pass: Triton on CUDA, the same math in torch on CPU
# ----------------------------------------------------------------------------------------------------
def _chunk_loss_and_grad(logits, labels, coef, ignore_index, softcap, logit_scale, want_grad):
    """logits [C, V] -> loss rows [C] fp32; if want_grad, logits is overwritten by coef * dloss/dlogits."""
    if triton_enabled(logits):
        loss, lse = ce_forward_rows(logits, labels, ignore_index, softcap, logit_scale)
        if want_grad:
            ce_backward_rows(logits, labels, lse, coef, ignore_index, softcap, logit_scale, out=logits)
        return loss
    z = transform_logits_reference(logits, softcap, logit_scale)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(z, dim=-1)
    loss = torch.where(valid, lse - z.gather(1, safe[:, None])[:, 0], torch.zeros_like(lse))
    if want_grad:
        p = torch.exp(z - lse[:, None])
        p[torch.arange(len(labels)), safe] -= 1.0
        dz = torch.ones_like(z)
        if softcap is not None:
            dz = 1.0 - (z / softcap) ** 2
        if logit_scale is not None:
            dz = dz * logit_scale
        g = torch.where(valid[:, None], coef * p * dz, torch.zeros_like(p))
        logits.copy_(g)
    return loss


_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


_OUT_DTYPE_ADDMM = [True]  # cuBLAS bf16/fp16 x bf16/fp16 -> fp32 addmm available (checked on first use)


def _accumulate_fp32(acc, a, b):
    """acc (fp32) += a @ b with fp32 accumulation and no rounding of the partial product:
    cuBLAS' low-precision GEMM with an fp32 output (torch's addmm out_dtype) where available,
    else the operands upcast to fp32."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _OUT_DTYPE_ADDMM[0]:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):
            _OUT_DTYPE_ADDMM[0] = False
    acc.addmm_(a.float(), b.float())


def _dw_in_place(hidden, weight, dtype) -> bool:
    """dW is summed in the in-place accumulator (halves_accumulator.py: cuBLAS into two fp32 row
    halves, the 16-bit gradient cast in place at the end): 16-bit weights of the compute dtype on the
    Triton path. Otherwise a plain fp32 accumulator, cast out of place."""
    return weight.dtype == dtype and dtype in (torch.bfloat16, torch.float16) and triton_enabled(hidden)


def _new_dw(V: int, H: int, device, zero: bool):
    acc = halves_accumulator.new_accumulator(V, H, device)
    if zero:
        for t in acc:
            t.zero_()
    return acc


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, labels, bias, softcap, logit_scale, ignore_index, reduction, num_items, budget, drop
    ):
        N, H = hidden.shape
        V = weight.shape[0]
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[3]
        want_grad = need_dh or need_dw or need_db
        labels = labels.contiguous()
        denom = loss_denominator(labels, ignore_index, reduction, num_items)
        coef = (1.0 / denom).reshape(())
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
        rows = None  # drop: kept-row indices (host-known length), or True: find them here
        if isinstance(drop, torch.Tensor):
            rows = drop
        elif drop:  # the one host sync of this option: nonzero() needs the count
            rows = (labels != ignore_index).nonzero().squeeze(1)
        if rows is not None:  # chunks gather their rows (no [n, H] copy); labels are small
            rows = rows.to(hidden.device)
            labels = labels.index_select(0, rows)
        M = N if rows is None else rows.numel()
        # with dropped rows, dX rows are scattered into zeros: ignored rows get exact zeros
        make = torch.empty if rows is None else torch.zeros
        d_hidden = make((N, H), dtype=hidden.dtype, device=hidden.device) if need_dh else None
        # dW: an fp32 running sum over the row chunks. 16-bit weights through Triton: an accumulator
        # whose result is written in place (see _dw_in_place), else a plain fp32 one
        in_place = need_dw and _dw_in_place(hidden, weight, dtype)
        d_weight = None
        if in_place:  # uninitialised: the first chunk's GEMM writes every element (zeros if no chunk runs)
            d_weight = _new_dw(V, H, weight.device, zero=M == 0)
        elif need_dw:
            d_weight = torch.zeros((V, H), dtype=torch.float32, device=weight.device)
        d_bias = torch.zeros(V, dtype=torch.float32, device=weight.device) if need_db else None
        loss_rows = torch.empty(M, dtype=torch.float32, device=hidden.device)
        step = chunk_rows(M, V, torch.finfo(dtype).bits // 8, budget)
        w = weight.to(dtype)
        for s in range(0, M, step):
            e = min(s + step, M)
            idx = None if rows is None else rows[s:e]
            h = (hidden[s:e] if idx is None else hidden.index_select(0, idx)).to(dtype)
            logits = torch.addmm(bias.to(dtype), h, w.t()) if bias is not None else h @ w.t()
            loss_rows[s:e] = _chunk_loss_and_grad(
                logits, labels[s:e], coef, ignore_index, softcap, logit_scale, want_grad
            )
            side = None
            if in_place and need_dh and logits.is_cuda:
                main = torch.cuda.current_stream(logits.device)
                side = _side_stream(logits.device)
                side.wait_stream(main)  # the CE kernel has written logits_c
            if need_dh and idx is not None:
                d_hidden.index_copy_(0, idx, (logits @ w).to(d_hidden.dtype))
            elif need_dh and d_hidden.dtype == dtype:  # rows s:e of a contiguous tensor: no copy
                torch.mm(logits, w, out=d_hidden[s:e])
            elif need_dh:
                d_hidden[s:e] = logits @ w
            if side is not None:
                with torch.cuda.stream(side):
                    halves_accumulator.accumulate_(d_weight, logits, h, first=s == 0)
                main.wait_stream(side)  # before logits_c is freed and its memory reused (no record_stream)
            elif in_place:
                halves_accumulator.accumulate_(d_weight, logits, h, first=s == 0)
            elif need_dw:
                _accumulate_fp32(d_weight, logits.t(), h)
            if need_db:
                d_bias += logits.float().sum(0)
            del logits  # before the next chunk's logits exist: one [C, V] buffer alive, not two
        parts = d_weight if in_place else (d_weight, None)
        ctx.save_for_backward(d_hidden, *parts, d_bias)
        ctx.in_place = in_place
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.used = False
        return loss_rows.sum() / denom

    @staticmethod
    def backward(ctx, grad):
        # The gradients were computed in forward; scale them by grad_output IN PLACE (no second
        # [V, H] fp32 buffer), so this backward can run only once.
        if ctx.used:
            raise RuntimeError("fused_linear_cross_entropy: backward can run only once (no retain_graph)")
        ctx.used = True
        d_hidden, d_weight, d_weight_2, d_bias = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        dh = d_hidden.mul_(grad.to(d_hidden.dtype)) if d_hidden is not None else None
        if ctx.in_place:  # dtype(fp32 sum * grad) written over the top half's storage
            dw = halves_accumulator.finalize_((d_weight, d_weight_2), grad, w_dtype)
        else:
            dw = d_weight.mul_(grad).to(w_dtype) if d_weight is not None else None
        db = d_bias.mul_(grad).to(b_dtype) if d_bias is not None else None
        return dh, dw, None, db, None, None, None, None, None, None, None
