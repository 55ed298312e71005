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
import logging
import types

import torch
from torch.utils.checkpoint import checkpoint

from velotune.memory.host_copies import Offloader, OffloadStats, SavedCopy, layer_of, modes_for, tensors_in
from velotune.memory.layer_graphs import LayerGraphs
from velotune.memory.saved_offload import SavedOffloader
from velotune.memory.sparse_offload import OffloadEvery, check_offload_every
from velotune.models.mlp import recomputes_without_mlp_values, set_row_blocks
from velotune.models.patch import is_patched

log = logging.getLogger("velotune")


def _suits_mlp_recompute(fn) -> bool:
    """Whether recompute="mlp" suits the decoder layer behind `fn`: velotune runs its MLP and its
    attention (models/), and the attention is not the explicit softcapped path (Gemma 2), whose
    saved [B, H, T, T] scores would be far more to copy to the host than to recompute."""
    layer = layer_of(fn)
    mlp, attn = getattr(layer, "mlp", None), getattr(layer, "self_attn", None)
    if not (
        isinstance(mlp, torch.nn.Module) and is_patched(mlp) and isinstance(attn, torch.nn.Module) and is_patched(attn)
    ):
        return False
    cap = attn._velotune_spec.attn_softcap_attr
    return not (cap and getattr(attn.config, cap, None))


def _offloaded_checkpoint(offloader: Offloader, fn, *args, graphs=None, saved=None, every=None, **kwargs):
    """Drop-in for transformers' `_gradient_checkpointing_func(fn, *args)`. graphs: a
    `layer_graphs.LayerGraphs` (cuda_graphs=True), which replays the layer when it can. saved: a
    `saved_offload.SavedOffloader` (recompute="mlp"), used for layers whose MLP velotune runs.
    every: a `sparse_offload.OffloadEvery` (offload_every != 1), which keeps every k-th input only."""
    if not args or not isinstance(args[0], torch.Tensor) or not torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    graphable = graphs is not None and len(args) == 1 and not kwargs
    if graphs is not None and not graphable:
        graphs.unchain(args[0])  # a graphed layer's output may alias a static buffer (layer_graphs.py)
    if saved is not None and _suits_mlp_recompute(fn):
        keep = tensors_in(args[1:]) + tensors_in(kwargs) + tensors_in(getattr(fn, "keywords", {}))
        eager = functools.partial(saved.run_layer, fn, args, kwargs, keep)
        return graphs.run(offloader, fn, args[0], eager, saved=True) if graphable else eager()
    if graphable:
        return graphs.run(offloader, fn, args[0], lambda: _offloaded_checkpoint(offloader, fn, *args))
    if every is not None:
        index = every.index.get(id(layer_of(fn)))
        if index is not None:

            def call(pack, unpack):
                with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                    return checkpoint(
                        recomputes_without_mlp_values(fn, modes_for(fn)), *args, use_reentrant=False, **kwargs
                    )

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
        return offloader.restore(obj) if isinstance(obj, SavedCopy) else obj

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return checkpoint(recomputes_without_mlp_values(fn, modes_for(fn)), *args, use_reentrant=False, **kwargs)


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


def enable_offloaded_checkpointing(
    model: torch.nn.Module,
    cuda_graphs: bool = False,
    recompute: str = "layer",
    min_offload_bytes: int = 2**20,
    mlp_row_blocks: int = 1,
    offload_every: int | str = 1,
    host_budget: int | None = None,
) -> OffloadStats:
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
        raise ValueError(
            f"{type(model).__name__} has no transformers decoder layers (GradientCheckpointingLayer) to checkpoint"
        )
    check_offload_every(offload_every)
    every = None
    if offload_every != 1 or host_budget is not None:
        if recompute != "layer" or cuda_graphs:
            raise ValueError(f"offload_every={offload_every!r} works with recompute='layer' and without cuda_graphs")
        every = OffloadEvery(layers, offload_every, host_budget)
    if recompute == "mlp":
        for layer in layers:
            mlp = getattr(layer, "mlp", None)
            if mlp is not None:
                set_row_blocks(mlp, mlp_row_blocks)
    offloader = Offloader()
    saved = None
    if recompute == "mlp":
        saved = SavedOffloader(offloader, min_offload_bytes)
    graphs = None
    if cuda_graphs:
        graphs = model.velotune_layer_graphs = LayerGraphs()
    fn = functools.partial(_offloaded_checkpoint, offloader, graphs=graphs, saved=saved, every=every)
    fn.velotune_offloaded = True  # what a report reads (models/generic.py): no import of this module
    _arm(model, layers, fn)
    model.__dict__[_OFFLOADED_FN] = fn  # re-armed by the trainer's gradient_checkpointing_enable (below)
    config = getattr(model, "config", None)
    if config is not None:
        config.use_cache = False
    model.velotune_offload_stats = offloader.stats
    return offloader.stats


