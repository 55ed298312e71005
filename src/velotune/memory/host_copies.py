"""Host copies of saved tensors: pinned buffers (HostPool), one tensor's copy and its events
(HostCopy), the offloader that moves saved tensors to the host and back on side streams, and the
helpers the memory engine's modules share (memory/checkpointing.py describes the whole path)."""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import torch

from velotune.models.modes import LayerModes, layer_modes


@dataclass
class OffloadStats:
    """Counters, per model (tests use them to check the offload path really ran)."""

    packed: int = 0  # layer inputs moved to host memory
    unpacked: int = 0  # layer inputs brought back for a recompute
    prefetched: int = 0  # ... of which the copy had been started one layer ahead
    bytes_offloaded: int = 0
    recomputed_norms: int = 0  # recompute="mlp": saved RMSNorm outputs recomputed instead of copied
    # offload_every (memory/sparse_offload.py): the k of the last forward, the host budget it was chosen
    # for ("auto"), the bytes of layer inputs that forward kept in host memory, extra layer forwards run
    offload_every: int = 1
    host_budget: int | None = None
    host_needed: int = 0
    recomputed_layers: int = 0


class HostPool:
    """Pinned host buffers reused from step to step (per model).

    `torch.empty(..., pin_memory=True)` measured milliseconds per 32 MiB buffer on the GPU machine even
    when PyTorch's caching host allocator should have had one free (bench/offload_diag.py): for
    recompute="mlp" (6 buffers a layer) that was ~95 ms of host time per 8B step. Here a buffer
    comes back when the copy that owns it dies (`HostCopy.__del__`: autograd freed the saved
    tensor), with the event after which the GPU no longer reads it; the next device->host copy into
    it waits for that event on its own stream, so the host never waits. Sizes are rounded up to
    whole MiB so that slightly different lengths share buffers; at most twice the high-water mark of
    bytes in use is kept.
    """

    GRAIN = 2**20
    HEADROOM = 2 * 2**30  # host memory a new buffer must leave to the rest of the machine

    def __init__(self, alloc=None, available=None):
        self._free: dict[tuple, list] = {}
        self._lock = threading.Lock()
        self.in_use = self.high_water = self.pooled = 0
        self._alloc = alloc or (lambda n, dtype: torch.empty(n, dtype=dtype, pin_memory=True))
        self._available = available or host_available

    def __deepcopy__(self, memo) -> HostPool:
        """A copied model (`copy.deepcopy`) gets its own empty pool: the buffers are a cache, and a lock
        cannot be copied."""
        return type(self)(self._alloc, self._available)

    def _new(self, size: int, dtype: torch.dtype) -> torch.Tensor:
        """A fresh pinned buffer, or a clear error instead of the kernel's OOM killer or CUDA's
        "out of memory" (nothing is lost: the step stops before its backward)."""
        free = self._available()
        hint = (
            f"offloaded checkpointing: {size / 2**20:.0f} MiB more pinned host memory needed "
            f"({self.in_use / 2**30:.1f} GiB in use by this model's offloaded activations"
        )
        if free is not None and size + self.HEADROOM > free:
            raise MemoryError(
                f"{hint}, {free / 2**30:.1f} GiB available on the host); use recompute='layer' "
                "(about 4.5x less host memory), a shorter sequence or a smaller batch"
            )
        try:
            return self._alloc(size // dtype.itemsize, dtype)
        except RuntimeError as e:
            raise MemoryError(
                f"{hint}): pinning failed ({e}); use recompute='layer', a shorter sequence or a smaller batch"
            ) from e

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
            stream.wait_event(ready)  # the last host->device copy out of it has read it
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


def host_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


class HostCopy:
    """A tensor's host copy (flat chunks) and the events ordering its copies; gives its pinned
    buffers back to the pool when it dies (autograd let go of the saved tensor)."""

    __slots__ = ("host", "numel", "dtype", "device", "d2h_done", "gpu", "h2d_done", "pool")

    def __init__(self, host, numel, dtype, device, d2h_done, pool):
        self.host = host  # flat CPU chunks (pinned when the source is on CUDA), see _chunks
        self.numel, self.dtype = numel, dtype
        self.device = device  # where the tensor lives during compute
        self.d2h_done = d2h_done  # event: host copy complete (None on CPU)
        self.gpu = None  # device copy (flat), once a host->device copy started
        self.h2d_done = None
        self.pool = pool  # the HostPool the chunks go back to (None on CPU)

    def __del__(self):
        pool = getattr(self, "pool", None)
        if pool is not None and self.host:
            pool.put(self.host, self.h2d_done if self.h2d_done is not None else self.d2h_done)


class SavedCopy(HostCopy):
    """One offloaded layer input: host copy + the events ordering the copies."""

    __slots__ = ("prev", "shape", "__weakref__")

    def __init__(self, host, device, d2h_done, prev, shape, dtype, pool=None):
        super().__init__(host, shape.numel(), dtype, device, d2h_done, pool)
        self.shape = shape  # the tensor's shape (contiguous layout when it comes back)
        self.prev = prev  # weakref to the input saved just before (previous layer)


@dataclass
class Offloader:
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
    def offload(self, t: torch.Tensor) -> SavedCopy:
        prev = self._last
        (host,), done, pool = self.to_host([t.reshape(-1)])
        saved = SavedCopy(host, t.device, done, prev, t.shape, t.dtype, pool)
        self._last = weakref.ref(saved)
        self.stats.packed += 1
        self.stats.bytes_offloaded += t.numel() * t.element_size()
        return saved

    # -- backward -------------------------------------------------------------------------------
    def to_device(self, items: list[HostCopy]) -> None:
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
                copy_back(c.host, c.gpu, non_blocking=True)
            done = torch.cuda.Event()
            done.record(h2d)
        for c in items:
            c.h2d_done = done

    def take(self, c: HostCopy) -> torch.Tensor:
        """c's data back on its device, flat, usable on the current stream (prefetched or copied now).
        The caller decides when to let go of `c.gpu`."""
        if c.device.type != "cuda":
            flat = torch.empty(c.numel, dtype=c.dtype)  # CPU target: reassemble
            copy_back(c.host, flat)
            return flat
        if c.gpu is not None:
            self.stats.prefetched += 1
        self.to_device([c])
        compute = torch.cuda.current_stream(c.device)
        compute.wait_event(c.h2d_done)
        c.gpu.record_stream(compute)
        return c.gpu

    def restore(self, saved: SavedCopy) -> torch.Tensor:
        out = self.take(saved).view(saved.shape)
        saved.gpu = None  # hand it over; a second backward copies again
        self.stats.unpacked += 1
        prev = saved.prev() if saved.prev is not None else None
        if prev is not None:
            self.to_device([prev])  # one layer ahead: overlaps this layer's backward
        return out


# Host copies are made of chunks of at most this many bytes. PyTorch's pinned-memory allocator rounds
# every request up to a power of two: one 3 GiB layer input (400K tokens of an 8B model) would pin
# 4 GiB. Chunks of a power-of-two size waste at most one partial chunk per layer, and the allocator
# caches and reuses them from step to step.
HOST_CHUNK_BYTES = 64 * 2**20


def _chunks(flat: torch.Tensor) -> list[tuple[int, int]]:
    step = max(1, HOST_CHUNK_BYTES // flat.element_size())
    return [(a, min(a + step, flat.numel())) for a in range(0, flat.numel(), step)] or [(0, 0)]


def copy_back(host: list[torch.Tensor], out: torch.Tensor, non_blocking: bool = False) -> None:
    flat, a = out.view(-1), 0
    for chunk in host:
        flat[a : a + chunk.numel()].copy_(chunk, non_blocking=non_blocking)
        a += chunk.numel()


def tensors_in(obj) -> list[torch.Tensor]:
    """The tensors in a call's arguments (tuples, lists and dicts walked)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in tensors_in(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in tensors_in(o)]
    return []


def layer_of(fn) -> torch.nn.Module | None:
    """The decoder layer behind transformers' checkpointed callable: `partial(forward, layer, **kw)`
    (transformers >= 5.2x) or `partial(layer.__call__, **kw)` (earlier 4.5x/5.x)."""
    args = getattr(fn, "args", None) or ()
    if args and isinstance(args[0], torch.nn.Module):
        return args[0]
    owner = getattr(getattr(fn, "func", None), "__self__", None)
    return owner if isinstance(owner, torch.nn.Module) else None


def modes_for(fn) -> LayerModes:
    """The LayerModes (models/modes.py) of the decoder layer behind `fn`; a private one when there is none."""
    layer = layer_of(fn)
    return LayerModes() if layer is None else layer_modes(layer)
