"""Host<->device copy bandwidth on this card, alone and beside a bf16 GEMM loop on the compute stream:
is the saved set's copy to host memory (146 MiB per 8B layer, one copy) bound by the link?

    python bench/copy_bandwidth.py [--mib 146]
"""
import argparse

import torch


def timed(fn, reps=10):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=float, default=146.0)
    args = ap.parse_args()
    n = int(args.mib * 2**20)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev2 = torch.empty_like(dev)
    side = torch.cuda.Stream()
    rows = []
    for name, fn in [("D2H one copy", lambda: host.copy_(dev, non_blocking=True)),
                     ("H2D one copy", lambda: dev.copy_(host, non_blocking=True)),
                     ("D2H 4 chunks", lambda: [host[j * n // 4:(j + 1) * n // 4].copy_(
                         dev[j * n // 4:(j + 1) * n // 4], non_blocking=True) for j in range(4)]),
                     ("D2D one copy", lambda: dev2.copy_(dev))]:
        ms = timed(fn)
        rows.append((name, ms, n / ms / 1e6))
    # D2H on a side stream while the compute stream runs GEMMs
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    gemm_ms = timed(lambda: a @ b, reps=20)
    done = torch.cuda.Event(enable_timing=True)
    t0 = torch.cuda.Event(enable_timing=True)
    t0.record(side)
    with torch.cuda.stream(side):
        for _ in range(5):
            host.copy_(dev, non_blocking=True)
        done.record(side)
    for _ in range(int(5 * rows[0][1] / gemm_ms) + 5):
        a @ b
    torch.cuda.synchronize()
    ms = t0.elapsed_time(done) / 5
    rows.append(("D2H beside GEMMs", ms, n / ms / 1e6))
    for name, ms, gbs in rows:
        print(f"  {name:<18} {args.mib:.0f} MiB: {ms:7.3f} ms  {gbs:6.1f} GB/s", flush=True)
    print(f"  GEMM 4096x4096x14336 bf16: {gemm_ms:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
