"""Offloaded gradient checkpointing: each decoder layer is checkpointed, and the one tensor it keeps
(its input hidden states) waits in pinned CPU memory instead of on the GPU.

    enable_offloaded_checkpointing(model)     # use_gradient_checkpointing="unsloth" / "offload"
    enable_offloaded_checkpointing(model, recompute="mlp")   # attention activations offloaded too,
                                              # only the MLP recomputed (memory/saved_offload.py)
    disable_offloaded_checkpointing(model)    # back to stock (no checkpointing)

How (PyTorch's own mechanisms only, per model instance, nothing global):

* Decoder layers are transformers `GradientCheckpointingLayer`s: their forward already calls
  `self._gradient_checkpointing_func(forward, *args)` when `gradient_checkpointing` is set. We set
  both attributes on each layer instance (what `model.gradient_checkpointing_enable` does) with our
  function, which runs `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)` inside a
  `torch.autograd.graph.saved_tensors_hooks` context.
* Non-reentrant checkpointing saves the layer's inputs through the saved-tensor hooks active
  around it (its own hooks then take over for everything the layer saves, which is dropped and
  recomputed). So our hooks see exactly the layer inputs; the hidden states (the first positional
  argument, [B, T, H]) are offloaded, other inputs (masks, rotary tables shared by all layers)
  are kept as they are.
* Forward, pack: a side "d2h" stream waits for the compute stream, copies the hidden states into
  pinned host memory (`non_blocking`, in chunks: see HOST_CHUNK_BYTES), records an event;
  `record_stream` keeps the allocator from reusing the GPU memory before the copy has read it. The
  compute stream never waits. The pack hook recognises the hidden states by value (address, shape,
  dtype), never by holding them: the hook lives as long as the graph.
* Backward, unpack (when the checkpoint recomputes layer i): wait for layer i's host-to-device copy
  (started earlier, or now if not), then start the "h2d" copy of layer i-1's input on a second side
  stream, so it overlaps layer i's recompute and backward: one layer ahead.
* Numerics: the tensor that comes back is a bit copy, and the checkpoint (RNG state, recompute)
  is torch's, so losses and gradients equal plain non-reentrant checkpointing exactly.
* DDP: nothing here touches parameters, gradient hooks or the graph's shape; non-reentrant
  checkpointing composes with DistributedDataParallel (no `static_graph` needed).
* CPU tensors (tests, CPU training): the same code runs with a host "target" that is a plain CPU
  copy and no streams.
* Pinned host buffers come from a per-model `HostPool` (reused from step to step; a clear
  MemoryError instead of an OOM kill when the host runs out).
"""
from __future__ import annotations

import functools
import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from velotune.models.mlp import recomputes_without_mlp_values


@dataclass
class OffloadStats:
    """Counters, per model (tests use them to check the offload path really ran)."""

    packed: int = 0          # layer inputs moved to host memory
    unpacked: int = 0        # layer inputs brought back for a recompute
    prefetched: int = 0      # ... of which the copy had been started one layer ahead
    bytes_offloaded: int = 0
    recomputed_norms: int = 0    # recompute="mlp": saved RMSNorm outputs recomputed instead of copied
    # offload_every (memory/sparse_offload.py): the k of the last forward, the host budget it was chosen
    # for ("auto"), the bytes of layer inputs that forward kept in host memory, extra layer forwards run
    offload_every: int = 1
    host_budget: int | None = None
    host_needed: int = 0
    recomputed_layers: int = 0


