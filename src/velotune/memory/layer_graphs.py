"""CUDA graphs of checkpointed decoder layers: the layer's forward, and its recompute + backward,
each replayed as one graph, so a training step stops paying Python for every kernel launch.

Opt-in (off by default: padding-free batches change shape every step; docs/perf-notes.md). Status (2026-12-01): the CPU path is exact (tests/train/test_layer_graphs.py);
on the H200 all 32 layers of the 8B model capture and replay (`_fresh_leaves` fixed the first
capture, which autograd's cross-stream join for a parameter's old AccumulateGrad node invalidated),
and the GPU test is bit-identical to eager. But the 8B step gains nothing (11656 vs 11670 tok/s, same
call): with launch plans the eager step is no longer host-bound (BENCHMARKS.md). Under
recompute="mlp" (saved_graphs.py) they do gain: 4.5x stock vs 3.8-4.2x eager for 8B QLoRA (H200,
2026-12-01). A failed capture warns and leaves the model on the eager path.

    enable_offloaded_checkpointing(model, cuda_graphs=True)      # get_peft_model(..., cuda_graphs=True)

This file graphs recompute="layer"; `LayerGraphs.run(saved=True)` hands recompute="mlp" layers to
saved_graphs.SavedEntry (forward, and a backward that recomputes only the MLP) with the same
signatures, warm-up, fall-backs and statics.

Why: an 8B LoRA step launches ~6,000 kernels and is bound by the host (docs/perf-notes.md: the
host queues its step in about the time the GPU needs to run it). A graph replays a layer's ~200
launches for the price of one.

How, per layer and per input signature (shape, dtype, kwargs; see `_Entry`):
* calls 1..WARMUP run eagerly (offloaded checkpointing as without graphs): they compile the Triton
  kernels and create the cuBLAS handles; a graph dequantises 4-bit weights into buffers of its own
  pool (`WEIGHT_BUFFERS.graph_local`), so after a capture the persistent ones are let go;
* the next call captures two graphs into one memory pool shared by every layer of the model (the
  graphs run one after the other, so one layer's working set serves them all):
    F: y = layer(x)  under no_grad                                   (the checkpointed forward)
    B: y = layer(x); (dx, dlora...) = autograd.grad(y, (x, lora...), dy)   (recompute + backward)
  Their inputs and outputs are static buffers shared by the layers of a signature: x, y (= dx: each
  is cloned out right after its replay), dy, the flat LoRA-gradient buffer, and one buffer per
  tensor kwarg (rotary cos/sin, position ids, mask);
  (B's forward skips the MLP's frozen down GEMM where only a residual add follows: its values are
  never read, as checkpointing's early stop skips it eagerly; see models/mlp.py);
* later calls run `_GraphedLayer`: copy x in, replay F, clone y out, offload x to host memory (the
  offloader of checkpointing.py); in backward, bring x back, replay B, and return dx and the LoRA
  gradients to autograd (so AccumulateGrad, gradient accumulation and DDP's hooks work as usual:
  the gradients are views of a buffer shared with other layers, which autograd never adopts as
  `.grad`, it copies or adds them).
Numerics: the same kernels in the same order as the eager layer, so losses and gradients are
bit-identical to offloaded checkpointing (GPU test), and the CPU path (no graphs: the captured
closures are run eagerly through the same static buffers, which is what the CPU tests exercise)
equals it exactly.

Not graphed (eager offloaded checkpointing instead), checked on every call: no grad, a layer whose
parameters moved (FSDP, `.to()`), a changed PEFT state (adapter disabled/merged/switched), dropout
with p > 0 in training, autocast, kwargs other than tensors/None/bools/ints, non-tensor outputs,
a distributed run (kept simple), more than MAX_SIGNATURES shapes per layer.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
import weakref

import torch
from torch import nn

from velotune.models.mlp import mlp_output_values_unused
from velotune.quant.weights import WEIGHT_BUFFERS
from velotune.memory.checkpointing import _layer_of

WARMUP = 1             # eager calls per layer and signature before capture
MAX_SIGNATURES = 2     # graphed input signatures per layer (e.g. two sequence-length buckets)
SAVED_SETS = 2         # recompute="mlp": device buffer sets of saved tensors, taken by consecutive layers in turn


def _flatten_kwargs(kwargs: dict):
    """(names of tensor slots, tensors, static part) or None when a kwarg cannot be graphed.
    A tuple of tensors (rotary cos/sin) counts as several slots."""
    names, tensors, static = [], [], []
    for k in sorted(kwargs):
        v = kwargs[k]
        if isinstance(v, torch.Tensor):
            names.append((k, None))
            tensors.append(v)
        elif isinstance(v, tuple) and v and all(isinstance(t, torch.Tensor) for t in v):
            for i, t in enumerate(v):
                names.append((k, i))
                tensors.append(t)
        elif v is None or isinstance(v, (bool, int, str)):
            static.append((k, v))
        else:
            return None
    return names, tensors, tuple(static)


def _rebuild_kwargs(names, tensors, static) -> dict:
    out = dict(static)
    for (k, i), t in zip(names, tensors):
        if i is None:
            out[k] = t
        else:
            out.setdefault(k, [])
            out[k].append(t)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}


def _peft_state(mods) -> tuple:
    """What decides which path a LoRA layer computes (see lora/layers.resolve), as plain values."""
    out = []
    for m in mods:
        d = m.__dict__
        out.append((d.get("_disable_adapters", False), bool(d.get("merged_adapters")),
                    str(d.get("_active_adapter", "default")),
                    tuple(sorted((k, float(v)) for k, v in d.get("scaling", {}).items()))))  # baked into graphs
    return tuple(out)


@contextlib.contextmanager
def _fresh_leaves(slots):
    """Each trainable parameter replaced, in its module, by a new leaf Parameter sharing its storage.

    Gradients are taken with respect to these leaves, never the real parameters: a real parameter's
    AccumulateGrad node may have been created on the default stream by an earlier step whose graph
    is still alive (the caller's previous `loss`), and autograd (torch >= 2.10) then joins the
    capture stream with the default stream, which invalidates the capture (seen on the H200:
    cudaErrorStreamCaptureInvalidated after the "AccumulateGrad node's stream does not match"
    warning). New leaves get their nodes on the capture stream. Same storage: the recorded kernels
    read the live parameter values."""
    leaves = []
    try:
        for module, name, p in slots:
            leaf = nn.Parameter(p.detach(), requires_grad=True)
            module._parameters[name] = leaf
            leaves.append(leaf)
        yield leaves
    finally:
        for module, name, p in slots:
            module._parameters[name] = p


class _Graph:
    """One captured region: a CUDA graph on the GPU; on the CPU the closure itself, run eagerly on
    replay (same static buffers, same order: what the CPU tests check)."""

    def __init__(self, device: torch.device, pool):
        self.cuda = device.type == "cuda"
        self.pool = pool
        self.graph = torch.cuda.CUDAGraph() if self.cuda else None
        self.fn = None

    def capture(self, fn, side=None) -> None:
        if not self.cuda:
            with WEIGHT_BUFFERS.graph_local():   # the warm-up run as on the GPU (a failing closure fails here)
                fn()
            self.fn = fn
            return
        # one eager run on the side stream first, as torch.cuda.make_graphed_callables does
        # (per-stream state such as cuBLAS workspaces exists before capture); then capture on it.
        # graph_local: the weights the graph dequantises are its own pool allocations (reused
        # within the graph), never the persistent buffers eager code reads
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), WEIGHT_BUFFERS.graph_local():
            fn()
        torch.cuda.current_stream().wait_stream(side)
        with WEIGHT_BUFFERS.graph_local(), torch.cuda.graph(self.graph, pool=self.pool, stream=side):
            fn()

    def replay(self) -> None:
        if self.cuda:
            self.graph.replay()
        else:
            with WEIGHT_BUFFERS.graph_local():   # the same operations as a captured graph
                self.fn()


class _Statics:
    """Input/output buffers shared by every layer of one signature."""

    def __init__(self, x: torch.Tensor, kw_tensors, n_grad: int, grad_dtype, dy_is_x: bool = False):
        self.x = torch.empty_like(x)                   # forward input, and recompute input in backward
        # y is F's output, cloned right after each F replay; dx is B's, cloned right after each B
        # replay: one buffer serves both. dy_is_x (recompute="mlp": B reads the saved set, never x):
        # dy shares x's buffer too. 8B, 2 x 2048: 64 MiB instead of 128 MiB.
        self.y = torch.empty_like(x)
        self.dy = self.x if dy_is_x else torch.empty_like(x)
        self.dx = self.y
        self.kw = [torch.empty_like(t) for t in kw_tensors]
        self.kw_src: list = [None] * len(kw_tensors)   # the tensor each kw buffer was last filled from
        self.grads = torch.empty(n_grad, dtype=grad_dtype, device=x.device)
        self.sets: list = [None] * SAVED_SETS          # recompute="mlp": the saved-tensor sets (saved_graphs.py)
        # recompute="mlp" chains its layers through these two buffers (saved_graphs.py): a layer of
        # parity p reads x from z[1 - p] and writes y to z[p], and in backward reads dy from z[p] and
        # writes dx to z[1 - p]; what it returns are aliases of them, not copies
        self.z = (self.x, self.y)
        self._aliases: list = [None, None]             # weak reference to the alias handed out of z[i]

    def hand_out(self, i: int) -> torch.Tensor:
        """z[i] as a tensor of its own (own version counter: a replay never bumps versions either),
        remembered weakly so that a later write to z[i] can first give a live one its own copy."""
        buf = self.z[i]
        alias = torch.empty(0, dtype=buf.dtype, device=buf.device).set_(
            buf.untyped_storage(), buf.storage_offset(), buf.shape, buf.stride())
        self._aliases[i] = weakref.ref(alias)
        return alias

    def fill(self, i: int, t: torch.Tensor) -> None:
        """t's values into z[i], unless they are z[i] already (the previous graphed layer's output)."""
        buf = self.z[i]
        if not (t.data_ptr() == buf.data_ptr() and t.dtype == buf.dtype and t.shape == buf.shape
                and t.stride() == buf.stride()):
            self.before_write(i)
            buf.copy_(t)

    def before_write(self, i: int) -> None:
        """Before z[i] is overwritten: an alias of it that is still alive (kept by the caller, e.g.
        output_hidden_states, or saved by a later module for its backward) gets its own copy of the
        values, so it never sees the overwrite. In a plain training step none is alive by then."""
        ref, self._aliases[i] = self._aliases[i], None
        alias = ref() if ref is not None else None
        if alias is not None and alias.data_ptr() == self.z[i].data_ptr():
            alias.data = self.z[i].clone()

    def unchain(self, t: torch.Tensor) -> None:
        """t, if it is an alias of z[i], gets its own copy now (for a consumer that is not the next
        graphed layer: an eager layer may copy its input to the host on a side stream, which a
        later replay must not overwrite under it)."""
        for i, ref in enumerate(self._aliases):
            if ref is not None and ref() is t:
                self.before_write(i)

    def load_kwargs(self, tensors) -> None:
        for i, t in enumerate(tensors):
            if self.kw_src[i] is not t:                # the same rotary tables serve all layers of a step
                self.kw[i].copy_(t)
                self.kw_src[i] = t


class _Entry:
    """One layer, one signature: its two graphs over the signature's statics."""

    def __init__(self, statics: _Statics, slots: list, names, static_kw, fn):
        params = [p for _, _, p in slots]
        self.s, self.slots, self.params, self.names, self.static_kw = statics, slots, params, names, static_kw
        self.calls = 0
        self.graphable = True            # False once the layer's output turned out not to be one tensor like x
        self.fwd = self.bwd = None
        self.param_ptrs = tuple(p.data_ptr() for p in params)
        self.fn = fn.func
        self.fn_args, self.fn_keywords = fn.args, fn.keywords
        off, views, self.grad_spans = 0, [], []
        for p in params:
            views.append(statics.grads[off:off + p.numel()].view(p.shape))
            self.grad_spans.append((off, off + p.numel(), p.shape))
            off += p.numel()
        self.grad_views = views
        self.dx_out = statics.dx         # where backward stores dx (recompute="mlp": its z buffer)

    def grads_out(self) -> list[torch.Tensor]:
        """The LoRA gradients of the last backward replay, as views of one copy of the static buffer.
        Autograd's AccumulateGrad keeps such a view as p.grad (nothing else refers to it), so a layer
        costs one copy instead of one per parameter (8B: 14 small copies per layer)."""
        grads = self.s.grads.clone()
        return [grads[a:b].view(shape) for a, b, shape in self.grad_spans]

    def _call(self, x):
        kw = {**self.fn_keywords, **_rebuild_kwargs(self.names, self.s.kw, self.static_kw)}
        return self.fn(*self.fn_args, x, **kw)

    def _store_grads(self, grads) -> None:
        """(dx, *LoRA grads) into the statics (zeros for an adapter that got no gradient)."""
        self.dx_out.copy_(grads[0])
        flat = self.s.grads
        if grads[1:] and all(g is not None and g.dtype == flat.dtype for g in grads[1:]):
            # one concatenation into the buffer instead of a copy per adapter (8B: 14 graph nodes per layer)
            torch.cat([g.reshape(-1) for g in grads[1:]], out=flat)
            return
        got = [(view, g) for view, g in zip(self.grad_views, grads[1:]) if g is not None]
        if got:
            torch._foreach_copy_([view for view, _ in got], [g for _, g in got])
        for view, g in zip(self.grad_views, grads[1:]):
            if g is None:
                view.zero_()

    def capture(self, pool, side=None) -> None:
        s = self

        def forward():
            with torch.no_grad():
                s.s.y.copy_(s._call(s.s.x))

        def backward():
            x = s.s.x.detach().requires_grad_(True)
            with _fresh_leaves(s.slots) as leaves:
                # y's values are never read, only its graph: the MLP skips its frozen down GEMM as
                # checkpointing's early stop does eagerly (without it B ran 20 ms more GEMMs per 8B step)
                with torch.enable_grad(), mlp_output_values_unused():
                    y = s._call(x)
                grads = torch.autograd.grad(y, [x, *leaves], s.s.dy, allow_unused=True)
            s._store_grads(grads)

        self._capture_pair(forward, backward, pool, side)

    def _capture_pair(self, forward, backward, pool, side) -> None:
        """The layer's two graphs, into the shared pool. Backward first: it needs the most memory at
        once (the MLP's [N, I] tensors and weights), so the pool's first segments are those big blocks
        and forward's smaller tensors fit in them; in the other order forward's [N, H] tensors took
        segments of their own (8B QLoRA, H200: pool 1.00 GiB forward-first, 0.87 GiB backward-first)."""
        device = self.s.x.device
        self.fwd, self.bwd = _Graph(device, pool), _Graph(device, pool)
        self.bwd.capture(backward, side)
        self.fwd.capture(forward, side)