_OFFLOADED_FN = "_velotune_offloaded_checkpoint_fn"


def _arm(model: torch.nn.Module, layers: list[torch.nn.Module], fn) -> None:
    for layer in layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = fn
    for m in model.modules():  # model-level flags (LlamaModel.gradient_checkpointing), as transformers sets them
        if m not in layers and isinstance(getattr(m, "gradient_checkpointing", None), bool):
            m.gradient_checkpointing = True


def enable_checkpointing(
    model: torch.nn.Module,
    mode: bool | str,
    cuda_graphs: bool = False,
    recompute: str = "layer",
    mlp_row_blocks: int = 1,
    offload_every: int | str = 1,
    host_budget: int | None = None,
) -> None:
    """`use_gradient_checkpointing=mode` of get_peft_model: False / None / "none" / "false": nothing;
    "unsloth" / "offload": `enable_offloaded_checkpointing` (with the other arguments); True / "true":
    transformers' non-reentrant gradient checkpointing (and no KV cache). Else a ValueError."""
    if mode in (False, None, "none", "false"):
        return
    if mode in ("unsloth", "offload"):
        enable_offloaded_checkpointing(
            model,
            cuda_graphs=cuda_graphs,
            recompute=recompute,
            mlp_row_blocks=mlp_row_blocks,
            offload_every=offload_every,
            host_budget=host_budget,
        )
        _keep_offloaded_checkpointing(model)
        return
    if mode is not True and mode != "true":
        raise ValueError(f"use_gradient_checkpointing={mode!r}: use True, False, 'unsloth' or 'offload'")
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x; the old name warns
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def _keep_offloaded_checkpointing(model) -> None:
    """Trainers switch on transformers' checkpointing themselves (TRL's configs default to
    gradient_checkpointing=True), which would replace the offloaded one on every layer: this
    instance's `gradient_checkpointing_enable` / `activation_checkpointing_enable` keep velotune's
    (it already checkpoints every decoder layer) and only turn the KV cache off, as transformers does.
    `gradient_checkpointing_disable` still turns checkpointing off (transformers' own: every layer's
    flag off and its function replaced), and the next enable arms velotune's offloaded checkpointing
    again on every layer: TRL's GRPO / DPO trainers disable and re-enable around each generation and
    scoring pass, which would otherwise leave the model without checkpointing after the first."""

    def keep(self, *args, **kwargs):
        if not self.__dict__.get("_velotune_kept_logged"):
            self.__dict__["_velotune_kept_logged"] = True
            log.info("velotune: offloaded checkpointing stays on (the trainer asked for transformers' own)")
        fn = self.__dict__.get(_OFFLOADED_FN)
        if fn is not None:
            _arm(self, _decoder_layers(self), fn)
        base = self.get_base_model() if hasattr(self, "get_base_model") else self
        if getattr(base, "config", None) is not None:
            base.config.use_cache = False

    for name in ("gradient_checkpointing_enable", "activation_checkpointing_enable"):
        if hasattr(model, name):
            setattr(model, name, types.MethodType(keep, model))


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
    model.__dict__.pop(_OFFLOADED_FN, None)
    for name in ("velotune_offload_stats", "velotune_layer_graphs"):
        if hasattr(model, name):
            delattr(model, name)