class HostPool:
    """Pinned host buffers reused from step to step (per model).

    `torch.empty(..., pin_memory=True)` measured 2.1 ms per 32 MiB buffer on the H200 machine even
    when PyTorch's caching host allocator should have had one free (bench/offload_diag.py): for
    recompute="mlp" (6 buffers a layer) that was ~95 ms of host time per 8B step. Here a buffer
    comes back when the copy that owns it dies (`_HostCopy.__del__`: autograd freed the saved
    tensor), with the event after which the GPU no longer reads it; the next device->host copy into
    it waits for that event on its own stream, so the host never waits. Sizes are rounded up to
    whole MiB so that slightly different lengths share buffers; at most twice the high-water mark of
    bytes in use is kept.
    """

    GRAIN = 2**20
    HEADROOM = 2 * 2**30        # host memory a new buffer must leave to the rest of the machine

    def __init__(self, alloc=None, available=None):
        self._free: dict[tuple, list] = {}
        self._lock = threading.Lock()
        self.in_use = self.high_water = self.pooled = 0
        self._alloc = alloc or (lambda n, dtype: torch.empty(n, dtype=dtype, pin_memory=True))
        self._available = available or _host_available

    def _new(self, size: int, dtype: torch.dtype) -> torch.Tensor:
        """A fresh pinned buffer, or a clear error instead of the kernel's OOM killer or CUDA's
        "out of memory" (nothing is lost: the step stops before its backward)."""
        free = self._available()
        hint = (f"offloaded checkpointing: {size / 2**20:.0f} MiB more pinned host memory needed "
                f"({self.in_use / 2**30:.1f} GiB in use by this model's offloaded activations")
        if free is not None and size + self.HEADROOM > free:
            raise MemoryError(f"{hint}, {free / 2**30:.1f} GiB available on the host); use recompute='layer' "
                              "(about 4.5x less host memory), a shorter sequence or a smaller batch")
        try:
            return self._alloc(size // dtype.itemsize, dtype)
        except RuntimeError as e:
            raise MemoryError(f"{hint}): pinning failed ({e}); use recompute='layer', a shorter sequence "
                              "or a smaller batch") from e

    def get(self, numel: int, dtype: torch.dtype, stream) -> torch.Tensor:
        size = -(-numel * dtype.itemsize // self.GRAIN) * self.GRAIN
        with self._lock:
            free = self._free.get((dtype, size))
            buf, ready = free.pop() if free else (None, None)
            if buf is not None:
                self.pooled -= size
            self.in_use += size
            self.high_water = max(self.high_water, self.in_use)
        if buf is None:
            try:
                buf = self._new(size, dtype)
            except MemoryError:
                with self._lock:
                    self.in_use -= size
                raise
        elif ready is not None:
            stream.wait_event(ready)        # the last host->device copy out of it has read it
        return buf[:numel]

    def put(self, views: list[torch.Tensor], ready) -> None:
        with self._lock:
            for v in views:
                buf = v._base if v._base is not None else v
                size = buf.numel() * buf.element_size()
                self.in_use -= size
                if self.pooled + size <= 2 * self.high_water:
                    self._free.setdefault((buf.dtype, size), []).append((buf, ready))
                    self.pooled += size


def _host_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


class _HostCopy:
    """A tensor's host copy (flat chunks) and the events ordering its copies; gives its pinned
    buffers back to the pool when it dies (autograd let go of the saved tensor)."""

    __slots__ = ("host", "numel", "dtype", "device", "d2h_done", "gpu", "h2d_done", "pool")

    def __init__(self, host, numel, dtype, device, d2h_done, pool):
        self.host = host                  # flat CPU chunks (pinned when the source is on CUDA), see _chunks
        self.numel, self.dtype = numel, dtype
        self.device = device              # where the tensor lives during compute
        self.d2h_done = d2h_done          # event: host copy complete (None on CPU)
        self.gpu = None                   # device copy (flat), once a host->device copy started
        self.h2d_done = None
        self.pool = pool                  # the HostPool the chunks go back to (None on CPU)

    def __del__(self):
        pool = getattr(self, "pool", None)
        if pool is not None and self.host:
            pool.put(self.host, self.h2d_done if self.h2d_done is not None else self.d2h_done)


class _Saved(_HostCopy):
    """One offloaded layer input: host copy + the events ordering the copies."""

    __slots__ = ("prev", "shape", "__weakref__")

    def __init__(self, host, device, d2h_done, prev, shape, dtype, pool=None):
        super().__init__(host, shape.numel(), dtype, device, d2h_done, pool)
        self.shape = shape                # the tensor's shape (contiguous layout when it comes back)
        self.prev = prev                  # weakref to the input saved just before (previous layer)


@dataclass
class _Offloader:
    """Per-model state: side streams per device, pinned buffers, the last saved input, counters."""

    stats: OffloadStats = field(default_factory=OffloadStats)
    pool: HostPool = field(default_factory=HostPool)
    _streams: dict = field(default_factory=dict)
    _last: "weakref.ref | None" = None

    def streams(self, device: torch.device):
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams[device]  # (d2h, h2d)

    def to_host(self, flats: list[torch.Tensor]):
        """1-D tensors copied to host memory in chunks: ([chunks per tensor], event when all are done,
        pool or None). CUDA: pinned pool buffers, on the d2h side stream after what the compute
        stream has queued, all in one stream switch (each switch, event and wait costs host time,
        ~0.25 ms a tensor when done one by one: bench/offload_diag.py); the sources' memory is not
        reused before the copies have read it (record_stream)."""
        if not flats[0].is_cuda:
            return [[f[a:b].clone() for a, b in _chunks(f)] for f in flats], None, None
        d2h, _ = self.streams(flats[0].device)
        d2h.wait_stream(torch.cuda.current_stream(flats[0].device))
        get = self.pool.get
        with torch.cuda.stream(d2h):
            hosts = [[get(b - a, f.dtype, d2h).copy_(f[a:b], non_blocking=True) for a, b in _chunks(f)] for f in flats]
            done = torch.cuda.Event()
            done.record(d2h)
        for f in flats:
            f.record_stream(d2h)
        return hosts, done, self.pool

    # -- forward --------------------------------------------------------------------------------
    def offload(self, t: torch.Tensor) -> _Saved:
        prev = self._last
        (host,), done, pool = self.to_host([t.reshape(-1)])
        saved = _Saved(host, t.device, done, prev, t.shape, t.dtype, pool)
        self._last = weakref.ref(saved)
        self.stats.packed += 1
        self.stats.bytes_offloaded += t.numel() * t.element_size()
        return saved

    # -- backward -------------------------------------------------------------------------------
    def to_device(self, items: list[_HostCopy]) -> None:
        """Host->device copies of those `items` not yet started (flat, into `item.gpu`), after their
        device->host copies, on the h2d side stream: one stream switch and one event for all."""
        items = [c for c in items if c.gpu is None and c.device.type == "cuda"]
        if not items:
            return
        _, h2d = self.streams(items[0].device)
        for event in {id(c.d2h_done): c.d2h_done for c in items}.values():
            h2d.wait_event(event)
        with torch.cuda.stream(h2d):
            for c in items:
                c.gpu = torch.empty(c.numel, dtype=c.dtype, device=c.device)
                _copy_back(c.host, c.gpu, non_blocking=True)
            done = torch.cuda.Event()
            done.record(h2d)
        for c in items:
            c.h2d_done = done

    def take(self, c: _HostCopy) -> torch.Tensor:
        """c's data back on its device, flat, usable on the current stream (prefetched or copied now).
        The caller decides when to let go of `c.gpu`."""
        if c.device.type != "cuda":
            flat = torch.empty(c.numel, dtype=c.dtype)      # CPU target: reassemble
            _copy_back(c.host, flat)
            return flat
        if c.gpu is not None:
            self.stats.prefetched += 1
        self.to_device([c])
        compute = torch.cuda.current_stream(c.device)
        compute.wait_event(c.h2d_done)
        c.gpu.record_stream(compute)
        return c.gpu

    def restore(self, saved: _Saved) -> torch.Tensor:
        out = self.take(saved).view(saved.shape)
        saved.gpu = None                             # hand it over; a second backward copies again
        self.stats.unpacked += 1
        prev = saved.prev() if saved.prev is not None else None
        if prev is not None:
            self.to_device([prev])                   # one layer ahead: overlaps this layer's backward
        return out


# Host copies are made of chunks of at most this many bytes. PyTorch's pinned-memory allocator rounds
# every request up to a power of two: one 3 GiB layer input (400K tokens of an 8B model) would pin
# 4 GiB. Chunks of a power-of-two size waste at most one partial chunk per layer, and the allocator
# caches and reuses them from step to step.
HOST_CHUNK_BYTES = 64 * 2**20


def _chunks(flat: torch.Tensor) -> list[tuple[int, int]]:
    step = max(1, HOST_CHUNK_BYTES // flat.element_size())
    return [(a, min(a + step, flat.numel())) for a in range(0, flat.numel(), step)] or [(0, 0)]


def _copy_back(host: list[torch.Tensor], out: torch.Tensor, non_blocking: bool = False) -> None:
    flat, a = out.view(-1), 0
    for chunk in host:
        flat[a:a + chunk.numel()].copy_(chunk, non_blocking=non_blocking)
        a += chunk.numel()


def _tensors(obj) -> list[torch.Tensor]:
    """The tensors in a call's arguments (tuples, lists and dicts walked)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _layer_of(fn) -> torch.nn.Module | None:
    """The decoder layer behind transformers' checkpointed callable: `partial(forward, layer, **kw)`
    (transformers >= 5.2x) or `partial(layer.__call__, **kw)` (earlier 4.5x/5.x)."""
    args = getattr(fn, "args", None) or ()
    if args and isinstance(args[0], torch.nn.Module):
        return args[0]
    owner = getattr(getattr(fn, "func", None), "__self__", None)
    return owner if isinstance(owner, torch.nn.Module) else None


def _suits_mlp_recompute(fn) -> bool:
    """Whether recompute="mlp" suits the decoder layer behind `fn`: velotune runs its MLP and its
    attention (models/), and the attention is not the explicit softcapped path (Gemma 2), whose
    saved [B, H, T, T] scores would be far more to copy to the host than to recompute."""
    from velotune.models.patch import is_patched

    layer = _layer_of(fn)
    mlp, attn = getattr(layer, "mlp", None), getattr(layer, "self_attn", None)
    if not (isinstance(mlp, torch.nn.Module) and is_patched(mlp) and isinstance(attn, torch.nn.Module)
            and is_patched(attn)):
        return False
    cap = attn._velotune_spec.attn_softcap_attr
    return not (cap and getattr(attn.config, cap, None))


def _offloaded_checkpoint(offloader: _Offloader, fn, *args, graphs=None, saved=None, every=None, **kwargs):
    """Drop-in for transformers' `_gradient_checkpointing_func(fn, *args)`. graphs: a
    `layer_graphs.LayerGraphs` (cuda_graphs=True), which replays the layer when it can. saved: a
    `saved_offload.SavedOffloader` (recompute="mlp"), used for layers whose MLP velotune runs.
    every: a `sparse_offload.OffloadEvery` (offload_every != 1), which keeps every k-th input only."""
    if not args or not isinstance(args[0], torch.Tensor) or not torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    graphable = graphs is not None and len(args) == 1 and not kwargs
    if graphs is not None and not graphable:
        graphs.unchain(args[0])      # a graphed layer's output may alias a static buffer (layer_graphs.py)
    if saved is not None and _suits_mlp_recompute(fn):
        keep = _tensors(args[1:]) + _tensors(kwargs) + _tensors(getattr(fn, "keywords", {}))
        eager = functools.partial(saved.run_layer, fn, args, kwargs, keep)
        return graphs.run(offloader, fn, args[0], eager, saved=True) if graphable else eager()
    if graphable:
        return graphs.run(offloader, fn, args[0], lambda: _offloaded_checkpoint(offloader, fn, *args))
    if every is not None:
        index = every.index.get(id(_layer_of(fn)))
        if index is not None:
            def call(pack, unpack):
                with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                    return checkpoint(recomputes_without_mlp_values(fn), *args, use_reentrant=False, **kwargs)

            return every.run(offloader, fn, args, kwargs, index, call)
    # Identify the hidden states by value, never by reference: the pack hook outlives this call
    # (autograd keeps it with the graph until backward), and a closure over the tensor itself would
    # keep every layer's input alive on the GPU for the whole step, offloaded or not.
    key = (args[0].data_ptr(), args[0].shape, args[0].dtype)

    def pack(t: torch.Tensor):
        if (t.data_ptr(), t.shape, t.dtype) == key:
            return offloader.offload(t)
        return t

    def unpack(obj):
        return offloader.restore(obj) if isinstance(obj, _Saved) else obj

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return checkpoint(recomputes_without_mlp_values(fn), *args, use_reentrant=False, **kwargs)


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


RECOMPUTE_MODES = ("layer", "mlp")


def check_recompute(recompute: str, mlp_row_blocks: int = 1) -> None:
    """ValueError unless `recompute` is a mode and `mlp_row_blocks` a whole number >= 1 that is 1
    or comes with recompute="mlp" (get_peft_model checks before it wraps anything)."""
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute={recompute!r}: choose from {RECOMPUTE_MODES}")
    if not isinstance(mlp_row_blocks, int) or isinstance(mlp_row_blocks, bool) or mlp_row_blocks < 1:
        raise ValueError(f"mlp_row_blocks={mlp_row_blocks!r}: a whole number >= 1")
    if mlp_row_blocks != 1 and recompute != "mlp":
        raise ValueError(f"mlp_row_blocks={mlp_row_blocks!r} needs recompute='mlp' (got {recompute!r})")


def enable_offloaded_checkpointing(model: torch.nn.Module, cuda_graphs: bool = False, recompute: str = "layer",
                                   min_offload_bytes: int = 2**20, mlp_row_blocks: int = 1,
                                   offload_every: int | str = 1, host_budget: int | None = None) -> OffloadStats:
    """Checkpoint every decoder layer of `model` (a transformers or PEFT model), offloading the
    saved layer inputs to pinned host memory. Per instance, idempotent; returns the live counters
    (also at `model.velotune_offload_stats`). cuda_graphs: replay each layer's forward and its
    recompute + backward as CUDA graphs once warmed up (memory/layer_graphs.py; counters at
    `model.velotune_layer_graphs.stats`; with recompute="mlp": memory/saved_graphs.py).

    recompute: "layer" (each layer recomputed whole in backward; only its input is offloaded) or
    "mlp" (the attention half's saved tensors of at least `min_offload_bytes` are offloaded and
    only the MLP is recomputed: less GPU work, ~4.5x the host memory; memory/saved_offload.py).
    Layers whose MLP velotune does not run fall back to "layer". mlp_row_blocks (recompute="mlp"):
    each MLP runs in that many row blocks, forward and backward (models/mlp.set_row_blocks).

    offload_every (recompute="layer", no cuda_graphs): keep only every k-th layer input in host
    memory and recompute the layers between in backward, exactly (memory/sparse_offload.py); "auto"
    picks the smallest k whose inputs fit `host_budget` bytes (default: the host's available memory,
    measured at each forward's start). The choice is in the returned stats."""
    check_recompute(recompute, mlp_row_blocks)
    layers = _decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no transformers decoder layers "
                         "(GradientCheckpointingLayer) to checkpoint")
    from velotune.memory.sparse_offload import OffloadEvery, check_offload_every

    check_offload_every(offload_every)
    every = None
    if offload_every != 1 or host_budget is not None:
        if recompute != "layer" or cuda_graphs:
            raise ValueError(f"offload_every={offload_every!r} works with recompute='layer' and without cuda_graphs")
        every = OffloadEvery(layers, offload_every, host_budget)
    if recompute == "mlp":
        from velotune.models.mlp import set_row_blocks

        for layer in layers:
            mlp = getattr(layer, "mlp", None)
            if mlp is not None:
                set_row_blocks(mlp, mlp_row_blocks)
    offloader = _Offloader()
    saved = None
    if recompute == "mlp":
        from velotune.memory.saved_offload import SavedOffloader

        saved = SavedOffloader(offloader, min_offload_bytes)
    graphs = None
    if cuda_graphs:
        from velotune.memory.layer_graphs import LayerGraphs

        graphs = model.velotune_layer_graphs = LayerGraphs()
    fn = functools.partial(_offloaded_checkpoint, offloader, graphs=graphs, saved=saved, every=every)
    for layer in layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = fn
    for m in model.modules():  # model-level flags (LlamaModel.gradient_checkpointing), as transformers sets them
        if m not in layers and isinstance(getattr(m, "gradient_checkpointing", None), bool):
            m.gradient_checkpointing = True
    config = getattr(model, "config", None)
    if config is not None:
        config.use_cache = False
    model.velotune_offload_stats = offloader.stats
    return offloader.stats


def disable_offloaded_checkpointing(model: torch.nn.Module) -> None:
    """Undo `enable_offloaded_checkpointing` (layers run without checkpointing)."""
    layers = _decoder_layers(model)
    for m in model.modules():
        fn = m.__dict__.get("_gradient_checkpointing_func")
        if isinstance(fn, functools.partial) and fn.func is _offloaded_checkpoint:
            m.gradient_checkpointing = False
            del m._gradient_checkpointing_func
        elif m not in layers and isinstance(getattr(m, "gradient_checkpointing", None), bool):
            m.gradient_checkpointing = False
    for name in ("velotune_offload_stats", "velotune_layer_graphs"):
        if hasattr(model, name):
            delattr(model, name)
