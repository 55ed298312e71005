"""AdamW whose moments live in host memory: torch's own update, run on the GPU a chunk at a time.

    opt = OffloadedAdamW(params, lr=2e-4, weight_decay=0.01, fused=True)   # as torch.optim.AdamW

An AdamW step needs, per trainable parameter, two fp32 moments (exp_avg, exp_avg_sq) that are read
and written once per step and never between. For an 8B model's LoRA adapters (r=16, all seven
projections: 42M parameters) that is 0.31 GiB of GPU memory held for a few milliseconds of work per
step. Here the moments stay in pinned host memory; a step walks the parameters in chunks of about
`chunk_bytes` of moments and, per chunk:

    h2d stream:      wait until this staging buffer's previous chunk went back; moments -> staging
    current stream:  wait for that copy; torch.optim.adamw.adamw(params, grads, staging views, ...)
    d2h stream:      wait for the update; staging -> moments

with two staging buffers, so chunk k's update runs while chunk k+1 comes in and chunk k-1 goes out.
GPU memory for the moments: 2 x chunk_bytes instead of all of them.

Exact: the update is torch's `adamw` function itself (the fused, foreach or single-tensor
implementation torch.optim.AdamW would pick for the same flags), and every one of them works
element by element, so running it on a chunk gives the same bits as running it on all parameters
at once (tests compare with torch.optim.AdamW over several steps). The step counts are kept as
torch.optim.AdamW keeps them (on the parameter's device when fused). On the CPU (tests) the same
walk runs with plain copies.

Cost: the moments cross the host link twice per step (2 x 0.31 GiB for the 8B adapters, overlapped
with each other and with the updates; not yet measured on a GPU).
"""
from __future__ import annotations

import torch
from torch.optim.adamw import adamw

_MOMENTS = ("exp_avg", "exp_avg_sq")


class OffloadedAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW for fp32 parameters (amsgrad and maximize not supported) with exp_avg /
    exp_avg_sq in pinned host memory; see the module docstring. Gradient clipping, schedulers, zero_grad, state_dict and
    load_state_dict work as with torch.optim.AdamW (the loaded moments go back to host memory)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, foreach: bool | None = None, fused: bool | None = None,
                 chunk_bytes: int = 64 * 2**20):
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes={chunk_bytes}: must be positive")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach, fused=fused)
        super().__init__(params, defaults)
        self.chunk_bytes = chunk_bytes
        self._staging: dict[torch.device, list[torch.Tensor]] = {}
        self._pending: list = []          # d2h events of the last step (host moments not yet written)

    # -- state ---------------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if not state:
            on_device = bool(group["fused"])    # as torch.optim.AdamW: fused keeps its step on the device
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
            for name in _MOMENTS:
                state[name] = _host_zeros(p)
        return state

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
        for p, state in self.state.items():     # ... so they go back to host memory here
            for name in _MOMENTS:
                t = state.get(name)
                if t is not None and (t.is_cuda or (p.is_cuda and not t.is_pinned())):
                    host = _host_zeros(p)
                    host.copy_(t)
                    state[name] = host

    # -- the step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._pending = []    # the last step's copies out precede whatever the current stream queues now
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("OffloadedAdamW does not support sparse gradients")
                if p.dtype != torch.float32:
                    raise TypeError(f"OffloadedAdamW updates fp32 parameters (PEFT's adapters are), got {p.dtype}")
            self._step_group(group, params)
        return loss

    def _step_group(self, group: dict, params: list) -> None:
        if not params:
            return
        states = [self._init_state(p, group) for p in params]
        device = params[0].device
        cuda = device.type == "cuda"
        if cuda:
            current = torch.cuda.current_stream(device)
            h2d, d2h = _streams(device)
            h2d.wait_stream(current)          # gradients and parameters are ready
        staging = self._staging_buffers(device, max(_moment_numel(c) for c in _chunks(params, self.chunk_bytes)))
        freed: list = [None, None]            # per staging buffer: its last chunk's d2h event
        beta1, beta2 = group["betas"]
        for k, chunk in enumerate(_chunks(params, self.chunk_bytes)):
            buf = staging[k % 2]
            views = _views(buf, chunk)
            hosts = [states_of[name] for states_of in (self.state[p] for p in chunk) for name in _MOMENTS]
            if cuda:
                with torch.cuda.stream(h2d):
                    if freed[k % 2] is not None:
                        h2d.wait_event(freed[k % 2])
                    for v, h in zip(views, hosts):
                        v.copy_(h, non_blocking=True)
                    came = torch.cuda.Event()
                    came.record(h2d)
                current.wait_event(came)
            else:
                for v, h in zip(views, hosts):
                    v.copy_(h)
            exp_avgs, exp_avg_sqs = views[0::2], views[1::2]
            adamw([p for p in chunk], [p.grad for p in chunk], exp_avgs, exp_avg_sqs, [],
                  [self.state[p]["step"] for p in chunk], foreach=group["foreach"], fused=group["fused"],
                  amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                  eps=group["eps"], maximize=False)
            if cuda:
                d2h.wait_stream(current)
                with torch.cuda.stream(d2h):
                    for v, h in zip(views, hosts):
                        h.copy_(v, non_blocking=True)
                    gone = torch.cuda.Event()
                    gone.record(d2h)
                freed[k % 2] = gone
                self._pending.append(gone)
            else:
                for v, h in zip(views, hosts):
                    h.copy_(v)
        if cuda:
            current.wait_stream(d2h)          # the next step's copies in start after these went out

    def _staging_buffers(self, device: torch.device, numel: int) -> list[torch.Tensor]:
        bufs = self._staging.get(device)
        if bufs is None or bufs[0].numel() < numel:
            bufs = self._staging[device] = [torch.empty(numel, dtype=torch.float32, device=device) for _ in range(2)]
        return bufs


def _host_zeros(p: torch.Tensor) -> torch.Tensor:
    """A moment of `p` (fp32) in host memory, pinned when p is on the GPU."""
    return torch.zeros(p.shape, dtype=torch.float32, pin_memory=p.is_cuda)


def _moment_numel(chunk: list) -> int:
    return sum(2 * p.numel() for p in chunk)


def _chunks(params: list, chunk_bytes: int) -> list[list]:
    """Consecutive parameters, as many per chunk as keep its two moments within chunk_bytes (a
    parameter larger than that is a chunk of its own)."""
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


def _views(buf: torch.Tensor, chunk: list) -> list[torch.Tensor]:
    """exp_avg, exp_avg_sq views for each parameter of the chunk, in order, from one flat buffer."""
    out, off = [], 0
    for p in chunk:
        for _ in _MOMENTS:
            out.append(buf[off:off + p.numel()].view(p.shape))
            off += p.numel()
    return out


_STREAMS: dict = {}


def _streams(device: torch.device):
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _STREAMS:
        _STREAMS[key] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
    return _STREAMS[key]
