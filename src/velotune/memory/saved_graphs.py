"""CUDA graphs of decoder layers under recompute="mlp" (`cuda_graphs=True, recompute="mlp"`): the
layer's forward, and its backward with only the MLP recomputed, each replayed as one graph.

The recompute="layer" graphs (layer_graphs.py) recompute the whole layer inside their backward
graph. Here, as in eager recompute="mlp" (saved_offload.py), the attention half is not recomputed:
backward reads what forward saved. A graph cannot save into fresh memory, so everything a layer
saves for backward lives in one of two static buffer sets shared by the layers of a signature,
`_Slots` P[0] and P[1] (consecutive layers alternate, so one set is written while the other is
still being copied):

* Build (once per layer, when it is captured, on the capture stream: autograd runs each backward
  node on the stream of its forward, and B is captured there): the layer runs eagerly with grad
  under saved-tensor hooks that give every saved tensor a place in the set -- one flat slot per
  storage span, as saved_offload.py does; parameters and the static kwarg buffers (rotary tables,
  mask) stay where they are; a saved RMSNorm output keeps only its input's slot and is recomputed
  -- and return handles to those places. The `_Plan` records, pack call by pack call, which span goes to which
  slot. The autograd graph built there is the one backward differentiates.
* F graph: the same forward, whose pack hook copies each saved span into its slot (the plan, call
  by call; a different sequence fails the capture). After each replay the set (one byte buffer)
  is copied to pinned host memory on the d2h side stream, in one copy; the next forward that
  writes the set waits for that copy.
* Inputs and outputs (`GraphedSavedLayer`): the layers are chained through the signature's two
  [B, T, H] buffers z[0] and z[1]: a layer of parity p reads x from z[1 - p] and writes y to z[p],
  and in backward reads dy from z[p] and writes dx to z[1 - p]. What it returns are aliases of the
  buffers (`Statics.hand_out`), so the next graphed layer finds its input in place: no copy in, no
  clone out (8B: 4 x 32 MiB of device copies per layer and step). An alias still alive when its
  buffer is about to be written again (kept by output_hidden_states, saved by the final norm of a
  first forward before a second one, a retained graph) first gets its own copy (`before_write`);
  an eager layer or anything else that is not the next graphed layer gets its own copy on arrival.
* B graph: `autograd.grad(y, (x, *LoRA leaves), dy)` over the build's graph (retained): unpacking
  views the slots or recomputes a norm from them, the MLP's checkpoint recomputes the MLP (and
  stops before its frozen down GEMM). Before a replay the set is refilled from host memory on the
  h2d side stream, one layer ahead, after the replay that last read it; the last layers of the
  forward are still in their sets and are not copied back.

Nothing of the build's own values is read again: everything backward reads is in a set, in a
parameter, or in a static kwarg buffer, all refilled before each replay. On the CPU the closures
run eagerly over the same buffers (layer_graphs.Graph), so the CPU tests check exactly that, with
adapters that change between steps: losses and gradients equal eager recompute="mlp" bit for bit.

Every saved tensor goes into the sets, however small (eager "mlp" leaves those under 1 MiB on the
device): one left where the build put it would be read, stale, by every later replay.

The graphs dequantise NF4 weights into their pool, so the persistent dequantisation buffers are let
go (layer_graphs.py); host memory as eager "mlp". GPU tests and the 8B-shape check with the math
SDPA backend: bit-identical to eager. Speed and memory: BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn

from velotune.models.norm import norm_forward
from velotune.quant.weights import WEIGHT_BUFFERS
from velotune.memory.host_copies import copy_back, HostCopy
from velotune.memory.graph_entry import TWICE, Entry, fresh_leaves
from velotune.memory.saved_offload import storage_elements, NormOf, storage_span  # NormOf.inp: a _Ref here


# A forward graph copies each saved span into its set as the layer saves it, except spans under this
# many bytes (8B: ~11 per layer: LoRA XA, softmax statistics...): they are copied together at the
# end, one multi-tensor kernel instead of a graph node each.
SMALL_SPAN = 2**20


class _PlanMismatch(RuntimeError):
    """The captured forward saved other tensors than the build did (fails the capture)."""


class _Plan:
    """What a layer's forward saves, call by call. layout: (numel, dtype) per slot; calls: per pack
    call, (is a norm output, [(slot, start, end) of the storage spans to copy at that call])."""

    def __init__(self):
        self.layout: list[tuple[int, torch.dtype]] = []
        self.calls: list[tuple[bool, list[tuple[int, int, int]]]] = []


class _Ref:
    """A saved tensor's place: slot, and how to view it there."""

    __slots__ = ("slot", "size", "stride", "offset")

    def __init__(self, slot, size, stride, offset):
        self.slot, self.size, self.stride, self.offset = slot, size, stride, offset


