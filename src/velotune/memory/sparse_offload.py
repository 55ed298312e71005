"""Offloaded checkpointing that keeps only every k-th layer input in host memory (`offload_every=k`):
the inputs of the k-1 layers after each kept one ("anchor") are recomputed in backward by running
those layers forward again from the anchor's input. Exact: the same bits as offloading every input.

    enable_offloaded_checkpointing(model, offload_every=2)          # half the host memory
    enable_offloaded_checkpointing(model, offload_every="auto")     # smallest k within the host budget

Why: the offloaded inputs take layers x hidden x dtype bytes of host memory per token (a 70B
Llama: 80 x 8192 x 2 B = 1.3 MB per token, ~128 GB at 98K tokens). With k, ceil(layers / k) inputs
are kept: the host bound on the context grows k-fold, for k-1 extra layer forwards per k layers in
backward and up to k-1 recomputed layer inputs ([tokens, hidden] each) on the device while a group
of k layers is differentiated.

How (per model; `OffloadEvery` below, called by checkpointing._offloaded_checkpoint):
* Forward: each decoder layer is checkpointed as with offload_every=1. Layer i is an anchor when
  i % k == 0, or when its input is not the previous layer's output (identified by address, shape
  and dtype: anything between layers breaks the chain, and then the input is offloaded). An anchor's
  input is offloaded as usual (checkpointing._Offloader: pinned host copy, prefetched one anchor
  ahead in backward). For the others, the saved-tensor pack hook keeps only a `_Recompute` token
  (group, position): the input leaves the device as soon as the forward no longer needs it. The
  group records, per layer, the checkpointed callable and its other arguments (masks, rotary
  tables: tensors checkpointing keeps anyway), whether its input required grad, and the CPU and
  device RNG states before it ran (dropout masks are replayed, as torch's checkpoint does).
* Backward: the first unpack of a token of a group (the group's last layer: backward runs in
  reverse) brings the anchor's input back, runs the group's layers forward under autograd (inputs
  detached, requires_grad as recorded, the recorded RNG states restored), and caches the k-1
  outputs detached; each token's unpack then takes its own from the cache. torch's checkpoint
  then recomputes and differentiates the layer from that input exactly as it would from an
  offloaded copy. The recompute forward is the layer's first-call forward (not the checkpoint's
  recompute variant, which may skip values it does not save), so it produces the same bits as the
  original forward (deterministic kernels, same shapes, same RNG).
* `offload_every="auto"`: at every forward's first layer, k is the smallest value with
  ceil(layers / k) x (that layer input's bytes) <= the host budget: `host_budget` bytes if given,
  else the host's MemAvailable plus this model's cached pinned buffers minus HostPool.HEADROOM,
  measured then. The choice and its numbers are kept in OffloadStats (offload_every, host_budget,
  host_needed: bytes of inputs kept per forward).
"""

from __future__ import annotations

import math
import weakref

import torch

from velotune.memory.host_copies import HostPool, SavedCopy, host_available


def choose_offload_every(n_layers: int, per_layer_bytes: int, budget: int) -> int:
    """Smallest k >= 1 with ceil(n_layers / k) * per_layer_bytes <= budget (n_layers when none fits:
    one input kept, the least there is)."""
    if per_layer_bytes <= 0:
        return 1
    fits = budget // per_layer_bytes
    if fits < 1:
        return n_layers
    return min(n_layers, math.ceil(n_layers / fits))


def check_offload_every(every) -> None:
    """ValueError unless `every` is a whole number >= 1 or "auto"."""
    if every != "auto" and not (type(every) is int and every >= 1):
        raise ValueError(f"offload_every={every!r}: a whole number >= 1 or 'auto'")


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class _Group:
    """One anchor and the layers after it in one forward: their callables, in order."""

    __slots__ = ("anchor", "calls", "cache", "__weakref__")

    def __init__(self):
        self.anchor = None  # weakref to the anchor's checkpointing.SavedCopy (autograd holds it)
        self.calls: list[tuple] = []  # (fn, other args, kwargs, input requires_grad, rng state)
        self.cache: dict[int, torch.Tensor] = {}


class _Recompute:
    """What a non-anchor layer's checkpoint saves instead of its input."""

    __slots__ = ("group", "pos")

    def __init__(self, group: _Group, pos: int):
        self.group, self.pos = group, pos


