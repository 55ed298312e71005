"""Multi-GPU scaling: DDP LoRA and FSDP2 full fine-tuning against one GPU, same global batch.

    python bench/ddp.py --gpus 2                        # 8b LoRA (DDP) + 1b full fine-tune (FSDP2)
    python bench/ddp.py --gpus 2 --device cpu --shape tiny --fsdp-shape tiny --steps 3 --warmup 1  # CPU smoke

Runs `torchrun` twice per mode (1 process, then --gpus processes) and prints per-GPU tokens/s and the
per-step losses of both. The global batch is the same: one process accumulates --gpus micro-batches
of --batch rows; N processes take one micro-batch each. Losses are normalised by the global token
count, so the updates are the same up to reduction order. Model shapes, LoRA settings and the
velotune model come from bench/common.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402


def _batches(step: int, rows: int, seq: int, vocab: int, device: str):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, vocab, (rows, seq), generator=g).to(device)


def worker(args) -> None:
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = f"cuda:{local}" if args.device == "cuda" else "cpu"
    if args.device == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    shape = args.shape if args.mode == "lora" else args.fsdp_shape
    if args.mode == "lora":
        model = common.build(
            "velotune-lora", common.config(shape), device, dtype, args.seq, {"use_gradient_checkpointing": True}
        )
        if world > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[local] if args.device == "cuda" else None
            )
    else:
        from transformers import AutoModelForCausalLM

        from velotune.distributed import fsdp_shard
        from velotune.models import prepare_model

        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(common.config(shape), dtype=dtype, attn_implementation="sdpa")
        model.velotune_compute_dtype = dtype
        prepare_model(model, max_seq_length=args.seq, full_finetuning=True)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if world > 1:
            fsdp_shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5 if args.mode == "fsdp" else 1e-4, fused=args.device == "cuda")
    vocab = common.config(shape).vocab_size
    micro = args.gpus // world  # micro-batches this process accumulates per step
    n_global = args.gpus * args.batch * (args.seq - 1)

    def step(s: int):
        ids = _batches(s, args.gpus * args.batch, args.seq, vocab, device)
        total = torch.zeros((), device=device)
        for m in range(micro):
            r = (rank * micro + m) * args.batch
            mb = ids[r : r + args.batch]
            loss = model(input_ids=mb, labels=mb, num_items_in_batch=n_global).loss
            (loss * world).backward()  # DDP/FSDP average over processes; the loss is a global-token sum
            total += loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(total)
        return total

    losses = []
    for s in range(args.warmup):
        losses.append(step(s).item())
    if args.device == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    timed = [step(args.warmup + s) for s in range(args.steps)]
    if args.device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    losses += [t.item() for t in timed]
    if rank == 0:
        tokens = args.gpus * args.batch * args.seq * args.steps
        out = {
            "mode": args.mode,
            "shape": shape,
            "world": world,
            "losses": losses,
            "tokens_per_s_total": tokens / elapsed,
            "tokens_per_s_per_gpu": tokens / elapsed / world,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None,
        }
        Path(args.out).write_text(json.dumps(out))
    dist.destroy_process_group()


def _launch(args, mode: str, nproc: int) -> dict:
    out = Path(args.outdir) / f"{mode}-{nproc}.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        __file__,
        "--worker",
        "--mode",
        mode,
        "--out",
        str(out),
    ] + args.passthrough
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--fsdp-shape", default="1b")
    ap.add_argument("--modes", nargs="+", default=["lora", "fsdp"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--outdir", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--mode", default="lora")
    ap.add_argument("--out")
    common.add_output_args(ap)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    args.passthrough = [
        f"--gpus={args.gpus}",
        f"--shape={args.shape}",
        f"--fsdp-shape={args.fsdp_shape}",
        f"--batch={args.batch}",
        f"--seq={args.seq}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--device={args.device}",
    ]
    rows, results = [], []
    for mode in args.modes:
        one, many = _launch(args, mode, 1), _launch(args, mode, args.gpus)
        diff = max(abs(a - b) / abs(a) for a, b in zip(one["losses"], many["losses"]))
        rows.append((mode, one, many, diff))
        print(json.dumps({"mode": mode, "single": one, "multi": many}), flush=True)
    print(
        f"\n{'mode':6} {'shape':5} {'1-GPU tok/s':>12} {str(args.gpus) + '-GPU tok/s':>12} {'per-GPU ratio':>14} "
        f"{'max rel loss diff':>18} {'peak GiB 1/N':>14}"
    )
    for mode, one, many, diff in rows:
        ratio = many["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"]
        peaks = f"{one['peak_gib'] or 0:.1f}/{many['peak_gib'] or 0:.1f}"
        print(
            f"{mode:6} {one['shape']:5} {one['tokens_per_s_total']:12.0f} {many['tokens_per_s_total']:12.0f} "
            f"{ratio:14.3f} {diff:18.2e} {peaks:>14}"
        )
        results.append(
            {
                "mode": mode,
                "shape": one["shape"],
                "gpus": args.gpus,
                "tokens_per_s_1gpu": one["tokens_per_s_total"],
                "tokens_per_s_total": many["tokens_per_s_total"],
                "per_gpu_ratio": ratio,
                "max_rel_loss_diff": diff,
                "peak_gib_1gpu": one["peak_gib"],
                "peak_gib_per_gpu": many["peak_gib"],
            }
        )
    common.write_rows(args.jsonl, "ddp", results, args.commit, args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
