"""A frozen input-embedding table in host memory: only the batch's rows travel to the GPU (read by
the GPU itself from the pinned table).

    offload_input_embeddings(model)     # FastLanguageModel.get_peft_model(..., offload_embedding=True)
    restore_input_embeddings(model)

Why: Llama-3's table is 128256 x 4096 bf16 = 0.98 GiB of GPU memory, frozen under LoRA/QLoRA, and a
step of 4096 tokens reads 32 MiB of it. For 8B QLoRA that is a sixth of the peak (6.95 GiB at 2 x 2048
tokens), the one large tensor the GPU does not need to hold.

How (per instance, revertible, nothing global):
* the `nn.Embedding`'s weight moves to host memory (pinned when CUDA is there) as the same Parameter
  object (`.data` swapped), so state dicts, saving and merging see the same tensor;
* its `forward` is replaced on the instance. Ids on a CUDA device: a Triton kernel on the compute
  stream reads the batch's rows straight from the pinned table (`kernels/embedding_gather.py`: pinned
  host memory is mapped into the GPU's address space), so nothing waits on the host. Ids on the host
  (or a table that is not pinned): `index_select` gathers the rows on the CPU, for a CUDA compute
  device into the module's own pinned buffer (reused once its previous copy has finished), and the
  result is copied to the compute device without blocking. Either way the rows are the ones
  `nn.Embedding` returns (its forward is a gather).
  Forward hooks (PEFT's `enable_input_require_grads`) still run: they wrap `__call__`.
* `model.device` keeps naming the compute device: transformers reads it from the first parameter,
  which is this table, so the model's class is swapped (on the instance, for a subclass of the same
  name that answers the table's former device) and swapped back by `restore_input_embeddings`.
* If the weight is moved back to an accelerator (`model.to("cuda")`), the stock forward runs.

Refused with a ValueError, losing nothing (the model is left as it was): a trainable table (full
fine-tuning, `modules_to_save`), a table tied to the output layer (lm_head reads it on the GPU every
step), `max_norm` (renormalises rows in place), or a module that is not a plain `nn.Embedding`
(subclasses such as Gemma 3's scaled embedding change the forward).
"""

from __future__ import annotations

import types

import torch
from torch import nn

from velotune.kernels.embedding_gather import gather_rows


