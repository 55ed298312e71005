"""QLoRA (NF4) training throughput and peak memory: velotune vs stock transformers + bitsandbytes + PEFT,
and against velotune's own bf16 LoRA (the 16-bit speed QLoRA must keep up with).

Random-weight Llama-3.1-8B shape built on the GPU in bf16; for the 4-bit contenders every decoder linear
is quantised there to NF4 with double quantisation. LoRA r=16 alpha=16 on all 7 projections, batch
2 x 2048 random token ids, AdamW on the LoRA parameters. Each contender runs in its own process (clean
peak-memory figures); --rounds N runs them interleaved N times (A B C A B C ...) and reports each
one's median run.

  velotune-qlora   FastLanguageModel.get_peft_model on the 4-bit model, with the memory options below
  velotune-lora    the same on the bf16 model
  stock-qlora      prepare_model_for_kbit_training (non-reentrant checkpointing) + PEFT get_peft_model
  stock-lora       bf16 model + PEFT get_peft_model + non-reentrant checkpointing

The memory options are get_peft_model's keywords (--recompute, --cuda-graphs, --offload-embedding,
--mlp-row-blocks) and the optimizer (--optimizer); they apply to the velotune contenders only, and
those not given are the library's defaults (what users get).
A/B of two trees in one call: `--base-src DIR` (another checkout's src/, e.g. from `git archive`) adds
the contenders `velotune-qlora@base` / `velotune-lora@base`, the same contender on that code.

    python bench/qlora.py --impls stock-qlora velotune-qlora velotune-lora --rounds 2
    python bench/qlora.py --impls stock-qlora velotune-qlora velotune-lora --rounds 2 --recompute mlp \\
        --cuda-graphs --offload-embedding --optimizer offloaded-in-backward
    python bench/qlora.py --cpu-smoke --impls velotune-qlora stock-qlora   # the code path on CPU, tiny model
    mkdir -p ab/base && git archive e659ab6 src | tar -x -C ab/base        # then, on the GPU machine:
    python bench/qlora.py --impls velotune-qlora velotune-qlora@base --rounds 2 --base-src ab/base/src

Peak memory: torch.cuda.max_memory_allocated over the timed steps (reset after building the model; for
a graphed contender after the capturing warm-up), plus the CUDA-graph pool, which replays use without
allocating it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402

IMPLS = ("velotune-qlora", "velotune-lora", "stock-qlora", "stock-lora", "velotune-qlora@base", "velotune-lora@base")
quantize_linears_ = common.quantize_linears_  # as bench/sft.py imports it from here


def worker(args) -> dict:
    """One contender in this process: build, warm up, time; the result row."""
    device, dtype = args.device, (torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    cuda = device.startswith("cuda")
    cfg = common.config(args.shape, args.checkpoint)
    velotune = args.impl.startswith("velotune")
    impl = args.impl
    if impl.endswith("@base"):  # the same contender on the --base-src tree (velotune is not imported yet)
        if not args.base_src:
            raise SystemExit(f"{impl} needs --base-src")
        sys.path.insert(0, str(Path(args.base_src).resolve()))
        impl = impl[: -len("@base")]
    model = common.build(
        impl, cfg, device, dtype, args.seq, common.memory_options(args) if velotune else None, args.checkpoint
    )
    step, params, _, _ = common.training_step(
        model, args.batch, args.seq, device, optimizer=args.optimizer if velotune else "adamw"
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    graphed = cuda and velotune and args.cuda_graphs
    try:  # a graphed contender captures in the warm-up: its timed steps' own peak, plus the pool below
        t = common.timed_steps(
            step, args.warmup, args.steps, device, before_timed=torch.cuda.reset_peak_memory_stats if graphed else None
        )
    except torch.OutOfMemoryError:
        return {"impl": args.impl, "oom": True}
    tokens = args.batch * args.seq * args.steps
    out = {
        "impl": args.impl,
        "shape": args.shape,
        "batch": args.batch,
        "seq": args.seq,
        "oom": False,
        "tokens_per_s": tokens / t["seconds"],
        "ms_per_step": t["ms_per_step"],
        "first_loss": t["first_loss"],
        "last_loss": t["last_loss"],
        "n_trainable": sum(p.numel() for p in params),
        "peak_gib": (torch.cuda.max_memory_allocated() + common.graph_pool_bytes()) / 2**30 if cuda else None,
        "graph_pool_gib": common.graph_pool_bytes() / 2**30 if graphed else None,
    }
    if velotune:
        out["memory"] = {**common.memory_options(args), "optimizer": args.optimizer}  # unnamed: the library's defaults
        out["embeddings_offloaded"] = common.embeddings_offloaded(model)
    if args.profile and cuda:
        out["profile"] = common.profile(step, 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impls", nargs="+", default=["stock-qlora", "velotune-qlora", "velotune-lora"], choices=IMPLS)
    ap.add_argument("--shape", default="8b", choices=list(common.SHAPES))
    common.add_model_args(ap)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the contenders this many times, interleaved; report each one's median run",
    )
    ap.add_argument("--recompute", choices=["layer", "mlp"], help="get_peft_model(recompute=); default: the library's")
    ap.add_argument("--cuda-graphs", action="store_true", help="get_peft_model(cuda_graphs=True)")
    ap.add_argument("--offload-embedding", action="store_true", help="get_peft_model(offload_embedding=True)")
    ap.add_argument("--mlp-row-blocks", type=int, help="get_peft_model(mlp_row_blocks=), recompute='mlp'")
    ap.add_argument(
        "--optimizer",
        default="adamw",
        choices=common.OPTIMIZERS,
        help="velotune contenders: torch AdamW, velotune.OffloadedAdamW, or it updating in backward",
    )
    ap.add_argument(
        "--cublas-workspace",
        default=None,
        help="CUBLAS_WORKSPACE_CONFIG for the velotune contenders (':0:0': no cuBLAS workspace memsets)",
    )
    ap.add_argument("--profile", action="store_true", help="GPU ms per step by kernel category (3 profiled steps)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--base-src", type=Path, help="the src/ folder of another tree, for the '@base' contenders")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU, 2 steps: checks the code path")
    common.add_output_args(ap)
    ap.add_argument("--worker", metavar="IMPL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cpu_smoke:
        args.device, args.shape, args.dtype = "cpu", "tiny", "fp32"
        args.steps, args.warmup, args.batch, args.seq = 2, 1, 2, 32
    if args.worker:
        args.impl = args.worker
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    card = common.card(args.device)
    print(f"{card}  commit {args.commit}  shape {args.shape}  batch {args.batch} x {args.seq}", flush=True)
    argv = (
        [
            "--shape",
            args.shape,
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--optimizer",
            args.optimizer,
        ]
        + (["--recompute", args.recompute] if args.recompute else [])
        + (["--mlp-row-blocks", str(args.mlp_row_blocks)] if args.mlp_row_blocks is not None else [])
        + (["--cuda-graphs"] if args.cuda_graphs else [])
        + (["--offload-embedding"] if args.offload_embedding else [])
        + (["--profile"] if args.profile else [])
        + (["--base-src", str(args.base_src)] if args.base_src else [])
        + common.model_argv(args)
    )
    runs: dict[str, list[dict]] = {}
    for impl in [impl for _ in range(args.rounds) for impl in args.impls]:
        env = None
        if args.cublas_workspace is not None and impl.startswith("velotune"):
            # read by PyTorch when it makes its first cuBLAS handle: set before the worker starts
            env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": args.cublas_workspace}
        r = common.run_worker(__file__, ["--worker", impl, *argv], env=env)
        if r is None or r.get("oom"):
            print(f"{impl}: {'OOM' if r else 'failed'}", flush=True)
            continue
        runs.setdefault(impl, []).append(r)
        print(
            f"  {impl:<20} {r['tokens_per_s']:>8.0f} tok/s {r['ms_per_step']:>7.1f} ms/step"
            + (f"  peak {r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else "")
            + f"  first loss {r['first_loss']:.5f}"
            + ("  [embeddings in host memory]" if r.get("embeddings_offloaded") else ""),
            flush=True,
        )
    res = {impl: common.median_run(rs) for impl, rs in runs.items()}
    for impl, r in res.items():
        if r.get("profile"):
            common.print_profile(impl, r["profile"])
        if args.cublas_workspace is not None and impl.startswith("velotune"):
            r["cublas_workspace_config"] = args.cublas_workspace
    # each velotune contender against every other contender of this call
    for name, v in res.items():
        if not name.startswith("velotune"):
            continue
        for base, s in res.items():
            if base == name:
                continue
            speed = v["tokens_per_s"] / s["tokens_per_s"]
            v.setdefault("speedup_vs", {})[base] = speed
            mem = v["peak_gib"] / s["peak_gib"] if v["peak_gib"] and s["peak_gib"] else None
            v.setdefault("memory_vs", {})[base] = mem
            print(f"{name} / {base}: {speed:.3f}x tokens/s" + (f", {mem:.3f}x peak memory" if mem else ""), flush=True)
    common.write_rows(
        args.jsonl,
        "qlora",
        [{k: v for k, v in r.items() if k != "profile"} for r in res.values()],
        args.commit,
        args.device,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
