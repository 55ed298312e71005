"""DDP on CPU (gloo, 2 real processes) equals single-process training on the same global batch.

Each rank gets half of the global batch. The loss is normalised by the GLOBAL count of trainable
tokens (as transformers' Trainer does with `num_items_in_batch` and average_tokens_across_devices),
times the world size to undo DDP's gradient averaging, so the update is exactly the single-process one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mini import fixed_batch, save_mini_model  # noqa: E402

STEPS = 3


def _build(path, checkpointing=False):
    from velotune import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(path, dtype=torch.float32)
    # init_lora_weights=False: random A and B, so gradients reach every LoRA weight from step 1.
    model = FastLanguageModel.get_peft_model(
        model,
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        use_gradient_checkpointing=checkpointing != "mlp" and checkpointing,
        random_state=7,
    )
    if checkpointing == "mlp":  # recompute="mlp" with every saved tensor offloaded (the toy ones are tiny)
        from velotune.memory.checkpointing import enable_offloaded_checkpointing

        enable_offloaded_checkpointing(model, recompute="mlp", min_offload_bytes=0)
    model.train()  # checkpointing (plain or offloaded) is active in training mode
    return model


def _batch():
    # 4 rows with unequal numbers of trainable tokens: a naive per-rank mean would differ.
    b = fixed_batch(batch=4, seq=10, seed=3, pad_last=4)
    b["labels"][1, :6] = -100
    return b


def _train(model, batches, world: int):
    """STEPS SGD steps; `batches` yields (local batch, global trainable-token count). SGD, not AdamW:
    Adam divides each gradient by its own running magnitude, so an element whose gradient is ~0 moves
    by ~lr on fp32 reduction-order noise alone (1.9e-6 apart after 3 steps on one CPU, not on
    another); SGD moves each weight by lr x its gradient, so the comparison stays one of gradients."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for local, n_global in batches:
        out = model(**local, num_items_in_batch=n_global)
        (out.loss * world).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.detach().clone())
    return losses


def _n_items(labels):
    return int((labels[:, 1:] != -100).sum())


def _worker(rank: int, world: int, path: str, port: int, out: str, checkpointing):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _build(path, checkpointing)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        b = _batch()
        n = _n_items(b["labels"])
        rows = slice(rank * 2, rank * 2 + 2)
        local = {k: v[rows] for k, v in b.items()}
        losses = _train(ddp, [(local, n)] * STEPS, world)
        # Per-step global loss = sum over ranks of the local (sum / n_global) losses.
        for loss in losses:
            dist.all_reduce(loss)
        if rank == 0:
            lora = {k: v.detach() for k, v in model.named_parameters() if "lora_" in k}
            torch.save({"losses": torch.stack(losses), "lora": lora}, out)
        dist.barrier()  # no collective still in flight when the group is torn down (gloo aborted there)
    finally:
        dist.destroy_process_group()
    _exit_now()


def _exit_now() -> None:
    """End a worker that finished (its results are in its output file) without the interpreter's
    teardown: torch's gloo objects that outlive `destroy_process_group` (FSDP2's device mesh keeps
    its group) have aborted there with "terminate called without an active exception" (SIGABRT), in
    about 1 CI run in 20. A worker that raised never gets here: its error reaches the parent."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# "unsloth": offloaded checkpointing under DDP; "mlp": the same with recompute="mlp"
@pytest.mark.parametrize("checkpointing", [False, "unsloth", "mlp"])
def test_ddp_two_processes_equal_single_process(tmp_path, checkpointing):
    path = save_mini_model("llama", tmp_path)
    out = tmp_path / "ddp.pt"
    mp.start_processes(
        _worker, args=(2, str(path), _free_port(), str(out), checkpointing), nprocs=2, join=True, start_method="spawn"
    )
    ddp = torch.load(out, weights_only=True)

    model = _build(path, checkpointing)
    if checkpointing == "unsloth":
        assert model.get_base_model().is_gradient_checkpointing
    b = _batch()
    single = torch.stack(_train(model, [(b, _n_items(b["labels"]))] * STEPS, world=1))
    if checkpointing == "mlp":
        assert model.velotune_offload_stats.recomputed_norms > 0
    torch.testing.assert_close(ddp["losses"], single, rtol=1e-5, atol=0)
    # LoRA weights after 3 SGD steps: identical up to fp32 reduction order.
    assert set(ddp["lora"]) == {k for k, _ in model.named_parameters() if "lora_" in k}
    for k, p in model.named_parameters():
        if "lora_" in k:
            torch.testing.assert_close(ddp["lora"][k], p.detach(), rtol=1e-5, atol=1e-6, msg=k)
