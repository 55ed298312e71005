"""CUDA graphs of checkpointed decoder layers: the layer's forward, and its recompute + backward,
each replayed as one graph, so a training step stops paying Python for every kernel launch.

Opt-in (off by default: padding-free batches change shape every step; docs/perf-notes.md). The CPU
path is exact (tests/memory/test_layer_graphs.py); on the GPU all layers of an 8B model capture and
replay (`fresh_leaves`, graph_entry.py, keeps autograd's cross-stream join for a parameter's old
AccumulateGrad node out of the capture), and the GPU test is bit-identical to eager. With
recompute="layer" the step gains nothing (with launch plans the eager step is no longer host-bound);
under recompute="mlp" (saved_graphs.py) it does (BENCHMARKS.md). A failed capture warns and leaves
the model on the eager path.

    enable_offloaded_checkpointing(model, cuda_graphs=True)      # get_peft_model(..., cuda_graphs=True)

This file graphs recompute="layer"; `LayerGraphs.run(saved=True)` hands recompute="mlp" layers to
saved_graphs.SavedEntry (forward, and a backward that recomputes only the MLP) with the same
signatures, warm-up, fall-backs and statics.

Why: an 8B LoRA step launches ~6,000 kernels and is bound by the host (docs/perf-notes.md: the
host queues its step in about the time the GPU needs to run it). A graph replays a layer's ~200
launches for the price of one.

How, per layer and per input signature (shape, dtype, kwargs; see `Entry`):
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

import functools
import warnings

import torch
from torch import nn

from velotune.quant.weights import WEIGHT_BUFFERS
from velotune.memory.graph_entry import TWICE, Entry, Statics, flatten_kwargs, peft_state
from velotune.memory.host_copies import layer_of
from velotune.memory.saved_graphs import GraphedSavedLayer, SavedEntry, SavedGraphRuns

WARMUP = 1  # eager calls per layer and signature before capture
MAX_SIGNATURES = 2  # graphed input signatures per layer (e.g. two sequence-length buckets)


class _GraphedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, entry: Entry, offloader, kw_tensors, x, *params):
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
            raise RuntimeError(TWICE)
        x = ctx.offloader.restore(ctx.saved)
        ctx.saved = None  # the host copy goes back to the pool now, not when the caller drops the graph
        s.load_kwargs(ctx.kw_tensors)
        s.x.copy_(x)
        s.dy.copy_(dy)
        entry.bwd.replay()
        return (None, None, None, s.dx.clone(), *entry.grads_out())


class LayerGraphs:
    """Per model: the graphed entries of every decoder layer, one memory pool."""

    def __init__(self):
        self.pool = None
        self.disabled = False  # set when a capture failed
        self._streams: dict = {}
        self.entries: dict = {}  # (id(layer), signature) -> Entry
        self.statics: dict = {}  # signature -> Statics
        self.stats = {"captured": 0, "replayed": 0, "eager": 0}
        self.saved_runs = None  # recompute="mlp": saved_graphs.SavedGraphRuns

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

        def eager():  # x may be a graphed layer's output, an alias of a static buffer
            self.unchain(x)
            return run_eager()

        layer = layer_of(fn) if isinstance(fn, functools.partial) and not self.disabled else None
        flat = flatten_kwargs(fn.keywords) if layer is not None else None
        scan = self._scan(layer) if flat is not None and self._eligible(layer) else None
        if scan is None or scan[2]:  # not graphable, or a dropout would be baked in
            self.stats["eager"] += 1
            return eager()
        slots, lora_mods, _ = scan
        names, kw_tensors, static_kw = flat
        params = [p for _, _, p in slots]
        sig = (
            saved,
            tuple(x.shape),
            x.dtype,
            x.device,
            tuple(names),
            tuple((t.shape, t.dtype, t.device) for t in kw_tensors),
            static_kw,
            tuple(p.shape for p in params),
            peft_state(lora_mods),
        )
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
                statics = self.statics[sig] = Statics(
                    x, kw_tensors, sum(p.numel() for p in params), grad_dtype, dy_is_x=saved
                )
            if saved:
                # consecutive layers take the sets in turn: by index where the layer has one
                idx = getattr(getattr(layer, "self_attn", None), "layer_idx", None)
                parity = (idx if isinstance(idx, int) else sum(1 for key in self.entries if key[1] == sig)) % 2
                entry = SavedEntry(statics, slots, names, static_kw, fn, parity)
            else:
                entry = Entry(statics, slots, names, static_kw, fn)
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
            s = entry.s  # capture (and its warm-up run) on this call's real values
            self.unchain(x)  # the warm-up runs write both z buffers: no alias may see that
            s.before_write(0)
            s.before_write(1)
            s.load_kwargs(kw_tensors)
            if saved:  # B is captured first and writes dx where F reads x: F's warm-up reads junk
                entry.zout.zero_()
                entry.zin.copy_(x)
            else:
                s.dy.zero_()
                s.x.copy_(x)
            try:
                entry.capture(self.pool, self._stream(x.device))
            except Exception as e:  # noqa: BLE001 - an op that cannot be captured: train on, eagerly
                warnings.warn(
                    f"velotune: CUDA-graph capture of a decoder layer failed, layers run eagerly "
                    f"from now on ({type(e).__name__}: {e})",
                    stacklevel=2,
                )
                self.disabled = True
                entry.graphable = False
                self.stats["eager"] += 1
                return eager()
            self.stats["captured"] += 1
            # graphs dequantise into their own pool: the persistent buffers (2 x 117 MiB at 8B) go
            # until eager code needs them again (an uncaptured layer, a new shape's warm-up)
            WEIGHT_BUFFERS.clear()
        elif tuple(p.data_ptr() for p in params) != entry.param_ptrs:
            del self.entries[(id(layer), sig)]  # parameters moved: capture again
            return self.run(offloader, fn, x, eager, saved)
        self.stats["replayed"] += 1
        if saved:
            if self.saved_runs is None:
                self.saved_runs = SavedGraphRuns(offloader)
            return GraphedSavedLayer.apply(entry, self.saved_runs, kw_tensors, x, *params)
        self.unchain(x)  # _GraphedLayer copies x to the host on a side stream
        return _GraphedLayer.apply(entry, offloader, kw_tensors, x, *params)

    def unchain(self, x: torch.Tensor) -> None:
        """x gets its own copy if it is an alias of a static buffer (see `Statics.unchain`)."""
        for statics in self.statics.values():
            statics.unchain(x)
