"""Scale-out on PyTorch's own engine: DDP for LoRA/QLoRA, FSDP2 (`fully_shard`) for full fine-tunes.

velotune adds no communication layer. Launch any script (or `velotune train`) with
`torchrun --nproc-per-node N` or `accelerate launch`; transformers' Trainer (and so TRL) wraps the
model in DDP itself. What lives here is what PyTorch leaves to the user:

* `fsdp_shard(model)`: `fully_shard` each decoder layer, then the root (the recipe torchtitan and
  torchtune use), so one layer's full weights exist at a time.
* `save_sharded(model, path)` / `load_sharded(model, path)`: safetensors shards written by every rank
  through `torch.distributed.checkpoint` (DCP); DCP reshards on load, so a checkpoint saved on N
  processes resumes on M. Saves are atomic: written to `path.tmp-*`, renamed when every rank is done.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Rank 0 of the process group; before the group exists, the RANK that torchrun / accelerate launch set."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a (PEFT-wrapped) causal LM, found by transformers' `_no_split_modules`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"cannot find the decoder layers of {type(base).__name__} to shard")
    return layers


def fsdp_shard(model: nn.Module, *, mesh=None, reshard_after_forward: bool = True, mp_policy=None) -> nn.Module:
    """Shard `model` with FSDP2: each decoder layer is its own unit, the rest goes with the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy or MixedPrecisionPolicy())
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def _barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def save_sharded(model: nn.Module, path: str | os.PathLike) -> Path:
    """Every rank writes its shards as safetensors under `path` (atomic: temp folder, then rename)."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp-velotune")
    rank, size = world()
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    _barrier()
    state = get_model_state_dict(model)
    dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=size > 1))
    _barrier()
    if rank == 0:
        old = path.with_name(path.name + ".old-velotune")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        if old.exists():
            shutil.rmtree(old)
    _barrier()
    return path


def load_sharded(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a `save_sharded` checkpoint into `model`, whatever its current sharding or world size."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = get_model_state_dict(model)
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(path)))
    set_model_state_dict(model, state)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU copy of the weights (collective: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