_TWICE = ("velotune: a CUDA-graphed decoder layer was differentiated a second time (retain_graph=True): "
          "what it saved is released after the first backward; use cuda_graphs=False for that")


class _GraphedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, entry: _Entry, offloader, kw_tensors, x, *params):
        s = entry.s
        s.load_kwargs(kw_tensors)
        s.x.copy_(x)
        entry.fwd.replay()
        y = s.y.clone()
        ctx.entry, ctx.offloader, ctx.kw_tensors = entry, offloader, kw_tensors
        ctx.saved = offloader.offload(x)
        return y

    @staticmethod
    def backward(ctx, dy):
        entry, s = ctx.entry, ctx.entry.s
        if ctx.saved is None:
            raise RuntimeError(_TWICE)
        x = ctx.offloader.restore(ctx.saved)
        ctx.saved = None     # the host copy goes back to the pool now, not when the caller drops the graph
        s.load_kwargs(ctx.kw_tensors)
        s.x.copy_(x)
        s.dy.copy_(dy)
        entry.bwd.replay()
        return (None, None, None, s.dx.clone(), *entry.grads_out())


class LayerGraphs:
    """Per model: the graphed entries of every decoder layer, one memory pool."""

    def __init__(self):
        self.pool = None
        self.disabled = False            # set when a capture failed
        self._streams: dict = {}
        self.entries: dict = {}          # (id(layer), signature) -> _Entry
        self.statics: dict = {}          # signature -> _Statics
        self.stats = {"captured": 0, "replayed": 0, "eager": 0}
        self.saved_runs = None           # recompute="mlp": saved_graphs.SavedGraphRuns

    def _stream(self, device: torch.device):
        """The side stream captures warm up on (cuBLAS workspaces are per stream), one per device."""
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    @staticmethod
    def _eligible(layer: nn.Module) -> bool:
        if torch.is_autocast_enabled() or not layer.training:
            return False
        return not (torch.distributed.is_available() and torch.distributed.is_initialized())

    @staticmethod
    def _scan(layer: nn.Module):
        """One walk over the layer, every call (modules may be swapped, e.g. by PEFT injecting
        adapters): (trainable parameter slots (module, name, param), LoRA modules, whether a
        dropout with p > 0 is present)."""
        slots, lora_mods, dropout = [], [], False
        for m in layer.modules():
            for n, p in m._parameters.items():
                if p is not None and p.requires_grad:
                    slots.append((m, n, p))
            if "lora_A" in m._modules and "base_layer" in m._modules:
                lora_mods.append(m)
            dropout = dropout or (isinstance(m, nn.Dropout) and m.p > 0)
        return slots, lora_mods, dropout

    def run(self, offloader, fn, x: torch.Tensor, eager, saved: bool = False):
        """The layer's output through its graphs, or `eager()` while warming up / when not graphable.
        saved: the layer runs under recompute="mlp" (its graphs are saved_graphs.SavedEntry's)."""
        run_eager = eager

        def eager():        # x may be a graphed layer's output, an alias of a static buffer
            self.unchain(x)
            return run_eager()

        layer = _layer_of(fn) if isinstance(fn, functools.partial) and not self.disabled else None
        flat = _flatten_kwargs(fn.keywords) if layer is not None else None
        scan = self._scan(layer) if flat is not None and self._eligible(layer) else None
        if scan is None or scan[2]:                  # not graphable, or a dropout would be baked in
            self.stats["eager"] += 1
            return eager()
        slots, lora_mods, _ = scan
        names, kw_tensors, static_kw = flat
        params = [p for _, _, p in slots]
        sig = (saved, tuple(x.shape), x.dtype, x.device, tuple(names),
               tuple((t.shape, t.dtype, t.device) for t in kw_tensors), static_kw,
               tuple(p.shape for p in params), _peft_state(lora_mods))
        entry = self.entries.get((id(layer), sig))
        if entry is None:
            if sum(1 for key in self.entries if key[0] == id(layer)) >= MAX_SIGNATURES:
                self.stats["eager"] += 1
                return eager()
            grad_dtype = params[0].dtype if params else x.dtype
            if any(p.dtype != grad_dtype for p in params):
                self.stats["eager"] += 1
                return eager()
            statics = self.statics.get(sig)
            if statics is None:
                statics = self.statics[sig] = _Statics(x, kw_tensors, sum(p.numel() for p in params), grad_dtype,
                                                       dy_is_x=saved)
            if saved:
                from velotune.memory.saved_graphs import SavedEntry

                # consecutive layers take the sets in turn: by index where the layer has one
                idx = getattr(getattr(layer, "self_attn", None), "layer_idx", None)
                parity = (idx if isinstance(idx, int) else sum(1 for key in self.entries if key[1] == sig)) % SAVED_SETS
                entry = SavedEntry(statics, slots, names, static_kw, fn, parity)
            else:
                entry = _Entry(statics, slots, names, static_kw, fn)
            self.entries[(id(layer), sig)] = entry
        if not entry.graphable:
            self.stats["eager"] += 1
            return eager()
        if entry.fwd is None:
            entry.calls += 1
            if entry.calls <= WARMUP:
                self.stats["eager"] += 1
                y = eager()
                if not (isinstance(y, torch.Tensor) and y.shape == x.shape and y.dtype == x.dtype):
                    entry.graphable = False
                return y
            if x.is_cuda and self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            s = entry.s      # capture (and its warm-up run) on this call's real values
            self.unchain(x)  # the warm-up runs write both z buffers: no alias may see that
            s.before_write(0)
            s.before_write(1)
            s.load_kwargs(kw_tensors)
            if saved:        # B is captured first and writes dx where F reads x: F's warm-up reads junk
                entry.zout.zero_()
                entry.zin.copy_(x)
            else:
                s.dy.zero_()
                s.x.copy_(x)
            try:
                entry.capture(self.pool, self._stream(x.device))
            except Exception as e:  # noqa: BLE001 - an op that cannot be captured: train on, eagerly
                warnings.warn(f"velotune: CUDA-graph capture of a decoder layer failed, layers run eagerly "
                              f"from now on ({type(e).__name__}: {e})", stacklevel=2)
                self.disabled = True
                entry.graphable = False
                self.stats["eager"] += 1
                return eager()
            self.stats["captured"] += 1
            # graphs dequantise into their own pool: the persistent buffers (2 x 117 MiB at 8B) go
            # until eager code needs them again (an uncaptured layer, a new shape's warm-up)
            WEIGHT_BUFFERS.clear()
        elif tuple(p.data_ptr() for p in params) != entry.param_ptrs:
            del self.entries[(id(layer), sig)]       # parameters moved: capture again
            return self.run(offloader, fn, x, eager, saved)
        self.stats["replayed"] += 1
        if saved:
            from velotune.memory.saved_graphs import GraphedSavedLayer, SavedGraphRuns

            if self.saved_runs is None:
                self.saved_runs = SavedGraphRuns(offloader)
            return GraphedSavedLayer.apply(entry, self.saved_runs, kw_tensors, x, *params)
        self.unchain(x)      # _GraphedLayer copies x to the host on a side stream
        return _GraphedLayer.apply(entry, offloader, kw_tensors, x, *params)

    def unchain(self, x: torch.Tensor) -> None:
        """x gets its own copy if it is an alias of a static buffer (see `_Statics.unchain`)."""
        for statics in self.statics.values():
            statics.unchain(x)