class _Slots:
    """One buffer set: one byte buffer (`raw`, copied to and from host memory whole: one copy each way
    per layer, not one per saved tensor) and a typed flat view of it per slot (`flat`, 256-byte
    aligned); `holds`: weak reference to the `_LayerCopy` whose values it holds now; `free_at`: event
    after which it may be overwritten (the last copy or replay that used it)."""

    ALIGN = 256

    def __init__(self, layout, device):
        self.layout = list(layout)
        offsets, end = [], 0
        for n, dtype in self.layout:
            start = -(-end // self.ALIGN) * self.ALIGN
            offsets.append(start)
            end = start + n * dtype.itemsize
        self.raw = torch.empty(end, dtype=torch.uint8, device=device)
        self.flat = [self.raw[o : o + n * dtype.itemsize].view(dtype) for (n, dtype), o in zip(self.layout, offsets)]
        self.holds: weakref.ref | None = None
        self.free_at = None
        self.ready = None  # event: the host->device copy into it is done

    def holds_copy(self, rec) -> bool:
        return self.holds is not None and self.holds() is rec

    def view(self, ref: _Ref) -> torch.Tensor:
        flat = self.flat[ref.slot]  # as_strided's offset counts from the storage's start, not the view's
        return flat.as_strided(ref.size, ref.stride, flat.storage_offset() + ref.offset)

    def nbytes(self) -> int:
        return self.raw.numel()


def _static(t: torch.Tensor, device, kept: set) -> bool:
    """Saved as it is: parameters (live values), kwarg buffers (refilled), empties, other devices."""
    return (
        isinstance(t, nn.Parameter)
        or t.numel() == 0
        or t.layout != torch.strided
        or t.device != device
        or t.untyped_storage().data_ptr() in kept
    )


class SavedEntry(Entry):
    """One layer, one signature, recompute="mlp": the build's graph, its plan, and F/B graphs over
    the signature's statics and one of its two buffer sets."""

    def __init__(self, statics, slots, names, static_kw, fn, parity: int):
        super().__init__(statics, slots, names, static_kw, fn)
        self.parity = parity
        self.zin, self.zout = statics.z[1 - parity], statics.z[parity]  # x in, y out; dy in, dx out
        self.dx_out = self.zin
        self.P: _Slots | None = None
        self.y = self.x = self.leaves = None  # the build's output, input leaf and LoRA leaves

    def _kept(self) -> set:
        return {t.untyped_storage().data_ptr() for t in self.s.kw}

    def _build(self) -> None:
        """The eager forward whose graph B differentiates, and the plan of what it saved where."""
        plan, device, kept = _Plan(), self.s.x.device, self._kept()
        spans: dict = {}
        held: list = []
        norms: dict = {}

        def place(t: torch.Tensor) -> tuple[_Ref, list]:
            key, (a, b) = (t.untyped_storage().data_ptr(), t.dtype), storage_span(t)
            hit, copies = spans.get(key), []
            if hit is None or not (hit[1] <= a and b <= hit[2]):
                hit = spans[key] = (len(plan.layout), a, b)
                plan.layout.append((b - a, t.dtype))
                copies.append(hit)
            held.append(t)  # its address stays its own until the build is done
            return _Ref(hit[0], t.shape, t.stride(), t.storage_offset() - hit[1]), copies

        def pack(t: torch.Tensor):
            if _static(t, device, kept):
                plan.calls.append((False, []))
                return t
            norm = norms.get(t.untyped_storage().data_ptr())
            if norm is not None:
                ref, copies = place(norm[1])
                plan.calls.append((True, copies))
                return NormOf(norm[0], ref, t.shape, t.stride(), t.storage_offset())
            ref, copies = place(t)
            plan.calls.append((False, copies))
            return ref

        entry = weakref.ref(self)  # the hooks live with the graph, which the entry holds

        def unpack(obj):
            return entry()._unpack(obj)

        x = self.zin.detach().requires_grad_(True)
        with fresh_leaves(self.slots) as leaves:
            with (
                torch.enable_grad(),
                torch.autograd.graph.saved_tensors_hooks(pack, unpack),
                self.modes.set(norm_outputs=norms, checkpointed_mlp=True),
                WEIGHT_BUFFERS.graph_local(),
            ):
                y = self._call(x)
        held.clear()
        norms.clear()
        self.plan, self.y, self.x, self.leaves = plan, y, x, leaves

    def _unpack(self, obj):
        if isinstance(obj, _Ref):
            return self.P.view(obj)
        if isinstance(obj, NormOf):
            with torch.no_grad():
                y = norm_forward(obj.module, self.P.view(obj.inp))
            return y.as_strided(obj.size, obj.stride, obj.offset)
        return obj

    def capture(self, pool, side=None) -> None:
        e, s = self, self.s
        stream = torch.cuda.stream(side) if side is not None else contextlib.nullcontext()
        if side is not None:
            for P in s.sets:  # the warm-up runs write a set: not while it is still being copied out
                if P is not None and P.free_at is not None:
                    torch.cuda.current_stream().wait_event(P.free_at)
            side.wait_stream(torch.cuda.current_stream())
        with stream:  # backward runs each node on its forward's stream: the capture stream
            self._build()
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        device = s.x.device
        if s.sets[self.parity] is None:  # the signature's first layer of this parity
            s.sets[self.parity] = _Slots(self.plan.layout, device)
        if s.sets[self.parity].layout != self.plan.layout:
            raise _PlanMismatch("this layer saves other tensors than the signature's first layer")
        self.P = s.sets[self.parity]
        self.P.holds = None  # the warm-up runs below overwrite it

        def forward():
            calls = iter(e.plan.calls)
            norms: dict = {}
            later: tuple[list, list] = ([], [])  # small spans: copied together at the end

            def pack(t: torch.Tensor):
                is_norm, copies = next(calls, (None, None))
                if copies is None or is_norm != (t.untyped_storage().data_ptr() in norms):
                    raise _PlanMismatch("the captured forward saves other tensors than the build")
                src = norms[t.untyped_storage().data_ptr()][1] if is_norm else t
                for slot, a, b in copies:
                    if storage_span(src) != (a, b) or src.dtype != e.P.flat[slot].dtype:
                        raise _PlanMismatch("a saved tensor's layout differs from the build's")
                    dst, span = e.P.flat[slot], storage_elements(src, a, b)
                    if dst.numel() * dst.element_size() < SMALL_SPAN:
                        later[0].append(dst)  # the view keeps the storage: no reuse before the copy
                        later[1].append(span)
                    else:
                        dst.copy_(span)
                return None

            x = e.zin.detach().requires_grad_(True)
            with fresh_leaves(e.slots):
                with (
                    torch.enable_grad(),
                    torch.autograd.graph.saved_tensors_hooks(pack, _never),
                    e.modes.set(norm_outputs=norms, checkpointed_mlp=True),
                ):
                    y = e._call(x)
                e.zout.copy_(y.detach())
            if later[0]:
                torch._foreach_copy_(*later)
            norms.clear()
            if next(calls, None) is not None:
                raise _PlanMismatch("the captured forward saved fewer tensors than the build")

        def backward():
            grads = torch.autograd.grad(e.y, [e.x, *e.leaves], e.zout, allow_unused=True, retain_graph=True)
            e._store_grads(grads)

        self._capture_pair(forward, backward, pool, side)
        if side is not None:  # the kernels are recorded: the build's graph is no longer needed
            self.y = self.x = None


def _never(obj):
    raise RuntimeError("velotune: the captured forward's own graph was differentiated")


class _LayerCopy:
    """One forward call's saved set in host memory (`copy`: a `HostCopy` of the set's bytes) and the
    call before."""

    __slots__ = ("copy", "entry", "prev", "__weakref__")

    def __init__(self, copy, entry, prev):
        self.copy, self.entry, self.prev = copy, entry, prev


class SavedGraphRuns:
    """Per model: the order of graphed recompute="mlp" layer calls, and the copies of their sets."""

    def __init__(self, offloader):
        self.offloader = offloader
        self._last = None

    def to_host(self, entry: SavedEntry) -> _LayerCopy:
        P = entry.P
        (host,), done, pool = self.offloader.to_host([P.raw])
        rec = _LayerCopy(HostCopy(host, P.raw.numel(), P.raw.dtype, P.raw.device, done, pool), entry, self._last)
        self._last = weakref.ref(rec)
        P.holds, P.free_at = weakref.ref(rec), done
        stats = self.offloader.stats
        stats.packed += 1
        stats.bytes_offloaded += P.nbytes()
        return rec

    def load(self, rec: _LayerCopy) -> None:
        """rec's values into its entry's set, unless they are there (h2d stream, after the set's
        last reader and rec's device->host copy)."""
        P = rec.entry.P
        if P.holds_copy(rec):
            return
        c = rec.copy
        if c.device.type != "cuda":
            copy_back(c.host, P.raw)
        else:
            _, h2d = self.offloader.streams(c.device)
            h2d.wait_event(c.d2h_done)
            if P.free_at is not None:
                h2d.wait_event(P.free_at)
            with torch.cuda.stream(h2d):
                copy_back(c.host, P.raw, non_blocking=True)
                done = torch.cuda.Event()
                done.record(h2d)
            c.h2d_done = done
            P.ready = P.free_at = done  # a later write waits for this one (it waited for the readers)
        P.holds = weakref.ref(rec)
        self.offloader.stats.prefetched += 1


class GraphedSavedLayer(torch.autograd.Function):
    """Layer L of parity p: x in z[1 - p], y out in z[p]; dy in z[p], dx out in z[1 - p]. The next
    graphed layer's input is this one's output buffer, so consecutive graphed layers pass their
    hidden states (and, in backward, their gradients) without a copy: outputs are aliases of the
    buffers (`Statics.hand_out`), copied in only where a tensor from elsewhere arrives."""

    @staticmethod
    def forward(ctx, entry: SavedEntry, runs: SavedGraphRuns, kw_tensors, x, *params):
        s, P, i = entry.s, entry.P, entry.parity
        s.load_kwargs(kw_tensors)
        s.fill(1 - i, x)
        if x.is_cuda and P.free_at is not None:
            torch.cuda.current_stream().wait_event(P.free_at)  # the set's previous copy to the host
        P.ready = None
        s.before_write(i)
        entry.fwd.replay()
        y = s.hand_out(i)
        ctx.rec, ctx.runs, ctx.kw_tensors = runs.to_host(entry), runs, kw_tensors
        return y

    @staticmethod
    def backward(ctx, dy):
        rec, runs = ctx.rec, ctx.runs
        if rec is None:
            raise RuntimeError(TWICE)
        ctx.rec = None  # its host buffers go back to the pool when backward is done
        entry = rec.entry
        s, P, i = entry.s, entry.P, entry.parity
        runs.load(rec)
        s.load_kwargs(ctx.kw_tensors)
        s.fill(i, dy)
        if dy.is_cuda:
            if P.ready is not None:
                torch.cuda.current_stream().wait_event(P.ready)
        s.before_write(1 - i)
        entry.bwd.replay()
        if dy.is_cuda:
            P.free_at = torch.cuda.Event()
            P.free_at.record()
        runs.offloader.stats.unpacked += 1
        prev = rec.prev() if rec.prev is not None else None
        if prev is not None:
            runs.load(prev)  # one layer ahead: overlaps the next replay
        return (None, None, None, s.hand_out(1 - i), *entry.grads_out())
