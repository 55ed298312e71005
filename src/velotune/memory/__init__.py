"""velotune.memory: the activation-memory engine of a training step (what the GPU need not hold).

    enable_checkpointing(model, "unsloth", recompute="mlp", cuda_graphs=True)   # get_peft_model's keywords
    disable_offloaded_checkpointing(model)
    offload_input_embeddings(model) / restore_input_embeddings(model)
    OffloadedAdamW(params, ...)                                                 # moments in host memory

Modules, lowest first (each imports only those before it):
    host_copies.py        pinned host buffers, a tensor's host copy and its events, the offloader's
                          side streams; the decoder layer behind a checkpointed callable and its
                          LayerModes (models/modes.py: how the engine steers the patched modules)
    graph_entry.py        one graphed layer and signature: static buffers, its two CUDA graphs
    saved_offload.py      recompute="mlp": the attention half's saved tensors offloaded, eager
    saved_graphs.py       recompute="mlp" under CUDA graphs: two device sets of saved tensors
    layer_graphs.py       decoder layers replayed as CUDA graphs (cuda_graphs=True)
    checkpointing.py      offloaded checkpointing itself: the layer hook tying the above together
    embedding_offload.py  a frozen input-embedding table in pinned host memory
    offload_adamw.py      AdamW with its moments in host memory
Each module's docstring states its contract and data path.
"""

from __future__ import annotations

from velotune.memory.checkpointing import (
    check_recompute,
    disable_offloaded_checkpointing,
    enable_checkpointing,
    enable_offloaded_checkpointing,
)
from velotune.memory.embedding_offload import embeddings_offloaded, offload_input_embeddings, restore_input_embeddings
from velotune.memory.offload_adamw import OffloadedAdamW

__all__ = [
    "OffloadedAdamW",
    "check_recompute",
    "disable_offloaded_checkpointing",
    "embeddings_offloaded",
    "enable_checkpointing",
    "enable_offloaded_checkpointing",
    "offload_input_embeddings",
    "restore_input_embeddings",
]
