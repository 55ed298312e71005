"""AdamW whose moments live in host memory: torch's own update, run on the GPU a chunk at a time.

    opt = OffloadedAdamW(params, lr=2e-4, weight_decay=0.01, fused=True)   # as torch.optim.AdamW

An AdamW step needs, per trainable parameter, two fp32 moments (exp_avg, exp_avg_sq) that are read
and written once per step and never between. For an 8B model's LoRA adapters (r=16, all seven
projections: 42M parameters) that is 0.31 GiB of GPU memory held for a few milliseconds of work per
step. Here the moments stay in pinned host memory; a step walks the parameters in chunks of about
`chunk_bytes` of moments and, per chunk:

    h2d stream:      wait until this staging buffer's previous chunk went back; moments -> staging
                     (one copy: a chunk's moments are one flat pinned buffer)
    current stream:  wait for that copy; torch.optim.adamw.adamw(params, grads, staging views, ...)
    d2h stream:      wait for the update; staging -> moments (one copy)

with two staging buffers, so chunk k's update runs while chunk k+1 comes in and chunk k-1 goes out.
GPU memory for the moments: 2 x chunk_bytes (default 16 MiB) instead of all of them (8B adapters:
32 MiB instead of 320 MiB).

Exact: the update is torch's `adamw` function itself (the fused, foreach or single-tensor
implementation torch.optim.AdamW would pick for the same flags), and every one of them works
element by element, so running it on a chunk gives the same bits as running it on all parameters
at once (tests compare with torch.optim.AdamW over several steps). The step counts are kept as
torch.optim.AdamW keeps them (on the parameter's device when fused). On the CPU (tests) the same
walk runs with plain copies.

Cost: the moments cross the host link twice per step (2 x 0.31 GiB for the 8B adapters, overlapped
with each other and with the updates; the copies out also overlap the next step's start). Measured
on an H200 (8B QLoRA, graphed recompute="mlp", BENCHMARKS.md "session 11"): peak 6.26 -> 5.98 GiB
(0.377x of stock transformers + bitsandbytes + PEFT), ~1.2% slower per step than torch's fused AdamW.
"""
from __future__ import annotations

import torch
from torch.optim.adamw import adamw

_MOMENTS = ("exp_avg", "exp_avg_sq")


class OffloadedAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW for fp32 parameters (amsgrad and maximize not supported) with exp_avg /
    exp_avg_sq in pinned host memory; see the module docstring. Gradient clipping, schedulers,
    zero_grad, state_dict and load_state_dict work as with torch.optim.AdamW (loaded moments go back
    to host memory)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, foreach: bool | None = None, fused: bool | None = None,
                 chunk_bytes: int = 16 * 2**20):
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes={chunk_bytes}: must be positive")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach, fused=fused)
        super().__init__(params, defaults)
        self.chunk_bytes = chunk_bytes
        self._plans: dict[int, list[_Chunk]] = {}        # per param group: its chunks
        self._staging: dict[torch.device, list[torch.Tensor]] = {}
        self._pending: list = []          # d2h events of the last step (host moments not yet written)

    # -- state ---------------------------------------------------------------------------------
    def _plan(self, gi: int) -> list["_Chunk"]:
        """The group's chunks, made on first use: every parameter's step count as torch keeps it,
        and its two moments as views of its chunk's one pinned host buffer (in the order the staging
        buffer lays them out), holding the values state already has (after load_state_dict)."""
        plan = self._plans.get(gi)
        if plan is None:
            group = self.param_groups[gi]
            for p in group["params"]:
                if p.dtype != torch.float32:
                    raise TypeError(f"OffloadedAdamW updates fp32 parameters (PEFT's adapters are), got {p.dtype}")
            plan = self._plans[gi] = [_Chunk(c) for c in _chunks(group["params"], self.chunk_bytes)]
            on_device = bool(group["fused"])    # as torch.optim.AdamW: fused keeps its step on the device
            for chunk in plan:
                for p, views in zip(chunk.params, chunk.moment_views()):
                    state = self.state[p]
                    step = state.get("step")
                    state["step"] = (torch.zeros((), dtype=torch.float32) if step is None else step.float()).to(
                        p.device if on_device else "cpu")
                    for name, view in zip(_MOMENTS, views):
                        if name in state:
                            view.copy_(state[name])
                        state[name] = view
        return plan

    def _wait_for_host(self) -> None:
        """The host moments are written (the last step's device->host copies are done)."""
        for event in self._pending:
            event.synchronize()
        self._pending = []

    def state_dict(self):
        self._wait_for_host()
        return super().state_dict()

    def load_state_dict(self, state_dict) -> None:
        self._wait_for_host()
        super().load_state_dict(state_dict)     # torch moves the moments to the parameters' device...
        self._plans = {}                        # ... and the next step copies them into host chunks

    # -- the step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._pending = []    # this step's copies out queue after the last step's (one d2h stream)
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("OffloadedAdamW does not support sparse gradients")
            self._step_group(group, self._plan(gi))
        return loss

    def _step_group(self, group: dict, plan: list["_Chunk"]) -> None:
        todo = [c for c in plan if any(p.grad is not None for p in c.params)]
        if not todo:
            return
        device = todo[0].params[0].device
        cuda = device.type == "cuda"
        if cuda:
            current = torch.cuda.current_stream(device)
            h2d, d2h = _streams(device)
            h2d.wait_stream(current)          # gradients and parameters are ready
            h2d.wait_stream(d2h)              # the last step's copies out (host moments, staging) are done
        staging = self._staging_buffers(device, max(c.host.numel() for c in todo))
        freed: list = [None, None]            # per staging buffer: its last chunk's d2h event
        beta1, beta2 = group["betas"]
        for k, chunk in enumerate(todo):
            buf = staging[k % 2][:chunk.host.numel()]
            if cuda:
                with torch.cuda.stream(h2d):
                    if freed[k % 2] is not None:
                        h2d.wait_event(freed[k % 2])
                    buf.copy_(chunk.host, non_blocking=True)          # one copy per chunk
                    came = torch.cuda.Event()
                    came.record(h2d)
                current.wait_event(came)
            else:
                buf.copy_(chunk.host)
            live = [(p, v) for p, v in zip(chunk.params, chunk.moment_views(buf)) if p.grad is not None]
            adamw([p for p, _ in live], [p.grad for p, _ in live], [v[0] for _, v in live],
                  [v[1] for _, v in live], [], [self.state[p]["step"] for p, _ in live],
                  foreach=group["foreach"], fused=group["fused"], amsgrad=False, beta1=beta1, beta2=beta2,
                  lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
            if cuda:
                d2h.wait_stream(current)
                with torch.cuda.stream(d2h):
                    chunk.host.copy_(buf, non_blocking=True)
                    gone = torch.cuda.Event()
                    gone.record(d2h)
                freed[k % 2] = gone
                self._pending.append(gone)
            else:
                chunk.host.copy_(buf)
        # The copies out overlap whatever the current stream queues next (the next forward): nothing
        # there reads the staging buffers, and the next step's copies in wait for these (above).

    def _staging_buffers(self, device: torch.device, numel: int) -> list[torch.Tensor]:
        bufs = self._staging.get(device)
        if bufs is None or bufs[0].numel() < numel:
            if bufs is not None and device.type == "cuda":     # the old ones may still be copied out
                torch.cuda.current_stream(device).wait_stream(_streams(device)[1])
            bufs = self._staging[device] = [torch.empty(numel, dtype=torch.float32, device=device) for _ in range(2)]
        return bufs


class _Chunk:
    """Consecutive parameters and one flat fp32 host buffer with their moments, laid out
    p0.exp_avg, p0.exp_avg_sq, p1.exp_avg, ... (pinned when the parameters are on the GPU)."""

    def __init__(self, params: list):
        self.params = params
        numel = sum(2 * p.numel() for p in params)
        self.host = torch.zeros(numel, dtype=torch.float32, pin_memory=params[0].is_cuda)

    def moment_views(self, flat: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(exp_avg, exp_avg_sq) per parameter as views of `flat` (default: the host buffer)."""
        flat = self.host if flat is None else flat
        out, off = [], 0
        for p in self.params:
            n = p.numel()
            out.append((flat[off:off + n].view(p.shape), flat[off + n:off + 2 * n].view(p.shape)))
            off += 2 * n
        return out


def _chunks(params: list, chunk_bytes: int) -> list[list]:
    """Consecutive parameters, as many per chunk as keep their two fp32 moments within chunk_bytes
    (a parameter larger than that is a chunk of its own)."""
    out, cur, size = [], [], 0
    for p in params:
        b = 2 * p.numel() * 4
        if cur and size + b > chunk_bytes:
            out.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += b
    if cur:
        out.append(cur)
    return out


_STREAMS: dict = {}


def _streams(device: torch.device):
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _STREAMS:
        _STREAMS[key] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
    return _STREAMS[key]
