"""Where does an offloaded-checkpointing step wait? Forward and backward timed apart, the CUDA
runtime calls the host makes (allocations, synchronisations), and the PCIe copy rate.

    PYTHONPATH=.devsite:src python bench/offload_diag.py --recompute mlp layer

8B QLoRA shape as bench/qlora.py builds it, batch 2 x 2048, no optimizer (forward + backward only).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from qlora import build  # noqa: E402
from train import _config  # noqa: E402


def pcie() -> str:
    n = 32 * 2**20
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    out = []
    for name, fn in (("D2H", lambda: host.copy_(dev, non_blocking=True)), ("H2D", lambda: dev.copy_(host, non_blocking=True))):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        out.append(f"{name} {20 * n / (time.perf_counter() - t0) / 1e9:.1f} GB/s")
    t0 = time.perf_counter()
    for _ in range(10):
        torch.empty(n, dtype=torch.uint8, pin_memory=True)
    out.append(f"pinned 32 MiB alloc (cached) {1e6 * (time.perf_counter() - t0) / 10:.0f} us")
    return ", ".join(out)


def diag(mode: str, args) -> None:
    model = build(args.impl, _config("8b"), "cuda", torch.bfloat16, args.seq, recompute=mode)
    ids = torch.randint(0, 128000, (args.batch, args.seq), device="cuda")

    def fwd():
        return model(input_ids=ids, labels=ids).loss

    for _ in range(3):
        fwd().backward()
    torch.cuda.synchronize()
    tf, tb = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = fwd()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        tf.append((t1 - t0, t2 - t0))
        tb.append((t3 - t2, t4 - t2))
    avg = lambda xs, i: 1e3 * sum(x[i] for x in xs) / len(xs)  # noqa: E731
    stats = getattr(model, "velotune_offload_stats", None)
    print(f"[{mode}] forward: enqueue {avg(tf, 0):.1f} ms, done {avg(tf, 1):.1f} ms | backward: enqueue "
          f"{avg(tb, 0):.1f} ms, done {avg(tb, 1):.1f} ms | offload {stats}", flush=True)

    import cProfile
    import io
    import pstats

    for phase in ("forward", "backward"):      # cProfile before torch.profiler (it leaves Triton hooks set)
        loss = fwd() if phase == "backward" else None
        torch.cuda.synchronize()
        pr = cProfile.Profile()
        pr.enable()
        if phase == "forward":
            loss = fwd()
        else:
            loss.backward()
        pr.disable()
        torch.cuda.synchronize()
        if phase == "forward":
            loss.backward()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(args.top)
        print(f"  cProfile {phase} [{mode}]:\n" + "\n".join(
            ln for ln in buf.getvalue().splitlines() if ln.strip() and "function calls" not in ln
            and "Ordered by" not in ln and "List reduced" not in ln), flush=True)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fwd().backward()
        torch.cuda.synchronize()
    api, gpu = defaultdict(lambda: [0, 0.0]), defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.name.startswith("cuda") and e.device_type == torch.autograd.DeviceType.CPU:
            api[e.name][0] += 1
            api[e.name][1] += e.cpu_time_total / 1e3
        elif e.device_type == torch.autograd.DeviceType.CUDA and "emcpy" in e.name:
            gpu[e.name][0] += 1
            gpu[e.name][1] += e.device_time_total / 1e3 if hasattr(e, "device_time_total") else e.cuda_time_total / 1e3
    for name, (n, ms) in sorted(api.items(), key=lambda kv: -kv[1][1])[:10]:
        print(f"  host {name:<36} {n:6d} calls {ms:9.2f} ms", flush=True)
    for name, (n, ms) in sorted(gpu.items(), key=lambda kv: -kv[1][1])[:6]:
        print(f"  gpu  {name:<36} {n:6d} copies {ms:9.2f} ms", flush=True)
    del model
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recompute", nargs="+", default=["mlp", "layer"], choices=["mlp", "layer"])
    ap.add_argument("--impl", default="velotune-qlora")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=14, help="cProfile lines per phase")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), pcie(), flush=True)
    for mode in args.recompute:
        diag(mode, args)


if __name__ == "__main__":
    main()
