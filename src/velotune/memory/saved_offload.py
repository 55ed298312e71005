"""Offloaded checkpointing that recomputes only the MLP (`recompute="mlp"`).

With `use_gradient_checkpointing="unsloth"` each decoder layer is recomputed whole in backward:
for Llama-3.1-8B that is ~1.36 N of the 5.4 N matmul FLOPs of a step (docs/perf-notes.md) plus
attention, norms, RoPE and, under QLoRA, 6 of the layer's 20 NF4 dequantisations per step. Of that
recompute, the attention half (q/k/v/o GEMMs, attention, RoPE, norms) is ~1/3 of the time but its
activations are small, while the MLP half is ~2/3 of the time with the largest activations (gate and
up, [N, I] each). So with recompute="mlp":

* The attention half of each layer runs once. Everything autograd saves there (the layer input,
  q/k/v after RoPE, the attention output, the residual stream after attention: 8B at 2 x 2048
  tokens, ~145 MiB a layer) goes to pinned host memory on a side stream during forward, the way
  the layer input alone does in "layer" mode (checkpointing.py), and comes back during backward:
  a layer's whole set when its backward starts, the next layer's first tensor one layer ahead.
  What backward holds of a layer is the same tensors as when they were recomputed, so the GPU peak
  stays the same; host memory grows from 8 KiB to ~36 KiB per token and layer (8B).
* RMSNorm outputs are never copied: a saved norm output comes back recomputed from the norm's
  (offloaded) input, one elementwise pass, bit-identical (same kernel, same input).
* The MLP is a non-reentrant checkpoint of its own (models/mlp.py), entered with the RMSNorm output
  (recomputed as above), and its recompute still stops before the frozen down projection.

Numerics: every tensor backward reads is either a bit copy of what forward saved or recomputed by
the same deterministic kernels from bit copies, so losses and gradients equal plain checkpointing.
Saved tensors are recognised per layer call by their storage (several views of one storage, e.g. the
attention output saved by SDPA and by o_proj, are copied once). Tensors handed to the layer as
other arguments (RoPE tables, masks: shared by all layers), parameters and anything under
`min_bytes` stay where they are.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from velotune.memory.host_copies import HostCopy, modes_for
from velotune.models.norm import norm_forward


class _Stored(HostCopy):
    """One offloaded storage span: its host copy, events, and how many saved views point at it."""

    __slots__ = ("refs", "taken")

    def __init__(self, host, numel, dtype, device, d2h_done, pool):
        super().__init__(host, numel, dtype, device, d2h_done, pool)  # .gpu: while backward needs it
        self.refs = 0  # saved views of this span (a view inside a NormOf counts)
        self.taken = 0  # ... of which backward has unpacked so far


class _View:
    """What autograd keeps for one offloaded saved tensor: its span and how to view it again."""

    __slots__ = ("stored", "size", "stride", "offset")

    def __init__(self, stored, size, stride, offset):
        stored.refs += 1
        self.stored, self.size, self.stride, self.offset = stored, size, stride, offset


class NormOf:
    """A saved RMSNorm output: recomputed on unpack from the norm's input (a _View)."""

    __slots__ = ("module", "inp", "size", "stride", "offset")

    def __init__(self, module, inp, size, stride, offset):
        self.module, self.inp, self.size, self.stride, self.offset = module, inp, size, stride, offset


class _LayerSet:
    """The spans one layer call offloaded, in pack order; prev: the layer called before it."""

    __slots__ = ("stored", "prev", "started", "__weakref__")

    def __init__(self, prev):
        self.stored: list[_Stored] = []
        self.prev = prev
        self.started = False


def storage_elements(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Elements [a, b) of t's storage, as a 1-D tensor of t's dtype."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), a, (b - a,), (1,))


def storage_span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) element of t's storage that t reads (t.numel() > 0)."""
    end = t.storage_offset() + 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return t.storage_offset(), end