class OffloadEvery:
    """Per-model state of offload_every (see the module docstring)."""

    def __init__(self, layers: list[torch.nn.Module], every: int | str, host_budget: int | None = None):
        check_offload_every(every)
        if host_budget is not None and (not isinstance(host_budget, int) or host_budget <= 0):
            raise ValueError(f"host_budget={host_budget!r}: bytes, a positive whole number")
        self.index = {id(layer): i for i, layer in enumerate(layers)}
        self.n_layers = len(layers)
        self.every, self.host_budget = every, host_budget
        self.k = every if every != "auto" else 1
        self._group: _Group | None = None
        self._first = 0  # layer index of the current group's anchor
        self._prev_out: tuple | None = None

    def _budget(self, offloader) -> int:
        if self.host_budget is not None:
            return self.host_budget
        free = host_available()
        if free is None:
            return 2**62
        return free + offloader.pool.pooled - HostPool.HEADROOM

    def _start_forward(self, x: torch.Tensor, offloader) -> None:
        per_layer = x.numel() * x.element_size()
        stats = offloader.stats
        if self.every == "auto":
            budget = self._budget(offloader)
            self.k = choose_offload_every(self.n_layers, per_layer, budget)
            stats.host_budget = budget
        self._group, self._prev_out = None, None
        stats.offload_every = self.k
        stats.host_needed = math.ceil(self.n_layers / self.k) * per_layer

    def run(self, offloader, fn, args, kwargs, layer_index: int, checkpoint_call):
        """Checkpoint one decoder layer call (`checkpoint_call(pack, unpack)` runs torch's
        checkpoint under those saved-tensor hooks); returns its output."""
        x = args[0]
        if layer_index == 0:
            self._start_forward(x, offloader)
        group = self._group
        chained = (
            group is not None
            and self._prev_out == (x.data_ptr(), x.shape, x.dtype)
            and layer_index == self._first + len(group.calls)
        )
        anchor = not chained or layer_index % self.k == 0
        key = (x.data_ptr(), x.shape, x.dtype)
        if anchor:
            group = self._group = _Group()
            self._first = layer_index
        pos = len(group.calls)
        group.calls.append((fn, args[1:], kwargs, x.requires_grad, _rng_state(x.device)))

        def pack(t: torch.Tensor):
            if (t.data_ptr(), t.shape, t.dtype) != key:
                return t
            if anchor:
                saved = offloader.offload(t)
                group.anchor = weakref.ref(saved)
                return saved
            return _Recompute(group, pos)

        def unpack(obj):
            if isinstance(obj, SavedCopy):
                return offloader.restore(obj)
            if isinstance(obj, _Recompute):
                return self._recomputed(offloader, obj)
            return obj

        out = checkpoint_call(pack, unpack)
        h = out[0] if isinstance(out, (tuple, list)) else out
        self._prev_out = (h.data_ptr(), h.shape, h.dtype) if isinstance(h, torch.Tensor) else None
        if layer_index == self.n_layers - 1:
            self._group = None  # the tokens hold the groups now; nothing outlives the graph
        return out

    def _recomputed(self, offloader, token: _Recompute) -> torch.Tensor:
        group = token.group
        if token.pos not in group.cache:
            saved = group.anchor() if group.anchor is not None else None
            if saved is None:
                raise RuntimeError(
                    "offload_every: the anchor layer's input is gone before the layers after it "
                    "were differentiated (a second backward through the same graph?)"
                )
            h = offloader.take(saved).view(saved.shape)
            n = len(group.calls) - 1  # positions 1 .. n are recomputed
            for p in range(1, n + 1):
                fn, rest, kwargs, requires_grad, (cpu_rng, dev_rng) = group.calls[p - 1]
                inp = h.detach().requires_grad_(requires_grad)
                devices = [h.device] if dev_rng is not None else []
                with torch.random.fork_rng(devices=devices, device_type=h.device.type), torch.enable_grad():
                    torch.set_rng_state(cpu_rng)
                    if dev_rng is not None:
                        torch.cuda.set_rng_state(dev_rng, h.device)
                    out = fn(inp, *rest, **kwargs)
                h = (out[0] if isinstance(out, (tuple, list)) else out).detach()
                del out, inp
                group.cache[p] = h
            offloader.stats.recomputed_layers += n
        return group.cache.pop(token.pos)
