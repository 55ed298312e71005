"""Longest trainable sequence (batch 1) of the Llama-3.1-8B shape: velotune vs stock, LoRA and QLoRA.

Per contender (the four of bench/qlora.py, velotune with its default offloaded checkpointing), in its own
process: one training step at each --probes length; peak memory is linear in the length (flash/cuDNN
attention, no [T, T] or [T, V] tensors in velotune), so a least-squares line through the probes
predicts the longest length that fits the allocator cap (--card-gib stands for a smaller card through
`torch.cuda.set_per_process_memory_fraction`), and with offloaded checkpointing also the host RAM the
pinned layer inputs need. Then ONE step runs at 5% under that length (rounded down to 1024; on OOM 4%
shorter, up to 3 times): the reported maximum is a length that trained, with that step's tokens/s. A
step that a quadratic fit of the probe times says would overrun --time-box is shortened and marked
time-boxed. Stock contenders, which run out of memory ~10x sooner, probe a quarter of the lengths.

    python bench/context.py --impls velotune-qlora --card-gib 78 --probes 8192 16384 32768 --time-box 470
    python bench/context.py --impls velotune-qlora velotune-lora --gpus 2 --host-share 0.5 --card-gib 78
    python bench/context.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402

IMPLS = ("velotune-qlora", "velotune-lora", "stock-qlora", "stock-lora")


def _host_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _free_cached() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    host_empty = getattr(torch._C, "_host_emptyCache", None)  # cached pinned host blocks
    if host_empty is not None:
        host_empty()


def worker(args) -> dict:
    """Probe, fit, verify for args.impl (see the module docstring)."""
    device, dtype = args.device, (torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    cuda = device.startswith("cuda")
    cfg = common.config(args.shape, args.checkpoint)
    deadline = time.time() + args.time_box
    out: dict = {"impl": args.impl, "probes": [], "verify": []}
    if cuda and args.card_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.card_gib * 2**30 / total))
        out["cap_gib"] = args.card_gib
    cap = (
        args.card_gib * 2**30
        if args.card_gib
        else (torch.cuda.get_device_properties(device).total_memory if cuda else None)
    )
    memory = common.memory_options(args)
    if memory.get("offload_every") == "auto" and "host_memory_budget" not in memory:
        # this worker's share of the host (side-by-side workers split it), as the host limit below
        memory["host_memory_budget"] = int(_host_available_bytes() * args.host_share - 16 * 2**30)
    model = common.build(
        args.impl,
        cfg,
        device,
        dtype,
        max(args.probes),
        memory if args.impl.startswith("velotune") else None,
        args.checkpoint,
    )
    stats = getattr(model, "velotune_offload_stats", None)

    def bounds(r):
        """Which bound is closest at this step: the GPU (peak / cap) or the host (layer inputs kept / budget)."""
        if stats is None:
            return
        budget = (
            stats.host_budget
            or memory.get("host_memory_budget")
            or int(_host_available_bytes() * args.host_share - 16 * 2**30)
        )
        k = stats.offload_every  # the last step's (offload_every=1: every input kept)
        needed = -(-cfg.num_hidden_layers // k) * cfg.hidden_size * torch.finfo(dtype).bits // 8 * r["seq"]
        r.update(
            offload_every=k,
            host_needed_gib=needed / 2**30,
            host_budget_gib=budget / 2**30,
            gpu_use=r["peak_gib"] * 2**30 / cap if cuda else 0.0,
            host_use=needed / budget,
        )
        r["bound"] = "gpu" if r["gpu_use"] >= r["host_use"] else "host"

    def note(r):
        return (
            f"; k={r['offload_every']}, host inputs {r['host_needed_gib']:.1f} of {r['host_budget_gib']:.1f} GiB "
            f"({r['host_use']:.0%}), GPU {r['gpu_use']:.0%} of cap: {r['bound']}-bound"
            if "bound" in r
            else ""
        )

    def one_step(length):
        step, _, opt, _ = common.training_step(model, 1, length, device)
        _free_cached()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        loss = step().item()
        common.sync(device)
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if cuda else None
        del step, opt
        r = {
            "seq": length,
            "s": dt,
            "tokens_per_s": length / dt,
            "peak_gib": peak / 2**30 if peak else None,
            "loss": loss,
        }
        bounds(r)
        return r

    one_step(args.probes[0])  # warm-up: kernels compiled, buffers allocated
    for length in args.probes:
        try:
            r = one_step(length)
        except torch.OutOfMemoryError:
            print(f"  [{args.impl}] probe {length:>7}: OOM", flush=True)
            _free_cached()
            break
        out["probes"].append(r)
        print(
            f"  [{args.impl}] probe {length:>7}: {r['s']:.2f} s, {r['tokens_per_s']:.0f} tok/s"
            + (f", peak {r['peak_gib']:.2f} GiB" if cuda else "")
            + note(r),
            flush=True,
        )
    if not cuda or len(out["probes"]) < 2:
        return out
    lengths = torch.tensor([p["seq"] for p in out["probes"]], dtype=torch.float64)
    peaks = torch.tensor([p["peak_gib"] * 2**30 for p in out["probes"]], dtype=torch.float64)
    times = torch.tensor([p["s"] for p in out["probes"]], dtype=torch.float64)
    slope = float(((lengths - lengths.mean()) * (peaks - peaks.mean())).sum() / ((lengths - lengths.mean()) ** 2).sum())
    intercept = float(peaks.mean() - slope * lengths.mean())
    limits = {"gpu": (cap - intercept) / slope}
    if stats is not None:  # every layer's input (every k-th: --offload-every) waits in host memory
        every = memory.get("offload_every", 1)  # the library's default: every layer input
        kept = 1 if every == "auto" else -(-cfg.num_hidden_layers // every)
        per_token = kept * cfg.hidden_size * torch.finfo(dtype).bits // 8
        limits["host"] = (
            memory.get("host_memory_budget") or _host_available_bytes() * args.host_share - 16 * 2**30
        ) / per_token
    basis = torch.stack([torch.ones_like(lengths), lengths, lengths**2][: len(lengths)], 1)
    coef = torch.linalg.lstsq(basis, times[:, None]).solution[:, 0].tolist()

    def predicted_s(length):
        return sum(c * length**i for i, c in enumerate(coef))

    length = int(min(limits.values()) * 0.95) // 1024 * 1024  # allocator fragmentation near a full card
    out.update(
        bytes_per_token=slope,
        intercept_gib=intercept / 2**30,
        limits={k: int(v) for k, v in limits.items()},
        bound_by=min(limits, key=limits.get),
        time_boxed=False,
    )
    print(
        f"  [{args.impl}] fit: {slope / 1024:.1f} KiB/token + {intercept / 2**30:.2f} GiB; limits "
        + ", ".join(f"{k} {int(v)}" for k, v in limits.items())
        + f" tokens -> try {length}",
        flush=True,
    )
    for _ in range(4):
        left = deadline - time.time() - 30
        while length > out["probes"][-1]["seq"] and predicted_s(length) > left:
            length = int(length * 0.9) // 1024 * 1024
            out["time_boxed"] = True
        if length <= out["probes"][-1]["seq"]:
            break
        print(f"  [{args.impl}] verify {length}: predicted {predicted_s(length):.0f} s", flush=True)
        try:
            r = one_step(length)
        except torch.OutOfMemoryError:
            out["verify"].append({"seq": length, "oom": True})
            print(f"  [{args.impl}] verify {length}: OOM", flush=True)
            _free_cached()
            length = int(length * 0.96) // 1024 * 1024
            continue
        out["verify"].append(r)
        out.update(max_seq=length, tokens_per_s=r["tokens_per_s"], peak_gib=r["peak_gib"])
        print(
            f"  [{args.impl}] verify {length}: ok, {r['s']:.0f} s, {r['tokens_per_s']:.0f} tok/s, "
            f"peak {r['peak_gib']:.2f} GiB" + note(r),
            flush=True,
        )
        break
    return out


def run_lanes(args, argv: list[str]) -> list[dict]:
    """Each contender in its own process; --gpus N: N lanes side by side (one GPU each), filled
    round-robin; every lane ends within --time-box of the start."""
    queues = [args.impls[i :: args.gpus] for i in range(args.gpus)]
    order = [impl for q in queues for impl in q]
    results: list[dict] = []
    lane_deadline = time.time() + args.time_box

    def lane(gpu: int, impls: list[str]):
        for impl in impls:
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)} if len(queues) > 1 else None
            stock = impl.startswith("stock")
            probes = [max(256, p // 4) for p in args.probes] if stock else args.probes
            left = lane_deadline - time.time()
            box = min(left, args.stock_time_box) if stock else left
            if box < 60:
                print(f"[gpu{gpu}] {impl}: skipped, lane time box spent", flush=True)
                continue
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                impl,
                *argv,
                "--time-box",
                str(box),
                "--probes",
                *map(str, probes),
                "--host-share",
                str(args.host_share or 1.0 / len(queues)),
            ]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            for line in proc.stdout:
                if line.startswith("RESULT "):
                    results.append(json.loads(line[len("RESULT ") :]))
                elif "warn" not in line.lower():
                    print(f"[gpu{gpu}] {line}", end="", flush=True)
            proc.wait()

    threads = [threading.Thread(target=lane, args=(g, q)) for g, q in enumerate(queues)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(results, key=lambda r: order.index(r["impl"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--shape", default="8b", choices=list(common.SHAPES))
    common.add_model_args(ap)
    ap.add_argument("--offload-embedding", action="store_true", help="velotune: get_peft_model(offload_embedding=True)")
    ap.add_argument("--probes", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--card-gib", type=float, default=0.0, help="cap the allocator at this many GiB (0: whole card)")
    ap.add_argument("--gpus", type=int, default=1, help="contenders side by side, one GPU each")
    ap.add_argument(
        "--host-share",
        type=float,
        default=0.0,
        help="share of the host RAM each contender may pin (default: 1 / lanes)",
    )
    ap.add_argument("--time-box", type=float, default=480.0, help="seconds per lane")
    ap.add_argument("--stock-time-box", type=float, default=120.0, help="seconds per stock contender")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU: checks the code path")
    common.add_output_args(ap)
    ap.add_argument("--worker", metavar="IMPL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cpu_smoke:
        args.device, args.shape, args.dtype = "cpu", "tiny", "fp32"
        args.probes, args.time_box = [32, 64], 240.0
    if args.worker:
        args.impl = args.worker
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    print(
        f"{common.card(args.device)}  commit {args.commit}  shape {args.shape}"
        + (f"  allocator capped at {args.card_gib:g} GiB" if args.card_gib else ""),
        flush=True,
    )
    argv = ["--shape", args.shape, "--device", args.device, "--dtype", args.dtype, *common.model_argv(args)] + (
        ["--offload-embedding"] if args.offload_embedding else []
    )
    if args.card_gib:
        argv += ["--card-gib", str(args.card_gib)]
    results = run_lanes(args, argv)
    print("max context (batch 1):")
    rows = []
    for c in results:
        if "max_seq" in c:
            print(
                f"  {c['impl']:<15} {c['max_seq']:>8} tokens trained, {c['tokens_per_s']:.0f} tok/s, peak "
                f"{c['peak_gib']:.1f} GiB; bound by {c['bound_by']}{' (time-boxed)' if c['time_boxed'] else ''}; "
                f"fit {c['bytes_per_token'] / 1024:.1f} KiB/token",
                flush=True,
            )
            rows.append(
                {
                    k: c.get(k)
                    for k in (
                        "impl",
                        "max_seq",
                        "tokens_per_s",
                        "peak_gib",
                        "bound_by",
                        "time_boxed",
                        "bytes_per_token",
                        "intercept_gib",
                        "limits",
                        "cap_gib",
                    )
                }
            )
        for r in c.get("probes", []) + [v for v in c.get("verify", []) if "bound" in v]:
            if "bound" in r:  # per length: which bound holds
                print(
                    f"    {r['seq']:>8} tokens: k={r['offload_every']}, GPU {r['peak_gib'] or 0:.1f} GiB "
                    f"({r['gpu_use']:.0%} of cap), host inputs {r['host_needed_gib']:.1f} of "
                    f"{r['host_budget_gib']:.1f} GiB ({r['host_use']:.0%}): {r['bound']}-bound",
                    flush=True,
                )
        if rows and rows[-1]["impl"] == c["impl"]:
            rows[-1]["probes"] = c.get("probes")
        else:
            print(f"  {c['impl']:<15} not verified: {json.dumps({k: c.get(k) for k in ('limits', 'verify')})}")
    common.write_rows(args.jsonl, "context", rows, args.commit, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