class SavedOffloader:
    """Per-model state of recompute="mlp": the side streams and counters of the layer offloader
    (`checkpointing._Offloader`, shared), the layer calls of the current step."""

    def __init__(self, offloader, min_bytes: int):
        self.offloader = offloader
        self.stats = offloader.stats
        self.min_bytes = min_bytes
        self._last: weakref.ref | None = None

    # -- forward ------------------------------------------------------------------------------
    def run_layer(self, fn, args, kwargs, keep: list[torch.Tensor]):
        """fn(*args, **kwargs) with every large saved tensor offloaded. keep: tensors to leave alone."""
        modes = modes_for(fn)
        layer = _LayerSet(self._last)
        self._last = weakref.ref(layer)
        kept = {t.untyped_storage().data_ptr() for t in keep if isinstance(t, torch.Tensor)}
        spans: dict[tuple, tuple[_Stored, int, int]] = {}  # (storage ptr, dtype) -> span stored
        held: list[tuple[torch.Tensor, int]] = []  # packed tensors (and their versions)
        norms: dict[int, tuple] = {}  # filled by models/norm.py
        pending: list = []  # (_Stored, flat source): copied at the end

        def store(t: torch.Tensor) -> _View:
            key = (t.untyped_storage().data_ptr(), t.dtype)
            a, b = storage_span(t)
            hit = spans.get(key)
            if hit is None or not (hit[1] <= a and b <= hit[2]):
                hit = spans[key] = (self._offload(t, a, b, pending), a, b)
                layer.stored.append(hit[0])
            held.append((t, t._version))  # alive until the layer returns: its address stays its own
            return _View(hit[0], t.shape, t.stride(), t.storage_offset() - hit[1])

        def pack(t: torch.Tensor):
            if (
                isinstance(t, nn.Parameter)
                or t.numel() == 0
                or t.layout != torch.strided
                or t.numel() * t.element_size() < self.min_bytes
            ):
                return t
            ptr = t.untyped_storage().data_ptr()
            if ptr in kept:
                return t
            norm = norms.get(ptr)
            if norm is not None:
                module, x, _ = norm
                return NormOf(module, store(x), t.shape, t.stride(), t.storage_offset())
            return store(t)

        def unpack(obj):  # holds `layer` for as long as autograd holds the hooks (the layer's graph)
            if isinstance(obj, _View):
                return self._restore(obj, layer)
            if isinstance(obj, NormOf):
                return self._restore_norm(obj, layer)
            return obj

        try:
            with (
                torch.autograd.graph.saved_tensors_hooks(pack, unpack),
                modes.set(norm_outputs=norms, checkpointed_mlp=True),
            ):
                out = fn(*args, **kwargs)
            for t, version in held:
                if t._version != version:
                    raise RuntimeError(
                        "recompute='mlp': a tensor saved for backward was modified in place later "
                        "in the same decoder layer; use recompute='layer' for this model"
                    )
            self._flush(pending)
        finally:  # the hooks outlive this call (autograd keeps them): let go of the tensors now
            held.clear()
            pending.clear()
            norms.clear()
            spans.clear()
        return out

    def _offload(self, t: torch.Tensor, a: int, b: int, pending: list) -> _Stored:
        """A _Stored for t's storage elements [a, b); the copy itself is queued with the layer's
        others when the layer returns (`_flush`): one stream switch per layer, not per tensor."""
        flat = storage_elements(t, a, b)
        stored = _Stored(None, b - a, t.dtype, t.device, None, None)
        pending.append((stored, flat))
        self.stats.packed += 1
        self.stats.bytes_offloaded += flat.numel() * flat.element_size()
        return stored

    def _flush(self, pending: list) -> None:
        if not pending:
            return
        hosts, done, pool = self.offloader.to_host([flat for _, flat in pending])
        for (stored, _), host in zip(pending, hosts):
            stored.host, stored.d2h_done, stored.pool = host, done, pool

    # -- backward -----------------------------------------------------------------------------
    def _prefetch(self, layer: "_LayerSet | None") -> None:
        """First unpack of a layer: its whole set (newest first), then the previous layer's newest."""
        if layer is None or layer.started:
            return
        layer.started = True
        self.offloader.to_device(layer.stored[::-1])
        prev = layer.prev() if layer.prev is not None else None
        if prev is not None and prev.stored:
            self.offloader.to_device(prev.stored[-1:])

    def _take(self, s: _Stored) -> torch.Tensor:
        """The span on the device; the last of its views to be unpacked lets go of it."""
        flat = self.offloader.take(s)
        s.taken += 1
        if s.taken >= s.refs:  # a later (second) backward copies again
            s.gpu, s.taken = None, 0
        self.stats.unpacked += 1
        return flat

    def _restore(self, v: _View, layer) -> torch.Tensor:
        self._prefetch(layer)
        return self._take(v.stored).as_strided(v.size, v.stride, v.offset)

    def _restore_norm(self, n: NormOf, layer) -> torch.Tensor:
        x = self._restore(n.inp, layer)
        with torch.no_grad():
            y = norm_forward(n.module, x)
        self.stats.recomputed_norms += 1
        return y.as_strided(n.size, n.stride, n.offset)