def _input_embedding(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if get is not None else None
    if emb is None:
        raise ValueError(f"{type(model).__name__} has no input embeddings (get_input_embeddings)")
    return emb


def _offloaded_forward(self: nn.Embedding, input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids [...] (any device) -> [..., H] on the compute device: gathered by the GPU from the
    pinned table when the ids are on a CUDA device, else on the host."""
    weight = self.weight
    if weight.device.type != "cpu":  # moved back by model.to(...): the stock lookup
        return nn.Embedding.forward(self, input_ids)
    device = self._velotune_embedding_device
    if device.type == "cuda" and input_ids.is_cuda and weight.is_pinned():
        with torch.cuda.device(input_ids.device):
            return gather_rows(weight, input_ids).to(device)
    ids = input_ids.to("cpu").reshape(-1)
    if device.type != "cuda":  # a fresh tensor: on the CPU .to() would not copy
        rows = torch.empty((ids.numel(), weight.shape[1]), dtype=weight.dtype)
        torch.index_select(weight, 0, ids, out=rows)
        return rows.view(*input_ids.shape, weight.shape[1]).to(device)
    rows = _pinned_rows(self, ids.numel(), weight)
    torch.index_select(weight, 0, ids, out=rows)
    out = rows.view(*input_ids.shape, weight.shape[1]).to(device, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    self._velotune_rows = (self._velotune_rows[0], done)
    return out


def _pinned_rows(emb: nn.Embedding, n: int, weight: torch.Tensor) -> torch.Tensor:
    """[n, H] of the module's own pinned buffer, once its last copy to the GPU has finished (a
    fresh pinned tensor per step cost 1.5-2.1 ms of host time while the GPU waited for the rows)."""
    buf, done = emb.__dict__.get("_velotune_rows", (None, None))
    if done is not None:
        done.synchronize()
    if buf is None or buf.numel() < n * weight.shape[1] or buf.dtype != weight.dtype:
        buf = torch.empty(n * weight.shape[1], dtype=weight.dtype, pin_memory=True)
    emb._velotune_rows = (buf, None)
    return buf[: n * weight.shape[1]].view(n, weight.shape[1])


_DEVICE_CLASSES: dict[type, type] = {}


def _pretrained(model: nn.Module) -> nn.Module:
    """The transformers model under PEFT's wrappers (they forward `.device` to it)."""
    get = getattr(model, "get_base_model", None)
    return get() if get is not None else model


def _report_device(model: nn.Module, device: torch.device) -> None:
    """`model.device` answers `device` (the instance's class becomes a same-named subclass)."""
    base = _pretrained(model)
    cls = type(base)
    if not isinstance(getattr(cls, "device", None), property) or "_velotune_class" in base.__dict__:
        return
    sub = _DEVICE_CLASSES.get(cls)
    if sub is None:
        attrs = {
            "device": property(lambda self: self.__dict__["_velotune_compute_device"]),
            "__module__": cls.__module__,  # transformers reads the class's module file (attention support checks)
            "__qualname__": cls.__qualname__,
        }
        sub = _DEVICE_CLASSES[cls] = type(cls.__name__, (cls,), attrs)
    base._velotune_class, base._velotune_compute_device = cls, device
    base.__class__ = sub


def _unreport_device(model: nn.Module) -> None:
    base = _pretrained(model)
    cls = base.__dict__.pop("_velotune_class", None)
    if cls is not None:
        base.__dict__.pop("_velotune_compute_device", None)
        base.__class__ = cls


def offload_input_embeddings(model: nn.Module) -> nn.Embedding:
    """Keep `model`'s frozen input-embedding table in host memory (see the module docstring).
    Idempotent; returns the embedding module."""
    emb = _input_embedding(model)
    if "_velotune_embedding_device" in emb.__dict__:
        return emb
    if any(p.requires_grad for p in emb.parameters()):
        raise ValueError(
            "offload_embedding: the input embeddings are trainable (full fine-tuning or "
            "modules_to_save); only a frozen table can live in host memory"
        )
    if type(emb) is not nn.Embedding:
        raise ValueError(
            f"offload_embedding: {type(emb).__name__} is not a plain nn.Embedding (its forward "
            "may do more than a row lookup); keep it on the GPU"
        )
    if emb.max_norm is not None:
        raise ValueError("offload_embedding: nn.Embedding(max_norm=...) renormalises rows in place; not supported")
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if get_out is not None else None
    if (
        out is not None
        and getattr(out, "weight", None) is not None
        and (out.weight is emb.weight or out.weight.data_ptr() == emb.weight.data_ptr())
    ):
        raise ValueError(
            "offload_embedding: the input embeddings are tied to the output layer (lm_head "
            "uses them on the GPU every step); keep them on the GPU"
        )
    device = emb.weight.device
    host = emb.weight.data.to("cpu")
    if torch.cuda.is_available():
        host = host.pin_memory()
    emb._velotune_embedding_device = device
    emb.weight.data = host
    emb.forward = types.MethodType(_offloaded_forward, emb)
    if device.type != "cpu":
        _report_device(model, device)
    return emb


def restore_input_embeddings(model: nn.Module) -> None:
    """Undo `offload_input_embeddings`: the table goes back to its device, the stock forward returns."""
    emb = _input_embedding(model)
    device = emb.__dict__.pop("_velotune_embedding_device", None)
    if device is None:
        return
    emb.weight.data = emb.weight.data.to(device)
    emb.__dict__.pop("forward", None)
    emb.__dict__.pop("_velotune_rows", None)
    _unreport_device(model)


def embeddings_offloaded(model: nn.Module) -> bool:
    return "_velotune_embedding_device" in _input_embedding(model).__dict__
