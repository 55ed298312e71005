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
with each other and with the updates; the copies out also overlap the next step's start): less
GPU memory for a little time, the compute stream waiting for the copies in (`bench/trace_gaps.py`).
With update_in_backward=True (see the class) those copies overlap the rest of backward, and
gradients go as soon as they are used. Figures: BENCHMARKS.md.
"""

from __future__ import annotations

import weakref

import torch
from torch.optim.adamw import adamw

_MOMENTS = ("exp_avg", "exp_avg_sq")


class OffloadedAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW for fp32 parameters (amsgrad and maximize not supported) with exp_avg /
    exp_avg_sq in pinned host memory; see the module docstring. Gradient clipping, schedulers,
    zero_grad, state_dict and load_state_dict work as with torch.optim.AdamW (loaded moments go back
    to host memory).

    update_in_backward=True: each chunk is updated from a hook as soon as its parameters' gradients
    are final (`register_post_accumulate_grad_hook`), while the backward of earlier layers still
    runs, and its gradients are dropped (p.grad = None); `step()` then only updates what no hook did
    (chunks with a parameter that got no gradient) and marks the step's end. The same bits as the
    update after backward, for a loop of one backward per step without anything between backward
    and step that reads or changes the gradients: no gradient clipping, no gradient accumulation (a
    second backward before step() raises), no DDP/FSDP (their reduction comes after the hooks).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
        chunk_bytes: int = 16 * 2**20,
        update_in_backward: bool = False,
    ):
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes={chunk_bytes}: must be positive")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach, fused=fused)
        super().__init__(params, defaults)
        self.chunk_bytes = chunk_bytes
        self._plans: dict[int, list[_Chunk]] = {}  # per param group: its chunks
        self._chunk_of: dict = {}  # parameter -> index of its chunk in its group's plan
        self._staging: dict[torch.device, _Staging] = {}
        self._max_chunk = 0  # numel of the largest chunk's moments, all groups
        self._backward_started = False  # update_in_backward: a hook ran since the last step()
        self.update_in_backward = update_in_backward
        self._hooks: list = []
        if update_in_backward:
            if (
                torch.distributed.is_available()
                and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1
            ):
                raise ValueError(
                    "OffloadedAdamW(update_in_backward=True) cannot run under DDP/FSDP: the "
                    "gradients are reduced after the hooks that would update from them"
                )
            me = weakref.ref(self)  # the parameters' hooks do not keep the optimizer (and its buffers) alive

            def ready(p, gi):
                opt = me()
                if opt is not None:
                    opt._grad_ready(gi, p)

            for gi, group in enumerate(self.param_groups):
                for p in group["params"]:
                    if p.requires_grad:
                        self._hooks.append(p.register_post_accumulate_grad_hook(lambda p, gi=gi: ready(p, gi)))

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
            plan = self._plans[gi] = [_Chunk(c, k) for k, c in enumerate(_chunks(group["params"], self.chunk_bytes))]
            self._max_chunk = max([self._max_chunk, *(c.host.numel() for c in plan)])
            on_device = bool(group["fused"])  # as torch.optim.AdamW: fused keeps its step on the device
            for chunk in plan:
                for p, views in zip(chunk.params, chunk.moment_views()):
                    self._chunk_of[p] = chunk.index
                    state = self.state[p]
                    step = state.get("step")
                    state["step"] = (torch.zeros((), dtype=torch.float32) if step is None else step.float()).to(
                        p.device if on_device else "cpu"
                    )
                    for name, view in zip(_MOMENTS, views):
                        if name in state:
                            view.copy_(state[name])
                        state[name] = view
        return plan

    def _wait_for_host(self) -> None:
        """The host moments are written (every chunk's last device->host copy is done)."""
        for plan in self._plans.values():
            for chunk in plan:
                if chunk.gone is not None:
                    chunk.gone.synchronize()

    def state_dict(self):
        self._wait_for_host()
        return super().state_dict()

    def load_state_dict(self, state_dict) -> None:
        self._wait_for_host()
        super().load_state_dict(state_dict)  # torch moves the moments to the parameters' device...
        self._plans = {}  # ... and the next step copies them into host chunks
        self._staging = {}  # (its copies out are done: nothing fetched for old chunks stays)

    # -- the step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("OffloadedAdamW does not support sparse gradients")
            plan = self._plan(gi)
            todo = [c for c in plan if any(p.grad is not None for p in c.params)]
            if todo:
                # after backward: the chunks in order, each one's moments fetched one chunk ahead
                self._staging_for(todo[0].params[0].device).expect(todo)
                for chunk in todo:
                    self._update(group, chunk)
            for chunk in plan:
                chunk.ready, chunk.updated = 0, False
        self._backward_started = False
        return loss

    @torch.no_grad()
    def _grad_ready(self, gi: int, p: torch.Tensor) -> None:
        """update_in_backward: p's gradient is final; update its chunk once all of the chunk's are."""
        plan = self._plan(gi)
        chunk = plan[self._chunk_of[p]]
        if not self._backward_started:  # the step's first final gradient: the last layers' chunks come in
            self._backward_started = True
            # backward ends with the first layers
            self._staging_for(p.device).expect([c for c in reversed(plan) if not c.updated])
        if chunk.updated:
            raise RuntimeError(
                "OffloadedAdamW(update_in_backward=True): a second backward before step() (gradient "
                "accumulation is not supported: the first backward already updated the parameters)"
            )
        chunk.ready += 1
        if chunk.ready < chunk.n_trainable:
            return
        self._update(self.param_groups[gi], chunk)
        chunk.updated = True
        for q in chunk.params:
            q.grad = None

    def _update(self, group: dict, chunk: "_Chunk") -> None:
        """One chunk: moments in (unless already prefetched), torch's adamw on the current stream, moments
        out; then the next expected chunk's moments start coming in."""
        device = chunk.params[0].device
        staging = self._staging_for(device)
        buf = staging.take(chunk)
        live = [(p, v) for p, v in zip(chunk.params, chunk.moment_views(buf)) if p.grad is not None]
        beta1, beta2 = group["betas"]
        adamw(
            [p for p, _ in live],
            [p.grad for p, _ in live],
            [v[0] for _, v in live],
            [v[1] for _, v in live],
            [],
            [self.state[p]["step"] for p, _ in live],
            foreach=group["foreach"],
            fused=group["fused"],
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
        staging.give_back(chunk, buf)
        staging.prefetch()

    def _staging_for(self, device: torch.device) -> "_Staging":
        staging = self._staging.get(device)
        if staging is None:
            for gi in range(len(self.param_groups)):  # sized for every group's chunks: made once
                self._plan(gi)
        if staging is None or staging.numel < self._max_chunk:
            if staging is not None:
                staging.drain()
            staging = self._staging[device] = _Staging(device, self._max_chunk)
        return staging


class _Staging:
    """Two device buffers for chunks' moments and the order of their copies (CUDA: moments come in on
    an h2d stream, the update waits for them; they go out on a d2h stream after the update; a buffer
    is filled again only after its last copy out). `expected`: the chunks in the order they are
    likely to be updated; the next ones are fetched into free buffers ahead of their update."""

    def __init__(self, device: torch.device, numel: int):
        self.device, self.numel = device, numel
        self.cuda = device.type == "cuda"
        self.bufs = [torch.empty(numel, dtype=torch.float32, device=device) for _ in range(2)]
        self.freed: list = [None, None]  # per buffer: event of its last copy out
        self.holds: list = [None, None]  # per buffer: the chunk fetched into it, not yet updated
        self.came: dict = {}  # chunk index -> event: its moments are in
        self.expected: list = []

    def expect(self, chunks: list) -> None:
        self.expected = list(chunks)
        self.prefetch()

    def _fetch(self, chunk, i: int) -> None:
        buf = self.bufs[i][: chunk.host.numel()]
        if self.cuda:
            h2d, _ = _streams(self.device)
            with torch.cuda.stream(h2d):
                if self.freed[i] is not None:
                    h2d.wait_event(self.freed[i])  # the buffer's last chunk went out
                if chunk.gone is not None:
                    h2d.wait_event(chunk.gone)  # this chunk's host moments are written
                buf.copy_(chunk.host, non_blocking=True)  # one copy per chunk
                came = torch.cuda.Event()
                came.record(h2d)
            self.came[chunk.index] = came
        else:
            buf.copy_(chunk.host)
        self.holds[i] = chunk

    def prefetch(self) -> None:
        while self.expected and None in self.holds:
            chunk = self.expected.pop(0)
            if chunk.updated or chunk in self.holds:
                continue
            self._fetch(chunk, self.holds.index(None))

    def take(self, chunk) -> torch.Tensor:
        """chunk's moments in a buffer, the current stream waiting for them."""
        if chunk in self.expected:
            self.expected.remove(chunk)
        if chunk not in self.holds:
            i = self.holds.index(None) if None in self.holds else 0
            if self.holds[i] is not None:  # taken by a fetch ahead that guessed wrong
                self.expected.insert(0, self.holds[i])
            self._fetch(chunk, i)
        i = self.holds.index(chunk)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.came.pop(chunk.index))
        return self.bufs[i][: chunk.host.numel()]

    def give_back(self, chunk, buf: torch.Tensor) -> None:
        """After the update: the moments out, the buffer free once they are."""
        i = self.holds.index(chunk)
        if self.cuda:
            _, d2h = _streams(self.device)
            d2h.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(d2h):
                chunk.host.copy_(buf, non_blocking=True)
                gone = torch.cuda.Event()
                gone.record(d2h)
            chunk.gone = self.freed[i] = gone
        else:
            chunk.host.copy_(buf)
        self.holds[i] = None
        # The copies out overlap whatever the current stream queues next (the next forward, or the
        # rest of backward): nothing there reads the buffers, and the next copies in wait for these.

    def drain(self) -> None:
        """Before the buffers are replaced: the current stream waits for their copies out."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(_streams(self.device)[1])


class _Chunk:
    """Consecutive parameters and one flat fp32 host buffer with their moments, laid out
    p0.exp_avg, p0.exp_avg_sq, p1.exp_avg, ... (pinned when the parameters are on the GPU); `gone`:
    event of its last copy out; ready / updated: update_in_backward's count of final gradients and
    whether this step's update ran."""

    def __init__(self, params: list, index: int):
        self.params, self.index = params, index
        self.n_trainable = sum(p.requires_grad for p in params)
        self.gone = None
        self.ready, self.updated = 0, False
        numel = sum(2 * p.numel() for p in params)
        self.host = torch.zeros(numel, dtype=torch.float32, pin_memory=params[0].is_cuda)

    def moment_views(self, flat: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(exp_avg, exp_avg_sq) per parameter as views of `flat` (default: the host buffer)."""
        flat = self.host if flat is None else flat
        out, off = [], 0
        for p in self.params:
            n = p.numel()
            out.append((flat[off : off + n].view(p.shape), flat[off + n : off + 2 * n].view(p.shape)))
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
