"""Reading base weights of (possibly 4-bit) linear layers: the accessor the fused LoRA paths use,
and fresh dequantised copies for merging/export.

    W = get_base_weight(layer)          # [out, in], compute dtype; 4-bit: a reused buffer (see below)
    W = dequantize_weight(layer)        # [out, in], fp32 by default; always a fresh tensor
    for name, W in iter_dequantized_weights(model): ...   # every 4-bit weight, one at a time

A 4-bit layer is a bitsandbytes `Linear4bit` (its `weight` a `Params4bit` carrying `quant_state`),
or a PEFT LoRA layer wrapping one. The values are bit-for-bit what bitsandbytes' own forward uses:
dequantised to `quant_state.dtype` (the dtype the weight was quantised from), then cast to the
requested dtype if that differs.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

from velotune.kernels import triton_enabled
from velotune.quant.dequant_kernel import dequantize_nf4_triton
from velotune.quant.nf4 import NF4Weight, dequantize_nf4

# How many dequantised weights may be alive at once per (device, dtype). velotune's fused functions
# use each weight right after reading it (one GEMM; the next dequantisation is stream-ordered after
# it), so one would do; two leave room for a caller that holds a pair. Each slot grows to the
# largest weight it has held (for Llama-3.1-8B in bf16: 2 x 117 MiB).
BUFFER_SLOTS = 2


def base_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The layer holding the base weight: PEFT LoRA layers wrap it as `base_layer`."""
    get = getattr(module, "get_base_layer", None)
    return get() if callable(get) else module


def is_4bit(module_or_weight) -> bool:
    """A bitsandbytes 4-bit layer (or its `Params4bit` weight), directly or under a PEFT wrapper."""
    w = module_or_weight
    if isinstance(w, torch.nn.Module):
        w = getattr(base_layer(w), "weight", None)
    return getattr(w, "quant_state", None) is not None


