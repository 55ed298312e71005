"""One graphed decoder layer and signature (Entry): its static buffers (Statics), its two CUDA graphs
(Graph) and the kwargs they take; shared by memory/layer_graphs.py and memory/saved_graphs.py
(layer_graphs.py describes the whole path)."""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn

from velotune.memory.host_copies import modes_for
from velotune.quant.weights import WEIGHT_BUFFERS


def flatten_kwargs(kwargs: dict):
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


def rebuild_kwargs(names, tensors, static) -> dict:
    out = dict(static)
    for (k, i), t in zip(names, tensors):
        if i is None:
            out[k] = t
        else:
            out.setdefault(k, [])
            out[k].append(t)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}


def peft_state(mods) -> tuple:
    """What decides which path a LoRA layer computes (see lora/layers.resolve), as plain values."""
    out = []
    for m in mods:
        d = m.__dict__
        out.append(
            (
                d.get("_disable_adapters", False),
                bool(d.get("merged_adapters")),
                str(d.get("_active_adapter", "default")),
                tuple(sorted((k, float(v)) for k, v in d.get("scaling", {}).items())),
            )
        )  # baked into graphs
    return tuple(out)


@contextlib.contextmanager
def fresh_leaves(slots):
    """Each trainable parameter replaced, in its module, by a new leaf Parameter sharing its storage.

    Gradients are taken with respect to these leaves, never the real parameters: a real parameter's
    AccumulateGrad node may have been created on the default stream by an earlier step whose graph
    is still alive (the caller's previous `loss`), and autograd (torch >= 2.10) then joins the
    capture stream with the default stream, which invalidates the capture (seen on the GPU:
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


class Graph:
    """One captured region: a CUDA graph on the GPU; on the CPU the closure itself, run eagerly on
    replay (same static buffers, same order: what the CPU tests check)."""

    def __init__(self, device: torch.device, pool):
        self.cuda = device.type == "cuda"
        self.pool = pool
        self.graph = torch.cuda.CUDAGraph() if self.cuda else None
        self.fn = None

    def capture(self, fn, side=None) -> None:
        if not self.cuda:
            with WEIGHT_BUFFERS.graph_local():  # the warm-up run as on the GPU (a failing closure fails here)
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
            with WEIGHT_BUFFERS.graph_local():  # the same operations as a captured graph
                self.fn()


class Statics:
    """Input/output buffers shared by every layer of one signature."""

    def __init__(self, x: torch.Tensor, kw_tensors, n_grad: int, grad_dtype, dy_is_x: bool = False):
        self.x = torch.empty_like(x)  # forward input, and recompute input in backward
        # y is F's output, cloned right after each F replay; dx is B's, cloned right after each B
        # replay: one buffer serves both. dy_is_x (recompute="mlp": B reads the saved set, never x):
        # dy shares x's buffer too. 8B, 2 x 2048: 64 MiB instead of 128 MiB.
        self.y = torch.empty_like(x)
        self.dy = self.x if dy_is_x else torch.empty_like(x)
        self.dx = self.y
        self.kw = [torch.empty_like(t) for t in kw_tensors]
        self.kw_src: list = [None] * len(kw_tensors)  # the tensor each kw buffer was last filled from
        self.grads = torch.empty(n_grad, dtype=grad_dtype, device=x.device)
        self.sets: list = [None, None]  # recompute="mlp": the two saved-tensor sets, by layer parity (saved_graphs.py)
        # recompute="mlp" chains its layers through these two buffers (saved_graphs.py): a layer of
        # parity p reads x from z[1 - p] and writes y to z[p], and in backward reads dy from z[p] and
        # writes dx to z[1 - p]; what it returns are aliases of them, not copies
        self.z = (self.x, self.y)
        self._aliases: list = [None, None]  # weak reference to the alias handed out of z[i]

    def hand_out(self, i: int) -> torch.Tensor:
        """z[i] as a tensor of its own (own version counter: a replay never bumps versions either),
        remembered weakly so that a later write to z[i] can first give a live one its own copy."""
        buf = self.z[i]
        alias = torch.empty(0, dtype=buf.dtype, device=buf.device).set_(
            buf.untyped_storage(), buf.storage_offset(), buf.shape, buf.stride()
        )
        self._aliases[i] = weakref.ref(alias)
        return alias

    def fill(self, i: int, t: torch.Tensor) -> None:
        """t's values into z[i], unless they are z[i] already (the previous graphed layer's output)."""
        buf = self.z[i]
        if not (
            t.data_ptr() == buf.data_ptr()
            and t.dtype == buf.dtype
            and t.shape == buf.shape
            and t.stride() == buf.stride()
        ):
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
            if self.kw_src[i] is not t:  # the same rotary tables serve all layers of a step
                self.kw[i].copy_(t)
                self.kw_src[i] = t


class Entry:
    """One layer, one signature: its two graphs over the signature's statics."""

    def __init__(self, statics: Statics, slots: list, names, static_kw, fn):
        params = [p for _, _, p in slots]
        self.s, self.slots, self.params, self.names, self.static_kw = statics, slots, params, names, static_kw
        self.calls = 0
        self.graphable = True  # False once the layer's output turned out not to be one tensor like x
        self.fwd = self.bwd = None
        self.param_ptrs = tuple(p.data_ptr() for p in params)
        self.fn = fn.func
        self.fn_args, self.fn_keywords = fn.args, fn.keywords
        self.modes = modes_for(fn)  # the layer's LayerModes (models/modes.py)
        off, views, self.grad_spans = 0, [], []
        for p in params:
            views.append(statics.grads[off : off + p.numel()].view(p.shape))
            self.grad_spans.append((off, off + p.numel(), p.shape))
            off += p.numel()
        self.grad_views = views
        self.dx_out = statics.dx  # where backward stores dx (recompute="mlp": its z buffer)

    def grads_out(self) -> list[torch.Tensor]:
        """The LoRA gradients of the last backward replay, as views of one copy of the static buffer.
        Autograd's AccumulateGrad keeps such a view as p.grad (nothing else refers to it), so a layer
        costs one copy instead of one per parameter (8B: 14 small copies per layer)."""
        grads = self.s.grads.clone()
        return [grads[a:b].view(shape) for a, b, shape in self.grad_spans]

    def _call(self, x):
        kw = {**self.fn_keywords, **rebuild_kwargs(self.names, self.s.kw, self.static_kw)}
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
            with fresh_leaves(s.slots) as leaves:
                # y's values are never read, only its graph: the MLP skips its frozen down GEMM as
                # checkpointing's early stop does eagerly (without it B ran 20 ms more GEMMs per 8B step)
                with torch.enable_grad(), s.modes.set(mlp_values_unused=True):
                    y = s._call(x)
                grads = torch.autograd.grad(y, [x, *leaves], s.s.dy, allow_unused=True)
            s._store_grads(grads)

        self._capture_pair(forward, backward, pool, side)

    def _capture_pair(self, forward, backward, pool, side) -> None:
        """The layer's two graphs, into the shared pool. Backward first: it needs the most memory at
        once (the MLP's [N, I] tensors and weights), so the pool's first segments are those big blocks
        and forward's smaller tensors fit in them; in the other order forward's [N, H] tensors took
        segments of their own (a larger pool; docs/perf-notes.md)."""
        device = self.s.x.device
        self.fwd, self.bwd = Graph(device, pool), Graph(device, pool)
        self.bwd.capture(backward, side)
        self.fwd.capture(forward, side)


TWICE = (
    "velotune: a CUDA-graphed decoder layer was differentiated a second time (retain_graph=True): "
    "what it saved is released after the first backward; use cuda_graphs=False for that"
)
