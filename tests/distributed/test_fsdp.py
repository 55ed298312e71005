"""FSDP2 (`fully_shard`) full fine-tuning on CPU with gloo: same losses and weights as one process;
a sharded safetensors checkpoint saved by 2 processes loads into 1."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mini import fixed_batch, save_mini_model  # noqa: E402
from test_ddp import _exit_now, _free_port, _n_items  # noqa: E402

STEPS = 3


def _build(path):
    from velotune import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(path, dtype=torch.float32, full_finetuning=True)
    return model


def _train(model, local, n_global, world):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(STEPS):
        out = model(**local, num_items_in_batch=n_global)
        (out.loss * world).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.detach().clone())
    return torch.stack(losses)


def _worker(rank, world, path, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from velotune.distributed import fsdp_shard, full_state_dict, save_sharded

        model = fsdp_shard(_build(path))
        b = fixed_batch(batch=4, seq=10, seed=5, pad_last=4)
        rows = slice(rank * 2, rank * 2 + 2)
        losses = _train(model, {k: v[rows] for k, v in b.items()}, _n_items(b["labels"]), world)
        dist.all_reduce(losses)
        save_sharded(model, Path(out).parent / "ckpt")
        full = full_state_dict(model)
        if rank == 0:
            torch.save({"losses": losses, "state": full}, out)
        dist.barrier()  # no collective still in flight when the group is torn down (gloo aborted there)
    finally:
        dist.destroy_process_group()
    _exit_now()


def test_fsdp2_full_finetune_equals_single_process_and_reshards(tmp_path):
    from torch.distributed.fsdp import fully_shard  # noqa: F401  (skip cleanly if missing)

    path = save_mini_model("llama", tmp_path)
    out = tmp_path / "fsdp.pt"
    mp.start_processes(_worker, args=(2, str(path), _free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    res = torch.load(out, weights_only=True)

    model = _build(path)
    b = fixed_batch(batch=4, seq=10, seed=5, pad_last=4)
    single = _train(model, b, _n_items(b["labels"]), world=1)
    torch.testing.assert_close(res["losses"], single, rtol=1e-5, atol=0)
    ref = model.state_dict()
    for k, v in res["state"].items():
        torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6, msg=k)

    # The 2-process safetensors shards load into a fresh single-process model (resharding 2 -> 1).
    ckpt = tmp_path / "ckpt"
    assert list(ckpt.glob("*.safetensors")), "no safetensors shards written"
    from velotune.distributed import load_sharded

    fresh = _build(path)
    load_sharded(fresh, ckpt)
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6, msg=k)