def nf4_weight(module_or_weight) -> NF4Weight:
    """The `NF4Weight` view (no copies) of a 4-bit layer's weight.

    Cached on the weight object (the training loop reads each 4-bit weight 3 times per step), keyed
    by what would change it: its storage, its quant state, and bitsandbytes' CPU repacking flag.
    """
    w = module_or_weight
    if isinstance(w, torch.nn.Module):
        w = base_layer(w).weight
    qs = w.quant_state
    key = (w.data_ptr(), id(qs), getattr(qs, "packing_format_for_cpu", False))
    cached = getattr(w, "_velotune_nf4", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.inference_mode(False):  # cached views must serve forwards in and out of inference mode
        nf4 = NF4Weight.from_bnb(w.data, qs)
    try:
        w._velotune_nf4 = (key, nf4)
    except AttributeError:  # a weight type that takes no attributes: just do not cache
        pass
    return nf4


def _compute_dtype(layer: torch.nn.Module, nf4: NF4Weight) -> torch.dtype:
    return getattr(layer, "compute_dtype", None) or nf4.dtype


class _WeightBuffers:
    """Per (device, dtype): BUFFER_SLOTS flat tensors used round-robin, grown on demand.

    Each write bumps the slot's autograd version counter, so a buffer view that autograd saved
    for backward (a misuse: see `get_base_weight`) raises autograd's "modified by an inplace
    operation" error instead of silently giving wrong gradients. Shaped views of a slot are cached
    with it (`take_view`; they share its version counter) and dropped when the slot grows.

    Each slot also remembers which weight it holds (`remember`, with the slot's version after the write):
    `lookup` gives that slot back without a new dequantisation while nothing has written to it since.
    Backward asks for gate and up right after the MLP's recompute dequantised them into the two
    slots (lora/fused.py), so QLoRA saves 2 of a layer's dequantisations per step this way. CUDA-graph
    captures (and the CPU stand-ins for their replays) use slots of their own: `graph_local()`.
    """

    def __init__(self):
        self._slots: dict[tuple[torch.device, torch.dtype], list[torch.Tensor | None]] = {}
        self._views: dict[tuple[torch.device, torch.dtype], list[dict]] = {}
        self._tags: dict[tuple[torch.device, torch.dtype], list[tuple | None]] = {}
        self._next: dict[tuple[torch.device, torch.dtype], int] = {}
        self._local = 0  # inside graph_local(): every take allocates
        self._lock = threading.Lock()

    def _slot(self, numel: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
        key = (device, dtype)
        with self._lock:
            slots = self._slots.get(key)
            if slots is None:
                slots = self._slots[key] = [None] * BUFFER_SLOTS
                self._views[key] = [{} for _ in range(BUFFER_SLOTS)]
                self._tags[key] = [None] * BUFFER_SLOTS
            i = self._next.get(key, 0)
            self._next[key] = (i + 1) % BUFFER_SLOTS
            buf, views = slots[i], self._views[key][i]
            if buf is None or buf.numel() < numel or self._local:
                views.clear()
                slots[i] = buf = None  # free the smaller one before allocating
                with torch.inference_mode(False):  # a normal tensor even when taken in inference mode
                    slots[i] = buf = torch.empty(numel, device=device, dtype=dtype)
            torch.autograd.graph.increment_version(buf)
            self._tags[key][i] = None
        return buf, views

    def take_view(self, shape: torch.Size, numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The next slot viewed as `shape` (numel = prod(shape)); the view object is reused."""
        buf, views = self._slot(numel, device, dtype)
        return self._view(buf, views, shape, numel)

    def remember(self, view: torch.Tensor, tag: tuple) -> None:
        """`view` (from take_view, now written) holds what `tag` = (object, version) names: until the
        slot is written again, `lookup(tag, ...)` returns it."""
        key = (view.device, view.dtype)
        with self._lock:
            for i, buf in enumerate(self._slots.get(key, ())):
                if buf is not None and buf.data_ptr() == view.data_ptr():
                    self._tags[key][i] = (*tag, buf._version)

    @staticmethod
    def _view(buf, views, shape, numel):
        view = views.get(shape)
        if view is None:
            with torch.inference_mode(False):  # a view made in inference mode could not be written outside it
                view = views[shape] = buf[:numel].view(shape)
        return view

    def lookup(
        self, tag: tuple, shape: torch.Size, numel: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """The slot still holding what `take_view(..., tag)` was written with, or None. A hit counts
        as a use of that slot for the round-robin (the other slot is the next to be overwritten)."""
        key = (device, dtype)
        with self._lock:
            tags = self._tags.get(key)
            if tags is None:
                return None
            for i, t in enumerate(tags):
                buf = self._slots[key][i]
                if t is not None and t[0] is tag[0] and t[1] == tag[1] and buf._version == t[2]:
                    self._next[key] = (i + 1) % BUFFER_SLOTS
                    return self._view(buf, self._views[key][i], shape, numel)
        return None

    @contextlib.contextmanager
    def graph_local(self):
        """Inside: slots of their own, empty at entry and dropped at exit, and every take allocates
        a new buffer (dropping the slot's previous one first) instead of reusing a persistent one.
        Around a CUDA-graph capture (and its warm-up run, and the CPU stand-in for a replay): the
        weights a graph dequantises then live in the graph's memory pool only while it needs them,
        the persistent slots (2 x 117 MiB for an 8B model) can be freed once every layer is graphed
        (`clear`), and lookups inside see only what the graph itself wrote (reuse within one graph,
        e.g. the MLP recompute's gate/up in its backward, holds at every replay)."""
        with self._lock:
            outer = (self._slots, self._views, self._tags, self._next)
            self._slots, self._views, self._tags, self._next = {}, {}, {}, {}
            self._local += 1
        try:
            yield
        finally:
            with self._lock:
                self._local -= 1
                self._slots, self._views, self._tags, self._next = outer

    def drop_local(self) -> None:
        """Inside graph_local(): let go of every buffer the graph's slots hold (what a caller still
        references stays alive), so weights nothing will read again leave the graph's pool at once
        instead of at the slot's next take. Outside graph_local() nothing happens (the persistent
        slots are reused, not allocated)."""
        with self._lock:
            if not self._local:
                return
            for key, slots in self._slots.items():
                slots[:] = [None] * len(slots)
                for views in self._views[key]:
                    views.clear()
                self._tags[key] = [None] * len(slots)

    def clear(self) -> None:
        with self._lock:
            self._slots.clear()
            self._views.clear()
            self._tags.clear()
            self._next.clear()

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for s in self._slots.values() for b in s if b is not None)


WEIGHT_BUFFERS = _WeightBuffers()


def get_base_weight(linear: torch.nn.Module) -> torch.Tensor:
    """The base layer's weight `[out_features, in_features]` in its compute dtype.

    Plain `nn.Linear` (or a PEFT layer over one): the weight itself, no copy.
    4-bit layer: dequantised by velotune's NF4 kernel (Triton on CUDA, the PyTorch reference on
    CPU) into a reusable per-device buffer, so training steps allocate no full-size weights.

    Contract for 4-bit layers: the tensor is valid until BUFFER_SLOTS (2) further calls for the same
    device and dtype. A call for the weight a slot still holds returns that slot, not dequantising
    again (see `_WeightBuffers.lookup`). Use it within one autograd Function's forward or backward and let it go: never
    save it for backward (`ctx.save_for_backward`) or keep it across calls; call again in backward.
    It does not require grad. Plain autograd ops that save it are caught (see `_WeightBuffers`).
    Valid in and out of `torch.inference_mode()`: the buffers and cached views are normal tensors
    whichever mode first made them.
    """
    layer = base_layer(linear)
    weight = layer.weight
    if getattr(weight, "quant_state", None) is None:
        return weight
    nf4 = nf4_weight(weight)  # cached on the weight, validated per call
    tag = (nf4, weight._version)  # a new NF4 view or an in-place change: a miss
    out = WEIGHT_BUFFERS.lookup(tag, nf4.shape, nf4.numel, nf4.device, nf4.dtype)
    if out is None:
        out = WEIGHT_BUFFERS.take_view(nf4.shape, nf4.numel, nf4.device, nf4.dtype)
        if triton_enabled(nf4.packed):
            dequantize_nf4_triton(nf4, out)  # replays its launch plan for this buffer
        else:
            dequantize_nf4(nf4, nf4.dtype, out=out)
        WEIGHT_BUFFERS.remember(out, tag)
    # bitsandbytes' own forward: dequantise to the stored dtype, then cast to the input's dtype.
    dtype = _compute_dtype(layer, nf4)
    return out if dtype == nf4.dtype else out.to(dtype)


def dequantize_weight(module_or_weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A fresh `[out, in]` tensor of the layer's base weight in `dtype` (fp32 by default, for merging).

    4-bit: exactly the values the forward pass uses (dequantised to `quant_state.dtype`), then cast
    (an exact widening for fp32). Plain layers: a copy of the weight in `dtype`.
    """
    w = module_or_weight
    if isinstance(w, torch.nn.Module):
        w = base_layer(w).weight
    if getattr(w, "quant_state", None) is None:
        return w.detach().to(dtype, copy=True)
    nf4 = NF4Weight.from_bnb(w.data, w.quant_state)
    return dequantize_nf4(nf4, nf4.dtype).to(dtype)


def iter_dequantized_weights(
    model: torch.nn.Module, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """(parameter name as in `model.state_dict()`, fresh dequantised weight) for each 4-bit layer.

    One weight at a time (an 8B model never needs all of them in fp32 at once). The name is that
    of the quantised parameter, e.g. `...q_proj.base_layer.weight` under PEFT.
    """
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and getattr(w, "quant_state", None) is not None:
            yield (f"{name}.weight" if name else "weight"), dequantize_weight(w, dtype)


def dequantize_model_weights(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """All 4-bit weights dequantised, {parameter name: [out, in] tensor in `dtype`} (see iter_...)."""
    return dict(iter_dequantized_weights(model, dtype))
